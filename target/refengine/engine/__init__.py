"""refengine: a compact Llama-style decode engine with its original torch sampler and beam search."""
