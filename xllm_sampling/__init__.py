"""xllm_sampling: fast sampling ops for LLM inference engines, each behind a runtime flag.

The seven steps, in the order the series applies them:

1. :func:`logit_softmax` - fused temperature + softmax / log-softmax;
2. :func:`air_topk_last_dim` - radix-select top-k with workspace and output caches;
3. :func:`sample` - sorting-free sampling with a counter-based generator;
4. :func:`beam_search_step` - one beam-search step (transformers' semantics) on device state;
5. :class:`GraphRunner` - CUDA-graph capture of the sampling step (:class:`StaticStep`: of a
   model's decode step);
6. :mod:`xllm_sampling.nvtx` - NVTX ranges (flag ``nvtx``, off by default);
7. :func:`rejection_sample` - speculative decoding's rejection sampler (a torch loop, the loop
   under ``torch.compile``, one CUDA kernel for the whole batch).

See :mod:`xllm_sampling.flags` for turning each one on or off at runtime. The ops (and torch)
are imported on first use, so that ``xllm-port --help`` or ``flags`` start at once, and
importing the package never imports the porting driver's GitPython or pytest.
"""
from importlib import import_module

from . import flags

_EXPORTS = {
    "logit_softmax": "logit_softmax",
    "air_topk_last_dim": "air_topk",
    "clear_caches": "air_topk",
    "counters": "air_topk",
    "sample": "sampler",
    "SampleOutput": "sampler",
    "beam_search_step": "beam_search",
    "BeamSearchState": "beam_search",
    "GraphRunner": "cuda_graph",
    "graph_counters": "cuda_graph",
    "StaticStep": "cuda_graph",
    "rejection_sample": "spec_decode",
    "SpecDecodeOutput": "spec_decode",
}
__all__ = ["flags", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xllm_sampling' has no attribute {name!r}")
    value = getattr(import_module(f".ops.{module}", __name__), name)
    globals()[name] = value  # later look-ups (and monkeypatching) see a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


flags.warn_unknown_environment()
