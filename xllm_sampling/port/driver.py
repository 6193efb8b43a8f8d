"""The driver's operations: apply, verify, rollback, status. The CLI prints what they return."""
from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .. import flags, nvtx, published_counters
from . import checks, series, target
from .errors import StepFailed, UsageError
from .transaction import Interrupted, Transaction, signal_name

Progress = Callable[[str], None]


@dataclass
class StepReport:
    """What happened to one step."""

    step: str
    status: str  # applied | already applied | would apply | failed | verified | reverted | flag off | recovered
    commit: str | None = None
    parity: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)
    message: str = ""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def target_flags(repo) -> dict:
    """The flag values the target's processes see: defaults, then the target's flags file (the
    entries that parse; the ops skip a broken file the same way, with a warning)."""
    values = {name: d.default for name, d in flags.DEFINITIONS.items()}
    path = target.flags_file(repo)
    if path.exists():
        values.update(flags.read_file_lenient(path)[0])
    return values


def _check(repo, tx: Transaction, step: series.Step, progress: Progress) -> tuple[checks.CheckResult, checks.CheckResult | None]:
    """Run parity, then (if parity passed) the gate; record both in the state file."""
    from .. import gate as gate_module  # imports torch: only when checks run

    root = Path(repo.working_tree_dir)
    stamp = _now().replace(":", "")
    logs = target.state_dir(repo) / "logs"
    say = lambda what: lambda line: progress(f"  {step.name}: {what} {line}")  # noqa: E731
    with nvtx.range("port/parity"):
        progress(f"  {step.name}: parity test {step.parity.name}")
        parity = checks.run(step.parity, root, target.flags_file(repo), step.thresholds,
                            logs / f"{step.name}-parity-{stamp}.log", say("parity"), tx.child)
        progress(f"  {step.name}: parity {parity.summary()}")
    gate = None
    if parity.result == "passed":
        record = target.state_dir(repo) / "gates" / step.name / f"{stamp}.json"
        history = target.state_dir(repo) / "benchmarks" / step.name
        with nvtx.range("port/gate"):
            progress(f"  {step.name}: benchmark gate {step.gate.name}")
            gate = checks.run(step.gate, root, target.flags_file(repo), step.thresholds,
                              logs / f"{step.name}-gate-{stamp}.log", say("gate"), tx.child, benchmark_json=record,
                              history=history, compare_fail=step.compare_fail.get(gate_module.device_kind()))
            progress(f"  {step.name}: gate {gate.summary()}")
        if gate.result == "passed" and record.exists():
            checks.store(record, history)  # only a passing run becomes the next baseline
    state = target.read_state(repo)
    state["steps"][step.name] = {
        "time": _now(),
        "result": "passed" if gate is not None and gate.result in ("passed", "skipped") else "failed",
        "parity": {"result": parity.result, "counts": parity.counts, "log": parity.log},
        "gate": {"result": gate.result, "counts": gate.counts, "log": gate.log, **gate.gate} if gate else {"result": "not run"},
    }
    target.write_state(repo, state)
    return parity, gate


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


def _recover(tx: Transaction, progress: Progress) -> StepReport | None:
    """Finish the restore of a step an earlier run left half done (interrupted or killed)."""
    journal = tx.pending()
    if journal is None:
        return None
    kept = tx.restore()
    message = f"restored the {journal.action} of {journal.step} interrupted during its {journal.phase} phase"
    if kept:
        message += f"; kept your edits to {', '.join(kept)}"
    progress(f"{journal.step}: {message}")
    return StepReport(journal.step, "recovered", message=message)


def _flag_back_on(repo, step: series.Step, progress: Progress) -> str:
    """A step being applied is verified with its flag on: undo an earlier ``rollback --mode flag``."""
    path = target.flags_file(repo)
    if not path.exists() or flags.read_file_lenient(path)[0].get(step.flag, True) is not False:
        return ""
    flags.set_in_file(path, step.flag, True)
    message = f"flag {step.flag} was off in {path} (an earlier rollback --mode flag): turned back on"
    progress(f"  {step.name}: {message}")
    return message


