"""The sampler kernels of several revisions side by side in one process: this tree's and each
`probe/variants/<name>/csrc` (e.g. `mkdir -p probe/variants/main && git archive main csrc | tar -x -C
probe/variants/main`), built in parallel; median device time per call with the L2 flushed by a
read (us), and whether every revision draws the same tokens as the first. Run on the device from
the repository root (PYTHONPATH=., carry probe): `python docs/dev/probes/sampler_variants.py main
wip-a wip-b`. SBS_SHAPES, SBS_CONFIGS and SBS_DTYPE as for side_by_side.py; "penalties" is a
configuration here too (top-k 50 + top-p 0.9 with 256 generated tokens a row); SBS_T_TENSOR=1 passes
the temperature as a (batch,) tensor, as `xllm-port bench` does."""
import os
import sys
from pathlib import Path

import torch
from torch.utils import cpp_extension

from xllm_sampling import gate, kernels

from variant_builds import build_side_by_side, median_us  # this folder's helpers

os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"


def build(name: str):
    """The sampler extension of probe/variants/<name>/csrc (this tree's for "tree")."""
    if name == "tree":
        return kernels.load("sampler")
    root = Path("probe/variants") / name / "csrc"
    return cpp_extension.load(name=f"xllm_sampler_variant_{name.replace('-', '_')}",
                              sources=[str(p) for p in sorted((root / "sampler").glob("*.cu"))],
                              extra_include_paths=[str(root.resolve())] + kernels.extra_include_paths(),
                              extra_cflags=["-O3"], extra_cuda_cflags=kernels.NVCC_FLAGS)


CONFIGS = {"top-k 50 + top-p 0.9": (0.8, 50, 0.9, 0.0), "top-k 50": (0.8, 50, 1.0, 0.0), "top-k 1": (0.8, 1, 1.0, 0.0),
           "top-k 20": (0.8, 20, 1.0, 0.0), "top-k 128 + top-p 0.9": (0.8, 128, 0.9, 0.0),
           "top-k 200": (0.8, 200, 1.0, 0.0), "top-p 0.9": (0.8, 0, 0.9, 0.0), "min-p 0.1": (0.8, 0, 1.0, 0.1),
           "plain": (0.8, 0, 1.0, 0.0), "greedy": (0.0, 0, 1.0, 0.0), "penalties": (0.8, 50, 0.9, 0.0)}


def main(names):
    mods = build_side_by_side(names, build, "SAMPLER_VARIANT_BUILD")
    if mods is None:
        return
    timer = gate.Timer("cuda", host_overhead=False)  # L2 flushed by a read, the launch hidden behind a spin
    dtype = getattr(torch, os.environ.get("SBS_DTYPE", "float32"))
    configs = os.environ.get("SBS_CONFIGS", "top-k 50 + top-p 0.9,top-k 50,top-k 1,top-k 128 + top-p 0.9,top-p 0.9,penalties")
    shapes = os.environ.get("SBS_SHAPES", "1x32000,1x151936,16x151936,64x32000,64x151936,256x151936")
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, dtype, "logits, us (median of 60, L2 flushed by a read)")
    print(f"{'config':24s} {'B':>4s} {'V':>7s} " + " ".join(f"{n:>12s}" for n in names))
    for B, V in (tuple(map(int, s.split("x"))) for s in shapes.split(",")):
        x = (torch.randn(B, V, device="cuda", generator=torch.Generator("cuda").manual_seed(B + V)) * 3).to(dtype)
        pos = torch.arange(B, device="cuda")
        generated = torch.randint(0, V, (B, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(V))
        for name in configs.split(","):
            t, k, p, mp = CONFIGS[name]
            pen = (generated, None, 0.5, None, 0.5, None, 1.2) if name == "penalties" else (None, None, 0.0, None, 0.0, None, 1.0)
            t_rows = torch.full((B,), t, device="cuda") if os.environ.get("SBS_T_TENSOR") else None
            args = (x, t_rows, t, None, k, None, p, None, mp, None, 1, pos, 0) + pen
            tokens = [m.sample(*args)[0] for m in mods.values()]
            same = all(torch.equal(tokens[0], other) for other in tokens[1:])
            times = [median_us(lambda m=m: m.sample(*args), timer, 60) for m in mods.values()]
            print(f"{name:24s} {B:4d} {V:7d} " + " ".join(f"{v:12.1f}" for v in times) + f"  same tokens: {same}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["tree"])
