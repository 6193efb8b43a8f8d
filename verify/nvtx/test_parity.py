"""Parity of step nvtx: with the flag on, each decode step is an xllm_sampling/decode_step range
holding the sampler's ranges; with it off, no NVTX function is called."""
import nvtx as nvtx_package
import pytest
import torch

from engine.decode import Engine
from engine.sampling import SamplingParams
from xllm_sampling import flags


@pytest.fixture
def recorded(monkeypatch):
    events = []
    monkeypatch.setattr(nvtx_package, "push_range", lambda message=None, **kw: events.append(("push", message, kw.get("domain"))))
    monkeypatch.setattr(nvtx_package, "pop_range", lambda **kw: events.append(("pop", None, kw.get("domain"))))
    return events


def decode(flag, steps=3):
    engine = Engine()
    params = SamplingParams(torch.full((2,), 0.8), 20, 0.9, 0.0, torch.arange(2, dtype=torch.int64))
    with flags.override(nvtx=flag, cuda_graph=False):
        engine.generate(torch.randint(1, engine.cfg.vocab, (2, 4)), steps, params)


def test_flag_on_emits_nested_ranges_per_step(recorded):
    decode(True, steps=3)
    pushes = [m for kind, m, _ in recorded if kind == "push"]
    assert pushes.count("xllm_sampling/decode_step") == 3
    assert all(domain == "xllm_sampling" for _, _, domain in recorded)
    depth, stack = 0, []
    for kind, message, _ in recorded:
        if kind == "push":
            if message != "xllm_sampling/decode_step":
                assert stack and stack[0] == "xllm_sampling/decode_step", f"{message} outside a decode step"
            stack.append(message)
        else:
            stack.pop()
        depth = max(depth, len(stack))
    assert not stack and depth >= 3  # decode_step > sampler > logit_softmax
    assert "xllm_sampling/sampler" in pushes and "xllm_sampling/logit_softmax" in pushes


def test_flag_off_calls_nothing(recorded):
    decode(False)
    assert recorded == []