@contextlib.contextmanager
def _guarded(tx: Transaction, step_name: str, head: str):
    """Restore the step in progress on any failure or interrupt, and say how it ended."""
    try:
        yield
    except StepFailed as e:
        kept = tx.restore()
        raise StepFailed(f"{e} (target restored to {head[:10]}{_kept(kept)})") from None
    except (KeyboardInterrupt, Interrupted) as e:
        kept = tx.restore()
        raise StepFailed(f"{step_name}: interrupted by {signal_name(e)} "
                         f"(target restored to {head[:10]}{_kept(kept)})") from None
    except BaseException:
        tx.restore()
        raise


def _kept(kept: list[str]) -> str:
    return f"; your edits to {', '.join(kept)} were kept as they are" if kept else ""


def apply(target_dir: Path, series_dir: Path, step_name: str | None, dry_run: bool, branch: str,
          progress: Progress) -> list[StepReport]:
    """Apply every step not yet applied (or only ``step_name``), each verified and committed alone."""
    steps = series.load(series_dir)
    chosen = [series.find(steps, step_name)] if step_name else steps
    reports: list[StepReport] = []
    with target.open_repo(target_dir, writable=True) as repo, Transaction(repo, "apply") as tx:
        recovered = _recover(tx, progress)
        if recovered:
            reports.append(recovered)
        target.require_ready(repo, branch)
        applied = target.applied_steps(repo)
        if dry_run:
            return reports + _dry_run(repo, tx, chosen, applied, progress)
        for n, step in enumerate(chosen, 1):
            if step.name in applied:
                progress(f"[{n}/{len(chosen)}] {step.name}: already applied ({applied[step.name][:10]})")
                reports.append(StepReport(step.name, "already applied", applied[step.name]))
                continue
            missing = [d for d in step.depends_on if d not in applied]
            if missing:
                raise UsageError(f"step {step.name} depends on {', '.join(missing)}, not applied: apply it first")
            head = repo.head.commit.hexsha
            progress(f"[{n}/{len(chosen)}] {step.name}: applying {step.patch.name}")
            tx.begin(step.name, "apply", target.patch_paths(repo, step.patch))
            with _guarded(tx, step.name, head):
                with nvtx.range("port/apply"):
                    target.apply_patch(repo, step.patch)
                tx.changed()
                note = _flag_back_on(repo, step, progress)
                parity, gate = _check(repo, tx, step, progress)
                if parity.result != "passed":
                    raise StepFailed(f"{step.name}: parity {parity.result}: {parity.failure()}")
                if gate.result == "failed":
                    raise StepFailed(f"{step.name}: gate failed: {gate.failure()}")
                with nvtx.range("port/commit"):
                    sha = tx.commit(_message(step, parity, gate, target_flags(repo)))
            applied[step.name] = sha
            reports.append(StepReport(step.name, "applied", sha, asdict(parity) | {"output": ""},
                                      asdict(gate) | {"output": ""}, note))
            progress(f"[{n}/{len(chosen)}] {step.name}: committed {sha[:10]}")
    return reports


def _dry_run(repo, tx: Transaction, chosen: list[series.Step], applied: dict, progress: Progress) -> list[StepReport]:
    """Apply the chosen patches in turn (each on top of the previous), report, then restore all."""
    pending = [s for s in chosen if s.name not in applied]
    paths = sorted({p for s in pending for p in target.patch_paths(repo, s.patch)})
    reports = [StepReport(s.name, "already applied", applied[s.name]) for s in chosen if s.name in applied]
    tx.begin("(dry run)", "apply", paths)
    with _guarded(tx, "dry run", repo.head.commit.hexsha):
        try:
            for step in pending:
                mode = target.apply_patch(repo, step.patch)
                progress(f"{step.name}: patch applies ({mode})")
                reports.append(StepReport(step.name, "would apply", message=f"patch applies ({mode})"))
        finally:
            tx.changed()
            tx.restore()
    return reports


def verify(target_dir: Path, series_dir: Path, step_name: str | None, progress: Progress) -> list[StepReport]:
    """Re-run the parity tests and gates of the applied steps (or of ``step_name``)."""
    steps = series.load(series_dir)
    reports = []
    with target.open_repo(target_dir, writable=True) as repo, Transaction(repo, "verify") as tx:
        applied = target.applied_steps(repo)
        chosen = [series.find(steps, step_name)] if step_name else [s for s in steps if s.name in applied]
        for step in chosen:
            if step.name not in applied:
                raise UsageError(f"step {step.name} is not applied to {target_dir}")
            tx.begin(step.name, "verify", [])
            try:
                parity, gate = _check(repo, tx, step, progress)
            finally:
                tx.end()
            ok = parity.result == "passed" and gate is not None and gate.result != "failed"
            reports.append(StepReport(step.name, "verified" if ok else "failed", applied[step.name],
                                      asdict(parity) | {"output": ""}, asdict(gate) | {"output": ""} if gate else {},
                                      "" if ok else (parity if parity.result != "passed" else gate).failure()))
    if any(r.status == "failed" for r in reports):
        raise StepFailed("verification failed: " + "; ".join(f"{r.step}: {r.message}" for r in reports
                                                                if r.status == "failed"), reports)
    return reports


