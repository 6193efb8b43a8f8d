"""Step 5, ``cuda_graph``: run a sampling step through CUDA graphs, one per batch-size bucket,
and a model's decode step through one graph (:class:`StaticStep`).

:class:`GraphRunner` wraps a function of tensors whose first dim is the batch. On a CUDA
device, with the ``cuda_graph`` flag on, a batch is padded up to its bucket; the first call of
a bucket captures a graph, later calls copy the inputs into the graph's static inputs and
replay it. It runs eagerly on CPU, for batches above ``cuda_graph_max_batch``, with the flag
off, and after a capture failure (one warning per bucket, and the step is run eagerly, so no
token is lost). Graphs are keyed by the step flags' values as well (``flags.path_state``): a
flag toggled while graphs exist takes effect at the next call, through a graph captured for it.
Capture is logged at INFO, replay at DEBUG, by the logger ``xllm_sampling.cuda_graph``.

Memory: all the graphs of one runner (every bucket and flags state) are captured into one
private memory pool per device (``GraphPools``), so a graph's temporaries reuse the blocks its
runner's earlier graphs freed instead of each graph holding its own; a graph's outputs are
only valid until the runner's next call, whichever bucket that call replays.

Counters: each runner counts its captures, replays and eager calls; :func:`graph_counters` adds them up
by runner name for the whole process. A process whose flags come from a target's flags file
(``XLLM_SAMPLING_FLAGS_FILE``, e.g. the target's ``.git/xllm_port/flags.toml``) also publishes them beside that file,
in ``graph_counters/<pid>.json`` (at each capture or failed capture, at most once a second
otherwise, and at exit), where ``xllm-port status`` shows them.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import time
import warnings
import weakref
from pathlib import Path
from typing import Callable

import torch

from .. import flags, nvtx, published_counters

PUBLISH_EVERY_S = 1.0
_runners: weakref.WeakSet = weakref.WeakSet()
_last_publish = [0.0]


def graph_counters() -> dict[str, dict[str, int]]:
    """This process's live runners' counters by runner name (runners of one name added):
    ``{"captures": ..., "replays": ..., "eager_calls": ...}``."""
    out: dict[str, dict[str, int]] = {}
    for runner in list(_runners):
        c = out.setdefault(runner.name, {"captures": 0, "replays": 0, "eager_calls": 0})
        c["captures"] += runner.captures
        c["replays"] += runner.replays
        c["eager_calls"] += runner.eager_calls
    return out


def counters_file() -> Path | None:
    """Where this process publishes its counters: ``graph_counters/<pid>.json`` beside the flags
    file named by ``XLLM_SAMPLING_FLAGS_FILE``; None without one."""
    flags_file = flags._environ_get(flags.FLAGS_FILE_ENV)
    return published_counters.path_for(flags_file, os.getpid()) if flags_file else None


def publish(force: bool = False) -> None:
    """Write :func:`graph_counters` to :func:`counters_file` (at most once per PUBLISH_EVERY_S unless
    ``force``). Best effort: a file that cannot be written never fails a decode step."""
    now = time.monotonic()
    if not force and now - _last_publish[0] < PUBLISH_EVERY_S:
        return
    path = counters_file()
    if path is None:
        return
    first = _last_publish[0] == 0.0
    _last_publish[0] = now
    try:
        path.parent.mkdir(exist_ok=True)
        if first:
            published_counters.prune(path.parent)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "updated": time.time(), "runners": graph_counters()}))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("graph counters not published to %s: %s", path, e)


atexit.register(publish, True)

log = logging.getLogger("xllm_sampling.cuda_graph")  # the name the docs give users
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_GRAPH_FLAGS = ("cuda_graph", "cuda_graph_max_batch")  # whether a GraphRunner uses graphs, up to which batch
_FLAGS_READ = _GRAPH_FLAGS + ("nvtx",) + flags.path_flags()  # a GraphRunner call's flags, read once


class _Captured:
    def __init__(self, graph, inputs, output):
        self.graph, self.inputs, self.output = graph, inputs, output


class GraphPools:
    """One private CUDA-graph memory pool per device, shared by the captures of one runner.

    Graphs sharing a pool must not run concurrently, and an output of one may be overwritten by
    the replay of another (its blocks may be the other's temporaries): true of one runner's
    graphs, replayed one at a time on the caller's stream, each output read before the next call.
    """

    def __init__(self):
        self._handles: dict[torch.device, tuple] = {}

    def capture(self, graph: torch.cuda.CUDAGraph):
        """``torch.cuda.graph(graph)`` on the current device's pool (made on first use)."""
        device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._handles:
            self._handles[device] = torch.cuda.graph_pool_handle()
        return torch.cuda.graph(graph, pool=self._handles[device])


def _map_output(output, fn):
    if isinstance(output, torch.Tensor):
        return fn(output)
    values = [None if t is None else fn(t) for t in output]
    return type(output)(*values) if hasattr(output, "_fields") else type(output)(values)


def _end_generator_capture() -> None:
    """A failed capture ends before torch closes its capture of the CUDA generators, which then
    refuse every later random op outside a graph ("Offset increment outside graph capture"). An
    empty capture opens and closes it again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the graph is empty
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            pass
        graph.reset()


def _capture_failed(what: str, error: Exception) -> None:
    """One warning that the capture of ``what`` failed and the step runs eagerly; the device left
    usable (its work finished, torch's generators out of capture mode)."""
    warnings.warn(f"xllm_sampling: CUDA graph capture of {what} failed, running it eagerly: {error}", RuntimeWarning,
                  stacklevel=5)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        _end_generator_capture()


class StaticStep:
    """Replay ``fn()`` from one CUDA graph per value of the step flags: a step with no arguments
    that works on tensors it holds (static inputs the caller refills before each call, a KV cache
    it writes in place), such as a model's decode step, returning a tensor or a tuple of tensors.

    The first call with a flags state runs ``fn`` eagerly (the warm-up: kernels built, workspaces
    made), the second captures it and replays the graph, later calls replay it. The output is the
    graph's own buffer, rewritten by the next call: read or copy it before then. Eager on CPU
    (``cuda`` False), with the ``cuda_graph`` flag off, and after a capture failure (one warning,
    the call run eagerly). Counted like a GraphRunner (``graph_counters``); its graphs share one
    memory pool (``GraphPools``).
    """

    def __init__(self, fn: Callable, cuda: bool, name: str = "step"):
        self.fn, self.cuda, self.name = fn, cuda, name
        self._graphs: dict[tuple, _Captured | None] = {}
        self._pools = GraphPools()
        self._warm: set[tuple] = set()
        self.captures = self.replays = self.eager_calls = 0
        _runners.add(self)

    def __call__(self):
        out = self._run()
        publish()
        return out

    def _run(self):
        key = flags.path_state()
        if not (self.cuda and flags.enabled("cuda_graph")) or key not in self._warm:
            self._warm.add(key)
            self.eager_calls += 1
            return self.fn()
        if key not in self._graphs:
            self._graphs[key] = self._capture()
            publish(force=True)
        captured = self._graphs[key]
        if captured is None:
            self.eager_calls += 1
            return self.fn()
        with nvtx.range("cuda_graph/replay"):
            captured.graph.replay()
            self.replays += 1
            return captured.output

    def _capture(self) -> _Captured | None:
        with nvtx.range("cuda_graph/capture"):
            start = time.perf_counter()
            try:
                graph = torch.cuda.CUDAGraph()
                with self._pools.capture(graph):
                    output = self.fn()
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
                _capture_failed(self.name, e)
                return None
            self.captures += 1
            log.info("%s: captured CUDA graph in %.1f ms", self.name, 1e3 * (time.perf_counter() - start))
            return _Captured(graph, (), output)


class GraphRunner:
    """Replay ``fn(*tensors)`` from per-bucket CUDA graphs; eager where no graph can be used.

    ``fn`` must be a pure function of its tensor arguments (any other setting baked in by a
    closure) and return a tensor or a tuple / NamedTuple of tensors whose first dim is the batch.
    Outputs are returned as fresh tensors, or with ``copy_outputs`` False as the graph's own
    buffers (views of the first ``batch`` rows), rewritten by the runner's next call, whichever its
    bucket (all the runner's graphs share one memory pool, ``GraphPools``): read or copy them
    before then (a copy per output costs more host time than the replay itself at batch 1).

    A call copies each input into its bucket's static input unless it is that static input
    already: :meth:`static_inputs` hands out those buffers, so that a caller who keeps passing them
    (and changes them in place between calls, if it likes) pays no copy. The graphs of one bucket
    (one per flags state) share its static inputs. ``advance``: positions of inputs (integer
    tensors, e.g. sampling positions) that every call increments by one after ``fn`` ran -- in the
    graph when it replays, in place in the caller's tensor in every case -- so that a caller who
    passes the same tensor each step draws new numbers with no host work.
    """

    def __init__(self, fn: Callable, buckets=DEFAULT_BUCKETS, name: str = "step", advance=(), copy_outputs=True):
        self.fn, self.buckets, self.name, self.advance = fn, tuple(sorted(buckets)), name, tuple(advance)
        self.copy_outputs = copy_outputs
        self._static: dict[tuple, list[torch.Tensor]] = {}  # (bucket, input signature) -> static inputs
        self._graphs: dict[tuple, _Captured | None] = {}  # (bucket, signature, flags state) -> graph
        self._pools = GraphPools()
        self.captures = self.replays = self.eager_calls = 0
        _runners.add(self)

    def __call__(self, *inputs: torch.Tensor):
        out = self._run(*inputs)
        publish()
        return out

    def static_inputs(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tensors to pass at every call for batches shaped like ``inputs``: their bucket's
        static inputs (views of the first ``batch`` rows) holding ``inputs``' values. ``inputs``
        themselves where no graph is used now (CPU, the ``cuda_graph`` flag off, a batch above
        every bucket); passing those later is correct too, with a copy per call."""
        signature = self._signature(inputs, *flags.values(_GRAPH_FLAGS))
        if signature is None:
            return inputs
        batch, made = inputs[0].shape[0], signature not in self._static
        static = self._static_for(signature, inputs)  # new ones hold inputs' values already
        if not made:
            for s, t in zip(static, inputs):
                s[:batch].copy_(t, non_blocking=True)  # from the host too: not waiting for queued work
        return tuple(s[:batch] for s in static)

    def _signature(self, inputs, graphs_on: bool, limit: int) -> tuple | None:
        """(bucket, device, each input's trailing shape and dtype), or None where no graph is used
        (``graphs_on``, ``limit``: the flags cuda_graph and cuda_graph_max_batch)."""
        first = inputs[0]
        if not (graphs_on and first.is_cuda):
            return None
        batch = first.shape[0]
        bucket = next((b for b in self.buckets if b >= batch), None)
        if bucket is None or bucket > limit:
            return None
        return (bucket, first.device, *[(t.shape[1:], t.dtype) for t in inputs])

    def _static_for(self, signature: tuple, inputs) -> list[torch.Tensor]:
        """The static inputs of ``signature`` (on its device), made on first use from ``inputs``
        (rows past the batch padded with its first row, a valid input)."""
        static = self._static.get(signature)
        if static is None:
            (bucket, device), batch = signature[:2], inputs[0].shape[0]
            static = []
            for t in inputs:
                s = torch.empty((bucket,) + tuple(t.shape[1:]), dtype=t.dtype, device=device)
                s[:batch].copy_(t)
                s[batch:].copy_(t[:1].expand_as(s[batch:]))
                static.append(s)
            self._static[signature] = static
        return static

    def _eager(self, inputs):
        self.eager_calls += 1
        out = self.fn(*inputs)
        for i in self.advance:
            inputs[i].add_(1)
        return out

    def _run(self, *inputs: torch.Tensor):
        graphs_on, limit, ranges, *path_state = flags.values(_FLAGS_READ)
        signature = self._signature(inputs, graphs_on, limit)
        if signature is None:
            return self._eager(inputs)
        # A graph replays the code path the flags chose at its capture: toggling a step's flag
        # selects (or captures) another graph, and toggling it back replays the first again.
        key = (signature, tuple(path_state))
        captured = self._graphs.get(key, False)
        if captured is False:
            captured = self._graphs[key] = self._capture(signature, inputs)
            publish(force=True)
        if captured is None:
            return self._eager(inputs)
        batch = inputs[0].shape[0]
        with nvtx.range_if(ranges, "cuda_graph/replay"):
            copied = []
            for i, (s, t) in enumerate(zip(captured.inputs, inputs)):
                if t.data_ptr() != s.data_ptr() or t.stride() != s.stride():
                    s[:batch].copy_(t, non_blocking=True)  # from the host too: not waiting for queued work
                    copied.append(i)
            captured.graph.replay()
            for i in self.advance:
                if i in copied:  # the graph advanced its own copy: the caller's tensor too
                    inputs[i].add_(1)
            self.replays += 1
            log.debug("%s: replayed graph for bucket %d (batch %d)", self.name, signature[0], batch)
            if self.copy_outputs:
                return _map_output(captured.output, lambda t: t[:batch].clone())
            return captured.output if batch == signature[0] else _map_output(captured.output, lambda t: t[:batch])

    def _capture(self, signature: tuple, inputs) -> _Captured | None:
        bucket = signature[0]
        with nvtx.range("cuda_graph/capture"):
            start = time.perf_counter()
            static = self._static_for(signature, inputs)
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):  # warm up: build kernels, caches and workspaces outside the capture
                        self.fn(*static)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with self._pools.capture(graph):
                    output = self.fn(*static)
                    for i in self.advance:
                        static[i].add_(1)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
                _capture_failed(f"{self.name} for batch bucket {bucket}", e)
                return None
            self.captures += 1
            log.info("%s: captured CUDA graph for batch bucket %d in %.1f ms", self.name, bucket,
                     1e3 * (time.perf_counter() - start))
            return _Captured(graph, static, output)
