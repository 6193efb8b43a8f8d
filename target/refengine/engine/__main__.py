"""Generate tokens from random prompts and print tokens/s: ``python -m engine --help``."""
import argparse
import time

import torch

from .decode import Engine
from .model import Config


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--num-beams", type=int, default=0, help="> 0: beam search instead of sampling")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from .sampling import SamplingParams

    engine = Engine(Config(), args.device)
    prompts = torch.randint(1, engine.cfg.vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    if args.num_beams:
        sequences, _ = engine.beam(prompts, args.num_beams, args.new_tokens)
        best = sequences[:, 0, args.prompt_len:].tolist()
        generated = sum(len(s) for s in best)
        print("\n".join(" ".join(map(str, s)) for s in best))
    else:
        params = SamplingParams(torch.full((args.batch,), args.temperature), args.top_k, args.top_p,
                                seed=torch.arange(args.batch, dtype=torch.int64))
        out = engine.generate(prompts, args.new_tokens, params)
        generated = out["tokens"].numel()
        print("\n".join(" ".join(map(str, row)) for row in out["tokens"].tolist()))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(f"{generated} tokens in {elapsed:.3f} s: {generated / elapsed:.1f} tokens/s")


if __name__ == "__main__":
    main()
