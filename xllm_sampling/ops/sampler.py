"""Step 3, ``sampler``: logits to one token per row, sorting-free, in one CUDA launch.

Per request (a number for every row or a (batch,) tensor): penalties over the request's
generated tokens, temperature (0 = greedy: the argmax, lowest index on ties), top-k, top-p,
min-p, and the ``seed`` / ``position`` keys of the counter-based generator.

Semantics, every path:
  * penalties first, on float32 logits: for each token generated c > 0 times, the repetition
    penalty (score * r where score < 0, else score / r), then score - c * frequency - presence;
  * the ranking: processed logits descending, equal values by ascending index. top-k keeps the
    first k ranks, top-p a token while the mass ranked strictly above it is under top_p times
    the top-k mass (float64 sums), min-p tokens with p >= min_p * p_max; each keeps a prefix of
    the ranking, so ties at a boundary keep the lower indices;
  * a row with a NaN or +inf logit, or with every logit -inf, gives token -1 and logprob NaN;
  * the logprob is the chosen token's log-probability after penalties and temperature (before
    the filters), as the original path returns it;
  * ``top_logprobs=n`` (n <= 20) also returns each row's n most likely tokens under that
    distribution, ranked as above (ties by ascending index), and their log-probabilities: one
    top-n over int64 keys of the processed logits (:func:`top_n`), a second pass over the
    vocabulary on every path for now (fusing it into the kernels is open), with each
    log-probability taken from the chosen token's (no second softmax).

Flag ``sampler`` on: the draw of ``csrc/sampler/sampling.cuh`` (the module docstring of that
header has the method): the candidates' mass in vocabulary order, a float64 uniform from Philox
keyed by (seed, position, round), and top-p by rejection over pivots; batches without filters or
penalties take ``csrc/sampler/stream_sampling.cuh``, one streaming read of the logits, and large
batches whose ``top_k`` is one number up to 128 ``csrc/sampler/top_k_sampling.cuh`` (one read, then
the same draw on the top-k list), with the same tokens. On a GPU it is one kernel launch (two for
the top-k kernels) with no host synchronisation (capturable in a CUDA graph); elsewhere the same algorithm
in torch (:func:`draw`), which draws the same tokens up to float rounding at a boundary. A
request's tokens depend on its seed and position only, never on its row or batch.
Flag off: the original sort-based sampler (``torch.multinomial`` with ``generator``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _checks, kernels, nvtx, rng

LOG2E = 1.4426950408889634
TILE = 512  # unfiltered rows' weights are computed per vocabulary-aligned tile of TILE tokens (_tile_weights)
MAX_TOP_LOGPROBS = 20  # top_logprobs: the most log-probabilities per row sample() returns
MAX_ROUNDS = 32  # top-p rejection rounds at most (each shrinks the candidates; then the argmax)
KERNEL_MAX_PENALTY_TOKENS = 1024  # longer generated-token lists are counted in torch first


class SampleOutput(NamedTuple):
    """Chosen tokens (int64, -1 for an invalid row) and their log-probabilities (float32); with
    ``top_logprobs=n``, each row's n most likely tokens (batch, n) int64, most likely first, and
    their log-probabilities (batch, n) float32 (-1 and NaN for an invalid row), else None."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    top_tokens: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


class Penalties(NamedTuple):
    """Generated tokens (batch, L) int64, -1 padding, and the three penalties (number or (batch,))."""

    tokens: torch.Tensor
    frequency: float | torch.Tensor
    presence: float | torch.Tensor
    repetition: float | torch.Tensor


class _Params(NamedTuple):
    """Checked parameters: Python numbers (the same for every row) or (batch,) tensors on the logits' device."""

    temperature: float | torch.Tensor  # 0 = greedy
    top_k: int | torch.Tensor  # <= 0 or >= vocab: off
    top_p: float | torch.Tensor
    min_p: float | torch.Tensor
    seed: int | torch.Tensor
    position: int | torch.Tensor
    penalties: Penalties | None


_RANGES = {  # name: (dtype, default, lo, hi, lo_open)
    "temperature": (torch.float32, 1.0, 0.0, float("inf"), False),
    "top_k": (torch.int64, 0, 0, float("inf"), False),
    "top_p": (torch.float32, 1.0, 0.0, 1.0, True),
    "min_p": (torch.float32, 0.0, 0.0, 1.0, False),
    "seed": (torch.int64, 0, -float("inf"), float("inf"), False),
    "position": (torch.int64, 0, -float("inf"), float("inf"), False),
    "frequency_penalty": (torch.float32, 0.0, -float("inf"), float("inf"), False),
    "presence_penalty": (torch.float32, 0.0, -float("inf"), float("inf"), False),
    "repetition_penalty": (torch.float32, 1.0, 0.0, float("inf"), True),
}


