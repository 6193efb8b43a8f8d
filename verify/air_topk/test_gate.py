"""Gate of step air_topk: the engine's top_k, fast path against torch.topk."""
import torch

from engine import sampling
from xllm_sampling import flags


def test_gate(check_gate, gate_device):
    batch, vocab = (64, 151936) if gate_device == "cuda" else (8, 32000)
    x = torch.randn(batch, vocab, device=gate_device)

    def run(on):
        with flags.override(air_topk=on):
            sampling.top_k(x, 50)

    check_gate(run)
