"""Packaging: the wheel carries the resource folders the program reads (flag definitions, CUDA
sources, the series, the parity tests and gates, the rollback scripts, the reference engine)
under ``xllm_sampling/_data/``, while the repository keeps them at its top level. Editable
installs read them from the source tree instead (see ``xllm_sampling/paths.py``)."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RESOURCES = ("flags", "csrc", "patches", "verify", "rollback", "target")


class BuildWithResources(build_py):
    """build_py that also copies the resource folders into the built package."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        root = Path(__file__).resolve().parent
        data = Path(self.build_lib) / "xllm_sampling" / "_data"
        for name in RESOURCES:
            target = data / name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(root / name, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithResources})
