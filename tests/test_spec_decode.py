"""Speculative decoding's rejection sampler (torch levels, CPU): exactness against the target
distribution, the mean number accepted against its closed form, greedy, variable K, dead rows."""
import pytest
import torch

import xllm_sampling as xs
from xllm_sampling.ops.spec_decode import target_probs

TRIALS = 100_000
# Each chi-square test fails a correct sampler with probability 1e-4 (inputs are seeded, so a run
# is repeatable); the closed-form mean is met within 4 standard errors (probability 6e-5).
P_VALUE = 1e-4
SIGMAS = 4.0


def chi_square_p(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """The chi-square test's p-value of ``tokens`` against ``probs`` (float64 (vocab,)); tokens
    outside the support fail outright (p = 0)."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = probs[support] * counts.sum()
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(support.sum() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


def scenario(k=3, vocab=8, seed=0):
    """Fixed target logits (k + 1 rows) and draft distributions (k rows), and TRIALS requests whose
    drafts are sampled from those distributions (seeded)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k + 1, vocab, generator=g) * 1.5
    draft = torch.softmax(torch.randn(k, vocab, generator=g) * 1.5, -1)
    drafts = torch.stack([torch.multinomial(draft[i], TRIALS, replacement=True, generator=g) for i in range(k)], 1)
    return logits.expand(TRIALS, k + 1, vocab), draft, drafts


def random_requests(g, batch, k, vocab, logit_scale=2.0, prob_scale=1.0):
    """Per request: target logits (k + 1 rows), draft distributions (k rows) and drafts sampled from them."""
    logits = torch.randn(batch, k + 1, vocab, generator=g) * logit_scale
    probs = torch.softmax(torch.randn(batch, k, vocab, generator=g) * prob_scale, -1)
    return logits, probs, torch.multinomial(probs.flatten(0, 1), 1, generator=g).view(batch, k)


SETTINGS = dict(temperature=0.9, top_k=6, top_p=0.9, min_p=0.02)


def filtered(logits):
    """The target's filtered distribution of each of ``logits``' rows (rows, vocab), float64."""
    rows = logits.shape[0]
    return target_probs(logits, torch.full((rows,), 0.9), torch.full((rows,), 6), torch.full((rows,), 0.9),
                        torch.full((rows,), 0.02))


@pytest.mark.parametrize("with_probs", [True, False])
def test_emitted_tokens_follow_the_target_distribution(with_probs):
    """The first emitted token follows q_0 and, where a second is emitted, it follows q_1 (chi-square
    over 10^5 requests), with the draft's distributions given and with one-hot drafts."""
    logits, draft, drafts = scenario()
    probs = draft.expand(TRIALS, *draft.shape) if with_probs else None
    out = xs.rejection_sample(logits, drafts, draft_probs=probs, seed=torch.arange(TRIALS), **SETTINGS)
    q = filtered(logits[0])
    assert chi_square_p(out.tokens[:, 0], q[0]) > P_VALUE
    second = out.emitted >= 2
    assert second.sum() > TRIALS // 10
    assert chi_square_p(out.tokens[second, 1], q[1]) > P_VALUE


def test_mean_accepted_matches_its_closed_form():
    """E[accepted drafts] = sum over i of prod_{j < i} alpha_j, alpha_j = sum_x min(p_j(x), q_j(x));
    each request emits its accepted drafts plus one token."""
    logits, draft, drafts = scenario(k=4, seed=3)
    out = xs.rejection_sample(logits, drafts, draft_probs=draft.expand(TRIALS, *draft.shape),
                              seed=torch.arange(TRIALS), position=7, **SETTINGS)
    alpha = torch.minimum(draft.double(), filtered(logits[0])[:4]).sum(-1)
    expected = torch.cumprod(alpha, 0).sum()
    accepted = (out.emitted - 1).double()
    assert abs(accepted.mean() - expected) <= SIGMAS * accepted.std() / TRIALS ** 0.5
    assert ((out.tokens >= 0).sum(-1) == out.emitted).all()


def greedy_reference(logits, drafts, n):
    """Accept while the draft is the argmax (lowest index on ties), then emit the argmax."""
    out = []
    for i in range(n + 1):
        best = int(logits[i].argmax())
        if i < n and int(drafts[i]) == best:
            out.append(best)
            continue
        out.append(best)
        break
    return out


