"""The series format: a ``series`` file naming steps in order, and a folder per step.

Each ``<series>/<step>/manifest.toml`` names the step's patch, flag, parity test, gate,
rollback script, the steps it depends on, the gate thresholds per device kind and, optionally,
``[compare_fail]``: per device kind, how much slower than the previous stored run of the same
gate the fast path may get (a ``--benchmark-compare-fail`` expression of pytest-benchmark,
e.g. ``"median:10%"``). Paths in a
manifest are relative to the series root, the folder that holds the series folder (absolute
paths are taken as they are).
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .. import flags
from .errors import UsageError

REQUIRED = ("step", "summary", "patch", "flag", "parity", "gate", "rollback")
STEP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
COMPARE_FAIL = re.compile(r"(min|max|mean|median|stddev|iqr):\d+(\.\d+)?%?")


@dataclass(frozen=True)
class Step:
    """One step of a series, with every path resolved."""

    name: str
    summary: str
    patch: Path
    flag: str
    parity: Path
    gate: Path
    rollback: Path
    depends_on: tuple[str, ...] = ()
    thresholds: dict = field(default_factory=dict)
    compare_fail: dict = field(default_factory=dict)


def _manifest(folder: Path, root: Path, name: str) -> Step:
    path = folder / name / "manifest.toml"
    if not path.is_file():
        raise UsageError(f"series {folder}: step {name!r} has no manifest ({path})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"manifest {path}: not valid TOML ({e})") from None
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise UsageError(f"manifest {path}: missing {', '.join(missing)}")
    wrong = [k for k in REQUIRED if not isinstance(raw[k], str) or not raw[k].strip()]
    if wrong:
        raise UsageError(f"manifest {path}: {', '.join(wrong)} must be non-empty strings")
    depends_on = raw.get("depends_on", [])
    if not isinstance(depends_on, list) or not all(isinstance(d, str) for d in depends_on):
        raise UsageError(f"manifest {path}: depends_on must be a list of step names, e.g. [\"air_topk\"]")
    if raw["step"] != name:
        raise UsageError(f"manifest {path}: step = {raw['step']!r} but the series names it {name!r}")
    if raw["flag"] not in flags.DEFINITIONS:
        raise UsageError(f"manifest {path}: unknown flag {raw['flag']!r}")
    thresholds = raw.get("threshold", {})
    if not isinstance(thresholds, dict) or not all(isinstance(v, (int, float)) for v in thresholds.values()):
        raise UsageError(f"manifest {path}: [threshold] must map device kinds to numbers")
    compare_fail = raw.get("compare_fail", {})
    if not isinstance(compare_fail, dict) or not all(
            isinstance(v, str) and COMPARE_FAIL.fullmatch(v) for v in compare_fail.values()):
        raise UsageError(f"manifest {path}: [compare_fail] must map device kinds to pytest-benchmark "
                         f"--benchmark-compare-fail expressions such as \"median:10%\"")

    def resolve(p: str, base: Path) -> Path:
        full = (base / p).resolve()
        if not full.is_file():
            raise UsageError(f"manifest {path}: {p} not found ({full})")
        return full

    return Step(
        name, raw["summary"], resolve(raw["patch"], folder / name), raw["flag"], resolve(raw["parity"], root),
        resolve(raw["gate"], root), resolve(raw["rollback"], root), tuple(depends_on), thresholds,
        compare_fail,
    )


def load(folder: str | Path) -> list[Step]:
    """Read and check a series folder; a problem is a :class:`UsageError` naming the file."""
    folder = Path(folder).resolve()
    series = folder / "series"
    if not series.is_file():
        raise UsageError(f"series {folder}: no series file ({series})")
    names = [line.strip() for line in series.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise UsageError(f"series {series}: names no step")
    bad = [n for n in names if not STEP_NAME.fullmatch(n)]
    if bad:
        raise UsageError(f"series {series}: step name {bad[0]!r} is not a plain identifier (letters, digits, _)")
    if len(set(names)) != len(names):
        raise UsageError(f"series {series}: a step is listed twice")
    steps = [_manifest(folder, folder.parent, n) for n in names]
    for i, step in enumerate(steps):
        for dep in step.depends_on:
            if dep not in names[:i]:
                raise UsageError(f"series {series}: {step.name} depends on {dep!r}, which is not an earlier step")
    return steps


def find(steps: list[Step], name: str) -> Step:
    """The step called ``name``; a :class:`UsageError` listing the series' steps if there is none."""
    if not STEP_NAME.fullmatch(name):
        raise UsageError(f"--step {name!r}: not a step name (letters, digits, _); the series has: "
                         f"{', '.join(s.name for s in steps)}")
    for step in steps:
        if step.name == name:
            return step
    raise UsageError(f"unknown step {name!r}; the series has: {', '.join(s.name for s in steps)}")


def dependents(steps: list[Step], name: str) -> list[Step]:
    """Steps that depend on ``name``, directly or through others, in series order."""
    found: set[str] = {name}
    for step in steps:
        if found & set(step.depends_on):
            found.add(step.name)
    return [s for s in steps if s.name in found and s.name != name]
