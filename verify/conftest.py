"""Fixtures of the per-step parity tests and gates: the target engine under test and the device.

The driver runs these tests with ``XLLM_PORT_TARGET`` naming the target repository, whose
``engine`` package is then importable. Tests marked ``cuda`` are skipped, visibly, without a GPU.
"""
import os
import sys

import pytest
import torch

from xllm_sampling import gate

TARGET = os.environ.get("XLLM_PORT_TARGET")
if not TARGET:
    raise pytest.UsageError("XLLM_PORT_TARGET is not set: run these through `xllm-port verify --target DIR`")
sys.path.insert(0, TARGET)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped, visibly, without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def gate_device():
    return gate.device_kind()


@pytest.fixture
def gate_threshold():
    value = gate.threshold()
    if value is None:
        pytest.skip(f"the manifest sets no gate threshold for {gate.device_kind()}")
    return value


@pytest.fixture
def spy(monkeypatch):
    """spy(module, name): count the calls made to ``module.name`` from now on."""
    def install(module, name):
        calls = []
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
        return calls

    return install
