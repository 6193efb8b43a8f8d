"""The sampling kernel (csrc/sampler/) against the same algorithm in torch and against exact
float64 distributions (GPU only)."""
import math

import pytest
import torch

import xllm_sampling as xs
from xllm_sampling import flags, kernels
from xllm_sampling.ops import sampler

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def kernel_built():
    assert kernels.load("sampler") is not None, "the sampler kernel did not build"
    with flags.override(sampler=True):
        yield


def torch_path(logits, **kw):
    """The fast path's algorithm in torch (sampler.draw), on the same device."""
    params = sampler._params(logits, **kw)
    return sampler.draw(sampler._processed(logits, params), params)


def chi_square_critical(df, z=3.719):  # upper 1e-4 quantile, Wilson-Hilferty
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


CONFIGS = {  # name: keyword arguments of sample (per-row tensors made below where marked)
    "greedy": dict(temperature=0.0),
    "plain": dict(temperature=1.0),
    "top-k 1": dict(top_k=1),
    "top-k 50 + top-p 0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
    "top-k 1024": dict(top_k=1024, temperature=1.3),
    "top-p 0.9": dict(top_p=0.9),
    "top-p 0.3": dict(top_p=0.3, temperature=0.5),
    "min-p 0.1": dict(min_p=0.1),
    "all three": dict(top_k=200, top_p=0.8, min_p=0.02),
    "mixed rows": "per-row",
}


def per_row_kwargs(batch, vocab, device):
    g = torch.Generator().manual_seed(batch * 7 + vocab)
    t = torch.rand(batch, generator=g) * 1.5
    t[::5] = 0.0  # greedy rows among sampled ones
    k = torch.randint(0, vocab + 2, (batch,), generator=g)  # 0 and > vocab are off
    k[1::4] = torch.randint(1, 60, (len(k[1::4]),), generator=g)
    p = torch.rand(batch, generator=g) * 0.9 + 0.1
    p[2::3] = 1.0
    m = torch.rand(batch, generator=g) * 0.2
    m[::2] = 0.0
    return dict(temperature=t.to(device), top_k=k.to(device), top_p=p.to(device), min_p=m.to(device))


SHAPES = [(1, 1), (3, 7), (5, 1000), (2, 32000), (64, 32001), (1, 151936), (16, 151936), (300, 5003), (2, 262144)]


TOP_K_MIN_ELEMENTS = 4_000_000  # sampler.cu's kTopKMinElements


