// Step beam_search: one step of Hugging Face transformers' vectorised beam search (torch-free).
//
// Two kernels, no host synchronisation:
//   candidates_kernel  grid (splits, rows): each block reads one slice of one beam row once and
//                      keeps its C best logits (64-bit rank keys: value, then lower index) in a
//                      shared buffer behind a rising threshold, and the slice's max and
//                      sum of exp(x - max) (an online softmax);
//   update_kernel      grid (requests): merges its beams' slices into log-probabilities plus the
//                      beam scores, ranks the C best continuations (ties: lower beam * vocab +
//                      token first) and applies transformers' running-beam, finished-pool and
//                      early-stop rules to the state in place. It is launched as a programmatic
//                      dependent: its blocks start (and read the state) while candidates_kernel
//                      runs, then wait for it, so no launch gap lies between the two.
// The beams x vocab log-probabilities are never written: only C keys per slice.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "bulk_copy.cuh"
#include "dependent_launch.cuh"
#include "rank_key.cuh"
#include "vector_load.cuh"
#include "warp_reduce.cuh"

namespace xllm::beam {

constexpr int kThreads = 256;
constexpr int kCapacity = 4096;      // keys a block ranks at once (32 KiB)
constexpr int kMinSlice = 2048;      // the fewest elements of a slice worth a block
constexpr int kMaxCandidates = 128;  // C = max(2, 1 + EOS ids) * beams
constexpr int kMaxBeams = 32;
constexpr float kNeg = -1.0e9f;      // transformers' score of a dead beam or an empty slot
constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr float kInf = __builtin_huge_valf();

struct Workspace {
  uint64_t* keys;     // (rows, splits, C) each slice's C best raw-logit keys; 0 pads
  float2* partial;    // (rows, splits) (max, sum of exp(x - max)); NaN sum: a NaN logit
  int64_t* step;      // the step this launch pair advances (read before update_kernel moves it)
};

struct State {
  const int64_t* eos;  // (n_eos,)
  int n_eos;
  int64_t* steps;  // () steps taken
  float* running_scores;  // (B, W)
  int64_t* history_tokens;  // (B, W, N)
  int64_t* history_parents;  // (B, W, N)
  float* pool_scores;  // (B, W)
  bool* pool_finished;  // (B, W)
  int64_t* pool_step;  // (B, W)
  int64_t* pool_parent;  // (B, W)
  int64_t* pool_token;  // (B, W)
  bool* improvable;  // (B,)
  bool* all_hit;  // (B,)
  int beams, candidates;
  int64_t prompt_len, max_length;
  double length_penalty;
  int early_stopping;  // 0: False, 1: True, 2: "never"
};

struct Select {
  int hist[256];
  int digit, above;
  uint64_t floor;
  uint64_t seeds[kThreads];
};

// The k-th largest of keys[0, n) (1 <= k <= n, keys distinct): an MSB-first radix select, 8 bits a round.
__device__ uint64_t kth_largest(const uint64_t* keys, int n, int k, Select& s) {
  uint64_t prefix = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s.hist[i] = 0;
    __syncthreads();
    const uint64_t high = shift == 56 ? 0 : ~0ull << (shift + 8);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const uint64_t key = keys[i];
      if ((key & high) == prefix) atomicAdd(&s.hist[(key >> shift) & 255], 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // lane l owns digits 255 - 8l down to 248 - 8l
      const int lane = threadIdx.x;
      int own = 0;
      for (int j = 0; j < 8; ++j) own += s.hist[255 - 8 * lane - j];
      const int inclusive = warp_inclusive_scan(own, lane);
      int above = inclusive - own;
      if (above < k && k <= inclusive) {
        for (int j = 0; j < 8; ++j) {
          const int d = 255 - 8 * lane - j, c = s.hist[d];
          if (above + c >= k) {
            s.digit = d;
            s.above = above;
            break;
          }
          above += c;
        }
      }
    }
    __syncthreads();
    prefix |= static_cast<uint64_t>(s.digit) << shift;
    k -= s.above;
    __syncthreads();  // s is rewritten by the next round
  }
  return prefix;
}

