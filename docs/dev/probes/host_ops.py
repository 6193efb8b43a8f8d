"""Where logit_softmax's and air_topk's batch-1 host time goes (wall us per call, back to back), and the
sampler's batch-1 device time by filter. Run on the device from the repository root (PYTHONPATH=.)."""
import time, torch, cProfile, pstats
import xllm_sampling as xs
from xllm_sampling import flags, kernels, nvtx, _checks
from xllm_sampling.ops import logit_softmax as ls, air_topk as at
sm = kernels.load("logit_softmax"); tk = kernels.load("air_topk")
def wall(f, n=200):
    for _ in range(10): f()
    torch.cuda.synchronize(); best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n): f()
        torch.cuda.synchronize(); best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best
x = torch.randn(1, 151936, device="cuda") * 3
t = torch.full((1,), 0.8, device="cuda")
out = torch.empty_like(x)
xs_ = {v: torch.randn(1, v, device="cuda") for v in (4096, 30000, 40000, 151936)}
outs = {v: torch.empty_like(a) for v, a in xs_.items()}
ws = at._workspace(x.device, at._workspace_size(tk, x, 50))
vals, idx = at._output(x, 50)
rows = [
  ("logit_softmax op (t tensor)", lambda: xs.logit_softmax(x, t)),
  ("logit_softmax op (t 0.8)", lambda: xs.logit_softmax(x, 0.8)),
  ("logit_softmax op (t tensor, out)", lambda: xs.logit_softmax(x, t, out=out)),
  ("_checks.logits_2d", lambda: _checks.logits_2d("x", x)),
  ("_temperature(t)", lambda: ls._temperature(t, x)),
  ("nvtx.range", lambda: nvtx.range("logit_softmax").__enter__()),
  ("flags.enabled", lambda: flags.enabled("logit_softmax")),
  ("kernels.load", lambda: kernels.load("logit_softmax")),
  ("torch.empty 1x151936", lambda: torch.empty(x.shape, dtype=torch.float32, device=x.device)),
  ("torch.empty(2) x1", lambda: torch.empty(2, device="cuda")),
  ("empty kernel (zero_ 1 elem)", lambda: t.zero_() if False else out[0, :1].zero_()),
]
for v in (4096, 30000, 40000, 151936):
  rows.append((f"sm binding V={v} (t tensor)", lambda v=v: sm.logit_softmax(xs_[v], t, 1.0, False, outs[v])))
rows += [
  ("topk op k=50", lambda: xs.air_topk_last_dim(x, 50)),
  ("topk op k=50 cached_output", lambda: xs.air_topk_last_dim(x, 50, cached_output=True)),
  ("_workspace_size", lambda: at._workspace_size(tk, x, 50)),
  ("_workspace", lambda: at._workspace(x.device, 1024)),
  ("_output (cached)", lambda: at._output(x, 50)),
  ("tk binding k=50", lambda: tk.topk(x, 50, True, True, ws, vals, idx)),
]
for v in (4096, 30000, 40000):
  xv = xs_[v]; wv = at._workspace(xv.device, at._workspace_size(tk, xv, 50)); vv, iv = at._output(xv, 50)
  rows.append((f"tk binding V={v}", lambda xv=xv, wv=wv, vv=vv, iv=iv: tk.topk(xv, 50, True, True, wv, vv, iv)))
with flags.override(logit_softmax=True, air_topk=True):
  for name, f in rows:
    print(f"{name:36s} {wall(f):7.2f} us", flush=True)
  for name, f in (("logit_softmax", lambda: xs.logit_softmax(x, t)), ("topk", lambda: xs.air_topk_last_dim(x, 50))):
    pr = cProfile.Profile(); pr.enable()
    for _ in range(2000): f()
    pr.disable(); print("==", name); pstats.Stats(pr).sort_stats("tottime").print_stats(10)
# The sampler's batch-1 device time by filter (calls queued behind a spin kernel; logits stay in L2).
def dev(f, n=32):
    f(); torch.cuda.synchronize(); torch.cuda._sleep(5_000_000)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): f()
    e.record(); e.synchronize(); return s.elapsed_time(e) * 1e3 / n
pos = torch.zeros(1, dtype=torch.int64, device="cuda")
cfgs = {"plain": {}, "greedy": dict(temperature=0.0), "top-k 1": dict(top_k=1), "top-k 50": dict(top_k=50),
        "top-k 128": dict(top_k=128), "top-p 0.9": dict(top_p=0.9), "min-p 0.1": dict(min_p=0.1),
        "top-k 50 + top-p 0.9": dict(top_k=50, top_p=0.9), "top-k 50 + min-p 0.1": dict(top_k=50, min_p=0.1),
        "top-k 50 + top-p 0.99": dict(top_k=50, top_p=0.99), "top-k 50 + top-p 0.5": dict(top_k=50, top_p=0.5)}
with flags.override(sampler=True):
  for V in (32000, 151936):
    xv = torch.randn(1, V, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 3
    for name, kw in cfgs.items():
      kw = {"temperature": 0.8, **kw}
      f = lambda: xs.sample(xv, seed=1, position=pos, **kw)
      print(f"sampler B=1 V={V} {name:24s} {sorted(dev(f) for _ in range(5))[2]:7.2f} us device", flush=True)
