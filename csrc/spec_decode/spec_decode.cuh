// Step spec_decode: speculative decoding's rejection sampler in one launch (torch-free; the
// binding is spec_decode.cu). One thread-block cluster per request, each block owning a
// contiguous chunk of the vocabulary; the blocks combine through distributed shared memory.
//
// A request's positions i = 0..n (n its number of drafts) go in rounds of 1, 2, 4, 8, 16, 16, ...
// rows, so that a request rejected early reads little more than the rows it needs:
//  1. statistics: each block reads its chunk of the round's target rows once, with vector loads:
//     per row the max of y = x / t (the temperature applied as the torch levels apply it: x / t
//     in float32), the sum of exp(y - max) (online; float32 per thread, float64 across), the lowest-index
//     argmax of x and whether the row is dead (a NaN or +inf, or only -inf); one cluster exchange
//     combines the blocks' parts, in the same order in every block.
//  2. walk: lane i of a warp tests the round's position i: draft x is accepted when
//     u * p(x) < q(x), q(x) = exp(x / t - max) / sum, u from Philox at (seed, position + i)
//     stream kAcceptStream (greedy: when x is the argmax); the first position not accepted stops
//     the request. A dead row emits -1 there.
//  3. draw, at the stop (a rejection, or the bonus at row n): one token from max(0, q - p), q for
//     the bonus, q again when rounding leaves no mass, by inverse CDF in vocabulary order over
//     float64 weights (u' from Philox at stream kDrawStream): masses of tiles of kTile tokens
//     (coalesced), scanned across the block and the cluster, pick the block, a thread's run of
//     tiles, the tile and the token where the running mass passes u' times the total; the last
//     positive weight when rounding leaves the running mass short. Greedy emits the argmax.
// The draw's order (vocabulary order) and every decision do not depend on the cluster size, so a
// request's tokens do not depend on its batch, up to the float rounding of the row's normaliser
// (relative 1e-7, summed in another order): a decision moves only when its uniform falls that
// close to a boundary. Temperature only: top-k, top-p and min-p stay with the torch levels.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cub/block/block_scan.cuh>

#include "per_row.cuh"
#include "philox.cuh"
#include "vector_load.cuh"
#include "warp_reduce.cuh"