// Append `key` where `take`, one shared atomic per warp; every lane of the warp calls it.
__device__ __forceinline__ void append(uint64_t* buffer, int* count, bool take, uint64_t key) {
  const unsigned mask = __ballot_sync(kFull, take);
  if (!mask) return;
  const int lane = threadIdx.x % 32;
  int base = 0;
  if (lane == __ffs(mask) - 1) base = atomicAdd(count, __popc(mask));
  base = __shfl_sync(kFull, base, __ffs(mask) - 1);
  if (take) buffer[base + __popc(mask & ((1u << lane) - 1))] = key;
}

// Keep the c largest of buffer[0, *count) (c < *count, *count read after a barrier); returns the c-th largest.
__device__ uint64_t keep_largest(uint64_t* buffer, int* count, int c, Select& s) {
  const int n = *count;
  const uint64_t kth = kth_largest(buffer, n, c, s);
  constexpr int kPer = kCapacity / kThreads;
  uint64_t mine[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = threadIdx.x + j * kThreads;
    mine[j] = i < n ? buffer[i] : 0;
  }
  __syncthreads();
  if (threadIdx.x == 0) *count = 0;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kPer; ++j) append(buffer, count, mine[j] >= kth && mine[j] != 0, mine[j]);
  __syncthreads();
  return kth;
}

constexpr int kRankSelect = 512;  // up to this many keys, rank each by counting (one pass) instead of a radix select

// out[r] = the r-th largest of keys[0, n) for r < c (keys distinct where not 0; zeros are not ranked).
__device__ __forceinline__ void rank_select(const uint64_t* keys, int n, int c, uint64_t* out) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const uint64_t key = keys[i];
    if (!key) continue;
    int r = 0;
    for (int j = 0; j < n; ++j) r += keys[j] > key;
    if (r < c) out[r] = key;
  }
}

// A key below the block's c best, from each thread's best key `mine`: the (c + 1)-th largest of
// the threads' bests (c of them are above it, so the c best are above it too; 0 when fewer than
// c + 1 threads have a key). Filtering by it leaves a few times c keys instead of all of them.
__device__ uint64_t seed_floor(uint64_t mine, int c, Select& s) {
  if (threadIdx.x == 0) s.floor = 0;
  s.seeds[threadIdx.x] = mine;
  __syncthreads();
  int r = 0;
  for (int k = 0; k < kThreads; ++k) r += s.seeds[k] > mine;
  if (r == c && mine) s.floor = mine;
  __syncthreads();
  const uint64_t floor = s.floor;
  __syncthreads();  // s is rewritten by the next call
  return floor;
}

constexpr int kDirectRank = 128;  // up to this many keys, rank them all at once (no seed filter)

// out[r] = the r-th largest of keys[0, *count) for r < c (*count read after a barrier, at most
// kCapacity; zeros are not keys): up to kDirectRank keys rank by counting at once; more are
// filtered by seed_floor first, then ranked by counting, or by a radix select when many remain.
// keys and *count are overwritten.
__device__ void select_top(uint64_t* keys, int* count, int c, uint64_t* out, Select& s) {
  constexpr int kPer = kCapacity / kThreads;
  const int n = *count;
  if (n <= kDirectRank) {
    rank_select(keys, n, c, out);
    __syncthreads();
    return;
  }
  uint64_t mine[kPer], best = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = threadIdx.x + j * kThreads;
    mine[j] = i < n ? keys[i] : 0;
    best = max(best, mine[j]);
  }
  const uint64_t floor = seed_floor(best, c, s);
  if (threadIdx.x == 0) *count = 0;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kPer; ++j) append(keys, count, mine[j] > floor, mine[j]);
  __syncthreads();
  if (*count <= kRankSelect) {
    rank_select(keys, *count, c, out);
  } else {
    keep_largest(keys, count, c, s);
    rank_select(keys, c, c, out);
  }
  __syncthreads();
}

// Online softmax: fold (m2, s2) into (m, s), where s is a sum of exp(x - m).
__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {
  if (m2 > m) {
    s = s * expf(m - m2) + s2;
    m = m2;
  } else if (m2 != -kInf) {
    s += s2 * expf(m2 - m);
  } else {
    s += s2;  // keeps a NaN
  }
}

// --- each warp's candidates while it streams (no block barrier in the streaming loop) ---

