"""Which kernels a sampling call's device time goes to: each kernel's mean device time (torch
profiler, 20 calls, the L2 flushed before each) beside the call's median from CUDA events, fp32,
temperature 0.8, V = 151936 unless PROBE_VOCAB says, B in 1, 16, 64, 256 unless PROBE_BATCHES says. Run on the device from the repository root
(PYTHONPATH=.)."""
import os
import torch
import xllm_sampling as xs

import kernel_split

V = int(os.environ.get("PROBE_VOCAB", 151936))
configs = {"greedy": dict(temperature=0.0), "plain": dict(), "top-k 1": dict(top_k=1), "top-k 50": dict(top_k=50),
           "top-k 50 + top-p 0.9": dict(top_k=50, top_p=0.9), "top-p 0.9": dict(top_p=0.9)}
print("#", torch.cuda.get_device_name(), "torch", torch.__version__, f"V={V} fp32; us")
for B in map(int, os.environ.get("PROBE_BATCHES", "1,16,64,256").split(",")):
    x = torch.randn(B, V, device="cuda", generator=torch.Generator("cuda").manual_seed(B)) * 3
    pos = torch.arange(B, device="cuda")
    for name, kw in configs.items():
        kw = {"temperature": 0.8, **kw}
        call = lambda: xs.sample(x, position=pos, **kw)  # noqa: E731
        median, kernels = kernel_split.split(call)
        print(f"B={B:4d} {name:22s} call {median:7.1f} | {kernel_split.text(kernels)}", flush=True)
