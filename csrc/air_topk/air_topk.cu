// Step air_topk: radix-select top-k over the last dim (after AIR top-k: radix passes with
// per-pass histograms and early exit, no full sort), then an optional sort of the k winners.
//
// Every element becomes one 64-bit key, ordered like (value, -index):
//   bits 63..(64 - B): the value's bits made order-preserving (B = 32 for float32, 16 for
//                      bfloat16/float16; every NaN maps to the largest key, as torch.topk
//                      ranks NaN above every number; largest=false inverts the value bits),
//   bits 31..0:        ~index, so equal values rank the lower index first.
// The keys are distinct, so "the k largest keys" is exactly torch.topk's set with ties broken
// by the lower index, and sorting the winners by key gives torch.topk(sorted=True)'s order.
//
// Small batches whose rows fit the GPU's resident blocks at one tile a block (or, for large k,
// at up to kGridItems elements a thread) take the grid path (grid_topk_kernel, below): all of a
// row's blocks select together through a histogram in global memory, so that no block works
// through the row or a merge alone. Otherwise:
// one block streams its stretch of a row once, in tiles of kTile elements (16-byte loads),
// and keeps every key at or above its admission bound in a shared-memory buffer. The first
// tile's 11-bit histogram seeds the bound (the lowest bucket edge that k keys reach); once the
// buffer holds 4 max(k, 64) keys, or could overflow, it is cut by a radix select (8-bit digits
// from the top, stopping at the first digit whose bucket holding the k-th key leaves at most
// cut_limit(k) keys at or above it, so that ties need no index digits) and the bound rises to
// that cut: early cuts raise the bound sooner, so fewer keys are admitted. Threads test values
// against the bound as floats before making any key: a warp skips a whole tile when none of its
// lanes' largest value (NaN kept) reaches it, else an item of it that none of its lanes passes.
// Other batches that leave the GPU idle split each row over `splits` blocks, and the row's last
// block to finish (a ticket counter, reset by that block) merges what they leave in the
// workspace: with few keys (splits * 2k <= kRankMergeMax) each split leaves up to 2k keys that
// hold its k largest and the last block ranks those it left (each key's place is the number of
// keys above it: sorted, no passes); else each leaves exactly its k largest and its bound, and
// the last block streams those splits * k keys, admitting only keys at or above the highest
// bound.
// Values are written back from the keys (exact, but for NaN payloads). The workspace's counters
// and histograms are zero when no kernel is running: each call leaves them so.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <tuple>
#include <type_traits>

#include "launch_helpers.cuh"
#include "row_barrier.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;                   // elements per thread per tile
constexpr int kTile = kThreads * kItems;    // elements per tile
constexpr int kMaxK = 1024;
constexpr int kMaxTicketRows = 4096;        // rows that may be split (larger batches never are)
constexpr int64_t kTicketBytes = kMaxTicketRows * sizeof(unsigned int);
constexpr int64_t kMinChunk = 2048;         // a split block streams at least this many elements
constexpr int kRankMergeMax = 512;          // a row's splits * 2k keys merged by rank up to this
constexpr int kBlocksPerSm = 4;             // resident blocks per SM (launch bounds; shared memory allows 5 at k = 1024)
constexpr int kDigitBits = 11;              // wide digit: the first tile's histogram (sign, exponent, 2 mantissa bits
constexpr int kBuckets = 1 << kDigitBits;   // of fp32) and the grid path's passes

using xllm::round_up;

__host__ __device__ constexpr int capacity(int k) { return kTile + (2 * k > 1024 ? 2 * k : 1024); }

// The buffer is cut to k keys once it holds this many (or earlier, when the next tile could
// overflow it): every cut raises the admission bound, and a higher bound admits fewer keys.
__host__ __device__ constexpr int cut_at(int k) { return 4 * (k > 64 ? k : 64); }

// A cut may keep up to this many keys (it needs no more digits once the bucket of the k-th key
// leaves that few at or above it: ties, which narrow types have many of, need no index digits).
__host__ __device__ constexpr int cut_limit(int k) { return k + (k / 4 > 16 ? k / 4 : 16); }

// Keys each split block leaves for its row's merge: up to 2k where the row's last block ranks
// them all (few keys: splits * 2k <= kRankMergeMax), else exactly k.
__host__ __device__ constexpr bool rank_merge(int64_t splits, int64_t k) { return splits * 2 * k <= kRankMergeMax; }
__host__ __device__ constexpr int64_t merge_slot(int64_t splits, int64_t k) { return rank_merge(splits, k) ? 2 * k : k; }

// Order-preserving unsigned image of a value; NaN is the largest.
__device__ __forceinline__ uint64_t value_bits(float x) {
  uint32_t u = __float_as_uint(x);
  if (x != x) return 0xFFFFFFFFu;
  return u ^ ((u >> 31) ? 0xFFFFFFFFu : 0x80000000u);
}
__device__ __forceinline__ uint64_t value_bits(__nv_bfloat16 x) {
  uint32_t u = __bfloat16_as_ushort(x);
  if ((u & 0x7FFFu) > 0x7F80u) return 0xFFFFu;
  return u ^ ((u >> 15) ? 0xFFFFu : 0x8000u);
}
__device__ __forceinline__ uint64_t value_bits(__half x) {
  uint32_t u = __half_as_ushort(x);
  if ((u & 0x7FFFu) > 0x7C00u) return 0xFFFFu;
  return u ^ ((u >> 15) ? 0xFFFFu : 0x8000u);
}

