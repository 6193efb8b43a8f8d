"""Parity of step air_topk: the engine's top_k against torch.topk, and the wrapper's caches."""
import pytest
import torch

import xllm_sampling
from engine import sampling
from xllm_sampling import air_topk_last_dim, clear_caches, counters, flags

CASES = [(1, 7, 1), (3, 1000, 50), (4, 32001, 1024), (2, 151936, 50), (5, 64, 64)]


def test_call_site_uses_the_wrapper(spy):
    calls = spy(xllm_sampling, "air_topk_last_dim")
    sampling.top_k(torch.randn(2, 10), 3)
    assert len(calls) == 1


@pytest.mark.parametrize("batch,vocab,k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sorted_equals_torch_topk(device, batch, vocab, k, dtype):
    x = torch.randperm(batch * vocab, device=device).view(batch, vocab).to(torch.float32).div(batch * vocab).to(dtype)
    x = x if dtype == torch.float32 else torch.randn(batch, vocab, device=device).to(dtype)
    values, indices = sampling.top_k(x, k)
    ref = torch.topk(x.float(), k, sorted=True)
    assert torch.equal(values.float(), ref.values)
    if dtype == torch.float32:  # distinct values: the order is fully determined
        assert torch.equal(indices, ref.indices)
    assert torch.equal(x.gather(-1, indices), values)


@pytest.mark.parametrize("batch,vocab,k", CASES)
def test_unsorted_is_the_same_set(device, batch, vocab, k):
    x = torch.randn(batch, vocab, device=device)
    values, indices = air_topk_last_dim(x, k, sorted_by_value=False)
    ref = torch.topk(x, k)
    assert torch.equal(indices.sort(-1).values, ref.indices.sort(-1).values)
    assert torch.equal(x.gather(-1, indices), values)


def test_ties_neg_inf_and_nan(device):
    x = torch.randint(0, 4, (3, 5000), device=device).float()
    x[1, ::2] = float("-inf")
    x[2, 17] = float("nan")
    values, indices = air_topk_last_dim(x, 300)
    ref = torch.topk(x, 300)
    assert torch.equal(values.nan_to_num(9.0), ref.values.nan_to_num(9.0))
    assert values[2, 0].isnan() and indices[2, 0] == 17
    same = values[:, 1:] == values[:, :-1]
    assert not (same & (indices[:, 1:] < indices[:, :-1])).any(), "equal values must come by ascending index"
    assert all(len(set(row)) == 300 for row in indices.tolist())


def test_repeated_calls_allocate_nothing(device):
    clear_caches()
    x = torch.randn(8, 4096, device=device)
    first = air_topk_last_dim(x, 50, cached_output=True)
    before = counters()
    for _ in range(100):
        again = air_topk_last_dim(x, 50, cached_output=True)
    assert counters() == before
    assert again[0].data_ptr() == first[0].data_ptr()


def test_alternating_k_and_batch_results_stay_right(device):
    clear_caches()
    kept = []
    for k in (50, 10, 50, 10):
        for batch in (3, 7):
            x = torch.randn(batch, 1000, device=device)
            values, indices = air_topk_last_dim(x, k)
            assert values.is_contiguous() and values.shape == (batch, k)
            kept.append((x, k, values, indices))
    for x, k, values, indices in kept:  # no result was overwritten by a later call
        ref = torch.topk(x, k)
        assert torch.equal(values, ref.values) and torch.equal(indices, ref.indices)


def test_flag_off_is_torch_topk(device):
    x = torch.randn(4, 999, device=device)
    with flags.override(air_topk=False):
        values, indices = sampling.top_k(x, 33)
    ref = torch.topk(x, 33)
    assert torch.equal(values, ref.values) and torch.equal(indices, ref.indices)
