// Step sampler: logits to one token per row in one launch (torch-free kernel; the binding is
// sampler.cu). One thread-block cluster per row: each block caches its chunk of the row in
// shared memory as float32 and the blocks combine through distributed shared memory, so the
// logits are read from global memory once whatever the filters.
//
// Per row, on the cached chunk (x: the processed logits, penalties applied, -0 made +0):
//  1. max, lowest-index argmax, NaN / +inf flags (invalid row: token -1, logprob NaN);
//  2. S = sum of w = 2^((x - max) * log2(e) / t); temperature 0 is greedy: the argmax. Rows
//     without top-k, top-p or min-p compute w per tile as stream_sampling.cuh does
//     (tile_weight.cuh), so that an unfiltered request draws the same token in either kernel;
//     the others as 2^((x - max) c) in float32;
//  3. top-k: counts of tokens at seven levels below the max bound the top k by a set of a few
//     times k tokens. When that set has at most kGather tokens and k <= slice::kMaxKeys, the row
//     is listed: a set of at most slice::kDirectRank tokens every block writes into block 0's
//     list and leaves, and block 0 ranks it alone (slice::rank_select); a larger one every block
//     gathers whole and ranks its own entries into block 0's top k (faster than block 0 alone
//     for ~350 tokens). Block 0 draws from the top k as steps 4-5 do (ranked_draw.cuh, shared
//     with top_k_sampling.cuh), and the row is done. Otherwise the k-th key, by ranking the
//     gathered set or by a radix select over it (8-bit digits of x's order-preserving bits,
//     four rounds, histograms summed over the cluster); ties at the k-th value keep the lowest
//     indices. min-p keeps w >= min_p (w of the max is 1). Both are prefixes of the ranking
//     (x descending, index ascending), so the candidates C are one membership test;
//  4. draw: a float64 uniform from Philox keyed by (seed, position, round) times C's mass picks
//     a block, a warp and a token by the running mass in vocabulary order (float64 sums; never a
//     token of weight 0: when rounding leaves the running mass short, the last positive one);
//  5. top-p, by rejection over pivots: the drawn token j is kept when the mass ranked above it
//     is under top_p times the top-k mass; otherwise every token ranked at or below j is out of
//     the top-p set too, so C shrinks to the tokens ranked above j and the next round draws from
//     that. The accepted token is distributed exactly as the filtered distribution. After
//     kMaxRounds rejections (each shrinking C: practically never) the argmax is taken.
// Every decision comes from values every block of the cluster reduces the same way, so the
// blocks stay in step; the draw's order (vocabulary order) does not depend on the cluster
// size, so a request's token does not depend on its batch.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "per_row.cuh"
#include "philox.cuh"
#include "rank_key.cuh"
#include "sampler/ranked_draw.cuh"
#include "sampler/tile_weight.cuh"
#include "slice_top_keys.cuh"
#include "vector_load.cuh"
#include "warp_reduce.cuh"

