"""Where the engine's graphed sampling step spends its batch-1 wall time: the sampler eagerly, the
GraphRunner call as the engine makes it, and the replay's parts one by one (graph key, input
copies, replay, output clones), wall us per call back to back (best of 5 rounds of 200), V =
151936 fp32, top-k 50 + top-p 0.9, temperature 0.8. Run on the device from the repository root
(PYTHONPATH=.)."""
import time
import torch
import xllm_sampling as xs
from xllm_sampling import GraphRunner, flags


def wall(f, n=200):
    for _ in range(10):
        f()
    torch.cuda.synchronize()
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def step(logits, temperature, seed, position):
    out = xs.sample(logits, temperature=temperature, top_k=50, top_p=0.9, seed=seed, position=position)
    return out.tokens, out.logprobs


x = torch.randn(1, 151936, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 3
t = torch.full((1,), 0.8, device="cuda")
seed = torch.zeros(1, dtype=torch.int64, device="cuda")
pos_host = torch.full((1,), 8, dtype=torch.int64)
pos = pos_host.to("cuda")
runner = GraphRunner(step, name="probe")
for _ in range(3):
    runner(x, t, seed, pos)
(key, captured), = runner._graphs.items()
assert captured is not None, "no graph was captured"
inputs = (x, t, seed, pos)
rows = [
    ("sample() eager", lambda: step(x, t, seed, pos)),
    ("runner(x, t, seed, pos)", lambda: runner(x, t, seed, pos)),
    ("runner, position copied from the host", lambda: runner(x, t, seed, pos_host.to("cuda", non_blocking=True))),
    ("flags.path_state()", flags.path_state),
    ("graph key", lambda: (1, flags.path_state()) + tuple((i.shape[1:], i.dtype, i.device) for i in inputs)),
    ("four input copies", lambda: [s[:1].copy_(i) for s, i in zip(captured.inputs, inputs)]),
    ("logits copy alone", lambda: captured.inputs[0][:1].copy_(x)),
    ("graph.replay()", captured.graph.replay),
    ("two output clones", lambda: [o[:1].clone() for o in captured.output]),
    ("position to device (non_blocking)", lambda: pos_host.to("cuda", non_blocking=True)),
]
print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "wall us per call, B=1, V=151936")
for name, f in rows:
    print(f"{name:40s} {wall(f):8.1f}", flush=True)
