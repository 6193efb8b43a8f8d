"""Shared by the *_variants probes: build every revision's extension side by side (one process
each, the calling script re-run with a flag set), then load them all; and time a call."""
import os
import statistics
import subprocess
import sys


def build_side_by_side(names, build, flag: str):
    """{name: build(name)} for every name, each first built in its own process (the calling script
    re-run with ``flag`` in its environment and that one name), so that the builds run in
    parallel. In such a build process: build its one name and return None (the caller stops)."""
    if len(names) == 1 and os.environ.get(flag):
        build(names[0])
        return None
    procs = [subprocess.Popen([sys.executable, sys.argv[0], n], env=os.environ | {flag: "1"}) for n in names]
    assert all(p.wait() == 0 for p in procs)
    return {n: build(n) for n in names}


def median_us(f, timer, reps: int) -> float:
    """Median of ``reps`` timings of ``f`` by ``timer`` (gate.Timer), after one untimed call."""
    f()
    return statistics.median(timer(f) for _ in range(reps))
