"""Gate of step sampler: every configuration users run (greedy, plain, top-k + top-p, top-p,
min-p), the fast path against the sort-based original; the worst ratio must pass."""
import torch

from engine import sampling
from engine.sampling import SamplingParams
from xllm_sampling import flags

CONFIGURATIONS = {  # temperature, top_k, top_p, min_p
    "greedy": (0.0, 0, 1.0, 0.0),
    "plain": (1.0, 0, 1.0, 0.0),
    "top-k 50 + top-p 0.9": (0.8, 50, 0.9, 0.0),
    "top-p 0.9": (0.8, 0, 0.9, 0.0),
    "min-p 0.1": (0.8, 0, 1.0, 0.1),
}


def test_gate(check_gate, gate_device):
    batch, vocab = (64, 151936) if gate_device == "cuda" else (8, 32000)
    logits = torch.randn(batch, vocab, device=gate_device) * 3

    def configuration(temperature, top_k, top_p, min_p):
        params = SamplingParams(torch.full((batch,), temperature), top_k, top_p, min_p, torch.arange(batch),
                                torch.zeros(batch, dtype=torch.int64))

        def run(on):
            with flags.override(sampler=on):
                sampling.sample_tokens(logits, params)

        return run

    check_gate({name: configuration(*c) for name, c in CONFIGURATIONS.items()})
