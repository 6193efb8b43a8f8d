"""The driver never loses a user's work: user files during a failing step, a second apply at once,
SIGINT / SIGTERM / SIGKILL during each check, a corrupt flags file, and bad targets and series."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import git
import pytest

from xllm_sampling import flags
from xllm_sampling.paths import PROJECT_ROOT, SERIES_DIR
from xllm_sampling.port.cli import run

from .conftest import tree_snapshot

STEP = "logit_softmax"
STEP_FILE = "engine/sampling.py"  # the one file logit_softmax's patch changes

# A check that reports its pid, waits for a file to appear (so that a test acts while it runs),
# may do a user's work in the target meanwhile, then passes or fails.
CHECK = '''
import os, time
from pathlib import Path


def test_check():
    target = Path(os.environ["XLLM_PORT_TARGET"])
    control = Path(os.environ["XLLM_TEST_CONTROL"])
    (control / "{name}.pid").write_text(str(os.getpid()))
    deadline = time.time() + 120
    while not (control / "go").exists() and time.time() < deadline:
        time.sleep(0.05)
    work = control / "user_work.py"
    if work.exists():
        exec(work.read_text(), {{"target": target}})
    assert not (control / "fail_{name}").exists(), "{name} fails as asked"
'''


@pytest.fixture
def control(tmp_path, monkeypatch):
    folder = tmp_path / "control"
    folder.mkdir()
    monkeypatch.setenv("XLLM_TEST_CONTROL", str(folder))
    return folder


@pytest.fixture
def slow_series(make_series, tmp_path):
    """A one-step series (logit_softmax's real patch) whose parity test and gate are CHECK."""
    for name in ("parity", "gate"):
        (tmp_path / f"check_{name}.py").write_text(CHECK.format(name=name))
    manifest = f'''step = "{STEP}"
summary = "test step"
patch = "{STEP}.patch"
flag = "{STEP}"
parity = "{tmp_path / 'check_parity.py'}"
gate = "{tmp_path / 'check_gate.py'}"
rollback = "{PROJECT_ROOT / 'rollback' / (STEP + '.sh')}"
[threshold]
cpu = 1.5
cuda = 1.5
'''
    return make_series([STEP], manifest_text={STEP: manifest}, name="slow")


def gate_waits_for_go2(series, control):
    """Let the parity test pass at once and make the gate wait for the file go2."""
    (control / "go").touch()
    gate = series.parent / "check_gate.py"
    gate.write_text(gate.read_text().replace('"go"', '"go2"'))


def apply_until(target, series, control, phase):
    """Start an apply in a subprocess and wait until its ``phase`` check runs: (the target's
    files before, the driver process, the check's pid)."""
    if phase == "gate":
        gate_waits_for_go2(series, control)
    before = tree_snapshot(target)
    driver = start_apply(target, series)
    return before, driver, wait_for(control / f"{phase}.pid", driver)


def log(target):
    with git.Repo(target) as repo:
        return [c.message for c in repo.iter_commits()]


def staged(target):
    with git.Repo(target) as repo:
        return repo.git.diff("--cached", "--name-only").split()


def start_apply(target, series):
    """An apply in a subprocess, as from a terminal: SIGINT at its default even when pytest itself
    was started with it ignored (a background job of a non-interactive shell), since Python only
    turns SIGINT into KeyboardInterrupt where it was not ignored at start-up."""
    argv = [sys.executable, "-m", "xllm_sampling.port.cli", "apply", "--target", str(target), "--series", str(series)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(path: Path, proc=None, timeout=60.0) -> int:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path.name} never appeared"
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver ended early: {proc.communicate()}")
        time.sleep(0.05)
    time.sleep(0.1)
    return int(path.read_text())


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_user_files_made_during_a_failing_step_are_kept(fresh_target, slow_series, control):
    (control / "go").touch()
    (control / "fail_parity").touch()
    (control / "user_work.py").write_text(
        "(target / 'notes.txt').write_text('my notes')\n"
        "(target / 'engine' / 'model.py').write_text((target / 'engine' / 'model.py').read_text() + '# mine\\n')\n")
    before = tree_snapshot(fresh_target)
    assert run(["apply", "--target", str(fresh_target), "--series", str(slow_series)]) == 1
    after = tree_snapshot(fresh_target)
    assert after.pop("notes.txt") == b"my notes"
    assert after.pop("engine/model.py") == before.pop("engine/model.py") + b"# mine\n"
    assert after == before  # the step's own change is gone, nothing else touched
    assert staged(fresh_target) == [] and len(log(fresh_target)) == 1


def test_a_step_file_the_user_edited_meanwhile_is_kept_and_named(fresh_target, slow_series, control, capsys):
    (control / "go").touch()
    (control / "fail_gate").touch()
    (control / "user_work.py").write_text(f"(target / '{STEP_FILE}').write_text('# my version\\n')\n")
    assert run(["apply", "--target", str(fresh_target), "--series", str(slow_series)]) == 1
    assert (fresh_target / STEP_FILE).read_text() == "# my version\n"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"your edits to {STEP_FILE} were kept" in err[0] and "gate failed" in err[0]


def test_edit_to_a_step_file_before_the_commit_is_not_committed(fresh_target, slow_series, control, capsys):
    (control / "go").touch()
    (control / "user_work.py").write_text(f"(target / '{STEP_FILE}').write_text('# my version\\n')\n")
    assert run(["apply", "--target", str(fresh_target), "--series", str(slow_series)]) == 1
    assert "changed while the checks ran: not committed" in capsys.readouterr().err
    assert len(log(fresh_target)) == 1 and (fresh_target / STEP_FILE).read_text() == "# my version\n"


def test_a_second_apply_is_refused_while_the_first_runs(fresh_target, slow_series, control, capsys):
    first = start_apply(fresh_target, slow_series)
    try:
        wait_for(control / "parity.pid", first)
        assert run(["apply", "--target", str(fresh_target), "--series", str(slow_series), "--json"]) == 2
        out, err = capsys.readouterr()
        assert f"locked by pid {first.pid} (xllm-port apply" in err and json.loads(out)["exit_code"] == 2
        (control / "go").touch()
        assert first.wait(120) == 0
    finally:
        first.kill()
    assert "Step: logit_softmax" in log(fresh_target)[0] and staged(fresh_target) == []


@pytest.mark.parametrize("phase", ["parity", "gate"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_restores_the_target_and_stops_the_check(fresh_target, slow_series, control, phase, signum):
    before, driver, child = apply_until(fresh_target, slow_series, control, phase)
    driver.send_signal(signum)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 1, err
    assert f"interrupted by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert tree_snapshot(fresh_target) == before and staged(fresh_target) == [] and len(log(fresh_target)) == 1
    time.sleep(0.5)
    assert not alive(child), "the check outlived the driver"


@pytest.mark.parametrize("phase", ["parity", "gate"])
def test_sigkill_is_seen_by_status_and_repaired_by_the_next_apply(fresh_target, slow_series, control, phase, capsys):
    before, driver, child = apply_until(fresh_target, slow_series, control, phase)
    driver.kill()
    driver.wait(30)
    time.sleep(0.5)
    assert not alive(child), "the check outlived the killed driver"
    assert run(["status", "--target", str(fresh_target), "--json"]) == 0
    rows = {r["step"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[STEP]["interrupted"] == "checking"
    (control / "go").touch()
    (control / "go2").touch()
    assert run(["recover", "--target", str(fresh_target)]) == 0
    assert tree_snapshot(fresh_target) == before and staged(fresh_target) == []
    assert run(["apply", "--target", str(fresh_target), "--series", str(slow_series)]) == 0
    assert "Step: logit_softmax" in log(fresh_target)[0]


def test_apply_recovers_a_killed_run_first(fresh_target, slow_series, control, capsys):
    driver = start_apply(fresh_target, slow_series)
    wait_for(control / "parity.pid", driver)
    driver.kill()
    driver.wait(30)
    (control / "go").touch()
    assert run(["apply", "--target", str(fresh_target), "--series", str(slow_series), "--json"]) == 0
    statuses = [r["status"] for r in json.loads(capsys.readouterr().out)]
    assert statuses == ["recovered", "applied"]


@pytest.mark.parametrize("text", ["sampler = flase\n", "nope = true\n", "sampler = = true\n", "cuda_graph_max_batch = -5\n"])
def test_a_corrupt_flags_file_never_blocks_the_repair_commands(fresh_target, text, capsys):
    path = fresh_target / ".git" / "xllm_port" / "flags.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    assert run(["status", "--target", str(fresh_target)]) == 0
    assert run(["rollback", "--target", str(fresh_target), "--step", "sampler", "--mode", "flag"]) == 0
    assert flags.read_file(path) == {"sampler": False}
    path.write_text(text)
    assert run(["flags", "set", "air_topk", "false", "--target", str(fresh_target)]) == 0
    assert flags.read_file(path) == {"air_topk": False}
    assert str(path) in capsys.readouterr().err


def test_ops_keep_the_last_good_flags_when_the_file_breaks(tmp_path, monkeypatch):
    path = tmp_path / "flags.toml"
    flags.write_file(path, {"sampler": False})
    monkeypatch.setenv(flags.FLAGS_FILE_ENV, str(path))
    assert flags.get("sampler") is False
    path.write_text("sampler = flase  # a typo\n")
    with pytest.warns(UserWarning, match=f"flags file {path}.*keeping the last good"):
        assert flags.get("sampler") is False
    assert flags.get("sampler") is False  # one warning, not one per call


def test_apply_turns_a_rolled_back_flag_back_on(fresh_target, slow_series, control, capsys):
    (control / "go").touch()
    assert run(["rollback", "--target", str(fresh_target), "--step", STEP, "--mode", "flag"]) == 0
    capsys.readouterr()
    assert run(["apply", "--target", str(fresh_target), "--series", str(slow_series), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)[0]
    assert "turned back on" in report["message"]
    assert flags.read_file(fresh_target / ".git" / "xllm_port" / "flags.toml")[STEP] is True


def bare(tmp_path, fresh_target):
    path = tmp_path / "bare.git"
    git.Repo.clone_from(fresh_target, path, bare=True).close()
    return path


def unborn(tmp_path, fresh_target):
    path = tmp_path / "unborn"
    path.mkdir()
    git.Repo.init(path).close()
    return path


def no_branch(tmp_path, fresh_target):
    with git.Repo(fresh_target) as repo:
        repo.git.checkout("-q", "main")
        repo.git.branch("-D", "feat/sampler_optim")
    return fresh_target


def hidden_untracked(tmp_path, fresh_target):
    with git.Repo(fresh_target) as repo:
        repo.git.config("status.showUntrackedFiles", "no")
    (fresh_target / "new.py").write_text("x = 1\n")
    return fresh_target


@pytest.mark.parametrize("make,message", [
    (bare, "bare repository"),
    (unborn, "no commit yet"),
    (no_branch, "checkout -b feat/sampler_optim"),
    (hidden_untracked, "dirty (1 paths, e.g. new.py)"),
])
def test_bad_targets_exit_2_with_one_line_and_json(make, message, tmp_path, fresh_target, capsys):
    target = make(tmp_path, fresh_target)
    assert run(["apply", "--target", str(target), "--json"]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and message in err
    assert json.loads(out) == {"error": err.strip().removeprefix("xllm-port: error: "), "exit_code": 2}


MANIFEST = (SERIES_DIR / STEP / "manifest.toml").read_text()


@pytest.mark.parametrize("steps,manifest,message", [
    (["../../escaped"], None, "not a plain identifier"),
    ([STEP], MANIFEST.replace('summary = "', 'summary = 42 #'), "summary must be non-empty strings"),
    ([STEP], MANIFEST.replace("depends_on = []", 'depends_on = "air_topk"'), "depends_on must be a list"),
])
def test_bad_series_exit_2(steps, manifest, message, fresh_target, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "series").write_text("\n".join(steps) + "\n")
    (folder / STEP).mkdir()
    (folder / STEP / "manifest.toml").write_text(manifest or MANIFEST)
    (folder / STEP / f"{STEP}.patch").write_text((SERIES_DIR / STEP / f"{STEP}.patch").read_text())
    assert run(["apply", "--target", str(fresh_target), "--series", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize("argv,message", [
    (["apply", "--step", "../../x"], "not a step name"),
    (["flags", "set", "cuda_graph_max_batch", "-5"], "an integer >= 1"),
    (["flags", "set", "cuda_graph_max_batch", "0"], "an integer >= 1"),
])
def test_bad_names_and_values_exit_2(argv, message, fresh_target, capsys):
    assert run([*argv, "--target", str(fresh_target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_read_only_target_exits_2(fresh_target, capsys):
    os.chmod(fresh_target, 0o555)
    try:
        assert run(["apply", "--target", str(fresh_target)]) == 2
    finally:
        os.chmod(fresh_target, 0o755)
    assert "not writable" in capsys.readouterr().err
