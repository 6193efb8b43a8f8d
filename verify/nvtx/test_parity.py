"""Parity of step nvtx, seen through NVTX itself: the decode loop runs in a child process with the
recorder injection library (nvtx_recorder.c, built here with the system C compiler) loaded through
NVTX_INJECTION64_PATH, and the ranges it recorded are checked, name by name and nesting by nesting.

Which ranges sit inside a decode step depends on the steps applied before this one (with the
sampler step: sampler > logit_softmax, air_topk); the expected tree is what the same decode asks
of the nvtx package in this process, and must be the same in every step."""
import os
import subprocess
import sys

import nvtx as nvtx_package
import pytest

import nvtx_recorder
from xllm_sampling.nvtx import DOMAIN, STAGES

# One decode of three steps, run in a child process with the recorder (argv: device, nvtx, graphs)
# and in this process with the nvtx package's push/pop replaced.
DECODE = """
import torch
from engine.decode import Engine
from engine.sampling import SamplingParams
from xllm_sampling import flags


def decode(device, flag, graphs):
    engine = Engine(device=device)
    params = SamplingParams(torch.full((2,), 0.8), 20, 0.9, 0.0, torch.arange(2, dtype=torch.int64))
    with flags.override(nvtx=flag, cuda_graph=graphs):
        engine.generate(torch.randint(1, engine.cfg.vocab, (2, 4)), 3, params)
"""
CHILD = DECODE + """
import sys
decode(sys.argv[1], sys.argv[2] == "on", sys.argv[3] == "on")
"""


def requested_tree(monkeypatch):
    """The decode's ranges as this process asks the nvtx package for them (push/pop replaced)."""
    events = []
    monkeypatch.setattr(nvtx_package, "push_range", lambda message, domain: events.append(("push", domain, message)))
    monkeypatch.setattr(nvtx_package, "pop_range", lambda domain: events.append(("pop", domain)))
    namespace = {}
    exec(DECODE, namespace)  # noqa: S102 - the same decode as the child's
    namespace["decode"]("cpu", True, False)
    return nvtx_recorder.tree(events, DOMAIN)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    try:
        return nvtx_recorder.build(tmp_path_factory.mktemp("nvtx"))
    except RuntimeError as e:
        pytest.skip(str(e))


def decode(library, tmp_path, device="cpu", flag=True, graphs=False):
    """Run three decode steps in a child process with the recorder loaded; what each process recorded."""
    prefix = tmp_path / "record"
    env = nvtx_recorder.environment(library, prefix)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["XLLM_PORT_TARGET"], env.get("PYTHONPATH")]))
    argv = [device, "on" if flag else "off", "on" if graphs else "off"]
    subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, check=True, timeout=600)
    return nvtx_recorder.read(prefix)


def test_flag_on_records_each_decode_step_with_its_nested_ranges(library, tmp_path, monkeypatch):
    (events,) = decode(library, tmp_path).values()
    assert events[0] == ("init",)
    assert {e[1] for e in events[1:]} == {DOMAIN}
    steps = nvtx_recorder.tree(events, DOMAIN)
    assert len(steps) == 3 and all(step == steps[0] for step in steps)
    assert steps[0][0] == f"{DOMAIN}/decode_step"
    assert set(nvtx_recorder.names(steps)) <= {f"{DOMAIN}/{stage}" for stage in STAGES}
    assert steps == requested_tree(monkeypatch)


def test_flag_off_calls_no_nvtx_function(library, tmp_path):
    assert decode(library, tmp_path, flag=False) == {}  # NVTX was never even initialised


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay_are_ranges(library, tmp_path):
    (events,) = decode(library, tmp_path, device="cuda", graphs=True).values()
    steps = nvtx_recorder.tree(events, DOMAIN)
    assert [name for name, _ in steps] == [f"{DOMAIN}/decode_step"] * 3
    inside = nvtx_recorder.names(steps)
    assert f"{DOMAIN}/cuda_graph/capture" in inside and inside.count(f"{DOMAIN}/cuda_graph/replay") >= 2