namespace xllm::sampler {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxCluster = 16;
constexpr int kBins = 256;                            // radix digit of 8 bits
constexpr int kPenaltySlots = 2048;                   // per-block hash table of penalised tokens
constexpr int kMaxPenaltyTokens = kPenaltySlots / 2;  // generated tokens per row the kernel takes
constexpr int kLevels = 7;                            // top-k bound: w >= 2^-(2^j), j < kLevels
constexpr int kGather = 512;                          // top-k candidates listed at most
constexpr int kMaxTiles = 64;                         // tiles of a block's chunk (tile_weight.cuh) at most
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFull = 0xffffffffu;

// Where the block's top-k candidate list starts in dynamic shared memory, in floats after the
// cached chunk (or block 0's TopK of a listed row, kept where its cached chunk was, when larger):
// 16-byte aligned whatever the chunk's length (the list holds 8-byte keys).
__host__ __device__ constexpr int64_t list_offset(int64_t chunk) {
  constexpr int64_t kScratch = (sizeof(TopK) + 15) / 16 * 4;
  return (chunk + 3) / 4 * 4 > kScratch ? (chunk + 3) / 4 * 4 : kScratch;
}

using xllm::PerRow;

// c of a row: log2(e) / temperature; temperature 0 (greedy) keeps 1 for the logprob.
__device__ __forceinline__ float weight_scale(float t) { return kLog2e / (t == 0.f ? 1.f : t); }

struct Args {
  int64_t vocab, chunk;  // chunk: elements per block (a multiple of kTile)
  PerRow<float> temperature, top_p, min_p;
  PerRow<int64_t> top_k, seed, position;
  const int64_t* penalty_tokens;  // (batch, penalty_len) generated tokens, -1 padding; null: none
  int64_t penalty_len;
  PerRow<float> frequency, presence, repetition;
  int64_t* tokens;  // (batch,) out
  float* logprobs;  // (batch,) out
};

// Thread t's stretch of a chunk of n elements: contiguous (so that the draw's running mass
// goes in vocabulary order), of an odd length (strided shared-memory reads without bank conflicts).
struct Range {
  int begin, end;
};
__device__ __forceinline__ Range range_of(int n, int t = threadIdx.x) {
  const int per = ((n + kThreads - 1) / kThreads) | 1;
  return {min(t * per, n), min((t + 1) * per, n)};
}

// One block's part of a cluster-wide exchange (double-buffered: one cluster.sync per exchange).
struct Slot {
  double mass, mass2;
  float value;
  int index;
  int flags;  // 1: a NaN, 2: a +inf
};

// a becomes the larger of a and (value, index), the lower index on a tie, with both slots' flags.
__device__ __forceinline__ void keep_max(Slot& a, float value, int index, int flags) {
  if (value > a.value || (value == a.value && index < a.index)) {
    a.value = value;
    a.index = index;
  }
  a.flags |= flags;
}

// keep_max over the warp's lanes, the result in every lane.
__device__ __forceinline__ Slot warp_keep_max(Slot v) {
  for (int off = 16; off > 0; off >>= 1) {
    keep_max(v, __shfl_xor_sync(kFull, v.value, off), __shfl_xor_sync(kFull, v.index, off),
             __shfl_xor_sync(kFull, v.flags, off));
  }
  return v;
}

struct Shared {
  Slot slot[2];
  int hist[2][kBins];
  double thread_mass[kThreads];
  double warp_total[kWarps];
  int walk_thread, last_thread;
  // Row state, written by one thread and read by all after a __syncthreads.
  float max;
  int argmax, invalid;
  double total, top_k_mass, block_mass[kMaxCluster];
  uint32_t digit_prefix;
  float lower;
  int level;  // top_k_bound's level index
  int gather_total, gather_offset[kMaxCluster + 1], gather_count;
  uint64_t kth;
  int digit_target, eq_before, eq_own, chosen_block, walk_result, chosen_index;
  float chosen_value;
  float tile_ref[kMaxTiles];     // unfiltered rows: the chunk's tiles' tile_reference
  double tile_scale[kMaxTiles];  // and tile_scale
};

// Each thread's sums of weight(i, x) over its range, four elements at a time into independent
// accumulators (the passes are latency-bound at small batch: one block per SM). Weight returns
// a double, or a Pair when one pass takes two masses.
struct Pair {
  double a, b;
  __device__ Pair& operator+=(Pair o) {
    a += o.a;
    b += o.b;
    return *this;
  }
};
__device__ __forceinline__ Pair operator+(Pair x, Pair y) { return {x.a + y.a, x.b + y.b}; }
__device__ __forceinline__ double first(double v) { return v; }
__device__ __forceinline__ double first(Pair v) { return v.a; }

template <typename R, typename F>
__device__ __forceinline__ R range_sum(const float* cache, Range r, F weight) {
  R acc[4] = {};
  int i = r.begin;
  for (; i + 4 <= r.end; i += 4) {
#pragma unroll
    for (int u = 0; u < 4; ++u) acc[u] += weight(i + u, cache[i + u]);
  }
  for (; i < r.end; ++i) acc[0] += weight(i, cache[i]);
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// Sum of weight(i, x) over the block's chunk, each thread over its range (its part, the first
// of a Pair, left in sh.thread_mass for a walk). Every thread returns the block's sum (warps
// added in order).
template <typename R = double, typename F>
__device__ R block_mass(const float* cache, int n, Shared& sh, F weight) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const R own = range_sum<R>(cache, range_of(n), weight);
  __shared__ R warp_part[kWarps];
  sh.thread_mass[threadIdx.x] = first(own);
  const double first_sum = warp_sum(first(own));
  if constexpr (sizeof(R) == sizeof(Pair)) {
    const double second_sum = warp_sum(own.b);
    if (lane == 0) warp_part[warp] = R{first_sum, second_sum};
  } else {
    if (lane == 0) warp_part[warp] = first_sum;
  }
  if (lane == 0) sh.warp_total[warp] = first_sum;
  __syncthreads();
  R total{};
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += warp_part[w];
  __syncthreads();  // warp_part is reused by the next pass
  return total;
}

// The chunk index where the running sum of weight (vocabulary order) first exceeds `target`,
// from the thread parts of the block_mass just taken with the same weight: a scan of the
// threads' parts picks the thread, which walks its range. A token of positive weight always
// (rounding that leaves the sum short gives the last positive one). All threads of the block
// call it; the answer comes back to all.
template <typename F>
__device__ int walk(const float* cache, int n, double target, Shared& sh, F weight) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid == 0) {
    sh.walk_thread = INT32_MAX;
    sh.last_thread = -1;
  }
  const double own = sh.thread_mass[tid];
  const double inclusive = warp_inclusive_scan(own, lane);
  double before = inclusive - own;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) before += w < warp ? sh.warp_total[w] : 0.0;
  __syncthreads();
  if (own > 0.0) {
    if (before + own > target) atomicMin(&sh.walk_thread, tid);
    atomicMax(&sh.last_thread, tid);
  }
  __syncthreads();
  const int chosen = sh.walk_thread != INT32_MAX ? sh.walk_thread : sh.last_thread;
  if (warp == chosen / 32) {  // the chosen thread's warp walks its range, 32 elements a step
    const Range r = range_of(n, chosen);
    double run = __shfl_sync(kFull, before, chosen % 32);
    int found = -1, last_positive = -1;
    for (int b = r.begin; b < r.end && found < 0; b += 32) {
      const int i = b + lane;
      const double v = i < r.end ? weight(i, cache[i]) : 0.0;
      const double inclusive_v = warp_inclusive_scan(v, lane);
      const unsigned cross = __ballot_sync(kFull, v > 0.0 && run + inclusive_v > target);
      const unsigned positive = __ballot_sync(kFull, v > 0.0);
      if (cross) {
        found = b + __ffs(cross) - 1;
      } else if (positive) {
        last_positive = b + 31 - __clz(positive);
      }
      run += __shfl_sync(kFull, inclusive_v, 31);
    }
    if (lane == 0) sh.walk_result = found >= 0 ? found : last_positive;
  }
  __syncthreads();
  return sh.walk_result;
}

