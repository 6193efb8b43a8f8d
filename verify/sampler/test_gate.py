"""Gate of step sampler: every configuration users run (greedy, plain, top-k + top-p, top-p,
min-p, and penalties with top-k + top-p), the fast path against the sort-based original; the
worst ratio must pass."""
import torch

import xllm_sampling
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

    generated = torch.randint(0, vocab, (batch, 256), device=gate_device, generator=torch.Generator(gate_device).manual_seed(0))
    position = torch.arange(batch, device=gate_device)

    def penalties(on):  # the engine's sampling has no penalties: the op itself, behind the same flag
        with flags.override(sampler=on):
            xllm_sampling.sample(logits, temperature=0.8, top_k=50, top_p=0.9, seed=1, position=position,
                                 generated=generated, frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.2)

    runs = {name: configuration(*c) for name, c in CONFIGURATIONS.items()}
    check_gate(runs | {"penalties + top-k 50 + top-p 0.9": penalties})