def rollback(target_dir: Path, series_dir: Path, step_name: str, mode: str, cascade: bool, branch: str,
             progress: Progress) -> list[StepReport]:
    """Turn a step's flag off for the target, or revert its commit (dependents first with ``cascade``)."""
    steps = series.load(series_dir)
    step = series.find(steps, step_name)
    if mode == "flag":  # no lock: the instant rollback must work even while an apply runs
        with target.open_repo(target_dir) as repo:
            path = target.flags_file(repo)
            problems = flags.set_in_file(path, step.flag, False)
        for problem in problems:
            progress(f"dropped from {path}: {problem}")
        progress(f"{step.name}: flag {step.flag}=false in {path}; processes reading "
                 f"XLLM_SAMPLING_FLAGS_FILE={path} take the original path on their next call")
        return [StepReport(step.name, "flag off", message=str(path))]
    with target.open_repo(target_dir, writable=True) as repo, Transaction(repo, "rollback") as tx:
        _recover(tx, progress)
        target.require_ready(repo, branch)
        applied = target.applied_steps(repo)
        if step.name not in applied:
            raise UsageError(f"step {step.name} is not applied to {target_dir}")
        dependents = [s for s in series.dependents(steps, step.name) if s.name in applied]
        if dependents and not cascade:
            names = ", ".join(s.name for s in dependents)
            raise UsageError(f"refused: applied step(s) {names} depend on {step.name}; add --cascade to revert them too")
        order = sorted(dependents, key=lambda s: list(applied).index(s.name), reverse=True) + [step]
        reports = []
        for s in order:
            sha, head = applied[s.name], repo.head.commit.hexsha
            tx.begin(s.name, "revert", target.commit_paths(repo, sha))
            with _guarded(tx, s.name, head):
                target.revert(repo, sha)
                tx.changed()
                new = tx.commit(f"xllm-port: revert {s.name}\n\nThis reverts commit {sha}.\n\nReverts-Step: {s.name}\n")
            progress(f"{s.name}: reverted {sha[:10]} in {new[:10]}")
            reports.append(StepReport(s.name, "reverted", new))
    return reports


def recover(target_dir: Path, progress: Progress) -> list[StepReport]:
    """Finish restoring a step that an interrupted or killed run left half applied."""
    with target.open_repo(target_dir, writable=True) as repo, Transaction(repo, "recover") as tx:
        report = _recover(tx, progress)
    if report is None:
        progress("nothing to recover: no step was interrupted")
    return [report] if report else []


def status(target_dir: Path, series_dir: Path) -> list[dict]:
    """Each step: applied or not, its commit, its flag's value for the target, its last verification,
    and whether a run was interrupted in it (``interrupted``: its phase, to finish with ``recover``);
    the step whose flag is ``cuda_graph`` also has ``graph_counters``: the CUDA-graph counters that
    processes using the target's flags file published (``xllm_sampling.published_counters``)."""
    steps = series.load(series_dir)
    with target.open_repo(target_dir) as repo:
        applied = target.applied_steps(repo)
        values = target_flags(repo)
        state = target.read_state(repo)["steps"]
        branch = repo.active_branch.name if repo.head.is_valid() and not repo.head.is_detached else "(none)"
        journal = Transaction(repo, "status").pending()
        counters = published_counters.read(target.flags_file(repo).parent)
    rows = []
    for step in steps:
        last = state.get(step.name, {})
        interrupted = journal.phase if journal and journal.step == step.name and journal.action != "verify" else None
        rows.append({
            "step": step.name, "applied": step.name in applied, "commit": applied.get(step.name),
            "flag": step.flag, "flag_value": values[step.flag], "branch": branch,
            "last_verification": last, "interrupted": interrupted,
        } | ({"graph_counters": counters} if step.flag == "cuda_graph" else {}))
    return rows