// Warp 0, lane r: block r's slot of exchange `phase` (lanes past the cluster get `empty`).
__device__ __forceinline__ Slot remote_slot(cg::cluster_group& cluster, Shared& sh, int phase, Slot empty) {
  const unsigned lane = threadIdx.x % 32;
  return lane < cluster.num_blocks() ? *cluster.map_shared_rank(&sh.slot[phase], lane) : empty;
}

// Warp 0: from the blocks' masses (lane r: block r's), the block where the running mass first
// exceeds target (the last with positive mass when rounding leaves it short), and the mass before it.
__device__ __forceinline__ void choose_block(double mass, double target, Shared& sh) {
  const int lane = threadIdx.x % 32;
  const double inclusive = warp_inclusive_scan(mass, lane);
  const unsigned cross = __ballot_sync(kFull, mass > 0.0 && inclusive > target);
  const unsigned positive = __ballot_sync(kFull, mass > 0.0);
  const int b = cross ? __ffs(cross) - 1 : 31 - __clz(positive);
  const double before = __shfl_sync(kFull, inclusive - mass, b);
  if (lane == 0) {
    sh.chosen_block = b;
    sh.total = before;  // reused: the mass before the chosen block
  }
}

// The top-k bound's levels: x >= max - 2^j / c, that is w >= 2^-(2^j); refined (0 <= within <
// kLevels, see refine_bound): kLevels levels evenly spaced from level within - 1 (the max for 0)
// down to level within, the last.
__device__ __forceinline__ float level_of(int j, float row_max, float c) { return row_max - static_cast<float>(1 << j) / c; }
__device__ __forceinline__ float level_at(int j, float row_max, float c, int within) {
  if (within < 0 || j == kLevels - 1) return level_of(within < 0 ? j : within, row_max, c);
  const float lo = level_of(within, row_max, c), hi = within == 0 ? row_max : level_of(within - 1, row_max, c);
  return hi + (lo - hi) * static_cast<float>(j + 1) / kLevels;
}

// One thread's counts of its tokens at each level x >= level_at(j, ..., within) (ascending
// distance from the max), taken one value at a time (during another pass over its range). The
// levels do not increase with j, so a value's first level (the smallest j it reaches; kLevels for
// none) takes three comparisons, and the thread keeps one 9-bit count per first level, packed in
// one word (a thread's stretch is at most kMaxTiles * kTile / kThreads + 1 values); the count at
// level j is the sum of the fields 0..j. The same comparisons as one per level, so the same counts.
struct LevelCounts {
  static constexpr int kBits = 9;
  static_assert(kMaxTiles * kTile / kThreads + 1 < (1 << kBits), "a thread's count fits its field");
  static_assert(kLevels == 7, "take() searches seven levels");
  float level[kLevels];
  uint64_t first = 0;

  __device__ __forceinline__ LevelCounts(float row_max, float c, int within) {
#pragma unroll
    for (int j = 0; j < kLevels; ++j) level[j] = level_at(j, row_max, c, within);
  }

  __device__ __forceinline__ void take(float v) {
    const bool upper = v >= level[3];
    const bool pair = upper ? v >= level[1] : v >= level[5];
    const int j = upper ? (pair ? 0 : 2) : (pair ? 4 : 6);
    const float split = upper ? (pair ? level[0] : level[2]) : (pair ? level[4] : level[6]);
    const int at = j + (v >= split ? 0 : 1);  // kLevels: below every level (or NaN)
    first += at < kLevels ? uint64_t{1} << (kBits * at) : uint64_t{0};
  }

  // The threads' counts added into h[0..kLevels) (zeroed beforehand; read across the cluster
  // after the next exchange). Every thread calls it.
  __device__ __forceinline__ void add_to(int* h) const {
    int count = 0;
#pragma unroll
    for (int j = 0; j < kLevels; ++j) {
      count += static_cast<int>((first >> (kBits * j)) & ((1u << kBits) - 1));
      const int w = __reduce_add_sync(kFull, count);
      if (threadIdx.x % 32 == 0 && w) atomicAdd(&h[j], w);
    }
  }
};

// This block's level counts (LevelCounts) over its chunk, added into h, in a pass of their own.
__device__ inline void count_levels(const float* cache, int n, float row_max, float c, int within, int* h) {
  LevelCounts levels(row_max, c, within);
  const Range range = range_of(n);
  for (int i = range.begin; i < range.end; ++i) levels.take(cache[i]);
  levels.add_to(h);
}

