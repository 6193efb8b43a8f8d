"""The ops on their own: bad input, the generator, parity of fast and original paths, the graph runner."""
import json
import os
import warnings

import pytest
import torch

import xllm_sampling as xs
from xllm_sampling import flags, rng, tolerances
from xllm_sampling import GraphRunner, StaticStep, published_counters

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def test_philox_known_answers():
    z = torch.zeros(1, dtype=torch.int64)
    assert [int(v) for v in rng.philox4x32((z, z, z, z), (z, z))] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = z + 0xFFFFFFFF
    assert [int(v) for v in rng.philox4x32((f, f, f, f), (f, f))] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_uniform_depends_on_seed_and_position_only():
    seed, pos = torch.tensor([1, 1, 2]), torch.tensor([5, 6, 5])
    u = rng.uniform(seed, pos)
    assert u.dtype == torch.float64 and ((u >= 0) & (u < 1)).all() and len(set(u.tolist())) == 3
    assert rng.uniform(seed[1:2], pos[1:2]).item() == u[1].item()


def test_python_philox_matches_torch_bit_for_bit():
    """The CPU path for a few keys (plain Python integers) gives uniform_torch's bits, negative
    and 64-bit keys included, and rng.uniform takes it for small batches only."""
    g = torch.Generator().manual_seed(0)
    seed = torch.randint(-(2**62), 2**62, (300,), generator=g)
    position = torch.randint(-(2**40), 2**40, (300,), generator=g)
    for stream in (0, 7):
        ref = rng.uniform_torch(seed, position, stream)
        python = torch.tensor([rng.uniform_python(s, p, stream) for s, p in zip(seed.tolist(), position.tolist())],
                              dtype=torch.float64)
        assert torch.equal(python, ref)
        assert torch.equal(rng.uniform(seed[:rng.PYTHON_MAX_ROWS], position[:rng.PYTHON_MAX_ROWS], stream),
                           ref[:rng.PYTHON_MAX_ROWS])


@pytest.mark.cuda
def test_philox_kernel_matches_torch_bit_for_bit():
    seed = torch.randint(-(2**62), 2**62, (4099,), device="cuda")
    position = torch.randint(0, 2**40, (4099,), device="cuda")
    for stream in (0, 7):
        assert torch.equal(rng.uniform(seed, position, stream), rng.uniform_torch(seed, position, stream))