// Append `key` where `take` to a warp's buffer of n keys (n is the same in every lane); every lane calls it.
__device__ __forceinline__ void warp_append(uint64_t* buffer, int& n, bool take, uint64_t key) {
  const unsigned mask = __ballot_sync(kFull, take);
  if (take) buffer[n + __popc(mask & ((1u << (threadIdx.x % 32)) - 1))] = key;
  n += __popc(mask);
}

// The key of rank `rank` (0: the largest) among the warp's 32 lanes' keys `mine` (distinct where
// not 0); 0 when that rank falls on a lane without a key.
__device__ __forceinline__ uint64_t warp_pick(uint64_t mine, int rank) {
  int r = 0;
#pragma unroll 8
  for (int l = 0; l < 32; ++l) r += __shfl_sync(kFull, mine, l) > mine;
  const unsigned at = __ballot_sync(kFull, r == rank && mine != 0);
  return at ? __shfl_sync(kFull, mine, __ffs(at) - 1) : 0;
}

// The k-th largest of the warp's keys (lane l holds mine[], 0 for none; 1 <= k <= their number),
// found bit by bit from the top: the largest probe that k keys reach.
template <int N>
__device__ uint64_t warp_kth_largest(const uint64_t (&mine)[N], int k) {
  uint64_t kth = 0;
  for (int bit = 63; bit >= 0; --bit) {
    const uint64_t probe = kth | (uint64_t{1} << bit);
    int n = 0;
#pragma unroll
    for (int j = 0; j < N; ++j) n += mine[j] >= probe;
    if (static_cast<int>(__reduce_add_sync(kFull, static_cast<unsigned>(n))) >= k) kth = probe;
  }
  return kth;
}

constexpr int kWarps = kThreads / 32;
constexpr int kWarpKeys = 256;    // each warp's key buffer
constexpr int kStages = 4;        // bulk copies in flight per warp
constexpr int kStageBytes = 2048; // one warp tile
constexpr int kStreamBytes = kWarps * kStages * kStageBytes;  // candidates_kernel's dynamic shared memory

struct WarpBuffer {
  int n;              // keys buffered
  int mark;           // the count above which the buffer is compacted
  uint64_t floor_key; // keys at or below it cannot be among the warp's c best
  float floor_value;  // its value (-inf while there is no floor)
};

// Shrink a warp's buffer of b.n keys (b.n > 2c) to fewer keys that still hold its c best; raise its
// floor and mark. c < 32: keep the keys at or above the c-th largest of the lanes' bests (cheap, at
// least c keys); when that leaves too many, or c >= 32, keep exactly the c largest.
__device__ __noinline__ WarpBuffer compact(uint64_t* buffer, WarpBuffer b, int c) {
  int& n = b.n;
  constexpr int kPer = kWarpKeys / 32;
  const int lane = threadIdx.x % 32;
  uint64_t mine[kPer], best = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int slot = lane + 32 * j;
    mine[j] = slot < n ? buffer[slot] : 0;
    best = max(best, mine[j]);
  }
  uint64_t keep = 0;
  int kept = kWarpKeys;
  if (c < 32) {
    keep = warp_pick(best, c - 1);
    int mine_kept = 0;
#pragma unroll
    for (int j = 0; j < kPer; ++j) mine_kept += mine[j] >= keep;
    kept = static_cast<int>(__reduce_add_sync(kFull, static_cast<unsigned>(mine_kept)));
  }
  if (kept > kWarpKeys / 2) keep = warp_kth_largest(mine, c);
  __syncwarp();
  n = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) warp_append(buffer, n, mine[j] >= keep, mine[j]);
  __syncwarp();
  b.floor_key = keep - 1;  // keep is itself a kept key; every later key above it is taken
  b.floor_value = rank_value(keep);
  b.mark = min(kWarpKeys - 32, n + c + 16);
  return b;
}

constexpr float kLog2e = 1.4426950408889634f;