// The candidates' bound of a row's top k (1 <= k < vocab), from the blocks' LevelCounts at the
// same levels (taken in the mass pass, or by count_levels when refining; sh.hist[1], exchanged): the smallest level set holding k tokens holds the top k. Sets
// sh.lower (that level, -inf when none holds k), sh.level (its index) and each block's place in
// the row's list of the set's tokens; returns the set's size (INT32_MAX when no level holds k) to
// every thread.
__device__ inline int top_k_bound(cg::cluster_group& cluster, int64_t k, float row_max, float c, int within,
                                  Shared& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const unsigned blocks = cluster.num_blocks();
  if (warp == 0) {  // lane r reads block r's counts, all loads in flight at once
    int count[kLevels];
#pragma unroll
    for (int j = 0; j < kLevels; ++j) count[j] = lane < static_cast<int>(blocks) ? *cluster.map_shared_rank(&sh.hist[1][j], lane) : 0;
    int level = kLevels, mine = 0;
#pragma unroll
    for (int j = kLevels - 1; j >= 0; --j) {
      if (__reduce_add_sync(kFull, count[j]) >= k) {
        level = j;
        mine = count[j];
      }
    }
    const int inclusive = warp_inclusive_scan(mine, lane);
    const int total = __shfl_sync(kFull, inclusive, 31);
    if (lane < kMaxCluster) sh.gather_offset[lane + 1] = inclusive;
    if (lane == 0) {
      sh.gather_offset[0] = 0;
      sh.gather_count = 0;
      sh.lower = level < kLevels ? level_at(level, row_max, c, within) : -INFINITY;
      sh.level = level;
      sh.gather_total = level < kLevels ? total : INT32_MAX;
    }
  }
  __syncthreads();
  return sh.gather_total;
}

// A tighter bound when top_k_bound's set is too large for the list (the levels double their
// distance from the max, so a set can hold tens of times k tokens): kLevels levels evenly spaced
// from the level above (fewer than k tokens; the max for level 0) down to the chosen one, counted
// over the chunk again, for rows that the list can take (k <= slice::kMaxKeys). Costs two cluster
// barriers and one pass over the cached chunk (measured 1-2 us where the set stays too large, at
// k = 200), against the radix select over the large set (top_k_cut: 8-13 us more at k = 50,
// V = 151936); same set rule, so the same top k.
__device__ inline int refine_bound(cg::cluster_group& cluster, const float* cache, int n, int64_t k, float row_max,
                                   float c, Shared& sh) {
  const int within = sh.level;  // read after top_k_bound's barrier
  cluster.sync();                // every block has read the first counts
  if (threadIdx.x < kLevels) sh.hist[1][threadIdx.x] = 0;
  __syncthreads();
  count_levels(cache, n, row_max, c, within, sh.hist[1]);
  cluster.sync();
  return top_k_bound(cluster, k, row_max, c, within, sh);
}

// The row's list of the tokens at or above sh.lower as rank keys, in block 0's `list`: each block
// writes its own at their place in the row's list (distributed shared memory stores), then the
// cluster syncs. Every block has then read all it reads of the others' shared memory (the counts
// of top_k_bound), so the blocks other than 0 may leave.
__device__ inline void gather_to_first(cg::cluster_group& cluster, const float* cache, int n, int64_t begin,
                                       uint64_t* list, Shared& sh) {
  const float lower = sh.lower;
  uint64_t* own = cluster.map_shared_rank(list, 0) + sh.gather_offset[cluster.block_rank()];
  const Range range = range_of(n);
  for (int i = range.begin; i < range.end; ++i) {
    const float v = cache[i];
    if (v >= lower) own[atomicAdd(&sh.gather_count, 1)] = rank_key(v, begin + i);
  }
  cluster.sync();
}

// The row's list of the `total` (<= kGather) tokens at or above sh.lower as rank keys, in `list`
// of every block: each block lists its own at their place in the row's list, the blocks exchange,
// and each copies the others' entries.
__device__ inline void gather_list(cg::cluster_group& cluster, const float* cache, int n, int64_t begin, int total,
                                   uint64_t* list, Shared& sh) {
  const unsigned rank = cluster.block_rank();
  const float lower = sh.lower;
  const Range range = range_of(n);
  const int offset = sh.gather_offset[rank];
  for (int i = range.begin; i < range.end; ++i) {
    const float v = cache[i];
    if (v >= lower) list[offset + atomicAdd(&sh.gather_count, 1)] = rank_key(v, begin + i);
  }
  cluster.sync();
  for (int p = threadIdx.x; p < total; p += kThreads) {
    int r = 0;
    while (sh.gather_offset[r + 1] <= p) ++r;
    if (r != static_cast<int>(rank)) list[p] = *cluster.map_shared_rank(&list[p], r);
  }
  __syncthreads();
}

