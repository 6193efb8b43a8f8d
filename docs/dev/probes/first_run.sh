#!/usr/bin/env bash
# The next session's first device run for branches next/sampler-build-split and next/sampler-host
# (this branch holds both): the sampler's build time (four TUs side by side), its cuda tests, the
# whole cuda suite, verify sampler / cuda_graph, the host-time split and `xllm-port bench --host`.
# Send from the repository root with carry [".whl/bundle"] (see .ci/gpu for the wheels); logs in $OUT/log.txt.
set -u
L=$OUT/log.txt
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/bundle/nvtx*.whl .whl/bundle/git*.whl .whl/bundle/smmap*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_ext
nvidia-smi --query-gpu=name,driver_version --format=csv >> $L
t0=$(date +%s); stamp() { echo "== $1 at $(( $(date +%s) - t0 ))s" >> $L; }
python3 -c "from xllm_sampling import kernels; kernels.load('sampler') or exit('build failed')" >> $L 2>&1
stamp "sampler built"
pids=()
for s in $(python3 -c "from xllm_sampling import build; print(*build.steps_with_sources())"); do
  python3 -c "import sys; from xllm_sampling import kernels; kernels.load(sys.argv[1]) or exit('build failed')" $s > /tmp/build_$s.log 2>&1 & pids+=($!)
done
for p in "${pids[@]}"; do wait $p || { echo "BUILD FAILED"; tail -30 /tmp/build_*.log; } >> $L; done
stamp "all built"
timeout 60 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_sampler_kernel.py 2>&1 | tail -3 >> $L
timeout 200 python3 -m pytest -m cuda -q -p no:cacheprovider tests 2>&1 | tail -3 >> $L
stamp tests
rm -rf /tmp/T && cp -r target/refengine /tmp/T
for s in $(grep -v '^#' patches/series); do git -C /tmp/T apply "$PWD/patches/$s/$s.patch"; done
for s in sampler cuda_graph; do
  XLLM_PORT_TARGET=/tmp/T timeout 60 python3 -m pytest -q -p no:cacheprovider --benchmark-disable verify/$s/test_parity.py 2>&1 | tail -1 >> $L
done
timeout 30 python3 docs/dev/probes/host_split.py 2>&1 | head -16 >> $L
timeout 90 python3 -m xllm_sampling.port.cli bench --host >> $L 2>&1
stamp done
