// Step sampler: the counter-based generator of xllm_sampling/rng.py in one launch.
// Philox-4x32-10 keyed by (seed), counter (position, stream): one float64 uniform in [0, 1)
// per row, bit-identical to the torch implementation (53 bits: 27 of word 0, 26 of word 1).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

namespace {

__global__ void philox_uniform(const int64_t* __restrict__ seed, const int64_t* __restrict__ position,
                               uint32_t stream, double* __restrict__ out, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const uint64_t s = static_cast<uint64_t>(seed[i]), p = static_cast<uint64_t>(position[i]);
  uint32_t c0 = static_cast<uint32_t>(p), c1 = static_cast<uint32_t>(p >> 32), c2 = stream, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  const uint64_t bits = (static_cast<uint64_t>(c0 >> 5) << 26) | (c1 >> 6);
  out[i] = static_cast<double>(bits) * (1.0 / 9007199254740992.0);  // 2^53
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("uniform", &uniform, "Philox-4x32-10 uniforms keyed by (seed, position, stream)");
}
