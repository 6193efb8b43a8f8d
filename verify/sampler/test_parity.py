"""Parity of step sampler: the engine's sample_tokens against a float64 sort-based reference."""
import math

import pytest
import torch

import xllm_sampling
from engine import sampling
from engine.sampling import SamplingParams
from xllm_sampling import flags, tolerances

CASES = [  # vocab, top_k, top_p, min_p
    (16, 0, 1.0, 0.0), (50, 10, 0.8, 0.05), (1000, 50, 0.9, 0.0), (2000, 0, 0.5, 0.0), (3001, 1500, 0.95, 0.01),
]


def params(batch, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, position=None):
    position = torch.arange(batch, dtype=torch.int64) if position is None else position
    return SamplingParams(torch.full((batch,), float(temperature)), top_k, top_p, min_p,
                          torch.full((batch,), seed, dtype=torch.int64), position)


def reference_distribution(row, top_k, top_p, min_p):
    """The filtered, renormalised distribution of one row, in float64, by full sort."""
    p = torch.softmax(row.double(), -1)
    sp, order = p.sort(descending=True, stable=True)
    keep = torch.arange(len(p)) < (top_k if 0 < top_k < len(p) else len(p))
    kept = sp * keep
    keep &= kept.cumsum(-1) - kept < top_p * kept.sum()
    keep &= sp >= min_p * sp[0]
    out = torch.zeros_like(p)
    out[order[keep]] = sp[keep]
    return out / out.sum()


def chi_square_critical(df, z=3.719):  # upper 1e-4 quantile, Wilson-Hilferty
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_call_site_uses_the_op(spy):
    calls = spy(xllm_sampling, "sample")
    sampling.sample_tokens(torch.randn(2, 10), params(2))
    assert len(calls) == 1


@pytest.mark.parametrize("vocab", [1, 7, 1000, 32001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(device, vocab, dtype):
    logits = torch.randn(9, vocab, device=device).to(dtype)
    tokens, logprobs = sampling.sample_tokens(logits, params(9, temperature=0.0, top_k=5))
    assert torch.equal(tokens, logits.float().argmax(-1))
    ref = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    # a float32 log-softmax entry (or the log of a float32 softmax entry) against float64
    bound = tolerances.log_softmax_absolute_error(vocab, logits.float().abs().max().item(), ref.abs().max().item())
    assert (logprobs.double() - ref).abs().max().item() <= bound


@pytest.mark.parametrize("vocab,top_k,top_p,min_p", CASES)
def test_same_seed_same_tokens_in_any_batch(device, vocab, top_k, top_p, min_p):
    logits = torch.randn(6, vocab, device=device) * 3
    p = params(6, 0.9, top_k, top_p, min_p, position=torch.arange(100, 106))
    first = sampling.sample_tokens(logits, p)[0]
    assert torch.equal(first, sampling.sample_tokens(logits, p)[0])
    perm = torch.randperm(6)
    shuffled = params(6, 0.9, top_k, top_p, min_p, position=p.position[perm])
    assert torch.equal(sampling.sample_tokens(logits[perm.to(device)], shuffled)[0], first[perm.to(device)])
    alone = params(1, 0.9, top_k, top_p, min_p, position=p.position[2:3])
    assert torch.equal(sampling.sample_tokens(logits[2:3], alone)[0], first[2:3])


@pytest.mark.parametrize("vocab,top_k,top_p,min_p", CASES)
def test_support_equals_reference(device, vocab, top_k, top_p, min_p):
    row = torch.randn(vocab) * 3
    dist = reference_distribution(row, top_k, top_p, min_p)
    draws = 20000
    logits = row.to(device).expand(draws, vocab)
    tokens = sampling.sample_tokens(logits, params(draws, 1.0, top_k, top_p, min_p))[0].cpu()
    drawn = set(tokens.tolist())
    support = set(dist.nonzero().flatten().tolist())
    assert drawn <= support, f"tokens outside the reference support: {sorted(drawn - support)[:10]}"
    likely = set((dist > 10 / draws).nonzero().flatten().tolist())
    assert likely <= drawn, f"likely tokens never drawn: {sorted(likely - drawn)[:10]}"


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (6, 1.0, 0.0), (0, 0.7, 0.0), (10, 0.9, 0.1)])
def test_chi_square_against_reference(device, top_k, top_p, min_p):
    vocab, draws = 16, 100_000
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(3))
    dist = reference_distribution(row, top_k, top_p, min_p)
    tokens = sampling.sample_tokens(row.to(device).expand(draws, vocab), params(draws, 1.0, top_k, top_p, min_p))[0]
    counts = torch.bincount(tokens.cpu(), minlength=vocab).double()
    support = dist > 0
    assert counts[~support].sum() == 0
    expected = dist[support] * draws
    stat = ((counts[support] - expected) ** 2 / expected).sum().item()
    df = int(support.sum()) - 1
    if df > 0:
        assert stat < chi_square_critical(df), f"chi-square {stat:.1f} with {df} degrees of freedom"


@pytest.mark.parametrize("flag", [True, False])
def test_nan_inf_and_all_masked_rows(device, flag):
    logits = torch.randn(4, 100, device=device)
    logits[0, 3] = float("nan")
    logits[1, 9] = float("inf")
    logits[2] = float("-inf")
    logits[3, :50] = float("-inf")
    with flags.override(sampler=flag):
        tokens, _ = sampling.sample_tokens(logits, params(4, 1.0, 10, 0.9))
    assert tokens[:3].tolist() == [-1, -1, -1]
    assert tokens[3].item() >= 50