// The row's top k (1 <= k < vocab, `total` from top_k_bound) as the k-th value's
// order-preserving bits (*kth) and the chunk index below which this block keeps the tokens equal
// to it (returned). When the bound's set holds at most kGather tokens, every block gathers the
// list and ranks it. Otherwise radix rounds over that set: 8-bit digits of the order-preserving
// bits from the top, each round a histogram summed over the cluster, and the cut among the ties
// by a walk in the one block where it falls.
__device__ inline int top_k_cut(cg::cluster_group& cluster, const float* cache, int n, int64_t begin, int64_t k,
                                int total, uint64_t* list, Shared& sh, uint32_t* kth) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const unsigned rank = cluster.block_rank(), blocks = cluster.num_blocks();
  const float lower = sh.lower;
  const Range range = range_of(n);
  if (total <= kGather) {
    gather_list(cluster, cache, n, begin, total, list, sh);
    for (int p = tid; p < total; p += kThreads) {
      const uint64_t key = list[p];
      int above[4] = {};
      int q = 0;
      for (; q + 4 <= total; q += 4) {
#pragma unroll
        for (int u = 0; u < 4; ++u) above[u] += list[q + u] > key;
      }
      for (; q < total; ++q) above[0] += list[q] > key;
      if ((above[0] + above[1]) + (above[2] + above[3]) == k - 1) sh.kth = key;
    }
    __syncthreads();
    *kth = static_cast<uint32_t>(sh.kth >> 32);
    const int64_t cut = static_cast<int64_t>(~static_cast<uint32_t>(sh.kth)) + 1 - begin;  // past the last tie kept
    return cut <= 0 ? 0 : cut >= n ? n : static_cast<int>(cut);
  }

  __shared__ int warp_total[kWarps];
  uint32_t prefix = 0, mask = 0;
  int target = static_cast<int>(k);
#pragma unroll 1
  for (int round = 0; round < 4; ++round) {
    const int shift = 24 - 8 * round;
    int* h = sh.hist[round & 1];
    h[tid] = 0;  // kThreads == kBins; the buffer was last read before the previous cluster.sync
    __syncthreads();
    for (int i = range.begin; i < range.end; ++i) {
      const float v = cache[i];
      if (v >= lower) {
        const uint32_t key = order_key(v);
        if ((key & mask) == prefix) atomicAdd(&h[(key >> shift) & 0xFF], 1);
      }
    }
    cluster.sync();
    int bin_total = 0, before = 0;
#pragma unroll
    for (int r = 0; r < kMaxCluster; ++r) {
      if (r < static_cast<int>(blocks)) {
        const int cnt = *cluster.map_shared_rank(&h[tid], r);
        bin_total += cnt;
        before += r < static_cast<int>(rank) ? cnt : 0;
      }
    }
    // Tokens in bins above this one: a suffix sum over the 256 bins.
    int suffix = bin_total;
    for (int off = 1; off < 32; off <<= 1) {
      const int o = __shfl_down_sync(kFull, suffix, off);
      if (lane + off < 32) suffix += o;
    }
    if (lane == 0) warp_total[warp] = suffix;
    __syncthreads();
    int above = suffix - bin_total;
    for (int w = warp + 1; w < kWarps; ++w) above += warp_total[w];
    if (above < target && above + bin_total >= target) {
      sh.digit_prefix = prefix | (static_cast<uint32_t>(tid) << shift);
      sh.digit_target = target - above;
      sh.eq_before = before;
      sh.eq_own = h[tid];
    }
    __syncthreads();
    prefix = sh.digit_prefix;
    target = sh.digit_target;
    mask |= 0xFFu << shift;
  }
  *kth = prefix;
  const int keep = target - sh.eq_before;  // this block's ties to keep, lowest indices first
  if (keep <= 0) return 0;
  if (keep >= sh.eq_own) return n;
  auto tied = [&](int, float v) { return order_key(v) == prefix ? 1.0 : 0.0; };
  block_mass(cache, n, sh, tied);
  return 1 + walk(cache, n, keep - 0.5, sh, tied);
}

// A listed top-k row whose set has more than slice::kDirectRank tokens, every block of the
// cluster (each holding the gathered list[0, total), gather_list): its top k ranked into block
// 0's TopK `top`. Each block ranks its own entries (a key's rank: the list's keys above it,
// counted by the block's warps over their stretches of the list) and writes those ranked below k
// into block 0; ends with a cluster sync, after which no block reads another's shared memory.
// Not inlined: its registers stay out of the kernel's own (inlined, sample_kernel spilled).
// Static: one per translation unit.
static __device__ __noinline__ void rank_into_first(const uint64_t* list, int total, int k, TopK* top, Shared& sh) {
  cg::cluster_group cluster = cg::this_cluster();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const unsigned rank = cluster.block_rank();
  const int first = sh.gather_offset[rank], own = sh.gather_offset[rank + 1] - first;
  int* above = &sh.hist[0][0];  // the own entries' counts: up to kGather (both histograms, free after the gather)
  static_assert(kGather <= 2 * kBins, "the counts fit the histograms");
  for (int i = threadIdx.x; i < own; i += kThreads) above[i] = 0;
  __syncthreads();
  const int per = (total + kWarps - 1) / kWarps, lo = min(total, warp * per), hi = min(total, lo + per);
  for (int i = lane; i < own; i += 32) {
    const uint64_t key = list[first + i];
    int count[4] = {};
    int q = lo;
    for (; q + 4 <= hi; q += 4) {
#pragma unroll
      for (int u = 0; u < 4; ++u) count[u] += list[q + u] > key;
    }
    for (; q < hi; ++q) count[0] += list[q] > key;
    atomicAdd(&above[i], (count[0] + count[1]) + (count[2] + count[3]));
  }
  __syncthreads();
  uint64_t* ranked = cluster.map_shared_rank(top->ranked, 0);
  for (int i = threadIdx.x; i < own; i += kThreads) {
    if (above[i] < k) ranked[above[i]] = list[first + i];
  }
  cluster.sync();  // block 0's top->ranked[0, k) is complete
}

