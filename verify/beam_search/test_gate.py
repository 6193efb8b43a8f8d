"""Gate of step beam_search: one beam step (beam 4), fused against the original."""
import torch

from engine import beam
from xllm_sampling import flags


def test_gate(check_gate, gate_device):
    batch, vocab = (64, 151936) if gate_device == "cuda" else (4, 32000)
    logits = torch.randn(batch * 4, vocab, device=gate_device)
    scores = -torch.rand(batch * 4, device=gate_device)

    def run(on):
        with flags.override(beam_search=on):
            beam.beam_step(logits, scores, 4)

    check_gate(run)
