"""The driver's operations: apply, verify, rollback, status. The CLI prints what they return."""
from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .. import flags, nvtx
from .. import gate as gate_module
from . import checks, series, target
from .errors import StepFailed, UsageError

Progress = Callable[[str], None]


@dataclass
class StepReport:
    """What happened to one step."""

    step: str
    status: str  # applied | already applied | would apply | failed | verified | reverted | flag off
    commit: str | None = None
    parity: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)
    message: str = ""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def target_flags(repo) -> dict:
    """The flag values the target's processes see: defaults, then the target's flags file."""
    values = {name: d.default for name, d in flags.DEFINITIONS.items()}
    path = target.flags_file(repo)
    if path.exists():
        values.update(flags.read_file(path))
    return values


def _check(repo, step: series.Step, progress: Progress) -> tuple[checks.CheckResult, checks.CheckResult | None]:
    """Run parity, then (if parity passed) the gate; record both in the state file."""
    root = Path(repo.working_tree_dir)
    with nvtx.range("port/parity"):
        progress(f"  {step.name}: parity test {step.parity.name} ...")
        parity = checks.run(step.parity, root, target.flags_file(repo), step.thresholds)
        progress(f"  {step.name}: parity {parity.summary()}")
    gate = None
    if parity.result == "passed":
        record = target.state_dir(repo) / "gates" / step.name / f"{_now().replace(':', '')}.json"
        with nvtx.range("port/gate"):
            progress(f"  {step.name}: benchmark gate {step.gate.name} ...")
            history = target.state_dir(repo) / "benchmarks" / step.name
            compare_fail = step.compare_fail.get(gate_module.device_kind())
            gate = checks.run(step.gate, root, target.flags_file(repo), step.thresholds, benchmark_json=record,
                              history=history, compare_fail=compare_fail)
            progress(f"  {step.name}: gate {gate.summary()}")
    state = target.read_state(repo)
    state["steps"][step.name] = {
        "time": _now(),
        "result": "passed" if gate is not None and gate.result in ("passed", "skipped") else "failed",
        "parity": {"result": parity.result, "counts": parity.counts},
        "gate": {"result": gate.result, "counts": gate.counts, **gate.gate} if gate else {"result": "not run"},
    }
    target.write_state(repo, state)
    return parity, gate


def _failure_detail(result: checks.CheckResult) -> str:
    if checks.REGRESSED in result.output:  # pytest-benchmark's lines after it name the test and the figures
        after = result.output[result.output.index(checks.REGRESSED):].splitlines()
        return " ".join(line.strip() for line in after[:3]) + " than the previous stored run of this gate"
    lines = [line for line in result.output.splitlines() if line.startswith(("FAILED", "ERROR", "E "))]
    if lines:
        return "; ".join(lines[:3])
    tail = result.output.strip().splitlines()
    return tail[-1] if tail else "no output"


def _message(step: series.Step, parity: checks.CheckResult, gate: checks.CheckResult, snapshot: dict) -> str:
    g = gate.gate
    gate_text = f"gate {gate.result}" + (f", {g['device']} fast/original {g['ratio']:.3f} < {g['threshold']}" if g else "")
    flag_text = " ".join(f"{k}={str(v).lower()}" for k, v in sorted(snapshot.items()))
    return (
        f"xllm-port: {step.name}: {step.summary}\n\n"
        f"Applied by xllm-port from {step.patch}.\n"
        f"Roll back at runtime with `xllm-port rollback --step {step.name} --mode flag`.\n\n"
        f"Step: {step.name}\n"
        f"Flag: {step.flag}={str(snapshot[step.flag]).lower()}\n"
        f"Flags: {flag_text}\n"
        f"Verified-by: parity {parity.result} ({', '.join(f'{n} {k}' for k, n in parity.counts.items())}); {gate_text}\n"
    )


