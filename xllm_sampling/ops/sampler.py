"""Step 3, ``sampler``: greedy / temperature / top-k / top-p / min-p sampling without a full sort.

Filters, in order: top-k, then top-p on the renormalised top-k mass (a token is kept while the
mass ranked strictly above it is under ``top_p``), then min-p (``p >= min_p * p_max``).
Temperature 0 means greedy (argmax of the raw logits). A row with a NaN or +inf logit, or with
every logit -inf, gets token -1 and logprob NaN (no host synchronisation is spent to detect it).

Both paths rank each row's tokens by probability, equal probabilities by ascending index, and
apply the filters to that ranking, so ties are kept by the same rule everywhere: of tokens tied
at a boundary the lower indices are kept. The top-p sums run in float64 over an exclusive
prefix (never a cumulative sum minus the token's own mass, which loses the boundary).

The fast path draws by inverse CDF over the ranked candidates with a uniform from Philox keyed
by each request's ``seed`` and ``position``; a row's candidates beyond its own top-k weigh
nothing, so the token does not depend on the batch's largest top-k nor on the row or batch the
request is in. With every row's top-k known on the host and at most ``CANDIDATE_MAX`` (1024),
the candidates come from the top-k kernel; otherwise from a full sort (until the sampling kernel
lands). When every row is greedy and that is known on the host, the step is an argmax.
Flag ``sampler`` off: the original sort-based sampler (``torch.multinomial`` with ``generator``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _checks, flags, nvtx, rng
from .air_topk import KERNEL_MAX_K as CANDIDATE_MAX, air_topk_last_dim
from .logit_softmax import logit_softmax


class SampleOutput(NamedTuple):
    """Chosen tokens (int64, -1 for an invalid row) and their log-probabilities (float32)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor


class _Params(NamedTuple):
    temperature: torch.Tensor  # float32, 0 = greedy
    top_k: torch.Tensor  # int64 in [1, vocab]; vocab = off
    top_p: torch.Tensor  # float32 in (0, 1]
    min_p: torch.Tensor  # float32 in [0, 1]
    seed: torch.Tensor  # int64
    position: torch.Tensor  # int64
    k_max: int  # largest top_k of any row, known on the host
    all_greedy: bool  # every row has temperature 0, known on the host


def _params(logits, temperature, top_k, top_p, min_p, seed, position) -> _Params:
    batch, vocab = logits.shape
    dev = logits.device

    def host_or_device(name, value, dtype):
        if isinstance(value, torch.Tensor) and value.device.type == "cpu" and dev.type != "cpu":
            _checks.per_row(name, value, batch, value.device, dtype)
            value = value.to(dev, non_blocking=True)
        return _checks.per_row(name, value, batch, dev, dtype)

    for name, value, lo, hi in (("temperature", temperature, 0.0, float("inf")), ("top_p", top_p, 0.0, 1.0),
                                ("min_p", min_p, 0.0, 1.0), ("top_k", top_k, 0, float("inf"))):
        _checks.number_in(name, value, lo, hi)
        if isinstance(value, torch.Tensor):
            _checks.values_in(name, value, lo, hi, lo_open=name == "top_p", hi_open=False)
    if isinstance(top_p, (int, float)) and top_p == 0:
        raise ValueError("top_p: value 0 outside (0, 1]")
    t = host_or_device("temperature", 1.0 if temperature is None else temperature, torch.float32)
    if isinstance(top_k, torch.Tensor):
        k = _checks.per_row("top_k", top_k, batch, top_k.device, torch.int64)
        k = torch.where((k <= 0) | (k > vocab), torch.full_like(k, vocab), k)
        k_max = int(k.max()) if k.device.type == "cpu" else vocab  # a device tensor is not read: no sync
        k = host_or_device("top_k", k, torch.int64)
    else:  # one number for every row: known on the host, nothing to copy (graph-capture safe)
        top_k = 0 if top_k is None else int(_checks.per_row("top_k", top_k, 1, torch.device("cpu"), torch.int64))
        k_max = top_k if 0 < top_k < vocab else vocab
        k = torch.full((batch,), k_max, dtype=torch.int64, device=dev)
    p = host_or_device("top_p", 1.0 if top_p is None else top_p, torch.float32)
    m = host_or_device("min_p", 0.0 if min_p is None else min_p, torch.float32)
    seed = host_or_device("seed", 0 if seed is None else seed, torch.int64)
    position = host_or_device("position", 0 if position is None else position, torch.int64)
    if isinstance(temperature, torch.Tensor):
        all_greedy = temperature.device.type == "cpu" and bool((temperature == 0).all())
    else:
        all_greedy = temperature == 0
    return _Params(t, k, p, m, seed, position, k_max, all_greedy)


def _invalid_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.isnan(x).any(-1) | torch.isposinf(x).any(-1) | torch.isneginf(x).all(-1)


def _finish(x, tokens, logp: torch.Tensor, params) -> SampleOutput:
    """Greedy rows take the argmax, invalid rows -1; logprobs gathered from ``logp`` for the final tokens."""
    tokens = torch.where(params.temperature == 0, x.argmax(-1), tokens)
    invalid = _invalid_rows(x)
    logprobs = logp.gather(-1, tokens[:, None]).squeeze(-1).float()
    tokens = torch.where(invalid, torch.full_like(tokens, -1), tokens)
    logprobs = torch.where(invalid, torch.full_like(logprobs, float("nan")), logprobs)
    return SampleOutput(tokens, logprobs)