@pytest.mark.parametrize("call,match", [
    (lambda: xs.logit_softmax(torch.randn(4)), "logits: expected a 2-D tensor"),
    (lambda: xs.logit_softmax(torch.randint(0, 3, (2, 4))), "logits: dtype torch.int64"),
    (lambda: xs.logit_softmax(torch.randn(2, 4), -1.0), "temperature: value -1.0"),
    (lambda: xs.logit_softmax(torch.randn(2, 4), torch.tensor([1.0, float("nan")])), "temperature: value nan"),
    (lambda: xs.logit_softmax(torch.randn(2, 4), torch.ones(3)), r"temperature: expected shape \(2,\)"),
    (lambda: xs.logit_softmax(torch.randn(2, 4), out=torch.empty(2, 4, dtype=torch.float16)), "out:"),
    (lambda: xs.air_topk_last_dim(torch.randn(2, 4), 0), r"k: 0 outside \[1, 4\]"),
    (lambda: xs.air_topk_last_dim(torch.randn(2, 4), 5), r"k: 5 outside \[1, 4\]"),
    (lambda: xs.air_topk_last_dim(torch.randn(2, 4), 2.0), "k: expected an int"),
    (lambda: xs.sample(torch.randn(2, 4), top_p=0.0), "top_p: value 0"),
    (lambda: xs.sample(torch.randn(2, 4), top_p=torch.tensor([0.5, 1.5])), "top_p: value 1.5"),
    (lambda: xs.sample(torch.randn(2, 4), top_k=-1), "top_k: value -1"),
    (lambda: xs.sample(torch.randn(2, 4), temperature=-0.5), "temperature: value -0.5"),
    (lambda: xs.sample(torch.randn(2, 4), min_p=torch.ones(3)), r"min_p: expected shape \(2,\)"),
    (lambda: xs.sample(torch.randn(2, 4), seed=torch.zeros(2)), "seed: dtype torch.float32"),
    (lambda: xs.sample(torch.randn(2, 40), top_logprobs=21), r"top_logprobs: expected an integer in \[0, 20\], got 21"),
    (lambda: xs.sample(torch.randn(2, 4), top_logprobs=5), r"top_logprobs: expected an integer in \[0, 4\], got 5"),
    (lambda: xs.sample(torch.randn(2, 4), top_logprobs=2.0), r"top_logprobs: expected an integer in \[0, 4\], got 2.0"),
    (lambda: xs.sample(torch.randn(2, 4), top_logprobs=-1), r"top_logprobs: expected an integer in \[0, 4\], got -1"),
    (lambda: xs.beam_search_step(torch.randn(6, 8), xs.BeamSearchState.start(2, 4, 3, 9)), r"logits: expected 2 x 4 = 8 rows"),
    (lambda: xs.beam_search_step(torch.randn(4, 2), xs.BeamSearchState.start(1, 4, 3, 9, eos=[0, 1])),
     "logits: a vocab of 2 has fewer than the 12 continuations"),
    (lambda: xs.BeamSearchState.start(2, 33, 3, 9), "num_beams: at most 32, got 33"),
    (lambda: xs.BeamSearchState.start(2, 4, 3, 3), "max_length: expected an int above prompt_len=3, got 3"),
    (lambda: xs.BeamSearchState.start(2, 4, 3, 9, eos=[1, -2]), "eos: expected a token id or a list"),
    (lambda: xs.BeamSearchState.start(2, 4, 3, 9, early_stopping="sometimes"), "early_stopping: expected True, False"),
    (lambda: xs.sample(torch.randn(2, 4), seed=2 ** 70), "seed: .* does not fit in int64"),
    (lambda: xs.sample(torch.randn(2, 4), top_k=2.5), "top_k: expected an integer, got 2.5"),
    (lambda: xs.sample(torch.randn(2, 4), position=float("inf")), "position: expected an integer, got inf"),
    (lambda: xs.sample(torch.randn(2, 4), seed=-2 ** 63 - 1), "seed: .* does not fit in int64"),
    (lambda: xs.logit_softmax(torch.randn(2, 4), "1.0"), "temperature: expected a number or a tensor, got str"),
    (lambda: xs.BeamSearchState.start(2, 0, 3, 9), "num_beams: expected an int >= 1"),
])
def test_bad_input_is_a_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.cuda
def test_tensors_on_different_devices_are_refused():
    with pytest.raises(ValueError, match="temperature: on cpu but logits are on cuda"):
        xs.logit_softmax(torch.randn(2, 4, device="cuda"), torch.ones(2))
    with pytest.raises(ValueError, match="logits: on cuda:0 but the beam state is on cpu"):
        xs.beam_search_step(torch.randn(4, 8, device="cuda"), xs.BeamSearchState.start(2, 2, 3, 9))


