"""Where a beam step's device time goes: each kernel's mean device time (torch profiler, 20 steps,
the L2 flushed before each; fills left out) beside the step's median from CUDA events, fp32, 4
beams, for the gate's and the bench's shapes. A fresh state is made (outside the timed steps) every 200 steps.
Run on the device from the repository root (PYTHONPATH=.)."""
import torch

import kernel_split
import xllm_sampling as xs
from xllm_sampling import flags

print("#", torch.cuda.get_device_name(), "torch", torch.__version__, "fp32, 4 beams; us")
for requests, vocab in ((4, 32000), (4, 151936), (1, 151936), (64, 32000), (64, 151936)):
    logits = torch.randn(requests * 4, vocab, device="cuda", generator=torch.Generator("cuda").manual_seed(vocab)) * 3
    state = {"s": None, "n": 0}

    def step():
        if state["s"] is None or state["n"] == 200:
            state["s"] = xs.BeamSearchState.start(requests, 4, 1, 201, (2,), 1.0, False, "cuda")
            state["n"] = 0
        state["n"] += 1
        xs.beam_search_step(logits, state["s"])

    for on in (True, False):
        with flags.override(beam_search=on):
            median, kernels = kernel_split.split(step)
        print(f"{requests:3d} x 4 V={vocab:6d} flag {'on ' if on else 'off'} step {median:7.1f} | "
              f"{len(kernels)} kernels: {kernel_split.text(kernels)}", flush=True)