__device__ __forceinline__ float float_of_bits(uint32_t bits, float) { return __uint_as_float(bits); }
__device__ __forceinline__ float float_of_bits(uint32_t bits, __nv_bfloat16) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(bits)));
}
__device__ __forceinline__ float float_of_bits(uint32_t bits, __half) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// max / min that return NaN when either operand is NaN (fmaxf / fminf would drop it).
__device__ __forceinline__ float max_nan(float a, float b) {
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
__device__ __forceinline__ float min_nan(float a, float b) {
  float d;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

template <typename T>
struct Key {
  static constexpr int kValueBits = 8 * sizeof(T);
  static constexpr uint32_t kMask = kValueBits == 32 ? 0xFFFFFFFFu : 0xFFFFu, kTop = 1u << (kValueBits - 1);

  // flip: all ones for largest=false (rank the smallest values first), else 0.
  static __device__ __forceinline__ uint64_t make(T x, int64_t index, uint64_t flip) {
    const uint64_t v = value_bits(x) ^ flip;
    return (v << (64 - kValueBits)) | static_cast<uint32_t>(~static_cast<uint32_t>(index));
  }

  // A cheap pre-test on values: with sign = -1 for largest=false, else 1, every x whose key
  // reaches `bound` (NaN included) has !(x * sign < threshold(bound) * sign).
  static __device__ __forceinline__ float threshold(uint64_t bound, uint64_t flip) {
    return float_of_bits(value_bits_of(bound, flip), T{});
  }

  // The bits of the value a key was made from (NaN: a NaN, not necessarily the same one).
  static __device__ __forceinline__ uint32_t value_bits_of(uint64_t key, uint64_t flip) {
    const uint32_t ordered = static_cast<uint32_t>((key >> (64 - kValueBits)) ^ flip) & kMask;
    return (ordered & kTop) ? ordered ^ kTop : ~ordered & kMask;
  }
  static __device__ __forceinline__ T value_of(uint64_t key, uint64_t flip) {
    const uint32_t bits = value_bits_of(key, flip);
    if constexpr (kValueBits == 32) {
      return __uint_as_float(bits);
    } else {
      T v;
      const unsigned short b = static_cast<unsigned short>(bits);
      memcpy(&v, &b, sizeof(v));
      return v;
    }
  }
};

__device__ __forceinline__ int64_t index_of(uint64_t key) { return static_cast<uint32_t>(~static_cast<uint32_t>(key)); }

// Sum of v over the lanes >= lane of a full warp (a suffix scan).
__device__ __forceinline__ int warp_suffix_sum(int v, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int o = __shfl_down_sync(0xFFFFFFFFu, v, off);
    if (lane + off < 32) v += o;
  }
  return v;
}

// The whole block: the bucket of a kBuckets-count histogram holding the remaining-th largest
// key, as (bucket, keys in buckets above it, keys in it); bucket -1 when the histogram holds
// fewer keys. load(q) gives counts 4q .. 4q + 3 (each thread reads kBuckets / kThreads).
template <typename Load>
__device__ int3 find_bucket(Load load, int remaining) {
  constexpr int kPer = kBuckets / kThreads;
  __shared__ int warp_total[kThreads / 32];
  __shared__ int3 found;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid / 32;
  if (tid == 0) found = make_int3(-1, 0, 0);
  int h[kPer], sum = 0;
#pragma unroll
  for (int q = 0; q < kPer / 4; ++q) {
    const int4 v = load(tid * (kPer / 4) + q);
    h[4 * q] = v.x, h[4 * q + 1] = v.y, h[4 * q + 2] = v.z, h[4 * q + 3] = v.w;
  }
#pragma unroll
  for (int j = 0; j < kPer; ++j) sum += h[j];
  int suffix = warp_suffix_sum(sum, lane);  // keys in buckets >= this thread's first, within the warp
  if (lane == 0) warp_total[warp] = suffix;
  __syncthreads();
  for (int w = warp + 1; w < kThreads / 32; ++w) suffix += warp_total[w];
  int greater = suffix - sum;
  if (greater < remaining && remaining <= suffix) {  // exactly one thread
    bool done = false;
#pragma unroll
    for (int j = kPer - 1; j >= 0; --j) {
      if (!done && greater + h[j] >= remaining) {
        found = make_int3(tid * kPer + j, greater, h[j]);
        done = true;
      } else if (!done) {
        greater += h[j];
      }
    }
  }
  __syncthreads();
  const int3 f = found;
  __syncthreads();  // everyone has read `found` and `warp_total` before a next call rewrites them
  return f;
}

// The split path's dynamic shared memory: the selection's buffer (capacity(k) keys), then
// cut_limit(k) keys of scratch. Declared here, not behind a pointer, so that the compiler knows
// it is shared memory (shared-memory loads, stores and atomics rather than generic ones).
extern __shared__ __align__(16) uint64_t selection_keys[];

// The shared state of one block's selection.
struct Selection {
  int count;             // keys in buf()
  uint64_t bound;        // admission bound: keys below it cannot be among the k largest
  int hist[256];
  int found_bucket, found_greater, found_count, kept;

  static __device__ __forceinline__ uint64_t* buf() { return selection_keys; }
  static __device__ __forceinline__ uint64_t* aux(int k) { return selection_keys + capacity(k); }
};

// Append `key` to dst[*count] when `take` (one shared-memory atomic per warp).
__device__ __forceinline__ void append(uint64_t* dst, int* count, uint64_t key, bool take) {
  const unsigned ballot = __ballot_sync(0xFFFFFFFFu, take);
  if (ballot == 0) return;
  const int lane = threadIdx.x & 31, leader = __ffs(ballot) - 1;
  int base = 0;
  if (lane == leader) base = atomicAdd(count, __popc(ballot));
  base = __shfl_sync(0xFFFFFFFFu, base, leader);
  if (take) dst[base + __popc(ballot & ((1u << lane) - 1))] = key;
}

// The prefix that cuts buf to its k largest keys, or to a few more: radix passes over 8-bit
// digits from the top, stopping at the first digit whose bucket leaves at most `limit` keys at
// or above the prefix (limit = k: exactly k, as the keys are distinct). At least k keys of buf
// are >= the prefix (its low bits are zero), at most `limit`. Needs count > limit.
__device__ uint64_t find_cut(Selection& s, int k, int limit) {
  const int n = s.count;
  uint64_t prefix = 0, mask = 0;
  int remaining = k;  // of the k largest, how many have the prefix (the others are above it)
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kThreads) s.hist[b] = 0;
    __syncthreads();
    // Warp-aggregated: lanes whose keys share a bucket add once (ties and narrow value ranges
    // would otherwise serialise on one shared-memory counter).
    const int lane = threadIdx.x & 31;
    for (int i = threadIdx.x; i < round_up(n, kThreads); i += kThreads) {
      const uint64_t key = i < n ? s.buf()[i] : 0;
      const bool in = i < n && (key & mask) == prefix;
      const int bucket = in ? static_cast<int>((key >> shift) & 0xFF) : 256;
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, bucket);
      if (in && lane == __ffs(peers) - 1) atomicAdd(&s.hist[bucket], __popc(peers));
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane L holds buckets 8L .. 8L+7; find the bucket holding the remaining-th largest key.
      int h[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) sum += (h[j] = s.hist[8 * lane + j]);
      const int suffix = warp_suffix_sum(sum, lane);
      int greater = suffix - sum;
#pragma unroll
      for (int j = 7; j >= 0; --j) {
        if (greater < remaining && remaining <= greater + h[j]) {
          s.found_bucket = 8 * lane + j;
          s.found_greater = greater;
          s.found_count = h[j];
        }
        greater += h[j];
      }
    }
    __syncthreads();
    prefix |= static_cast<uint64_t>(s.found_bucket) << shift;
    mask |= static_cast<uint64_t>(0xFF) << shift;
    const int at_or_above = k - remaining + s.found_greater + s.found_count;
    remaining -= s.found_greater;
    __syncthreads();  // everyone has read found_* before the next pass rewrites them
    if (at_or_above <= limit) break;  // at the latest the last digit leaves k
  }
  return prefix;
}

