"""``xllm-port demo``: the shipped reference engine as a fresh git repository, then the whole series."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import git

from ..paths import TARGET_TEMPLATE
from .errors import UsageError
from .target import BRANCH


def create_target(directory: str | Path | None) -> Path:
    """Copy the reference engine into ``directory`` (new or empty; a temporary one if None) as a git
    repository whose branch ``feat/sampler_optim`` starts at the engine's first commit."""
    if directory is None:
        path = Path(tempfile.mkdtemp(prefix="xllm-demo-")) / "refengine"
    else:
        path = Path(directory)
        if path.exists() and any(path.iterdir()):
            raise UsageError(f"--dir {path}: exists and is not empty")
    shutil.copytree(TARGET_TEMPLATE, path, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    with git.Repo.init(path, initial_branch="main") as repo:
        with repo.config_writer() as cfg:
            cfg.set_value("user", "name", "xllm-port demo")
            cfg.set_value("user", "email", "demo@xllm-sampling.invalid")
        repo.git.add("-A")
        repo.git.commit("-q", "-m", "refengine: reference decode engine with its original torch sampler")
        repo.git.checkout("-q", "-b", BRANCH)
    return path