// Block 0 of a listed top-k row: with `alone` (gather_to_first's set), its top k ranked from its
// list[0, total) into `top` first; otherwise `top` already holds it (rank_into_first). Then the
// draw from it (ranked_draw.cuh), which writes the row's token and logprob. Not inlined, as
// rank_into_first.
static __device__ __noinline__ void draw_listed(const uint64_t* list, int total, int k, bool alone, TopK* top, float t,
                                                float min_p, float top_p, uint64_t seed, uint64_t position,
                                                float row_max, double row_sum, int64_t* token, float* logprob) {
  if (alone) {
    slice::rank_select<true>(list, total, k, top->ranked);
    __syncthreads();
  }
  const int r = draw_ranked(*top, k, weight_scale(t), min_p, top_p, seed, position);
  if (threadIdx.x == 0) {
    const uint64_t key = top->ranked[r];
    *token = rank_index(key);
    *logprob = static_cast<float>((static_cast<double>(rank_value(key)) - row_max) / t - log(row_sum));
  }
}

// kMinBlocks: the blocks an SM must hold (4 for batches of several blocks an SM: 64 registers; 1
// where the grid is one block an SM at most, which leaves the registers to the passes' latency).
template <typename T, int VEC, bool PENALTY, int kMinBlocks>
__global__ void __launch_bounds__(kThreads, kMinBlocks) sample_kernel(const T* __restrict__ logits, Args a) {
  extern __shared__ __align__(16) float cache[];
  __shared__ Shared sh;
  cg::cluster_group cluster = cg::this_cluster();
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const unsigned rank = cluster.block_rank();
  const int64_t row = blockIdx.y, vocab = a.vocab;
  const int64_t begin = static_cast<int64_t>(rank) * a.chunk;
  const int64_t end = begin + a.chunk < vocab ? begin + a.chunk : vocab;
  const int n = end > begin ? static_cast<int>(end - begin) : 0;
  // The row's settings, read first: per-request tensors' loads overlap the chunk's instead of
  // following a cluster barrier.
  const float t = a.temperature[row], top_p = a.top_p[row], min_p = a.min_p[row];
  const int64_t k = a.top_k[row];
  const uint64_t seed = static_cast<uint64_t>(a.seed[row]), position = static_cast<uint64_t>(a.position[row]);

  // Cache the chunk as float32 (-0 made +0, so that equal values have equal keys).
  // kLoads vectors in flight per thread at a time. Without penalties (which change the cached
  // values), step 1's max, lowest-index argmax and flags are taken here too: each thread sees its
  // elements in ascending index order, so its first maximum is its lowest-index one.
  constexpr int kLoads = 8;
  const T* x = logits + row * vocab + begin;
  float chunk_max = -INFINITY;
  int chunk_arg = INT32_MAX, chunk_flags = 0;
  auto take = [&](float v, int i) {
    if (v != v) chunk_flags |= 1;
    if (v == INFINITY) chunk_flags |= 2;
    if (v > chunk_max) {
      chunk_max = v;
      chunk_arg = static_cast<int>(begin) + i;
    }
  };
  for (int base = tid * VEC; base < n; base += kThreads * VEC * kLoads) {
    Vec<T, VEC> v[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = base + u * kThreads * VEC;
      if (i < n) v[u] = load<T, VEC>(x + i);
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = base + u * kThreads * VEC;
      if (i < n) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float value = to_float(v[u].v[j]) + 0.f;
          cache[i + j] = value;
          if constexpr (!PENALTY) take(value, i + j);
        }
      }
    }
  }
  uint64_t* list = reinterpret_cast<uint64_t*>(cache + list_offset(a.chunk));  // kGather top-k candidates
  sh.hist[0][tid] = 0;  // kThreads == kBins
  sh.hist[1][tid] = 0;
  __syncthreads();
  if constexpr (PENALTY) {
    // Count this chunk's generated tokens in a hash table, then penalise each once.
    int* keys = reinterpret_cast<int*>(list + kGather);
    int* counts = keys + kPenaltySlots;
    for (int s = tid; s < kPenaltySlots; s += kThreads) {
      keys[s] = -1;
      counts[s] = 0;
    }
    __syncthreads();
    const int64_t* generated = a.penalty_tokens + row * a.penalty_len;
    for (int64_t l = tid; l < a.penalty_len; l += kThreads) {
      const int64_t token = generated[l];
      if (token < begin || token >= begin + n) continue;
      const int local = static_cast<int>(token - begin);
      uint32_t h = (static_cast<uint32_t>(local) * 2654435761u) & (kPenaltySlots - 1);
      while (true) {
        const int prev = atomicCAS(&keys[h], -1, local);
        if (prev == -1 || prev == local) break;
        h = (h + 1) & (kPenaltySlots - 1);
      }
      atomicAdd(&counts[h], 1);
    }
    __syncthreads();
    const float freq = a.frequency[row], pres = a.presence[row], rep = a.repetition[row];
    for (int s = tid; s < kPenaltySlots; s += kThreads) {
      if (keys[s] < 0) continue;
      float v = cache[keys[s]];
      v = v < 0.f ? v * rep : v / rep;
      v = v - static_cast<float>(counts[s]) * freq;
      cache[keys[s]] = (v - pres) + 0.f;
    }
    __syncthreads();
  }

  // Exchanges alternate between sh.slot[0] and sh.slot[1]: a block writes the one the previous
  // exchange did not use, which every block finished reading before that exchange's sync.
  int phase = 0;
  const Slot empty{0.0, 0.0, -INFINITY, INT32_MAX, 0};

  // 1. Max, lowest-index argmax, NaN / +inf (with penalties, over the penalised chunk).
  {
    if constexpr (PENALTY) {
      const Range r = range_of(n);
      for (int i = r.begin; i < r.end; ++i) take(cache[i], i);
    }
    __shared__ float wm[kWarps];
    __shared__ int wa[kWarps], wf[kWarps];
    Slot block = warp_keep_max(Slot{0.0, 0.0, chunk_max, chunk_arg, chunk_flags});
    if (lane == 0) {
      wm[warp] = block.value;
      wa[warp] = block.index;
      wf[warp] = block.flags;
    }
    __syncthreads();
    if (tid == 0) {
      for (int w = 1; w < kWarps; ++w) keep_max(block, wm[w], wa[w], wf[w]);
      sh.slot[phase] = block;
    }
  }
  cluster.sync();
  if (warp == 0) {
    const Slot v = warp_keep_max(remote_slot(cluster, sh, phase, empty));
    if (lane == 0) {
      sh.max = v.value;
      sh.argmax = v.index;
      sh.invalid = v.flags != 0 || v.value == -INFINITY;
    }
  }
  phase ^= 1;
  __syncthreads();
  const float row_max = sh.max;
  const bool greedy = t == 0.f;
  const float c = weight_scale(t);
  const bool invalid = sh.invalid;
  const bool k_on = k > 0 && k < vocab;
  const bool tiled = !greedy && !k_on && top_p >= 1.f && min_p <= 0.f;  // greedy: the weights give only the logprob
  if (tiled && !invalid) {  // each tile's reference and scale, a warp per tile
    for (int tl = warp; tl * kTile < n; tl += kWarps) {
      float m = -INFINITY;
      for (int i = tl * kTile + lane; i < min(n, (tl + 1) * kTile); i += 32) m = fmaxf(m, cache[i]);
      m = warp_fmax(m);
      if (lane == 0) {
        sh.tile_ref[tl] = tile_reference(m);
        sh.tile_scale[tl] = tile_scale(m, row_max, c);
      }
    }
    __syncthreads();
  }
  // Weights: tiled rows' (tile_weight.cuh), the others' (their passes instantiated apart, so
  // that the filtered rows' per-element work has no branch).
  auto w_tiled = [&](int i, float v) {
    const int tl = i >> kTileShift;
    return static_cast<double>(tile_weight(v, sh.tile_ref[tl], c)) * sh.tile_scale[tl];
  };
  auto w_of = [&](int, float v) { return static_cast<double>(exp2f((v - row_max) * c)); };
  // Exchange: this block's mass in sh.slot[phase]; after it, block r's in sh.block_mass[r] and
  // the row's total (and of mass2) returned to every thread.
  auto exchange_mass = [&](double mass, double mass2, double* total2) {
    if (tid == 0) {
      sh.slot[phase].mass = mass;
      sh.slot[phase].mass2 = mass2;
    }
    cluster.sync();
    if (warp == 0) {
      const Slot v = remote_slot(cluster, sh, phase, empty);
      const double m = lane < static_cast<int>(cluster.num_blocks()) ? v.mass : 0.0;
      const double m2 = lane < static_cast<int>(cluster.num_blocks()) ? v.mass2 : 0.0;
      const double total = warp_sum(m), total2_ = warp_sum(m2);
      if (lane < kMaxCluster) sh.block_mass[lane] = m;
      if (lane == 0) {
        sh.total = total;
        sh.top_k_mass = total2_;
      }
    }
    phase ^= 1;
    __syncthreads();
    if (total2) *total2 = sh.top_k_mass;
    return sh.total;
  };

  // 2. S = sum of w; the blocks' sums are the draw's masses when no filter applies. The top-k
  // bound's level counts are taken in the same pass and travel with this exchange.
  double mass = 0.0;
  if (!invalid && !greedy && k_on) {
    LevelCounts levels(row_max, c, -1);
    mass = block_mass(cache, n, sh, [&](int i, float v) {
      levels.take(v);
      return w_of(i, v);
    });
    levels.add_to(sh.hist[1]);
  } else if (!invalid) {
    mass = tiled ? block_mass(cache, n, sh, w_tiled) : block_mass(cache, n, sh, w_of);
  }
  const double row_sum = invalid ? 0.0 : exchange_mass(mass, 0.0, nullptr);
  bool done = invalid || greedy;

  // 3. Candidates: top-k, min-p. A top-k row whose bound's set fits the list (k at most
  // slice::kMaxKeys) is drawn by block 0 from its ranked top k (ranked_draw.cuh), with no further
  // pass over the row; the other rows keep the k-th key (and its ties' cut) for membership tests.
  uint32_t kth_key = 0;
  int tie_cut = n;  // chunk indices below this keep their ties at the k-th key
  if (!done && k_on) {
    int total = top_k_bound(cluster, k, row_max, c, -1, sh);
    if (total > kGather && total != INT32_MAX && k <= slice::kMaxKeys) {  // a list row, if the set shrinks enough
      total = refine_bound(cluster, cache, n, k, row_max, c, sh);
    }
    if (total <= kGather && k <= slice::kMaxKeys) {  // listed: block 0 finishes the row; the others leave
      TopK* top = reinterpret_cast<TopK*>(cache);  // block 0's, where its cached chunk was
      const bool alone = total <= slice::kDirectRank;
      if (alone) {
        gather_to_first(cluster, cache, n, begin, list, sh);
      } else {
        gather_list(cluster, cache, n, begin, total, list, sh);
        rank_into_first(list, total, static_cast<int>(k), top, sh);
      }
      if (rank != 0) return;
      draw_listed(list, total, static_cast<int>(k), alone, top, t, min_p, top_p, seed, position, row_max, row_sum,
                  a.tokens + row, a.logprobs + row);
      return;
    }
    tie_cut = top_k_cut(cluster, cache, n, begin, k, total, list, sh, &kth_key);
  }
  auto in_top_k = [&](int i, float v) {
    const uint32_t key = order_key(v);
    return !k_on || key > kth_key || (key == kth_key && i < tie_cut);
  };
  double top_k_mass = row_sum;
  if (!done && (k_on || min_p > 0.f)) {
    // One pass: the candidates' mass (whose thread parts the first draw's walk reads) and the top-k mass.
    const Pair mine = block_mass<Pair>(cache, n, sh, [&](int i, float v) {
      if (!in_top_k(i, v)) return Pair{0.0, 0.0};
      const double w = w_of(i, v);
      return Pair{w >= min_p ? w : 0.0, w};
    });
    double tk;
    exchange_mass(mine.a, mine.b, &tk);
    if (k_on && top_p < 1.f) top_k_mass = tk;
  }

  // 4-5. Draw; top-p by rejection over pivots.
  const double top_p_mass = static_cast<double>(top_p) * top_k_mass;
  int pivot = -1;  // row index of the last rejected token (-1: none)
  float pivot_value = INFINITY;
  auto weight = [&](int i, float v) {
    const int gi = static_cast<int>(begin) + i;
    const bool above_pivot = pivot < 0 || v > pivot_value || (v == pivot_value && gi < pivot);
    if (!above_pivot || !in_top_k(i, v)) return 0.0;
    const double w = w_of(i, v);
    return w >= min_p ? w : 0.0;
  };
  int token = sh.argmax;
  float token_value = row_max;
  bool accepted = done;