@pytest.mark.cuda
@pytest.mark.parametrize("call, match", [
    (lambda x: xs.logit_softmax(x[None]), r"logits: expected a 2-D tensor \(batch, vocab\)"),
    (lambda x: xs.logit_softmax(x[:, :0]), "logits: empty tensor"),
    (lambda x: xs.logit_softmax(x.long()), "logits: dtype"),
    (lambda x: xs.logit_softmax(x, torch.ones(3, device="cuda")), r"temperature: expected shape \(2,\)"),
    (lambda x: xs.logit_softmax(x, torch.ones(2, 1, device="cuda")), r"temperature: expected shape \(2,\)"),
    (lambda x: xs.logit_softmax(x, out=torch.empty(2, 4, dtype=torch.float16, device="cuda")), "out: expected a float32"),
    (lambda x: xs.logit_softmax(x, out=torch.empty(4, 2, device="cuda").t()), "out: must be contiguous"),
    (lambda x: xs.logit_softmax(x, out=torch.empty(2, 4)), "out: must be contiguous and on cuda"),
])
def test_bad_gpu_input_is_a_value_error_naming_the_argument(call, match):
    """A GPU call with the flag on takes logit_softmax's short checks: every bad argument still
    gets the torch path's ValueError naming it, and the kernel never sees it."""
    with flags.override(logit_softmax=True):
        with pytest.raises(ValueError, match=match):
            call(torch.randn(2, 4, device="cuda"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("log", [False, True])
def test_logit_softmax_fast_equals_original(device, log):
    x = torch.randn(5, 3001, device=device) * 3
    t = torch.rand(5, device=device) + 0.5
    with flags.override(logit_softmax=False):
        ref = xs.logit_softmax(x, t, log=log)
    out = torch.empty_like(ref)
    got = xs.logit_softmax(x, t, log=log, out=out)
    assert got.data_ptr() == out.data_ptr()
    # Both are float32 results: each may be about an ulp of |x / t| (rounded on the way) and of
    # |ref| away from the exact value (log-probs of -16 are 2e-6 apart per ulp), in either direction.
    assert ((got - ref).abs() <= 1e-6 + 2.4e-7 * (ref.abs() + (x / t[:, None]).abs())).all()


@pytest.mark.parametrize("device", DEVICES)
def test_sample_fast_and_original_agree_on_greedy(device):
    x = torch.randn(7, 5000, device=device)
    fast = xs.sample(x, temperature=0.0)
    with flags.override(sampler=False):
        original = xs.sample(x, temperature=0.0)
    assert torch.equal(fast.tokens, original.tokens) and torch.equal(fast.tokens, x.argmax(-1))
    # both are float32 log-probabilities, each within the bound of float64's (in either direction)
    bound = 2 * tolerances.log_softmax_absolute_error(5000, x.abs().max().item(), original.logprobs.abs().max().item())
    assert (fast.logprobs - original.logprobs).abs().max().item() <= bound


@pytest.mark.parametrize("device", DEVICES)
def test_sample_full_vocab_path_keeps_the_top_p_nucleus(device):
    x = torch.tensor([[4.0, 3.0, 2.0, -5.0, -6.0] + [-9.0] * 2000], device=device)
    tokens = xs.sample(x.expand(4000, -1), top_p=0.9, position=torch.arange(4000, device=device)).tokens
    assert set(tokens.tolist()) == {0, 1}  # p = 0.663, 0.244, 0.090, ...: mass before token 2 is 0.907


def test_graph_runner_runs_eagerly_on_cpu():
    runner = GraphRunner(lambda x, t: xs.sample(x, temperature=t))
    x = torch.randn(3, 50)
    out = runner(x, torch.zeros(3))
    assert torch.equal(out.tokens, x.argmax(-1)) and runner.eager_calls == 1 and runner.captures == 0


def test_graph_counters_add_up_by_name_and_are_published_beside_the_flags_file(tmp_path, monkeypatch):
    from xllm_sampling.ops import cuda_graph

    first, second = GraphRunner(lambda x: x + 1, name="counted"), GraphRunner(lambda x: x * 2, name="counted")
    for runner, calls in ((first, 2), (second, 3)):
        for _ in range(calls):
            runner(torch.ones(2, 3))
    assert xs.graph_counters()["counted"] == {"captures": 0, "replays": 0, "eager_calls": 5}
    monkeypatch.delenv("XLLM_SAMPLING_FLAGS_FILE", raising=False)
    assert cuda_graph.counters_file() is None
    cuda_graph.publish(force=True)  # nowhere to publish: nothing happens
    monkeypatch.setenv("XLLM_SAMPLING_FLAGS_FILE", str(tmp_path / "flags.toml"))
    cuda_graph.publish(force=True)
    published = json.loads(cuda_graph.counters_file().read_text())
    assert cuda_graph.counters_file().parent == tmp_path / "graph_counters"
    assert published["runners"]["counted"]["eager_calls"] == 5
    folder = cuda_graph.counters_file().parent
    os.utime(cuda_graph.counters_file(), (1, 1))  # older than the files below
    for pid in range(2 ** 22 + 1, 2 ** 22 + 12):  # exited processes' files (pids above Linux's limit)
        (folder / f"{pid}.json").write_text("{}")
    published_counters.prune(folder, keep=8)  # the 8 newest stay, and this running process's file
    assert len(list(folder.glob("*.json"))) == 9 and cuda_graph.counters_file().exists()
    monkeypatch.setattr(cuda_graph, "PUBLISH_EVERY_S", 1e9)
    first(torch.ones(2, 3))  # within PUBLISH_EVERY_S of the last publication: not written again
    assert json.loads(cuda_graph.counters_file().read_text())["runners"]["counted"]["eager_calls"] == 5


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 5, 16, 300])
def test_graph_replay_equals_eager_bit_for_bit(batch):
    def step(logits, temperature, seed, position):
        return xs.sample(logits, temperature=temperature, top_k=50, top_p=0.9, seed=seed, position=position)

    runner = GraphRunner(step)
    for position in range(3):
        args = (torch.randn(batch, 32000, device="cuda") * 3, torch.full((batch,), 0.8, device="cuda"),
                torch.arange(batch, device="cuda"), torch.full((batch,), position, device="cuda"))
        graphed = runner(*args)
        eager = step(*args)
        assert torch.equal(graphed.tokens, eager.tokens) and torch.equal(graphed.logprobs, eager.logprobs)
    assert runner.captures == (1 if batch <= 256 else 0) and runner.replays == (3 if batch <= 256 else 0)