// Append the keys of buf at or above `prefix` to dst, counting them in *kept (zero before).
__device__ void keep(Selection& s, uint64_t prefix, uint64_t* dst, int* kept) {
  const int n = s.count;
  for (int i = threadIdx.x; i < round_up(n, kThreads); i += kThreads) {
    const uint64_t key = i < n ? s.buf()[i] : 0;
    append(dst, kept, key, i < n && key >= prefix);
  }
}

// Cut buf to its k largest keys, or up to `limit` keys that hold them (count > limit), and
// raise the bound to the cut.
__device__ void cut(Selection& s, int k, int limit) {
  const uint64_t prefix = find_cut(s, k, limit);
  if (threadIdx.x == 0) s.kept = 0;
  __syncthreads();
  keep(s, prefix, s.aux(k), &s.kept);
  __syncthreads();
  const int kept = s.kept;
  for (int i = threadIdx.x; i < kept; i += kThreads) s.buf()[i] = s.aux(k)[i];
  if (threadIdx.x == 0) {
    s.count = kept;
    s.bound = max(s.bound, prefix);
  }
  __syncthreads();
}

template <typename T, int VEC, int ITEMS = kItems>
struct Tile {
  static constexpr int kLoads = ITEMS / VEC;
  // Whole 16-byte loads stay packed in 32-bit words (16-bit elements would otherwise take a
  // register each); single elements are kept as they are.
  static constexpr bool kPacked = VEC * sizeof(T) == 16;
  static constexpr int kWords = kPacked ? 4 : 1;
  using Word = std::conditional_t<kPacked, uint32_t, T>;
  Word w[kLoads][kWords];

  // Where this thread's element (u, j) lies in a tile (VEC per 16-byte load, loads kThreads * VEC apart).
  static __device__ __forceinline__ int offset(int u, int j) { return (u * kThreads + static_cast<int>(threadIdx.x)) * VEC + j; }

  // Element j of load u.
  __device__ __forceinline__ T at(int u, int j) const {
    if constexpr (!kPacked) {
      return w[u][0];
    } else if constexpr (sizeof(T) == 4) {
      return __uint_as_float(w[u][j]);
    } else {
      const unsigned short bits = static_cast<unsigned short>(w[u][j / 2] >> (16 * (j % 2)));
      T v;
      memcpy(&v, &bits, sizeof(v));
      return v;
    }
  }

  // The largest of this thread's elements (the smallest when `smallest`), NaN if any is NaN.
  // Every element must exist (a whole tile). 16-bit elements are compared two at a time.
  __device__ __forceinline__ float extreme(bool smallest) const {
    if constexpr (kPacked && sizeof(T) == 2) {
      using Pair = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
      auto pair = [&](int u, int q) { Pair p; memcpy(&p, &w[u][q], sizeof(p)); return p; };
      Pair m = pair(0, 0);
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
#pragma unroll
        for (int q = u == 0 ? 1 : 0; q < kWords; ++q) m = smallest ? __hmin2_nan(m, pair(u, q)) : __hmax2_nan(m, pair(u, q));
      }
      const float lo = to_float(m.x), hi = to_float(m.y);
      return smallest ? min_nan(lo, hi) : max_nan(lo, hi);
    } else {
      float m = to_float(at(0, 0));
#pragma unroll
      for (int i = 1; i < ITEMS; ++i) m = smallest ? min_nan(m, to_float(at(i / VEC, i % VEC))) : max_nan(m, to_float(at(i / VEC, i % VEC)));
      return m;
    }
  }

  // This thread's elements of the tile starting at `tile`, of which the first n exist (n is a
  // multiple of VEC; 32-bit offsets keep the bounds checks to one compare each).
  __device__ __forceinline__ void load(const T* __restrict__ tile, int n) {
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int o = offset(u, 0);
      if (o < n) {
        if constexpr (kPacked) {
          const uint4 q = *reinterpret_cast<const uint4*>(tile + o);
          w[u][0] = q.x, w[u][1] = q.y, w[u][2] = q.z, w[u][3] = q.w;
        } else {
          w[u][0] = tile[o];
        }
      }
    }
  }
};

