"""Is the decode table's "all on" slower than "+ nvtx" at B=1 because of its flag, or because its
decode graph is the process's second capture? TPOT of the 0.5b preset at B=1 for the two
configurations in both orders, in one process. Run on the device from the repository root
(PYTHONPATH=.): `python docs/dev/probes/decode_order.py`."""
import time

import torch

from xllm_sampling import flags
from xllm_sampling.bench_decode import _engine_with_series, _engine, configurations, LONG
def timed(f):
    torch.cuda.synchronize(); t = time.perf_counter(); f(); torch.cuda.synchronize(); return (time.perf_counter() - t) * 1e3
with _engine_with_series() as (step_flags, (decode, model, sampling)):
    cfg = dict(configurations(step_flags))
    for order in (("+ nvtx", "all on", "+ nvtx"), ("all on", "+ nvtx", "all on")):
        engine = _engine(decode, model, "0.5b", None, LONG + 16, "cuda")
        prompts = torch.randint(1, engine.cfg.vocab, (1, 8), generator=torch.Generator().manual_seed(0))
        params = sampling.SamplingParams(torch.full((1,), 0.8, device="cuda"), 50, 0.9, seed=torch.arange(1, device="cuda"))
        for name in order:
            with flags.override(**cfg[name]):
                engine.generate(prompts, LONG, params)
                runs = [(timed(lambda: engine.generate(prompts, LONG, params)) - timed(lambda: engine.generate(prompts, 1, params))) / (LONG - 1) for _ in range(3)]
            print(order, name, "TPOT ms", [round(r, 3) for r in runs], flush=True)
