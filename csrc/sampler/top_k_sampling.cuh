// Step sampler, top-k rows: batches whose top_k is one number from 1 to slice::kMaxKeys (below
// the vocab) and without penalties, in two launches that read the logits once (torch-free
// kernels; the binding is sampler.cu). sampling.cuh caches a row's chunks in shared memory for
// its radix passes, which at large batch leaves few loads in flight and reads the cache many
// times; with the top k known to be a short list, one streaming pass finds it.
//
//   top_k_candidates_kernel  grid (slices, rows): each block the k best rank keys of its slice of
//                            a row and the slice's max and float64 sum of 2^((x - max) c), c =
//                            log2(e) / temperature (slice_top_keys.cuh);
//   top_k_draw_kernel        grid (rows), launched as a programmatic dependent: merges the
//                            slices' sorted keys into the row's top k (ties: lower index first;
//                            each key ranked by binary searches in the other slices' lists) and
//                            its sum, then draws as sampling.cuh does on the same candidates: weights
//                            2^((x - max) c) in float32, min-p on them, a float64 Philox uniform
//                            keyed by (seed, position, round) times the eligible mass walked in
//                            vocabulary order, top-p by rejection over pivots. Same weights,
//                            uniforms and tests: the same tokens, up to the order of float64 sums.
// The logprob's row sum comes from the streaming pass (ex2.approx terms summed per group in float32,
// then in float64): within 2e-6 of sampling.cuh's, relatively (tests/test_sampler_kernel.py).
#pragma once

#include <cstdint>

#include "dependent_launch.cuh"
#include "rank_key.cuh"
#include "sampler/ranked_draw.cuh"
#include "sampler/sampling.cuh"
#include "slice_top_keys.cuh"
#include "warp_reduce.cuh"

namespace xllm::sampler {

struct TopKWork {
  uint64_t* keys;                  // (rows, slices, k) each slice's k best keys; 0 pads
  slice::Partial<double>* partial;  // (rows, slices) each slice's max and sum of 2^((x - max) c)
};

// Grid (slices, rows), slice::kThreads threads, slice::kStreamBytes of dynamic shared memory.
template <typename T, bool BULK>
__global__ void __launch_bounds__(slice::kThreads, 2) top_k_candidates_kernel(const T* __restrict__ logits, int64_t chunk,
                                                                               int k, TopKWork w, Args a) {
  const int64_t row = blockIdx.y, split = blockIdx.x, slices = gridDim.x;
  const int64_t begin = split * chunk, end = min(begin + chunk, a.vocab);
  xllm::launch_dependents();  // top_k_draw_kernel's blocks may take free room now; they wait for this grid
  const slice::Partial<double> p = slice::slice_top_keys<T, BULK, double, false>(
      logits + row * a.vocab, begin, end, k, weight_scale(a.temperature[row]), w.keys + (row * slices + split) * k);
  if (threadIdx.x == 0) w.partial[row * slices + split] = p;
}

// Grid (rows), slice::kThreads threads; launched as a programmatic dependent of
// top_k_candidates_kernel (slices * k <= slice::kCapacity). Static: each translation unit that
// launches it (dispatch_*.cu) has its own.
static __global__ void __launch_bounds__(slice::kThreads) top_k_draw_kernel(int slices, int k, TopKWork w, Args a) {
  __shared__ uint64_t keys[slice::kCapacity];
  __shared__ TopK list;
  __shared__ float row_max;
  __shared__ double row_sum;
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x % 32;
  const float t = a.temperature[row], c = weight_scale(t);
  for (int i = threadIdx.x; i < k; i += slice::kThreads) list.ranked[i] = 0;
  xllm::wait_for_prerequisite();
  const int n = slices * k;
  for (int i = threadIdx.x; i < n; i += slice::kThreads) keys[i] = w.keys[row * n + i];
  if (threadIdx.x < 32) {  // the row's max and sum from its slices'
    float m = -slice::kInf;
    double s = 0.0;
    for (int i = lane; i < slices; i += 32) slice::combine(m, s, w.partial[row * slices + i].max, w.partial[row * slices + i].sum, c);
    slice::warp_combine(m, s, c);
    if (lane == 0) {
      row_max = m;
      row_sum = s;
    }
  }
  __syncthreads();
  if (row_max == -slice::kInf || row_sum != row_sum) {  // all -inf, or a NaN or +inf logit
    if (threadIdx.x == 0) {
      a.tokens[row] = -1;
      a.logprobs[row] = NAN;
    }
    return;
  }
  slice::merge_sorted_top(keys, slices, k, k, list.ranked);  // the top k, descending
  const float best = rank_value(list.ranked[0]);
  int rank = 0;
  if (t != 0.f) {
    rank = draw_ranked(list, k, c, a.min_p[row], a.top_p[row], static_cast<uint64_t>(a.seed[row]),
                       static_cast<uint64_t>(a.position[row]));
  }
  if (threadIdx.x == 0) {
    const uint64_t key = list.ranked[rank];
    a.tokens[row] = rank_index(key);
    const float t_eff = t == 0.f ? 1.f : t;
    a.logprobs[row] = static_cast<float>((static_cast<double>(rank_value(key)) - best) / t_eff - log(row_sum));
  }
}

}  // namespace xllm::sampler
