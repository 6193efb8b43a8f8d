"""Host cost of one kernel launch by kind (plain, cooperative, cluster), and of the bindings' output
allocations: microseconds to enqueue one call, timed while the GPU sleeps (nothing waits for
the device). Run on the device from the repository root: python3 docs/dev/probes/launch_cost.py"""
import time

import torch
from torch.utils.cpp_extension import load_inline

SRC = r"""
#include <torch/extension.h>
#include "launch_helpers.cuh"
__global__ void noop(int) {}
void plain(int64_t blocks) { noop<<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(0); }
void coop(int64_t blocks) { xllm::launch_with(xllm::cooperative(), noop, dim3(blocks), dim3(256), 0, 0); }
void cluster(int64_t blocks, int64_t cs) { xllm::launch_with(xllm::cluster_of(cs), noop, dim3(blocks), dim3(256), 0, 0); }
void programmatic(int64_t blocks) { xllm::launch_with(xllm::programmatic(), noop, dim3(blocks), dim3(256), 0, 0); }
torch::Tensor alloc2(torch::Tensor x) { auto a = torch::empty({1, 50}, x.options()); auto b = torch::empty({1, 50}, x.options().dtype(torch::kInt64)); return a; }
void args(torch::Tensor x, c10::optional<torch::Tensor> a, c10::optional<torch::Tensor> b, double s, bool l) {}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("plain", &plain); m.def("coop", &coop); m.def("cluster", &cluster); m.def("programmatic", &programmatic);
  m.def("alloc2", &alloc2); m.def("args", &args);
}
"""
ext = load_inline("launch_cost", cpp_sources="", cuda_sources=SRC, extra_include_paths=["csrc"],
                  extra_cuda_cflags=["-O3", "-std=c++20"], with_cuda=True)


def enqueue_us(f, n=400, rounds=7):
    best = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # ~25 ms: every launch below only queues
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best.append((time.perf_counter() - t0) / n * 1e6)
    torch.cuda.synchronize()
    best.sort()
    return best[0], best[len(best) // 2]


x = torch.zeros(1, 8, device="cuda")
sms = torch.cuda.get_device_properties(0).multi_processor_count
rows = [("python loop (nothing)", lambda: None), ("binding, no work", lambda: ext.args(x, None, None, 1.0, False)),
        ("binding, 2 outputs allocated", lambda: ext.alloc2(x))]
for blocks in (16, 2 * sms):
    rows += [(f"plain launch {blocks} blocks", lambda b=blocks: ext.plain(b)),
             (f"cooperative launch {blocks} blocks", lambda b=blocks: ext.coop(b)),
             (f"programmatic launch {blocks} blocks", lambda b=blocks: ext.programmatic(b))]
rows += [("cluster of 8, 16 blocks", lambda: ext.cluster(16, 8)), ("cluster of 4, 16 blocks", lambda: ext.cluster(16, 4)),
         ("torch zero_ (1 element)", lambda: x[0, :1].zero_())]
print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; host us per call (min, median of 7 rounds of 400)")
for name, f in rows:
    lo, med = enqueue_us(f)
    print(f"{name:36s} {lo:6.2f} {med:6.2f}", flush=True)
