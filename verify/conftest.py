"""Fixtures of the per-step parity tests and gates: the target engine under test and the device.

The driver runs these tests with ``XLLM_PORT_TARGET`` naming the target repository, whose
``engine`` package is then importable. Tests marked ``cuda`` are skipped, visibly, without a GPU.
"""
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

from xllm_sampling import flags, gate

TARGET = os.environ.get("XLLM_PORT_TARGET")
if not TARGET:
    raise pytest.UsageError("XLLM_PORT_TARGET is not set: run these through `xllm-port verify --target DIR`")
sys.path.insert(0, TARGET)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped, visibly, without one)")


def pytest_collection_modifyitems(config, items):
    gate.skip_cuda_tests_without_gpu(items)


@pytest.fixture(autouse=True)
def seeded(request):
    """Seed torch's generators from the test's name: every random input is the same on every run
    and every machine, and each test draws its own."""
    torch.manual_seed(zlib.crc32(f"{Path(str(request.node.fspath)).parent.name}/{request.node.name}".encode()))


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
def check_gate(benchmark, gate_threshold):
    """check_gate(run, **measure_options): time run(False) (original) against run(True) (fast)
    interleaved, keep the figures in pytest-benchmark's record, and assert the ratio is under
    the manifest's threshold for this device. ``run`` may also be a dict of named runs, one per
    configuration users run: each is timed, all are recorded, and the worst ratio must pass."""
    def check(run, **options):
        runs = run if isinstance(run, dict) else {"": run}
        results = {name: gate.measure(lambda r=r: r(False), lambda r=r: r(True), **options) for name, r in runs.items()}
        worst = max(results, key=lambda name: results[name].ratio)
        gate.record(benchmark, results[worst], lambda: runs[worst](True),
                    {name: result.ratio for name, result in results.items()} if len(runs) > 1 else None)
        where = f" ({worst}, the worst configuration)" if worst else ""
        assert results[worst].ratio < gate_threshold, \
            f"fast/original = {results[worst].ratio:.3f}{where}, threshold {gate_threshold}"

    return check


@pytest.fixture
def decode_with_flag(gate_device):
    """decode_with_flag(flag) -> run(on): a 16-token decode of 8 requests with ``flag`` on or off."""
    from engine.decode import Engine
    from engine.sampling import SamplingParams

    engine = Engine(device=gate_device)
    batch = 8
    prompts = torch.randint(1, engine.cfg.vocab, (batch, 6))
    params = SamplingParams(torch.full((batch,), 0.8), 20, 0.9, 0.0, torch.arange(batch, dtype=torch.int64))

    def with_flag(flag):
        def run(on):
            with flags.override(**{flag: on}):
                engine.generate(prompts, 16, params)

        return run

    return with_flag


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
