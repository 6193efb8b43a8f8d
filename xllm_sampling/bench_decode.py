"""End to end (``xllm-port bench --decode``, ``--beam`` and ``--speculative``): the reference engine
with the whole series applied, its whole beam search with the ``beam_search`` flag on against off,
and its speculative mode against plain decoding with the ``spec_decode`` flag on and off.

The decode protocol, per batch size and per configuration (every flag off, then the series' steps
switched on one more at a time, in series order, up to every flag on), ``reps`` (>= 3) runs of:
  * prefill: the model's forward over the prompts (8 tokens each) alone;
  * TTFT: a whole generation of one token (cache, prefill, first sampling step);
  * total: a whole generation of LONG tokens; tokens/s = batch x LONG / total;
  * TPOT: (total - TTFT) / (LONG - 1), the decode steps alone;
  * sampling: the engine's sampling step alone on the prefill's logits, and its share of TPOT;
  * peak GPU memory of the long generation;
  * the CUDA-graph replays and eager calls of the engine's sampling and decode steps over the runs
    (what the configuration's steps ran as).
Each figure is the median of the runs, wall clock with the device synchronised (host time
included); TPOT's spread (largest minus smallest run) is reported beside it.
"""
from __future__ import annotations

import contextlib
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import git
import torch

from . import flags, gate
from .paths import SERIES_DIR
from .port import demo, series

LONG = 36  # generated tokens of the long run


def _is_engine(module: str) -> bool:
    return module == "engine" or module.startswith("engine.")


