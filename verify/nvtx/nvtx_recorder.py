"""Build, load and read the NVTX recorder (``nvtx_recorder.c``): NVTX checked without a profiler.

:func:`build` compiles the injection library with the system C compiler; :func:`environment`
gives the variables that make a child process load it; :func:`read` returns what each process
recorded, :func:`tree` nests one process's ranges of one domain and :func:`names` lists a tree's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from xllm_sampling import kernels

SOURCE = Path(__file__).with_name("nvtx_recorder.c")


def include_dir() -> str | None:
    """A folder holding ``nvtx3/nvToolsExt.h``: the nvidia pip packages', else the CUDA toolkit's."""
    home = kernels.cuda_home()
    candidates = kernels.extra_include_paths() + ([str(Path(home) / "include")] if home else [])
    return next((c for c in candidates if (Path(c) / "nvtx3" / "nvToolsExt.h").exists()), None)


def build(dest: Path) -> Path:
    """Compile the recorder into ``dest``; raises RuntimeError naming what is missing."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    include = include_dir()
    if cc is None or include is None:
        raise RuntimeError(f"cannot build the NVTX recorder: C compiler {cc or 'missing'}, nvtx3 headers {include or 'missing'}")
    library = dest / "libnvtx_recorder.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", f"-I{include}", str(SOURCE), "-o", str(library)],
                   check=True, capture_output=True, text=True)
    return library


def environment(library: Path, prefix: Path) -> dict:
    """os.environ plus the variables that make NVTX in a child process record to ``prefix``.<pid>."""
    return dict(os.environ, NVTX_INJECTION64_PATH=str(library), XLLM_NVTX_RECORD=str(prefix))


def read(prefix: Path) -> dict[int, list[tuple[str, ...]]]:
    """{pid: [("init",) | ("push", domain, message) | ("pop", domain), ...]} for every process that recorded."""
    records = {}
    for path in sorted(prefix.parent.glob(prefix.name + ".*")):
        events = [tuple(line.split("\t"))[:1] if line.startswith("init") else tuple(line.split("\t"))
                  for line in path.read_text().splitlines()]
        records[int(path.suffix[1:])] = events
    return records


def tree(events: list[tuple[str, ...]], domain: str) -> list[tuple[str, list]]:
    """The ranges of ``domain`` nested as [(message, [children...]), ...]; raises on a bad nesting."""
    root: list = []
    stack = [root]
    for event in events:
        if event[0] == "init" or event[1] != domain:
            continue
        if event[0] == "push":
            children: list = []
            stack[-1].append((event[2], children))
            stack.append(children)
        else:
            if len(stack) == 1:
                raise AssertionError(f"pop of {domain} with no open range")
            stack.pop()
    if len(stack) != 1:
        raise AssertionError(f"{len(stack) - 1} range(s) of {domain} left open")
    return root


def names(nodes: list[tuple[str, list]]) -> list[str]:
    """Every range name of a :func:`tree`, depth first."""
    return [n for name, children in nodes for n in (name, *names(children))]
