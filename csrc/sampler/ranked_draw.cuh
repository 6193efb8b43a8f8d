// The sampler's draw over a row's top k held as a short ranked list (torch-free): what
// top_k_draw_kernel does after merging the slices' keys, and what sample_kernel does for a top-k
// row whose candidates fit one block's list. Same weights, uniforms and tests as sample_kernel's
// passes over the whole row (sampling.cuh), so a request draws the same token either way, up to
// the order of float64 sums.
#pragma once

#include <cstdint>

#include "philox.cuh"
#include "rank_key.cuh"
#include "sampler/warp_walk.cuh"
#include "slice_top_keys.cuh"
#include "warp_reduce.cuh"

namespace xllm::sampler {

constexpr int kMaxRounds = 32;  // top-p rejection rounds at most

// The row's top k, in rank order (ranked: keys descending) and in vocabulary order, with what
// the draw reads: weight[r] = 2^((x - max) c) of rank r, above[r] = the eligible (min-p) mass
// of ranks below r, at[j] = the rank of the j-th in vocabulary order.
struct TopK {
  uint64_t ranked[slice::kMaxKeys];
  double weight[slice::kMaxKeys], above[slice::kMaxKeys + 1];
  int at[slice::kMaxKeys];
};

// Warp: the drawn token's rank (0 when every round was rejected: the argmax, as sampling.cuh
// does). Each round draws from the eligible tokens ranked above the last rejected one (at first,
// all): a Philox uniform times their mass, walked in vocabulary order; top-p keeps the token
// when the eligible mass ranked above it is under top_p times the top-k mass.
__device__ inline int draw_top_k(const TopK& list, int k, double top_k_mass, float min_p, float top_p, uint64_t seed,
                                 uint64_t position) {
  const double top_p_mass = static_cast<double>(top_p) * top_k_mass;
  int pivot = k;  // the rank of the last rejected token (k: none)
#pragma unroll 1
  for (int round = 0; round < kMaxRounds; ++round) {
    const double target = philox_uniform(seed, position, static_cast<uint32_t>(round)) * list.above[pivot];
    double before;
    const int j = warp_walk(k, target, &before, [&](int i) {
      const int r = list.at[i];
      const double w = list.weight[r];
      return r < pivot && w >= min_p ? w : 0.0;
    });
    if (j < 0) break;
    const int rank = list.at[j];
    if (top_p >= 1.f || list.above[rank] < top_p_mass) return rank;
    pivot = rank;
  }
  return 0;
}

// The drawn rank of list.ranked[0, k) (the row's top k, descending; its first the row's max),
// for weight scale c (temperature not 0): every thread of the block calls it (one
// __syncthreads); warp 0 returns the rank, the other threads 0.
__device__ inline int draw_ranked(TopK& list, int k, float c, float min_p, float top_p, uint64_t seed,
                                  uint64_t position) {
  const float best = rank_value(list.ranked[0]);
  for (int r = threadIdx.x; r < k; r += blockDim.x) {
    const uint64_t own = list.ranked[r];
    int place = 0;  // its place in vocabulary order: the keys of lower index (larger ~index)
    for (int q = 0; q < k; ++q) place += static_cast<uint32_t>(list.ranked[q]) > static_cast<uint32_t>(own);
    list.at[place] = r;
    list.weight[r] = static_cast<double>(exp2f((rank_value(own) - best) * c));
  }
  __syncthreads();
  if (threadIdx.x >= 32) return 0;
  const int lane = threadIdx.x;
  // above[r] by a warp scan: lane l sums the ranks [l * per, (l + 1) * per)
  const int per = (k + 31) / 32, begin = min(k, lane * per), end = min(k, begin + per);
  double own = 0.0, all = 0.0;
  for (int r = begin; r < end; ++r) {
    own += list.weight[r] >= min_p ? list.weight[r] : 0.0;
    all += list.weight[r];
  }
  double run = warp_inclusive_scan(own, lane) - own;
  for (int r = begin; r < end; ++r) {
    list.above[r] = run;
    run += list.weight[r] >= min_p ? list.weight[r] : 0.0;
  }
  if (lane == 31) list.above[k] = run;
  const double top_k_mass = warp_sum(all);
  __syncwarp();
  return draw_top_k(list, k, top_k_mass, min_p, top_p, seed, position);
}

}  // namespace xllm::sampler
