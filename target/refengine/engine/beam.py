"""Beam search with the semantics of Hugging Face transformers' vectorised ``_beam_search``.

The state lives in tensors on the model's device: running beams' scores, each step's token and
parent beam (sequences are read back from this history at the end), the pool of finished
hypotheses and the flags of the stopping rule.
"""
from dataclasses import dataclass

import torch

NEG = -1.0e9  # the score of a dead beam or an empty pool slot


@dataclass
class BeamState:
    """A batch's search: B requests, W beams, N = max_length - prompt_len new tokens at most."""

    num_beams: int
    prompt_len: int
    max_length: int
    eos: tuple
    length_penalty: float
    early_stopping: object  # True, False or "never"
    eos_ids: torch.Tensor  # (len(eos),)
    steps: torch.Tensor  # () steps taken
    running_scores: torch.Tensor  # (B, W) cumulative log-probabilities of the running beams
    history_tokens: torch.Tensor  # (B, W, N) token of running beam w after step t
    history_parents: torch.Tensor  # (B, W, N) its parent beam (in [0, W)) at step t - 1
    pool_scores: torch.Tensor  # (B, W) finished hypotheses' length-penalised scores, best first
    pool_finished: torch.Tensor  # (B, W) whether the slot holds a finished hypothesis
    pool_step: torch.Tensor  # (B, W) the step it ended at (-1: empty)
    pool_parent: torch.Tensor  # (B, W) the running beam it extends, at the step before
    pool_token: torch.Tensor  # (B, W) its last token
    improvable: torch.Tensor  # (B,) a running beam may still beat the pool
    all_hit: torch.Tensor  # (B,) every continuation of the last step ended

    @classmethod
    def start(cls, batch, num_beams, prompt_len, max_length, eos, length_penalty, early_stopping, device):
        b, w, n = batch, num_beams, max_length - prompt_len
        running = torch.full((b, w), NEG, device=device)
        running[:, 0] = 0

        def full(value, shape, dtype=torch.int64):
            return torch.full(shape, value, dtype=dtype, device=device)

        return cls(num_beams, prompt_len, max_length, tuple(eos), float(length_penalty), early_stopping,
                   torch.tensor(tuple(eos), dtype=torch.int64, device=device), full(0, ()), running,
                   full(-1, (b, w, n)), full(-1, (b, w, n)), full(NEG, (b, w), torch.float32),
                   full(False, (b, w), torch.bool), full(-1, (b, w)), full(-1, (b, w)), full(-1, (b, w)),
                   full(True, (b,), torch.bool), full(False, (b,), torch.bool))

    def done(self) -> bool:
        full = bool(self.pool_finished.all()) and self.early_stopping is True
        return not bool(self.improvable.any()) or full or bool(self.all_hit.all())

    def results(self, prompts: torch.Tensor, pad: int):
        """Sequences (B, W, prompt + longest hypothesis) padded with ``pad``, and scores (B, W)."""
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
        return torch.cat((prompts[:, None, :].expand(b, w, -1), out), -1), self.pool_scores.clone()


def beam_step(logits: torch.Tensor, state: BeamState) -> None:
    """Advance every request's beams by one token (transformers' step), updating ``state``."""
    b, w = state.running_scores.shape
    vocab = logits.shape[1]
    logp = torch.log_softmax(logits.float(), -1)
    logp = logp.masked_fill(torch.isnan(logp).any(-1, keepdim=True), float("-inf"))
    acc = (logp.view(b, w, vocab) + state.running_scores[:, :, None]).view(b, w * vocab)
    top, flat = torch.topk(acc, max(2, 1 + len(state.eos)) * w, dim=-1)
    beams, tokens = flat // vocab, flat % vocab
    step = int(state.steps)
    cur_len = state.prompt_len + step
    hit = torch.isin(tokens, state.eos_ids) | (cur_len + 1 >= state.max_length)
    running = top + hit.to(torch.float32) * NEG
    keep = torch.topk(running, w, dim=-1).indices
    state.running_scores.copy_(running.gather(-1, keep))
    state.history_tokens[:, :, step] = tokens.gather(-1, keep)
    state.history_parents[:, :, step] = beams.gather(-1, keep)
    just = hit.clone()
    just[:, w:] = False
    score = top / ((cur_len + 1 - state.prompt_len) ** state.length_penalty)
    score += (state.pool_finished.all(-1, keepdim=True) & (state.early_stopping is True)).to(torch.float32) * NEG
    score += (~state.improvable[:, None]).to(torch.float32) * NEG
    score += (~just).to(torch.float32) * NEG
    pick = torch.topk(torch.cat((state.pool_scores, score), -1), w, dim=-1).indices
    for pool, new in ((state.pool_scores, score), (state.pool_finished, just),
                      (state.pool_step, torch.full_like(tokens, step)), (state.pool_parent, beams),
                      (state.pool_token, tokens)):
        pool.copy_(torch.cat((pool, new), -1).gather(-1, pick))
    cur_len += 1
    never = state.early_stopping == "never" and state.length_penalty > 0.0
    best = state.running_scores[:, :1] / (((state.max_length if never else cur_len) - state.prompt_len) ** state.length_penalty)
    worst = torch.where(state.pool_finished, state.pool_scores.min(-1, keepdim=True).values, NEG)
    state.improvable &= (best > worst).any(-1)
    state.all_hit.copy_(hit.all(-1))
    state.steps += 1


def beam_search(step_logits, prompts: torch.Tensor, num_beams: int, max_new_tokens: int, eos=(),
                length_penalty: float = 1.0, early_stopping=False, pad: int | None = None):
    """Beam search over ``step_logits(tokens (rows, 1) or prompts, parent_rows) -> (rows, vocab)``.

    ``prompts`` is (batch, prompt_len). Returns the finished hypotheses, best first: sequences
    (batch, num_beams, length) with the prompt, padded with ``pad`` (default: the first EOS id,
    else -1), and their scores (batch, num_beams).
    """
    eos = (eos,) if isinstance(eos, int) else tuple(eos)
    batch, prompt_len = prompts.shape
    state = BeamState.start(batch, num_beams, prompt_len, prompt_len + max_new_tokens, eos, length_penalty,
                            early_stopping, prompts.device)
    offsets = torch.arange(batch, device=prompts.device)[:, None] * num_beams
    logits = step_logits(prompts.repeat_interleave(num_beams, 0), None)
    for step in range(max_new_tokens):
        beam_step(logits, state)
        if state.done():
            break
        parents = (state.history_parents[:, :, step] + offsets).reshape(-1)
        logits = step_logits(state.history_tokens[:, :, step].reshape(-1, 1), parents)
    return state.results(prompts, pad if pad is not None else (eos[0] if eos else -1))
