// Warp-wide sum, max and inclusive prefix sum, shared by the steps' kernels (torch-free). Every lane
// of the warp must call them (full-mask shuffles).
#pragma once

namespace xllm {

// The sum of v over the warp's 32 lanes, in every lane (butterfly order: the same in all lanes).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The largest v over the warp's lanes, in every lane (fmaxf: a NaN lane is passed over).
__device__ __forceinline__ float warp_fmax(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// The sum of v over lanes 0..lane (Hillis-Steele; lane is the caller's lane index).
template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T v, int lane) {
  for (int off = 1; off < 32; off <<= 1) {
    const T o = __shfl_up_sync(0xffffffffu, v, off);
    if (lane >= off) v += o;
  }
  return v;
}

}  // namespace xllm
