// Helpers shared by the steps' CUDA sources (host and device).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <utility>

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

// Launch `kernel` on the current stream with one launch attribute (see `cooperative` and
// `cluster_of`), which the triple-chevron syntax cannot pass.
template <typename... Params, typename... Args>
void launch_with(cudaLaunchAttribute attribute, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                 Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = c10::cuda::getCurrentCUDAStream();
  config.attrs = &attribute;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// Every block resident at once (the launch fails otherwise): what a barrier between blocks needs.
inline cudaLaunchAttribute cooperative() {
  cudaLaunchAttribute a = {};
  a.id = cudaLaunchAttributeCooperative;
  a.val.cooperative = 1;
  return a;
}

// Programmatic dependent launch: the kernel may start before the one ahead of it on the stream
// has finished, and waits for it where it calls xllm::wait_for_prerequisite() (dependent_launch.cuh).
inline cudaLaunchAttribute programmatic() {
  cudaLaunchAttribute a = {};
  a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  a.val.programmaticStreamSerializationAllowed = 1;
  return a;
}

// Thread-block clusters of `blocks` blocks along x.
inline cudaLaunchAttribute cluster_of(unsigned blocks) {
  cudaLaunchAttribute a = {};
  a.id = cudaLaunchAttributeClusterDimension;
  a.val.clusterDim.x = blocks;
  a.val.clusterDim.y = 1;
  a.val.clusterDim.z = 1;
  return a;
}

}  // namespace xllm
