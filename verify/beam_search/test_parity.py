"""Parity of step beam_search: the engine's step against the op, and whole searches against transformers."""
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


def states_equal(a, b, score_bound):
    for name in ("history_tokens", "history_parents", "pool_finished", "pool_step", "pool_parent", "pool_token",
                 "improvable", "all_hit", "steps"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("running_scores", "pool_scores"):
        assert (getattr(a, name) - getattr(b, name)).abs().max().item() <= score_bound, name


@pytest.mark.parametrize("batch,num_beams,vocab", [(1, 1, 2), (2, 4, 1000), (3, 2, 32001), (16, 4, 4096), (1, 8, 151936)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_match_the_original(device, batch, num_beams, vocab, dtype):
    """Six steps of random logits (EOS favoured in some rows, -inf in others) through the patched
    step (flag on) and the original (flag off): the same choices, scores within 1e-5."""
    eos = min(3, vocab - 1)
    states = [start(batch, num_beams, vocab, device, eos=(eos,)) for _ in range(2)]
    for _ in range(6):
        logits = torch.randn(batch * num_beams, vocab, device=device) * 3
        logits[::3, eos] += 8  # the EOS among the best of every third row
        logits[1::4, vocab // 2:] = float("-inf")
        logits = logits.to(dtype)
        for state, on in zip(states, (True, False)):
            with flags.override(beam_search=on):
                beam.beam_step(logits, state)
        # float32 log-softmax of |x| <= ~20 plus a score of a few units: both paths round at ~1e-6
        states_equal(states[0], states[1], 1e-5)


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