// 2^x by the special-function unit (ex2.approx.ftz: within 2^-22 relatively; results below 2^-126 flush to 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// One tile into the warp's online softmax (m, s: s a sum of exp(x - m)) and its buffer: this lane's
// vectors v[g] hold the tile's elements (g * 32 + lane) * VEC + j, of which the first `len` are the
// slice's (FULL: all of them), tile element 0 being row element `first`. The tile's max moves m
// once, then its G x VEC terms are independent (the loop is bound by instruction latency, so the
// work is laid out for parallelism within each lane).
// Each term is 2^(x log2 e - m log2 e) by one fma and ex2.approx: within 2^-22 plus the rounding of
// m log2 e (|m| 2^-24, common to the warp's terms) and of the fma (2^-24 of the exponent), so for
// logits |x| <= 100 the sum is within 1e-6 relatively and the log-softmax within 1e-6 absolutely.
template <bool FULL, typename T, int VEC, int G>
__device__ __forceinline__ void scan_tile(const Vec<T, VEC> (&v)[G], int len, int64_t first, float& m, float& s,
                                          WarpBuffer& b, uint64_t* buffer, int c) {
  const int lane = threadIdx.x % 32;
  float x[G][VEC], group_max[G];
  float tile_max = -kInf;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    group_max[g] = -kInf;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      x[g][j] = FULL || (g * 32 + lane) * VEC + j < len ? to_float(v[g].v[j]) : -kInf;
      group_max[g] = fmaxf(group_max[g], x[g][j]);  // NaN is ignored here and caught by the sum
    }
    tile_max = fmaxf(tile_max, group_max[g]);
  }
  if (tile_max > m) {
    s *= expf(m - tile_max);
    m = tile_max;
  }
  if (m != -kInf) {
    const float shift = m * kLog2e;
    float part[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      part[g] = 0.f;
#pragma unroll
      for (int j = 0; j < VEC; ++j) part[g] += fast_exp2(fmaf(x[g][j], kLog2e, -shift));  // NaN stays NaN
    }
#pragma unroll
    for (int g = 0; g < G; ++g) s += part[g];
  } else {
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (x[g][j] != x[g][j]) s = x[g][j];  // a NaN marks the row (it then has no continuation)
  }
  // Elements of a group come after the floor's (in index order) when it lies in an earlier
  // group: then a value equal to the floor's ranks below it.
  bool maybe[G], any = false;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const bool strict = b.floor_key && rank_index(b.floor_key) < first + g * 32 * VEC;
    maybe[g] = strict ? group_max[g] > b.floor_value : !(group_max[g] < b.floor_value);
    any |= maybe[g];
  }
  if (!__any_sync(kFull, any)) return;  // once the floor has risen, most tiles stop here
  // Each lane's elements at or above the floor's value, as bits g * VEC + j; the warp appends one
  // of each lane's per round (usually one round, not one per element), the key deciding exactly.
  static_assert(G * VEC <= 32, "a tile's elements per lane fit a 32-bit mask");
  unsigned pending = 0;
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const bool inside = FULL || (g * 32 + lane) * VEC + j < len;
      pending |= static_cast<unsigned>(maybe[g] && inside && !(x[g][j] < b.floor_value)) << (g * VEC + j);
    }
  }
  while (__any_sync(kFull, pending)) {
    const int i = __ffs(pending) - 1;  // -1: this lane has none left
    pending &= pending - 1;
    float value = -kInf;
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int j = 0; j < VEC; ++j) value = i == g * VEC + j ? x[g][j] : value;  // no local-memory indexing
    if (b.n > b.mark) b = compact(buffer, b, c);
    value += 0.f;  // -0 ranks as +0
    const uint64_t key = rank_key(value == value ? value : -kInf, first + (i / VEC * 32 + lane) * VEC + i % VEC);
    warp_append(buffer, b.n, i >= 0 && key > b.floor_key, key);
  }
}