def test_graph_runner_advances_positions_in_place_on_cpu():
    """``advance`` on the eager path: the caller's tensor moves on by one after each call; static
    inputs are the caller's own tensors where no graph is used."""
    runner = GraphRunner(lambda x, position: x + position, advance=(1,))
    x, position = torch.zeros(3), torch.tensor([5, 6, 7])
    assert runner.static_inputs(x, position)[1] is position
    assert torch.equal(runner(x, position), torch.tensor([5.0, 6.0, 7.0]))
    assert torch.equal(runner(x, position), torch.tensor([6.0, 7.0, 8.0]))
    assert torch.equal(position, torch.tensor([7, 8, 9])) and runner.eager_calls == 2


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("static", [False, True])
def test_graph_replay_with_advanced_positions_equals_eager_bit_for_bit(batch, static):
    """Positions advanced by the runner (in the graph, and in the caller's tensor) draw what eager
    calls at the same positions draw, passed as the caller's tensors or as the static inputs (changed
    in place between calls: the next replay sees the change); padded buckets (5 -> 8) included."""
    def step(logits, temperature, seed, position):
        return xs.sample(logits, temperature=temperature, top_k=50, top_p=0.9, seed=seed, position=position)

    g = torch.Generator("cuda").manual_seed(batch)
    logits = torch.randn(batch, 32000, device="cuda", generator=g) * 3
    settings = (torch.full((batch,), 0.8, device="cuda"), torch.arange(batch, device="cuda"))
    start = torch.arange(batch, device="cuda") * 7
    runner = GraphRunner(step, advance=(3,))
    inputs = (logits, *settings, start.clone())
    if static:
        inputs = runner.static_inputs(*inputs)
    for call in range(4):
        if static and call == 2:
            inputs[1].fill_(1.3)  # a setting changed in place: seen by the next replay
        temperature = inputs[1].clone()
        eager = step(logits, temperature, settings[1], start + call)
        graphed = runner(*inputs)
        assert torch.equal(graphed.tokens, eager.tokens) and torch.equal(graphed.logprobs, eager.logprobs), call
        assert torch.equal(inputs[3], start + call + 1)
    assert runner.captures == 1 and runner.replays == 4


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [3, 4])
def test_graph_outputs_not_copied_are_the_graphs_buffers_rewritten_by_the_next_call(batch):
    """copy_outputs=False: each call's outputs equal eager's and are views of the graph's own
    buffers (the same storage every call; padded bucket 3 -> 4 cut to the batch)."""
    def step(x, position):
        return xs.sample(x, temperature=0.8, top_k=20, position=position)

    x = torch.randn(batch, 1000, device="cuda", generator=torch.Generator("cuda").manual_seed(batch))
    runner = GraphRunner(step, copy_outputs=False)
    outputs = []
    for position in range(3):
        out = runner(x, torch.full((batch,), position, device="cuda"))
        eager = step(x, torch.full((batch,), position, device="cuda"))
        assert out.tokens.shape == (batch,) and torch.equal(out.tokens, eager.tokens)
        assert torch.equal(out.logprobs, eager.logprobs)
        outputs.append(out.tokens)
    assert runner.replays == 3 and len({o.data_ptr() for o in outputs}) == 1


