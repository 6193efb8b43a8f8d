"""Run a step's parity test and benchmark gate with pytest, in a subprocess, against the target.

The subprocess runs in its own process group, dies with the driver (``PR_SET_PDEATHSIG`` on
Linux, so even a SIGKILLed driver leaves no orphaned test running) and is killed as a group
when the driver is interrupted. Its whole output is kept in a log file; progress (the current
test, a gate's round, the elapsed time) is reported while it runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

THRESHOLDS_ENV = "XLLM_PORT_THRESHOLDS"  # read by xllm_sampling.gate in the check's process
PROGRESS_PREFIX = "xllm-gate:"  # lines a gate prints about its rounds
REGRESSED = "Performance has regressed"  # pytest-benchmark's --benchmark-compare-fail message
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")
_TEST_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b.*?(\[\s*\d+%\])?\s*$")
HEARTBEAT_S = 5.0


@dataclass
class CheckResult:
    """``passed``, ``failed`` or ``skipped`` (nothing ran, which is never a pass), with pytest's counts."""

    result: str
    counts: dict
    seconds: float
    output: str = ""
    gate: dict = field(default_factory=dict)
    log: str = ""

    def summary(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in self.counts.items()) or "no tests"
        text = f"{self.result} ({counts}, {self.seconds:.1f} s)"
        if self.gate:
            g = self.gate
            text += f"; {g['device']} fast/original {g['ratio']:.3f} ({g['fast_us']:.0f} us vs {g['original_us']:.0f} us)"
        return text

    def failure(self) -> str:
        """One line: the first failing test and its assertion, and where the full log is."""
        if REGRESSED in self.output:  # pytest-benchmark's lines after it name the test and the figures
            after = [line.strip() for line in self.output[self.output.index(REGRESSED):].splitlines()
                     if line.strip().strip("-")]
            detail = " ".join(after[:2]) + " than the previous stored run of this gate"
        else:
            lines = [line for line in self.output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
            tail = self.output.strip().splitlines()
            detail = lines[0] if lines else (tail[-1] if tail else "no output")
        detail = " ".join(detail.split())
        if len(detail) > 400:
            detail = detail[:397] + "..."
        return detail + (f" (full log: {self.log})" if self.log else "")


def _counts(output: str) -> dict:
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    counts: dict[str, int] = {}
    for n, kind in _COUNT.findall(tail):
        counts["errors" if kind.startswith("error") else kind] = int(n)
    return counts


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _stream(proc: subprocess.Popen, lines: queue.Queue) -> None:
    for line in proc.stdout:
        lines.put(line)
    lines.put(None)


def _progress_line(line: str) -> str | None:
    line = line.rstrip()
    if line.startswith(PROGRESS_PREFIX):
        return line[len(PROGRESS_PREFIX):].strip()
    m = _TEST_LINE.match(line)
    if m:
        name = m.group(1).split("::", 1)[1]
        return f"{(m.group(3) or '').strip()} {name} {m.group(2).lower()}".strip()
    return None


def run(test: Path, target: Path, flags_file: Path, thresholds: dict, log: Path,
        progress: Callable[[str], None], on_start: Callable[[int | None], None] = lambda pgid: None,
        benchmark_json: Path | None = None, history: Path | None = None,
        compare_fail: str | None = None) -> CheckResult:
    """Run ``test`` with pytest against ``target``, keeping its output in ``log``.

    With ``benchmark_json`` it is a gate: pytest-benchmark's record goes there and, when a run
    is stored in ``history`` and ``compare_fail`` is given, the gate also fails if the fast path
    got slower than that run by more than ``compare_fail`` allows (``--benchmark-compare-fail``).
    Storing a passing gate's record into ``history`` is the caller's choice (:func:`store`).
    ``on_start(pgid)`` is called with the check's process group once it runs, then with None.
    """
    env = dict(os.environ, XLLM_PORT_TARGET=str(target), XLLM_SAMPLING_FLAGS_FILE=str(flags_file),
               PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore::UserWarning:torch")
    env[THRESHOLDS_ENV] = json.dumps(thresholds)
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "--tb=short", "-p", "no:cacheprovider", str(test)]
    if benchmark_json is not None:
        benchmark_json.parent.mkdir(parents=True, exist_ok=True)
        cmd += ["-s", f"--benchmark-json={benchmark_json}", "--benchmark-columns=min,median,max,rounds"]
        if history is not None and compare_fail and any(history.rglob("*.json")):
            cmd += [f"--benchmark-storage=file://{history}", "--benchmark-compare",
                    f"--benchmark-compare-fail={compare_fail}"]
    else:
        cmd += ["--benchmark-disable"]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = last = time.perf_counter()
    output: list[str] = []
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=_die_with_parent)
        try:
            on_start(proc.pid)
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_stream, args=(proc, lines), daemon=True).start()
            while True:
                try:
                    line = lines.get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    progress(f"still running ({time.perf_counter() - start:.0f} s)")
                    last = time.perf_counter()
                    continue
                if line is None:
                    break
                output.append(line)
                shown = _progress_line(line)
                if shown and (time.perf_counter() - last >= 1.0 or line.startswith(PROGRESS_PREFIX)):
                    progress(f"{shown} ({time.perf_counter() - start:.0f} s)")
                    last = time.perf_counter()
            proc.wait()
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            on_start(None)
    text = "".join(output)
    log.write_text(" ".join(cmd) + "\n\n" + text)
    counts = _counts(text)
    if REGRESSED in text:
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
    return CheckResult(result, counts, time.perf_counter() - start, text, gate, str(log))


def store(record: Path, history: Path) -> None:
    """Keep a passing gate's pytest-benchmark record as the next comparison baseline, in the
    layout of pytest-benchmark's file storage (``<machine id>/<NNNN>_<name>.json``)."""
    import platform

    bits = 64 if sys.maxsize > 2 ** 32 else 32
    folder = history / (f"{platform.system()}-{platform.python_implementation()}-"
                        f"{'.'.join(platform.python_version_tuple()[:2])}-{bits}bit")
    folder.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.name[:4]) for p in folder.glob("[0-9][0-9][0-9][0-9]_*.json")), default=0)
    (folder / f"{number:04d}_{record.stem}.json").write_bytes(record.read_bytes())