// One row's logits [begin, end) as a source of keys, a tile of kItems per thread at a time
// (zero past the end). The next tile's loads are issued before this tile is sifted. (Holding
// more tiles in flight, in registers, as L2 prefetches or as bulk copies into shared memory
// three tiles ahead, measured no faster.)
template <typename T, int VEC>
struct LogitKeys {
  const T* __restrict__ row;
  int64_t begin, end;
  uint64_t flip;
  Tile<T, VEC> cur, next;
  int64_t base;
  int size;  // elements of the current tile (kTile but for the last)

  __device__ __forceinline__ int size_at(int64_t tile_base) const { return static_cast<int>(min(static_cast<int64_t>(kTile), end - tile_base)); }

  __device__ void start() { next.load(row + begin, size_at(begin)); }

  __device__ __forceinline__ void load(int64_t tile_base) {
    cur = next;
    base = tile_base;
    size = size_at(base);
    if (base + kTile < end) next.load(row + base + kTile, size_at(base + kTile));
  }

  __device__ __forceinline__ uint64_t key(int i) const {
    const int u = i / VEC, j = i % VEC, at = Tile<T, VEC>::offset(u, j);
    return at < size ? Key<T>::make(cur.at(u, j), base + at, flip) : 0;
  }

  // Whether any of this thread's keys may reach `bound`: on a whole tile one compare of the
  // elements' extreme (NaN passes, as NaN ranks largest), else item by item.
  __device__ __forceinline__ bool may_reach_any(uint64_t bound) const {
    if (size == kTile) {
      const float t = Key<T>::threshold(bound, flip);
      return flip ? !(cur.extreme(true) > t) : !(cur.extreme(false) < t);
    }
    bool any = false;
#pragma unroll
    for (int i = 0; i < kItems; ++i) any |= may_reach(i, bound);
    return any;
  }

  // Whether this thread's key i may reach `bound` (compares the value only: cheaper than a key).
  __device__ __forceinline__ bool may_reach(int i, uint64_t bound) const {
    const float sign = flip ? -1.f : 1.f, t = Key<T>::threshold(bound, flip) * sign;
    const int u = i / VEC, j = i % VEC;
    return Tile<T, VEC>::offset(u, j) < size && !(to_float(cur.at(u, j)) * sign < t);
  }
};

// Keys already made, keys[begin, end) (zero = empty slot), written by other blocks; read
// where they are needed (from L2) rather than held in registers.
struct StoredKeys {
  const uint64_t* keys;
  int64_t begin, end;
  int64_t base;

  __device__ void start() {}

  __device__ __forceinline__ void load(int64_t tile_base) { base = tile_base; }

  __device__ __forceinline__ uint64_t key(int i) const {
    const int64_t at = base + i * kThreads + threadIdx.x;
    return at < end ? __ldcg(reinterpret_cast<const unsigned long long*>(keys + at)) : 0;
  }

  // A stored key is its own test: admit loads it once, when it makes the key, and compares it.
  __device__ __forceinline__ bool may_reach_any(uint64_t) const { return true; }
  __device__ __forceinline__ bool may_reach(int, uint64_t) const { return true; }
};

// Admit the source's keys of this thread's tile that reach the bound (zero keys never do:
// the bound is >= 1). Keys are made only where the source's cheap pre-tests pass: a warp skips
// the tile when none of its lanes' extremes reaches the bound (one compare a lane), else an
// item that none of its lanes passes.
template <typename Source>
__device__ __forceinline__ void admit(Selection& s, const Source& source, uint64_t bound) {
  if (!__any_sync(0xFFFFFFFFu, source.may_reach_any(bound))) return;
  bool pass[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) pass[i] = source.may_reach(i, bound);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (!__any_sync(0xFFFFFFFFu, pass[i])) continue;
    const uint64_t key = pass[i] ? source.key(i) : 0;
    append(s.buf(), &s.count, key, key >= bound);
  }
}

// Raise the bound from a histogram of the top kDigitBits of keys (a tile's worth, zero = no
// key): the lowest bucket edge that at least k of them reach. With no selection yet this
// replaces admitting the whole first tile and cutting it digit by digit.
template <typename Source>
__device__ void seed_bound(Selection& s, int k, const Source& source) {
  int* hist = reinterpret_cast<int*>(s.buf());  // the buffer is empty until the first admission
  for (int b = threadIdx.x; b < kBuckets; b += kThreads) hist[b] = 0;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const uint64_t key = source.key(i);
    if (key != 0) atomicAdd(&hist[key >> (64 - kDigitBits)], 1);
  }
  __syncthreads();
  const int3 f = find_bucket([&](int q) { return reinterpret_cast<const int4*>(hist)[q]; }, k);
  if (threadIdx.x == 0 && f.x >= 0) {
    const uint64_t edge = static_cast<uint64_t>(f.x) << (64 - kDigitBits);
    if (edge > s.bound) s.bound = edge;
  }
  __syncthreads();
}