def _ranked_filter(ranked: torch.Tensor, params: _Params) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter each row's ranked probabilities (descending, ties by ascending index): top-k, then
    top-p on the renormalised top-k mass, then min-p. Each filter keeps a prefix of the ranking,
    so the result is a count per row, with the float64 running mass of the ranking under top-k.

    Returns (kept: int64 (batch,), prefix: float64 (batch, n) cumulative mass)."""
    rank = torch.arange(ranked.shape[1], device=ranked.device)
    in_top_k = rank < params.top_k[:, None]
    prefix = torch.where(in_top_k, ranked, 0).double().cumsum(-1)
    above = torch.nn.functional.pad(prefix[:, :-1], (1, 0))  # mass ranked strictly above each token
    keep = in_top_k & (above < params.top_p[:, None].double() * prefix[:, -1:])
    keep &= ranked >= params.min_p[:, None] * ranked[:, :1]
    return keep.sum(-1), prefix


def _ranked_keep(ranked: torch.Tensor, params: _Params) -> torch.Tensor:
    """The filters' mask over each row's ranking."""
    kept, _ = _ranked_filter(ranked, params)
    return torch.arange(ranked.shape[1], device=ranked.device) < kept[:, None]


def original(logits, params: _Params, generator: torch.Generator | None = None) -> SampleOutput:
    """The engine's original sampler: full descending sort, cumulative masks, ``torch.multinomial``."""
    x = logits.float()
    t = torch.where(params.temperature == 0, torch.ones_like(params.temperature), params.temperature)
    logp = torch.log_softmax(x / t[:, None], -1)
    probs = logp.exp()
    sorted_p, sorted_i = probs.sort(dim=-1, descending=True, stable=True)
    filtered = torch.where(_ranked_keep(sorted_p, params), sorted_p, torch.zeros_like(sorted_p))
    filtered = torch.nan_to_num(filtered, nan=0.0)
    filtered[:, 0] += (filtered.sum(-1) == 0).float()  # an invalid row draws something harmless
    choice = torch.multinomial(filtered, 1, generator=generator)
    tokens = sorted_i.gather(-1, choice).squeeze(-1)
    return _finish(x, tokens, logp, params)


def _draw(prefix: torch.Tensor, kept: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of a rank per row among its first ``kept`` ranks, from their running
    mass ``prefix``, with uniforms ``u``; never a rank of probability 0 while the row has a
    positive one."""
    last = (kept - 1).clamp(min=0)[:, None]
    total = prefix.gather(-1, last)
    column = torch.searchsorted(prefix, u[:, None] * total, right=True)
    last_positive = (prefix < total).sum(-1, keepdim=True)  # the first rank reaching the total
    return torch.minimum(column, torch.minimum(last, last_positive)).squeeze(-1)


def _greedy(logits: torch.Tensor, params: _Params) -> SampleOutput:
    x = logits.float()
    return _finish(x, x.argmax(-1), _LogOf(torch.softmax(x, -1)), params)


def _fast(logits, params: _Params) -> SampleOutput:
    if params.all_greedy:
        return _greedy(logits, params)
    x = logits.float()
    probs = logit_softmax(logits, params.temperature)
    u = rng.uniform(params.seed, params.position)
    if params.k_max <= CANDIDATE_MAX:
        ranked, indices = air_topk_last_dim(probs, params.k_max, sorted_by_value=True)
    else:
        ranked, indices = probs.sort(dim=-1, descending=True, stable=True)
    kept, prefix = _ranked_filter(ranked, params)
    column = _draw(prefix, kept, u)
    tokens = indices.gather(-1, column[:, None]).squeeze(-1)
    return _finish(x, tokens, _LogOf(probs), params)


class _LogOf:
    """``gather`` of log(probs) without taking the log of the whole tensor."""

    def __init__(self, probs: torch.Tensor):
        self.probs = probs

    def gather(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        return self.probs.gather(dim, index).log()


def sample(logits: torch.Tensor, *, temperature=None, top_k=None, top_p=None, min_p=None,
           seed=0, position=0, generator: torch.Generator | None = None) -> SampleOutput:
    """Sample one token per row of ``logits`` (batch, vocab).

    Every parameter is a number for all rows or a (batch,) tensor, per request, on the host or
    on the logits' device: ``temperature`` >= 0 (0 = greedy, default 1), ``top_k`` >= 0
    (0 = off), ``top_p`` in (0, 1] (1 = off), ``min_p`` in [0, 1] (0 = off), ``seed`` and
    ``position`` int64 keys of the counter-based generator (the fast path's randomness).
    ``generator`` feeds the original path only. Returns :class:`SampleOutput`.
    """
    _checks.logits_2d("logits", logits)
    params = _params(logits, temperature, top_k, top_p, min_p, seed, position)
    with nvtx.range("sampler"):
        if not flags.enabled("sampler"):
            return original(logits, params, generator)
        return _fast(logits, params)
