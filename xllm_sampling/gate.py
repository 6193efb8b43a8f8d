"""Benchmark gates: time the original and the fast path interleaved (A B A B) in one process.

On a GPU each call is timed with CUDA events after the L2 cache is flushed; on CPU with
``time.perf_counter``. The gate's figure is the median of the per-pair ratios fast / original.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from . import flags
from .port.checks import PROGRESS_PREFIX, THRESHOLDS_ENV


@dataclass
class GateResult:
    """Medians in microseconds and the median per-pair ratio fast / original."""

    device: str
    original_us: float
    fast_us: float
    ratio: float
    rounds: int


def device_kind() -> str:
    """``cuda`` when a GPU is present, else ``cpu``: the key of a manifest's threshold table."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def environment() -> dict:
    """GPU, driver, torch and CUDA versions and the flag snapshot, for the gate's JSON record."""
    env = {"device": device_kind(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "host": platform.node(), "flags": flags.snapshot()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["driver"] = _driver_version()
    return env


def _driver_version() -> str | None:
    try:
        import ctypes

        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:
        return None


class Timer:
    """Times one call. On a GPU, ``host_overhead=False`` queues a spin kernel ahead of the call so
    that the Python launch overhead overlaps it and the events time the GPU work alone. A call
    whose queueing outlasted the spin (the GPU idled, waiting for the host: a path of many small
    ops on a slow host) is timed again behind a spin twice as long, which later calls keep."""

    def __init__(self, device: str, host_overhead: bool):
        self.cuda, self.host_overhead = device == "cuda", host_overhead
        self.spin_cycles = 2_000_000  # ~1 ms at Hopper clocks
        if self.cuda:
            # Read, not written, before each call: a written flush leaves up to an L2 of dirty lines,
            # whose write-back the timed call would pay (H200, fp32 B=256 V=151936 greedy sampling
            # 51.6 us after zero_() against 42.7 after a read; torch's amax 57.4 against 49.1).
            self.flush = torch.ones(2 * torch.cuda.get_device_properties(0).L2_cache_size // 4, device="cuda")

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e6
        while True:
            self.flush.sum()
            spun = None
            if not self.host_overhead:
                torch.cuda._sleep(self.spin_cycles)
                spun = torch.cuda.Event()
                spun.record()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            if spun is not None and spun.query() and self.spin_cycles < MAX_SPIN_CYCLES:
                self.spin_cycles *= 2  # the spin ended before the call was queued: host time in the figure
                end.synchronize()
                continue
            end.synchronize()
            return start.elapsed_time(end) * 1e3


MAX_SPIN_CYCLES = 1 << 28  # ~135 ms: a call whose host work takes longer is timed as it comes


def skip_cuda_tests_without_gpu(items) -> None:
    """pytest hook body: mark every ``cuda`` test skipped (visibly, with a reason) when no GPU is present."""
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def measure(original: Callable[[], object], fast: Callable[[], object], warmup: int = 3, rounds: int = 30,
            host_overhead: bool = False) -> GateResult:
    """Time ``original`` and ``fast`` alternately, ``rounds`` times each after ``warmup`` calls of each.

    The figure is the median of the per-pair ratios: a change of machine load during the run
    slows both calls of a pair alike. On CPU torch runs one intra-op thread while timing: on a
    small machine with another process busy, a parallel op waits for the thread that shares a
    core with it, which made the path with more ops (not the slower one) up to 3x slower in some
    runs (measured on the 2-core CI machine with one core kept busy: beam_search 0.3-3.4 with two
    threads, 1.01-1.18 with one). ``host_overhead=True`` keeps the CPU's launch time in a GPU
    figure (for whole decode loops, where removing it is the point, as with CUDA graphs)."""
    device = device_kind()
    timer = Timer(device, host_overhead)
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        for _ in range(warmup):
            original(), fast()
        pairs = []
        for n in range(1, rounds + 1):
            pairs.append((timer(original), timer(fast)))
            if n % max(1, rounds // 5) == 0:  # the driver shows these lines as progress
                print(f"{PROGRESS_PREFIX} round {n}/{rounds}, fast/original so far "
                      f"{statistics.median(f / o for o, f in pairs):.3f}", flush=True)
    finally:
        torch.set_num_threads(threads)
    ratio = statistics.median(f / o for o, f in pairs)
    return GateResult(device, statistics.median(o for o, _ in pairs), statistics.median(f for _, f in pairs), ratio, rounds)


def threshold(kind: str | None = None) -> float | None:
    """The manifest's threshold for this device kind, passed by the driver in ``XLLM_PORT_THRESHOLDS``."""
    import json

    table = json.loads(os.environ.get(THRESHOLDS_ENV, "{}"))
    return table.get(kind or device_kind())


def record(benchmark, result: GateResult, fast: Callable[[], object], ratios: dict[str, float] | None = None) -> None:
    """Put the gate's figures into pytest-benchmark's record and time the fast path for its report;
    ``ratios`` are every configuration's when the gate timed several (``result`` is the worst)."""
    benchmark.extra_info.update({"gate": asdict(result), "environment": environment()})
    if ratios:
        benchmark.extra_info["gate"]["configurations"] = ratios
    benchmark.pedantic(fast, rounds=max(5, result.rounds // 3), warmup_rounds=1)