// Stream a source's keys into the selection, tile by tile; the first tile of an empty
// selection seeds the bound from its histogram.
template <typename Source>
__device__ void stream(Selection& s, int k, Source& source) {
  const int cap = capacity(k);
  source.start();
  for (int64_t base = source.begin; base < source.end; base += kTile) {
    source.load(base);
    const int count = s.count;
    __syncthreads();  // every thread decides on the same count before any admits into this tile
    if (count == 0 && base == source.begin) seed_bound(s, k, source);
    if (count + kTile > cap || count >= cut_at(k)) cut(s, k, cut_limit(k));
    admit(s, source, s.bound);
    __syncthreads();
  }
}

// Bitonic sort of buf[0, p) descending by `threads` threads, `sync` between steps.
template <typename Sync>
__device__ void bitonic_descending(uint64_t* buf, int p, int threads, Sync sync) {
  for (int size = 2; size <= p; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < p / 2; i += threads) {
        const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const bool desc = (lo & size) == 0;
        const uint64_t a = buf[lo], b = buf[hi];
        if ((a < b) == desc && a != b) {
          buf[lo] = b;
          buf[hi] = a;
        }
      }
      sync();
    }
  }
}

// Sort buf[0, k) by key, descending (over the next power of two, padded with zeros, which buf
// must have room for); up to 64 keys one warp sorts them without block barriers.
__device__ void sort_descending(uint64_t* buf, int k) {
  int p = 1;
  while (p < k) p <<= 1;
  for (int i = k + threadIdx.x; i < p; i += kThreads) buf[i] = 0;
  __syncthreads();
  if (p <= 64) {
    if (threadIdx.x < 32) bitonic_descending(buf, p, 32, [] { __syncwarp(); });
    __syncthreads();
  } else {
    bitonic_descending(buf, p, kThreads, [] { __syncthreads(); });
  }
}

// The k largest of keys[0, n), in descending order, to values[0, k) and indices[0, k): each
// key's place is the number of keys above it (the keys are distinct), so there are no sorting
// passes: n compares a key.
template <typename T>
__device__ void write_by_rank(const uint64_t* keys, int n, int k, uint64_t flip, T* __restrict__ values,
                              int64_t* __restrict__ indices) {
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const uint64_t key = keys[i];
    int place = 0;
#pragma unroll 8
    for (int j = 0; j < n; ++j) place += keys[j] > key;
    if (place < k) {
      values[place] = Key<T>::value_of(key, flip);
      indices[place] = index_of(key);
    }
  }
}

struct Args {
  int64_t vocab, chunk;
  int k, splits;
  uint64_t flip;
  bool sorted;
  unsigned int* tickets;  // batch counters, zero between calls
  uint64_t* partial;      // batch * splits * slot keys (slot: 2k when ranked, else k)
  uint64_t* bounds;       // batch * splits admission bounds: at least k keys of the row are >= each
  int64_t* indices;       // batch * k
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) topk_kernel(const T* __restrict__ x, T* __restrict__ values, Args a) {
  __shared__ Selection s;
  __shared__ bool last;
  const int64_t row = blockIdx.x;
  const int k = a.k;
  if (threadIdx.x == 0) {
    s.count = 0;
    s.bound = 1;  // every real key is >= 2^31 (its low half is ~index); 0 marks an empty slot
  }
  __syncthreads();
  const T* xr = x + row * a.vocab;
  const int64_t begin = blockIdx.y * a.chunk, end = min(begin + a.chunk, a.vocab);
  LogitKeys<T, VEC> logits{xr, begin, end, a.flip};
  stream(s, k, logits);
  if (a.splits > 1) {
    // Few keys for the row: each split leaves its k largest keys, or up to 2k keys that hold
    // them (a shorter cut), and the last block ranks them all; else exactly k and a bound.
    const bool rank = rank_merge(a.splits, k);
    const int slot = static_cast<int>(merge_slot(a.splits, k));
    uint64_t* mine = a.partial + (row * a.splits + blockIdx.y) * slot;
    const uint64_t prefix = s.count > slot ? find_cut(s, k, slot) : 0;
    if (threadIdx.x == 0) {
      s.kept = 0;
      a.bounds[row * a.splits + blockIdx.y] = max(prefix, s.bound);  // read by the streaming merge only
    }
    __syncthreads();
    keep(s, prefix, mine, &s.kept);
    __syncthreads();
    for (int i = s.kept + threadIdx.x; i < slot; i += kThreads) mine[i] = 0;
    __syncthreads();
    if (threadIdx.x == 0) {
      last = xllm::ticket(&a.tickets[row]) == static_cast<unsigned>(a.splits - 1);
      if (last) a.tickets[row] = 0;
      s.count = 0;
      s.bound = 1;
    }
    __syncthreads();
    if (!last) return;
    const int n = a.splits * slot;
    if (rank) {  // sorted for free
      for (int i = threadIdx.x; i < round_up(n, kThreads); i += kThreads) {  // the non-empty slots only
        const uint64_t key = i < n ? __ldcg(reinterpret_cast<const unsigned long long*>(a.partial + row * n + i)) : 0;
        append(s.buf(), &s.count, key, key != 0);
      }
      __syncthreads();
      return write_by_rank(s.buf(), s.count, k, a.flip, values + row * k, a.indices + row * k);
    }
    // Every split kept its k keys at or above its bound, so the highest bound is one for the row.
    for (int i = threadIdx.x; i < a.splits; i += kThreads) {
      atomicMax(reinterpret_cast<unsigned long long*>(&s.bound),
                __ldcg(reinterpret_cast<const unsigned long long*>(a.bounds + row * a.splits + i)));
    }
    __syncthreads();
    StoredKeys partial{a.partial + row * a.splits * k, 0, static_cast<int64_t>(a.splits) * k};
    stream(s, k, partial);
  }
  if (s.count > k) cut(s, k, k);
  if (a.sorted) sort_descending(s.buf(), k);
  for (int i = threadIdx.x; i < k; i += kThreads) {
    values[row * k + i] = Key<T>::value_of(s.buf()[i], a.flip);
    a.indices[row * k + i] = index_of(s.buf()[i]);
  }
}

