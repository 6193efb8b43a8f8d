"""Step 4, ``beam_search``: one step of Hugging Face transformers' vectorised beam search, in place.

:class:`BeamSearchState` holds a batch's search in device tensors: the running beams' cumulative
log-probabilities, each step's chosen token and parent beam (a history that the sequences are
read back from at the end, so no step copies sequences), the pool of finished hypotheses and
the flags of the stopping rule. :func:`beam_search_step` advances it by one token with the
semantics of ``transformers.GenerationMixin._beam_search`` (transformers 4.50 and later):

1. log-softmax in float32, plus each beam's cumulative score; at the first step only beam 0 is
   live (the others start at -1e9);
2. the top C = max(2, 1 + number of EOS ids) x beams continuations over beams x vocab;
3. a continuation "hits" when its token is an EOS id or the sequence reaches ``max_length``;
   the best ``num_beams`` continuations that do not hit become the running beams (hits count
   -1e9, as in transformers);
4. hits ranked inside the top ``num_beams`` enter the finished pool, scored
   cumulative / (generated length including the EOS) ** length_penalty (the prompt does not
   count), unless the request is done: ``early_stopping=True`` and a full pool, or the
   early-stop heuristic (``False``: the best running beam at the current length cannot beat
   the worst finished; ``"never"``: at ``max_length`` when length_penalty > 0) says no running
   beam can improve the pool;
5. the search is over (:meth:`BeamSearchState.done`) when no request can improve, or every
   pool is full under ``early_stopping=True``, or every continuation of the step hit.

Flag on with a CUDA device: two kernels, no host synchronisation, capturable in a CUDA graph;
the beams x vocab log-probabilities are read once and never written. Ties (equal scores) are
ranked by lower beam, then lower token; the torch path (flag off, CPU) ranks them as
``torch.topk`` does. A beam row with a NaN logit, or only -inf logits, contributes no
continuation (all its scores are -inf).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _checks, kernels, nvtx

NEG = -1.0e9  # transformers' score of a dead beam or an empty pool slot
MAX_BEAMS = 32
EARLY_STOPPING = {False: 0, True: 1, "never": 2}


@dataclass
class BeamSearchState:
    """A batch's beam search: configuration (host) and state (device tensors, updated in place).

    Shapes: B requests, W = ``num_beams``, N = ``max_length - prompt_len`` new tokens at most.
    ``history_tokens[b, w, t]`` / ``history_parents[b, w, t]`` are running beam w's token and
    parent beam (in [0, W)) after step t; a pool slot holds the step it finished at
    (``pool_step``, -1 when empty), the running beam it extends (``pool_parent``, at the step
    before) and its last token (``pool_token``).
    """

    num_beams: int
    prompt_len: int
    max_length: int
    eos: tuple[int, ...]
    length_penalty: float
    early_stopping: bool | str
    eos_ids: torch.Tensor  # (len(eos),) int64
    steps: torch.Tensor  # () int64: steps taken (a device counter, so graph replays advance it)
    running_scores: torch.Tensor  # (B, W) float32
    history_tokens: torch.Tensor  # (B, W, N) int64
    history_parents: torch.Tensor  # (B, W, N) int64
    pool_scores: torch.Tensor  # (B, W) float32, best first
    pool_finished: torch.Tensor  # (B, W) bool
    pool_step: torch.Tensor  # (B, W) int64
    pool_parent: torch.Tensor  # (B, W) int64
    pool_token: torch.Tensor  # (B, W) int64
    improvable: torch.Tensor  # (B,) bool: the early-stop heuristic still unsatisfied
    all_hit: torch.Tensor  # (B,) bool: every continuation of the last step hit

    @classmethod
    def start(cls, batch: int, num_beams: int, prompt_len: int, max_length: int, eos=(),
              length_penalty: float = 1.0, early_stopping: bool | str = False, device="cpu") -> BeamSearchState:
        """A fresh search of ``batch`` requests whose prompts have ``prompt_len`` tokens."""
        _check_config(batch, num_beams, prompt_len, max_length, eos, length_penalty, early_stopping)
        eos = (eos,) if isinstance(eos, int) else tuple(eos)
        device = torch.device(device)
        b, w, n = batch, num_beams, max_length - prompt_len
        running = torch.full((b, w), NEG, device=device)
        running[:, 0] = 0
        full = lambda value, shape, dtype: torch.full(shape, value, dtype=dtype, device=device)  # noqa: E731
        return cls(num_beams, prompt_len, max_length, eos, float(length_penalty), early_stopping,
                   torch.tensor(eos, dtype=torch.int64, device=device), torch.zeros((), dtype=torch.int64, device=device),
                   running, full(-1, (b, w, n), torch.int64), full(-1, (b, w, n), torch.int64),
                   full(NEG, (b, w), torch.float32), full(False, (b, w), torch.bool), full(-1, (b, w), torch.int64),
                   full(-1, (b, w), torch.int64), full(-1, (b, w), torch.int64), full(True, (b,), torch.bool),
                   full(False, (b,), torch.bool))

    def done(self) -> bool:
        """Whether the search is over (transformers' stopping rule; reads the device: one sync)."""
        full = bool(self.pool_finished.all()) and self.early_stopping is True
        return not bool(self.improvable.any()) or full or bool(self.all_hit.all())

    def last_tokens(self, step: int) -> torch.Tensor:
        """(B * W,) the running beams' tokens after ``step`` (the next model input)."""
        return self.history_tokens[:, :, step].reshape(-1)

    def last_parents(self, step: int) -> torch.Tensor:
        """(B * W,) the flat row (request * W + beam) each running beam extends at ``step`` (KV-cache order)."""
        offsets = torch.arange(self.running_scores.shape[0], device=self.running_scores.device)[:, None] * self.num_beams
        return (self.history_parents[:, :, step] + offsets).reshape(-1)

    def results(self, prompts: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool, best first: sequences (B, W, L) padded with ``pad`` and scores (B, W).

        L = prompt + the longest hypothesis, as transformers trims ``generate``'s output. Each
        hypothesis is read back from the history, from its last token to its first.
        """
        steps = self.pool_step
        length = int(steps.max()) + 1
        out = torch.full((*steps.shape, length), pad, dtype=torch.int64, device=steps.device)
        beam = self.pool_parent.clamp(min=0)
        for t in range(length - 1, -1, -1):
            inside = steps > t
            ancestor = torch.where(inside, self.history_tokens[:, :, t].gather(1, beam), pad)
            out[:, :, t] = torch.where(steps == t, self.pool_token, ancestor)
            beam = torch.where(inside, self.history_parents[:, :, t].gather(1, beam), beam)
        b, w = steps.shape
        sequences = torch.cat((prompts.to(steps.device)[:, None, :].expand(b, w, -1), out), -1)
        return sequences, self.pool_scores.clone()


def _check_config(batch, num_beams, prompt_len, max_length, eos, length_penalty, early_stopping) -> None:
    for name, value, lo in (("batch", batch, 1), ("num_beams", num_beams, 1), ("prompt_len", prompt_len, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {value!r}")
    if num_beams > MAX_BEAMS:
        raise ValueError(f"num_beams: at most {MAX_BEAMS}, got {num_beams}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= prompt_len:
        raise ValueError(f"max_length: expected an int above prompt_len={prompt_len}, got {max_length!r}")
    ids = (eos,) if isinstance(eos, int) else eos
    if not isinstance(ids, (tuple, list)) or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids):
        raise ValueError(f"eos: expected a token id or a list of token ids >= 0, got {eos!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise ValueError(f"length_penalty: expected a number, got {length_penalty!r}")
    if not any(early_stopping is key for key in (True, False)) and early_stopping != "never":
        raise ValueError(f"early_stopping: expected True, False or 'never', got {early_stopping!r}")


def num_candidates(state) -> int:
    """C: continuations kept per request and step, max(2, 1 + number of EOS ids) x beams."""
    return max(2, 1 + len(state.eos)) * state.num_beams


def _check(logits, state) -> None:
    _checks.logits_2d("logits", logits)
    rows, vocab = logits.shape
    batch = state.running_scores.shape[0]
    if rows != batch * state.num_beams:
        raise ValueError(f"logits: expected {batch} x {state.num_beams} = {batch * state.num_beams} rows "
                         f"(requests x beams), got {rows}")
    if num_candidates(state) > state.num_beams * vocab:
        raise ValueError(f"logits: a vocab of {vocab} has fewer than the {num_candidates(state)} continuations a step keeps")
    if state.running_scores.device != logits.device:
        raise ValueError(f"logits: on {logits.device} but the beam state is on {state.running_scores.device}")


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax of each row; a row with a NaN logit or only -inf logits gives -inf everywhere."""
    x = torch.log_softmax(logits.float(), -1)
    return x.masked_fill(torch.isnan(x).any(-1, keepdim=True), float("-inf"))


def candidates(logits: torch.Tensor, running_scores: torch.Tensor, count: int):
    """The ``count`` best continuations of each request: (scores, beams, tokens), each (B, count), best first."""
    b, w = running_scores.shape
    vocab = logits.shape[1]
    acc = (log_probs(logits).view(b, w, vocab) + running_scores[:, :, None]).view(b, w * vocab)
    top, flat = torch.topk(acc, count, dim=-1)
    return top, flat // vocab, flat % vocab


def advance(state: BeamSearchState, top: torch.Tensor, beams: torch.Tensor, tokens: torch.Tensor) -> None:
    """Steps 3-5 of the module docstring on the step's ranked continuations (transformers' arithmetic).

    The step counter stays on the device (no host read), so a CUDA graph can capture this step too.
    """
    w, step = state.num_beams, state.steps
    generated = step + 1  # tokens generated once this step's token is appended
    hit = torch.isin(tokens, state.eos_ids) | (generated + state.prompt_len >= state.max_length)
    # running beams: the best W continuations, hits pushed down by -1e9
    running = top + hit.to(torch.float32) * NEG
    keep = torch.topk(running, w, dim=-1).indices
    state.running_scores.copy_(running.gather(-1, keep))
    state.history_tokens.index_copy_(2, step.view(1), tokens.gather(-1, keep)[:, :, None])
    state.history_parents.index_copy_(2, step.view(1), beams.gather(-1, keep)[:, :, None])
    # finished pool: hits ranked inside the top W, unless the request is done
    just = hit.clone()
    just[:, w:] = False
    score = top / _length_penalty(generated, state.length_penalty)
    score += (state.pool_finished.all(-1, keepdim=True) & (state.early_stopping is True)).to(torch.float32) * NEG
    score += (~state.improvable[:, None]).to(torch.float32) * NEG
    score += (~just).to(torch.float32) * NEG
    pick = torch.topk(torch.cat((state.pool_scores, score), -1), w, dim=-1).indices
    for pool, new in ((state.pool_scores, score), (state.pool_finished, just),
                      (state.pool_step, step.expand_as(tokens)), (state.pool_parent, beams),
                      (state.pool_token, tokens)):
        pool.copy_(torch.cat((pool, new), -1).gather(-1, pick))
    # the early-stop heuristic, at the new length
    never = state.early_stopping == "never" and state.length_penalty > 0.0
    best_length = torch.full_like(step, state.max_length - state.prompt_len) if never else generated
    best = state.running_scores[:, :1] / _length_penalty(best_length, state.length_penalty)
    worst = torch.where(state.pool_finished, state.pool_scores.min(-1, keepdim=True).values, NEG)
    state.improvable &= (best > worst).any(-1)
    state.all_hit.copy_(hit.all(-1))
    state.steps += 1


def _length_penalty(length: torch.Tensor, penalty: float) -> torch.Tensor:
    """``length ** penalty`` (a 0-d device tensor) as transformers computes it on the host: in
    double precision, rounded to float32 by the division it divides."""
    return length.double() ** penalty


def original(logits: torch.Tensor, state: BeamSearchState) -> None:
    """The torch step: full float32 log-probabilities, torch.topk over beams x vocab, then :func:`advance`."""
    advance(state, *candidates(logits, state.running_scores, num_candidates(state)))


def _fast(logits: torch.Tensor, state: BeamSearchState) -> None:
    kernel = kernels.load("beam_search") if logits.is_cuda else None
    count = num_candidates(state)
    if kernel is None or logits.shape[1] >= 2 ** 31 // state.num_beams or count > kernel.max_candidates():
        return original(logits, state)
    kernel.beam_step(logits.contiguous(), state.eos_ids, state.steps, state.running_scores, state.history_tokens,
                     state.history_parents, state.pool_scores, state.pool_finished, state.pool_step, state.pool_parent,
                     state.pool_token, state.improvable, state.all_hit, state.num_beams, count,
                     state.prompt_len, state.max_length, state.length_penalty, EARLY_STOPPING[state.early_stopping])


def beam_search_step(logits: torch.Tensor, state: BeamSearchState) -> None:
    """Advance every request's beams by one token, updating ``state`` in place.

    Args:
        logits: (B * W, vocab) float32/bf16/fp16, the running beams' next-token logits in the
            state's beam order (beams of one request adjacent).
        state: a :class:`BeamSearchState` (or an object with its fields), as
            :meth:`BeamSearchState.start` made it or the previous step left it. The next model
            input is ``state.last_tokens(step)``, its KV-cache rows ``state.last_parents(step)``.

    Flag ``beam_search`` off, or no CUDA device: the torch step (:func:`original`).
    """
    _check(logits, state)
    on, span = nvtx.op_call("beam_search")
    with span:
        if on:
            return _fast(logits, state)
        return original(logits, state)
