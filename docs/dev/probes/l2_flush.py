"""How the L2 flush before each timed call moves large-batch figures: a write flush (zero_, what
gate.Timer did until 2026-11-28) leaves up to an L2 of dirty lines whose write-back the timed
kernel pays; a read flush (gate.Timer's now) leaves clean lines. Run on the device from the
repository root (PYTHONPATH=.)."""
import statistics, torch
from xllm_sampling import kernels
from xllm_sampling.bench import copy_bandwidth
from xllm_sampling import gate
m = kernels.load("sampler")
l2 = torch.cuda.get_device_properties(0).L2_cache_size
dirty = torch.empty(2 * l2, dtype=torch.uint8, device="cuda")
clean = torch.ones(2 * l2 // 4, dtype=torch.float32, device="cuda")
def timed(f, flush, reps=60):
    ts = []
    for _ in range(reps):
        flush()
        torch.cuda._sleep(2_000_000)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); f(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e) * 1e3)
    return statistics.median(ts)
protocols = {"write flush (zero_)": lambda: dirty.zero_(), "write then read flush": lambda: (dirty.zero_(), clean.sum()),
             "read flush": lambda: clean.sum()}
bw = copy_bandwidth("cuda", gate.Timer("cuda", host_overhead=False))
print(f"# {torch.cuda.get_device_name()}, L2 {l2 >> 20} MiB, copy bandwidth {bw / 1e9:.0f} GB/s (gate.Timer); median us of 60")
for dt in (torch.float32, torch.bfloat16):
    for B, V in ((64, 151936), (256, 151936)):
        x = (torch.randn(B, V, device="cuda", generator=torch.Generator("cuda").manual_seed(1)) * 3).to(dt)
        pos = torch.arange(B, device="cuda")
        floor = x.numel() * x.element_size() / bw * 1e6
        cases = {"greedy": lambda: m.sample(x, None, 0.0, None, 0, None, 1.0, None, 0.0, None, 1, pos, 0, None, None, 0.0, None, 0.0, None, 1.0),
                 "plain": lambda: m.sample(x, None, 0.8, None, 0, None, 1.0, None, 0.0, None, 1, pos, 0, None, None, 0.0, None, 0.0, None, 1.0),
                 "torch amax(dim=1)": lambda: x.amax(dim=1)}
        for name, f in cases.items():
            f()
            print(f"{str(dt)[6:]:9s} B={B:3d} V={V} floor {floor:5.1f} {name:18s} " +
                  "  ".join(f"{p}: {timed(f, fl):6.1f} ({timed(f, fl) / floor:4.2f}x)" for p, fl in protocols.items()), flush=True)