// -- Small batches: the whole row at once over the whole GPU --------------------------------
//
// Each block holds its chunk of the row (up to kGridItems elements a thread) in registers; all
// of the row's blocks (every block resident: cooperative launch) run the radix select together,
// digit by digit from the top (11-bit digits over the value bits, then over the index bits,
// which only ties reach): each block counts its keys of the surviving prefix in shared memory
// and adds the counts to the row's histogram in global memory, the row's blocks meet at a
// barrier, and each reads the histogram and finds the bucket holding the k-th key. As soon as
// that bucket is taken whole, the k keys at or above the prefix are the answer: each block
// appends its own to the row's list, and the last block to finish sorts the list and writes the
// outputs.

constexpr int kGridRows = 64;               // the grid path takes batches up to this
constexpr int kGridItems = 32;              // elements a thread at most on the wide grid path (held in registers)
constexpr int kGridBlocksPerSm = 3;         // its resident blocks per SM (launch bounds: registers for the values)
constexpr int kGridLargeK = 256;            // it serves k from this on (where the batch fits),
constexpr int kGridMergeKeys = 2048;        // and smaller k whose split rows would merge more keys than this
constexpr int kHistograms = 3;              // passes rotate over three: one filling, one read, one zeroed
constexpr int kRankSortMaxK = 256;          // sorted output by ranks up to this k (one key a thread)

// A row's scratch in the workspace; zero between calls (the last block leaves it so).
struct GridRow {
  unsigned barrier;
  int winners;
  unsigned ticket;
  unsigned pad;
  int hist[kHistograms][kBuckets];
};

constexpr int64_t kGridBytes = kGridRows * (sizeof(GridRow) + kMaxK * sizeof(uint64_t));

struct GridArgs {
  int64_t vocab, chunk;  // chunk <= kThreads * kGridItems
  int k;
  uint64_t flip;
  bool sorted;
  GridRow* rows;          // batch
  uint64_t* winners;      // batch * k keys
  int64_t* indices;       // batch * k
};

// This thread's elements of a block's chunk [begin, begin + n) of the row, held as the high
// halves of their keys (the value's ordered bits); the low half, ~index, follows from the place.
// Elements past the chunk come in whole loads of the block, so loops stop at the first such load.
template <typename T, int VEC, int ITEMS>
struct ChunkKeys {
  using Values = Tile<T, VEC, ITEMS>;
  uint32_t high[ITEMS];
  int64_t begin;
  int n;

  __device__ __forceinline__ void load(const T* __restrict__ chunk, uint64_t flip) {
    Values tile;
    tile.load(chunk, n);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) high[i] = static_cast<uint32_t>(Key<T>::make(tile.at(i / VEC, i % VEC), 0, flip) >> 32);
  }
  __device__ __forceinline__ bool past(int i) const { return (i / VEC) * kThreads * VEC >= n; }  // the whole block's
  __device__ __forceinline__ bool exists(int i) const { return Values::offset(i / VEC, i % VEC) < n; }
  __device__ __forceinline__ uint32_t low(int i) const { return ~static_cast<uint32_t>(begin + Values::offset(i / VEC, i % VEC)); }
  __device__ __forceinline__ uint64_t key(int i) const { return static_cast<uint64_t>(high[i]) << 32 | low(i); }
};