def _private_pool_segments() -> dict[int, int]:
    """Address -> size of every segment the CUDA caching allocator holds in a private pool (a graph's)."""
    return {s["address"]: s["total_size"] for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) != (0, 0)}


@pytest.mark.cuda
def test_a_runners_graphs_share_one_memory_pool():
    """The buckets' graphs of one runner are captured into one private pool: captured after the
    largest bucket's graph, the smaller ones reuse the blocks its temporaries freed."""
    mib, row = 1 << 20, 1 << 20  # float32: 4 MiB a row

    def step(x):
        return (x * 2).exp().sum(-1)  # two live temporaries of 4 MiB a row, an output of 4 bytes a row

    runner = GraphRunner(step, buckets=(1, 2, 4))
    before = _private_pool_segments()
    for batch in (4, 2, 1):
        x = torch.ones(batch, row, device="cuda")
        assert torch.equal(runner(x), step(x))
    assert runner.captures == 3
    new = sum(size for address, size in _private_pool_segments().items() if address not in before)
    # Shared: bucket 4's two 16 MiB temporaries, split for the smaller buckets', and the outputs'
    # small blocks (2 MiB segments, one each at most). A graph of its own pool would add two
    # segments of at least 8 MiB for bucket 2 (20 MiB ones: the allocator's size for 1-10 MiB).
    assert new <= 2 * 16 * mib + 3 * 2 * mib, new / mib


@pytest.mark.cuda
@pytest.mark.parametrize("static", [False, True])
def test_a_flag_toggled_between_replays_takes_effect_at_the_next_call(static):
    """Step flags toggled while graphs exist: the next call runs the new path (a graph captured for
    it), toggling back replays the first graph; each result equals eager under the same flags. The
    graphs of a bucket share its static inputs: a caller passing them is right under either."""
    def step(logits):
        return xs.air_topk_last_dim(xs.logit_softmax(logits, 0.8), 50)

    runner = GraphRunner(step)
    x = torch.randn(8, 32000, device="cuda", generator=torch.Generator("cuda").manual_seed(8)) * 3
    if static:
        x, = runner.static_inputs(x)
    for on in (True, False, True, False):
        with flags.override(logit_softmax=on, air_topk=on):
            (graphed_values, graphed_indices), (values, indices) = runner(x), step(x)
        assert torch.equal(graphed_values, values) and torch.equal(graphed_indices, indices)
    assert runner.captures == 2 and runner.replays == 4


def test_nvtx_each_opens_one_range_per_item_and_closes_it_when_the_loop_breaks(monkeypatch):
    from xllm_sampling import nvtx

    events = []

    class Recorder:
        def push_range(self, message, domain):
            events.append(("push", message, domain))

        def pop_range(self, domain):
            events.append(("pop", domain))

    monkeypatch.setattr(nvtx, "_nvtx", lambda: Recorder())
    push, pop = ("push", "xllm_sampling/decode_step", "xllm_sampling"), ("pop", "xllm_sampling")
    with flags.override(nvtx=True):
        for i in nvtx.each(range(2), "decode_step"):
            events.append(("body", i))
        assert events == [push, ("body", 0), pop, push, ("body", 1), pop]
        events.clear()
        for i in nvtx.each(range(3), "decode_step"):
            events.append(("body", i))
            if i == 1:
                break
        assert events == [push, ("body", 0), pop, push, ("body", 1), pop]
    events.clear()
    assert [i for i in nvtx.each(range(3), "decode_step")] == [0, 1, 2] and events == []  # flag off: no call


def test_path_state_follows_every_step_flag_but_graphs_and_nvtx():
    assert flags.path_flags() == ("logit_softmax", "air_topk", "sampler", "beam_search", "spec_decode")
    with flags.override(logit_softmax=True, air_topk=True, sampler=False, beam_search=True, spec_decode=False, nvtx=True):
        assert flags.path_state() == (True, True, False, True, False)


