"""Shared fixtures: a fresh reference target, test-only series, and the visible skip of cuda tests."""
import importlib.util
import shutil
import zlib
from pathlib import Path

import pytest
import torch

from xllm_sampling import gate
from xllm_sampling.paths import PROJECT_ROOT, SERIES_DIR
from xllm_sampling.port import demo


def pytest_collection_modifyitems(config, items):
    gate.skip_cuda_tests_without_gpu(items)


@pytest.fixture(autouse=True)
def seeded(request):
    """Seed torch's generators from the test's name: the same inputs on every run and machine."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def fresh_target(tmp_path):
    """The reference engine as a new git repository on feat/sampler_optim."""
    return demo.create_target(tmp_path / "target")


def tree_snapshot(path: Path) -> dict:
    """Every file under ``path`` outside .git, with its bytes: to prove a target is unchanged."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(path).parts}


@pytest.fixture
def make_series(tmp_path):
    """make_series(steps, patches={step: text}, manifest_extra={step: text}): a test-only series folder."""
    def build(steps, patches=None, manifest_text=None, name="series"):
        folder = tmp_path / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        (folder / "series").write_text("\n".join(steps) + "\n")
        for step in steps:
            (folder / step).mkdir()
            patch = (patches or {}).get(step, (SERIES_DIR / step / f"{step}.patch").read_text())
            (folder / step / f"{step}.patch").write_text(patch)
            text = (manifest_text or {}).get(step)
            if text is None:
                text = (SERIES_DIR / step / "manifest.toml").read_text()
                for key in ("parity", "gate", "rollback"):
                    text = text.replace(f'{key} = "', f'{key} = "{PROJECT_ROOT}/')
            (folder / step / "manifest.toml").write_text(text)
        return folder

    return build


@pytest.fixture(scope="session")
def nvtx_recorder():
    """verify/nvtx/nvtx_recorder.py (the NVTX injection recorder's helpers), imported from its file."""
    spec = importlib.util.spec_from_file_location("nvtx_recorder", PROJECT_ROOT / "verify" / "nvtx" / "nvtx_recorder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
