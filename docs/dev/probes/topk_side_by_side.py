"""The top-k kernel of another revision (its csrc/ extracted into probe/old_csrc/csrc, e.g.
`mkdir -p probe/old_csrc && git archive main csrc | tar -x -C probe/old_csrc`) against this
tree's, and FlashInfer's top_k when it imports, side by side in one process over issue 23's 64
cells: median device time per call with the L2 flushed by a read (us), and whether each result
is the documented top k (values equal to a stable float64 ranking's; the index set equal, ties
by lower index; sorted: the same order). Run on the device from the repository root
(PYTHONPATH=., carry probe; FlashInfer's top-k module prebuilt as .ci/gpu links it, loaded by
.ci/fi_prebuilt_bench.py's use_prebuilt_topk, else skipped).
TOPK_SHAPES="16x151936,64x32000" picks other (batch x vocab) shapes."""
import os
import statistics
import sys

import torch
from torch.utils import cpp_extension

from xllm_sampling import gate, kernels

sys.path.insert(0, ".ci")
from fi_prebuilt_bench import use_prebuilt_topk  # noqa: E402

os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
old_csrc = os.path.abspath("probe/old_csrc/csrc")
old = cpp_extension.load(name="xllm_sampling_air_topk_old", sources=[f"{old_csrc}/air_topk/air_topk.cu"],
                         extra_include_paths=[old_csrc] + kernels.extra_include_paths(), extra_cflags=["-O3"],
                         extra_cuda_cflags=kernels.NVCC_FLAGS)
new = kernels.load("air_topk")
if use_prebuilt_topk():
    import flashinfer as fi
else:
    fi = None
timer = gate.Timer("cuda", host_overhead=False)  # L2 flushed by a read, the launch hidden behind a spin


def time_us(f, reps=40):
    f()
    return statistics.median(timer(f) for _ in range(reps))


def call(mod, x, k, sorted_):
    need = mod.workspace_size(x.shape[0], x.shape[1], k, x.device.index)
    ws = torch.zeros(max(need, 1), dtype=torch.uint8, device=x.device) if need else None
    return lambda: mod.topk(x, k, True, sorted_, ws, None, None)


def correct(values, indices, x, k, sorted_):
    ref = x.double().sort(dim=-1, descending=True, stable=True).indices[:, :k]
    if sorted_:
        return torch.equal(indices, ref) and torch.equal(values, x.gather(-1, ref))
    return torch.equal(indices.sort(-1).values, ref.sort(-1).values) and torch.equal(values, x.gather(-1, indices))


print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "FlashInfer", getattr(fi, "__version__", "not loaded"),
      "| us, median of 40, L2 flushed by a read")
print(f"{'dtype':9s} {'k':>5s} {'sorted':>6s} {'B':>4s} {'V':>7s} {'before':>8s} {'after':>8s} {'flashinfer':>10s}  correct")
shapes = os.environ.get("TOPK_SHAPES", "1x32000,1x151936,16x32000,16x151936,64x32000,64x151936,256x32000,256x151936")
for dtype in (torch.float32, torch.bfloat16):
    for k in (50, 1024):
        for sorted_ in (True, False):
            for B, V in (tuple(map(int, s.split("x"))) for s in shapes.split(",")):
                g = torch.Generator("cuda").manual_seed(B * V + k)
                x = (torch.randn(B, V, device="cuda", generator=g) * 3).to(dtype)
                a, b = call(old, x, k, sorted_), call(new, x, k, sorted_)
                ok = all(correct(*f(), x, k, sorted_) for f in (a, b))
                t_fi = time_us(lambda: fi.top_k(x, k, sorted=sorted_)) if fi is not None else float("nan")
                print(f"{str(dtype)[6:]:9s} {k:5d} {str(sorted_):>6s} {B:4d} {V:7d} {time_us(a):8.1f} {time_us(b):8.1f} "
                      f"{t_fi:10.1f}  {ok}", flush=True)