namespace xllm::spec {

namespace cg = cooperative_groups;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxCluster = 16;
constexpr int kMaxRound = kWarps;  // rows per round at most: one warp combines each row
constexpr int kUnroll = 4;         // vector loads in flight per thread
constexpr int kTile = 128;         // the draw's unit: a warp's 4 coalesced loads; chunks are whole tiles
constexpr int kTileGroup = 4;      // tiles a warp loads at once
constexpr int kMaxTiles = 2048;    // tiles per block at most (the largest vocab: kMaxCluster * kMaxTiles * kTile)
constexpr uint32_t kAcceptStream = 64;  // xllm_sampling/ops/spec_decode.py: ACCEPT_STREAM
constexpr uint32_t kDrawStream = 65;    // DRAW_STREAM
constexpr float kInf = __builtin_huge_valf();
constexpr unsigned kFull = 0xffffffffu;

struct Inputs {
  const void* logits;        // (batch, K + 1, vocab)
  const int64_t* drafts;     // (batch, K)
  const float* draft_probs;  // (batch, K, vocab) or null: one-hot on the draft
  PerRow<int64_t> num_draft, seed, position;
  PerRow<float> temperature;
  int64_t k, vocab, chunk;  // chunk: elements per block, whole tiles
};

struct Outputs {
  int64_t* tokens;   // (batch, K + 1), -1 after the last
  int64_t* emitted;  // (batch,)
};

// Statistics of one target row, or of a part of it.
struct Stats {
  float max;       // of y = x / t
  double sum;      // of exp(y - max)
  float best;      // max of x
  int64_t argmax;  // lowest index holding best (vocab: none yet)
  int bad;         // a NaN or +inf seen
};

__device__ __forceinline__ Stats empty_stats(int64_t vocab) { return {-kInf, 0.0, -kInf, vocab, 0}; }

// The statistics of two disjoint parts together. Commutative (equal inputs in either order give
// equal bits), so the xor-butterfly reductions below leave every lane, and every block, the same.
__device__ __forceinline__ Stats merge(const Stats& a, const Stats& b) {
  Stats r;
  r.max = fmaxf(a.max, b.max);
  const double sa = a.max == -kInf ? 0.0 : a.sum * exp(static_cast<double>(a.max) - r.max);
  const double sb = b.max == -kInf ? 0.0 : b.sum * exp(static_cast<double>(b.max) - r.max);
  r.sum = sa + sb;
  const bool take_b = b.best > a.best || (b.best == a.best && b.argmax < a.argmax);
  r.best = take_b ? b.best : a.best;
  r.argmax = take_b ? b.argmax : a.argmax;
  r.bad = a.bad | b.bad;
  return r;
}

__device__ __forceinline__ Stats shfl_xor(const Stats& s, int offset) {
  return {__shfl_xor_sync(kFull, s.max, offset), __shfl_xor_sync(kFull, s.sum, offset),
          __shfl_xor_sync(kFull, s.best, offset), __shfl_xor_sync(kFull, s.argmax, offset),
          __shfl_xor_sync(kFull, s.bad, offset)};
}

__device__ __forceinline__ Stats warp_merge(Stats s) {
  for (int off = 16; off > 0; off >>= 1) s = merge(s, shfl_xor(s, off));
  return s;
}

// A thread's running statistics of its elements (float32 sums, as the torch levels' softmax;
// the block combines them in float64).
struct Running {
  float max = -kInf, sum = 0.f, best = -kInf;
  int64_t argmax;  // of the first element holding best (a thread's elements come in index order)
  int bad = 0;
};

// Adds elements j.. (VEC of them, values x) to a thread's running statistics.
template <int VEC>
__device__ __forceinline__ void accumulate(Running& r, const float (&x)[VEC], int64_t j, float t) {
  float y[VEC];
  float vmax = -kInf;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    r.bad |= (x[e] != x[e]) | (x[e] == kInf);
    if (x[e] > r.best) {
      r.best = x[e];
      r.argmax = j + e;
    }
    y[e] = x[e] / t;
    vmax = fmaxf(vmax, y[e]);
  }
  if (vmax > r.max) {
    r.sum *= expf(r.max - vmax);
    r.max = vmax;
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e)
    if (y[e] > -kInf) r.sum += expf(y[e] - r.max);
}

// This thread's statistics of [begin, end) of a row: VEC-wide loads, kThreads * VEC apart, kUnroll in flight.
template <typename T, int VEC>
__device__ __forceinline__ Stats thread_stats(const T* row, int64_t begin, int64_t end, float t, int64_t vocab) {
  Running r;
  r.argmax = vocab;
  constexpr int64_t kStride = int64_t{kThreads} * VEC;
  for (int64_t base = begin + threadIdx.x * VEC; base < end; base += kUnroll * kStride) {
    Vec<T, VEC> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * kStride < end) v[u] = load<T, VEC>(row + base + u * kStride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * kStride < end) {
        float x[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[e] = to_float(v[u].v[e]);
        accumulate<VEC>(r, x, base + u * kStride, t);
      }
    }
  }
  return {r.max, static_cast<double>(r.sum), r.best, r.argmax, r.bad};
}