// Grid (slices, beam rows), kThreads threads, kStreamBytes of dynamic shared memory. Each warp
// streams tiles warp, warp + kWarps, ... of its block's slice through kStages shared-memory
// stages (BULK: bulk copies, rows 16-byte aligned and a whole number of 16-byte vectors;
// otherwise the lanes copy element by element), keeps its online-softmax partial and the keys
// above a rising floor in its own buffer; at the end the block ranks the warps' keys into the
// slice's c best.
template <typename T, bool BULK>
__global__ void __launch_bounds__(kThreads, 2) candidates_kernel(const T* __restrict__ logits, int64_t vocab,
                                                                  int64_t chunk, int c, Workspace ws, const int64_t* steps) {
  constexpr int VEC = 16 / sizeof(T), kTileElems = kStageBytes / sizeof(T), kGroups = kTileElems / (32 * VEC);
  extern __shared__ __align__(16) unsigned char stream_memory[];
  __shared__ uint64_t keys[kWarps * kWarpKeys];
  __shared__ uint64_t arrived[kWarps * kStages];
  __shared__ Select sel;
  __shared__ int count;
  __shared__ float2 warp_partial[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = blockIdx.y, split = blockIdx.x, splits = gridDim.x;
  const int64_t begin = split * chunk, end = min(begin + chunk, vocab);
  const int64_t tiles = (end - begin + kTileElems - 1) / kTileElems;
  const T* x = logits + row * vocab;
  T* stage = reinterpret_cast<T*>(stream_memory) + warp * kStages * kTileElems;
  uint64_t* bar = arrived + warp * kStages;
  auto fetch = [&](int64_t tile, int slot) {
    const int64_t first = begin + tile * kTileElems;
    const auto bytes = static_cast<uint32_t>(min(static_cast<int64_t>(kTileElems), end - first) * sizeof(T));
    bulk_load(stage + slot * kTileElems, x + first, bytes, &bar[slot]);
  };
  xllm::launch_dependents();  // update_kernel's blocks may take free room now; they wait for this grid
  if (threadIdx.x == 0) {
    count = 0;
    if (row == 0 && split == 0) *ws.step = *steps;
  }
  if constexpr (BULK) {
    if (lane == 0) {
      for (int slot = 0; slot < kStages; ++slot) init_barrier(&bar[slot]);
      fence_barrier_init();
      for (int slot = 0; slot < kStages && warp + slot * kWarps < tiles; ++slot) fetch(warp + slot * kWarps, slot);
    }
    __syncwarp();
  }
  float m = -kInf, s = 0.f;
  WarpBuffer b{0, min(kWarpKeys - 32, 2 * c + 16), 0, -kInf};
  uint64_t* buffer = keys + warp * kWarpKeys;
  for (int64_t k = 0, tile = warp; tile < tiles; ++k, tile += kWarps) {
    const int slot = static_cast<int>(k % kStages);
    T* data = stage + slot * kTileElems;
    const int64_t first = begin + tile * kTileElems;
    const int len = static_cast<int>(min(static_cast<int64_t>(kTileElems), end - first));
    if constexpr (BULK) {
      wait_barrier(&bar[slot], static_cast<uint32_t>(k / kStages) & 1);
    } else {
      __syncwarp();
      for (int i = lane; i < len; i += 32) data[i] = x[first + i];
      __syncwarp();
    }
    Vec<T, VEC> v[kGroups];
#pragma unroll
    for (int g = 0; g < kGroups; ++g) v[g] = *reinterpret_cast<const Vec<T, VEC>*>(data + (g * 32 + lane) * VEC);
    if constexpr (BULK) {
      __syncwarp();  // the stage is read: refill it with the warp's tile kStages ahead
      if (lane == 0 && tile + kStages * kWarps < tiles) {
        fence_proxy_async();
        fetch(tile + kStages * kWarps, slot);
      }
    }
    if (k == 0 && c < 32) {  // the first tile seeds the floor: the (c + 1)-th of the lanes' bests
      uint64_t best = 0;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const int e = (g * 32 + lane) * VEC + j;
          const float value = to_float(v[g].v[j]) + 0.f;
          if (e < len) best = max(best, rank_key(value == value ? value : -kInf, first + e));
        }
      }
      b.floor_key = warp_pick(best, c);
      b.floor_value = b.floor_key ? rank_value(b.floor_key) : -kInf;
    }
    if (len == kTileElems) {
      scan_tile<true>(v, len, first, m, s, b, buffer, c);
    } else {
      scan_tile<false>(v, len, first, m, s, b, buffer, c);
    }
  }
  // the slice's softmax partial
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(kFull, m, off), s2 = __shfl_xor_sync(kFull, s, off);
    combine(m, s, m2, s2);
  }
  if (lane == 0) warp_partial[warp] = make_float2(m, s);
  // the warps' keys (each warp's cut by the lanes' bests first, when c < 32) into one list, then its c best
  if (c < 32 && b.n > 2 * c) b = compact(buffer, b, c);
  constexpr int kPer = kWarpKeys / 32;
  uint64_t mine[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) mine[j] = lane + 32 * j < b.n ? buffer[lane + 32 * j] : 0;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kPer; ++j) append(keys, &count, mine[j] != 0, mine[j]);
  __syncthreads();
  uint64_t* out = ws.keys + (row * splits + split) * c;
  for (int i = count + threadIdx.x; i < c; i += kThreads) out[i] = 0;  // a slice of fewer than c elements
  select_top(keys, &count, c, out, sel);
  if (threadIdx.x == 0) {
    float bm = -kInf, bs = 0.f;
    for (int w = 0; w < kWarps; ++w) combine(bm, bs, warp_partial[w].x, warp_partial[w].y);
    ws.partial[row * splits + split] = make_float2(bm, bs);
  }
}

