"""air_topk_last_dim with a per-row k and with k up to 4096 (CPU, and the kernel path on a GPU)."""
import pytest
import torch

import xllm_sampling as xs
from xllm_sampling import flags

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def stable_topk(x: torch.Tensor, k: int, largest: bool = True):
    """The documented order: by value, equal values by ascending index (a stable sort of float64)."""
    order = x.double().sort(dim=-1, descending=largest, stable=True).indices[:, :k]
    return x.gather(-1, order), order


def tied_rows(batch, vocab, device, dtype=torch.float32):
    """Rows of few distinct values (ties at every cut), seeded."""
    g = torch.Generator().manual_seed(batch * vocab)
    return torch.randint(0, 50, (batch, vocab), generator=g).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("on", [True, False])
def test_per_row_k_cuts_each_row_at_its_own_k(device, largest, on):
    """Row b holds its own top k[b] (ties by lower index), then index -1 and value -inf (+inf when
    smallest); unsorted: the same entries by ascending index, padding last. Flag off: the same
    cut of torch.topk's top max_k (its own tie choice)."""
    batch, vocab, max_k = 7, 3001, 300
    x = tied_rows(batch, vocab, device)
    k = torch.tensor([1, 300, 17, 50, 299, 2, 128], device=device)
    pad = float("-inf") if largest else float("inf")
    with flags.override(air_topk=on):
        values, indices = xs.air_topk_last_dim(x, k, max_k=max_k, largest=largest)
        by_index_values, by_index = xs.air_topk_last_dim(x, k, max_k=max_k, largest=largest, sorted_by_value=False)
    for b in range(batch):
        n = int(k[b])
        ref_v, ref_i = stable_topk(x[b:b + 1], n, largest)
        assert torch.equal(values[b, :n], ref_v[0])
        if on:  # the documented tie rule; torch.topk (flag off) keeps whichever tied elements it meets
            assert torch.equal(indices[b, :n], ref_i[0])
        assert torch.equal(x[b].gather(0, indices[b, :n]), values[b, :n])
        assert (indices[b, n:] == -1).all() and (values[b, n:] == pad).all()
        assert torch.equal(by_index[b, :n], indices[b, :n].sort().values)
        assert torch.equal(by_index_values[b, :n], x[b].gather(0, by_index[b, :n]))
        assert (by_index[b, n:] == -1).all() and (by_index_values[b, n:] == pad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k_up_to_4096_keeps_the_tie_rule(device, dtype):
    """k = 1025 (past the kernel's limit), 2048 and 4096 over tied rows: the stable order."""
    x = tied_rows(3, 20000, device, dtype)
    for k in (1025, 2048, 4096):
        values, indices = xs.air_topk_last_dim(x, k)
        ref_v, ref_i = stable_topk(x, k)
        assert torch.equal(indices, ref_i) and torch.equal(values, ref_v)


def test_per_row_k_bad_input_names_the_argument():
    x, k = torch.randn(3, 100), torch.tensor([1, 2, 3])
    cases = [(dict(k=k), "max_k"), (dict(k=k, max_k=101), "max_k"), (dict(k=torch.tensor([1, 2]), max_k=5), "k: expected shape"),
             (dict(k=torch.tensor([1, 6, 2]), max_k=5), "k: value 6"), (dict(k=torch.tensor([0, 1, 2]), max_k=5), "k: value 0"),
             (dict(k=torch.tensor([1.0, 2.0, 3.0]), max_k=5), "k: dtype"), (dict(k=k, max_k=5, cached_output=True), "cached_output")]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            xs.air_topk_last_dim(x, **kw)
