"""Gate of step nvtx: a decode with NVTX ranges on against the same decode with them off."""
import torch

from engine.decode import Engine
from engine.sampling import SamplingParams
from xllm_sampling import flags, gate


def test_gate(benchmark, gate_device, gate_threshold):
    engine = Engine(device=gate_device)
    batch = 8
    prompts = torch.randint(1, engine.cfg.vocab, (batch, 6))
    params = SamplingParams(torch.full((batch,), 0.8), 20, 0.9, 0.0, torch.arange(batch, dtype=torch.int64))

    def run(on):
        with flags.override(nvtx=on):
            engine.generate(prompts, 16, params)

    result = gate.measure(lambda: run(False), lambda: run(True), rounds=10, host_overhead=True)
    gate.record(benchmark, result, lambda: run(True))
    assert result.ratio < gate_threshold, f"fast/original = {result.ratio:.3f}, threshold {gate_threshold}"
