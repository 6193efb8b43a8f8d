"""The CUDA kernels themselves, over many shapes, against float64 / stable-sort references (GPU only)."""
import pytest
import torch

from xllm_sampling import air_topk_last_dim, clear_caches, counters, kernels, logit_softmax

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def kernels_built():
    for step in ("logit_softmax", "air_topk"):
        assert kernels.load(step) is not None, f"the {step} kernel did not build"


# -- logit_softmax: cluster path (fp32 rows up to 409600) and two-launch path (longer rows) --------

@pytest.mark.parametrize("batch,vocab", [(1, 1), (1, 151936), (16, 128256), (300, 32000), (3, 4097),
                                         (64, 151936), (2, 262144), (2, 500001), (4096, 1000)])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_matches_float64(batch, vocab, log):
    logits = torch.randn(batch, vocab, device="cuda") * 4
    t = torch.rand(batch, device="cuda") + 0.3
    out = logit_softmax(logits, t, log=log)
    ref = (torch.log_softmax if log else torch.softmax)(logits.double() / t.double()[:, None], -1)
    if log:
        finite = ref > -30  # log-probabilities of ordinary size: float32 spacing allows ~1e-5 relative
        assert ((out.double() - ref).abs()[finite] <= 1e-5 * ref.abs()[finite] + 2e-6).all()
    else:
        assert (out.double() - ref).abs().max().item() <= 1e-6
        assert (out.double().sum(-1) - 1).abs().max().item() <= 1e-5


