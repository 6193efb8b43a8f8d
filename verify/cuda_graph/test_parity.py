"""Parity of step cuda_graph: the engine's graph-replayed sampling step against eager, bit for bit."""
import pytest
import torch

from engine.decode import Engine
from engine.sampling import SamplingParams
from xllm_sampling import flags


def generate(engine, batch, temperature, flag):
    prompts = torch.randint(1, engine.cfg.vocab, (batch, 6), generator=torch.Generator().manual_seed(11))
    params = SamplingParams(torch.full((batch,), temperature), 20, 0.9, 0.0, torch.arange(batch, dtype=torch.int64) + 1)
    with flags.override(cuda_graph=flag):
        return engine.generate(prompts, 10, params)


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_graph_equals_eager(device, batch, temperature):
    engine = Engine(device=device)
    graphed = generate(engine, batch, temperature, True)
    eager = generate(engine, batch, temperature, False)
    assert torch.equal(graphed["tokens"], eager["tokens"])
    assert torch.equal(graphed["logprobs"], eager["logprobs"])
    runners = list(engine._sample_graphs.values())
    assert runners, "Engine.sample_step does not go through xllm_sampling.GraphRunner"
    if device == "cuda":
        assert sum(r.replays for r in runners) > 0 and sum(r.captures for r in runners) > 0
    else:
        assert sum(r.replays for r in runners) == 0 and sum(r.eager_calls for r in runners) > 0
