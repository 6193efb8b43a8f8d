"""Parity of step cuda_graph: the engine's graph-replayed sampling and decode steps against eager, bit for bit."""
import pytest
import torch

from engine.decode import Engine
from engine.sampling import SamplingParams
from xllm_sampling import flags


def generate(engine, batch, temperature, flag):
    prompts = torch.randint(1, engine.cfg.vocab, (batch, 6), generator=torch.Generator().manual_seed(11))
    params = SamplingParams(torch.full((batch,), temperature), 20, 0.9, 0.0, torch.arange(batch, dtype=torch.int64) + 1)
    with flags.override(cuda_graph=flag):
        return engine.generate(prompts, 10, params)


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_graph_equals_eager(device, batch, temperature):
    engine = Engine(device=device)
    graphed = generate(engine, batch, temperature, True)
    eager = generate(engine, batch, temperature, False)
    assert torch.equal(graphed["tokens"], eager["tokens"])
    assert torch.equal(graphed["logprobs"], eager["logprobs"])
    runners = list(engine._sample_graphs.values())
    assert runners, "Engine.sample_step does not go through xllm_sampling.GraphRunner"
    decode = engine._decode_steps[batch][3]  # the model's decode step (an xllm_sampling.StaticStep)
    if device == "cuda":
        assert sum(r.replays for r in runners) > 0 and sum(r.captures for r in runners) > 0
        assert decode.captures == 1 and decode.replays == 8  # 9 decode steps a generation: the first one eager
    else:
        assert sum(r.replays for r in runners) == 0 and sum(r.eager_calls for r in runners) > 0
        assert decode.replays == 0 and decode.eager_calls == 18  # both generations, eagerly


@pytest.mark.parametrize("graphs", [True, False])
def test_sampler_off_keeps_the_callers_generator(device, graphs):
    """With the sampler flag off the step draws from torch's generator, which each generate() call
    seeds afresh: the step must use that call's generator (so two calls agree), never a graph."""
    engine = Engine(device=device)
    with flags.override(sampler=False):
        first, second = generate(engine, 3, 0.8, graphs), generate(engine, 3, 0.8, graphs)
        reference = generate(Engine(device=device), 3, 0.8, False)
    assert torch.equal(first["tokens"], second["tokens"])
    assert torch.equal(first["tokens"], reference["tokens"])
    assert sum(r.replays for r in engine.__dict__.get("_sample_graphs", {}).values()) == 0


def test_generate_leaves_the_callers_params_as_they_were(device):
    """generate copies the fixed settings to the device once and sets each step's positions on
    its own copy of the params: the caller's object keeps its tensors (and no position), so a
    second call with it gives the same tokens."""
    engine = Engine(device=device)
    prompts = torch.randint(1, engine.cfg.vocab, (3, 6), generator=torch.Generator().manual_seed(5))
    temperature, seed = torch.full((3,), 0.8), torch.arange(3, dtype=torch.int64) + 1
    params = SamplingParams(temperature, 20, 0.9, 0.0, seed)
    first = engine.generate(prompts, 6, params)
    assert params.temperature is temperature and params.seed is seed and params.position is None
    assert temperature.device.type == "cpu" and torch.equal(temperature, torch.full((3,), 0.8))
    assert torch.equal(engine.generate(prompts, 6, params)["tokens"], first["tokens"])


def test_a_failed_decode_capture_falls_back_with_one_warning_and_no_lost_token(device):
    """The decode step made uncapturable (a host read of a GPU tensor; without a GPU the capture
    is tried and fails for want of one): one warning, every step run eagerly, the tokens of an
    eager generation."""
    import warnings

    engine = Engine(device=device)
    eager = generate(engine, 3, 0.8, False)
    step = engine._decode_steps[3][3]
    read = torch.zeros(1, device="cuda") if torch.cuda.is_available() else engine._decode_steps[3][2]
    capturable = step.fn
    step.fn, step.cuda = lambda: (float(read.sum()), capturable())[1], True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed = generate(engine, 3, 0.8, True)
        again = generate(engine, 3, 0.8, True)
    failures = [w for w in caught if issubclass(w.category, RuntimeWarning) and "capture of decode_step" in str(w.message)]
    assert len(failures) == 1
    assert torch.equal(graphed["tokens"], eager["tokens"]) and torch.equal(again["tokens"], eager["tokens"])
    assert step.captures == 0 and step.replays == 0


def beam(engine, graphs, beam_flag, num_beams, eos=(5, 9)):
    """A beam search of 3 requests, 12 new tokens, with the cuda_graph and beam_search flags given."""
    prompts = torch.randint(1, engine.cfg.vocab, (3, 6), generator=torch.Generator().manual_seed(13))
    with flags.override(cuda_graph=graphs, beam_search=beam_flag):
        return engine.beam(prompts, num_beams, 12, eos=list(eos), length_penalty=1.2, early_stopping=False)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_beam_graph_equals_eager_with_the_beam_flag_toggled_between_searches(device, num_beams):
    """Each beam step after the first replays one graph (cache reorder, decode, beam step) per
    flags state: searches graphed with the beam_search flag on, off, then on again (the first
    graph replayed) equal eager searches of a fresh engine bit for bit, sequences and scores."""
    eager = {on: beam(Engine(device=device), False, on, num_beams) for on in (True, False)}
    engine = Engine(device=device)
    for on in (True, False, True):
        sequences, scores = beam(engine, True, on, num_beams)
        assert torch.equal(sequences, eager[on][0]) and torch.equal(scores, eager[on][1])
    (_, _, step), = engine._beam_searches.values()  # one search shape: one StaticStep
    if device == "cuda":
        assert step.captures == 2 and step.replays >= 3 * (sequences.shape[-1] - 6) - 8
    else:
        assert step.captures == 0 and step.replays == 0 and step.eager_calls > 0


def test_beam_searches_of_other_shapes_keep_their_own_state(device):
    """A search of another width between two of one shape leaves the first shape's restarted state
    and graph as they were: the third search equals the first."""
    engine = Engine(device=device)
    first = beam(engine, True, True, 4)
    beam(engine, True, True, 2, eos=(7,))
    third = beam(engine, True, True, 4)
    assert torch.equal(first[0], third[0]) and torch.equal(first[1], third[1])
    assert len(engine._beam_searches) == 2
