// Helpers shared by the steps' CUDA sources (host and device).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

namespace xllm {

__host__ __device__ constexpr int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Raise `kernel`'s dynamic shared-memory limit to `bytes` (and allow clusters of more than 8
// blocks when asked), once per device: function attributes are host work best kept off the
// launch path.
template <auto kernel>
void configure_once(int device, int bytes, bool nonportable_clusters = false) {
  static std::once_flag once[64];
  std::call_once(once[device], [=] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    if (nonportable_clusters) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  });
}

}  // namespace xllm