struct Candidate {
  float score;    // cumulative log-probability
  float running;  // score, -1e9 lower where the continuation hit
  int64_t token;
  int beam;
  bool hit;
};

struct PoolEntry {
  float score;
  bool finished;
  int64_t step, parent, token;
};

// Rank of entry i among n by (value descending, position ascending).
template <typename F>
__device__ __forceinline__ int rank_of(int i, int n, F value) {
  const float v = value(i);
  int r = 0;
  for (int j = 0; j < n; ++j) {
    const float u = value(j);
    r += u > v || (u == v && j < i);
  }
  return r;
}

__global__ void __launch_bounds__(kThreads) update_kernel(int64_t vocab, int splits, Workspace ws, State st) {
  __shared__ uint64_t keys[kCapacity];
  __shared__ Select sel;
  __shared__ int count;
  __shared__ float beam_max[kMaxBeams], beam_log_sum[kMaxBeams], beam_score[kMaxBeams];
  __shared__ uint64_t ranked[kMaxCandidates];
  __shared__ Candidate cand[kMaxCandidates];
  __shared__ PoolEntry merged[kMaxBeams + kMaxCandidates];
  __shared__ bool pool_full, improvable;
  __shared__ float divisor[2];  // (generated length) ** length_penalty: this step's, the early-stop heuristic's
  const int b = blockIdx.x, W = st.beams, C = st.candidates;
  // 0. the state before this step (not written by candidates_kernel: read while it may still run)
  if (threadIdx.x < W) {
    const int64_t slot = static_cast<int64_t>(b) * W + threadIdx.x;
    merged[threadIdx.x] = {st.pool_scores[slot], st.pool_finished[slot], st.pool_step[slot], st.pool_parent[slot],
                           st.pool_token[slot]};
    beam_score[threadIdx.x] = st.running_scores[slot];
  }
  if (threadIdx.x == 0) improvable = st.improvable[b];
  xllm::wait_for_prerequisite();
  // 1. the slices' raw keys (loaded alongside the step), each beam's log-softmax shift (NaN: a NaN
  // logit or only -inf, no continuation) and the length penalties' divisors, all at once
  const int64_t step = *ws.step, n_new = st.max_length - st.prompt_len;
  const int per_beam = splits * C, n = W * per_beam;
  for (int i = threadIdx.x; i < n; i += kThreads) keys[i] = ws.keys[static_cast<int64_t>(b) * n + i];
  if (step >= n_new) return;  // at max_length already: nothing to advance
  const int64_t cur_len = st.prompt_len + step;
  const int lane = threadIdx.x % 32;
  if (threadIdx.x == kThreads - 1) {  // this step's hypotheses: the generated length including the EOS
    divisor[0] = static_cast<float>(pow(static_cast<double>(cur_len + 1 - st.prompt_len), st.length_penalty));
  } else if (threadIdx.x == kThreads - 33) {  // the early-stop heuristic's best possible length (another warp)
    const bool never = st.early_stopping == 2 && st.length_penalty > 0.0;
    const int64_t best_length = (never ? st.max_length : cur_len + 1) - st.prompt_len;
    divisor[1] = static_cast<float>(pow(static_cast<double>(best_length), st.length_penalty));
  }
  for (int beam = threadIdx.x / 32; beam < W; beam += kThreads / 32) {  // a warp per beam: its slices' partials
    const int64_t row = static_cast<int64_t>(b) * W + beam;
    float m = -kInf, s = 0.f;
    for (int i = lane; i < splits; i += 32) combine(m, s, ws.partial[row * splits + i].x, ws.partial[row * splits + i].y);
    for (int off = 16; off > 0; off >>= 1) {
      const float m2 = __shfl_xor_sync(kFull, m, off), s2 = __shfl_xor_sync(kFull, s, off);
      combine(m, s, m2, s2);
    }
    if (lane == 0) {
      const bool dead = m == -kInf || s != s;
      beam_max[beam] = dead ? __int_as_float(0x7fc00000) : m;
      beam_log_sum[beam] = logf(s);
    }
  }
  if (threadIdx.x == 0) count = n;
  __syncthreads();
  if (threadIdx.x == 0) {
    bool full = true;
    for (int w = 0; w < W; ++w) full &= merged[w].finished;
    pool_full = full && st.early_stopping == 1;
  }
  // 2. every slice's keys rescored as cumulative log-probabilities: ((x - max) - log(sum)) + score
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const int beam = i / per_beam;
    const uint64_t raw = keys[i];
    const float m = beam_max[beam];
    const float score = m == m ? ((rank_value(raw) - m) - beam_log_sum[beam]) + beam_score[beam] : -kInf;
    keys[i] = raw ? rank_key(score, beam * vocab + rank_index(raw)) : 0;
  }
  __syncthreads();
  // 3. the C best, ranked
  select_top(keys, &count, C, ranked, sel);
  if (threadIdx.x < C) {
    const uint64_t key = ranked[threadIdx.x];
    const int64_t flat = rank_index(key);
    const int64_t token = flat % vocab;
    bool hit = cur_len + 1 >= st.max_length;
    for (int e = 0; e < st.n_eos; ++e) hit |= token == st.eos[e];
    const float score = rank_value(key);
    cand[threadIdx.x] = {score, score + (hit ? 1.f : 0.f) * kNeg, token, static_cast<int>(flat / vocab), hit};
  }
  __syncthreads();
  // 4. running beams: the W best continuations, hits 1e9 lower (ties: by rank)
  const int64_t n_hist = n_new;
  if (threadIdx.x < C) {
    const int c = threadIdx.x;
    const int r = rank_of(c, C, [&](int j) { return cand[j].running; });
    if (r < W) {
      const int64_t slot = static_cast<int64_t>(b) * W + r;
      st.running_scores[slot] = cand[c].running;
      st.history_tokens[slot * n_hist + step] = cand[c].token;
      st.history_parents[slot * n_hist + step] = cand[c].beam;
    }
    // 5. the finished pool's candidate: hits ranked inside the top W, unless the request is done
    const bool just = cand[c].hit && c < W;
    float s = cand[c].score / divisor[0];
    s += (pool_full ? 1.f : 0.f) * kNeg;
    s += (improvable ? 0.f : 1.f) * kNeg;
    s += (just ? 0.f : 1.f) * kNeg;
    merged[W + c] = {s, just, step, cand[c].beam, cand[c].token};
  }
  __syncthreads();
  PoolEntry kept;
  int kept_rank = W;
  if (threadIdx.x < W + C) {
    kept_rank = rank_of(threadIdx.x, W + C, [&](int j) { return merged[j].score; });
    kept = merged[threadIdx.x];
  }
  __syncthreads();
  if (kept_rank < W) merged[kept_rank] = kept;
  __syncthreads();
  if (threadIdx.x < W) {
    const int64_t slot = static_cast<int64_t>(b) * W + threadIdx.x;
    const PoolEntry& e = merged[threadIdx.x];
    st.pool_scores[slot] = e.score;
    st.pool_finished[slot] = e.finished;
    st.pool_step[slot] = e.step;
    st.pool_parent[slot] = e.parent;
    st.pool_token[slot] = e.token;
  }
  // 6. the early-stop heuristic at the new length, and whether every continuation hit
  if (threadIdx.x == 0) {
    float best_running = cand[0].running;
    for (int c = 1; c < C; ++c) best_running = fmaxf(best_running, cand[c].running);
    // the new running beam 0 is the best running value (first by rank on ties)
    const float best = best_running / divisor[1];
    float worst = kInf;
    for (int w = 0; w < W; ++w) worst = fminf(worst, merged[w].score);
    bool any = false, all_hit = true;
    for (int w = 0; w < W; ++w) any |= best > (merged[w].finished ? worst : kNeg);
    for (int c = 0; c < C; ++c) all_hit &= cand[c].hit;
    st.improvable[b] = improvable && any;
    st.all_hit[b] = all_hit;
    if (b == 0) *st.steps = step + 1;
  }
}

}  // namespace xllm::beam
