"""The decode loop: prefill, then one token per step for every request of the batch."""
import torch

from .beam import beam_search
from .model import Config, KVCache, Llama
from .sampling import SamplingParams, sample_tokens, top_logprobs


class Engine:
    """A model on a device, generating with sampling or beam search."""

    def __init__(self, cfg: Config | None = None, device: str = "cpu"):
        self.cfg = cfg or Config()
        self.device = torch.device(device)
        self.model = Llama(self.cfg).to(self.device).eval()

    def sample_step(self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator):
        """Pick the next token of every request from its logits."""
        return sample_tokens(logits, params, generator)

    def generate(self, prompts: torch.Tensor, new_tokens: int, params: SamplingParams,
                 logprobs: int = 0) -> dict:
        """Generate ``new_tokens`` tokens for each row of ``prompts`` (batch, prompt_len).

        Returns the tokens (batch, new_tokens), their log-probabilities and, with ``logprobs`` > 0,
        the top ``logprobs`` alternatives of the last step.
        """
        prompts = prompts.to(self.device)
        batch = prompts.shape[0]
        cache = KVCache(self.cfg, batch, self.device)
        generator = torch.Generator(self.device).manual_seed(self.cfg.seed)
        logits = self.model(prompts, cache)
        tokens, token_logprobs = [], []
        for step in range(new_tokens):
            params.position = torch.full((batch,), prompts.shape[1] + step, dtype=torch.int64)
            next_tokens, next_logprobs = self.sample_step(logits, params, generator)
            tokens.append(next_tokens)
            token_logprobs.append(next_logprobs)
            if step + 1 < new_tokens:
                logits = self.model(next_tokens.clamp(min=0)[:, None], cache)
        result = {"tokens": torch.stack(tokens, 1), "logprobs": torch.stack(token_logprobs, 1)}
        if logprobs:
            result["top_logprobs"] = top_logprobs(logits, params.temperature.to(self.device), logprobs)
        return result

    def beam(self, prompts: torch.Tensor, num_beams: int, new_tokens: int, eos=0, length_penalty: float = 1.0,
             early_stopping=False, pad: int | None = None):
        """Beam search from each row of ``prompts``: (sequences (batch, num_beams, length), scores), best first.

        ``eos`` is a token id or a list of them (empty: none); ``early_stopping`` True, False or
        "never", as in transformers' ``generate``.
        """
        prompts = prompts.to(self.device)
        cache = KVCache(self.cfg, prompts.shape[0] * num_beams, self.device)

        def step_logits(tokens, parents):
            if parents is not None:
                cache.reorder(parents)
            return self.model(tokens, cache)

        return beam_search(step_logits, prompts, num_beams, new_tokens, eos, length_penalty, early_stopping, pad)
