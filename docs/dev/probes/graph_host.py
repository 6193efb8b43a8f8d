"""Where the engine's graphed sampling step spends its batch-1 wall time: the sampler eagerly, the
GraphRunner call with each way of passing its inputs, and the replay's parts one by one (flags
state, replay, output clones), wall us per call back to back (best of 5 rounds of 200), V = 151936
fp32, top-k 50 + top-p 0.9, temperature 0.8. Run on the device from the repository root
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
advancing = GraphRunner(step, name="probe_advance", advance=(3,))
views = GraphRunner(step, name="probe_views", advance=(3,), copy_outputs=False)
_, t_s, seed_s, _ = runner.static_inputs(x, t, seed, pos)
all_static = advancing.static_inputs(x, t, seed, pos)
view_inputs = views.static_inputs(x, t, seed, pos)
for _ in range(3):
    runner(x, t, seed, pos), advancing(*all_static), views(*view_inputs)
(key, captured), = runner._graphs.items()
assert captured is not None, "no graph was captured"
rows = [
    ("sample() eager", lambda: step(x, t, seed, pos)),
    ("runner, the caller's tensors (4 copies)", lambda: runner(x, t, seed, pos)),
    ("runner, settings static, host position", lambda: runner(x, t_s, seed_s, pos_host)),
    ("runner, all static, advance (no copy)", lambda: advancing(*all_static)),
    ("  and outputs not copied", lambda: views(*view_inputs)),
    ("flags.path_state()", flags.path_state),
    ("flags.values(cuda_graph, max batch)", lambda: flags.values(("cuda_graph", "cuda_graph_max_batch"))),
    ("graph.replay()", captured.graph.replay),
    ("two output clones", lambda: [o[:1].clone() for o in captured.output]),
    ("logits copy alone", lambda: captured.inputs[0][:1].copy_(x)),
    ("position copy from the host", lambda: captured.inputs[3][:1].copy_(pos_host, non_blocking=True)),
]
print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "wall us per call, B=1, V=151936")
for name, f in rows:
    print(f"{name:42s} {wall(f):8.1f}", flush=True)