def _param(name: str, value, logits: torch.Tensor):
    """One per-request parameter, checked: a Python number, or a (batch,) tensor of its dtype on
    the logits' device (a CPU tensor is checked, then copied without blocking)."""
    dtype, default, lo, hi, lo_open = _RANGES[name]
    if value is None:
        return default
    if not isinstance(value, torch.Tensor):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number or a tensor, got {type(value).__name__}")
        _checks.number_in(name, value, lo, hi)
        if dtype == torch.int64:
            return _checks.int64(name, value)
        if lo_open and value == lo:
            raise ValueError(f"{name}: value {value} outside ({lo}, {hi}]")
        return float(value)
    batch = logits.shape[0]
    if (value.device.type != "cpu" and value.device == logits.device and value.dtype == dtype and value.dim() == 1
            and value.shape[0] == batch and value.is_contiguous()):
        return value  # a device tensor as the kernel takes it (its values are not read: no host sync)
    t = _checks.per_row(name, value, batch, value.device, dtype)
    _checks.values_in(name, t, lo, hi, lo_open=lo_open, hi_open=False)
    return t.to(logits.device, non_blocking=True).contiguous()


def _params(logits, temperature=None, top_k=None, top_p=None, min_p=None, seed=None, position=None,
            generated=None, frequency_penalty=None, presence_penalty=None, repetition_penalty=None) -> _Params:
    # one call per parameter, in this order (no loop: this is a batch-1 call's largest host cost)
    params = _Params(_param("temperature", temperature, logits), _param("top_k", top_k, logits),
                     _param("top_p", top_p, logits), _param("min_p", min_p, logits), _param("seed", seed, logits),
                     _param("position", position, logits), None)
    frequency, presence, repetition = (_param("frequency_penalty", frequency_penalty, logits),
                                       _param("presence_penalty", presence_penalty, logits),
                                       _param("repetition_penalty", repetition_penalty, logits))
    if generated is None:
        return params
    if not isinstance(generated, torch.Tensor) or generated.dim() != 2 or generated.shape[0] != logits.shape[0]:
        raise ValueError(f"generated: expected a (batch, L) integer tensor, batch {logits.shape[0]}")
    if generated.dtype.is_floating_point or generated.dtype == torch.bool:
        raise ValueError(f"generated: dtype {generated.dtype} where an integer tensor is expected")
    tokens = generated.to(logits.device, torch.int64, non_blocking=True).contiguous()
    return params._replace(penalties=Penalties(tokens, frequency, presence, repetition))


def _rows(value, batch: int, device, dtype) -> torch.Tensor:
    """A parameter as a (batch,) tensor."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    return torch.full((batch,), value, dtype=dtype, device=device)


def apply_penalties(x: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """Float32 logits ``x`` with the penalties applied (a new tensor): for each token generated
    c > 0 times, score * r where score < 0 else score / r, then score - c * frequency - presence.
    Token ids outside [0, vocab) are ignored."""
    batch, vocab = x.shape
    ids = penalties.tokens
    valid = (ids >= 0) & (ids < vocab)
    counts = torch.zeros(batch, vocab, dtype=torch.int32, device=x.device)
    counts.scatter_add_(1, torch.where(valid, ids, 0), valid.int())
    seen = counts > 0
    col = lambda v: _rows(v, batch, x.device, torch.float32)[:, None]  # noqa: E731
    r = col(penalties.repetition)
    x = torch.where(seen, torch.where(x < 0, x * r, x / r), x)
    return torch.where(seen, x - counts.float() * col(penalties.frequency) - col(penalties.presence), x)


def _penalised(logits: torch.Tensor, params: _Params) -> torch.Tensor:
    """Float32 logits after the penalties (if any)."""
    x = logits.float()
    return x if params.penalties is None else apply_penalties(x, params.penalties)


def _processed(logits: torch.Tensor, params: _Params) -> torch.Tensor:
    """Float32 logits after the penalties, with -0 made +0 (equal values rank by index alone)."""
    return _penalised(logits, params) + 0.0


def _invalid_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.isnan(x).any(-1) | torch.isposinf(x).any(-1) | torch.isneginf(x).all(-1)


def _ranked_keep(ranked: torch.Tensor, top_k, top_p, min_p) -> torch.Tensor:
    """The filters' mask over each row's ranked probabilities (descending, ties by ascending
    index): top-k, then top-p on the renormalised top-k mass (the float64 mass ranked strictly
    above a token under top_p times the top-k mass), then min-p. Parameters are (batch,) tensors."""
    rank = torch.arange(ranked.shape[1], device=ranked.device)
    vocab = ranked.shape[1]
    k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    keep = rank < k[:, None]
    prefix = torch.where(keep, ranked, 0).double().cumsum(-1)
    above = torch.nn.functional.pad(prefix[:, :-1], (1, 0))  # mass ranked strictly above each token
    keep &= above < top_p[:, None].double() * prefix[:, -1:]
    return keep & (ranked >= min_p[:, None] * ranked[:, :1])


def top_n(x: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (batch, n) of the n largest values of each row of float32 ``x``, largest first,
    equal values by ascending index (-0.0 equal to +0.0): one top-n over int64 keys that are
    unique per token (the value's bits in an order-preserving form, then the index reversed)."""
    vocab = x.shape[1]
    bits = (x + 0.0).view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # as signed integers, in the floats' order
    keys = ordered * 2**32 + (vocab - 1 - torch.arange(vocab, device=x.device))
    return keys.topk(n, dim=-1).indices