@pytest.mark.parametrize("device,level,vocab,dtype", [
    ("cpu", None, 40, torch.float32),
    pytest.param("cuda", "kernel", 20000, torch.float32, marks=pytest.mark.cuda),  # ties across a cluster's blocks
    pytest.param("cuda", "kernel", 20000, torch.bfloat16, marks=pytest.mark.cuda),
])
def test_greedy_equals_the_argmax_rule(device, level, vocab, dtype):
    """Temperature 0, ties at the maximum included: the argmax rule exactly, beside sampled rows."""
    g = torch.Generator().manual_seed(5)
    batch, k = 64, 5
    logits = torch.randint(0, 6, (batch, k + 1, vocab), generator=g).to(dtype)  # many ties at the maximum
    best = logits.argmax(-1)
    drafts = torch.where(torch.rand(batch, k, generator=g) < 0.8, best[:, :k], torch.randint(0, vocab, (batch, k), generator=g))
    temperature = torch.where(torch.arange(batch) % 4 == 3, 0.7, 0.0)
    out = xs.rejection_sample(logits.to(device), drafts.to(device), temperature=temperature.to(device),
                              seed=torch.arange(batch, device=device), level=level)
    out = xs.SpecDecodeOutput(out.tokens.cpu(), out.emitted.cpu())
    for b in range(batch):
        if temperature[b] == 0:
            expected = greedy_reference(logits[b], drafts[b], k)
            assert out.tokens[b, :len(expected)].tolist() == expected and int(out.emitted[b]) == len(expected)
            assert (out.tokens[b, len(expected):] == -1).all()


def test_variable_k_padding_and_batch_invariance():
    """Requests with 0 to K drafts in one batch emit what each emits alone with K = its own count."""
    g = torch.Generator().manual_seed(9)
    batch, k, vocab = 6, 3, 30
    logits, probs, drafts = random_requests(g, batch, k, vocab)
    n = torch.tensor([0, 1, 3, 2, 3, 1])
    drafts[1, 1:] = -1  # padding after a request's drafts is ignored
    seeds = torch.arange(100, 100 + batch)
    out = xs.rejection_sample(logits, drafts, draft_probs=probs, num_draft=n, seed=seeds, position=5, top_k=20)
    for b in range(batch):
        m = int(n[b])
        alone = xs.rejection_sample(logits[b:b + 1, :m + 1], drafts[b:b + 1, :m].clamp(min=0),
                                    draft_probs=probs[b:b + 1, :m], seed=int(seeds[b]), position=5, top_k=20)
        e = int(alone.emitted[0])
        assert 1 <= e <= m + 1 and int(out.emitted[b]) == e
        assert out.tokens[b, :e].tolist() == alone.tokens[0, :e].tolist()
        assert (out.tokens[b, e:] == -1).all()


@pytest.mark.parametrize("dead", ["nan", "all -inf", "+inf"])
def test_a_dead_target_row_emits_minus_one_and_stops(dead):
    """Drafts accepted up to a dead row (greedy drafts equal to the argmax); that row emits -1."""
    logits = torch.randn(2, 4, 20, generator=torch.Generator().manual_seed(1))
    drafts = logits[:, :3].argmax(-1)
    if dead == "nan":
        logits[0, 2, 7] = float("nan")
    elif dead == "+inf":
        logits[0, 2, 7] = float("inf")
    else:
        logits[0, 2] = float("-inf")
    out = xs.rejection_sample(logits, drafts, temperature=0.0)
    assert out.tokens[0].tolist() == [*drafts[0, :2].tolist(), -1, -1] and int(out.emitted[0]) == 3
    assert out.tokens[1].tolist() == [*drafts[1].tolist(), int(logits[1, 3].argmax())] and int(out.emitted[1]) == 4


def test_compiled_level_gives_the_loops_tokens():
    """level="compiled" (torch.compile of the same positions) emits the loop's tokens for the same seeds."""
    g = torch.Generator().manual_seed(4)
    batch, k, vocab = 8, 2, 50
    logits, probs, drafts = random_requests(g, batch, k, vocab)
    kw = dict(draft_probs=probs, num_draft=torch.tensor([2, 1, 0, 2, 2, 1, 2, 0]), seed=torch.arange(batch),
              temperature=torch.tensor([0.0, 0.5, 1.0, 1.3, 0.8, 0.0, 1.0, 0.7]), top_k=10, top_p=0.95)
    loop = xs.rejection_sample(logits, drafts, level="loop", **kw)
    compiled = xs.rejection_sample(logits, drafts, level="compiled", **kw)
    assert torch.equal(loop.tokens, compiled.tokens) and torch.equal(loop.emitted, compiled.emitted)


