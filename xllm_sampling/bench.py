"""``xllm-port bench``: each op side by side (original torch path, fast path, FlashInfer if installed).

On a GPU every call is timed alone with CUDA events after the L2 cache is flushed and with the
input rotated among copies, median of ``reps``; the measured device-to-device copy bandwidth
gives each cell's floor (its compulsory bytes over that bandwidth). On CPU the figures are CPU
figures (``time.perf_counter``), at smaller default sizes. :func:`host` times calls back to back
instead, device time against wall time: what a user pays per call at small batches.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from . import flags, gate
from .ops.air_topk import air_topk_last_dim
from .ops.beam_search import BeamSearchState, beam_search_step
from .ops.logit_softmax import logit_softmax
from .ops.sampler import sample

OPS = ("logit_softmax", "topk", "sampling", "beam_search")
# Further top-k cells, on request (--ops): "topk" is k = 50 sorted.
TOPK_VARIANTS = {"topk": (50, True), "topk_unsorted": (50, False), "topk1024": (1024, True),
                 "topk1024_unsorted": (1024, False)}
# The sampling configurations users run (--ops), temperature 0.8 unless greedy: "sampling" is
# top-k 50 + top-p 0.9. Each: sample's keyword arguments, and FlashInfer's matching call
# (x, t) -> tokens, None where FlashInfer has none.
SAMPLING_VARIANTS = {
    "sampling": (dict(top_k=50, top_p=0.9),
                 lambda fi, x, t: fi.sampling.top_k_top_p_sampling_from_logits(x / t[:, None], 50, 0.9)),
    "sampling_greedy": (dict(temperature=0.0), None),
    "sampling_plain": (dict(), lambda fi, x, t: fi.sampling.sampling_from_logits(x / t[:, None])),
    "sampling_top_p": (dict(top_p=0.9), lambda fi, x, t: fi.sampling.top_p_sampling_from_probs(fi.sampling.softmax(x, t), 0.9)),
    "sampling_min_p": (dict(min_p=0.1), lambda fi, x, t: fi.sampling.min_p_sampling_from_probs(fi.sampling.softmax(x, t), 0.1)),
    "sampling_penalties": (dict(top_k=50, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.2), None),
}
PENALTY_TOKENS = 256  # generated tokens per request in "sampling_penalties"
# Beam widths (--ops): "beam_search" is 4 beams; the batch is the number of requests.
BEAM_VARIANTS = {"beam_search": 4, "beam_search_w1": 1, "beam_search_w8": 8}
BEAM_STEPS = 1024  # steps a timed state holds before it is rewound
ALL_OPS = OPS + tuple(op for op in {**TOPK_VARIANTS, **SAMPLING_VARIANTS, **BEAM_VARIANTS} if op not in OPS)


@dataclass
class Cell:
    """One op at one size: median microseconds per implementation (None: not available)."""

    op: str
    batch: int
    vocab: int
    dtype: str
    floor_us: float | None
    original_us: float | None
    fast_us: float | None
    flashinfer_us: float | None


def _flashinfer():
    try:
        import flashinfer
        import flashinfer.sampling  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not installed" here
        return None
    return flashinfer


def _implementations(op: str, fi) -> dict[str, tuple[dict, Callable | None]]:
    """The original path, the fast path and FlashInfer: each a (flags to set around the timing,
    (inputs) -> result callable) pair. The flags are set once around a measurement, as a user sets
    them, never per call (a ``flags.override`` costs the host more than a batch-1 op)."""
    if op == "logit_softmax":
        fn = lambda x, t: logit_softmax(x, t)  # noqa: E731
        ref = fi and (lambda x, t: fi.sampling.softmax(x, t))
        step = "logit_softmax"
    elif op in TOPK_VARIANTS:
        k, by_value = TOPK_VARIANTS[op]
        fn = lambda x, t: air_topk_last_dim(x, min(k, x.shape[-1]), sorted_by_value=by_value)  # noqa: E731
        ref = fi and (lambda x, t: fi.top_k(x, min(k, x.shape[-1]), sorted=by_value))
        step = "air_topk"
    elif op in SAMPLING_VARIANTS:
        sample_step = _sampling_step(op)
        per_batch = {}  # batch: (positions, generated tokens), made once, outside the timing

        def fn(x, t):
            if x.shape[0] not in per_batch:
                per_batch[x.shape[0]] = _sampling_inputs(x)
            return sample_step(x, t, *per_batch[x.shape[0]])

        fi_call = SAMPLING_VARIANTS[op][1]
        ref = fi and fi_call and (lambda x, t: fi_call(fi, x, t))
        step = "sampler"
    else:  # a beam op: each path advances its own search state
        return {"original": ({"beam_search": False}, _beam_step(BEAM_VARIANTS[op])),
                "fast": ({"beam_search": True}, _beam_step(BEAM_VARIANTS[op])), "flashinfer": ({}, None)}
    return {"original": ({step: False}, fn), "fast": ({step: True}, fn), "flashinfer": ({}, ref)}


def _sampling_step(op: str) -> Callable:
    """(x, t, position, generated) -> sample() with sampling op ``op``'s settings, seed 1 (the
    generated tokens read by the penalties op only)."""
    kwargs = SAMPLING_VARIANTS[op][0]

    def step(x, t, position, generated):
        kw = {"temperature": t, **kwargs}
        if "frequency_penalty" in kw:
            kw["generated"] = generated
        return sample(x, seed=1, position=position, **kw)

    return step


def _sampling_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions 0..batch-1 and PENALTY_TOKENS generated tokens per row (seeded) for logits ``x``."""
    batch, vocab = x.shape
    g = torch.Generator(x.device).manual_seed(0)
    return (torch.arange(batch, device=x.device),
            torch.randint(0, vocab, (batch, PENALTY_TOKENS), device=x.device, generator=g))