def _with_top(out: SampleOutput, top: torch.Tensor, top_logprobs: torch.Tensor) -> SampleOutput:
    """``out`` with its rows' top tokens and log-probabilities (-1 and NaN where its token is -1)."""
    invalid = (out.tokens < 0)[:, None]
    return out._replace(top_tokens=torch.where(invalid, -1, top),
                        top_logprobs=torch.where(invalid, float("nan"), top_logprobs))


def _with_top_from_chosen(out: SampleOutput, x: torch.Tensor, params: _Params, n: int) -> SampleOutput:
    """``out`` with the top ``n`` of penalised float32 logits ``x``, each log-probability derived
    from the chosen token's: lp_i = lp_chosen + (x_i - x_chosen) / t in float64 (t = 1 greedy)."""
    top = top_n(x, n)
    chosen = out.tokens.clamp(min=0)[:, None]
    t = _rows(params.temperature, x.shape[0], x.device, torch.float32)
    t_eff = torch.where(t == 0, 1.0, t).double()[:, None]
    lp = out.logprobs.double()[:, None] + (x.gather(-1, top).double() - x.gather(-1, chosen).double()) / t_eff
    return _with_top(out, top, lp.float())


def original(logits, params: _Params, generator: torch.Generator | None = None, top_logprobs: int = 0) -> SampleOutput:
    """The engine's original sampler: full descending sort, cumulative masks, ``torch.multinomial``
    (and ``top_logprobs`` from its log-softmax)."""
    x = _penalised(logits, params)
    batch, dev = x.shape[0], x.device
    temperature = _rows(params.temperature, batch, dev, torch.float32)
    t = torch.where(temperature == 0, torch.ones_like(temperature), temperature)
    logp = torch.log_softmax(x / t[:, None], -1)
    probs = logp.exp()
    sorted_p, sorted_i = probs.sort(dim=-1, descending=True, stable=True)
    keep = _ranked_keep(sorted_p, *(_rows(v, batch, dev, d) for v, d in (
        (params.top_k, torch.int64), (params.top_p, torch.float32), (params.min_p, torch.float32))))
    filtered = torch.nan_to_num(torch.where(keep, sorted_p, torch.zeros_like(sorted_p)), nan=0.0)
    filtered[:, 0] += (filtered.sum(-1) == 0).float()  # an invalid row draws something harmless
    tokens = sorted_i.gather(-1, torch.multinomial(filtered, 1, generator=generator)).squeeze(-1)
    tokens = torch.where(temperature == 0, x.argmax(-1), tokens)
    invalid = _invalid_rows(x)
    logprobs = logp.gather(-1, tokens[:, None]).squeeze(-1)
    tokens = torch.where(invalid, torch.full_like(tokens, -1), tokens)
    out = SampleOutput(tokens, torch.where(invalid, torch.full_like(logprobs, float("nan")), logprobs))
    if top_logprobs:
        top = top_n(x, top_logprobs)
        out = _with_top(out, top, logp.gather(-1, top))
    return out


