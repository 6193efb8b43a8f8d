"""Parity of step beam_search: the engine's beam_step against a float64 reference step."""
import pytest
import torch

import xllm_sampling
from engine import beam
from engine.decode import Engine
from xllm_sampling import flags, tolerances


def reference_step(logits, beam_scores, num_beams):
    rows, vocab = logits.shape
    scores = torch.log_softmax(logits.double(), -1) + beam_scores.reshape(-1, 1).double()
    top, flat = torch.topk(scores.view(rows // num_beams, -1), 2 * num_beams, dim=-1)
    return top, flat % vocab, flat // vocab


def test_call_site_uses_the_op(spy):
    calls = spy(xllm_sampling, "beam_search_step")
    beam.beam_step(torch.randn(4, 10), torch.zeros(4), 2)
    assert len(calls) == 1


@pytest.mark.parametrize("batch,num_beams,vocab", [(1, 1, 2), (2, 4, 1000), (3, 2, 32001), (64, 4, 4096), (1, 8, 151936)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_matches_reference(device, batch, num_beams, vocab, dtype):
    logits = (torch.randn(batch * num_beams, vocab, device=device) * 3).to(dtype)
    scores = -torch.rand(batch * num_beams, device=device) * 10
    top, tokens, parents = beam.beam_step(logits, scores, num_beams)
    ref_top, ref_tokens, ref_parents = reference_step(logits.float(), scores, num_beams)
    # float32 log-softmax (its normaliser a sum of vocab terms) plus a float32 score: each addition
    # rounds at the magnitude of the result (tolerances.log_softmax_absolute_error).
    bound = tolerances.log_softmax_absolute_error(vocab, logits.float().abs().max().item(), ref_top.abs().max().item())
    bound += 2 * tolerances.U * scores.abs().max().item()
    assert (top.double() - ref_top).abs().max().item() <= bound
    if dtype == torch.float32:  # distinct scores: the choice and order are fully determined
        assert torch.equal(tokens, ref_tokens) and torch.equal(parents, ref_parents)
    else:  # bf16 rows have ties: check each reported (beam, token) pair carries its own score
        rows = torch.arange(batch, device=device)[:, None] * num_beams + parents
        own = torch.log_softmax(logits.double(), -1)[rows, tokens] + scores.double()[rows]
        assert (own - top.double()).abs().max().item() <= bound
        pairs = (parents * vocab + tokens).tolist()
        assert all(len(set(row)) == len(row) for row in pairs)


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping", [(2, 1.0, False), (4, 0.6, True), (3, 2.0, False)])
def test_full_search_equals_original(device, num_beams, length_penalty, early_stopping):
    engine = Engine(device=device)
    prompts = torch.randint(1, engine.cfg.vocab, (2, 5), generator=torch.Generator().manual_seed(5))
    runs = []
    for flag in (True, False):
        with flags.override(beam_search=flag):
            runs.append(engine.beam(prompts, num_beams, 12, eos=3, length_penalty=length_penalty, early_stopping=early_stopping))
    assert runs[0] == runs[1]
