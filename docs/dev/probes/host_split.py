"""Where the sampler's batch-1 host time goes (wall us per call, 200 calls back to back, one sync)."""
import time, torch
import xllm_sampling as xs
from xllm_sampling import flags, kernels
from xllm_sampling.ops import sampler
mod = kernels.load("sampler")
x = torch.randn(1, 151936, device="cuda") * 3
t = torch.full((1,), 0.8, device="cuda")
pos = torch.arange(1, device="cuda")
tok = torch.empty(1, dtype=torch.int64, device="cuda"); lp = torch.empty(1, device="cuda")
def wall(f, n=200):
    for _ in range(10): f()
    torch.cuda.synchronize()
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n): f()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best
params_plain = sampler._params(x, t, None, None, None, 1, pos)
params_topk = sampler._params(x, t, 50, 0.9, None, 1, pos)
with flags.override(sampler=True):
    rows = [
        ("xs.sample plain (t, pos tensors)", lambda: xs.sample(x, temperature=t, seed=1, position=pos)),
        ("xs.sample plain (numbers)", lambda: xs.sample(x, temperature=0.8, seed=1, position=5)),
        ("xs.sample top-k 50 + top-p", lambda: xs.sample(x, temperature=t, top_k=50, top_p=0.9, seed=1, position=pos)),
        ("xs.sample greedy", lambda: xs.sample(x, temperature=0.0, seed=1, position=pos)),
        ("_params plain", lambda: sampler._params(x, t, None, None, None, 1, pos)),
        ("_fast plain (params made)", lambda: sampler._fast(x, params_plain)),
        ("_kernel_call plain", lambda: sampler._kernel_call(mod, x, params_plain)),
        ("_kernel_call top-k", lambda: sampler._kernel_call(mod, x, params_topk)),
        ("mod.sample plain direct", lambda: mod.sample(x, t, 1.0, None, 0, None, 1.0, None, 0.0, None, 1, pos, 0, None, None, 0.0, None, 0.0, None, 1.0)),
        ("mod.sample plain all numbers", lambda: mod.sample(x, None, 0.8, None, 0, None, 1.0, None, 0.0, None, 1, None, 5, None, None, 0.0, None, 0.0, None, 1.0)),
        ("mod.sample top-k direct", lambda: mod.sample(x, t, 1.0, None, 50, None, 0.9, None, 0.0, None, 1, pos, 0, None, None, 0.0, None, 0.0, None, 1.0)),
        ("mod.max_vocab()", lambda: mod.max_vocab()),
        ("2 x torch.empty cuda", lambda: (torch.empty(1, dtype=torch.int64, device="cuda"), torch.empty(1, device="cuda"))),
        ("flags.enabled", lambda: flags.enabled("sampler")),
        ("x.contiguous()", lambda: x.contiguous()),
        ("empty kernel (x.zero_ on 1 elem)", lambda: lp.zero_()),
    ]
    for name, f in rows:
        print(f"{name:40s} {wall(f):7.2f} us", flush=True)
import cProfile, pstats
with flags.override(sampler=True):
    pr = cProfile.Profile(); pr.enable()
    for _ in range(2000): xs.sample(x, temperature=t, seed=1, position=pos)
    pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(14)
