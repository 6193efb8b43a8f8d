"""Gate of step air_topk: the engine's top_k, fast path against torch.topk."""
import torch

from engine import sampling
from xllm_sampling import flags, gate


def test_gate(benchmark, gate_device, gate_threshold):
    batch, vocab = (64, 151936) if gate_device == "cuda" else (8, 32000)
    x = torch.randn(batch, vocab, device=gate_device)

    def run(on):
        with flags.override(air_topk=on):
            sampling.top_k(x, 50)

    result = gate.measure(lambda: run(False), lambda: run(True))
    gate.record(benchmark, result, lambda: run(True))
    assert result.ratio < gate_threshold, f"fast/original = {result.ratio:.3f}, threshold {gate_threshold}"
