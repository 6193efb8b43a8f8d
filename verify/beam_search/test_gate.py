"""Gate of step beam_search: one step of 4 beams, flag on against off, for 16 and 256 beam rows at
two vocab sizes; the worst of the four ratios must pass."""
import torch

from engine import beam
from xllm_sampling import flags

STEPS = 256  # steps a timed state holds; it is rewound (outside the timed kernels) when full


def stepper(rows, vocab, device):
    logits = torch.randn(rows, vocab, device=device) * 3
    states = {}  # flag value: [state, steps taken] (counted here: reading the state would synchronise)

    def run(on):
        if on not in states or states[on][1] == STEPS:
            state = beam.BeamState.start(rows // 4, 4, 1, 1 + STEPS, (2,), 1.0, False, device)
            state.running_scores.copy_(-torch.rand(rows // 4, 4, device=device) * 10)
            states[on] = [state, 0]
        states[on][1] += 1
        with flags.override(beam_search=on):
            beam.beam_step(logits, states[on][0])

    return run


def test_gate(check_gate, gate_device):
    vocabs = (32000, 151936) if gate_device == "cuda" else (1000, 32000)
    rows = (16, 256) if gate_device == "cuda" else (16, 64)
    check_gate({f"rows={r} V={v}": stepper(r, v, gate_device) for r in rows for v in vocabs})
