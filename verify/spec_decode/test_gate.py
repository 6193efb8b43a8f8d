"""Gate of step spec_decode: the rejection sampler as the engine's speculative mode calls it (K = 4
drafts with their distributions, temperature 1), flag on against off, for 1 and 16 requests at two
vocab sizes; the worst of the four ratios must pass."""
import torch

from xllm_sampling import flags, rejection_sample

K = 4


def sampler(batch, vocab, device):
    g = torch.Generator(device).manual_seed(batch + vocab)
    logits = torch.randn(batch, K + 1, vocab, device=device, generator=g) * 3
    probs = torch.softmax(torch.randn(batch, K, vocab, device=device, generator=g) * 3, -1)
    drafts = torch.multinomial(probs.flatten(0, 1), 1, generator=g).view(batch, K)
    seed = torch.arange(batch, device=device)

    def run(on):
        with flags.override(spec_decode=on):
            rejection_sample(logits, drafts, draft_probs=probs, temperature=1.0, seed=seed, position=7)

    return run


def test_gate(check_gate, gate_device):
    vocabs = (32000, 151936) if gate_device == "cuda" else (1000, 32000)
    check_gate({f"B={b} V={v}": sampler(b, v, gate_device) for b in (1, 16) for v in vocabs})
