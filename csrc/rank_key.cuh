// Rank keys shared by the steps' CUDA sources (torch-free): a float's order-preserving bits, and
// a 64-bit key (value bits, then ~index) whose unsigned order ranks larger values first and equal
// values by lower index.
#pragma once

#include <cstdint>

namespace xllm {

// Order-preserving unsigned image of a float that is not NaN (+0 and -0 are made equal first).
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t u = __float_as_uint(x);
  return u ^ ((u >> 31) ? 0xFFFFFFFFu : 0x80000000u);
}

// The float whose order_key is `k`.
__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float(k ^ ((k >> 31) ? 0x80000000u : 0xFFFFFFFFu));
}

// A token's 64-bit rank key: its value's order-preserving bits, then ~index. The top k of a set
// are its k largest keys; equal values rank the lower index first.
__device__ __forceinline__ uint64_t rank_key(float v, int64_t index) {
  return static_cast<uint64_t>(order_key(v)) << 32 | static_cast<uint32_t>(~static_cast<uint32_t>(index));
}

__device__ __forceinline__ float rank_value(uint64_t key) { return key_value(static_cast<uint32_t>(key >> 32)); }
__device__ __forceinline__ int64_t rank_index(uint64_t key) { return static_cast<uint32_t>(~static_cast<uint32_t>(key)); }

}  // namespace xllm