@pytest.mark.cuda
def test_graph_capture_failure_falls_back_with_one_warning():
    def step(x):
        return x[x > 0].sum(-1, keepdim=True).expand(x.shape[0], 1) + x.nonzero().shape[0]  # syncs: not capturable

    runner = GraphRunner(step)
    x = torch.randn(4, 10, device="cuda")
    with pytest.warns(RuntimeWarning, match="capture .* failed"):
        first = runner(x)
    assert torch.equal(first, step(x)) and runner.captures == 0
    assert torch.equal(runner(x), step(x))
    # torch's CUDA generator still works outside graphs after the failed capture
    assert torch.randn(3, device="cuda").isfinite().all()
    assert torch.multinomial(torch.ones(2, 4, device="cuda"), 1).shape == (2, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_static_step_replays_and_falls_back_with_one_warning_on_a_failed_capture(device):
    """A capturable step: eager once, then captured and replayed, each call's result right; a step
    that cannot be captured (a host read on a GPU; no GPU at all on CPU): one warning, every call
    run eagerly, none lost."""
    x = torch.arange(6.0, device=device)
    scale = torch.ones(1, device=device)
    capturable = StaticStep(lambda: x * scale, cuda=device == "cuda", name="scaled")
    with flags.override(cuda_graph=True):
        for k in range(1, 5):
            scale.fill_(k)
            assert torch.equal(capturable(), x * k)
    expected = (1, 1, 3) if device == "cuda" else (0, 4, 0)  # captures, eager calls, replays
    assert (capturable.captures, capturable.eager_calls, capturable.replays) == expected
    out = torch.empty_like(x)
    failing = StaticStep(lambda: out.copy_(x * float(scale.sum())), cuda=True, name="host_read")
    with flags.override(cuda_graph=True):
        scale.fill_(1)
        assert torch.equal(failing(), x)  # the warm-up: eager
        scale.fill_(2)
        with pytest.warns(RuntimeWarning, match="capture of host_read failed"):
            assert torch.equal(failing(), 2 * x)
        scale.fill_(3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            assert torch.equal(failing(), 3 * x)
    assert (failing.captures, failing.eager_calls, failing.replays) == (0, 3, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("sorted_by_value", [True, False])
def test_topk_keeps_tied_values_by_ascending_index(device, largest, sorted_by_value):
    """The docstring's tie rule, on every path: of equal values the lowest indices are kept; sorted,
    equal values come by ascending index; unsorted with index_order, ascending index, the same call to call."""
    x = torch.ones(74, 16384, device=device)  # torch.topk alone keeps a tied set starting at index 10752
    x[:, 5000:5100] = 2.0 if largest else 0.0
    x[3, 7] = float("nan")
    values, indices = xs.air_topk_last_dim(x, 512, sorted_by_value=sorted_by_value, largest=largest, index_order=True)
    ahead = list(range(5000, 5100))  # the 100 values that beat the ties
    expected = torch.tensor(ahead + list(range(412)), device=device)
    if largest:  # NaN ranks first; the lowest-index ties fill the rest
        row3 = torch.tensor([7] + ahead + [i for i in range(412) if i != 7], device=device)
    else:  # NaN is never picked before a number
        row3 = torch.tensor(ahead + [i for i in range(413) if i != 7], device=device)
    for row, want in ((0, expected), (3, row3)):
        assert torch.equal(indices[row], want if sorted_by_value else want.sort().values), row
        assert torch.equal(values[row].nan_to_num(9.0), x[row].gather(-1, indices[row]).nan_to_num(9.0))
    for _ in range(3):
        again = xs.air_topk_last_dim(x, 512, sorted_by_value=sorted_by_value, largest=largest, index_order=True)
        assert torch.equal(again[1], indices) and torch.equal(again[0].nan_to_num(9.0), values.nan_to_num(9.0))


@pytest.mark.parametrize("device", DEVICES)
def test_sample_is_batch_invariant_whatever_the_other_rows_ask(device):
    """A seeded request draws the same tokens alone and beside a row with top-k off (which makes
    the batch take every candidate), and with top_k given as a number or as a device tensor."""
    logits = (torch.randn(2, 5000) * 3).to(device)
    positions = torch.arange(64, device=device)
    alone, beside, as_tensor = [], [], []
    for pos in positions:
        p = pos.view(1)
        alone.append(xs.sample(logits[:1], top_k=50, seed=7, position=p).tokens)
        beside.append(xs.sample(logits, top_k=torch.tensor([50, 0], device=device), seed=7,
                                position=torch.cat([p, p])).tokens[:1])
        as_tensor.append(xs.sample(logits[:1], top_k=torch.tensor([50], device=device), seed=7, position=p).tokens)
    assert torch.equal(torch.cat(alone), torch.cat(beside)) and torch.equal(torch.cat(alone), torch.cat(as_tensor))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flag", [True, False])
def test_sample_keeps_tied_tokens_by_rank_lower_index_first(device, flag):
    ties = torch.zeros(400, 50, device=device)
    ties[:, 10:15] = 5.0  # five logits tied at the maximum
    half = torch.cat([torch.ones(1000), torch.zeros(1000)]).to(device).expand(400, -1)
    positions = torch.arange(400, device=device)
    generator = torch.Generator(device).manual_seed(3)  # the original path's randomness
    with flags.override(sampler=flag):
        top1 = xs.sample(ties, top_k=1, seed=3, position=positions, generator=generator).tokens
        nucleus = xs.sample(half, top_p=0.5, seed=3, position=positions, generator=generator).tokens
    assert set(top1.tolist()) == {10}
    # p = e / (1000 e + 1000) for each 1.0: the mass above token i is i p, under 0.5 for i <= 683
    assert set(nucleus.tolist()) <= set(range(684)) and max(nucleus.tolist()) > 600


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flag", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_top_logprobs_are_the_most_likely_tokens_and_their_log_probabilities(device, flag, dtype):
    """top_logprobs=n: each row's n largest processed logits (after penalties), ties by ascending
    index, with their log-probabilities under penalties and temperature (the filters do not
    change them), against a float64 log-softmax; a greedy row's first entry is its token and
    logprob exactly; an invalid row gives -1 and NaN; n = 0 gives None."""
    g = torch.Generator().manual_seed(23)
    batch, vocab, n = 6, 1001, 20
    logits = (torch.randn(batch, vocab, generator=g) * 3).round().to(dtype)  # rounded: many ties
    logits[4] = float("nan")
    generated = torch.randint(0, vocab, (batch, 12), generator=g)
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.9, 0.0])
    kw = dict(temperature=temperature, top_k=torch.tensor([0, 5, 50, 0, 3, 1]), top_p=0.9, min_p=0.05,
              generated=generated, frequency_penalty=0.3, presence_penalty=0.2, repetition_penalty=1.3, seed=5,
              position=torch.arange(batch))
    x_dev, kw_dev = logits.to(device), {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with flags.override(sampler=flag):
        out = xs.sample(x_dev, top_logprobs=n, generator=torch.Generator(device).manual_seed(1), **kw_dev)
        assert xs.sample(x_dev, **kw_dev).top_tokens is None
        zeros = torch.tensor([[-0.0, 0.0, -1.0, -0.0]], device=device).to(dtype)
        assert xs.sample(zeros, top_logprobs=4).top_tokens.tolist() == [[0, 1, 3, 2]]  # -0.0 ties +0.0
    x = xs.ops.sampler.apply_penalties(logits.float(), xs.ops.sampler.Penalties(
        generated, kw["frequency_penalty"], kw["presence_penalty"], kw["repetition_penalty"])).double()
    t = torch.where(temperature == 0, 1.0, temperature).double()[:, None]
    ref = torch.log_softmax(x / t, -1)
    valid = [r for r in range(batch) if r != 4]
    for r in valid:  # the ranking: value descending, then index ascending (-0.0 == +0.0)
        ranked = sorted(range(vocab), key=lambda i: (-x[r, i].item(), i))[:n]
        assert out.top_tokens[r].tolist() == ranked, r
    # One float32 log-softmax's error (tolerances.py) bounds the chosen token's logprob on either
    # path; deriving another token's from it adds one float32 rounding (U |lp|), inside a second one.
    scaled = (x / t)[valid].abs().max().item()
    top_ref = ref.gather(-1, out.top_tokens.clamp(min=0).cpu())
    atol = 2 * tolerances.log_softmax_absolute_error(vocab, scaled, top_ref[valid].abs().max().item())
    assert torch.allclose(out.top_logprobs.cpu()[valid].double(), top_ref[valid], rtol=0, atol=atol)
    for r in (0, 5):  # greedy rows
        assert out.top_tokens[r, 0] == out.tokens[r] and out.top_logprobs[r, 0] == out.logprobs[r]
    assert (out.top_tokens[4] == -1).all() and out.top_logprobs[4].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [1, 15000, 29000])
def test_top_p_boundary_is_exact(device, rank):
    """top_p one float32 step above and below the exact mass of the first ``rank`` tokens keeps
    ``rank + 1`` and ``rank`` tokens, on both paths: their float64 sums are exact to ~1e-12, far
    inside a float32 step (6e-8 relative). A float32 cumulative sum minus the token's own mass is
    off by up to ~1e-6 at 30000 tokens and misplaces such boundaries. The fast path is asked for
    the token at the boundary itself: a position whose uniform lands inside that token's mass."""
    import math

    from xllm_sampling import rng
    from xllm_sampling.ops import sampler

    logits = (torch.randn(30000) * 0.3).sort(descending=True).values.to(device)  # rank = index

    def one_step_around(masses):  # float32 top_p just below and just above the mass of the first `rank`
        exact = math.fsum(masses[:rank]) / math.fsum(masses)
        below = torch.tensor(exact, dtype=torch.float32)
        below = below if below.item() < exact else torch.nextafter(below, torch.tensor(0.0))
        return exact, below, torch.nextafter(below, torch.tensor(1.0))

    # the original path: its own float32 probabilities, ranked
    ranked = torch.softmax(logits, -1)[None]
    _, below, above = one_step_around(ranked[0].double().cpu().tolist())
    one = lambda v, d: torch.tensor([v], dtype=d, device=device)  # noqa: E731
    for top_p, kept in ((below, rank), (above, rank + 1)):
        keep = sampler._ranked_keep(ranked, one(0, torch.int64), one(top_p.item(), torch.float32), one(0.0, torch.float32))
        assert keep.sum().item() == kept
    # the fast path: its weights 2^((x - max) log2(e)), computed on the device as its kernel does
    w = torch.exp2((logits - logits.max()) * torch.tensor(sampler.LOG2E, dtype=torch.float32, device=device))
    w = w.double().cpu().tolist()
    exact, below, above = one_step_around(w)
    lo, hi = exact, exact + w[rank] / math.fsum(w)  # the boundary token's share of the uniform
    u = rng.uniform_torch(torch.zeros(1 << 20, dtype=torch.int64), torch.arange(1 << 20))
    position = int(((u - (lo + hi) / 2).abs()).argmin())
    assert lo < u[position].item() < hi
    for top_p, kept in ((below, rank), (above, rank + 1)):
        with flags.override(sampler=True):
            token = xs.sample(logits[None], top_p=top_p.item(), seed=0, position=position).tokens.item()
        assert (token == rank) if kept == rank + 1 else (token < rank)


@pytest.mark.parametrize("device", DEVICES)
def test_all_greedy_batch_is_an_argmax(device):
    x = torch.randn(6, 3001).to(device, torch.bfloat16)
    x[2, 100:104] = x[2].max()  # bf16 ties at the maximum: the lowest index
    out = xs.sample(x, temperature=0.0)
    assert torch.equal(out.tokens, x.float().argmax(-1)) and out.tokens[2].item() == min(100, out.tokens[2].item())
    assert torch.equal(xs.sample(x, temperature=torch.zeros(6)).tokens, out.tokens)
    ref = torch.log_softmax(x.double(), -1).gather(-1, out.tokens[:, None]).squeeze(-1)
    bound = tolerances.log_softmax_absolute_error(3001, x.float().abs().max().item(), ref.abs().max().item())
    assert (out.logprobs.double() - ref).abs().max().item() <= bound
