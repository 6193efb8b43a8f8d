"""The top-k kernels of several revisions, and FlashInfer's top_k when it imports, side by side in
one process over issue 23's 64 cells: this tree's ("tree") and each `probe/variants/<name>/csrc`
(e.g. `mkdir -p probe/variants/main && git archive main csrc | tar -x -C probe/variants/main`),
built in parallel; median device time per call with the L2 flushed by a read (us), and whether
every result is the documented top k (values equal to a stable float64 ranking's; the index set
equal, ties by lower index; sorted: the same order). Run on the device from the repository root
(PYTHONPATH=., carry probe; FlashInfer's top-k module prebuilt as .ci/gpu links it, loaded by
.ci/fi_prebuilt_bench.py's use_prebuilt_topk, else skipped): `python
docs/dev/probes/topk_side_by_side.py main tree`. TOPK_SHAPES="16x151936,64x32000" picks other
(batch x vocab) shapes, TOPK_DTYPES="bfloat16" and TOPK_KS="50" fewer cells."""
import os
import sys
from pathlib import Path

import torch
from torch.utils import cpp_extension

from xllm_sampling import gate, kernels

from variant_builds import build_side_by_side, median_us  # this folder's helpers

os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"


def build(name: str):
    """The top-k extension of probe/variants/<name>/csrc (this tree's for "tree")."""
    if name == "tree":
        return kernels.load("air_topk")
    root = Path("probe/variants") / name / "csrc"
    return cpp_extension.load(name=f"xllm_air_topk_variant_{name.replace('-', '_')}",
                              sources=[str(root / "air_topk" / "air_topk.cu")],
                              extra_include_paths=[str(root.resolve())] + kernels.extra_include_paths(),
                              extra_cflags=["-O3"], extra_cuda_cflags=kernels.NVCC_FLAGS)


def call(mod, x, k, sorted_):
    need = mod.workspace_size(x.shape[0], x.shape[1], k, x.device.index)
    ws = torch.zeros(max(need, 1), dtype=torch.uint8, device=x.device) if need else None
    return lambda: mod.topk(x, k, True, sorted_, ws, None, None)


def correct(values, indices, x, k, sorted_):
    ref = x.double().sort(dim=-1, descending=True, stable=True).indices[:, :k]
    if sorted_:
        return torch.equal(indices, ref) and torch.equal(values, x.gather(-1, ref))
    return torch.equal(indices.sort(-1).values, ref.sort(-1).values) and torch.equal(values, x.gather(-1, indices))


def main(names):
    mods = build_side_by_side(names, build, "TOPK_VARIANT_BUILD")
    if mods is None:
        return
    sys.path.insert(0, ".ci")
    from fi_prebuilt_bench import use_prebuilt_topk
    fi = None
    if use_prebuilt_topk():
        import flashinfer as fi
    timer = gate.Timer("cuda", host_overhead=False)  # L2 flushed by a read, the launch hidden behind a spin
    print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "FlashInfer",
          getattr(fi, "__version__", "not loaded"), "| us, median of 40, L2 flushed by a read")
    print(f"{'dtype':9s} {'k':>5s} {'sorted':>6s} {'B':>4s} {'V':>7s} " + " ".join(f"{n:>10s}" for n in names)
          + f" {'flashinfer':>10s}  correct")
    shapes = os.environ.get("TOPK_SHAPES", "1x32000,1x151936,16x32000,16x151936,64x32000,64x151936,256x32000,256x151936")
    for dtype in (getattr(torch, d) for d in os.environ.get("TOPK_DTYPES", "float32,bfloat16").split(",")):
        for k in map(int, os.environ.get("TOPK_KS", "50,1024").split(",")):
            for sorted_ in (True, False):
                for B, V in (tuple(map(int, s.split("x"))) for s in shapes.split(",")):
                    g = torch.Generator("cuda").manual_seed(B * V + k)
                    x = (torch.randn(B, V, device="cuda", generator=g) * 3).to(dtype)
                    calls = [call(mods[n], x, k, sorted_) for n in names]
                    ok = all(correct(*f(), x, k, sorted_) for f in calls)
                    times = [median_us(f, timer, 40) for f in calls]
                    t_fi = median_us(lambda: fi.top_k(x, k, sorted=sorted_), timer, 40) if fi is not None else float("nan")
                    print(f"{str(dtype)[6:]:9s} {k:5d} {str(sorted_):>6s} {B:4d} {V:7d} "
                          + " ".join(f"{t:10.1f}" for t in times) + f" {t_fi:10.1f}  {ok}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["tree"])
