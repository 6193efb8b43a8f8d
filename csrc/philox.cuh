// The counter-based generator of xllm_sampling/rng.py (Philox-4x32-10), for device code.
// Keyed by a request's seed, counter (position, stream): the same 53-bit uniform in [0, 1) that
// rng.uniform_torch computes (27 bits of word 0, 26 of word 1). Shared by the steps' kernels.
#pragma once

#include <cstdint>

namespace xllm {

__host__ __device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// One float64 uniform in [0, 1) for (seed, position, stream).
__host__ __device__ __forceinline__ double philox_uniform(uint64_t seed, uint64_t position, uint32_t stream) {
  uint32_t c0 = static_cast<uint32_t>(position), c1 = static_cast<uint32_t>(position >> 32), c2 = stream, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint32_t hi0 = mulhi32(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = mulhi32(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  const uint64_t bits = (static_cast<uint64_t>(c0 >> 5) << 26) | (c1 >> 6);
  return static_cast<double>(bits) * (1.0 / 9007199254740992.0);  // 2^53
}

}  // namespace xllm
