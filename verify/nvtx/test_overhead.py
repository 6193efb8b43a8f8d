"""What the NVTX ranges cost (pytest-benchmark; run it with --benchmark-only, see docs/steps.md).

Three builds of the same sampling path, side by side in one benchmark group per device:
  none: a copy of the xllm_sampling package with every ``with nvtx.range(...)`` rewritten to
        ``if True:`` -- no NVTX code at all;
  off:  the shipped package, flag ``nvtx`` off (must be within noise of none);
  on:   the shipped package, flag on (the range cost, without a profiler attached).
"""
import importlib
import re
import sys

import pytest
import torch

import xllm_sampling
from xllm_sampling import flags
from xllm_sampling.paths import PROJECT_ROOT

RANGE = re.compile(r"^(\s*)with nvtx\.range\([^)]*\):", re.M)


@pytest.fixture(scope="module")
def stripped(tmp_path_factory):
    """xllm_sampling without NVTX code, importable as ``xllm_sampling_no_nvtx`` (same kernels and flags)."""
    root = tmp_path_factory.mktemp("no_nvtx")
    package = root / "xllm_sampling_no_nvtx"
    package.mkdir()
    rewritten = 0
    for source in (PROJECT_ROOT / "xllm_sampling").rglob("*.py"):  # the ops live in xllm_sampling/ops/
        text, n = RANGE.subn(r"\1if True:", source.read_text())
        copy = package / source.relative_to(PROJECT_ROOT / "xllm_sampling")
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(text)
        rewritten += n
    assert rewritten >= 4, "expected the ops' NVTX ranges to rewrite"
    for resource in ("csrc", "flags", "patches", "target"):
        (root / resource).symlink_to(PROJECT_ROOT / resource)
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("xllm_sampling_no_nvtx")
    finally:
        sys.path.remove(str(root))


def inputs(device):
    batch, vocab = (64, 151936) if device == "cuda" else (8, 32000)
    return torch.randn(batch, vocab, device=device) * 3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("build", ["none", "off", "on"])
def test_sampling_path(benchmark, stripped, device, build):
    benchmark.group = f"nvtx overhead: sample, {device}"
    package = stripped if build == "none" else xllm_sampling
    logits = inputs(device)

    def step():
        out = package.sample(logits, temperature=0.8, top_k=50, top_p=0.9, seed=1, position=2)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    with flags.override(nvtx=build == "on"):
        tokens = benchmark(step).tokens
    assert tokens.shape == (logits.shape[0],) and (tokens >= 0).all()


@pytest.mark.parametrize("build", ["none", "off", "on"])
def test_one_range(benchmark, build):
    benchmark.group = "nvtx overhead: one range, host"
    if build == "none":
        def body():
            return None
    else:
        def body():
            with xllm_sampling.nvtx.range("sampler"):
                return None
    with flags.override(nvtx=build == "on"):
        benchmark(body)
