"""The beam-search step op: the kernel against the torch step, ties, dead rows, graph replay."""
import dataclasses
import importlib.util

import pytest
import torch

import xllm_sampling as xs
from xllm_sampling import flags
from xllm_sampling.paths import TARGET_TEMPLATE

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
NEG = -1.0e9
TENSORS = [f.name for f in dataclasses.fields(xs.BeamSearchState) if f.type == "torch.Tensor"]
# Both paths compute float32 log-softmax of logits |x| <= ~30 plus a score of magnitude <= ~60: the
# torch path's max, sum of exp and log are each within an ulp; the kernel's terms (ex2.approx of one
# fma, see scan_tile in beam_search.cuh) are within ~1e-6 relatively, so its log-sum is within ~1e-6;
# the additions of the score are a few float32 ulps of 60 (3.8e-6 each) in different orders: 1e-5.
SCORE_BOUND = 1e-5


def clone(state):
    return dataclasses.replace(state, **{name: getattr(state, name).clone() for name in TENSORS})


def assert_states_equal(a, b, step, ties=False):
    """The choices of ``step`` and everything the search's result depends on. Continuations that hit
    score 1e9 lower, where float32 rounds to multiples of 64: those many equal values rank in an
    order that torch.topk leaves unspecified, so only their scores are compared (they never become
    a result: the search ends, or they are outranked by every live beam); so are pool slots without
    a finished hypothesis. With ``ties`` (bf16/fp16 logits: many equal scores) the running scores
    are compared slot by slot and the choices by :func:`assert_choices_carry_their_scores`."""
    live = b.running_scores > NEG / 2
    assert torch.equal(a.running_scores > NEG / 2, live)
    assert ((a.running_scores - b.running_scores)[live].abs() <= SCORE_BOUND).all()
    assert torch.equal(a.steps, b.steps)
    if ties:  # equal continuations may be chosen differently, and with them the ones that end
        return
    finished = b.pool_finished
    assert torch.equal(a.pool_finished, finished)
    assert ((a.pool_scores - b.pool_scores)[finished].abs() <= SCORE_BOUND).all()
    for name in ("improvable", "all_hit"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("history_tokens", "history_parents"):
        assert torch.equal(getattr(a, name)[:, :, step][live], getattr(b, name)[:, :, step][live]), name
    for name in ("pool_step", "pool_parent", "pool_token"):
        assert torch.equal(getattr(a, name)[finished], getattr(b, name)[finished]), name


def assert_choices_carry_their_scores(state, step, logits, previous_scores):
    """Each live running beam's (parent, token) scores what the state says (float64 log-softmax plus
    the parent's score), and no (parent, token) is chosen twice."""
    batch, beams = state.running_scores.shape
    live = state.running_scores > NEG / 2
    parents, tokens = state.history_parents[:, :, step], state.history_tokens[:, :, step]
    rows = torch.arange(batch, device=parents.device)[:, None] * beams + parents
    own = torch.log_softmax(logits.double(), -1)[rows, tokens] + previous_scores.double().gather(1, parents)
    assert ((own - state.running_scores.double())[live].abs() <= SCORE_BOUND).all()
    pairs = (parents * logits.shape[1] + tokens).tolist()
    assert all(len(set(row)) == len(row) for row in pairs)


def assert_kernel_step_equals_torch_step(torch_state, logits, step):
    """One step of the kernel from a copy of ``torch_state`` and of the torch step on it (which
    advances it): the states agree (low-precision logits: by scores, see assert_states_equal)."""
    kernel_state, previous = clone(torch_state), torch_state.running_scores.clone()
    xs.beam_search_step(logits, kernel_state)
    with flags.override(beam_search=False):
        xs.beam_search_step(logits, torch_state)
    ties = logits.dtype != torch.float32
    assert_states_equal(kernel_state, torch_state, step, ties)
    if ties:
        assert_choices_carry_their_scores(kernel_state, step, logits, previous)


def random_logits(rows, vocab, device, eos, dtype):
    x = torch.randn(rows, vocab, device=device) * 3
    for e in eos:
        x[::3, e] += 9  # the EOS ids among the best of every third row: hypotheses finish
    x[1::5, : vocab // 3] = float("-inf")  # masked tokens
    return x.to(dtype)


SHAPES = [(1, 1, 2, (1,)), (3, 4, 1000, (3,)), (2, 8, 32001, (3, 7)), (64, 4, 151936, (3,)), (4, 32, 4099, (3, 7, 11)),
          (1, 4, 262144, ()), (5, 2, 50257, (50256,))]


@pytest.mark.cuda
@pytest.mark.parametrize("batch,beams,vocab,eos", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("early_stopping,length_penalty", [(False, 1.0), (True, 0.6), ("never", 2.0)])
def test_kernel_steps_equal_torch_steps(batch, beams, vocab, eos, dtype, early_stopping, length_penalty):
    """Every step of a search up to max_length (the first with only beam 0 live, the last where every
    continuation hits): the kernel leaves the state the torch step leaves, from the same state."""
    torch_state = xs.BeamSearchState.start(batch, beams, 3, 9, eos, length_penalty, early_stopping, device="cuda")
    for step in range(6):
        logits = random_logits(batch * beams, vocab, "cuda", eos, dtype)
        assert_kernel_step_equals_torch_step(torch_state, logits, step)


@pytest.mark.cuda
@pytest.mark.parametrize("order", ["ascending", "descending"])
@pytest.mark.parametrize("beams", [4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_keeps_the_best_of_sorted_rows(order, beams, dtype):
    """Rows sorted ascending put every logit above all before it (each warp's buffer fills and is
    compacted again and again: by the lanes' bests for 4 beams, exactly for 16); descending rows
    put the best first (nothing after the first tile passes the floor)."""
    batch, vocab, eos = 3, 40000, (5,)
    g = torch.Generator().manual_seed(11)
    rows = (torch.randn(batch * beams, vocab, generator=g) * 3).sort(-1, descending=order == "descending").values.cuda()
    torch_state = xs.BeamSearchState.start(batch, beams, 3, 9, eos, 1.0, False, device="cuda")
    for step in range(2):
        logits = rows.to(dtype)
        assert_kernel_step_equals_torch_step(torch_state, logits, step)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_ranks_ties_by_lower_beam_then_lower_token(dtype):
    """Identical beam rows of a few distinct values, equal beam scores: the running beams are the
    best continuations ordered by score, then beam, then token (no EOS, far from max_length)."""
    beams, vocab = 4, 5000
    row = torch.randint(0, 4, (vocab,), device="cuda").to(dtype)
    state = xs.BeamSearchState.start(2, beams, 1, 50, eos=(), device="cuda")
    state.running_scores.zero_()
    xs.beam_search_step(row.expand(2 * beams, vocab).contiguous(), state)
    logp = torch.log_softmax(row.double(), -1).expand(beams, vocab).reshape(-1)
    order = torch.sort(logp, descending=True, stable=True).indices[:beams]  # equal scores: lower flat index first
    for b in range(2):
        assert state.history_parents[b, :, 0].tolist() == (order // vocab).tolist()
        assert state.history_tokens[b, :, 0].tolist() == (order % vocab).tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("on", [True, False])
def test_nan_and_all_inf_beams_have_no_continuation(device, on):
    beams, vocab = 4, 3000
    state = xs.BeamSearchState.start(1, beams, 1, 20, eos=(), device=device)
    state.running_scores.zero_()
    logits = torch.randn(beams, vocab, device=device)
    logits[1, 17] = float("nan")
    logits[2] = float("-inf")
    with flags.override(beam_search=on):
        xs.beam_search_step(logits, state)
    parents = set(state.history_parents[0, :, 0].tolist())
    assert parents <= {0, 3} and torch.isfinite(state.running_scores).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("on", [True, False])
def test_first_step_extends_beam_zero_only(device, on):
    """At the first step the other beams start at -1e9: every running beam descends from beam 0."""
    state = xs.BeamSearchState.start(3, 4, 2, 10, eos=5, device=device)
    with flags.override(beam_search=on):
        xs.beam_search_step(torch.randn(12, 700, device=device), state)
    assert (state.history_parents[:, :, 0] == 0).all()
    assert (state.running_scores < 0).all() and (state.running_scores > -1e3).all()


@pytest.mark.cuda
def test_graph_replay_equals_eager():
    """The kernel step captured once in a CUDA graph and replayed (the step counter lives on the
    device, so each replay advances it) leaves the state eager steps leave, bit for bit."""
    batch, beams, vocab, eos = 8, 4, 32000, (3,)
    eager = xs.BeamSearchState.start(batch, beams, 2, 12, eos, device="cuda")
    graphed = clone(eager)
    static = torch.empty(batch * beams, vocab, device="cuda")
    xs.beam_search_step(random_logits(batch * beams, vocab, "cuda", eos, torch.float32), clone(graphed))  # build, warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        xs.beam_search_step(static, graphed)
    for _ in range(10):
        logits = random_logits(batch * beams, vocab, "cuda", eos, torch.float32)
        static.copy_(logits)
        graph.replay()
        xs.beam_search_step(logits, eager)
    torch.cuda.synchronize()
    for name in TENSORS:
        assert torch.equal(getattr(graphed, name), getattr(eager, name)), name


def reference_engine_beam():
    """The reference engine's own beam search module (engine/beam.py imports only torch)."""
    spec = importlib.util.spec_from_file_location("refengine_beam", TARGET_TEMPLATE / "engine" / "beam.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("early_stopping,length_penalty", [(False, 1.0), (True, 0.6), ("never", 2.0)])
def test_search_through_the_state_api_equals_the_engines_search(device, early_stopping, length_penalty):
    """A whole search driven by last_tokens / last_parents / done / results (the op's state API; the
    kernel on a GPU) returns the reference engine's sequences and scores on the same logits."""
    batch, beams, vocab, prompt_len, new = 3, 4, 60, 4, 10
    g = torch.Generator().manual_seed(0)
    last, before = (torch.randn(vocab, vocab, generator=g) * 2).to(device), torch.randn(vocab, vocab, generator=g).to(device)
    last[:, 7] += 2  # EOS id 7 is often among the best: hypotheses end early

    def logits_of(ids):
        return last[ids[:, -1]] + 0.5 * before[ids[:, -2]]

    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)
    state = xs.BeamSearchState.start(batch, beams, prompt_len, prompt_len + new, 7, length_penalty, early_stopping, device)
    ids = prompts.repeat_interleave(beams, 0)
    for step in range(new):
        xs.beam_search_step(logits_of(ids), state)
        if state.done():
            break
        ids = torch.cat((ids[state.last_parents(step)], state.last_tokens(step)[:, None]), 1)
    sequences, scores = state.results(prompts, pad=7)

    rows = {}

    def step_logits(tokens, parents):
        rows["ids"] = tokens if parents is None else torch.cat((rows["ids"][parents], tokens), 1)
        return logits_of(rows["ids"])

    expected, expected_scores = reference_engine_beam().beam_search(step_logits, prompts, beams, new, [7],
                                                                     length_penalty, early_stopping, pad=7)
    assert torch.equal(sequences, expected)
    assert ((scores - expected_scores).abs() <= SCORE_BOUND).all()
    assert (expected[..., -1] == 7).any()  # some hypotheses ended on the EOS