def test_softmax_grid_exchange_is_reusable_across_shapes_and_graph_replays():
    """Small batches take the grid path, whose exchange slots and epochs live on between
    launches: many launches of changing shapes, then replays of a captured graph, must each be right."""
    shapes = [(1, 151936), (3, 100000), (1, 262144), (7, 65536), (2, 151936)]
    inputs = [torch.randn(b, v, device="cuda") * 3 for b, v in shapes]
    refs = [torch.softmax(x.double(), -1) for x in inputs]
    for _ in range(20):
        for x, ref in zip(inputs, refs):
            assert (logit_softmax(x).double() - ref).abs().max().item() <= 1e-6
    x = inputs[0].clone()
    out = torch.empty_like(x)
    logit_softmax(x, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logit_softmax(x, out=out)
    for i in range(10):
        x.copy_(inputs[4][i % 2:i % 2 + 1])  # new values, same buffer
        graph.replay()
        assert (out.double() - torch.softmax(x.double(), -1)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softmax_half_inputs_match_torch(dtype):
    logits = (torch.randn(5, 151936, device="cuda") * 3).to(dtype)
    out = logit_softmax(logits, 0.7)
    assert (out - torch.softmax(logits.float() / 0.7, -1)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("vocab,dtype", [(100003, torch.float32), (100000, torch.float32), (100000, torch.bfloat16)])
def test_softmax_special_rows_and_unaligned_input(vocab, dtype):
    """Odd rows take element copies, 16-byte aligned rows the bulk copies: both see the special rows."""
    logits = torch.randn(6, vocab, device="cuda").to(dtype)
    logits[0] = 1.5  # all equal
    logits[1] = float("-inf")
    logits[2, 7] = float("nan")
    logits[3, ::2] = float("-inf")
    out = logit_softmax(logits)
    ref = torch.softmax(logits.double(), -1)
    assert torch.equal(out.isnan(), ref.isnan())
    assert (out[0] == out[0, 0]).all() and (out[3, ::2] == 0).all()
    ok = ~ref.isnan()
    assert (out.double()[ok] - ref[ok]).abs().max().item() <= 1e-6
    shifted = torch.randn(3, 4097, device="cuda")[:, 1:]  # rows not 16-byte aligned: copied, scalar loads
    assert (logit_softmax(shifted).double() - torch.softmax(shifted.double(), -1)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("batch,vocab,dtype", [(1000, 65536, torch.float32), (777, 151936, torch.bfloat16),
                                               (5000, 4000, torch.float16)])
def test_softmax_large_batches_keep_every_row_apart(batch, vocab, dtype):
    """More rows than the GPU holds at once (the clusters run in waves): every row must come out
    right, special rows (all -inf, a NaN, all equal) among ordinary ones included."""
    logits = (torch.randn(batch, vocab, device="cuda") * 3).to(dtype)
    logits[::97] = float("-inf")
    logits[5::101, 3] = float("nan")
    logits[7::89] = 0.25
    t = torch.rand(batch, device="cuda") + 0.5
    out = logit_softmax(logits, t)
    ref = torch.softmax(logits.double() / t.double()[:, None], -1)
    assert torch.equal(out.isnan(), ref.isnan())
    ok = ~ref.isnan()
    assert (out.double()[ok] - ref[ok]).abs().max().item() <= 1e-6


# -- air_topk ----------------------------------------------------------------------------------

def stable_reference(x: torch.Tensor, k: int, largest: bool = True):
    """torch.topk's sorted order with ties by ascending index (NaN largest), from a stable sort."""
    order = torch.sort(x.double(), dim=-1, descending=largest, stable=True).indices[:, :k]
    return x.gather(-1, order), order


SHAPES = [(1, 1, 1), (1, 7, 7), (2, 1023, 1), (3, 1000, 50), (4, 32001, 1024), (1, 151936, 50),
          (1, 151936, 1024), (16, 151936, 50), (64, 128256, 1024), (5, 262144, 100), (300, 4099, 17),
          (4096, 1000, 10), (1, 1024, 1024), (7, 5003, 999)]


@pytest.mark.parametrize("batch,vocab,k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_sorted_equals_stable_reference(batch, vocab, k, dtype):
    x = torch.randn(batch, vocab, device="cuda").to(dtype)
    values, indices = air_topk_last_dim(x, k)
    ref_values, ref_indices = stable_reference(x, k)
    assert indices.dtype == torch.int64 and values.dtype == dtype
    assert torch.equal(indices, ref_indices)
    assert torch.equal(values, ref_values)
    assert torch.equal(values, torch.topk(x, k).values)


@pytest.mark.parametrize("batch,vocab,k", SHAPES[::2])
def test_topk_unsorted_is_the_same_set(batch, vocab, k):
    x = torch.randn(batch, vocab, device="cuda")
    values, indices = air_topk_last_dim(x, k, sorted_by_value=False)
    ref = torch.topk(x, k)
    assert torch.equal(indices.sort(-1).values, ref.indices.sort(-1).values)
    assert torch.equal(x.gather(-1, indices), values)


# On an H100: (8, 30011) takes the grid path at one tile a block; (20, 100003) and (48, 30011)
# split rows for small k and take the grid path with 21 and 15 elements a thread for k >= 128
# and 200; (256, 20000) split rows (two blocks a row), merged by ranking up to 2k keys a split
# for k <= 128, else by streaming exactly k keys a split.
@pytest.mark.parametrize("batch,vocab", [(8, 30011), (20, 100003), (48, 30011), (256, 20000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_ties_neg_inf_nan_and_smallest(batch, vocab, dtype):
    x = torch.randint(0, 3, (batch, vocab), device="cuda").to(dtype)  # heavy ties
    x[1] = 0.5  # all equal
    x[2] = float("-inf")
    x[3, ::2] = float("-inf")
    x[4, [5, 900, vocab - 11]] = float("nan")
    x[5, :] = float("nan")
    x[6] = torch.randn(vocab, device="cuda").to(dtype)  # few ties
    for k in (1, 3, 64, 128, 200, 1024):
        for largest in (True, False):
            values, indices = air_topk_last_dim(x, k, largest=largest)
            ref_values, ref_indices = stable_reference(x, k, largest)
            assert torch.equal(indices, ref_indices), (k, largest)
            assert torch.equal(values.isnan(), ref_values.isnan())
            assert torch.equal(values.nan_to_num(7.0), ref_values.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_keeps_nan_and_infinities_inside_whole_tiles_of_split_rows(dtype):
    # The split path skips a whole tile by each thread's extreme (a max or min that keeps NaN):
    # NaN and infinities in a full tile streamed after the bound has risen must still be ranked.
    # (256, 20000) splits each row in two chunks of 10000 (tiles of 2048 from 0): index 5000 lies
    # in the third, full, tile of the first chunk, 17000 in the fourth of the second.
    x = torch.randn(256, 20000, device="cuda").to(dtype)
    x[0, 5000] = float("nan")
    x[1, 5000] = float("inf")
    x[2, 5000] = float("-inf")
    x[3, [5000, 17000]] = float("nan")
    x[4, 17000] = float("-inf")
    x[4, 5000] = float("inf")
    for k in (1, 3, 50):
        for largest in (True, False):
            values, indices = air_topk_last_dim(x, k, largest=largest)
            ref_values, ref_indices = stable_reference(x, k, largest)
            assert torch.equal(indices, ref_indices), (k, largest)
            assert torch.equal(values.nan_to_num(7.0), ref_values.nan_to_num(7.0))


@pytest.mark.parametrize("batch,vocab,k", [(0, 1000, 10), (-1, 1000, 10), (4, 0, 10), (4, 1000, 0)])
def test_topk_workspace_size_rejects_empty_shapes_by_name(batch, vocab, k):
    # The Python op rejects empty tensors first; the extension's own entry point must not size
    # (or divide by) an empty plan either.
    with pytest.raises(RuntimeError, match="batch, vocab, k: at least 1 each"):
        kernels.load("air_topk").workspace_size(batch, vocab, k, torch.cuda.current_device())


def test_topk_large_k_and_noncontiguous_input_fall_back_correctly():
    x = torch.randn(3, 5000, device="cuda")
    values, indices = air_topk_last_dim(x, 2000)  # above the kernel's 1024: torch.topk
    assert torch.equal(indices, stable_reference(x, 2000)[1])
    strided = torch.randn(5000, 3, device="cuda").t()
    assert torch.equal(air_topk_last_dim(strided, 40)[1], stable_reference(strided, 40)[1])


def test_topk_repeated_calls_allocate_nothing_on_the_device():
    clear_caches()
    x = torch.randn(4, 151936, device="cuda")  # small batch: the grid path, whose scratch is the workspace
    air_topk_last_dim(x, 50, cached_output=True)
    torch.cuda.synchronize()
    before, allocations = counters(), torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(100):
        values, indices = air_topk_last_dim(x, 50, cached_output=True)
    torch.cuda.synchronize()
    assert counters() == before and before.workspace_allocations == 1
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocations
    assert torch.equal(indices, stable_reference(x, 50)[1])


def test_topk_in_a_cuda_graph_survives_workspace_growth():
    clear_caches()
    small = torch.randn(2, 151936, device="cuda")
    air_topk_last_dim(small, 50)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_values, graph_indices = air_topk_last_dim(small, 50)
    big = torch.randn(8, 262144, device="cuda")
    air_topk_last_dim(big, 1024)  # grows the workspace: the captured one must stay alive
    small.copy_(torch.randn_like(small))
    graph.replay()
    assert torch.equal(graph_indices, stable_reference(small, 50)[1])


def test_topk_many_calls_on_grid_and_split_rows_stay_exact():
    # The bench's sequence once exposed a block-wide race (a warp admitting keys while another
    # still decided whether to cut the buffer). Interleave the grid path (small batches, whose
    # histograms and barriers the workspace keeps between calls) with the split path over rows
    # of several tiles, on one workspace.
    cases = []
    for batch, vocab, k in ((16, 32000, 50), (2, 151936, 50), (5, 100003, 1024), (16, 128256, 50),
                            (64, 151936, 50), (1, 151936, 7), (256, 151936, 50)):
        x = torch.randn(batch, vocab, device="cuda") * 3
        cases.append((x, k, stable_reference(x, k)[1]))
    for _ in range(10):
        for x, k, ref in cases:
            assert torch.equal(air_topk_last_dim(x, k)[1], ref), tuple(x.shape)