@contextlib.contextmanager
def _engine_with_series():
    """The reference engine with every patch of the shipped series applied, in a temporary folder:
    (its step flags, (engine.decode, engine.model, engine.sampling)). On exit sys.path and any
    ``engine`` modules imported before are as they were."""
    steps = series.load(SERIES_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        path = demo.create_target(Path(tmp) / "refengine")
        with git.Repo(path) as repo:
            for step in steps:
                repo.git.apply(str(step.patch))
        saved = {name: sys.modules.pop(name) for name in list(sys.modules) if _is_engine(name)}
        sys.path.insert(0, str(path))
        try:
            yield [step.flag for step in steps], tuple(
                importlib.import_module(f"engine.{name}") for name in ("decode", "model", "sampling"))
        finally:
            sys.path.remove(str(path))
            for name in [name for name in sys.modules if _is_engine(name)]:
                del sys.modules[name]
            sys.modules.update(saved)


def configurations(step_flags: list[str]) -> list[tuple[str, dict]]:
    """(name, flag values): all off, then the steps switched on cumulatively in series order."""
    configs = [("all off", {f: False for f in step_flags})]
    for i, flag in enumerate(step_flags):
        on = set(step_flags[:i + 1])
        name = "all on" if i == len(step_flags) - 1 else f"+ {flag}"
        configs.append((name, {f: f in on for f in step_flags}))
    return configs


def _engine(decode, model, preset: str, vocab: int | None, max_len: int, device: str):
    """The reference engine of ``preset`` (``vocab`` None keeps the preset's vocabulary) on ``device``."""
    return decode.Engine(model.preset(preset, max_len=max_len, **({"vocab": vocab} if vocab else {})), device)


def _timed(fn: Callable[[], object], device: str) -> float:
    """Wall milliseconds of fn(), the device synchronised before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _one_run(engine, model, prompts, params, device: str) -> dict:
    """One run of the protocol (module docstring): milliseconds, and the peak memory in MiB."""
    cache = model.KVCache(engine.cfg, prompts.shape[0], device)
    dev_prompts = prompts.to(device)
    logits = []
    prefill = _timed(lambda: logits.append(engine.model(dev_prompts, cache)), device)
    generator = torch.Generator(device).manual_seed(0)
    step_params = engine.step_params(params, prompts.shape[0])  # as generate passes them to every step
    sampling = statistics.median(_timed(lambda: engine.sample_step(logits[0], step_params, generator), device)
                                 for _ in range(5))
    ttft = _timed(lambda: engine.generate(prompts, 1, params), device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    total = _timed(lambda: engine.generate(prompts, LONG, params), device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None
    return {"prefill_ms": prefill, "sampling_ms": sampling, "ttft_ms": ttft, "total_ms": total,
            "tpot_ms": (total - ttft) / (LONG - 1), "peak_mib": peak}


def run(batches, vocab: int | None, reps: int, progress: Callable[[str], None], preset: str = "tiny") -> dict:
    """The decode protocol for every configuration and batch size; header and rows. ``preset``:
    the reference model's size (engine.model.PRESETS); ``vocab`` None keeps the preset's."""
    device = gate.device_kind()
    with _engine_with_series() as (step_flags, (decode, model, sampling)):
        engine = _engine(decode, model, preset, vocab, LONG + 16, device)
        vocab = engine.cfg.vocab
        configs = configurations(step_flags)
        rows = []
        for batch in batches:
            prompts = torch.randint(1, vocab, (batch, 8), generator=torch.Generator().manual_seed(0))
            # a caller's settings (generate, and the sampling step's timing, take them through
            # engine.step_params); positions a host tensor, as generate sets them each step
            params = sampling.SamplingParams(torch.full((batch,), 0.8, device=device), 50, 0.9,
                                             seed=torch.arange(batch, device=device))
            params.position = torch.full((batch,), 8, dtype=torch.int64)
            for name, values in configs:
                with flags.override(**values):
                    engine.generate(prompts, LONG, params)  # warm up: kernels built, graphs captured
                    before = _graph_calls()
                    runs = [_one_run(engine, model, prompts, params, device) for _ in range(reps)]
                    replays, eager = (a - b for a, b in zip(_graph_calls(), before))
                row = {key: statistics.median(r[key] for r in runs) if runs[0][key] is not None else None
                       for key in runs[0]}
                row.update(graph_replays=replays, graph_eager_calls=eager)
                tpots = [r["tpot_ms"] for r in runs]
                row.update(config=name, batch=batch, tpot_spread_ms=max(tpots) - min(tpots),
                           tokens_per_s=batch * LONG / (row["total_ms"] * 1e-3),
                           sampling_share=row["sampling_ms"] / row["tpot_ms"])
                rows.append(row)
                progress(f"[{len(rows)}/{len(batches) * len(configs)}] decode B={batch} {name}: "
                         f"TPOT {row['tpot_ms']:.2f} ms")
    return {"header": gate.environment() | {"preset": preset, "vocab": vocab, "tokens": LONG, "prompt": 8, "runs": reps},
            "decode": rows}


def _graph_calls() -> tuple[int, int]:
    """Replays and eager calls of every CUDA-graph runner of the process so far (the engine's
    sampling and decode steps): the difference over a configuration's runs shows what its steps ran as."""
    from .ops.cuda_graph import graph_counters

    counts = graph_counters().values()
    return sum(c["replays"] for c in counts), sum(c["eager_calls"] for c in counts)


BEAMS, BEAM_TOKENS = 4, 32  # beam width and new tokens of the timed searches (no EOS: every search runs 32 steps)


def run_beam(batches, vocab: int | None, reps: int, progress: Callable[[str], None], preset: str = "tiny") -> dict:
    """Time whole beam searches (prefill included) with the beam_search flag off and on; header and rows."""
    device = gate.device_kind()
    with _engine_with_series() as (_, (decode, model, _sampling)):
        engine = _engine(decode, model, preset, vocab, BEAM_TOKENS + 16, device)
        vocab = engine.cfg.vocab
        rows = []
        for batch in batches:
            prompts = torch.randint(1, vocab, (batch, 8), generator=torch.Generator().manual_seed(0))

            def search():
                engine.beam(prompts, BEAMS, BEAM_TOKENS, eos=[])

            for on in (False, True):
                with flags.override(beam_search=on):
                    search()  # warm up
                    seconds = statistics.median(_timed(search, device) for _ in range(reps)) * 1e-3
                rows.append({"beam_search": on, "batch": batch, "seconds": seconds,
                             "tokens_per_s": batch * BEAM_TOKENS / seconds})
                progress(f"[{len(rows)}/{2 * len(batches)}] beam search B={batch} flag {'on' if on else 'off'}: "
                         f"{seconds * 1e3:.1f} ms")
    return {"header": gate.environment() | {"preset": preset, "vocab": vocab, "beams": BEAMS, "tokens": BEAM_TOKENS},
            "beam": rows}


def beam_table(report: dict) -> str:
    """Rows: batch sizes; columns: flag off and on, each 'ms per search (tokens/s)', and the speed-up."""
    h, rows = report["header"], report["beam"]
    cell = {(r["batch"], r["beam_search"]): r for r in rows}
    lines = [f"# beam search ({h['beams']} beams, {h['tokens']} tokens), reference engine ({h['preset']}) with the series, vocab "
             f"{h['vocab']}; {h.get('gpu', 'CPU')}; torch {h['torch']}",
             f"{'batch':>6} {'flag off: ms (tok/s)':>24} {'flag on: ms (tok/s)':>24} {'speed-up':>9}"]
    for batch in sorted({r["batch"] for r in rows}):
        off, on = cell[batch, False], cell[batch, True]
        lines.append(f"{batch:>6} {off['seconds'] * 1e3:>12.1f} ({off['tokens_per_s']:8.0f}) "
                     f"{on['seconds'] * 1e3:>12.1f} ({on['tokens_per_s']:8.0f}) {off['seconds'] / on['seconds']:>8.2f}x")
    return "\n".join(lines)


def table(report: dict) -> str:
    """One line per (batch, configuration): the protocol's medians and TPOT's spread."""
    h = report["header"]
    lines = [f"# decode, reference engine ({h['preset']}) with the series, vocab {h['vocab']}, prompt {h['prompt']}, "
             f"{h['tokens']} new tokens, median of {h['runs']} runs; {h.get('gpu', 'CPU')}; torch {h['torch']}",
             f"{'B':>4} {'configuration':16} {'TTFT ms':>8} {'prefill':>8} {'TPOT ms (spread)':>18} {'total ms':>9} "
             f"{'tok/s':>9} {'peak MiB':>9} {'sampling':>9} {'graph replays / eager calls':>28}"]
    for r in report["decode"]:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"{r['batch']:>4} {r['config']:16} {r['ttft_ms']:8.2f} {r['prefill_ms']:8.2f} "
                     f"{r['tpot_ms']:9.3f} ({r['tpot_spread_ms']:5.3f}) {r['total_ms']:9.1f} {r['tokens_per_s']:9.0f} "
                     f"{peak:>9} {100 * r['sampling_share']:8.1f}% {r['graph_replays']:>13} / {r['graph_eager_calls']:<12}")
    return "\n".join(lines)


