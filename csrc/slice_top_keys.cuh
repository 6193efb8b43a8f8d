// The c best rank keys of a slice of a row and its online softmax, in one read (torch-free device
// code shared by the beam-search step and the top-k sampler).
//
// slice_top_keys: a block of kThreads threads streams x[begin, end) once, tile by tile per warp
// (where the row allows: 16-bit logits by bulk copies into shared-memory stages, float32 in
// registers a few tiles ahead). Each lane keeps an online softmax partial (max m, sum of
// 2^((x - m) scale)); each warp keeps the keys (rank_key.cuh: value, then lower index) above a
// rising floor in its own buffer, so that once the floor has risen most tiles cost one comparison
// of their max. The warps share their floors: a warp's floor has c of its keys above it, so it
// bounds the block's c best too, and each warp takes the highest one published (one shared load
// a tile). At the end the block ranks the warps' keys into the slice's c best. select_top and its
// helpers rank a few thousand keys in shared memory (the merge of several slices' keys);
// merge_sorted_top merges the slices' sorted lists.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "bulk_copy.cuh"
#include "rank_key.cuh"
#include "vector_load.cuh"
#include "warp_reduce.cuh"

namespace xllm::slice {

constexpr int kThreads = 256;
constexpr int kCapacity = 4096;      // keys a block ranks at once (32 KiB)
constexpr int kMinSlice = 2048;      // the fewest elements of a slice worth a block
constexpr int kMaxKeys = 128;        // c: the most keys a slice keeps
constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr float kInf = __builtin_huge_valf();

struct Select {
  int hist[256];
  int digit, above;
  uint64_t floor;
  uint64_t seeds[kThreads];
};

// The k-th largest of keys[0, n) (1 <= k <= n, keys distinct): an MSB-first radix select, 8 bits a round.
__device__ inline uint64_t kth_largest(const uint64_t* keys, int n, int k, Select& s) {
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
__device__ inline uint64_t keep_largest(uint64_t* buffer, int* count, int c, Select& s) {
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

// How many of a[0, n) are above key. kUnroll > 0 unrolls the loop that many times (its shared
// loads are independent, so it is bound by their latency): measured faster in the beam step's
// update, slower in the sampler's top-k kernels at large batch; 0 leaves the loop to the compiler.
template <int kUnroll>
__device__ __forceinline__ int count_above(const uint64_t* a, int n, uint64_t key) {
  int r = 0;
  if constexpr (kUnroll > 0) {
#pragma unroll kUnroll
    for (int j = 0; j < n; ++j) r += a[j] > key;
  } else {
    for (int j = 0; j < n; ++j) r += a[j] > key;
  }
  return r;
}

// out[r] = the r-th largest of keys[0, n) for r < c (keys distinct where not 0; zeros are not ranked).
template <bool kUnrolled>
__device__ __forceinline__ void rank_select(const uint64_t* keys, int n, int c, uint64_t* out) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const uint64_t key = keys[i];
    if (!key) continue;
    const int r = count_above<kUnrolled ? 8 : 0>(keys, n, key);
    if (r < c) out[r] = key;
  }
}

// A key below the block's c best, from each thread's best key `mine`: the (c + 1)-th largest of
// the threads' bests (c of them are above it, so the c best are above it too; 0 when fewer than
// c + 1 threads have a key). Filtering by it leaves a few times c keys instead of all of them.
template <bool kUnrolled>
__device__ inline uint64_t seed_floor(uint64_t mine, int c, Select& s) {
  if (threadIdx.x == 0) s.floor = 0;
  s.seeds[threadIdx.x] = mine;
  __syncthreads();
  const int r = count_above<kUnrolled ? 16 : 0>(s.seeds, kThreads, mine);
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
// keys and *count are overwritten. kUnrolled: the ranking loops unrolled (count_above).
template <bool kUnrolled>
__device__ inline void select_top(uint64_t* keys, int* count, int c, uint64_t* out, Select& s) {
  constexpr int kPer = kCapacity / kThreads;
  const int n = *count;
  if (n <= kDirectRank) {
    rank_select<kUnrolled>(keys, n, c, out);
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
  const uint64_t floor = seed_floor<kUnrolled>(best, c, s);
  if (threadIdx.x == 0) *count = 0;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kPer; ++j) append(keys, count, mine[j] > floor, mine[j]);
  __syncthreads();
  if (*count <= kRankSelect) {
    rank_select<kUnrolled>(keys, *count, c, out);
  } else {
    keep_largest(keys, count, c, s);
    rank_select<kUnrolled>(keys, c, c, out);
  }
  __syncthreads();
}

// out[r] = the r-th largest of keys[0, lists * len) for r < c, where each list keys[l * len,
// (l + 1) * len) is sorted descending with 0 padding its tail (slice_top_keys' outputs; keys
// distinct where not 0, at least c of them): a key's rank is its place in its own list plus, in
// each other list, the number of keys above it (a binary search), so there is no selection pass.
// Ends with a barrier.
__device__ inline void merge_sorted_top(const uint64_t* keys, int lists, int len, int c, uint64_t* out) {
  const int n = lists * len;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const uint64_t key = keys[i];
    const int own = i / len;
    int rank = i - own * len;
    for (int l = 0; l < lists && rank < c; ++l) {
      if (l == own) continue;
      const uint64_t* list = keys + l * len;
      int lo = 0, hi = len;  // the first place whose key is below `key` (0 is below every key)
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (list[mid] > key) {
          lo = mid + 1;
        } else {
          hi = mid;
        }
      }
      rank += lo;
    }
    if (key && rank < c) out[rank] = key;
  }
  __syncthreads();
}

