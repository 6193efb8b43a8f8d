"""Just-in-time build of each step's CUDA sources in ``csrc/<step>/`` (torch cpp_extension + ninja).

:func:`load` builds a step's extension on first use (cached by torch under
``TORCH_EXTENSIONS_DIR``; a changed source rebuilds it) for the device's own architecture
(``sm_90`` on Hopper, PTX for others) and returns the module, or None when there is no CUDA
device or no compiler, so the op takes its torch path. That is said once, at debug level;
a source that fails to compile is a warning.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

from .paths import CSRC_DIR

log = logging.getLogger(__name__)
NVCC_FLAGS = ["-O3", "-lineinfo"]  # no fast-math: expf and division stay IEEE-accurate


def sources(step: str) -> list[Path]:
    """The CUDA/C++ sources of ``step``: every .cu and .cpp in ``csrc/<step>/``."""
    folder = CSRC_DIR / step
    return sorted(p for p in folder.glob("*") if p.suffix in (".cu", ".cpp"))


def cuda_home() -> str | None:
    """The CUDA toolkit root: ``CUDA_HOME``, else the folder above the ``nvcc`` on PATH."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def extra_include_paths() -> list[str]:
    """Headers torch includes that a bare toolkit may lack: the nvidia pip packages' include folders."""
    try:
        import nvidia
    except ImportError:
        return []
    roots = [Path(p) for p in nvidia.__path__]
    return [str(inc) for root in roots for inc in sorted(root.glob("cu*/include")) if inc.is_dir()]


def build(step: str, arch_list: str, verbose: bool = False, extra_ldflags: list[str] | None = None):
    """Compile and import ``step``'s extension for ``arch_list`` (a TORCH_CUDA_ARCH_LIST value)."""
    from torch.utils import cpp_extension

    home = cuda_home()
    if home is None:
        raise RuntimeError("no CUDA compiler: nvcc is not on PATH and CUDA_HOME is not set")
    os.environ.setdefault("CUDA_HOME", home)
    cpp_extension.CUDA_HOME = cpp_extension.CUDA_HOME or home
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    return cpp_extension.load(
        name=f"xllm_sampling_{step}",
        sources=[str(p) for p in sources(step)],
        extra_include_paths=[str(CSRC_DIR)] + extra_include_paths(),
        extra_cflags=["-O3"],
        extra_cuda_cflags=NVCC_FLAGS,
        extra_ldflags=extra_ldflags or [],
        verbose=verbose,
    )


@functools.cache
def load(step: str):
    """The compiled extension of ``step`` for the current CUDA device, or None (then use torch)."""
    import torch

    if not sources(step):
        return None
    if not torch.cuda.is_available():
        log.debug("xllm_sampling: no CUDA device; %s uses its torch path", step)
        return None
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}.{minor}" if (major, minor) == (9, 0) else f"{major}.{minor}+PTX"
    try:
        return build(step, arch)
    except RuntimeError as e:
        if cuda_home() is None:
            log.debug("xllm_sampling: %s; %s uses its torch path", e, step)
        else:
            log.warning("xllm_sampling: building %s failed, using its torch path: %s", step, e)
        return None
