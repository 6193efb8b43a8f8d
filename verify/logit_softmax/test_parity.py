"""Parity of step logit_softmax: the engine's logits_to_probs against a float64 reference."""
import pytest
import torch

import xllm_sampling
from engine import sampling
from engine.decode import Engine
from engine.sampling import SamplingParams
from xllm_sampling import flags, tolerances

SHAPES = [(1, 1), (1, 7), (3, 1000), (4, 32001), (2, 151936)]


def reference_temperature(temperature, dtype=torch.float64):
    return torch.where(temperature == 0, torch.ones_like(temperature), temperature).to(dtype)


def reference(logits, temperature, dtype=torch.float64):
    return torch.softmax(logits.to(dtype) / reference_temperature(temperature, dtype)[:, None], -1)


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
    # The SPEC's contract: torch's own float32 path, within 1e-6 (on CPU both are that path).
    assert (probs - reference(logits, temperature, torch.float32)).abs().max().item() <= 1e-6
    # Against float64, each probability is off by its normaliser's float32 sum, its exp and the
    # division (xllm_sampling.tolerances). torch's path sums in as few as 8 lanes on a CPU; the
    # CUDA kernel in at least 256 threads a row, each step an add, a rescaling multiply and an
    # exp2: counted as 64 lanes. Below the smallest normal float32 the spacing is absolute.
    kernel = device == "cuda" and flag
    scaled = (logits.double() / reference_temperature(temperature)[:, None]).abs().max().item()
    bound = tolerances.softmax_relative_error(shape[1], scaled, lanes=64 if kernel else tolerances.TORCH_CPU_LANES)
    ref = reference(logits, temperature)
    error = (probs.double() - ref).abs()
    worst = (error - bound * ref).max().item()
    assert worst <= tolerances.SMALLEST_NORMAL, f"error exceeds {bound:.2e} x p by {worst:.2e}"
    # The rows' sums: the same relative bound (sum of p_i (1 + e_i), |e_i| <= bound; summed in float64).
    assert (probs.double().sum(-1) - 1).abs().max().item() <= bound


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
    assert torch.allclose(probs[3], expected[3], atol=1e-6)  # the SPEC's 1e-6 against torch's float32 path


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
    # each side within the SPEC's 1e-6 of torch's float32 probabilities (the same code on CPU)
    assert (on_logp.exp() - off_logp.exp()).abs().max().item() <= 2e-6