// 2^(d scale) (d <= 0) for a sum in Acc: exp2f for float; for double, exp2 in double, so that
// moving a double sum to a new max costs it no float32 rounding.
__device__ __forceinline__ float rescale(float d, float scale, float) { return exp2f(d * scale); }
__device__ __forceinline__ double rescale(float d, float scale, double) {
  return exp2(static_cast<double>(d) * scale);
}

// Online softmax: fold (m2, s2) into (m, s), where s is a sum of 2^((x - m) scale) (scale = log2 e:
// of exp(x - m)) in Acc (float or double).
template <typename Acc>
__device__ __forceinline__ void combine(float& m, Acc& s, float m2, Acc s2, float scale) {
  if (m2 > m) {
    s = s * rescale(m - m2, scale, Acc{}) + s2;
    m = m2;
  } else if (m2 != -kInf) {
    s += s2 * rescale(m2 - m, scale, Acc{});
  } else {
    s += s2;  // keeps a NaN
  }
}

// combine over the warp's lanes, the result in every lane.
template <typename Acc>
__device__ __forceinline__ void warp_combine(float& m, Acc& s, float scale) {
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(kFull, m, off);
    const Acc s2 = __shfl_xor_sync(kFull, s, off);
    combine(m, s, m2, s2, scale);
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

// The warp's largest (Max) or smallest nonzero key (not Max; ~0 when none) of mine[], in every lane.
template <bool Max, int N>
__device__ __forceinline__ uint64_t warp_extreme(const uint64_t (&mine)[N]) {
  uint64_t e = Max ? 0 : ~0ull;
#pragma unroll
  for (int j = 0; j < N; ++j) e = Max ? max(e, mine[j]) : (mine[j] ? min(e, mine[j]) : e);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const uint64_t o = __shfl_xor_sync(kFull, e, off);
    e = Max ? max(e, o) : min(e, o);
  }
  return e;
}

