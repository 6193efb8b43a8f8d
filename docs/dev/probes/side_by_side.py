"""The sampler kernels of another revision (their csrc/ extracted into probe/old_csrc/csrc, e.g.
`mkdir -p probe/old_csrc && git archive main csrc | tar -x -C probe/old_csrc`) against this
tree's, side by side in one process: median device time per call with the L2 flushed (us), and
whether both draw the same tokens. Run on the device from the repository root (PYTHONPATH=.,
carry probe). SBS_SHAPES="64x151936,256x32000" picks other (batch x vocab) shapes, SBS_SEED=batch
other rows, SBS_CONFIGS="greedy,plain" other configurations, SBS_DTYPE=bfloat16 other logits."""
import os, statistics, torch
from torch.utils import cpp_extension
from xllm_sampling import kernels
os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
old_csrc = os.path.abspath("probe/old_csrc/csrc")
old = cpp_extension.load(name="xllm_sampling_sampler_old", sources=[f"{old_csrc}/sampler/{f}" for f in sorted(os.listdir(f"{old_csrc}/sampler")) if f.endswith(".cu")],
                         extra_include_paths=[old_csrc] + kernels.extra_include_paths(), extra_cflags=["-O3"],
                         extra_cuda_cflags=kernels.NVCC_FLAGS)
new = kernels.load("sampler")
flush = torch.ones(128 * 2**20, device="cuda")  # read before each call (gate.Timer's flush)
def time_us(f, reps=60):
    f(); torch.cuda.synchronize(); ts = []
    for _ in range(reps):
        flush.sum()
        torch.cuda._sleep(1_000_000)  # the host's launch of f hidden behind it (the flush alone is too short)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); f(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e) * 1e3)
    return statistics.median(ts)
cfgs = {"top-k 50 + top-p 0.9": (0.8, 50, 0.9, 0.0), "top-k 50": (0.8, 50, 1.0, 0.0), "top-k 1": (0.8, 1, 1.0, 0.0),
        "top-k 50 + min-p 0.1": (0.8, 50, 1.0, 0.1), "top-k 128 + top-p 0.9": (0.8, 128, 0.9, 0.0),
        "top-k 200": (0.8, 200, 1.0, 0.0), "top-k 20": (0.8, 20, 1.0, 0.0), "greedy": (0.0, 0, 1.0, 0.0), "plain": (0.8, 0, 1.0, 0.0),
        "top-p 0.9": (0.8, 0, 0.9, 0.0), "min-p 0.1": (0.8, 0, 1.0, 0.1)}
default = "top-k 50 + top-p 0.9,top-k 50,top-k 1,top-k 50 + min-p 0.1,top-k 128 + top-p 0.9,top-k 200"
cfgs = {name: cfgs[name] for name in os.environ.get("SBS_CONFIGS", default).split(",")}
dtype = getattr(torch, os.environ.get("SBS_DTYPE", "float32"))
print("# NVIDIA", torch.cuda.get_device_name(), "torch", torch.__version__, dtype, "logits, temperature 0.8 (greedy 0), us (median of 60, L2 flushed by a read)")
print(f"{'config':24s} {'B':>4s} {'V':>7s} {'before':>8s} {'after':>8s}")
shapes = os.environ.get("SBS_SHAPES", "1x32000,1x151936,16x32000,16x151936,64x32000")
for B, V in (tuple(map(int, s.split("x"))) for s in shapes.split(",")):
    seed = B if os.environ.get("SBS_SEED") == "batch" else B + V  # "batch": sampler_kernel_split.py's rows
    x = (torch.randn(B, V, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)) * 3).to(dtype)
    pos = torch.arange(B, device="cuda")
    for name, (t, k, p, mp) in cfgs.items():
        args = (x, None, t, None, k, None, p, None, mp, None, 1, pos, 0, None, None, 0.0, None, 0.0, None, 1.0)
        a, b = old.sample(*args), new.sample(*args)
        same = torch.equal(a[0], b[0])
        print(f"{name:24s} {B:4d} {V:7d} {time_us(lambda: old.sample(*args)):8.1f} {time_us(lambda: new.sample(*args)):8.1f}  same tokens: {same}", flush=True)
