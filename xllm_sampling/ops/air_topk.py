"""Step 2, ``air_topk``: top-k over the last dim through one wrapper that owns three caches.

* workspace size: computed once per (device, batch, vocab, k, dtype) per thread;
* workspace tensor: one per device, zero-filled when made (the kernel leaves it zero after each
  call), grow-only; a superseded buffer stays alive until :func:`clear_caches`, because a CUDA
  graph may have captured it. Calls on different streams of one device share it, so they must
  not run concurrently;
* outputs: with ``cached_output=True``, one (values, indices) pair per (device, batch, k, dtype),
  overwritten by the next such call. Never a slice of a pair made for another k.

:func:`counters` exposes how many size queries and allocations the caches made, so tests can
prove that repeated calls allocate nothing new.
"""
from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass

import torch

from .. import _checks, kernels, nvtx

KERNEL_MAX_K = 1024
log = logging.getLogger("xllm_sampling.air_topk")


@dataclass
class Counters:
    """Cache activity since the last :func:`clear_caches`."""

    size_queries: int = 0
    workspace_allocations: int = 0
    output_allocations: int = 0


_counters = Counters()
_lock = threading.Lock()
_local = threading.local()
_workspaces: dict[torch.device, torch.Tensor] = {}
_retired: list[torch.Tensor] = []
_outputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def counters() -> Counters:
    """A copy of the cache counters."""
    return Counters(**vars(_counters))


def clear_caches() -> None:
    """Release every cached workspace and output and reset the counters (not during a graph capture)."""
    global _counters
    with _lock:
        _workspaces.clear()
        _retired.clear()
        _outputs.clear()
        _counters = Counters()
    _local.sizes = {}


def _workspace_size(kernel, x: torch.Tensor, k: int) -> int:
    sizes = getattr(_local, "sizes", None)
    if sizes is None:
        sizes = _local.sizes = {}
    batch, vocab = x.shape
    key = (x.device, batch, vocab, k, x.dtype)
    if key not in sizes:
        sizes[key] = kernel.workspace_size(batch, vocab, k, x.device.index) if kernel is not None else 0
        with _lock:
            _counters.size_queries += 1
    return sizes[key]


def _workspace(device: torch.device, nbytes: int) -> torch.Tensor | None:
    if nbytes == 0:
        return None
    with _lock:
        ws = _workspaces.get(device)
        if ws is None or ws.numel() < nbytes:
            if ws is not None:
                _retired.append(ws)
            ws = _workspaces[device] = torch.zeros(nbytes, dtype=torch.uint8, device=device)
            _counters.workspace_allocations += 1
        return ws


