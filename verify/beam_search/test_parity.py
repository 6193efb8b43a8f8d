"""Parity of step beam_search: the engine's step against the op, and whole searches against transformers."""
import dataclasses

import pytest
import torch

import xllm_sampling
from engine import beam
from xllm_sampling import flags

EOS, PAD = 7, 5  # the stub's EOS id (transformers_stub.EOS) and a padding id


def start(batch, num_beams, vocab, device, eos=(3,), max_new=6):
    return beam.BeamState.start(batch, num_beams, 5, 5 + max_new, eos, 1.0, False, device)


def test_call_site_uses_the_op(spy):
    calls = spy(xllm_sampling, "beam_search_step")
    beam.beam_step(torch.randn(4, 10), start(2, 2, 10, "cpu"))
    assert len(calls) == 1


def states_equal(a, b, step, score_bound, ties):
    """The step's choices and the finished pool. Continuations that hit score 1e9 lower, where
    float32 rounds to multiples of 64, rank in an order torch.topk leaves unspecified: only their
    scores are compared; bf16 logits tie often, so there only the running scores are compared slot
    by slot (equal continuations may be chosen differently, and with them the ones that end)."""
    live = b.running_scores > -5e8
    assert torch.equal(a.running_scores > -5e8, live)
    assert ((a.running_scores - b.running_scores)[live].abs() <= score_bound).all()
    assert torch.equal(a.steps, b.steps)
    if ties:  # which of several equal continuations ends a hypothesis is the tie order's choice
        return
    assert torch.equal(a.pool_finished, b.pool_finished)
    assert ((a.pool_scores - b.pool_scores)[b.pool_finished].abs() <= score_bound).all()
    for name in ("improvable", "all_hit", "steps"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("history_tokens", "history_parents"):
        assert torch.equal(getattr(a, name)[:, :, step][live], getattr(b, name)[:, :, step][live]), name
    for name in ("pool_step", "pool_parent", "pool_token"):
        assert torch.equal(getattr(a, name)[b.pool_finished], getattr(b, name)[b.pool_finished]), name


@pytest.mark.parametrize("batch,num_beams,vocab", [(1, 1, 2), (2, 4, 1000), (3, 2, 32001), (16, 4, 4096), (1, 8, 151936)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_match_the_original(device, batch, num_beams, vocab, dtype):
    """Six steps of random logits (EOS favoured in some rows, -inf in others) through the patched
    step (flag on) and the original (flag off): the same choices, scores within 1e-5."""
    eos = min(3, vocab - 1)
    reference = start(batch, num_beams, vocab, device, eos=(eos,))
    for step in range(6):
        logits = torch.randn(batch * num_beams, vocab, device=device) * 3
        logits[::3, eos] += 8  # the EOS among the best of every third row
        logits[1::4, vocab // 2:] = float("-inf")
        logits = logits.to(dtype)
        patched = dataclasses.replace(reference, **{f.name: getattr(reference, f.name).clone()
                                                   for f in dataclasses.fields(reference) if isinstance(getattr(reference, f.name), torch.Tensor)})
        with flags.override(beam_search=True):
            beam.beam_step(logits, patched)
        with flags.override(beam_search=False):
            beam.beam_step(logits, reference)
        # float32 log-softmax of |x| <= ~20 plus a score of a few units: both paths round at ~1e-6
        states_equal(patched, reference, step, 1e-5, ties=dtype != torch.float32)


CASES = [(eos, bias, length_penalty) for eos, bias in ((None, 0.0), (EOS, 3.0), ([EOS, 9], 2.0))
         for length_penalty in (1.0, 0.6, -0.5)]


@pytest.mark.parametrize("num_beams", [1, 2, 4, 8])
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("on", [True, False], ids=["flag-on", "flag-off"])
def test_search_equals_transformers(device, monkeypatch, num_beams, early_stopping, on):
    """Final sequences and scores of transformers' generate(num_beams=...) equal the engine's, with
    and without EOS ids (EOS raised so that hypotheses end early) and three length penalties."""
    stub = pytest.importorskip("transformers_stub", exc_type=ImportError)  # transformers is a test-only dependency
    stub.beam_search_with_one_beam(monkeypatch)
    prompts = torch.randint(0, stub.VOCAB, (3, 4))
    last, before = stub.tables()
    ended_early = 0
    for eos, bias, length_penalty in CASES:
        model = stub.StubLM(bias).eval()
        out = model.generate(prompts, num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=8,
                             eos_token_id=eos, pad_token_id=PAD, length_penalty=length_penalty,
                             early_stopping=early_stopping, do_sample=False, use_cache=False,
                             return_dict_in_generate=True, output_scores=True)
        rows = {}

        def step_logits(tokens, parents):
            rows["ids"] = tokens if parents is None else torch.cat((rows["ids"][parents], tokens), 1)
            return stub.logits_of(rows["ids"], bias, last.to(device), before.to(device))

        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
        with flags.override(beam_search=on):
            sequences, scores = beam.beam_search(step_logits, prompts.to(device), num_beams, 8, eos_ids,
                                                 length_penalty, early_stopping, pad=PAD if eos_ids else -1)
        expected = out.sequences.view(3, num_beams, -1)
        assert torch.equal(sequences.cpu(), expected), (eos, length_penalty)
        # transformers' float32 arithmetic on the CPU; the engine's on `device` (log-softmax of 40 logits,
        # a sum of up to 8 of them, one division): within a few float32 ulps of scores of magnitude < 100
        assert (scores.cpu() - out.sequences_scores.view(3, num_beams)).abs().max().item() <= 1e-5
        ended_early += int((expected[..., -1] == PAD).sum()) if eos_ids else 0
    if num_beams > 1:
        assert ended_early > 0  # some hypotheses ended on an EOS before max_length

