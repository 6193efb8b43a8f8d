"""The xllm-port driver on temporary targets, through its CLI entry point."""
import json
import os
import subprocess
import sys

import git
import pytest

from xllm_sampling.paths import SERIES_DIR
from xllm_sampling.port.cli import run

from .conftest import tree_snapshot

SERIES = ["logit_softmax", "air_topk", "sampler", "beam_search", "cuda_graph", "nvtx", "spec_decode"]

WRONG_SOFTMAX = (SERIES_DIR / "logit_softmax" / "logit_softmax.patch").read_text().replace(
    "+    return logit_softmax(logits, temperature)", "+    return logit_softmax(logits, temperature * 1.01)")


def log(target):
    with git.Repo(target) as repo:
        return [c.message for c in repo.iter_commits()]


@pytest.fixture(scope="module")
def demo_target(tmp_path_factory):
    """`xllm-port demo` once for the module: the whole series applied to a fresh reference engine."""
    target = tmp_path_factory.mktemp("demo") / "refengine"
    assert run(["demo", "--dir", str(target)]) == 0
    return target


def test_demo_applies_the_seven_steps_in_order(demo_target):
    messages = log(demo_target)[::-1]
    steps = [line.split(": ", 1)[1] for m in messages for line in m.splitlines() if line.startswith("Step: ")]
    assert steps == SERIES
    last = messages[-1]
    assert "Flag: spec_decode=true" in last and "Verified-by: parity passed" in last and "Flags: air_topk=true" in last
    assert "nvtx=false" in last
    gates = list((demo_target / ".git" / "xllm_port" / "gates").glob("*/*.json"))
    assert len(gates) == len(SERIES)
    record = json.loads(gates[0].read_text())["benchmarks"][0]["extra_info"]
    assert {"ratio", "device"} <= set(record["gate"]) and "torch" in record["environment"]
    assert "flags" in record["environment"]