#pragma unroll 1
  for (int round = 0; round < kMaxRounds && !done; ++round) {
    if (warp == 0) {
      const double u = philox_uniform(seed, position, static_cast<uint32_t>(round));
      const double m = lane < kMaxCluster ? sh.block_mass[lane] : 0.0;
      const double target = u * warp_sum(m);
      choose_block(m, target, sh);
      if (lane == 0) sh.total = target - sh.total;  // the target within the chosen block
    }
    __syncthreads();
    if (static_cast<int>(rank) == sh.chosen_block) {
      const int i = tiled ? walk(cache, n, sh.total, sh, w_tiled) : walk(cache, n, sh.total, sh, weight);
      if (tid == 0) {
        sh.slot[phase].index = static_cast<int>(begin) + i;
        sh.slot[phase].value = cache[i];
      }
    }
    cluster.sync();
    if (tid == 0) {
      const Slot chosen = *cluster.map_shared_rank(&sh.slot[phase], sh.chosen_block);
      sh.chosen_index = chosen.index;
      sh.chosen_value = chosen.value;
    }
    phase ^= 1;
    __syncthreads();
    token = sh.chosen_index;
    token_value = sh.chosen_value;
    if (top_p >= 1.f) {
      accepted = true;
      break;
    }
    // The candidates' mass ranked above the drawn token (all that is ranked above a candidate
    // is a candidate): the test, and the next round's masses and thread parts.
    pivot = token;
    pivot_value = token_value;
    if (exchange_mass(block_mass(cache, n, sh, weight), 0.0, nullptr) < top_p_mass) {
      accepted = true;
      break;
    }
  }
  if (!accepted) {
    token = sh.argmax;
    token_value = row_max;
  }
  if (rank == 0 && tid == 0) {
    if (invalid) {
      a.tokens[row] = -1;
      a.logprobs[row] = NAN;
    } else {
      a.tokens[row] = token;
      const float t_eff = greedy ? 1.f : t;
      a.logprobs[row] = static_cast<float>((static_cast<double>(token_value) - row_max) / t_eff - log(row_sum));
    }
  }
  cluster.sync();  // no block leaves while another may read its shared memory
}

}  // namespace xllm::sampler