def takes_top_k_kernels(kw, batch, vocab):
    """Whether sample() runs the top-k kernels (top_k_sampling.cuh): top_k one number from 1 to
    128, below the vocab, no penalties, and batch x vocab at least TOP_K_MIN_ELEMENTS per 64 of k."""
    k = kw.get("top_k", 0)
    return (isinstance(k, int) and 1 <= k <= 128 and k < vocab and "generated" not in kw
            and batch * vocab >= TOP_K_MIN_ELEMENTS * ((k + 63) // 64))


# The top-k kernels' logprob takes the row's sum from the streaming pass: terms 2^e by ex2.approx
# (within 2^-22 relatively) with e = (x - max) c rounded within |e| 2^-24 (under 10 bits on average
# over these rows' mass: 7e-7 relatively at most), summed per group of at most 8 in float32
# (7 * 2^-24); the reference's terms by exp2f (2 ulp, 2^-22) with the same rounding of e: the two
# sums within 2e-6 relatively, so the logprobs within 2e-6 absolutely (plus the 2e-7 below).
TOP_K_LOGPROB_ABS = 2e-6


def logprobs_agree(a, b, absolute=0.0):
    """Within float32 rounding of two float64 values (2e-7 relatively, 1 at least) plus `absolute`."""
    a, b = a.double(), b.double()
    return bool(((a - b).abs() <= 2e-7 * b.abs().clamp(min=1) + absolute).all())


@pytest.mark.parametrize("batch,vocab", SHAPES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_kernel_draws_the_torch_paths_tokens(batch, vocab, config):
    """Same algorithm, same Philox numbers: the same tokens (their float64 sums differ in order,
    ~1e-16 relative, which moves a token only when a uniform lands that close to a boundary)
    and the same logprobs up to float32 rounding of two float64 values within 1e-15 (the top-k
    kernels: within TOP_K_LOGPROB_ABS more)."""
    logits = torch.randn(batch, vocab, device="cuda") * 3
    kw = per_row_kwargs(batch, vocab, "cuda") if CONFIGS[config] == "per-row" else dict(CONFIGS[config])
    kw.update(seed=torch.arange(batch, device="cuda") * 31 + 5, position=torch.arange(batch, device="cuda") + 1000)
    out = xs.sample(logits, **kw)
    ref = torch_path(logits, **kw)
    assert torch.equal(out.tokens, ref.tokens)
    assert logprobs_agree(out.logprobs, ref.logprobs, TOP_K_LOGPROB_ABS if takes_top_k_kernels(kw, batch, vocab) else 0.0)


@pytest.mark.parametrize("k", [1, 50, 128, 129, 300])
@pytest.mark.parametrize("outlier", [6.0, 8.0, 30.0])
def test_top_k_rows_whose_first_bound_is_too_wide_for_the_list(k, outlier):
    """A maximum far above the rest makes the doubling levels' bound hold thousands of tokens
    (randn rows, t = 1: the level 5.5 below a max of 8 holds ~900 of 151936); the refined bound
    (refine_bound) or the radix select must still give the torch path's tokens and logprobs. Some
    rows tie values at the refined levels (rounded to 1/8)."""
    g = torch.Generator("cuda").manual_seed(int(outlier) * 1000 + k)
    logits = torch.randn(16, 151936, device="cuda", generator=g)
    logits[8:] = (logits[8:] * 8).round() / 8
    logits[:, 777] = outlier
    kw = dict(top_k=k, top_p=0.95, temperature=1.0, seed=torch.arange(16, device="cuda") * 3 + 1,
              position=torch.arange(16, device="cuda") + 7)
    out, ref = xs.sample(logits, **kw), torch_path(logits, **kw)
    assert torch.equal(out.tokens, ref.tokens)
    assert logprobs_agree(out.logprobs, ref.logprobs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1001, 151936])
def test_half_logits_with_many_ties(dtype, vocab):
    """bf16 / fp16 logits are full of equal values: top-k cuts through ties by index, greedy
    takes the lowest index of the tied maximum."""
    logits = (torch.randn(32, vocab, device="cuda") * 2).round().to(dtype)  # a few distinct values
    for kw in (dict(top_k=50), dict(top_k=1), dict(temperature=0.0), dict(top_k=300, top_p=0.7), dict(min_p=0.3)):
        kw.update(seed=3, position=torch.arange(32, device="cuda"))
        assert torch.equal(xs.sample(logits, **kw).tokens, torch_path(logits, **kw).tokens), kw
    assert torch.equal(xs.sample(logits, temperature=0.0).tokens, logits.float().argmax(-1))


def test_top_k_ties_at_the_boundary_keep_the_lowest_indices():
    x = torch.zeros(4096, 3000, device="cuda")
    x[:, 2000:2010] = 5.0  # ten ahead, then 2990 tied: top_k = 15 keeps the ten and tokens 0..4
    tokens = xs.sample(x, top_k=15, temperature=0.05, seed=1, position=torch.arange(4096, device="cuda")).tokens
    assert set(tokens.tolist()) <= set(range(2000, 2010)) | set(range(5))
    x = torch.zeros(4096, 3000, device="cuda")
    x[:, 700] = 1.0
    tokens = xs.sample(x, top_k=4, seed=1, position=torch.arange(4096, device="cuda")).tokens
    assert set(tokens.tolist()) == {700, 0, 1, 2}


def test_same_request_same_token_in_any_row_of_any_batch():
    """The cluster size follows the batch (16 blocks a row at batch 1, fewer at 256): the draw's
    vocabulary order does not, so a request's token does not change."""
    vocab = 151936
    request = torch.randn(1, vocab, device="cuda") * 2
    for kw in (dict(top_k=50, top_p=0.9, temperature=0.8), dict(top_p=0.9), dict(min_p=0.05), dict()):
        alone = [xs.sample(request, seed=11, position=p, **kw).tokens.item() for p in range(8)]
        for batch, row in ((256, 200), (17, 3), (64, 63)):
            logits = torch.randn(batch, vocab, device="cuda") * 2
            logits[row] = request[0]
            seeds = torch.randint(0, 1000, (batch,), device="cuda")
            seeds[row] = 11
            for p in range(8):
                pos = torch.full((batch,), p, device="cuda")
                assert xs.sample(logits, seed=seeds, position=pos, **kw).tokens[row].item() == alone[p], (kw, batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("vocab", [1000, 32001, 151936])
def test_unfiltered_rows_draw_the_same_token_in_either_kernel(temperature, vocab, dtype):
    """A batch whose settings are numbers without filters or penalties takes the streaming kernel
    (stream_sampling.cuh), a batch with a per-row top_k the caching one (sampling.cuh): an
    unfiltered request draws the same token in both (the same tile weights; only the order of
    float64 sums differs) and the same logprob up to float32 rounding of float64 values within 1e-15.
    16-bit rows of a multiple of 8 tokens stream through bulk copies (V = 151936 at B = 64: ~9
    tiles per warp, so each warp's ring of 4 stages wraps), the others through registers."""
    batch = 64
    g = torch.Generator("cuda").manual_seed(vocab)
    logits = (torch.randn(batch, vocab, device="cuda", generator=g) * 3).to(dtype)
    kw = dict(temperature=temperature, seed=torch.arange(batch, device="cuda") * 7 + 1,
              position=torch.arange(batch, device="cuda") + 50)
    streamed = xs.sample(logits, **kw)
    top_k = torch.zeros(batch, dtype=torch.int64, device="cuda")
    top_k[::2] = 20  # even rows filtered: the batch takes the caching kernel; odd rows stay unfiltered
    cached = xs.sample(logits, top_k=top_k, **kw)
    assert torch.equal(streamed.tokens[1::2], cached.tokens[1::2])
    a, b = streamed.logprobs[1::2].double(), cached.logprobs[1::2].double()
    assert logprobs_agree(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1000, 32001, 151936])
@pytest.mark.parametrize("k", [1, 50, 128])
def test_short_top_k_rows_draw_the_same_token_in_either_kernel(k, vocab, dtype):
    """top_k as one number up to 128 takes the top-k kernels (top_k_sampling.cuh), the same k as a
    per-row tensor the caching kernel (sampling.cuh): the same tokens for greedy, top-k alone and
    with top-p and min-p (the same weights and tests; only the order of float64 sums differs),
    logprobs within TOP_K_LOGPROB_ABS. bf16 logits rounded to few values put ties at the k-th."""
    batch = -(-2 * TOP_K_MIN_ELEMENTS // vocab)  # enough rows for the top-k kernels at k = 128
    g = torch.Generator("cuda").manual_seed(vocab + k)
    logits = (torch.randn(batch, vocab, device="cuda", generator=g) * 3).to(dtype)
    if dtype == torch.bfloat16:
        logits = logits.float().round().to(dtype)
    per_row_k = torch.full((batch,), k, dtype=torch.int64, device="cuda")
    for kw in (dict(temperature=0.0), dict(temperature=0.7), dict(temperature=1.2, top_p=0.8),
               dict(top_p=torch.rand(batch, device="cuda", generator=g) * 0.9 + 0.1, min_p=0.05)):
        kw.update(seed=torch.arange(batch, device="cuda") * 3 + 1, position=torch.arange(batch, device="cuda") + 9)
        assert takes_top_k_kernels(dict(top_k=k), batch, vocab)
        listed = xs.sample(logits, top_k=k, **kw)
        cached = xs.sample(logits, top_k=per_row_k, **kw)
        assert torch.equal(listed.tokens, cached.tokens), kw
        assert logprobs_agree(listed.logprobs, cached.logprobs, TOP_K_LOGPROB_ABS), kw


@pytest.mark.parametrize("k", [50, 128])
@pytest.mark.parametrize("layout", ["ascending", "descending", "one slice"])
def test_top_k_kernels_merge_rows_whose_best_keys_crowd_one_slice(layout, k):
    """The draw kernel's merge (slice::merge_sorted_top) ranks each slice's key by binary searches
    in the other slices' sorted lists, stopping once its rank reaches k; rows whose best keys crowd
    into one slice (16 slices a row on a 132-SM card here) give the longest and the shortest
    searches. The top-k kernels draw the caching kernel's tokens whatever the layout: ramps put
    the k best in the last or the first slice, "one slice" in a random 4096-token window of each
    row."""
    vocab = 262144
    batch = -(-TOP_K_MIN_ELEMENTS * ((k + 63) // 64) // vocab)
    g = torch.Generator("cuda").manual_seed(7)
    logits = torch.randn(batch, vocab, device="cuda", generator=g)
    if layout == "one slice":
        starts = torch.randint(0, vocab - 4096, (batch,), device="cuda", generator=g)
        window = starts[:, None] + torch.arange(4096, device="cuda")
        logits.scatter_(1, window, logits.gather(1, window) + 6.0)
    else:
        ramp = torch.linspace(-4.0, 4.0, vocab, device="cuda")
        logits = (ramp if layout == "ascending" else ramp.flip(0)).expand(batch, vocab) + logits * 1e-3
    kw = dict(temperature=0.9, top_p=0.95, seed=torch.arange(batch, device="cuda") * 5 + 2,
              position=torch.arange(batch, device="cuda") + 3)
    assert takes_top_k_kernels(dict(top_k=k), batch, vocab)
    listed = xs.sample(logits, top_k=k, **kw)
    cached = xs.sample(logits, top_k=torch.full((batch,), k, dtype=torch.int64, device="cuda"), **kw)
    assert torch.equal(listed.tokens, cached.tokens)
    assert logprobs_agree(listed.logprobs, cached.logprobs, TOP_K_LOGPROB_ABS)


def launched_kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def test_unfiltered_batches_take_the_streaming_kernel():
    logits = torch.randn(256, 151936, device="cuda")
    for kw in (dict(), dict(temperature=0.0), dict(temperature=torch.rand(256, device="cuda"), top_k=0, top_p=1.0)):
        names = launched_kernels(lambda: xs.sample(logits, **kw))
        assert len(names) == 1 and "stream_sample_kernel" in names[0], (kw, names)
    for kw in (dict(top_k=129), dict(top_p=0.9), dict(min_p=0.1), dict(top_k=torch.zeros(256, dtype=torch.int64, device="cuda"))):
        names = launched_kernels(lambda: xs.sample(logits, **kw))
        assert len(names) == 1 and "stream_sample_kernel" not in names[0], (kw, names)


def test_short_top_k_batches_take_the_top_k_kernels():
    logits = torch.randn(256, 32000, device="cuda")  # 8.2e6 logits: enough for k up to 128
    generated = torch.zeros(256, 3, dtype=torch.int64, device="cuda")
    for kw in (dict(top_k=1), dict(top_k=50, top_p=0.9), dict(top_k=128, min_p=0.1, temperature=0.0)):
        assert takes_top_k_kernels(kw, *logits.shape)
        names = launched_kernels(lambda: xs.sample(logits, **kw))
        assert len(names) == 2 and "top_k_candidates_kernel" in names[0] and "top_k_draw_kernel" in names[1], (kw, names)
    for x, kw in ((logits, dict(top_k=129)), (logits, dict(top_k=torch.full((256,), 50, device="cuda"))),
                  (logits, dict(top_k=50, generated=generated, repetition_penalty=1.2)),
                  (logits[:64], dict(top_k=50)), (logits[:128], dict(top_k=65))):  # below the size rule
        assert not takes_top_k_kernels(kw, *x.shape)
        names = launched_kernels(lambda: xs.sample(x, **kw))
        assert len(names) == 1 and "sample_kernel" in names[0] and "top_k" not in names[0], (kw, names)


@pytest.mark.parametrize("kw", [dict(), dict(top_k=6), dict(top_p=0.7), dict(top_k=10, top_p=0.9, min_p=0.1),
                                dict(temperature=0.6, min_p=0.2),
                                dict(penalties=(0.4, 0.3, 1.5)), dict(penalties=(0.2, 0.0, 1.2), top_p=0.8)])
def test_chi_square_against_float64_distribution(kw):
    """2^18 draws of one 16-token row (one position each) against the exact filtered distribution
    (4.2e6 logits: the top-k configurations take the top-k kernels)."""
    kw = dict(kw)
    vocab, draws = 16, 262_144
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(3)).double() * 1.5
    generated = None
    if "penalties" in kw:
        freq, pres, rep = kw.pop("penalties")
        listed = [3, 3, 3, 7, 0, 11, 11]
        generated = torch.tensor(listed + [-1])
        for tok in set(listed):
            c = listed.count(tok)
            v = row[tok] * rep if row[tok] < 0 else row[tok] / rep
            row[tok] = v - c * freq - pres
        kw.update(generated=generated.expand(draws, -1).to("cuda").contiguous(), frequency_penalty=freq,
                  presence_penalty=pres, repetition_penalty=rep)
        logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 1.5
    else:
        logits = row.float()
    t = kw.get("temperature", 1.0)
    p = torch.softmax(row / t, -1)
    sp, order = p.sort(descending=True, stable=True)
    k = kw.get("top_k", 0)
    keep = torch.arange(vocab) < (k if 0 < k < vocab else vocab)
    kept = sp * keep
    keep &= kept.cumsum(-1) - kept < kw.get("top_p", 1.0) * kept.sum()
    keep &= sp >= kw.get("min_p", 0.0) * sp[0]
    dist = torch.zeros(vocab, dtype=torch.float64)
    dist[order[keep]] = sp[keep] / sp[keep].sum()
    tokens = xs.sample(logits.to("cuda").expand(draws, vocab).contiguous(), seed=5,
                       position=torch.arange(draws, device="cuda"), **kw).tokens.cpu()
    counts = torch.bincount(tokens, minlength=vocab).double()
    support = dist > 0
    assert counts[~support].sum() == 0, "a token outside the support"
    expected = dist[support] * draws
    stat = ((counts[support] - expected) ** 2 / expected).sum().item()
    df = int(support.sum()) - 1
    if df > 0:
        assert stat < chi_square_critical(df), f"chi-square {stat:.1f} with {df} degrees of freedom"


def test_a_one_in_a_million_token_is_drawn_at_its_rate():
    """p = 1e-6 over 10^7 draws: expected 10, sigma ~3.2; a float32 uniform (2^-24 steps) or an
    exponential race with float32 noise would cut or skew it. Within 4 sigma."""
    vocab, batch, calls = 64, 1_000_000, 10
    p = torch.full((vocab,), (1 - 1e-6) / (vocab - 1), dtype=torch.float64)
    p[17] = 1e-6
    logits = p.log().float().to("cuda").expand(batch, vocab).contiguous()
    rare = 0
    for call in range(calls):
        pos = torch.arange(batch, device="cuda") + call * batch
        rare += (xs.sample(logits, seed=9, position=pos).tokens == 17).sum().item()
    w = torch.exp2((logits[0] - logits[0].max()) * torch.tensor(sampler.LOG2E, device="cuda")).double()
    expected = (w[17] / w.sum()).item() * batch * calls
    assert abs(rare - expected) <= 4 * math.sqrt(expected), (rare, expected)


def test_invalid_rows_give_minus_one_and_nan():
    x = torch.randn(128, 40000, device="cuda")  # 5.1e6 logits: top_k = 5 takes the top-k kernels
    x[0, 39999] = float("nan")
    x[1, 3] = float("inf")
    x[2] = float("-inf")
    x[3, :39990] = float("-inf")  # ten finite tokens left: fine
    for kw in (dict(), dict(temperature=0.0), dict(top_k=5, top_p=0.5)):
        out = xs.sample(x, **kw)
        assert out.tokens[:3].tolist() == [-1, -1, -1] and out.logprobs[:3].isnan().all()
        assert out.tokens[3].item() >= 39990 and out.tokens[4].item() >= 0 and out.logprobs[3:].isfinite().all()


def test_penalties_match_the_torch_path_including_long_lists():
    batch, vocab = 8, 32000
    logits = torch.randn(batch, vocab, device="cuda") * 2
    for length in (5, 1024, 3000):  # 3000: counted in torch, then the kernel without penalties
        generated = torch.randint(-1, 600, (batch, length), device="cuda")
        kw = dict(generated=generated, frequency_penalty=torch.rand(batch, device="cuda"), presence_penalty=0.5,
                  repetition_penalty=1.3, temperature=0.0)
        assert torch.equal(xs.sample(logits, **kw).tokens, torch_path(logits, **kw).tokens)
        kw.update(temperature=0.9, top_k=40, seed=2, position=torch.arange(batch, device="cuda"))
        assert torch.equal(xs.sample(logits, **kw).tokens, torch_path(logits, **kw).tokens)


@pytest.mark.parametrize("filters,batch", [(dict(top_k=50, top_p=0.9, temperature=0.8), 4), (dict(temperature=0.8), 4),
                                           (dict(top_k=50, top_p=0.9, temperature=0.8), 32)])  # 32: the top-k kernels
def test_graph_replay_equals_eager(filters, batch):
    vocab = 151936
    logits = torch.randn(batch, vocab, device="cuda")
    position = torch.zeros(batch, dtype=torch.int64, device="cuda")
    kw = dict(filters, seed=torch.arange(batch, device="cuda"), position=position)
    xs.sample(logits, **kw)  # build and configure outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = xs.sample(logits, **kw)
    for step in range(20):
        position.fill_(step)
        logits.normal_()
        graph.replay()
        eager = xs.sample(logits, **kw)
        assert torch.equal(out.tokens, eager.tokens) and torch.equal(out.logprobs, eager.logprobs)