def _output(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached (values, indices) pair for x's (device, batch, dtype) and k, made on first use."""
    shape = (x.shape[0], k)
    key = (x.device, x.shape[0], k, x.dtype)
    with _lock:
        pair = _outputs.get(key)
        if pair is None:
            pair = _outputs[key] = (
                torch.empty(shape, dtype=x.dtype, device=x.device),
                torch.empty(shape, dtype=torch.int64, device=x.device),
            )
            _counters.output_allocations += 1
        return pair


def _order_key(x: torch.Tensor, largest: bool) -> torch.Tensor:
    """An int64 key per element, larger = picked first, equal exactly for equal values (-0.0 and
    +0.0 included). NaN ranks as ``torch.topk`` ranks it: above every number when ``largest``,
    never before a number otherwise."""
    bits = (x.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    key = torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)  # the floats' order, as integers
    nan = torch.isnan(x)
    if largest:
        return torch.where(nan, torch.full_like(key, 2 ** 31), key)
    return torch.where(nan, torch.full_like(key, -(2 ** 32)), -key)


def _torch_topk(x: torch.Tensor, k: int, largest: bool, sorted_by_value: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k in torch operations with the documented tie rule: of equal values the lower indices
    are kept and, sorted, come first; unsorted results come in ascending index order (the same
    every call). ``torch.topk`` alone keeps whichever tied elements it meets first."""
    vocab = x.shape[-1]
    values, indices = torch.topk(x, min(k + 1, vocab), dim=-1, largest=largest, sorted=True)
    # A row is ambiguous when the (k+1)-th element ties with the k-th: torch.topk's choice among
    # the tied may then not be the lowest indices. On a GPU every row takes the exact path
    # (deciding would cost a host synchronisation).
    exact = x.is_cuda
    if k < vocab:
        kth, next_ = values[:, k - 1], values[:, k]
        exact = exact or bool(((kth == next_) | (kth.isnan() & next_.isnan())).any())
        values, indices = values[:, :k], indices[:, :k]
    if exact:
        indices = _lowest_index_ties(x, k, largest)
    if not sorted_by_value:
        indices = indices.sort(-1).values
    elif exact or bool(((values[:, 1:] == values[:, :-1]).any() | values.isnan().any())):
        by_index = indices.sort(-1).values  # then a stable sort by value keeps ties by index
        order = _order_key(x.gather(-1, by_index), largest).sort(dim=-1, descending=True, stable=True).indices
        indices = by_index.gather(-1, order)
    else:  # distinct values: torch.topk's order is the only one
        return values, indices
    return x.gather(-1, indices), indices


def _lowest_index_ties(x: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The indices of each row's top k, ties at the k-th place broken by lower index, ascending."""
    key = _order_key(x, largest)
    kth = key.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    better, tied = key > kth, key == kth
    keep = better | (tied & (tied.cumsum(-1) <= k - better.sum(-1, keepdim=True)))  # exactly k a row
    vocab = x.shape[-1]
    lowest_first = torch.arange(vocab, 0, -1, device=x.device)
    return vocab - torch.where(keep, lowest_first, 0).topk(k, dim=-1, sorted=True).values


@functools.cache
def _say_large_k_uses_torch() -> None:
    log.debug("xllm_sampling: air_topk with k > %d uses torch.topk", KERNEL_MAX_K)


def _per_row_k(x: torch.Tensor, k: torch.Tensor, max_k, largest: bool, sorted_by_value: bool):
    """air_topk_last_dim with a (batch,) tensor ``k``: the top ``max_k`` sorted by value, each row
    cut after its own k (a row's top k is a prefix of its sorted top max_k), padded with index -1
    and value -inf (+inf for the smallest); unsorted: the kept entries by ascending index first."""
    if isinstance(max_k, bool) or not isinstance(max_k, int) or not 1 <= max_k <= x.shape[-1]:
        raise ValueError(f"max_k: with a per-row k, an int in [1, {x.shape[-1]}] (the output's width) is required, "
                         f"got {max_k!r}")
    k = _checks.per_row("k", k, x.shape[0], x.device, torch.int64)
    _checks.values_in("k", k, 1, max_k, lo_open=False, hi_open=False)
    values, indices = air_topk_last_dim(x, max_k, largest=largest)
    keep = torch.arange(max_k, device=x.device) < k[:, None]
    values = torch.where(keep, values, float("-inf") if largest else float("inf"))
    indices = torch.where(keep, indices, -1)
    if not sorted_by_value:
        order = torch.where(keep, indices, x.shape[-1]).sort(dim=-1, stable=True).indices
        values, indices = values.gather(-1, order), indices.gather(-1, order)
    return values, indices


def air_topk_last_dim(x: torch.Tensor, k: int | torch.Tensor, *, sorted_by_value: bool = True, largest: bool = True,
                      cached_output: bool = False, index_order: bool = False,
                      max_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (values, int64 indices) over the last dim of a (batch, vocab) tensor.

    ``sorted_by_value=True`` (default): values in descending order (ascending with
    ``largest=False``) as ``torch.topk(sorted=True)`` gives them, equal values by ascending index.
    ``sorted_by_value=False``: the same (value, index) pairs in an unspecified order, which on
    the GPU kernel may change from call to call; with ``index_order=True`` in ascending index
    order on every path (repeatable, at the cost of sorting the k indices). Of values tied at the
    k-th place, the lowest indices are kept.
    NaN counts as larger than every number, as in ``torch.topk`` (first with ``largest=True``,
    never picked before a number with ``largest=False``). On the CUDA kernel path (k <= 1024)
    -0.0 ranks just below +0.0 (their bit patterns are ordered) and a NaN value comes back as
    a NaN, not necessarily with the input's payload; k > 1024 uses ``torch.topk``.
    ``cached_output=True`` returns the cached output pair for (device, batch, k, dtype): it is
    overwritten by the next cached call with the same key, so copy it if it must outlive that.
    Per-row k: ``k`` a (batch,) integer tensor with values in [1, ``max_k``] (values on a GPU
    tensor are not checked) and ``max_k`` the output's width: each row holds its own top k, then
    index -1 and value -inf (+inf with ``largest=False``); sorted by value, or with
    ``sorted_by_value=False`` in ascending index order; not with ``cached_output``.
    Flag ``air_topk`` off: ``torch.topk``.
    """
    _checks.logits_2d("x", x)
    if isinstance(k, torch.Tensor):
        if cached_output:
            raise ValueError("cached_output: not available with a per-row k")
        with nvtx.range("air_topk"):
            return _per_row_k(x, k, max_k, largest, sorted_by_value)
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k: expected an int, got {type(k).__name__}")
    vocab = x.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k: {k} outside [1, {vocab}] (the size of the last dim)")
    on, span = nvtx.op_call("air_topk")
    with span:
        if not on:
            return torch.topk(x, k, dim=-1, largest=largest, sorted=True)
        kernel = kernels.load("air_topk") if x.is_cuda else None
        if kernel is not None and k > KERNEL_MAX_K:
            _say_large_k_uses_torch()
            kernel = None
        out = _output(x, k) if cached_output else (None, None)
        if kernel is None:
            v, i = _torch_topk(x, k, largest, sorted_by_value)
            return (out[0].copy_(v), out[1].copy_(i)) if cached_output else (v.contiguous(), i.contiguous())
        workspace = _workspace(x.device, _workspace_size(kernel, x, k))
        values, indices = kernel.topk(x.contiguous(), k, largest, sorted_by_value, workspace, *out)
        if index_order and not sorted_by_value:
            by_index, order = indices.sort(-1)
            values.copy_(values.gather(-1, order))
            indices.copy_(by_index)
        return values, indices
