// Step sampler: the counter-based generator of xllm_sampling/rng.py in one launch, one float64
// uniform per row, bit-identical to the torch implementation.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "philox.cuh"

namespace {

__global__ void philox_uniform(const int64_t* __restrict__ seed, const int64_t* __restrict__ position,
                               uint32_t stream, double* __restrict__ out, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = xllm::philox_uniform(static_cast<uint64_t>(seed[i]), static_cast<uint64_t>(position[i]), stream);
}

}  // namespace

torch::Tensor uniform(torch::Tensor seed, torch::Tensor position, int64_t stream) {
  TORCH_CHECK(seed.is_cuda() && seed.scalar_type() == torch::kInt64 && seed.is_contiguous(), "seed: contiguous int64 CUDA tensor");
  TORCH_CHECK(position.is_cuda() && position.scalar_type() == torch::kInt64 && position.is_contiguous() &&
                  position.numel() == seed.numel(),
              "position: contiguous int64 CUDA tensor shaped like seed");
  const c10::cuda::CUDAGuard guard(seed.device());
  auto out = torch::empty(seed.sizes(), seed.options().dtype(torch::kFloat64));
  const int64_t n = seed.numel();
  if (n == 0) return out;
  constexpr int kThreads = 128;
  philox_uniform<<<(n + kThreads - 1) / kThreads, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      seed.data_ptr<int64_t>(), position.data_ptr<int64_t>(), static_cast<uint32_t>(stream), out.data_ptr<double>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