def _graphed_sampling(op: str) -> tuple[dict, Callable]:
    """(flags, (x, t) -> the fast path of sampling op ``op`` replayed through a GraphRunner as a
    decode loop drives it: its inputs the runner's static inputs (made once per shape), positions
    advanced in the graph, outputs the graph's own buffers (copy_outputs=False))."""
    from .ops.cuda_graph import GraphRunner

    runner = GraphRunner(_sampling_step(op), name=f"bench_{op}", advance=(2,), copy_outputs=False)
    per_shape = {}

    def call(x, t):
        if x.shape not in per_shape:
            per_shape[x.shape] = runner.static_inputs(x, t, *_sampling_inputs(x))
        return runner(*per_shape[x.shape])

    return {"sampler": True, "cuda_graph": True}, call


def _beam_step(beams: int) -> Callable:
    """(x, t) -> one beam-search step of a mid-search state (EOS id 2, random beam scores) per batch,
    rewound (outside the kernels, once per BEAM_STEPS calls) before its history is full."""
    states = {}

    def step(x, t):
        batch = x.shape[0] // beams
        if batch not in states:
            state = BeamSearchState.start(batch, beams, 1, 1 + BEAM_STEPS, eos=2, device=x.device)
            state.running_scores.copy_(-torch.rand(batch, beams, generator=torch.Generator().manual_seed(0)) * 10)
            states[batch] = [state, 0]
        state, calls = states[batch]
        if calls == BEAM_STEPS:
            state.steps.zero_()
            calls = 0
        states[batch][1] = calls + 1
        beam_search_step(x, state)

    return step


