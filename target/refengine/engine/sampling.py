"""The engine's sampling: logits to probabilities, top-k log-probabilities, token sampling.

Each function is one call site that the xllm-sampling series may replace.
"""
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """Per-request parameters, one entry per row (host tensors)."""

    temperature: torch.Tensor  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: torch.Tensor | None = None  # per-request seeds
    position: torch.Tensor | None = None  # per-request decode positions


def logits_to_probs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Softmax of logits / temperature (0 read as 1), in float32."""
    t = torch.where(temperature == 0, torch.ones_like(temperature), temperature)
    return torch.softmax(logits.float() / t[:, None], dim=-1)


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row, largest first."""
    return torch.topk(x, k, dim=-1, sorted=True)


def top_logprobs(logits: torch.Tensor, temperature: torch.Tensor, k: int):
    """The k most likely tokens of each row and their log-probabilities (returned with a response)."""
    probs, tokens = top_k(logits_to_probs(logits, temperature), k)
    return probs.log(), tokens


def sample_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None):
    """One token per row: greedy where temperature is 0, else top-k / top-p / min-p sampling.

    Sorts each row's probabilities, masks by rank (top-k), by cumulative mass (top-p) and by
    the ratio to the largest (min-p), and draws with torch.multinomial. Returns (tokens,
    logprobs); a row with NaN or +inf logits, or all -inf, gives token -1.
    """
    x = logits.float()
    temperature = params.temperature.to(x.device)
    t = torch.where(temperature == 0, torch.ones_like(temperature), temperature)
    logp = torch.log_softmax(x / t[:, None], -1)
    probs = logp.exp()
    sorted_p, sorted_i = probs.sort(dim=-1, descending=True, stable=True)
    vocab = x.shape[1]
    k = params.top_k if 0 < params.top_k < vocab else vocab
    keep = (torch.arange(vocab, device=x.device) < k).expand_as(x).clone()
    kept = sorted_p * keep
    keep &= kept.cumsum(-1) - kept < params.top_p * kept.sum(-1, keepdim=True)
    keep &= sorted_p >= params.min_p * sorted_p[:, :1]
    filtered = torch.nan_to_num(torch.where(keep, sorted_p, torch.zeros_like(sorted_p)), nan=0.0)
    filtered[:, 0] += (filtered.sum(-1) == 0).float()
    tokens = sorted_i.gather(-1, torch.multinomial(filtered, 1, generator=generator)).squeeze(-1)
    tokens = torch.where(temperature == 0, x.argmax(-1), tokens)
    invalid = torch.isnan(x).any(-1) | torch.isposinf(x).any(-1) | torch.isneginf(x).all(-1)
    tokens = torch.where(invalid, torch.full_like(tokens, -1), tokens)
    return tokens, logp.gather(-1, tokens.clamp(min=0)[:, None]).squeeze(-1)
