"""Phase times of the split path of the top-k kernel (topk_kernel): an instrumented copy of
air_topk.cu (thread 0 of every block records %globaltimer at phase boundaries into a device
array, read back by an added binding), built as its own extension. Prints, over the blocks of one
call, the median time of each phase (ns) and the whole call's span. Run on the device from the
repository root (PYTHONPATH=.): `python docs/dev/probes/topk_phase_clocks.py`; TOPK_CASES picks
the cases (dtype:B:V:k, comma-separated); TOPK_PHASES_BUILD_ONLY=1 only builds. Timers inflate the phases a little."""
import hashlib
import os
import pathlib
import statistics

import torch
from torch.utils import cpp_extension

from xllm_sampling import kernels
from xllm_sampling.paths import CSRC_DIR

src = (CSRC_DIR / "air_topk/air_topk.cu").read_text()


def at(anchor, text, before=True):
    global src
    assert src.count(anchor) == 1, anchor
    src = src.replace(anchor, text + anchor if before else anchor + text)


# ph[block][0..7]: entry, first tile done, stream done, split's keys written, merge done, end, cuts, cut ns
at("namespace {\n", """__device__ long long ph[65536][8];
__device__ __forceinline__ long long now() { long long t; asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); return t; }
#define PH(n) if (threadIdx.x == 0) ph[blockIdx.x * gridDim.y + blockIdx.y][n] = now()
""", before=False)
at("    if (count + kTile > cap || count >= cut_at(k)) cut(s, k, cut_limit(k));\n",
   """    if (count + kTile > cap || count >= cut_at(k)) {
      const long long c0 = now();
      cut(s, k, cut_limit(k));
      if (threadIdx.x == 0) { ph[blockIdx.x * gridDim.y + blockIdx.y][6] += 1; ph[blockIdx.x * gridDim.y + blockIdx.y][7] += now() - c0; }
    }
""")
src = src.replace("    if (count + kTile > cap || count >= cut_at(k)) cut(s, k, cut_limit(k));\n", "", 1)
at("    admit(s, source, s.bound);\n    __syncthreads();\n",
   "    if (threadIdx.x == 0 && base == source.begin && ph[blockIdx.x * gridDim.y + blockIdx.y][1] == 0) PH(1);\n",
   before=False)
at("  const T* xr = x + row * a.vocab;\n", "  PH(0);\n")
at("  stream(s, k, logits);\n", "  PH(2);\n", before=False)
at("    if (!last) return;\n    const int n = a.splits * slot;\n", "    PH(3);\n", before=False)
at("      return write_by_rank(s.buf(), s.count, k, a.flip, values + row * k, a.indices + row * k);\n",
   "      PH(4);\n")
at("  if (a.sorted) sort_descending(s.buf(), k);\n", "  PH(4);\n")
src = src.rstrip()
assert src.endswith("}")
src = src[:-1] + """  m.def("phases", [](int64_t blocks) {
    auto out = torch::empty({blocks, 8}, torch::kInt64);
    C10_CUDA_CHECK(cudaMemcpyFromSymbol(out.data_ptr(), ph, blocks * 8 * sizeof(long long)));
    return out;
  });
  m.def("reset", [] { static long long zero[65536][8]; C10_CUDA_CHECK(cudaMemcpyToSymbol(ph, zero, sizeof(zero))); });
}
"""
at("  for (int i = threadIdx.x; i < k; i += kThreads) {\n    values[row * k + i] = Key<T>::value_of(s.buf()[i], a.flip);",
   "  __syncthreads();\n  PH(5);\n")
work = pathlib.Path("/tmp/topk_phases") / hashlib.sha1(str(CSRC_DIR).encode()).hexdigest()[:8]
work.mkdir(parents=True, exist_ok=True)
(work / "air_topk_phases.cu").write_text(src)
mod = cpp_extension.load(name="xllm_air_topk_phases", sources=[str(work / "air_topk_phases.cu")],
                         extra_include_paths=[str(CSRC_DIR)] + kernels.extra_include_paths(), extra_cflags=["-O3"],
                         extra_cuda_cflags=kernels.NVCC_FLAGS)
if os.environ.get("TOPK_PHASES_BUILD_ONLY"):  # build beside other work, run alone later
    raise SystemExit(0)

print("#", torch.cuda.get_device_name(), "| ns, median over blocks (last blocks: merge rows); span = last end - first entry")
cases = os.environ.get("TOPK_CASES", "float32:256:151936:50,bfloat16:256:151936:50,float32:64:151936:50,"
                       "float32:16:151936:50,bfloat16:64:151936:50,float32:64:151936:1024")
for case in cases.split(","):
    dt, B, V, k = case.split(":")
    B, V, k = int(B), int(V), int(k)
    x = (torch.randn(B, V, device="cuda", generator=torch.Generator("cuda").manual_seed(B + V)) * 3).to(getattr(torch, dt))
    need = mod.workspace_size(B, V, k, 0)
    ws = torch.zeros(max(need, 1), dtype=torch.uint8, device="cuda")
    flush = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        mod.topk(x, k, True, False, ws, None, None)
    flush.sum()
    mod.reset()
    torch.cuda.synchronize()
    mod.topk(x, k, True, False, ws, None, None)
    torch.cuda.synchronize()
    p = mod.phases(65536)
    used = p[:, 0] > 0
    p = p[used]
    t0 = p[:, 0].min().item()
    last = p[:, 3] > 0

    def med(col):
        vals = [v for v in col.tolist() if v > 0]
        return statistics.median(vals) if vals else float("nan")

    print(f"{dt:9s} B={B:4d} V={V:7d} k={k:5d} blocks={len(p):5d} span={(p[:, :6].max().item() - t0) / 1e3:7.1f}us | "
          f"start {med(p[:, 0] - t0) / 1e3:5.1f} first-tile {med(p[:, 1] - p[:, 0]) / 1e3:5.1f} "
          f"stream {med(p[:, 2] - p[:, 0]) / 1e3:5.1f} (cuts {p[:, 6].float().mean().item():.1f}, {med(p[:, 7]) / 1e3:4.1f}us) "
          f"| last: wait {med(p[last, 3] - p[last, 2]) / 1e3:5.1f} merge {med(p[last, 4] - p[last, 3]) / 1e3:5.1f} "
          f"out {med(p[last, 5] - p[last, 4]) / 1e3:5.1f} | latest stream end {(p[:, 2].max().item() - t0) / 1e3:5.1f}",
          flush=True)
