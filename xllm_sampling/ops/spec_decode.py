"""Step 7, ``spec_decode``: speculative decoding's rejection sampler.

A draft model proposes up to K tokens per request; the target model scores them in one forward,
giving K + 1 rows of logits per request. :func:`rejection_sample` decides which drafts to keep
(Leviathan et al. 2023, Chen et al. 2023): draft token x at position i is accepted with
probability min(1, q_i(x) / p_i(x)), where q_i is the target's distribution at i after the
sampler's temperature, top-k, top-p and min-p (the sampler's rules: ``xllm_sampling.sample``)
and p_i the draft's (``draft_probs``, or one-hot on x for drafters without probabilities). At
the first rejection one token is drawn from max(0, q_i - p_i), renormalised, and the request
stops; when every draft is accepted a bonus token is drawn from q_n, n the request's number of
drafts. The emitted tokens are then distributed exactly as tokens sampled from the target alone.
Temperature 0: drafts are accepted while they equal the target's argmax (lowest index on ties),
then the argmax is emitted. A target row with a NaN or +inf logit, or only -inf logits, emits
token -1 there and stops the request, as the sampler gives -1 for such a row.

Random numbers come from the counter-based generator (``xllm_sampling.rng``) keyed by the
request's seed and position + i, stream ACCEPT_STREAM for the acceptance test at i and
DRAW_STREAM for the token drawn at i (inverse CDF over float64 weights in vocabulary order), so a
request's tokens never depend on its batch.

Levels (``level=``): "loop", a torch loop over the K + 1 positions (the reference, any device);
"compiled", the same function under ``torch.compile``: K is static, so the loop unrolls into one
graph with no graph break (``torch._dynamo.explain``, torch 2.14, CPU: 1 graph, 0 breaks); inductor
fuses the elementwise work of every position (softmax, filters' masks, Philox's integer rounds,
the acceptance test), while each row's sort, cumulative sums and ``searchsorted`` stay library
calls (torch 2.11's inductor fails to build it on a GPU at V = 151936: docs/steps.md); "kernel",
``csrc/spec_decode/`` on a GPU: one launch of one thread-block cluster per request for the whole
batch, no host synchronisation, temperature only (the filters stay with the torch levels), vocab
up to the extension's ``max_vocab()``. By default (``level`` None) the ``spec_decode`` flag
chooses: on, "kernel" where it applies (CUDA logits, the extension built, no top-k, top-p or
min-p, vocab within its limit), else "loop"; off, "loop".
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .. import _checks, flags, kernels, nvtx, rng
from .sampler import _RANGES, _first_above, _invalid_rows, _param, _ranked_keep, _rows

ACCEPT_STREAM = 64  # the sampler's draws use streams 0..31
DRAW_STREAM = 65
LEVELS = ("loop", "compiled", "kernel")


class SpecDecodeOutput(NamedTuple):
    """Emitted tokens (batch, K + 1) int64, -1 after the last; how many each request emitted (batch,)."""

    tokens: torch.Tensor
    emitted: torch.Tensor


def target_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor) -> torch.Tensor:
    """float64 (batch, vocab): each row's distribution after temperature and the sampler's filters,
    renormalised; a greedy row (temperature 0) is one-hot on its argmax. Invalid rows give NaN."""
    x = logits.float() + 0.0  # -0 ranks as +0
    greedy = temperature == 0
    t = torch.where(greedy, 1.0, temperature)
    probs = torch.softmax(x / t[:, None], -1)
    ranked, order = probs.sort(dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(x, dtype=torch.bool).scatter(-1, order, _ranked_keep(ranked, top_k, top_p, min_p))
    q = torch.where(keep, probs.double(), 0.0)
    q = q / q.sum(-1, keepdim=True)
    q = torch.where(greedy[:, None], torch.nn.functional.one_hot(x.argmax(-1), x.shape[1]).double(), q)
    return torch.where(_invalid_rows(x)[:, None], float("nan"), q)


def _position(i: int, logits, drafts, draft_probs, num_draft, temperature, top_k, top_p, min_p, seed, position,
              active, uniform):
    """Position i of every request: (token emitted at i or -1, accepted at i, stops at i)."""
    row = logits[:, i]
    q = target_probs(row, temperature, top_k, top_p, min_p)
    invalid = _invalid_rows(row.float())
    greedy = temperature == 0
    argmax = row.float().argmax(-1)
    is_draft = i < num_draft
    x = drafts[:, i].clamp(0, row.shape[1] - 1) if i < drafts.shape[1] else argmax
    if draft_probs is None or i >= draft_probs.shape[1]:  # no draft distribution (or the bonus row): one-hot
        p = torch.nn.functional.one_hot(x, row.shape[1]).double()
    else:
        p = draft_probs[:, i].double()
    counter = position + i
    u = uniform(seed, counter, ACCEPT_STREAM)
    passes = torch.where(greedy, x == argmax, u * p.gather(-1, x[:, None]).squeeze(-1) < q.gather(-1, x[:, None]).squeeze(-1))
    accept = active & is_draft & ~invalid & passes
    stop = active & ~accept
    residual = torch.where(is_draft[:, None], (q - p).clamp(min=0), q)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, q)  # rounding left no mass: the target itself
    residual = torch.nan_to_num(residual, nan=0.0)
    drawn = _first_above(residual, uniform(seed, counter, DRAW_STREAM) * residual.sum(-1))
    drawn = torch.where(greedy, argmax, drawn)
    drawn = torch.where(invalid, -1, drawn)
    token = torch.where(accept, x, torch.where(stop, drawn, -1))
    return token, accept, stop


def _loop(logits, drafts, draft_probs, num_draft, temperature, top_k, top_p, min_p, seed, position,
          uniform=rng.uniform):
    """The K + 1 positions in turn; ``uniform``: the generator's entry (rng.uniform: one launch on a
    GPU; its pure-torch form rng.uniform_torch, the same bits, for torch.compile)."""
    batch, rows = logits.shape[:2]
    active = torch.ones(batch, dtype=torch.bool, device=logits.device)
    tokens, emitted = [], torch.zeros(batch, dtype=torch.int64, device=logits.device)
    for i in range(rows):
        token, accept, stop = _position(i, logits, drafts, draft_probs, num_draft, temperature, top_k, top_p, min_p,
                                        seed, position, active, uniform)
        tokens.append(token)
        emitted += (accept | stop).long()
        active = accept
    return torch.stack(tokens, 1), emitted


@functools.cache
def _compiled():
    return torch.compile(functools.partial(_loop, uniform=rng.uniform_torch), dynamic=False)


def rejection_sample(target_logits: torch.Tensor, draft_token_ids: torch.Tensor, *, draft_probs=None, num_draft=None,
                     temperature=None, top_k=None, top_p=None, min_p=None, seed=0, position=0,
                     level: str | None = None) -> SpecDecodeOutput:
    """Accept or reject each request's draft tokens and emit its next tokens (module docstring).

    ``target_logits`` (batch, K + 1, vocab) float32/bfloat16/float16: row i scores draft i, row n
    (n = the request's number of drafts) gives the bonus token. ``draft_token_ids`` (batch, K)
    integers (entries at or after n are ignored). ``draft_probs`` (batch, K, vocab): the draft
    distributions the tokens were sampled from, or None (one-hot). ``num_draft``: a number or a
    (batch,) tensor in [0, K] (default K). ``temperature`` (0 = greedy), ``top_k``, ``top_p``,
    ``min_p``, ``seed``, ``position``: numbers or (batch,) tensors, as for ``sample``.
    ``level``: "loop", "compiled", "kernel" or None (the ``spec_decode`` flag chooses: module docstring).
    Returns :class:`SpecDecodeOutput`: at most K + 1 tokens per request, -1 after the last.
    """
    batch, rows, vocab = _check_shapes(target_logits, draft_token_ids, draft_probs)
    device = target_logits.device
    if level is None:
        level = "kernel" if _kernel_applies(target_logits, (top_k, top_p, min_p)) else "loop"
    if level not in LEVELS:
        raise ValueError(f"level: {level!r} is not one of {', '.join(LEVELS)}")
    n = _num_draft(num_draft, batch, rows - 1, device)
    drafts = draft_token_ids.to(device, torch.int64)
    if drafts.device.type == "cpu" and bool(((drafts < 0) | (drafts >= vocab))[
            torch.arange(rows - 1) < _rows(n, batch, device, torch.int64)[:, None]].any()):
        raise ValueError(f"draft_token_ids: a draft id outside [0, {vocab}) among the first num_draft of a request")
    rows_of = target_logits[:, 0]  # the sampler's checks of a setting, against one row per request
    settings = [_param(name, value, rows_of) for name, value in zip(_SETTINGS, (
        temperature, top_k, top_p, min_p, seed, position))]  # numbers, or (batch,) tensors on the device
    with nvtx.range("spec_decode"):
        if level == "kernel":
            return _kernel(target_logits, drafts, draft_probs, n, *settings)
        run = _compiled() if level == "compiled" else _loop
        tokens, emitted = run(target_logits, drafts, draft_probs, _rows(n, batch, device, torch.int64),
                              *(_rows(v, batch, device, _RANGES[name][0]) for name, v in zip(_SETTINGS, settings)))
        return SpecDecodeOutput(tokens, emitted)


_SETTINGS = ("temperature", "top_k", "top_p", "min_p", "seed", "position")


def _num_draft(value, batch: int, k: int, device) -> int | torch.Tensor:
    """``num_draft`` checked: K when None, a number in [0, K], or a (batch,) integer tensor on the logits' device."""
    if value is None:
        return k
    if isinstance(value, torch.Tensor):
        t = _checks.per_row("num_draft", value, batch, device, torch.int64)
        _checks.values_in("num_draft", t, 0, k, lo_open=False, hi_open=False)
        return t.contiguous()
    value = _checks.int64("num_draft", value)
    _checks.number_in("num_draft", value, 0, k)
    return value


def _filters_unset(filters) -> bool:
    """Whether top_k, top_p and min_p are all left off (None or their neutral number)."""
    return all(v is None or (not isinstance(v, torch.Tensor) and v == off) for v, off in zip(filters, (0, 1.0, 0.0)))


def _kernel_applies(logits: torch.Tensor, filters) -> bool:
    if not (flags.enabled("spec_decode") and logits.is_cuda and _filters_unset(filters)):
        return False
    kernel = kernels.load("spec_decode")
    return kernel is not None and logits.shape[-1] <= kernel.max_vocab()


def _kernel(logits, drafts, draft_probs, n, temperature, top_k, top_p, min_p, seed, position) -> SpecDecodeOutput:
    """level="kernel": one launch of csrc/spec_decode/ (temperature only: the filters must be unset).
    Settings given as numbers go to the kernel as numbers (no (batch,) tensors to fill)."""
    if not _filters_unset((top_k, top_p, min_p)):
        raise ValueError("level: 'kernel' takes a temperature only; top_k, top_p and min_p need 'loop' or 'compiled'")
    kernel = kernels.load("spec_decode") if logits.is_cuda else None
    if kernel is None:
        raise ValueError("level: 'kernel' needs CUDA tensors and a built extension; use 'loop' or 'compiled'")
    if logits.shape[-1] > kernel.max_vocab():
        raise ValueError(f"level: 'kernel' takes a vocab up to {kernel.max_vocab()}; use 'loop' or 'compiled'")
    batch, rows = logits.shape[:2]
    tokens = torch.empty(batch, rows, dtype=torch.int64, device=logits.device)
    emitted = torch.empty(batch, dtype=torch.int64, device=logits.device)
    split = lambda v: (v, 0) if isinstance(v, torch.Tensor) else (None, v)  # noqa: E731
    kernel.rejection_sample(logits.contiguous(), drafts.contiguous(),
                            None if draft_probs is None else draft_probs.float().contiguous(), *split(n),
                            *split(temperature), *split(seed), *split(position), tokens, emitted)
    return SpecDecodeOutput(tokens, emitted)


def _check_shapes(target_logits, draft_token_ids, draft_probs) -> tuple[int, int, int]:
    if not isinstance(target_logits, torch.Tensor) or target_logits.dim() != 3:
        raise ValueError("target_logits: expected a (batch, K + 1, vocab) tensor")
    _checks.logits_2d("target_logits", target_logits.flatten(0, 1))
    batch, rows, vocab = target_logits.shape
    if not isinstance(draft_token_ids, torch.Tensor) or draft_token_ids.shape != (batch, rows - 1) \
            or draft_token_ids.dtype.is_floating_point or draft_token_ids.dtype == torch.bool:
        raise ValueError(f"draft_token_ids: expected a ({batch}, {rows - 1}) integer tensor (K = target rows - 1)")
    if draft_probs is not None and (not isinstance(draft_probs, torch.Tensor) or draft_probs.shape != (batch, rows - 1, vocab)
                                    or not draft_probs.dtype.is_floating_point):
        raise ValueError(f"draft_probs: expected a ({batch}, {rows - 1}, {vocab}) float tensor or None")
    return batch, rows, vocab
