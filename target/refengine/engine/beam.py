"""Beam search in the style of Hugging Face transformers' classic BeamSearchScorer."""
import torch


def beam_step(logits: torch.Tensor, beam_scores: torch.Tensor, num_beams: int):
    """Scores of the 2 * num_beams best (beam, token) continuations per batch entry.

    Returns (scores, tokens, beams), each (batch, 2 * num_beams), best first.
    """
    rows, vocab = logits.shape
    scores = torch.log_softmax(logits.float(), -1) + beam_scores.reshape(-1, 1).float()
    top, flat = torch.topk(scores.view(rows // num_beams, num_beams * vocab), 2 * num_beams, dim=-1)
    return top, flat % vocab, flat // vocab


class Hypotheses:
    """The num_beams best finished sequences of one batch entry, scored with a length penalty."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: bool):
        self.num_beams, self.length_penalty, self.early_stopping = num_beams, length_penalty, early_stopping
        self.beams: list[tuple[float, list[int]]] = []

    def worst(self) -> float:
        return min(s for s, _ in self.beams) if self.beams else float("inf")

    def add(self, tokens: list[int], sum_logprobs: float) -> None:
        score = sum_logprobs / (len(tokens) ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst():
            self.beams.append((score, tokens))
            if len(self.beams) > self.num_beams:
                self.beams.remove(min(self.beams, key=lambda b: b[0]))

    def is_done(self, best_sum_logprobs: float, length: int) -> bool:
        if len(self.beams) < self.num_beams:
            return False
        if self.early_stopping:
            return True
        return self.worst() >= best_sum_logprobs / length ** self.length_penalty

    def best(self) -> list[int]:
        return max(self.beams, key=lambda b: b[0])[1]


def beam_search(step_logits, prompts: torch.Tensor, num_beams: int, max_new_tokens: int, eos: int,
                length_penalty: float = 1.0, early_stopping: bool = False) -> list[list[int]]:
    """Beam search over ``step_logits(tokens (rows, 1) or prompts, parent_rows) -> (rows, vocab)``.

    ``prompts`` is (batch, prompt_len); returns the best sequence (prompt included) per entry.
    """
    batch = prompts.shape[0]
    seqs = prompts.repeat_interleave(num_beams, 0).tolist()
    scores = torch.full((batch, num_beams), -1e9, device=prompts.device)
    scores[:, 0] = 0
    scores = scores.view(-1)
    hyps = [Hypotheses(num_beams, length_penalty, early_stopping) for _ in range(batch)]
    done = [False] * batch
    logits = step_logits(prompts.repeat_interleave(num_beams, 0), None)
    for _ in range(max_new_tokens):
        top, tokens, beams = (t.cpu() for t in beam_step(logits, scores, num_beams))
        next_scores, next_tokens, parents = [], [], []
        for b in range(batch):
            chosen = []
            for rank in range(2 * num_beams):
                token, score, row = int(tokens[b, rank]), float(top[b, rank]), b * num_beams + int(beams[b, rank])
                if done[b]:
                    chosen.append((0.0, 0, b * num_beams))
                elif token == eos:
                    if rank < num_beams:
                        hyps[b].add(seqs[row], score)
                    continue
                else:
                    chosen.append((score, token, row))
                if len(chosen) == num_beams:
                    break
            done[b] = done[b] or hyps[b].is_done(float(top[b].max()), len(seqs[b * num_beams]) + 1)
            for score, token, row in chosen:
                next_scores.append(score), next_tokens.append(token), parents.append(row)
        seqs = [seqs[r] + [t] for r, t in zip(parents, next_tokens)]
        if all(done):
            break
        scores = torch.tensor(next_scores, device=prompts.device)
        logits = step_logits(torch.tensor(next_tokens, device=prompts.device)[:, None], torch.tensor(parents))
    for b in range(batch):
        if not done[b]:
            for i in range(num_beams):
                hyps[b].add(seqs[b * num_beams + i], float(scores[b * num_beams + i]))
    return [hyps[b].best() for b in range(batch)]
