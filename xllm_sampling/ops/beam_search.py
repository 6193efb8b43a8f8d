"""Step 4, ``beam_search``: one beam-search step, log-softmax + cumulative score + top-2W in one op.

The fast path never materialises the (batch, beams * vocab) log-probabilities: a beam's
contribution to the batch's top-2W is inside that beam's own top-2W logits (log-softmax is a
per-row shift), so it takes the top-2W logits of each beam row, shifts them by the row's
log-sum-exp and the beam's score, and selects the top-2W of those 2W * W candidates.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _checks, flags, nvtx
from .air_topk import air_topk_last_dim


class BeamStep(NamedTuple):
    """The batch's 2 * num_beams best continuations, best first: (batch, 2 * num_beams) each."""

    scores: torch.Tensor  # float32 cumulative log-probabilities
    tokens: torch.Tensor  # int64 token ids
    beams: torch.Tensor  # int64 parent beam within the batch entry, in [0, num_beams)


def _check(logits, beam_scores, num_beams: int) -> None:
    _checks.logits_2d("logits", logits)
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams: expected an int >= 1, got {num_beams!r}")
    rows, vocab = logits.shape
    if rows % num_beams:
        raise ValueError(f"logits: {rows} rows is not a multiple of num_beams={num_beams}")
    if 2 * num_beams > vocab * num_beams:
        raise ValueError(f"num_beams: 2 * {num_beams} candidates need a vocab of at least 2, got {vocab}")
    shapes = ((rows,), (rows // num_beams, num_beams))
    if not isinstance(beam_scores, torch.Tensor) or tuple(beam_scores.shape) not in shapes:
        got = tuple(beam_scores.shape) if isinstance(beam_scores, torch.Tensor) else type(beam_scores).__name__
        raise ValueError(f"beam_scores: expected shape {shapes[0]} or {shapes[1]} (batch, num_beams), got {got}")
    if beam_scores.device != logits.device:
        raise ValueError(f"beam_scores: on {beam_scores.device} but logits are on {logits.device}")
    if not beam_scores.dtype.is_floating_point:
        raise ValueError(f"beam_scores: expected a float tensor, got {beam_scores.dtype}")


def original(logits: torch.Tensor, beam_scores: torch.Tensor, num_beams: int) -> BeamStep:
    """The engine's original step: full log-softmax, add scores, top-2W over beams * vocab."""
    rows, vocab = logits.shape
    scores = torch.log_softmax(logits.float(), -1) + beam_scores.reshape(-1, 1).float()
    top, flat = torch.topk(scores.view(rows // num_beams, num_beams * vocab), 2 * num_beams, dim=-1)
    return BeamStep(top, flat % vocab, flat // vocab)


def _fast(logits: torch.Tensor, beam_scores: torch.Tensor, num_beams: int) -> BeamStep:
    rows, vocab = logits.shape
    width = min(2 * num_beams, vocab)
    x = logits.float()
    top_logits, top_tokens = air_topk_last_dim(x, width, sorted_by_value=False)
    shift = beam_scores.reshape(-1, 1).float() - torch.logsumexp(x, -1, keepdim=True)
    candidates = (top_logits + shift).view(rows // num_beams, num_beams * width)
    scores, pos = torch.topk(candidates, 2 * num_beams, dim=-1)
    tokens = top_tokens.view(rows // num_beams, num_beams * width).gather(-1, pos)
    return BeamStep(scores, tokens, pos // width)


def beam_search_step(logits: torch.Tensor, beam_scores: torch.Tensor, num_beams: int) -> BeamStep:
    """Score every (beam, token) continuation and keep the 2 * num_beams best per batch entry.

    Args:
        logits: (batch * num_beams, vocab) float32/bf16/fp16, beams of one entry adjacent.
        beam_scores: (batch * num_beams,) or (batch, num_beams) cumulative log-probabilities.
        num_beams: beams per batch entry.

    Flag ``beam_search`` off: the original torch step.
    """
    _check(logits, beam_scores, num_beams)
    with nvtx.range("beam_search"):
        if flags.enabled("beam_search"):
            return _fast(logits, beam_scores, num_beams)
        return original(logits, beam_scores, num_beams)
