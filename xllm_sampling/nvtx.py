"""NVTX ranges around each stage, named ``xllm_sampling/<stage>`` in the domain ``xllm_sampling``.

With the ``nvtx`` flag off (the default) :func:`range` returns a shared no-op context manager
and no NVTX function is called at all.
"""
from __future__ import annotations

import contextlib
import functools

from . import flags

DOMAIN = "xllm_sampling"
STAGES = (
    "decode_step",
    "logit_softmax",
    "air_topk",
    "sampler",
    "beam_search",
    "spec_decode",
    "cuda_graph/capture",
    "cuda_graph/replay",
    "port/apply",
    "port/parity",
    "port/gate",
    "port/commit",
)
_NOOP = contextlib.nullcontext()


@functools.cache
def _nvtx():
    import nvtx as nvtx_package

    return nvtx_package


class _Range:
    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message

    def __enter__(self):
        _nvtx().push_range(self.message, domain=DOMAIN)
        return self

    def __exit__(self, *exc):
        _nvtx().pop_range(domain=DOMAIN)
        return False


def each(items, stage: str):
    """Yield the items of ``items``, each while its own range ``xllm_sampling/<stage>`` is open: a
    loop's iterations as ranges (``for step in nvtx.each(range(n), "decode_step"):``), the loop's
    body left as it is. The range closes when the next item is asked for, or when the loop ends
    or breaks (the generator is closed); the flag is read at each item."""
    for item in items:
        with range(stage):
            yield item


def range(stage: str):  # noqa: A001 - reads as nvtx.range("stage")
    """A context manager for the NVTX range ``xllm_sampling/<stage>``; a no-op while the flag is off."""
    return range_if(flags.enabled("nvtx"), stage)


def op_call(step: str) -> tuple[bool, contextlib.AbstractContextManager]:
    """What an op reads on every call, from one read of the flags (the flags file stat'ed once, not
    once per flag): whether flag ``step`` is on, and the NVTX range ``xllm_sampling/<step>`` to run
    the call in (a no-op while the ``nvtx`` flag is off). ``on, span = nvtx.op_call("sampler")``."""
    on, ranges = flags.values((step, "nvtx"))
    return bool(on), range_if(ranges, step)


def range_if(on: bool, stage: str):
    """:func:`range` with the ``nvtx`` flag's value already read."""
    if not on:
        return _NOOP
    if stage not in STAGES:
        raise ValueError(f"stage: unknown NVTX stage {stage!r}; known stages: {', '.join(STAGES)}")
    return _Range(f"{DOMAIN}/{stage}")
