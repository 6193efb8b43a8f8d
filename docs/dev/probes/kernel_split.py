"""Shared by the *_kernel_split.py probes: a call's median device time from CUDA events beside
each kernel's mean device time from the torch profiler, the L2 flushed by a read before every
call (as gate.Timer does: a written flush leaves dirty lines whose write-back the call would pay)."""
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

FLUSH = torch.ones(512 * 2 ** 20 // 4, device="cuda")  # 512 MiB, twice an H200's L2, summed before every call


def flush() -> None:
    """Evict the L2 by reading FLUSH (its reduction kernels are not the call's)."""
    FLUSH.sum()


def tally(prof, calls: int) -> dict[str, float]:
    """{kernel name: mean us per call} of a profile of ``calls`` repetitions."""
    kernels = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name.split("<")[0].split("(")[0][-40:]
            kernels[name] = kernels.get(name, 0.0) + ev.device_time / calls
    return kernels


def split(call, calls: int = 20) -> tuple[float, dict[str, float]]:
    """(median us of ``calls`` timed calls, {kernel name: mean us per call}), kernels by total time.
    The flush's kernels are profiled alone and their time taken off each name's total, so that a
    reduction of the call itself with the same kernel name as the flush's stays in the tally."""
    call(), torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        flush()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(), call(), e.record(), e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush()
            call()
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as flushes:
        for _ in range(calls):
            flush()
        torch.cuda.synchronize()
    kernels = tally(prof, calls)
    for name, us in tally(flushes, calls).items():
        kernels[name] = kernels.get(name, 0.0) - us
    kernels = {name: us for name, us in kernels.items() if us > 0.05}  # what is left of the flush's own: noise
    return statistics.median(times), dict(sorted(kernels.items(), key=lambda kv: -kv[1]))


def text(kernels: dict[str, float], most: int = 8) -> str:
    """The ``most`` largest kernels as ``name us, ...``."""
    return ", ".join(f"{k} {v:.1f}" for k, v in list(kernels.items())[:most])
