"""The CUDA-graph counters a process publishes beside its flags file, and their reading back
(torch-free: ``xllm-port status`` reads them without importing torch).

A process whose flags come from a target's flags file (``XLLM_SAMPLING_FLAGS_FILE``) writes
``graph_counters/<pid>.json`` beside it (``xllm_sampling.ops.cuda_graph.publish``): its pid, when
it wrote, and each GraphRunner name's captures, replays and eager calls. The verify runs of
``xllm-port`` (processes with that flags file too) publish theirs as well; the folder keeps the
newest KEEP files plus those of running processes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

DIR_NAME = "graph_counters"
KEEP = 8  # files of exited processes beyond the newest KEEP are removed when a process first publishes


def path_for(flags_file: str | os.PathLike, pid: int) -> Path:
    """The counters file of process ``pid`` whose flags file is ``flags_file``."""
    return Path(flags_file).parent / DIR_NAME / f"{pid}.json"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read(folder: Path) -> list[dict]:
    """Every process's published counters under ``folder`` (the flags file's folder), newest
    first: ``{"pid", "running", "updated" (seconds since the epoch), "runners": {name: counts}}``.
    Files that cannot be read or parsed are left out."""
    rows = []
    for path in sorted((folder / DIR_NAME).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            rows.append({"pid": int(data["pid"]), "running": _running(int(data["pid"])),
                         "updated": float(data["updated"]), "runners": dict(data["runners"])})
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(rows, key=lambda r: -r["updated"])


def prune(counters_dir: Path, keep: int = KEEP) -> None:
    """Remove the files of exited processes beyond the newest ``keep`` in ``counters_dir``."""
    try:
        files = sorted(counters_dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for path in files[keep:]:
        try:
            if not path.stem.isdigit() or not _running(int(path.stem)):
                path.unlink()
        except OSError:
            continue
