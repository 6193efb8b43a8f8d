// Step spec_decode: speculative decoding's rejection sampler in one launch (torch-free).
//
// One block per request walks its positions i = 0..n (n its number of drafts): a pass over target
// row i gives its max and sum of exp (temperature applied as the torch level applies it: x / t in
// float32, then exp(y - max)), its argmax (lowest index) and whether the row is dead (a NaN or +inf,
// or only -inf). Draft x is accepted when u * p(x) < q(x) (u from Philox at (seed, position + i),
// stream kAcceptStream; greedy: when x is the argmax). At the first rejection, or at row n for the
// bonus, one token is drawn from max(0, q - p) (q for the bonus; q again if rounding left no
// mass): a pass sums the weights in float64, a second finds, by thread-contiguous chunks and a
// block scan, the first token whose running sum exceeds u' times the total (u' at stream
// kDrawStream); greedy emits the argmax, a dead row -1. Temperature only: the filters (top-k,
// top-p, min-p) stay with the torch levels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda/functional>

#include "philox.cuh"
#include "vector_load.cuh"

namespace xllm::spec {

constexpr int kThreads = 512;
constexpr uint32_t kAcceptStream = 64;  // xllm_sampling/ops/spec_decode.py: ACCEPT_STREAM
constexpr uint32_t kDrawStream = 65;    // DRAW_STREAM
constexpr float kInf = __builtin_huge_valf();

struct Inputs {
  const void* logits;         // (batch, K + 1, vocab)
  const int64_t* drafts;      // (batch, K)
  const float* draft_probs;   // (batch, K, vocab) or null: one-hot on the draft
  const int64_t* num_draft;   // (batch,)
  const float* temperature;   // (batch,) or null: temperature_value
  float temperature_value;
  const int64_t* seed;        // (batch,)
  const int64_t* position;    // (batch,)
  int64_t k, vocab;
};

struct Outputs {
  int64_t* tokens;   // (batch, K + 1), -1 after the last
  int64_t* emitted;  // (batch,)
};

// A row's statistics: max of y = x / t, sum of exp(y - max) (float64), argmax of x, dead or not.
struct RowStats {
  float max;
  double sum;
  int64_t argmax;
  bool dead;
};

struct ArgMax {
  float value;
  int64_t index;
};

struct ArgMaxOp {
  __device__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
  }
};

struct Shared {
  union {
    typename cub::BlockReduce<float, kThreads>::TempStorage max;
    typename cub::BlockReduce<double, kThreads>::TempStorage sum;
    typename cub::BlockReduce<ArgMax, kThreads>::TempStorage argmax;
    typename cub::BlockReduce<int, kThreads>::TempStorage flags;
    typename cub::BlockScan<double, kThreads>::TempStorage scan;
    typename cub::BlockReduce<int64_t, kThreads>::TempStorage last;
  } temp;
  RowStats stats;
  int64_t token;
};

template <typename T, typename S>
__device__ __forceinline__ RowStats row_stats(const T* row, int64_t vocab, float t, S& sh) {
  float m = -kInf;
  ArgMax best{-kInf, vocab};
  int bad = 0;  // NaN or +inf seen
  for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
    const float x = to_float(row[j]);
    bad |= (x != x) || x == kInf;
    m = fmaxf(m, x / t);
    if (x > best.value || (best.index == vocab && x == best.value)) best = {x, j};
  }
  const float block_max = cub::BlockReduce<float, kThreads>(sh.temp.max).Reduce(m, ::cuda::maximum<>{});
  __syncthreads();
  const ArgMax block_best = cub::BlockReduce<ArgMax, kThreads>(sh.temp.argmax).Reduce(best, ArgMaxOp());
  __syncthreads();
  const int any_bad = cub::BlockReduce<int, kThreads>(sh.temp.flags).Reduce(bad, ::cuda::maximum<>{});
  if (threadIdx.x == 0) {
    sh.stats.max = block_max;
    sh.stats.argmax = block_best.index;
    sh.stats.dead = any_bad || block_max == -kInf;
  }
  __syncthreads();
  double s = 0.0;
  if (!sh.stats.dead) {
    for (int64_t j = threadIdx.x; j < vocab; j += kThreads) s += expf(to_float(row[j]) / t - sh.stats.max);
  }
  const double block_sum = cub::BlockReduce<double, kThreads>(sh.temp.sum).Sum(s);
  if (threadIdx.x == 0) sh.stats.sum = block_sum;
  __syncthreads();
  return sh.stats;
}

// The residual weight of token j: max(0, q(j) - p(j)) at a draft position, q(j) for the bonus.
template <typename T>
__device__ __forceinline__ double residual(const T* row, int64_t j, float t, const RowStats& st, const float* p,
                                           int64_t draft, bool target_only) {
  const double q = static_cast<double>(expf(to_float(row[j]) / t - st.max)) / st.sum;
  if (target_only) return q;
  const double pj = p ? static_cast<double>(p[j]) : (j == draft ? 1.0 : 0.0);
  return q > pj ? q - pj : 0.0;
}

