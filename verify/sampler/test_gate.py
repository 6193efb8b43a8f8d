"""Gate of step sampler: top-k 50 + top-p 0.9 sampling, sorting-free against the sort-based original."""
import torch

from engine import sampling
from engine.sampling import SamplingParams
from xllm_sampling import flags


def test_gate(check_gate, gate_device):
    batch, vocab = (64, 151936) if gate_device == "cuda" else (8, 32000)
    logits = torch.randn(batch, vocab, device=gate_device) * 3
    params = SamplingParams(torch.full((batch,), 0.8), 50, 0.9, 0.0, torch.arange(batch), torch.zeros(batch, dtype=torch.int64))

    def run(on):
        with flags.override(sampler=on):
            sampling.sample_tokens(logits, params)

    check_gate(run)