// ITEMS: elements a thread at most; one tile's worth (kItems) keeps kBlocksPerSm blocks an SM.
template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kThreads, ITEMS == kItems ? kBlocksPerSm : kGridBlocksPerSm)
    grid_topk_kernel(const T* __restrict__ x, T* __restrict__ values, GridArgs a) {
  __shared__ int hist[kBuckets];
  __shared__ uint64_t winners[kMaxK];
  __shared__ bool last;
  const int tid = threadIdx.x, lane = tid & 31;
  const int64_t row = blockIdx.y;
  GridRow& g = a.rows[row];
  const int64_t begin = blockIdx.x * a.chunk;
  ChunkKeys<T, VEC, ITEMS> chunk;
  chunk.begin = begin;
  chunk.n = static_cast<int>(min(begin + a.chunk, a.vocab) - begin);
  chunk.load(x + row * a.vocab + begin, a.flip);
  uint64_t prefix = 0, mask = 0;  // the bits of the k-th key found so far
  int remaining = a.k;            // of the k, how many have the prefix
  for (int pass = 0, hi = 64;; ++pass) {
    const int lo = hi > 32 ? max(hi - kDigitBits, 64 - Key<T>::kValueBits) : max(hi - kDigitBits, 0);
    const uint64_t digit = (1ull << (hi - lo)) - 1;
    int* row_hist = g.hist[pass % kHistograms];
    for (int b = tid; b < kBuckets; b += kThreads) hist[b] = 0;
    if (pass >= 2 && blockIdx.x == 0) {  // every block read that one before the last barrier
      for (int b = tid; b < kBuckets; b += kThreads) g.hist[(pass + 1) % kHistograms][b] = 0;
    }
    __syncthreads();
    // Value digits read the high halves only; index digits (ties) the low halves too.
    const uint32_t prefix_high = prefix >> 32, mask_high = mask >> 32;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (chunk.past(i)) break;
      const uint32_t h = chunk.high[i];
      bool in = chunk.exists(i) && (h & mask_high) == prefix_high;
      uint32_t bits;
      if (lo >= 32) {
        bits = h >> (lo - 32);
      } else {
        const uint32_t l = chunk.low(i);
        in = in && (l & static_cast<uint32_t>(mask)) == static_cast<uint32_t>(prefix);
        bits = l >> lo;
      }
      const int bucket = in ? static_cast<int>(bits & digit) : kBuckets;
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, bucket);
      if (in && lane == __ffs(peers) - 1) atomicAdd(&hist[bucket], __popc(peers));
    }
    __syncthreads();
    for (int b = tid; b < kBuckets; b += kThreads) {
      if (hist[b] != 0) atomicAdd(&row_hist[b], hist[b]);
    }
    __syncthreads();
    if (tid == 0) xllm::row_barrier(&g.barrier, gridDim.x, blockIdx.x == 0);
    __syncthreads();
    const int3 found = find_bucket([&](int q) { return __ldcg(reinterpret_cast<const int4*>(row_hist) + q); }, remaining);
    prefix |= static_cast<uint64_t>(found.x) << lo;
    mask |= digit << lo;
    remaining -= found.y;
    if (found.z == remaining) break;  // keys are distinct, so at the latest the last digit leaves one key
    hi = lo == 64 - Key<T>::kValueBits ? 32 : lo;
  }
  // The k keys >= prefix (its low bits are zero) are the answer.
  uint64_t* row_winners = a.winners + row * a.k;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    if (chunk.past(i)) break;
    append(row_winners, &g.winners, chunk.key(i), chunk.exists(i) && chunk.key(i) >= prefix);
  }
  __syncthreads();
  if (tid == 0) {
    last = xllm::ticket(&g.ticket) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  for (int i = tid; i < a.k; i += kThreads) winners[i] = __ldcg(reinterpret_cast<const unsigned long long*>(row_winners + i));
  __syncthreads();
  // Sorted, up to kRankSortMaxK keys: by rank; more keys: a bitonic sort in place.
  if (a.sorted && a.k <= kRankSortMaxK) {
    write_by_rank(winners, a.k, a.k, a.flip, values + row * a.k, a.indices + row * a.k);
  } else {
    if (a.sorted) sort_descending(winners, a.k);
    for (int i = tid; i < a.k; i += kThreads) {
      values[row * a.k + i] = Key<T>::value_of(winners[i], a.flip);
      a.indices[row * a.k + i] = index_of(winners[i]);
    }
  }
  // Every block is past every barrier and has appended: leave the row's scratch zero.
  for (int b = tid; b < kHistograms * kBuckets; b += kThreads) (&g.hist[0][0])[b] = 0;
  if (tid == 0) {
    g.barrier = 0;
    g.winners = 0;
    g.ticket = 0;
  }
}

size_t shared_bytes(int k) { return static_cast<size_t>(capacity(k) + cut_limit(k)) * sizeof(uint64_t); }

struct Plan {
  int grid_items;         // the grid path, at most this many elements a thread (every block resident); 0: split
  int64_t splits, chunk;  // blocks per row, elements per block (a multiple of every vector width)
};

// The grid path when the batch fits the GPU's resident blocks (one wave) at one tile a block.
// Else blocks per row as many as run at once on the GPU (one wave), each streaming at least
// kMinChunk elements and at least 16 k, so that merging splits * k keys stays cheaper than the
// row; but where k is large or that merge would still take many keys, the grid path with up to
// kGridItems elements a thread if the batch fits (measured on the H100, k = 1024, B = 16,
// V = 151936: 55 us against 105).
Plan plan(int64_t batch, int64_t vocab, int64_t k, int device) {
  const int64_t sms = at::cuda::getDeviceProperties(device)->multiProcessorCount;
  const int64_t tiles = (vocab + kTile - 1) / kTile;
  auto grid = [&](int items, int64_t blocks_per_sm) -> Plan {  // grid_items 0: the batch does not fit
    const int64_t blocks = std::min(blocks_per_sm * sms / batch, tiles);
    if (batch > kGridRows || blocks < 2) return {0, 0, 0};
    const int64_t chunk = round_up((vocab + blocks - 1) / blocks, 16);
    return {chunk <= kThreads * items ? items : 0, (vocab + chunk - 1) / chunk, chunk};
  };
  if (const Plan p = grid(kItems, kBlocksPerSm); p.grid_items) return p;
  int64_t splits = 1;
  if (batch <= kMaxTicketRows) {
    const int64_t by_gpu = kBlocksPerSm * sms / batch;
    const int64_t by_size = vocab / std::max<int64_t>(kMinChunk, 16 * k);
    splits = std::max<int64_t>(1, std::min(by_gpu, by_size));
  }
  if (k >= kGridLargeK || splits * k > kGridMergeKeys) {
    if (const Plan p = grid(kGridItems, kGridBlocksPerSm); p.grid_items) return p;
  }
  const int64_t chunk = round_up((vocab + splits - 1) / splits, 16);
  return {0, (vocab + chunk - 1) / chunk, chunk};  // rounding the chunk up may leave fewer blocks
}

// Workspace layout: the grid path's rows and winners (kGridBytes), the split path's tickets
// (kTicketBytes), then its partial keys and bounds. The first two are zero between calls.
template <typename T, int VEC>
void launch_grid(const torch::Tensor& x, int64_t k, bool largest, bool sorted, const Plan& p,
                 torch::Tensor& workspace, torch::Tensor& values, torch::Tensor& indices) {
  GridArgs a{};
  a.vocab = x.size(1);
  a.chunk = p.chunk;
  a.k = static_cast<int>(k);
  a.flip = largest ? 0 : ~0ull;
  a.sorted = sorted;
  a.rows = static_cast<GridRow*>(workspace.data_ptr());
  a.winners = reinterpret_cast<uint64_t*>(a.rows + kGridRows);
  a.indices = indices.data_ptr<int64_t>();
  const dim3 grid(static_cast<unsigned>(p.splits), static_cast<unsigned>(x.size(0)));
  const auto kernel = p.grid_items == kItems ? grid_topk_kernel<T, VEC, kItems> : grid_topk_kernel<T, VEC, kGridItems>;
  xllm::launch_with(xllm::cooperative(), kernel, grid, dim3(kThreads), 0,
                    reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<T*>(values.data_ptr()), a);
}