def test_bad_input_names_the_argument():
    logits, drafts = torch.randn(2, 3, 10), torch.zeros(2, 2, dtype=torch.int64)
    cases = [
        (dict(target_logits=torch.randn(2, 10)), "target_logits"),
        (dict(draft_token_ids=torch.zeros(2, 3, dtype=torch.int64)), "draft_token_ids"),
        (dict(draft_token_ids=torch.zeros(2, 2)), "draft_token_ids"),
        (dict(draft_token_ids=torch.full((2, 2), 10)), "draft_token_ids"),
        (dict(draft_probs=torch.rand(2, 2, 9)), "draft_probs"),
        (dict(num_draft=3), "num_draft"),
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(level="kernel"), "level"),
    ]
    for change, name in cases:
        args = dict(target_logits=logits, draft_token_ids=drafts) | change
        with pytest.raises(ValueError, match=name):
            xs.rejection_sample(args.pop("target_logits"), args.pop("draft_token_ids"), **args)


@pytest.mark.cuda
@pytest.mark.parametrize("level", ["loop", "compiled"])
def test_a_gpu_emits_the_cpus_tokens(level):
    """The same requests on the GPU emit the CPU's tokens (counter-based random numbers: the GPU's
    generator kernel gives the CPU's bits)."""
    g = torch.Generator().manual_seed(8)
    batch, k, vocab = 16, 4, 2000
    logits, probs, drafts = random_requests(g, batch, k, vocab, 3.0, 3.0)
    kw = dict(num_draft=torch.randint(0, k + 1, (batch,), generator=g), seed=torch.arange(batch), position=3,
              temperature=torch.rand(batch, generator=g) + 0.3, top_k=100, top_p=0.9)
    cpu = xs.rejection_sample(logits, drafts, draft_probs=probs, level=level, **kw)
    gpu = xs.rejection_sample(logits.cuda(), drafts.cuda(), draft_probs=probs.cuda(), level=level,
                              **{name: v.cuda() if isinstance(v, torch.Tensor) else v for name, v in kw.items()})
    assert torch.equal(cpu.tokens, gpu.tokens.cpu()) and torch.equal(cpu.emitted, gpu.emitted.cpu())


KERNEL_CASES = [(1, 1, 32000, True), (16, 4, 151936, True), (5, 8, 1000, False), (7, 3, 4099, True), (3, 2, 50257, False)]