def test_reapply_is_a_no_op(demo_target, capsys):
    head = log(demo_target)[0]
    assert run(["apply", "--target", str(demo_target), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {s["status"] for s in out} == {"already applied"} and log(demo_target)[0] == head


def test_status_json(demo_target, capsys):
    assert run(["status", "--target", str(demo_target), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows if r["applied"]] == SERIES
    assert all(r["last_verification"]["result"] == "passed" for r in rows)


def test_status_shows_the_graph_counters_a_process_published(demo_target, capsys):
    """An engine process using the target's flags file publishes its GraphRunner counters (at exit
    at the latest); status shows them on the cuda_graph step, as JSON and as text."""
    flags_file = demo_target / ".git" / "xllm_port" / "flags.toml"
    code = ("import torch; from xllm_sampling import GraphRunner\n"
            "runner = GraphRunner(lambda x: x.argmax(-1), name='sample_step')\n"
            "for _ in range(3): runner(torch.randn(2, 10))\n"
            "import os; print(os.getpid())")
    child = subprocess.run([sys.executable, "-c", code], env={**os.environ, "XLLM_SAMPLING_FLAGS_FILE": str(flags_file)},
                           capture_output=True, text=True, check=True)
    pid = int(child.stdout.split()[-1])
    assert run(["status", "--target", str(demo_target), "--json"]) == 0
    rows = {r["step"]: r for r in json.loads(capsys.readouterr().out)}
    published = [p for p in rows["cuda_graph"]["graph_counters"] if p["pid"] == pid]
    assert len(published) == 1 and not published[0]["running"]
    assert published[0]["runners"] == {"sample_step": {"captures": 0, "replays": 0, "eager_calls": 3}}
    assert all("graph_counters" not in r for name, r in rows.items() if name != "cuda_graph")
    assert run(["status", "--target", str(demo_target)]) == 0
    assert f"graphs of process {pid} (exited" in capsys.readouterr().out


def test_rollback_by_flag_changes_no_code(demo_target, capsys):
    before = tree_snapshot(demo_target)
    assert run(["rollback", "--target", str(demo_target), "--step", "sampler", "--mode", "flag"]) == 0
    assert tree_snapshot(demo_target) == before
    assert run(["flags", "get", "sampler", "--target", str(demo_target), "--json"]) == 0
    capsys.readouterr()
    assert run(["status", "--target", str(demo_target), "--json"]) == 0
    rows = {r["step"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["sampler"]["flag_value"] is False and rows["sampler"]["applied"]
    assert run(["flags", "set", "sampler", "true", "--target", str(demo_target)]) == 0


def test_revert_with_dependents_is_refused_then_cascades(demo_target, capsys):
    head = log(demo_target)[0]
    assert run(["rollback", "--target", str(demo_target), "--step", "air_topk", "--mode", "revert"]) == 2
    assert "sampler, cuda_graph depend on air_topk" in capsys.readouterr().err
    assert log(demo_target)[0] == head
    assert run(["rollback", "--target", str(demo_target), "--step", "air_topk", "--mode", "revert", "--cascade"]) == 0
    reverted = [m.splitlines()[0] for m in log(demo_target)[:3]]
    assert reverted == ["xllm-port: revert air_topk", "xllm-port: revert sampler", "xllm-port: revert cuda_graph"]
    assert "torch.topk(x, k" in (demo_target / "engine" / "sampling.py").read_text()


def test_revert_of_a_leaf_step(demo_target):
    assert run(["rollback", "--target", str(demo_target), "--step", "nvtx", "--mode", "revert"]) == 0
    assert "nvtx.range" not in (demo_target / "engine" / "decode.py").read_text()
    assert run(["rollback", "--target", str(demo_target), "--step", "nvtx", "--mode", "revert"]) == 2  # not applied


def test_dirty_tree_is_refused_with_nothing_changed(fresh_target, capsys):
    (fresh_target / "engine" / "model.py").write_text("# local edit\n")
    before = tree_snapshot(fresh_target)
    assert run(["apply", "--target", str(fresh_target)]) == 2
    assert "dirty" in capsys.readouterr().err
    assert tree_snapshot(fresh_target) == before and len(log(fresh_target)) == 1


def test_wrong_branch_is_refused(fresh_target, capsys):
    with git.Repo(fresh_target) as repo:
        repo.git.checkout("-q", "main")
    assert run(["apply", "--target", str(fresh_target)]) == 2
    assert "not feat/sampler_optim" in capsys.readouterr().err


def test_failed_parity_restores_the_target_then_resume_after_fix(fresh_target, make_series, capsys):
    (fresh_target / "engine" / "__pycache__").mkdir(exist_ok=True)
    before = tree_snapshot(fresh_target)
    bad = make_series(["logit_softmax", "air_topk"], patches={"logit_softmax": WRONG_SOFTMAX})
    assert run(["apply", "--target", str(fresh_target), "--series", str(bad)]) == 1
    assert "parity failed" in capsys.readouterr().err
    assert tree_snapshot(fresh_target) == before and len(log(fresh_target)) == 1
    with git.Repo(fresh_target) as repo:
        assert not repo.is_dirty(untracked_files=True)

    good = make_series(["logit_softmax", "air_topk"], name="fixed")
    assert run(["apply", "--target", str(fresh_target), "--series", str(good), "--step", "logit_softmax"]) == 0
    capsys.readouterr()
    assert run(["apply", "--target", str(fresh_target), "--series", str(good), "--json"]) == 0
    statuses = [s["status"] for s in json.loads(capsys.readouterr().out)]
    assert statuses == ["already applied", "applied"]


def test_failed_later_step_keeps_the_earlier_ones(fresh_target, make_series):
    bad = make_series(["logit_softmax", "beam_search"], patches={"beam_search": "not a patch\n"})
    assert run(["apply", "--target", str(fresh_target), "--series", str(bad)]) == 1
    messages = log(fresh_target)
    assert len(messages) == 2 and "Step: logit_softmax" in messages[0]
    with git.Repo(fresh_target) as repo:
        assert not repo.is_dirty(untracked_files=True)


def test_dry_run_changes_nothing(fresh_target, capsys):
    before = tree_snapshot(fresh_target)
    assert run(["apply", "--target", str(fresh_target), "--dry-run", "--json"]) == 0
    assert {s["status"] for s in json.loads(capsys.readouterr().out)} == {"would apply"}
    assert tree_snapshot(fresh_target) == before and len(log(fresh_target)) == 1


@pytest.mark.parametrize("argv,message", [
    (["apply", "--target", "/nonexistent/xllm"], "no such directory"),
    (["status", "--target", "/"], "not a git repository"),
    (["apply", "--step", "nope"], "unknown step 'nope'"),
    (["rollback", "--step", "sampler", "--mode", "sideways"], "invalid choice"),
    (["flags", "get", "samplr"], "unknown flag 'samplr'"),
    (["flags", "set", "sampler", "maybe"], "cannot parse 'maybe'"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_usage_exits_2_with_one_line(argv, message, fresh_target, capsys, monkeypatch):
    monkeypatch.setenv("XLLM_SAMPLING_FLAGS_FILE", str(fresh_target / ".git" / "flags.toml"))
    if "--target" not in argv and argv[0] in ("apply", "rollback"):
        argv = argv + ["--target", str(fresh_target)]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize("manifest,message", [
    ('step = "logit_softmax"\n', "missing summary"),
    ("step = = 1\n", "not valid TOML"),
    ((SERIES_DIR / "logit_softmax" / "manifest.toml").read_text().replace('flag = "logit_softmax"', 'flag = "nope"'), "unknown flag"),
])
def test_malformed_manifest_exits_2(manifest, message, fresh_target, make_series, capsys):
    series = make_series(["logit_softmax"], manifest_text={"logit_softmax": manifest})
    assert run(["apply", "--target", str(fresh_target), "--series", str(series)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_missing_series_exits_2(fresh_target, tmp_path, capsys):
    assert run(["apply", "--target", str(fresh_target), "--series", str(tmp_path / "none")]) == 2
    assert "no series file" in capsys.readouterr().err


def test_driver_phases_are_nvtx_ranges(fresh_target, nvtx_recorder, tmp_path):
    try:
        library = nvtx_recorder.build(tmp_path)
    except RuntimeError as e:
        pytest.skip(str(e))
    prefix = tmp_path / "record"
    env = nvtx_recorder.environment(library, prefix) | {"XLLM_SAMPLING_NVTX": "true"}
    argv = [sys.executable, "-m", "xllm_sampling.port.cli", "apply", "--target", str(fresh_target), "--step", "nvtx"]
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = driver.communicate(timeout=900)
    assert driver.returncode == 0, err
    events = nvtx_recorder.read(prefix)[driver.pid]  # the parity and gate children record apart
    assert [name for name, _ in nvtx_recorder.tree(events, "xllm_sampling")] == [
        f"xllm_sampling/port/{phase}" for phase in ("apply", "parity", "gate", "commit")]


SLEEPY_GATE = """
import os, time


def test_gate(benchmark):
    benchmark.pedantic(time.sleep, args=(float(os.environ["XLLM_TEST_GATE_SLEEP"]),), rounds=5)
"""


def test_gate_fails_on_a_regression_against_the_previous_stored_run(fresh_target, make_series, tmp_path, monkeypatch,
                                                                      capsys):
    gate_file = tmp_path / "sleepy_gate.py"
    gate_file.write_text(SLEEPY_GATE)
    manifest = (SERIES_DIR / "nvtx" / "manifest.toml").read_text()
    for key, path in (("parity", "verify/nvtx/test_parity.py"), ("rollback", "rollback/nvtx.sh")):
        manifest = manifest.replace(f'{key} = "{path}"', f'{key} = "{SERIES_DIR.parent / path}"')
    manifest = manifest.replace('gate = "verify/nvtx/test_gate.py"', f'gate = "{gate_file}"')
    manifest = manifest.replace('cpu = "median:100%"', 'cpu = "median:50%"')
    series = make_series(["nvtx"], manifest_text={"nvtx": manifest})
    apply = ["apply", "--target", str(fresh_target), "--series", str(series)]
    revert = ["rollback", "--target", str(fresh_target), "--series", str(series), "--step", "nvtx", "--mode", "revert"]

    monkeypatch.setenv("XLLM_TEST_GATE_SLEEP", "0.01")
    assert run(apply) == 0  # the first run: nothing to compare with, stored
    assert run(revert) == 0
    monkeypatch.setenv("XLLM_TEST_GATE_SLEEP", "0.03")  # 3x slower than the stored run
    capsys.readouterr()
    assert run(apply) == 1
    err = capsys.readouterr().err
    assert "Performance has regressed" in err and "previous stored run" in err
    assert "Reverts-Step: nvtx" in log(fresh_target)[0]  # the failed application committed nothing
    history = fresh_target / ".git" / "xllm_port" / "benchmarks" / "nvtx"
    assert len(list(history.rglob("*.json"))) == 1  # a failed run never becomes the baseline
    assert run(apply) == 1  # still compared with the fast run
    monkeypatch.setenv("XLLM_TEST_GATE_SLEEP", "0.012")
    assert run(apply) == 0
    assert len(list(history.rglob("*.json"))) == 2


def test_the_drivers_test_tools_are_install_dependencies():
    """`pip install -e .` alone (the README's quick start) must let `xllm-port demo` run each
    step's parity test and benchmark gate, which are pytest and pytest-benchmark runs."""
    import re
    import tomllib

    from xllm_sampling.paths import PROJECT_ROOT

    deps = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() for d in deps}
    assert {"pytest", "pytest-benchmark"} <= names