struct Shared {
  Stats warp_part[kMaxRound][kWarps];
  Stats part[2][kMaxRound];  // this block's statistics of the round's rows (double-buffered by round)
  Stats row[kMaxRound];      // the cluster's
  double mass[2];            // this block's residual mass (double-buffered: a retry with q alone)
  double tile_mass[kMaxTiles];  // the residual mass of each of the block's tiles
  typename cub::BlockScan<double, kThreads>::TempStorage scan;
  unsigned accepted;         // bit i: the round's position i accepted
  int chosen_block;
  double target;             // the chosen block's share of u' times the total
  int first_thread, last_thread;  // the draw's walker: the first thread past the target, the last with mass
  int tile;                       // the tile the token is in
  double tile_target;             // the target within that tile
  int64_t token;
};

// The draw's weights: max(0, q(j) - p(j)) at a draft position, q(j) alone for the bonus (or when
// rounding left the residual no mass), q(j) = exp(x_j / t - max) / sum.
template <typename T>
struct Residual {
  const T* row;
  const float* p;  // the draft's distribution, or null: one-hot on `draft`
  int64_t draft;
  float t, max;
  double inv_sum;
  bool target_only;
  __device__ __forceinline__ double operator()(int64_t j) const {
    const double q = static_cast<double>(expf(to_float(row[j]) / t - max)) * inv_sum;
    if (target_only) return q;
    const double pj = p ? static_cast<double>(p[j]) : (j == draft ? 1.0 : 0.0);
    return q > pj ? q - pj : 0.0;
  }
};

// Warp 0: from the blocks' masses of exchange `slot` (lane r: block r's, in cluster order, so the
// same in every block), the block where the running mass first exceeds u times the total (the
// last with positive mass when rounding leaves it short; -1 when the total is 0) and the target
// within that block.
__device__ __forceinline__ void choose_block(cg::cluster_group& cluster, Shared& sh, int slot, double u) {
  const int lane = threadIdx.x % 32;
  const double m = lane < static_cast<int>(cluster.num_blocks()) ? *cluster.map_shared_rank(&sh.mass[slot], lane) : 0.0;
  const double inclusive = warp_inclusive_scan(m, lane);
  const double total = __shfl_sync(kFull, inclusive, 31);
  const double target = u * total;
  const unsigned cross = __ballot_sync(kFull, m > 0.0 && inclusive > target);
  const unsigned positive = __ballot_sync(kFull, m > 0.0);
  const int b = cross ? __ffs(cross) - 1 : 31 - __clz(positive);  // -1 when no block has mass
  const double before = __shfl_sync(kFull, inclusive - m, b < 0 ? 0 : b);
  if (lane == 0) {
    sh.chosen_block = total > 0.0 ? b : -1;
    sh.target = target - before;
  }
}

