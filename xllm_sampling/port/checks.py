"""Run a step's parity test and benchmark gate with pytest, in a subprocess, against the target."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import gate as gate_module

REGRESSED = "Performance has regressed"  # pytest-benchmark's --benchmark-compare-fail message
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


@dataclass
class CheckResult:
    """``passed``, ``failed`` or ``skipped`` (nothing ran, which is never a pass), with pytest's counts."""

    result: str
    counts: dict
    seconds: float
    output: str = ""
    gate: dict = field(default_factory=dict)

    def summary(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in self.counts.items()) or "no tests"
        text = f"{self.result} ({counts}, {self.seconds:.1f} s)"
        if self.gate:
            g = self.gate
            text += f"; {g['device']} fast/original {g['ratio']:.3f} ({g['fast_us']:.0f} us vs {g['original_us']:.0f} us)"
        return text


def _counts(output: str) -> dict:
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    counts: dict[str, int] = {}
    for n, kind in _COUNT.findall(tail):
        counts["errors" if kind.startswith("error") else kind] = int(n)
    return counts


def run(test: Path, target: Path, flags_file: Path, thresholds: dict, benchmark_json: Path | None = None,
        history: Path | None = None, compare_fail: str | None = None) -> CheckResult:
    """Run ``test`` with pytest against ``target``; with ``benchmark_json`` keep pytest-benchmark's record there.

    With ``history`` (a folder) pytest-benchmark also saves the run there and, when an earlier
    run is stored and ``compare_fail`` is given, fails the check if the fast path got slower than
    that run by more than ``compare_fail`` allows (``--benchmark-compare-fail``).
    """
    env = dict(os.environ, XLLM_PORT_TARGET=str(target), XLLM_SAMPLING_FLAGS_FILE=str(flags_file),
               PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    env[gate_module.THRESHOLDS_ENV] = json.dumps(thresholds)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)]
    if benchmark_json is not None:
        benchmark_json.parent.mkdir(parents=True, exist_ok=True)
        cmd += [f"--benchmark-json={benchmark_json}", "--benchmark-columns=min,median,max,rounds"]
        if history is not None:
            earlier = list(history.rglob("*.json")) if history.exists() else []
            cmd += [f"--benchmark-storage=file://{history}", "--benchmark-autosave"]
            if earlier and compare_fail:
                cmd += ["--benchmark-compare", f"--benchmark-compare-fail={compare_fail}"]
    else:
        cmd += ["--benchmark-disable"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    counts = _counts(proc.stdout)
    regressed = REGRESSED in output
    if regressed:
        result = "failed"
    elif proc.returncode == 0 and counts.get("passed"):
        result = "passed"
    elif proc.returncode == 0 and counts.get("skipped"):
        result = "skipped"
    else:
        result = "failed"
    gate = {}
    if benchmark_json is not None and benchmark_json.exists():
        records = json.loads(benchmark_json.read_text()).get("benchmarks", [])
        if records and "gate" in records[0].get("extra_info", {}):
            gate = records[0]["extra_info"]["gate"]
            gate["threshold"] = thresholds.get(gate["device"])
    return CheckResult(result, counts, time.perf_counter() - start, output, gate)
