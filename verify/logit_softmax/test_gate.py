"""Gate of step logit_softmax: the engine's logits_to_probs, fast path against the original."""
import torch

from engine import sampling
from xllm_sampling import flags


def test_gate(check_gate, gate_device):
    batch, vocab = (64, 151936) if gate_device == "cuda" else (8, 32000)
    logits = torch.randn(batch, vocab, device=gate_device)
    temperature = torch.full((batch,), 0.7, device=gate_device)

    def run(on):
        with flags.override(logit_softmax=on):
            sampling.logits_to_probs(logits, temperature)

    check_gate(run)