template <typename T, int VEC>
void launch(const torch::Tensor& x, int64_t k, bool largest, bool sorted, torch::Tensor& workspace,
            torch::Tensor& values, torch::Tensor& indices) {
  const int64_t batch = x.size(0), vocab = x.size(1);
  const Plan p = plan(batch, vocab, k, x.get_device());
  if (p.grid_items) return launch_grid<T, VEC>(x, k, largest, sorted, p, workspace, values, indices);
  const int64_t splits = p.splits;
  Args a{};
  a.vocab = vocab;
  a.k = static_cast<int>(k);
  a.splits = static_cast<int>(splits);
  a.chunk = p.chunk;
  a.flip = largest ? 0 : ~0ull;
  a.sorted = sorted;
  a.indices = indices.data_ptr<int64_t>();
  if (splits > 1) {
    auto* base = static_cast<unsigned char*>(workspace.data_ptr()) + kGridBytes;
    a.tickets = reinterpret_cast<unsigned int*>(base);
    a.partial = reinterpret_cast<uint64_t*>(base + kTicketBytes);
    a.bounds = a.partial + batch * splits * merge_slot(splits, k);
  }
  const size_t smem = shared_bytes(static_cast<int>(k));
  constexpr auto kernel = topk_kernel<T, VEC>;
  xllm::configure_once<kernel>(x.get_device(), static_cast<int>(shared_bytes(kMaxK)));
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<T*>(values.data_ptr()), a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_vec(const torch::Tensor& x, int64_t k, bool largest, bool sorted, torch::Tensor& workspace,
                  torch::Tensor& values, torch::Tensor& indices) {
  constexpr int kVec = 16 / sizeof(T);
  if (x.size(1) % kVec == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0) {
    launch<T, kVec>(x, k, largest, sorted, workspace, values, indices);
  } else {
    launch<T, 1>(x, k, largest, sorted, workspace, values, indices);
  }
}

}  // namespace

// Bytes of workspace one call with this shape needs on `device` (0: none).
int64_t workspace_size(int64_t batch, int64_t vocab, int64_t k, int64_t device) {
  TORCH_CHECK(batch >= 1 && vocab >= 1 && k >= 1, "batch, vocab, k: at least 1 each");
  const Plan p = plan(batch, vocab, k, static_cast<int>(device));
  if (p.grid_items) return kGridBytes;
  const int64_t keys = batch * p.splits * (merge_slot(p.splits, k) + 1);  // partial keys, then bounds
  return p.splits > 1 ? kGridBytes + kTicketBytes + keys * static_cast<int64_t>(sizeof(uint64_t)) : 0;
}

// The binding: writes the (batch, k) values and int64 indices into the tensors given, or into new
// ones (allocated here, where it costs a fraction of a Python torch.empty); returns them.
std::tuple<torch::Tensor, torch::Tensor> topk(torch::Tensor x, int64_t k, bool largest, bool sorted,
                                              c10::optional<torch::Tensor> workspace,
                                              c10::optional<torch::Tensor> values_opt,
                                              c10::optional<torch::Tensor> indices_opt) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x: contiguous 2-D CUDA tensor");
  TORCH_CHECK(k >= 1 && k <= kMaxK && k <= x.size(1), "k: 1 to min(1024, vocab)");
  TORCH_CHECK(x.size(1) < (int64_t{1} << 31), "x: vocab below 2^31");
  torch::Tensor values = values_opt.has_value() ? *values_opt : torch::empty({x.size(0), k}, x.options());
  torch::Tensor indices =
      indices_opt.has_value() ? *indices_opt : torch::empty({x.size(0), k}, x.options().dtype(torch::kInt64));
  TORCH_CHECK(values.is_contiguous() && values.scalar_type() == x.scalar_type() && values.size(0) == x.size(0) &&
                  values.size(1) == k,
              "values: contiguous (batch, k) tensor of x's dtype");
  TORCH_CHECK(indices.is_contiguous() && indices.scalar_type() == torch::kInt64 && indices.size(0) == x.size(0) &&
                  indices.size(1) == k,
              "indices: contiguous (batch, k) int64 tensor");
  if (x.size(0) == 0) return {values, indices};
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t need = workspace_size(x.size(0), x.size(1), k, x.get_device());
  torch::Tensor ws;
  if (need > 0) {
    TORCH_CHECK(workspace.has_value() && workspace->is_cuda() && workspace->nbytes() >= static_cast<size_t>(need),
                "workspace: at least ", need, " bytes on x's device, zero-filled before first use");
    ws = *workspace;
  }
  switch (x.scalar_type()) {
    case torch::kFloat32: dispatch_vec<float>(x, k, largest, sorted, ws, values, indices); break;
    case torch::kBFloat16: dispatch_vec<__nv_bfloat16>(x, k, largest, sorted, ws, values, indices); break;
    case torch::kFloat16: dispatch_vec<__half>(x, k, largest, sorted, ws, values, indices); break;
    default: TORCH_CHECK(false, "x: float32, bfloat16 or float16");
  }
  return {values, indices};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("workspace_size", &workspace_size, "workspace bytes for (batch, vocab, k) on a device index");
  m.def("topk", &topk, "radix-select top-k over the last dim into (values, indices)");
}