def _first_above(weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the first index where the running float64 sum of ``weight`` exceeds ``target``;
    the last positive weight when rounding leaves the sum short (never a weight of 0)."""
    running = weight.cumsum(-1)
    index = torch.searchsorted(running, target[:, None], right=True).squeeze(-1)
    positive = weight > 0
    last = weight.shape[1] - 1 - positive.flip(-1).int().argmax(-1)
    return torch.where(index < weight.shape[1], index, last).clamp(max=weight.shape[1] - 1)


def _tile_weights(x: torch.Tensor, row_max: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The float64 weights 2^((x - row max) c) of rows without filters, as both kernels compute
    them (csrc/sampler/tile_weight.cuh): 2^((x - tile max) c) in float32 times the tile's float64
    2^((tile max - row max) c), over vocabulary-aligned tiles of TILE tokens. (Filtered rows:
    2^((x - row max) c) in float32.)"""
    batch, vocab = x.shape
    tiles = -(-vocab // TILE)
    padded = torch.nn.functional.pad(x, (0, tiles * TILE - vocab), value=float("-inf"))
    tile_max = padded.view(batch, tiles, TILE).amax(-1)
    live = tile_max > float("-inf")
    reference = torch.where(live, tile_max, 0.0)  # a tile of -inf only weighs 0, not NaN
    scale = torch.where(live, torch.exp2((tile_max - row_max[:, None]).double() * c.double()[:, None]), 0.0)
    w = torch.exp2((x - reference.repeat_interleave(TILE, -1)[:, :vocab]) * c[:, None])
    return w.double() * scale.repeat_interleave(TILE, -1)[:, :vocab]


def draw(x: torch.Tensor, params: _Params) -> SampleOutput:
    """The fast path's algorithm in torch, on processed float32 logits ``x`` (see the module docstring)."""
    batch, vocab = x.shape
    dev = x.device
    invalid = _invalid_rows(x)
    x = torch.where(invalid[:, None], 0.0, x)
    row_max, argmax = x.max(-1)
    temperature = _rows(params.temperature, batch, dev, torch.float32)
    greedy = temperature == 0
    c = torch.tensor(LOG2E, dtype=torch.float32, device=dev) / torch.where(greedy, 1.0, temperature)
    top_k = _rows(params.top_k, batch, dev, torch.int64)
    top_p = _rows(params.top_p, batch, dev, torch.float32)
    min_p = _rows(params.min_p, batch, dev, torch.float32)
    k_on = (top_k > 0) & (top_k < vocab)
    w = torch.exp2((x - row_max[:, None]) * c[:, None])
    wd = w.double()
    unfiltered = ~greedy & ~k_on & (top_p >= 1) & (min_p <= 0)  # weights as the streaming kernel computes them
    if bool(unfiltered.any()):
        wd = torch.where(unfiltered[:, None], _tile_weights(x, row_max, c), wd)
    row_sum = wd.sum(-1)
    in_top_k = torch.ones_like(x, dtype=torch.bool)
    if bool(k_on.any()):
        k = torch.where(k_on, top_k, 1)
        kth = x.topk(int(k.max()), -1).values.gather(-1, (k - 1)[:, None])  # the k-th largest value
        above, tied = x > kth, x == kth
        keep_tied = k[:, None] - above.sum(-1, keepdim=True)  # ties kept, lowest indices first
        in_top_k = above | (tied & (tied.int().cumsum(-1) <= keep_tied)) | ~k_on[:, None]
    # Work a batch does not need is skipped (host checks: this path runs on CPU, or as a fallback).
    candidate = in_top_k & (w >= min_p[:, None]) if bool((min_p > 0).any()) else in_top_k
    any_top_p = bool((top_p < 1).any())
    top_p_mass = top_p.double() * torch.where(in_top_k, wd, 0.0).sum(-1) if any_top_p else None
    position = _rows(params.position, batch, dev, torch.int64)
    seed = _rows(params.seed, batch, dev, torch.int64)
    index = torch.arange(vocab, device=dev)
    token = argmax.clone()
    pending = ~(invalid | greedy)
    pivot = torch.full((batch,), -1, dtype=torch.int64, device=dev)
    for round_ in range(MAX_ROUNDS):
        if not bool(pending.any()):
            break
        if round_ == 0:
            weight = torch.where(candidate, wd, 0.0)
        else:
            pivot_value = x.gather(-1, pivot.clamp(min=0)[:, None])
            above_pivot = (x > pivot_value) | ((x == pivot_value) & (index < pivot[:, None]))
            weight = torch.where(candidate & above_pivot, wd, 0.0)
        u = rng.uniform(seed, position, round_)
        chosen = _first_above(weight, u * weight.sum(-1))
        token = torch.where(pending, chosen, token)
        if not any_top_p:  # without top-p the first draw stands
            pending = torch.zeros_like(pending)
            break
        pending &= top_p < 1
        chosen_value = x.gather(-1, chosen[:, None])
        ranked_above = (x > chosen_value) | ((x == chosen_value) & (index < chosen[:, None]))
        above_mass = torch.where(candidate & ranked_above, wd, 0.0).sum(-1)
        pending &= above_mass >= top_p_mass
        pivot = torch.where(pending, chosen, pivot)
    token = torch.where(pending, argmax, token)  # MAX_ROUNDS rejections: the argmax
    t_eff = torch.where(greedy, 1.0, temperature).double()
    logprobs = ((x.gather(-1, token[:, None]).squeeze(-1).double() - row_max.double()) / t_eff - row_sum.log()).float()
    token = torch.where(invalid, -1, token)
    return SampleOutput(token, torch.where(invalid, float("nan"), logprobs))


def _kernel_call(kernel, logits: torch.Tensor, params: _Params) -> SampleOutput:
    def split(value, default):
        return (value, default) if isinstance(value, torch.Tensor) else (None, value)

    pen = params.penalties
    pen_args = [None, None, 0.0, None, 0.0, None, 1.0]
    if pen is not None:
        pen_args = [pen.tokens, *split(pen.frequency, 0.0), *split(pen.presence, 0.0), *split(pen.repetition, 1.0)]
    return SampleOutput(*kernel.sample(logits, *split(params.temperature, 1.0), *split(params.top_k, 0),
                                       *split(params.top_p, 1.0), *split(params.min_p, 0.0), *split(params.seed, 0),
                                       *split(params.position, 0), *pen_args))


def _fast(logits: torch.Tensor, params: _Params, top_logprobs: int = 0) -> SampleOutput:
    kernel = kernels.load("sampler") if logits.is_cuda else None
    if kernel is None or logits.shape[1] > kernel.max_vocab():
        x = _processed(logits, params)
        out = draw(x, params)
        return _with_top_from_chosen(out, x, params, top_logprobs) if top_logprobs else out
    pen = params.penalties
    if pen is not None and pen.tokens.shape[1] > KERNEL_MAX_PENALTY_TOKENS:
        logits, params = apply_penalties(logits.float(), pen), params._replace(penalties=None)
    if pen is not None and pen.tokens.shape[1] == 0:
        params = params._replace(penalties=None)
    out = _kernel_call(kernel, logits.contiguous(), params)
    # the kernel applies the penalties itself: the top tokens need them in torch (a second pass)
    return _with_top_from_chosen(out, _penalised(logits, params), params, top_logprobs) if top_logprobs else out


def sample(logits: torch.Tensor, *, temperature=None, top_k=None, top_p=None, min_p=None, seed=0, position=0,
           generated: torch.Tensor | None = None, frequency_penalty=None, presence_penalty=None,
           repetition_penalty=None, generator: torch.Generator | None = None, top_logprobs: int = 0) -> SampleOutput:
    """Sample one token per row of ``logits`` (batch, vocab), float32, bfloat16 or float16.

    Every parameter is a number for all rows or a (batch,) tensor, per request, on the host or
    on the logits' device: ``temperature`` >= 0 (0 = greedy, default 1), ``top_k`` (0 or >= vocab
    = off), ``top_p`` in (0, 1] (1 = off), ``min_p`` in [0, 1] (0 = off), ``seed`` and
    ``position`` int64 keys of the counter-based generator (the fast path's randomness).
    Penalties apply when ``generated`` is given: a (batch, L) integer tensor of each request's
    generated tokens, -1 padding (a token listed c times counts c times), with
    ``frequency_penalty`` and ``presence_penalty`` (default 0) and ``repetition_penalty`` > 0
    (default 1). ``generator`` feeds the original path only. ``top_logprobs`` (0 to 20, at most
    the vocab): that many most likely tokens per row and their log-probabilities, as well.
    Returns :class:`SampleOutput`. Values on a GPU tensor are not checked (that would cost a host
    synchronisation).
    """
    _checks.logits_2d("logits", logits)
    n, most = top_logprobs, min(MAX_TOP_LOGPROBS, logits.shape[1])
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= most:
        raise ValueError(f"top_logprobs: expected an integer in [0, {most}], got {n!r}")
    params = _params(logits, temperature, top_k, top_p, min_p, seed, position, generated, frequency_penalty,
                     presence_penalty, repetition_penalty)
    on, span = nvtx.op_call("sampler")
    with span:
        if not on:
            return original(logits, params, generator, n)
        return _fast(logits, params, n)