// Inverse-CDF draw from a row's residual over the whole cluster; every block of the cluster calls
// it. The block's chunk [begin, end) is whole tiles of kTile tokens (vocabulary-aligned, so the
// same tiles whatever the cluster size): each warp takes every kWarps-th tile, its lanes 32
// tokens apart (coalesced); the tiles' masses are added by contiguous runs per thread, scanned
// across the block and then across the cluster; the block, then the thread, then the tile, then
// the token where the running mass passes u times the total are picked in vocabulary order.
// Returns the token in the block that holds it, -1 in the others.
template <typename T>
__device__ int64_t draw(cg::cluster_group& cluster, int64_t begin, int64_t end, Residual<T> weight, double u, Shared& sh) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int tiles = static_cast<int>((end - begin + kTile - 1) / kTile);
  const int per = (tiles + kThreads - 1) / kThreads;  // tiles per thread in the block's scan
  double mine, before;
  for (int slot = 0;; ++slot) {
    for (int tile0 = warp; tile0 < tiles; tile0 += kWarps * kTileGroup) {  // kTileGroup tiles' loads in flight
      double m[kTileGroup];
#pragma unroll
      for (int g = 0; g < kTileGroup; ++g) {
        const int64_t first = begin + int64_t{tile0 + g * kWarps} * kTile;
        m[g] = 0.0;
#pragma unroll
        for (int e = 0; e < kTile / 32; ++e) {
          const int64_t j = first + e * 32 + lane;
          if (j < end) m[g] += weight(j);
        }
      }
#pragma unroll
      for (int g = 0; g < kTileGroup; ++g) {
        const double total = warp_sum(m[g]);
        if (lane == 0 && tile0 + g * kWarps < tiles) sh.tile_mass[tile0 + g * kWarps] = total;
      }
    }
    __syncthreads();
    mine = 0.0;
    for (int i = tid * per; i < min(tiles, (tid + 1) * per); ++i) mine += sh.tile_mass[i];
    double block_mass;
    cub::BlockScan<double, kThreads>(sh.scan).ExclusiveSum(mine, before, block_mass);
    if (tid == 0) sh.mass[slot] = block_mass;
    cluster.sync();
    if (tid < 32) choose_block(cluster, sh, slot, u);
    __syncthreads();
    if (sh.chosen_block >= 0 || weight.target_only) break;
    weight.target_only = true;  // q == p up to rounding: draw from the target itself
  }
  if (sh.chosen_block != static_cast<int>(cluster.block_rank())) return -1;
  if (tid == 0) {
    sh.first_thread = kThreads;
    sh.last_thread = -1;
  }
  __syncthreads();
  const double target = sh.target;
  if (mine > 0.0) {
    if (before + mine > target) atomicMin(&sh.first_thread, tid);
    atomicMax(&sh.last_thread, tid);
  }
  __syncthreads();
  // The walker: the first thread past the target (the last with mass when rounding leaves the
  // running mass short) picks its tile; warp 0 then walks that tile's tokens, 32 a step.
  if (tid == (sh.first_thread < kThreads ? sh.first_thread : sh.last_thread)) {
    double running = before;
    int chosen = -1;
    double chosen_before = 0.0;
    for (int i = tid * per; i < min(tiles, (tid + 1) * per); ++i) {
      const double m = sh.tile_mass[i];
      if (m <= 0.0) continue;
      chosen = i;
      chosen_before = running;
      running += m;
      if (running > target) break;
    }
    sh.tile = chosen;
    sh.tile_target = target - chosen_before;
  }
  __syncthreads();
  if (warp == 0) {
    const int64_t first = begin + int64_t{sh.tile} * kTile;
    const double tile_target = sh.tile_target;
    double running = 0.0;
    int64_t found = -1, last_positive = -1;
#pragma unroll
    for (int e = 0; e < kTile / 32 && found < 0; ++e) {
      const int64_t j = first + e * 32 + lane;
      const double v = j < end ? weight(j) : 0.0;
      const double inclusive = warp_inclusive_scan(v, lane);
      const unsigned cross = __ballot_sync(kFull, v > 0.0 && running + inclusive > tile_target);
      const unsigned positive = __ballot_sync(kFull, v > 0.0);
      if (cross) {
        found = first + e * 32 + __ffs(cross) - 1;
      } else if (positive) {
        last_positive = first + e * 32 + 31 - __clz(positive);
      }
      running += __shfl_sync(kFull, inclusive, 31);
    }
    if (lane == 0) sh.token = found >= 0 ? found : last_positive;
  }
  __syncthreads();
  return sh.token;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 2) rejection_kernel(Inputs in, Outputs out) {
  __shared__ Shared sh;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank()), blocks = static_cast<int>(cluster.num_blocks());
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t b = blockIdx.y, rows = in.k + 1, vocab = in.vocab;
  const int64_t begin = min(vocab, rank * in.chunk), end = min(vocab, begin + in.chunk);
  const int64_t n = max(int64_t{0}, min(in.k, in.num_draft[b]));
  const float t_raw = in.temperature[b];
  const bool greedy = t_raw == 0.f;
  const float t = greedy ? 1.f : t_raw;
  const uint64_t seed = static_cast<uint64_t>(in.seed[b]), position = static_cast<uint64_t>(in.position[b]);
  const T* logits = static_cast<const T*>(in.logits) + b * rows * vocab;
  const int64_t* drafts = in.drafts + b * in.k;
  const float* probs = in.draft_probs ? in.draft_probs + b * in.k * vocab : nullptr;
  int64_t* tokens = out.tokens + b * rows;
  int64_t stop = n;
  int stop_slot = 0;  // the stop's row in sh.row
  for (int64_t first = 0, size = 1, parity = 0; first <= n; first += size, size = min(2 * size, int64_t{kMaxRound}), parity ^= 1) {
    const int g = static_cast<int>(min(size, n + 1 - first));
    // 1. The round's rows' statistics: this block's part, then the cluster's.
    for (int r = 0; r < g; ++r) {
      const Stats s = warp_merge(thread_stats<T, VEC>(logits + (first + r) * vocab, begin, end, t, vocab));
      if (lane == 0) sh.warp_part[r][warp] = s;
    }
    __syncthreads();
    if (warp < g) {
      const Stats s = warp_merge(lane < kWarps ? sh.warp_part[warp][lane] : empty_stats(vocab));
      if (lane == 0) sh.part[parity][warp] = s;
    }
    cluster.sync();
    if (warp < g) {
      const Stats s = warp_merge(lane < blocks ? *cluster.map_shared_rank(&sh.part[parity][warp], lane) : empty_stats(vocab));
      if (lane == 0) sh.row[warp] = s;
    }
    __syncthreads();
    // 2. Walk: lane r of warp 0 tests position first + r.
    if (warp == 0) {
      bool accept = false;
      const int64_t i = first + lane;
      if (lane < g && i < n) {
        const Stats& st = sh.row[lane];
        const int64_t x = min(vocab - 1, max(int64_t{0}, drafts[i]));
        if (!st.bad && st.max != -kInf) {
          if (greedy) {
            accept = x == st.argmax;
          } else {
            const double q = static_cast<double>(expf(to_float(logits[i * vocab + x]) / t - st.max)) / st.sum;
            const double px = probs ? static_cast<double>(probs[i * vocab + x]) : 1.0;
            accept = philox_uniform(seed, position + i, kAcceptStream) * px < q;
          }
        }
      }
      const unsigned accepted = __ballot_sync(kFull, accept);
      if (lane == 0) sh.accepted = accepted;
    }
    __syncthreads();
    const int run = __ffs(~sh.accepted) - 1;  // positions accepted in a row from the round's first (g <= 16 < 32)
    if (rank == 0)
      for (int r = tid; r < run; r += kThreads) tokens[first + r] = min(vocab - 1, max(int64_t{0}, drafts[first + r]));
    if (run < g) {
      stop = first + run;
      stop_slot = run;
      break;
    }
  }
  // 3. The token at the stop.
  const Stats st = sh.row[stop_slot];
  int64_t token = -1;
  bool writer = rank == 0;
  if (!st.bad && st.max != -kInf) {
    if (greedy) {
      token = st.argmax;
    } else {
      const bool bonus = stop == n;
      const int64_t draft = bonus ? -1 : min(vocab - 1, max(int64_t{0}, drafts[stop]));
      const float* p = !bonus && probs ? probs + stop * vocab : nullptr;
      const Residual<T> weight{logits + stop * vocab, p, draft, t, st.max, 1.0 / st.sum, bonus};
      token = draw(cluster, begin, end, weight, philox_uniform(seed, position + stop, kDrawStream), sh);
      writer = token >= 0;
    }
  }
  if (writer && tid == 0) tokens[stop] = token;
  if (rank == 0) {
    for (int64_t i = stop + 1 + tid; i < rows; i += kThreads) tokens[i] = -1;
    if (tid == 0) out.emitted[b] = stop + 1;
  }
  cluster.sync();  // no block leaves while another may still read its shared memory
}

}  // namespace xllm::spec
