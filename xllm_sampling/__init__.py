"""xllm_sampling: fast sampling ops for LLM inference engines, each behind a runtime flag.

The six steps, in the order the series applies them:

1. :func:`logit_softmax` - fused temperature + softmax / log-softmax;
2. :func:`air_topk_last_dim` - radix-select top-k with workspace and output caches;
3. :func:`sample` - sorting-free sampling with a counter-based generator;
4. :func:`beam_search_step` - fused log-softmax + score + top-2W beam step;
5. :class:`GraphRunner` - CUDA-graph capture of the sampling step;
6. :mod:`xllm_sampling.nvtx` - NVTX ranges (flag ``nvtx``, off by default).

See :mod:`xllm_sampling.flags` for turning each one on or off at runtime.
"""
from . import flags
from .air_topk import air_topk_last_dim, clear_caches, counters
from .beam_search import BeamStep, beam_search_step
from .cuda_graph import GraphRunner
from .logit_softmax import logit_softmax
from .sampler import SampleOutput, sample

__all__ = [
    "flags", "logit_softmax", "air_topk_last_dim", "clear_caches", "counters", "sample", "SampleOutput",
    "beam_search_step", "BeamStep", "GraphRunner",
]
flags.warn_unknown_environment()