// The k-th largest of the warp's keys (lane l holds mine[], 0 for none; 1 <= k <= their number),
// found bit by bit from the top: the largest probe that k keys reach. The bits above the highest
// one in which the largest and smallest keys differ are every key's, so the probes start below
// them; they stop once exactly k keys reach the probe, the k-th being the least of those. (From
// bit 63 to bit 0 every time, this loop took ~40 % of the top-k sampler's candidates kernel at
// B = 64, V = 151936, k = 50 on an H200, by ncu's warp samples.)
template <int N>
__device__ uint64_t warp_kth_largest(const uint64_t (&mine)[N], int k) {
  const uint64_t hi = warp_extreme<true>(mine), lo = warp_extreme<false>(mine);
  if (hi <= lo) return hi;  // at most one key
  const int top = 63 - __clzll(static_cast<long long>(hi ^ lo));
  uint64_t kth = hi & ~((uint64_t{2} << top) - 1);  // the shared high bits (none when top = 63: 2 << 63 is 0)
  for (int bit = top; bit >= 0; --bit) {
    const uint64_t probe = kth | (uint64_t{1} << bit);
    int n = 0;
#pragma unroll
    for (int j = 0; j < N; ++j) n += mine[j] >= probe;
    const int reach = static_cast<int>(__reduce_add_sync(kFull, static_cast<unsigned>(n)));
    if (reach >= k) {
      kth = probe;
      if (reach == k) break;
    }
  }
  uint64_t least[1] = {~0ull};  // the least key at or above kth: the k-th largest itself
#pragma unroll
  for (int j = 0; j < N; ++j) least[0] = mine[j] >= kth ? min(least[0], mine[j]) : least[0];
  return warp_extreme<false>(least);
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
// floor (never lowered: it may be the block's, adopted) and mark, and raise the block's floor
// `shared` to it. c < 32: keep the keys at or above the c-th largest of the lanes' bests (cheap, at
// least c keys); when that leaves too many, or c >= 32, keep exactly the c largest.
__device__ inline __noinline__ WarpBuffer compact(uint64_t* buffer, WarpBuffer b, int c, unsigned long long* shared) {
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
  if (keep - 1 > b.floor_key) {  // keep is itself a kept key; every later key above it is taken
    b.floor_key = keep - 1;
    b.floor_value = rank_value(keep);
    if (lane == 0) atomicMax(shared, b.floor_key);
  }
  // c >= 32 (warp_kth_largest): compacted only when full, which beat compacting at n + c + 16
  // keys (H200, B = 64 / 256, V = 151936, top-k 50: bf16 74.7 -> 69.8 and 103.8 -> 95.6 us;
  // float32 within 3 us either way); c < 32 (the beam step's 2W): early, raising the floor sooner.
  b.mark = c >= 32 ? kWarpKeys - 32 : min(kWarpKeys - 32, n + c + 16);
  return b;
}

constexpr float kLog2e = 1.4426950408889634f;

// 2^x by the special-function unit (ex2.approx.ftz: within 2^-22 relatively; results below 2^-126 flush to 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// One tile into the lane's online softmax (m, s: s a sum of 2^((x - m) scale), scale > 0) and the warp's buffer: this lane's
// vectors v[g] hold the tile's elements (g * 32 + lane) * VEC + j, of which the first `len` are the
// slice's (FULL: all of them), tile element 0 being row element `first`. The tile's max moves m
// once, then its G x VEC terms are independent (the loop is bound by instruction latency, so the
// work is laid out for parallelism within each lane).
// Each term is 2^e by ex2.approx (within 2^-22 relatively). Acc float (the beam step): e = x scale
// - m scale by one fma, whose roundings of m scale (common to the lane's terms) and of e add
// |m scale| 2^-24 ln 2 relatively: within 1e-6 for |m scale| <= 24. Acc double (the sampler's
// logprobs): e = (x - m) scale, rounded within |e| 2^-24, so the terms that carry the sum (e near
// 0) are within 2^-22 whatever m. A tile's G x VEC terms are summed per group in float32 first.
template <bool FULL, typename T, int VEC, int G, typename Acc>
__device__ __forceinline__ void scan_tile(const Vec<T, VEC> (&v)[G], int len, int64_t first, float scale, float& m,
                                          Acc& s, WarpBuffer& b, uint64_t* buffer, int c, unsigned long long* shared) {
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
    s *= rescale(m - tile_max, scale, Acc{});
    m = tile_max;
  }
  if (m != -kInf) {
    const float shift = m * scale;
    float part[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      part[g] = 0.f;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {  // NaN stays NaN
        part[g] += fast_exp2(sizeof(Acc) == sizeof(double) ? (x[g][j] - m) * scale : fmaf(x[g][j], scale, -shift));
      }
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
    if (b.n > b.mark) b = compact(buffer, b, c, shared);
    value += 0.f;  // -0 ranks as +0
    const uint64_t key = rank_key(value == value ? value : -kInf, first + (i / VEC * 32 + lane) * VEC + i % VEC);
    warp_append(buffer, b.n, i >= 0 && key > b.floor_key, key);
  }
}


// A slice's online softmax: its max and its sum of 2^((x - max) scale) (NaN: a NaN or +inf logit).
template <typename Acc>
struct Partial {
  float max;
  Acc sum;
};

// The block's c best keys of x[begin, end) into out[0, c) (descending; 0 pads a slice of fewer
// than c elements) and, returned in thread 0, the slice's Partial with sums in Acc. Needs
// kStreamBytes of dynamic shared memory; every thread of the block calls it. BULK: x + begin
// 16-byte aligned and the slice a whole number of 16-byte vectors, streamed by bulk copies through
// kStages stages per warp for 16-bit T, for float32 by vector loads into registers kAhead tiles
// ahead (H200, fp32, against bulk copies: beam step 64 x 4 x 151936 66.3 -> 63.6 us, top-k 50 +
// top-p sampling B=256 V=151936 98.8 -> 93.3; bf16 slower: 57.6 -> 67.8, 93.5 -> 110.0);
// otherwise the lanes copy element by element. kUnrolled: select_top's.
template <typename T, bool BULK, typename Acc, bool kUnrolled>
__device__ Partial<Acc> slice_top_keys(const T* __restrict__ x, int64_t begin, int64_t end, int c, float scale,
                                       uint64_t* out) {
  constexpr int VEC = 16 / sizeof(T), kTileElems = kStageBytes / sizeof(T), kGroups = kTileElems / (32 * VEC);
  extern __shared__ __align__(16) unsigned char stream_memory[];
  __shared__ uint64_t keys[kWarps * kWarpKeys];
  constexpr bool kBulk = BULK && sizeof(T) < 4, kRegisters = BULK && !kBulk;
  constexpr int kAhead = 2;  // the register path's tiles in flight per warp beyond the one taken (3: slower)
  __shared__ uint64_t arrived[kBulk ? kWarps * kStages : 1];  // the bulk path's barriers
  __shared__ Select sel;
  __shared__ int count;
  __shared__ Partial<Acc> warp_partial[kWarps];
  __shared__ unsigned long long block_floor;  // the highest of the warps' floors: a floor of the block's c best too
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tiles = (end - begin + kTileElems - 1) / kTileElems;
  // The warp's tiles warp, warp + kWarps, ... of the slice: in registers kAhead tiles ahead, or
  // through its ring of stages (bulk copies, or the lanes copying each tile into its stage).
  const WarpRing<T, kStages, kTileElems> ring{reinterpret_cast<T*>(stream_memory) + warp * kStages * kTileElems,
                                              arrived + warp * kStages};
  const int64_t own = warp < tiles ? (tiles - warp + kWarps - 1) / kWarps : 0;
  auto source = [&](int64_t j, const T** src, int* elems) {
    const int64_t first = begin + (warp + j * kWarps) * kTileElems;
    *src = x + first;
    *elems = static_cast<int>(min(static_cast<int64_t>(kTileElems), end - first));
  };
  if (threadIdx.x == 0) {
    count = 0;
    block_floor = 0;
  }
  __syncthreads();
  Vec<T, VEC> ahead[kRegisters ? kAhead : 1][kGroups];  // the register path's next tiles
  auto fetch = [&](Vec<T, VEC>(&into)[kGroups], int64_t j) {  // the warp's j-th tile into registers
    const T* src;
    int len;
    source(j, &src, &len);
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      if ((g * 32 + lane) * VEC < len) into[g] = load<T, VEC>(src + (g * 32 + lane) * VEC);
    }
  };
  if constexpr (kBulk) ring.start(lane, own, source);
  if constexpr (kRegisters) {
#pragma unroll
    for (int a = 0; a < kAhead; ++a) {
      if (a < own) fetch(ahead[a], a);
    }
  }
  float m = -kInf;
  Acc s = 0;
  WarpBuffer b{0, min(kWarpKeys - 32, 2 * c + 16), 0, -kInf};
  uint64_t* buffer = keys + warp * kWarpKeys;
  for (int64_t k = 0, tile = warp; tile < tiles; ++k, tile += kWarps) {
    T* data = ring.stage(k);
    const int64_t first = begin + tile * kTileElems;
    const int len = static_cast<int>(min(static_cast<int64_t>(kTileElems), end - first));
    Vec<T, VEC> v[kGroups];  // elements past len are not read (scan_tile masks them)
    if constexpr (kRegisters) {
#pragma unroll
      for (int a = 0; a < kAhead; ++a) {
#pragma unroll
        for (int g = 0; g < kGroups; ++g) (a == 0 ? v[g] : ahead[a - 1][g]) = ahead[a][g];
      }
      if (k + kAhead < own) fetch(ahead[kAhead - 1], k + kAhead);
    } else {
      if constexpr (kBulk) {
        ring.wait(k);
      } else {
        __syncwarp();
        for (int i = lane; i < len; i += 32) data[i] = x[first + i];
        __syncwarp();
      }
#pragma unroll
      for (int g = 0; g < kGroups; ++g) v[g] = *reinterpret_cast<const Vec<T, VEC>*>(data + (g * 32 + lane) * VEC);
      if constexpr (kBulk) ring.refill(lane, k, own, source);  // the stage is read: refill it with the tile kStages ahead
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
      if (lane == 0) atomicMax(&block_floor, b.floor_key);
    } else if (k == 0) {  // c >= 32: the r-th largest of the lanes' j-th bests, j = ceil(c / 32), r = ceil(c / j):
      // r lanes hold j keys at or above it, so c keys are (the first tile appends a few times c, not all)
      const int jth = (c + 31) / 32, r = (c + jth - 1) / jth;
      static_assert(kMaxKeys <= 4 * 32, "j <= 4");
      uint64_t t0 = 0, t1 = 0, t2 = 0, t3 = 0;  // this lane's four best keys, descending
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const int e = (g * 32 + lane) * VEC + j;
          const float value = to_float(v[g].v[j]) + 0.f;
          uint64_t key = e < len ? rank_key(value == value ? value : -kInf, first + e) : 0;
          for (uint64_t* t : {&t0, &t1, &t2, &t3}) {
            const uint64_t lower = min(key, *t);
            *t = max(key, *t);
            key = lower;
          }
        }
      }
      const uint64_t own = jth == 1 ? t0 : jth == 2 ? t1 : jth == 3 ? t2 : t3;
      const uint64_t at = warp_pick(own, r - 1);
      b.floor_key = at ? at - 1 : 0;  // `at` itself is taken
      b.floor_value = at ? rank_value(at) : -kInf;
      if (lane == 0) atomicMax(&block_floor, b.floor_key);
    } else {  // another warp's floor, when higher: c of the block's keys are above it, so its c best are
      const uint64_t shared = *static_cast<volatile unsigned long long*>(&block_floor);
      if (shared > b.floor_key) {
        b.floor_key = shared;
        b.floor_value = rank_value(shared);
      }
    }
    if (len == kTileElems) {
      scan_tile<true>(v, len, first, scale, m, s, b, buffer, c, &block_floor);
    } else {
      scan_tile<false>(v, len, first, scale, m, s, b, buffer, c, &block_floor);
    }
  }
  // the slice's softmax partial
  warp_combine(m, s, scale);
  if (lane == 0) warp_partial[warp] = {m, s};
  // the warps' keys (each warp's cut by the lanes' bests first, when c < 32) into one list, then its c best
  if (c < 32 && b.n > 2 * c) b = compact(buffer, b, c, &block_floor);
  constexpr int kPer = kWarpKeys / 32;
  uint64_t mine[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) mine[j] = lane + 32 * j < b.n ? buffer[lane + 32 * j] : 0;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kPer; ++j) append(keys, &count, mine[j] != 0, mine[j]);
  __syncthreads();
  for (int i = count + threadIdx.x; i < c; i += kThreads) out[i] = 0;  // a slice of fewer than c elements
  select_top<kUnrolled>(keys, &count, c, out, sel);
  Partial<Acc> slice{-kInf, 0};
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) combine(slice.max, slice.sum, warp_partial[w].max, warp_partial[w].sum, scale);
  }
  return slice;
}

}  // namespace xllm::slice
