// The sampler's walk by running mass over a short ordered list (torch-free): the tile among a
// block's tiles and the token within a re-read tile (stream_sampling.cuh), the token among a
// row's top k (top_k_sampling.cuh).
#pragma once

#include "warp_reduce.cuh"

namespace xllm::sampler {

// Warp: the first of `count` items, in order, where the running sum of mass(i) first exceeds
// `target` (the last of positive mass when rounding leaves the sum short; -1 when none has
// any), and in *before the mass ahead of it. Lane l sums the run [l * per, (l + 1) * per) (its
// loads all in flight), a scan of the runs picks the lane, and that lane walks its run.
template <typename F>
__device__ int warp_walk(int count, double target, double* before, F mass) {
  const int lane = threadIdx.x % 32, per = (count + 31) / 32, begin = lane * per, end = min(count, begin + per);
  double own = 0.0;
  for (int i = begin; i < end; ++i) own += mass(i);
  const double inclusive = warp_inclusive_scan(own, lane);
  const unsigned cross = __ballot_sync(0xffffffffu, own > 0.0 && inclusive > target);
  const unsigned positive = __ballot_sync(0xffffffffu, own > 0.0);
  if (!positive) return -1;
  const int chosen = cross ? __ffs(cross) - 1 : 31 - __clz(positive);
  int found = -1;
  double ahead = 0.0;
  if (lane == chosen) {
    double run = inclusive - own, last_ahead = 0.0;
    int last = -1;
    for (int i = begin; i < end; ++i) {
      const double m = mass(i);
      if (m > 0.0) {
        if (run + m > target) {
          found = i;
          ahead = run;
          break;
        }
        last = i;
        last_ahead = run;
      }
      run += m;
    }
    if (found < 0) {
      found = last;
      ahead = last_ahead;
    }
  }
  *before = __shfl_sync(0xffffffffu, ahead, chosen);
  return __shfl_sync(0xffffffffu, found, chosen);
}

}  // namespace xllm::sampler