def apply(target_dir: Path, series_dir: Path, step_name: str | None, dry_run: bool, branch: str,
          progress: Progress) -> list[StepReport]:
    """Apply every step not yet applied (or only ``step_name``), each verified and committed alone."""
    steps = series.load(series_dir)
    chosen = [series.find(steps, step_name)] if step_name else steps
    reports: list[StepReport] = []
    with target.open_repo(target_dir) as repo:
        target.require_ready(repo, branch)
        applied = target.applied_steps(repo)
        start = repo.head.commit.hexsha
        for n, step in enumerate(chosen, 1):
            if step.name in applied:
                progress(f"[{n}/{len(chosen)}] {step.name}: already applied ({applied[step.name][:10]})")
                reports.append(StepReport(step.name, "already applied", applied[step.name]))
                continue
            missing = [d for d in step.depends_on if d not in applied]
            if missing and not dry_run:
                raise UsageError(f"step {step.name} depends on {', '.join(missing)}, not applied: apply it first")
            head = repo.head.commit.hexsha
            progress(f"[{n}/{len(chosen)}] {step.name}: applying {step.patch.name}")
            try:
                with nvtx.range("port/apply"):
                    mode = target.apply_patch(repo, step.patch)
                if dry_run:
                    reports.append(StepReport(step.name, "would apply", message=f"patch applies ({mode})"))
                    applied[step.name] = "(dry run)"
                    continue
                parity, gate = _check(repo, step, progress)
                if parity.result != "passed":
                    raise StepFailed(f"{step.name}: parity {parity.result}: {_failure_detail(parity)}")
                if gate.result == "failed":
                    raise StepFailed(f"{step.name}: gate failed: {_failure_detail(gate)}")
                with nvtx.range("port/commit"):
                    sha = target.commit(repo, _message(step, parity, gate, target_flags(repo)))
                applied[step.name] = sha
                reports.append(StepReport(step.name, "applied", sha, asdict(parity) | {"output": ""},
                                          asdict(gate) | {"output": ""}))
                progress(f"[{n}/{len(chosen)}] {step.name}: committed {sha[:10]}")
            except StepFailed as e:
                target.restore(repo, head)
                reports.append(StepReport(step.name, "failed", message=str(e)))
                raise StepFailed(f"{e} (target restored to {head[:10]})", reports) from None
        if dry_run:
            target.restore(repo, start)
    return reports


def verify(target_dir: Path, series_dir: Path, step_name: str | None, progress: Progress) -> list[StepReport]:
    """Re-run the parity tests and gates of the applied steps (or of ``step_name``)."""
    steps = series.load(series_dir)
    reports = []
    with target.open_repo(target_dir) as repo:
        applied = target.applied_steps(repo)
        chosen = [series.find(steps, step_name)] if step_name else [s for s in steps if s.name in applied]
        for step in chosen:
            if step.name not in applied:
                raise UsageError(f"step {step.name} is not applied to {target_dir}")
            parity, gate = _check(repo, step, progress)
            ok = parity.result == "passed" and gate is not None and gate.result != "failed"
            reports.append(StepReport(step.name, "verified" if ok else "failed", applied[step.name],
                                      asdict(parity) | {"output": ""}, asdict(gate) | {"output": ""} if gate else {}))
    if any(r.status == "failed" for r in reports):
        raise StepFailed("verification failed: " + ", ".join(r.step for r in reports if r.status == "failed"), reports)
    return reports


def rollback(target_dir: Path, series_dir: Path, step_name: str, mode: str, cascade: bool, branch: str,
             progress: Progress) -> list[StepReport]:
    """Turn a step's flag off for the target, or revert its commit (dependents first with ``cascade``)."""
    steps = series.load(series_dir)
    step = series.find(steps, step_name)
    with target.open_repo(target_dir) as repo:
        if mode == "flag":
            path = target.flags_file(repo)
            values = flags.read_file(path) if path.exists() else {}
            values[step.flag] = False
            flags.write_file(path, values)
            progress(f"{step.name}: flag {step.flag}=false in {path}; processes reading "
                     f"XLLM_SAMPLING_FLAGS_FILE={path} take the original path on their next call")
            return [StepReport(step.name, "flag off", message=str(path))]
        target.require_ready(repo, branch)
        applied = target.applied_steps(repo)
        if step.name not in applied:
            raise UsageError(f"step {step.name} is not applied to {target_dir}")
        dependents = [s for s in series.dependents(steps, step.name) if s.name in applied]
        if dependents and not cascade:
            names = ", ".join(s.name for s in dependents)
            raise UsageError(f"refused: applied step(s) {names} depend on {step.name}; add --cascade to revert them too")
        order = sorted(dependents, key=lambda s: list(applied).index(s.name), reverse=True) + [step]
        head = repo.head.commit.hexsha
        reports = []
        try:
            for s in order:
                sha = applied[s.name]
                message = (f"xllm-port: revert {s.name}\n\nThis reverts commit {sha}.\n\n"
                           f"Reverts-Step: {s.name}\n")
                new = target.revert(repo, sha, message)
                progress(f"{s.name}: reverted {sha[:10]} in {new[:10]}")
                reports.append(StepReport(s.name, "reverted", new))
        except StepFailed as e:
            target.restore(repo, head)
            raise StepFailed(f"{e} (target restored to {head[:10]})", reports) from None
    return reports


def status(target_dir: Path, series_dir: Path) -> list[dict]:
    """Each step: applied or not, its commit, its flag's value for the target, its last verification."""
    steps = series.load(series_dir)
    with target.open_repo(target_dir) as repo:
        applied = target.applied_steps(repo)
        values = target_flags(repo)
        state = target.read_state(repo)["steps"]
        branch = repo.active_branch.name if not repo.head.is_detached else "(detached)"
    rows = []
    for step in steps:
        last = state.get(step.name, {})
        rows.append({
            "step": step.name, "applied": step.name in applied, "commit": applied.get(step.name),
            "flag": step.flag, "flag_value": values[step.flag], "branch": branch,
            "last_verification": last,
        })
    return rows