// The first token whose running sum of weights (vocabulary order) exceeds u times their total;
// the last positive weight when rounding leaves the sum short. Weights by thread-contiguous chunks.
template <typename T, typename S>
__device__ __forceinline__ int64_t draw(const T* row, int64_t vocab, float t, const RowStats& st, const float* p, int64_t draft,
                        bool bonus, double u, S& sh) {
  const int64_t chunk = (vocab + kThreads - 1) / kThreads;
  const int64_t begin = min(vocab, threadIdx.x * chunk), end = min(vocab, begin + chunk);
  bool target_only = bonus;
  double mine = 0.0;
  for (int64_t j = begin; j < end; ++j) mine += residual(row, j, t, st, p, draft, target_only);
  double total = cub::BlockReduce<double, kThreads>(sh.temp.sum).Sum(mine);
  __shared__ double shared_total;
  if (threadIdx.x == 0) {
    shared_total = total;
    sh.token = -1;
  }
  __syncthreads();
  total = shared_total;
  if (!(total > 0.0)) {  // q == p up to rounding: draw from the target itself
    target_only = true;
    mine = 0.0;
    for (int64_t j = begin; j < end; ++j) mine += residual(row, j, t, st, p, draft, true);
    total = cub::BlockReduce<double, kThreads>(sh.temp.sum).Sum(mine);
    if (threadIdx.x == 0) shared_total = total;
    __syncthreads();
    total = shared_total;
  }
  const double target = u * total;
  double before;
  cub::BlockScan<double, kThreads>(sh.temp.scan).ExclusiveSum(mine, before);
  __syncthreads();
  int64_t last_positive = -1;
  if (before <= target && target < before + mine) {
    double running = before;
    for (int64_t j = begin; j < end; ++j) {
      const double w = residual(row, j, t, st, p, draft, target_only);
      running += w;
      if (w > 0.0) last_positive = j;
      if (running > target) {
        sh.token = j;
        break;
      }
    }
  }
  __syncthreads();
  if (sh.token < 0) {  // rounding: the last positive weight of the row
    for (int64_t j = begin; j < end; ++j)
      if (residual(row, j, t, st, p, draft, target_only) > 0.0) last_positive = j;
    const int64_t found = cub::BlockReduce<int64_t, kThreads>(sh.temp.last).Reduce(last_positive, ::cuda::maximum<>{});
    if (threadIdx.x == 0) sh.token = found;
    __syncthreads();
  }
  return sh.token;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) rejection_kernel(Inputs in, Outputs out) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x, rows = in.k + 1, vocab = in.vocab;
  const int64_t n = max(int64_t{0}, min(in.k, in.num_draft[b]));
  const float t_raw = in.temperature ? in.temperature[b] : in.temperature_value;
  const bool greedy = t_raw == 0.f;
  const float t = greedy ? 1.f : t_raw;
  const uint64_t seed = static_cast<uint64_t>(in.seed[b]), position = static_cast<uint64_t>(in.position[b]);
  const T* logits = static_cast<const T*>(in.logits) + b * rows * vocab;
  int64_t emitted = 0;
  for (int64_t i = 0; i <= n; ++i) {
    const T* row = logits + i * vocab;
    const RowStats st = row_stats(row, vocab, t, sh);
    int64_t token;
    bool stop = true;
    const int64_t draft = i < n ? min(vocab - 1, max(int64_t{0}, in.drafts[b * in.k + i])) : -1;
    const float* p = (i < n && in.draft_probs) ? in.draft_probs + (b * in.k + i) * vocab : nullptr;
    if (st.dead) {
      token = -1;
    } else {
      bool accept = false;
      if (i < n) {
        if (greedy) {
          accept = draft == st.argmax;
        } else {
          const double q = static_cast<double>(expf(to_float(row[draft]) / t - st.max)) / st.sum;
          const double pd = p ? static_cast<double>(p[draft]) : 1.0;
          accept = philox_uniform(seed, position + i, kAcceptStream) * pd < q;
        }
      }
      if (accept) {
        token = draft;
        stop = false;
      } else if (greedy) {
        token = st.argmax;
      } else {
        token = draw(row, vocab, t, st, p, draft, i == n, philox_uniform(seed, position + i, kDrawStream), sh);
      }
    }
    if (threadIdx.x == 0) out.tokens[b * rows + i] = token;
    ++emitted;
    if (stop) break;
  }
  for (int64_t i = emitted + threadIdx.x; i < rows; i += kThreads) out.tokens[b * rows + i] = -1;
  if (threadIdx.x == 0) out.emitted[b] = emitted;
}

}  // namespace xllm::spec