def copy_bandwidth(device: str, timer: gate.Timer) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read plus bytes written)."""
    n = (1 << 30) if device == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = [timer(lambda: dst.copy_(src)) for _ in range(10)]
    return 2 * n / (statistics.median(times) * 1e-6)


def _floor_bytes(op: str, batch: int, vocab: int, dtype: torch.dtype) -> int:
    read = batch * vocab * dtype.itemsize * BEAM_VARIANTS.get(op, 1)
    return read + (batch * vocab * 4 if op == "logit_softmax" else 0)


def _logits(rows: int, vocab: int, device: str, seed: int) -> torch.Tensor:
    """Seeded N(0, 9) float32 logits (rows, vocab): a cell times the same rows in every run (a
    batch-1 sampling call's time depends on its row, e.g. on how many tokens its top-k bound lists)."""
    g = torch.Generator(device).manual_seed(seed)
    return torch.randn(rows, vocab, device=device, generator=g) * 3


def measure(op: str, batch: int, vocab: int, dtype: torch.dtype, device: str, bandwidth: float, reps: int, fi,
            timer: gate.Timer) -> Cell:
    """Time the three implementations of ``op`` at one size."""
    rows = batch * BEAM_VARIANTS.get(op, 1)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if device == "cuda" else 0
    copies = max(1, min(8, (2 * l2) // max(1, rows * vocab * dtype.itemsize) + 1))
    inputs = [(_logits(rows, vocab, device, seed=i).to(dtype), torch.full((rows,), 0.8, device=device))
              for i in range(copies)]
    result = {}
    for name, (flag_values, fn) in _implementations(op, fi).items():
        if fn is None:
            result[name] = None
            continue
        try:
            with flags.override(**flag_values):
                for args in inputs[:2]:
                    fn(*args)
                result[name] = statistics.median(timer(lambda: fn(*inputs[i % copies])) for i in range(reps))
        except Exception:  # noqa: BLE001 - an implementation that cannot run this cell shows n/a
            result[name] = None
    floor = _floor_bytes(op, batch, vocab, dtype) / bandwidth * 1e6
    return Cell(op, batch, vocab, str(dtype).replace("torch.", ""), floor, result["original"], result["fast"], result["flashinfer"])


def run(ops, batches, vocabs, dtype: torch.dtype, reps: int, progress: Callable[[str], None]) -> dict:
    """Every op at every (batch, vocab): the header (machine, versions, bandwidth) and the cells."""
    device = gate.device_kind()
    fi = _flashinfer() if device == "cuda" else None
    timer = gate.Timer(device, host_overhead=False)
    bandwidth = copy_bandwidth(device, timer)
    header = gate.environment() | {"copy_bandwidth_GBps": round(bandwidth / 1e9, 1),
                                   "flashinfer": getattr(fi, "__version__", "not installed") if fi else "not installed"}
    cells = []
    total = len(ops) * len(batches) * len(vocabs)
    if fi and any(op == "sampling" or op in TOPK_VARIANTS for op in ops):
        progress("FlashInfer compiles its top-k module on its first top-k call: minutes (8+ on an H200 host), once")
    for op in ops:
        for batch in batches:
            for vocab in vocabs:
                cells.append(measure(op, batch, vocab, dtype, device, bandwidth, reps, fi, timer))
                progress(f"[{len(cells)}/{total}] {op} B={batch} V={vocab}")
    return {"header": header, "cells": [asdict(c) for c in cells]}


HOST_CALLS = 32  # back-to-back calls per host-overhead figure
HOST_ROUNDS = 11  # figures per op: their median, and the best wall time


def _per_call(fn: Callable[[], object], device: str, hide_host: bool) -> float:
    """Microseconds per call of HOST_CALLS back-to-back calls of ``fn`` (warm caches). ``hide_host``:
    device time, the calls queued behind a spin kernel so that the host's launch work overlaps it;
    otherwise wall time with one synchronisation at the end, which is the host's time per call
    whenever the host is slower than the device."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    if cuda and hide_host:
        torch.cuda._sleep(5_000_000)  # ~2.5 ms at Hopper clocks, more than the host needs to queue the calls
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(HOST_CALLS):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / HOST_CALLS
    collecting = gc.isenabled()
    gc.disable()  # as timeit does: a collection's pause is the process's, not the op's
    try:
        start = time.perf_counter()
        for _ in range(HOST_CALLS):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / HOST_CALLS * 1e6
    finally:
        if collecting:
            gc.enable()


def host(ops, batches, vocab: int, reps: int, progress: Callable[[str], None]) -> dict:
    """Each op's fast path (and FlashInfer's matching call) called back to back: device and wall
    microseconds per call, medians of ``reps`` rounds, and the best round's wall time (what the
    host costs when nothing else on the machine interferes, as timeit reports it); the host's
    overhead is wall minus device."""
    device = gate.device_kind()
    fi = _flashinfer() if device == "cuda" else None
    header = gate.environment() | {"vocab": vocab, "calls": HOST_CALLS,
                                   "flashinfer": getattr(fi, "__version__", "not installed") if fi else "not installed"}
    rows = []
    for op in ops:
        for batch in batches:
            rows_ = batch * BEAM_VARIANTS.get(op, 1)
            x = _logits(rows_, vocab, device, seed=0)
            t = torch.full((rows_,), 0.8, device=device)
            row = {"op": op, "batch": batch}
            implementations = _implementations(op, fi)
            if op in SAMPLING_VARIANTS:
                implementations["graphed"] = _graphed_sampling(op)
            for name, (flag_values, fn) in implementations.items():
                if name == "original" or fn is None:
                    continue
                call = lambda fn=fn: fn(x, t)  # noqa: E731
                with flags.override(**flag_values):
                    call(), call()
                    device_us = (statistics.median(_per_call(call, device, True) for _ in range(reps))
                                 if device == "cuda" else None)
                    walls = [_per_call(call, device, False) for _ in range(reps)]
                row[name] = {"device_us": device_us, "wall_us": statistics.median(walls), "best_wall_us": min(walls)}
            rows.append(row)
            progress(f"[{len(rows)}/{len(ops) * len(batches)}] host overhead {op} B={batch}")
    return {"header": header, "host": rows}


def host_table(report: dict) -> str:
    """The host-overhead report as a text table."""
    h = report["header"]
    lines = [f"# {h.get('gpu', 'CPU (wall time only)')}; torch {h['torch']}; V={h['vocab']}; {h['calls']} calls back to "
             f"back, microseconds per call; wall: the median round, best wall: the fastest; overhead = wall - device; "
             f"graphed: the sampling ops replayed from a GraphRunner fed its static inputs; FlashInfer {h['flashinfer']}",
             f"{'op':20} {'B':>4} {'device':>8} {'wall':>8} {'best wall':>10} {'overhead':>9} {'graphed wall':>13} "
             f"{'FI device':>10} {'FI wall':>8}"]

    def fmt(x, width):
        return f"{'n/a':>{width}}" if x is None else f"{x:{width}.1f}"

    for r in report["host"]:
        fast, fi = r["fast"], r.get("flashinfer") or {}
        over = None if fast["device_us"] is None else fast["wall_us"] - fast["device_us"]
        graphed = r.get("graphed") or {}
        lines.append(f"{r['op']:20} {r['batch']:4} {fmt(fast['device_us'], 8)} {fmt(fast['wall_us'], 8)} "
                     f"{fmt(fast['best_wall_us'], 10)} {fmt(over, 9)} "
                     f"{fmt(graphed.get('wall_us'), 13)} {fmt(fi.get('device_us'), 10)} {fmt(fi.get('wall_us'), 8)}")
    return "\n".join(lines)


def table(report: dict) -> str:
    """The report as a text table, each time with its ratio to the floor."""
    h = report["header"]
    lines = [f"# {h.get('gpu', 'CPU (figures are CPU figures)')}; torch {h['torch']}, CUDA {h['cuda']}, driver "
             f"{h.get('driver')}; copy bandwidth {h['copy_bandwidth_GBps']} GB/s; FlashInfer {h['flashinfer']}",
             f"{'op':18} {'B':>5} {'V':>7} {'floor us':>9} {'torch us':>14} {'fast us':>14} {'flashinfer us':>14}"]

    def fmt(us, floor):
        return f"{'n/a':>14}" if us is None else f"{us:8.1f} ({us / floor:4.1f}x)"

    for c in report["cells"]:
        f = c["floor_us"]
        lines.append(f"{c['op']:18} {c['batch']:5} {c['vocab']:7} {f:9.1f} {fmt(c['original_us'], f)} "
                     f"{fmt(c['fast_us'], f)} {fmt(c['flashinfer_us'], f)}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Per op, time against batch size per implementation at the largest vocab, with the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(c["op"] for c in report["cells"]))
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        cells = [c for c in report["cells"] if c["op"] == op]
        vocab = max(c["vocab"] for c in cells)
        cells = [c for c in cells if c["vocab"] == vocab]
        batches = [c["batch"] for c in cells]
        for key, label, style in (("original_us", "torch", "C0-o"), ("fast_us", "xllm_sampling", "C1-o"),
                                  ("flashinfer_us", "FlashInfer", "C2-o"), ("floor_us", "bandwidth floor", "C3--")):
            ys = [c[key] for c in cells]
            if any(y is not None for y in ys):
                ax.plot(batches, [y if y is not None else float("nan") for y in ys], style, label=label)
        ax.set(title=f"{op}, V={vocab}", xlabel="batch", ylabel="us", xscale="log", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
