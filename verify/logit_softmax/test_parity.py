"""Parity of step logit_softmax: the engine's logits_to_probs against a float64 reference."""
import pytest
import torch

import xllm_sampling
from engine import sampling
from engine.decode import Engine
from engine.sampling import SamplingParams
from xllm_sampling import flags

SHAPES = [(1, 1), (1, 7), (3, 1000), (4, 32001), (2, 151936)]


def reference(logits, temperature, dtype=torch.float64):
    t = torch.where(temperature == 0, torch.ones_like(temperature), temperature).to(dtype)
    return torch.softmax(logits.to(dtype) / t[:, None], -1)


def test_call_site_uses_the_op(spy):
    calls = spy(xllm_sampling, "logit_softmax")
    sampling.logits_to_probs(torch.randn(2, 10), torch.ones(2))
    assert len(calls) == 1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flag", [True, False])
def test_matches_float64_reference(device, shape, dtype, flag):
    logits = (torch.randn(shape, device=device) * 4).to(dtype)
    temperature = torch.rand(shape[0], device=device) + 0.3
    temperature[0] = 0.0  # read as 1
    with flags.override(logit_softmax=flag):
        probs = sampling.logits_to_probs(logits, temperature)
    assert probs.dtype == torch.float32 and probs.shape == shape
    # The SPEC's contract: torch's own float32 path, within 1e-6.
    assert (probs - reference(logits, temperature, torch.float32)).abs().max().item() <= 1e-6
    # Against float64: the CUDA kernel's tree reductions hold 1e-6 absolute. torch's own float32
    # path (CPU, and the flag-off path) sums 150k terms in float32: its normaliser is off by up to
    # ~1e-4 relative (2.5e-5 absolute was seen in CI), so it is held to a relative bound instead.
    kernel = device == "cuda" and flag
    ref = reference(logits, temperature)
    error = (probs.double() - ref).abs()
    assert error.max().item() <= 1e-6 if kernel else (error <= 1e-6 + 2e-4 * ref).all()
    assert (probs.double().sum(-1) - 1).abs().max().item() <= (1e-5 if kernel else 3e-5)


def test_neg_inf_gives_zero_and_bad_rows_follow_torch(device):
    logits = torch.randn(4, 257, device=device)
    logits[0, ::3] = float("-inf")
    logits[1] = float("-inf")
    logits[2, 5] = float("nan")
    t = torch.ones(4, device=device)
    probs = sampling.logits_to_probs(logits, t)
    assert (probs[0, ::3] == 0).all()
    expected = torch.softmax(logits, -1)
    assert torch.equal(probs[1:3].isnan(), expected[1:3].isnan()) and probs[1:3].isnan().all()
    assert torch.allclose(probs[3], expected[3], atol=1e-6)


def test_decode_loop_calls_the_op_and_keeps_the_greedy_tokens(device, spy):
    """The engine's greedy decode loop, asked for top log-probabilities, goes through the op; with
    the flag on it gives the flag-off tokens and the same top alternatives."""
    engine = Engine(device=device)
    prompts = torch.randint(1, engine.cfg.vocab, (4, 6), generator=torch.Generator().manual_seed(5))
    calls = spy(xllm_sampling, "logit_softmax")
    runs = {}
    for flag in (True, False):
        with flags.override(logit_softmax=flag):
            runs[flag] = engine.generate(prompts, 8, SamplingParams(torch.zeros(4)), logprobs=5)
    assert len(calls) == 2
    on, off = runs[True], runs[False]
    assert torch.equal(on["tokens"], off["tokens"])
    (on_logp, on_tokens), (off_logp, off_tokens) = on["top_logprobs"], off["top_logprobs"]
    assert torch.equal(on_tokens, off_tokens)
    assert (on_logp.exp() - off_logp.exp()).abs().max().item() <= 2e-6