SPEC_TOKENS = 32  # new tokens of the timed generations (temperature 1: the rejection kernel's scope)


def run_speculative(batches, vocab: int | None, ks, reps: int, progress: Callable[[str], None],
                    preset: str = "tiny") -> dict:
    """Time whole generations (prefill included): plain decoding, then the speculative mode (a
    one-block draft) for each K with the spec_decode flag off and on; header and rows, each with
    tokens/s and, for the speculative mode, the share of drafts accepted."""
    device = gate.device_kind()
    with _engine_with_series() as (_, (decode, model, sampling)):
        engine = _engine(decode, model, preset, vocab, SPEC_TOKENS + 16 + max(ks), device)
        rows, total = [], len(batches) * (1 + 2 * len(ks))
        for batch in batches:
            prompts = torch.randint(1, engine.cfg.vocab, (batch, 8), generator=torch.Generator().manual_seed(0))

            def params():
                return sampling.SamplingParams(torch.ones(batch), seed=torch.arange(batch))

            runs = [("plain", None, None, lambda: engine.generate(prompts, SPEC_TOKENS, params()))]
            for k in ks:
                for on in (False, True):
                    runs.append(("speculative", k, on, lambda k=k: engine.speculative(prompts, SPEC_TOKENS, params(), k=k)))
            for mode, k, on, fn in runs:
                with flags.override(**({} if on is None else {"spec_decode": on})):
                    result = fn()  # warm up (kernels built, graphs captured); the acceptance is the same every run
                    seconds = statistics.median(_timed(fn, device) for _ in range(reps)) * 1e-3
                rows.append({"batch": batch, "mode": mode, "k": k, "spec_decode": on, "seconds": seconds,
                             "tokens_per_s": batch * SPEC_TOKENS / seconds,
                             "acceptance": result["acceptance"] if mode == "speculative" else None})
                progress(f"[{len(rows)}/{total}] B={batch} {mode}" + (f" K={k} flag {'on' if on else 'off'}" if k else "")
                         + f": {seconds * 1e3:.1f} ms")
    return {"header": gate.environment() | {"preset": preset, "vocab": engine.cfg.vocab, "tokens": SPEC_TOKENS},
            "speculative": rows}


def speculative_table(report: dict) -> str:
    """One line per (batch, mode, K, flag): ms per generation, tokens/s, acceptance, speed-up over plain."""
    h = report["header"]
    lines = [f"# speculative decoding ({h['tokens']} tokens, temperature 1, a one-block draft), reference engine "
             f"({h['preset']}) with the series, vocab {h['vocab']}; {h.get('gpu', 'CPU')}; torch {h['torch']}",
             f"{'B':>4} {'mode':26} {'ms':>9} {'tok/s':>9} {'accepted':>9} {'vs plain':>9}"]
    plain = {r["batch"]: r["seconds"] for r in report["speculative"] if r["mode"] == "plain"}
    for r in report["speculative"]:
        name = "plain" if r["k"] is None else f"speculative K={r['k']} flag {'on' if r['spec_decode'] else 'off'}"
        accepted = "" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f}%"
        lines.append(f"{r['batch']:>4} {name:26} {r['seconds'] * 1e3:9.1f} {r['tokens_per_s']:9.0f} {accepted:>9} "
                     f"{plain[r['batch']] / r['seconds']:8.2f}x")
    return "\n".join(lines)

