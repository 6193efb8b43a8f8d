"""Shared by the *_kernel_split.py probes: a call's median device time from CUDA events beside
each kernel's mean device time from the torch profiler, the L2 flushed before every call."""
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

FLUSH = torch.empty(512 * 2 ** 20, dtype=torch.uint8, device="cuda")  # twice an H200's L2


def split(call, calls: int = 20) -> tuple[float, dict[str, float]]:
    """(median us of ``calls`` timed calls, {kernel name: mean us per call}), kernels by total time,
    fills left out (the flush is one)."""
    call(), torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        FLUSH.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(), call(), e.record(), e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            FLUSH.zero_()
            call()
        torch.cuda.synchronize()
    kernels = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and "zero" not in ev.name and "fill" not in ev.name.lower():
            name = ev.name.split("<")[0].split("(")[0][-40:]
            kernels[name] = kernels.get(name, 0.0) + ev.device_time / calls
    return statistics.median(times), dict(sorted(kernels.items(), key=lambda kv: -kv[1]))


def text(kernels: dict[str, float], most: int = 8) -> str:
    """The ``most`` largest kernels as ``name us, ...``."""
    return ", ".join(f"{k} {v:.1f}" for k, v in list(kernels.items())[:most])
