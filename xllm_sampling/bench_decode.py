"""End to end (``xllm-port bench --decode`` and ``--beam``): the reference engine with the whole
series applied, its decode loop timed per step (TPOT) and in tokens/s at several batch sizes, with
every flag off, each step's flag on alone, and every flag on; and its whole beam search with the
``beam_search`` flag on against off.

TPOT is the slope between a short and a long generation, so the prefill drops out; each figure
is the median of ``reps`` pairs, wall clock with the device synchronised (host time included).
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

SHORT, LONG = 4, 36  # generated tokens of the two timed runs


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
    """(name, flag values): all off, each step's flag on alone, all on."""
    off = {f: False for f in step_flags}
    return [("all off", off), *((f"{f} only", off | {f: True}) for f in step_flags),
            ("all on", {f: True for f in step_flags})]


def run(batches, vocab: int | None, reps: int, progress: Callable[[str], None], preset: str = "tiny") -> dict:
    """Time the decode loop for every configuration and batch size; header and rows. ``preset``:
    the reference model's size (engine.model.PRESETS); ``vocab`` None keeps the preset's."""
    device = gate.device_kind()
    with _engine_with_series() as (step_flags, (decode, model, sampling)):
        cfg = model.preset(preset, max_len=LONG + 16, **({"vocab": vocab} if vocab else {}))
        vocab = cfg.vocab
        engine = decode.Engine(cfg, device)
        configs = configurations(step_flags)
        rows = []
        for batch in batches:
            prompts = torch.randint(1, vocab, (batch, 8), generator=torch.Generator().manual_seed(0))
            params = sampling.SamplingParams(torch.full((batch,), 0.8), 50, 0.9, seed=torch.arange(batch))

            def generate(n):
                start = time.perf_counter()
                engine.generate(prompts, n, params)
                if device == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - start

            for name, values in configs:
                with flags.override(**values):
                    generate(SHORT), generate(LONG)  # warm up: kernels built, graphs captured
                    tpot = statistics.median((generate(LONG) - generate(SHORT)) / (LONG - SHORT) for _ in range(reps))
                rows.append({"config": name, "batch": batch, "tpot_ms": tpot * 1e3, "tokens_per_s": batch / tpot})
                progress(f"[{len(rows)}/{len(batches) * len(configs)}] decode B={batch} {name}: {tpot * 1e3:.2f} ms")
    return {"header": gate.environment() | {"preset": preset, "vocab": vocab, "tokens": [SHORT, LONG]}, "decode": rows}


BEAMS, BEAM_TOKENS = 4, 32  # beam width and new tokens of the timed searches (no EOS: every search runs 32 steps)


def run_beam(batches, vocab: int | None, reps: int, progress: Callable[[str], None], preset: str = "tiny") -> dict:
    """Time whole beam searches (prefill included) with the beam_search flag off and on; header and rows."""
    device = gate.device_kind()
    with _engine_with_series() as (_, (decode, model, _sampling)):
        cfg = model.preset(preset, max_len=BEAM_TOKENS + 16, **({"vocab": vocab} if vocab else {}))
        vocab = cfg.vocab
        engine = decode.Engine(cfg, device)
        rows = []
        for batch in batches:
            prompts = torch.randint(1, vocab, (batch, 8), generator=torch.Generator().manual_seed(0))

            def search():
                start = time.perf_counter()
                engine.beam(prompts, BEAMS, BEAM_TOKENS, eos=[])
                if device == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - start

            for on in (False, True):
                with flags.override(beam_search=on):
                    search()  # warm up
                    seconds = statistics.median(search() for _ in range(reps))
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
    """Rows: configurations; columns: batch sizes, each 'TPOT ms (tokens/s)'."""
    h, rows = report["header"], report["decode"]
    batches = sorted({r["batch"] for r in rows})
    configs = list(dict.fromkeys(r["config"] for r in rows))
    cell = {(r["config"], r["batch"]): r for r in rows}
    lines = [f"# decode, reference engine ({h['preset']}) with the series, vocab {h['vocab']}; {h.get('gpu', 'CPU')}; torch {h['torch']}",
             f"{'configuration':20}" + "".join(f"{f'B={b}: TPOT ms (tok/s)':>26}" for b in batches)]
    for name in configs:
        lines.append(f"{name:20}" + "".join(
            f"{cell[name, b]['tpot_ms']:>12.3f} ({cell[name, b]['tokens_per_s']:9.0f})" for b in batches))
    return "\n".join(lines)
