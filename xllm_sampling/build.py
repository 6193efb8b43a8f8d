"""Build the CUDA extensions: ``python -m xllm_sampling.build --check`` compiles every step's sources
under ``csrc/`` for sm_90 with no GPU needed (CI runs it: a kernel that does not compile fails CI)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from . import kernels
from .paths import CSRC_DIR


def steps_with_sources() -> list[str]:
    """Every step folder under ``csrc/`` that holds CUDA or C++ sources."""
    return sorted(p.name for p in CSRC_DIR.iterdir() if p.is_dir() and kernels.sources(p.name))


def _cudart_link_dir(scratch: Path) -> list[str]:
    """Linker flags finding libcudart where a bare toolkit has none: the nvidia pip package ships
    only ``libcudart.so.13``, so link against it through a ``libcudart.so`` link in ``scratch``."""
    home = kernels.cuda_home()
    if home and any((Path(home) / lib / "libcudart.so").exists() for lib in ("lib64", "lib")):
        return []
    for include in kernels.extra_include_paths():
        found = sorted((Path(include).parent / "lib").glob("libcudart.so.*"))
        if found:
            (scratch / "libcudart.so").symlink_to(found[-1])
            return [f"-L{scratch}"]
    return []


def check(arch: str = "9.0") -> int:
    """Compile and link each step's extension for ``arch`` in a scratch build folder; 0 if all built."""
    failed = []
    with tempfile.TemporaryDirectory() as build_dir:
        os.environ["TORCH_EXTENSIONS_DIR"] = build_dir
        ldflags = _cudart_link_dir(Path(build_dir))
        for step in steps_with_sources():
            start = time.perf_counter()
            try:
                kernels.build(step, arch, verbose=False, extra_ldflags=ldflags)
                print(f"built {step} for sm_{arch.replace('.', '')} in {time.perf_counter() - start:.0f} s", flush=True)
            except Exception as e:  # noqa: BLE001 - report every step's failure, then fail
                failed.append(step)
                print(f"FAILED {step}: {e}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m xllm_sampling.build", description=__doc__)
    ap.add_argument("--check", action="store_true", help="compile every step for --arch, GPU or not")
    ap.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST value (default 9.0: sm_90)")
    args = ap.parse_args()
    if not args.check:
        ap.error("nothing to do: pass --check")
    sys.exit(check(args.arch))


if __name__ == "__main__":
    main()