@pytest.mark.cuda
@pytest.mark.parametrize("batch,k,vocab,with_probs", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_emits_the_loops_tokens(batch, k, vocab, with_probs, dtype):
    """level="kernel" against the loop on the same GPU inputs: greedy and sampled rows, variable K,
    draft distributions given or one-hot, dead rows (NaN, +inf, all -inf) (float64 sums in another order: a token at a
    rounding boundary, probability ~1e-15 per draw, is the only way they could differ)."""
    g = torch.Generator().manual_seed(batch * k + vocab)
    logits = (torch.randn(batch, k + 1, vocab, generator=g) * 3).to(dtype)
    probs = torch.softmax(torch.randn(batch, k, vocab, generator=g) * 3, -1)
    drafts = torch.multinomial(probs.flatten(0, 1), 1, generator=g).view(batch, k)
    drafts[0, 0] = logits[0, 0].float().argmax()
    if batch > 2:
        logits[2, min(1, k)] = float("nan")
    if batch > 4:
        logits[3, k, vocab // 2] = float("inf")
        logits[4, 0] = float("-inf")
    temperature = torch.where(torch.arange(batch) % 3 == 0, 0.0, torch.rand(batch, generator=g) + 0.3)
    kw = dict(num_draft=torch.randint(0, k + 1, (batch,), generator=g).cuda(), seed=torch.arange(batch).cuda(),
              position=torch.full((batch,), 11).cuda(), temperature=temperature.cuda(),
              draft_probs=probs.cuda() if with_probs else None)
    loop = xs.rejection_sample(logits.cuda(), drafts.cuda(), level="loop", **kw)
    kernel = xs.rejection_sample(logits.cuda(), drafts.cuda(), level="kernel", **kw)
    assert torch.equal(kernel.tokens, loop.tokens) and torch.equal(kernel.emitted, loop.emitted)


@pytest.mark.cuda
@pytest.mark.parametrize("with_probs", [True, False])
def test_kernel_follows_the_target_distribution(with_probs):
    """level="kernel": the first emitted token follows q_0, a second one q_1 (chi-square over 10^5
    requests), and the mean number accepted meets its closed form (temperature only: the kernel's settings)."""
    logits, draft, drafts = scenario(k=4, seed=3)
    probs = draft.expand(TRIALS, *draft.shape).cuda() if with_probs else None
    out = xs.rejection_sample(logits.cuda(), drafts.cuda(), draft_probs=probs, temperature=0.9,
                              seed=torch.arange(TRIALS).cuda(), position=7, level="kernel")
    tokens, emitted = out.tokens.cpu(), out.emitted.cpu()
    q = target_probs(logits[0], torch.full((5,), 0.9), torch.zeros(5, dtype=torch.int64), torch.ones(5), torch.zeros(5))
    assert chi_square_p(tokens[:, 0], q[0]) > P_VALUE
    second = emitted >= 2
    assert second.sum() > TRIALS // 20  # one-hot drafts: 7.9% accepted at position 0 (loop level, CPU)
    assert chi_square_p(tokens[second, 1], q[1]) > P_VALUE
    if with_probs:
        expected = torch.cumprod(torch.minimum(draft.double(), q[:4]).sum(-1), 0).sum()
    else:  # one-hot drafts: alpha_i = q_i(x_i) for the request's own drafts, averaged over the requests
        alpha = q[:4].gather(-1, drafts.T).T  # (TRIALS, 4)
        expected = torch.cumprod(alpha, 1).sum(1).mean()
    accepted = (emitted - 1).double()
    assert abs(accepted.mean() - expected) <= SIGMAS * accepted.std() / TRIALS ** 0.5


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_tokens_do_not_depend_on_the_batch(dtype):
    """A request alone (a 16-block cluster) emits what it emits in a batch of 64 (4-block clusters)."""
    g = torch.Generator().manual_seed(12)
    batch, k, vocab = 64, 4, 151936
    logits = (torch.randn(batch, k + 1, vocab, generator=g) * 3).to(dtype).cuda()
    probs = torch.softmax(torch.randn(batch, k, vocab, generator=g), -1).cuda()
    drafts = torch.multinomial(probs.flatten(0, 1), 1).view(batch, k)
    drafts[:, :2] = logits[:, :2].float().argmax(-1)  # accepted often: later positions are reached
    kw = dict(temperature=torch.rand(batch, generator=g).cuda() + 0.5, seed=torch.arange(batch).cuda() + 40,
              position=torch.full((batch,), 3).cuda(), level="kernel")
    together = xs.rejection_sample(logits, drafts, draft_probs=probs, **kw)
    assert together.emitted.max() > 2
    for b in range(0, batch, 9):
        alone = xs.rejection_sample(logits[b:b + 1], drafts[b:b + 1], draft_probs=probs[b:b + 1],
                                    **{name: v[b:b + 1] if isinstance(v, torch.Tensor) else v for name, v in kw.items()})
        assert torch.equal(alone.tokens[0], together.tokens[b]) and torch.equal(alone.emitted[0], together.emitted[b])


@pytest.mark.cuda
def test_kernel_is_one_launch_and_replays_from_a_graph():
    """One kernel launch whatever K; captured in a CUDA graph and replayed, it gives eager's tokens."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(2)
    for k in (1, 8):
        logits = (torch.randn(4, k + 1, 5000, generator=g) * 3).cuda()
        drafts = torch.randint(0, 5000, (4, k), generator=g).cuda()
        args = dict(seed=torch.arange(4).cuda(), position=torch.zeros(4, dtype=torch.int64).cuda(), level="kernel")
        eager = xs.rejection_sample(logits, drafts, **args)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            xs.rejection_sample(logits, drafts, **args)
            torch.cuda.synchronize()
        assert [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                and "rejection" in e.name].__len__() == 1
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = xs.rejection_sample(logits, drafts, **args)
        graph.replay()
        assert torch.equal(out.tokens, eager.tokens) and torch.equal(out.emitted, eager.emitted)


def test_kernel_level_needs_a_gpu_and_no_filters():
    logits, drafts = torch.randn(2, 3, 10), torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="level: 'kernel' takes a temperature only"):
        xs.rejection_sample(logits, drafts, level="kernel", top_k=5)
    with pytest.raises(ValueError, match="level: 'kernel' needs CUDA tensors"):
        xs.rejection_sample(logits, drafts, level="kernel")
