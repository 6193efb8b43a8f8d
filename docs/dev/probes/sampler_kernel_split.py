"""Which kernels a sampling call's device time goes to: each kernel's mean device time (torch
profiler, 20 calls, the L2 flushed before each) beside the call's median from CUDA events, fp32,
temperature 0.8, V = 151936 unless PROBE_VOCAB says, B in 1, 16, 64, 256 unless PROBE_BATCHES says. Run on the device from the repository root
(PYTHONPATH=.)."""
import os
import statistics
import torch
from torch.profiler import ProfilerActivity, profile
import xllm_sampling as xs

V = int(os.environ.get("PROBE_VOCAB", 151936))
flush = torch.empty(512 * 2 ** 20, dtype=torch.uint8, device="cuda")
configs = {"greedy": dict(temperature=0.0), "plain": dict(), "top-k 1": dict(top_k=1), "top-k 50": dict(top_k=50),
           "top-k 50 + top-p 0.9": dict(top_k=50, top_p=0.9), "top-p 0.9": dict(top_p=0.9)}
print("#", torch.cuda.get_device_name(), "torch", torch.__version__, f"V={V} fp32; us")
for B in map(int, os.environ.get("PROBE_BATCHES", "1,16,64,256").split(",")):
    x = torch.randn(B, V, device="cuda", generator=torch.Generator("cuda").manual_seed(B)) * 3
    pos = torch.arange(B, device="cuda")
    for name, kw in configs.items():
        kw = {"temperature": 0.8, **kw}
        call = lambda: xs.sample(x, position=pos, **kw)  # noqa: E731
        call(), torch.cuda.synchronize()
        times = []
        for _ in range(20):
            flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(), call(), e.record(), e.synchronize()
            times.append(s.elapsed_time(e) * 1e3)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                flush.zero_()
                call()
            torch.cuda.synchronize()
        kernels = {}
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA and "zero" not in ev.name and "fill" not in ev.name.lower():
                kernels.setdefault(ev.name.split("<")[0].split("(")[0][-40:], []).append(ev.device_time)
        split = ", ".join(f"{k} {sum(v) / 20:.1f}" for k, v in kernels.items())
        print(f"B={B:4d} {name:22s} call {statistics.median(times):7.1f} | {split}", flush=True)
