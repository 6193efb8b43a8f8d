// Step logit_softmax: softmax / log-softmax of logits / temperature over the last dim, float32 out.
//
// Main paths, one launch, logits read once: the blocks of a row each take a chunk of it, find the
// chunk's (max, sum of exp), combine the row's, and write their chunk normalised.
//   - Small batches (a row wants more than 16 blocks): the whole GPU, every block resident
//     (cooperative launch), each thread's elements held in registers; the blocks of a row meet at
//     a barrier in global memory.
//   - Otherwise a thread-block cluster of 1 to 16 blocks per row (Hopper) combines through
//     distributed shared memory. Each block caches its chunk in shared memory (bulk copies when
//     rows are 16-byte aligned, taking each piece's max as it lands; element loads otherwise);
//     chunks of at most 40 KB where the row allows leave room for several blocks per SM.
//
// Rows too long for 16 blocks' shared memory take two launches over (batch, splits) blocks:
//   1. partial_stats: online (max, sum of exp) of its chunk;
//   2. normalize: combines the row's partials, then reads the chunk again and writes it.
// NaN anywhere in a row makes the whole row NaN and an all -inf row is NaN, as torch.softmax.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include "bulk_copy.cuh"
#include "launch_helpers.cuh"
#include "row_barrier.cuh"
#include "vector_load.cuh"
#include "warp_reduce.cuh"

namespace cg = cooperative_groups;

namespace {

using xllm::warp_sum;

constexpr int kThreads = 256;
constexpr int kMaxCluster = 16;                   // non-portable cluster size, allowed on H100
constexpr int64_t kChunkBytes = 40 * 1024;        // shared memory per block where rows allow: five blocks per SM
constexpr int kMaxChunkBytes = 100 * 1024;        // the most one block caches (two blocks per SM)
constexpr int64_t kMinClusterChunk = 1024;        // do not split rows finer than this (elements)
constexpr int kGridThreads = 256;                 // grid path: up to two blocks of 256 threads per SM
constexpr int kGridBlocksPerSm = 2;
constexpr int64_t kGridMinChunk = 2048;           // grid path: elements per block at least
constexpr int kGridItems = 32;                    // grid path: elements per thread at most (held in registers)
constexpr int kGridMaxSplits = 256;               // grid path: blocks per row at most
constexpr int kGridMaxRows = 32;                  // grid path: rows at most (each wants more than kMaxCluster blocks)

// Statistics of raw logits x in a row with temperature t, kept in x's own scale:
// exp(x / t - max / t) = 2^((x - max) * c) with c = log2(e) / t, so that each element costs one
// subtraction, one multiplication and one exp2 (no division), and (x - max) loses nothing to a
// division first.
struct Stats {
  float m;  // running max of x
  float s;  // sum of 2^((x - m) * c)
};

constexpr float kLog2e = 1.4426950408889634f;

// The exponent scale c of a row with temperature t.
__device__ __forceinline__ float exp2_scale(float t) { return kLog2e / t; }

__device__ __forceinline__ void add(Stats& a, float x, float c) {
  if (x > a.m) {
    a.s = a.s * exp2f((a.m - x) * c) + 1.f;  // a.m = -inf: 0 * 0 + 1
    a.m = x;
  } else if (x != -INFINITY) {
    a.s += exp2f((x - a.m) * c);  // NaN x gives NaN, which spreads to the whole row
  }
}

// a's sum rescaled to a max m at least a.m (an empty sum stays 0, whatever its max).
__device__ __forceinline__ float rescaled(Stats a, float m, float c) { return a.s == 0.f ? 0.f : a.s * exp2f((a.m - m) * c); }

__device__ __forceinline__ Stats combine(Stats a, Stats b, float c) {
  float m = fmaxf(a.m, b.m);
  return {m, rescaled(a, m, c) + rescaled(b, m, c)};
}

// The row's normalised value of x: softmax, or log-softmax (z - log(sum) with z = (x - m) / t
// divided exactly, since log-probabilities keep their magnitude).
template <bool LOG>
__device__ __forceinline__ float normalised(float x, Stats total, float t, float c, float sum_term) {
  return LOG ? (x - total.m) / t - sum_term : exp2f((x - total.m) * c) * sum_term;
}

template <bool LOG>
__device__ __forceinline__ float inv_or_log_sum(Stats total) { return LOG ? logf(total.s) : 1.f / total.s; }

// Max that keeps a NaN once it has seen one.
__device__ __forceinline__ float nan_max(float m, float x) { return (x > m || x != x) ? x : m; }

__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffff, v, off));
  return v;
}

// The combined Stats of a warp's lanes, in every lane: the max first, then the lanes' sums
// rescaled to it (one exp2 per lane rather than one per shuffle step).
__device__ __forceinline__ Stats warp_combine(Stats v, float c) {
  const float m = warp_max(v.m);
  return {m, warp_sum(rescaled(v, m, c))};
}

// The Stats of a block's elements in two block-wide reductions: the max of the threads' maxima
// m, then the sum of each thread's sum_from(max) (its sum of 2^((x - max) * c)), so that no
// partial sum needs rescaling. Once per kernel: its shared scratch is not reused.
template <int THREADS, typename SumFrom>
__device__ __forceinline__ Stats block_stats(float m, SumFrom sum_from) {
  constexpr int kWarps = THREADS / 32;
  __shared__ float warp_part[2][kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  m = warp_max(m);
  if (lane == 0) warp_part[0][warp] = m;
  __syncthreads();
  float max = warp_part[0][0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) max = nan_max(max, warp_part[0][w]);
  const float s = warp_sum(max == -INFINITY ? 0.f : sum_from(max));  // all -inf (or none): the sum is 0
  if (lane == 0) warp_part[1][warp] = s;
  __syncthreads();
  float sum = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) sum += warp_part[1][w];
  return {max, sum};
}

template <int THREADS = kThreads>
__device__ Stats block_reduce(Stats v, float c) {
  __shared__ Stats warp_stats[THREADS / 32];
  v = warp_combine(v, c);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_stats[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_combine(lane < THREADS / 32 ? warp_stats[lane] : Stats{-INFINITY, 0.f}, c);
    if (lane == 0) warp_stats[0] = v;
  }
  __syncthreads();
  Stats r = warp_stats[0];
  __syncthreads();
  return r;
}

using xllm::load;
using xllm::to_float;
using xllm::Vec;

struct Chunk {
  int64_t begin, end;
};

// The row's temperature: the per-row tensor if given, else the scalar; 0 is read as 1.
__device__ __forceinline__ float row_temperature(const float* temp, float scalar, int64_t row) {
  const float t = temp ? temp[row] : scalar;
  return t == 0.f ? 1.f : t;
}

__device__ __forceinline__ Chunk chunk_of(int64_t vocab, int64_t chunk) {
  int64_t begin = blockIdx.y * chunk;
  return {begin, min(begin + chunk, vocab)};
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) partial_stats(const T* __restrict__ logits, const float* __restrict__ temp,
                                                          float temp_scalar, Stats* __restrict__ partials, int64_t vocab,
                                                          int64_t chunk) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * vocab;
  const float c = exp2_scale(row_temperature(temp, temp_scalar, row));
  const Chunk ch = chunk_of(vocab, chunk);
  Stats st{-INFINITY, 0.f};
  for (int64_t i = ch.begin + threadIdx.x * VEC; i < ch.end; i += kThreads * VEC) {
    Vec<T, VEC> v = load<T, VEC>(x + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) add(st, to_float(v.v[j]), c);
  }
  st = block_reduce(st, c);
  if (threadIdx.x == 0) partials[row * gridDim.y + blockIdx.y] = st;
}

template <typename T, int VEC, bool LOG>
__global__ void __launch_bounds__(kThreads) normalize(const T* __restrict__ logits, const float* __restrict__ temp,
                                                      float temp_scalar, const Stats* __restrict__ partials,
                                                      float* __restrict__ out, int64_t vocab, int64_t chunk) {
  const int64_t row = blockIdx.x;
  const float t = row_temperature(temp, temp_scalar, row), c = exp2_scale(t);
  Stats st{-INFINITY, 0.f};
  for (int i = threadIdx.x; i < gridDim.y; i += kThreads) st = combine(st, partials[row * gridDim.y + i], c);
  st = block_reduce(st, c);
  const float sum_term = inv_or_log_sum<LOG>(st);
  const T* x = logits + row * vocab;
  float* y = out + row * vocab;
  const Chunk ch = chunk_of(vocab, chunk);
  for (int64_t i = ch.begin + threadIdx.x * VEC; i < ch.end; i += kThreads * VEC) {
    Vec<T, VEC> v = load<T, VEC>(x + i);
    Vec<float, VEC> r;
#pragma unroll
    for (int j = 0; j < VEC; ++j) r.v[j] = normalised<LOG>(to_float(v.v[j]), st, t, c, sum_term);
    *reinterpret_cast<Vec<float, VEC>*>(y + i) = r;
  }
}


using xllm::round_up;
using xllm::bulk_load;
using xllm::fence_barrier_init;
using xllm::init_barrier;
using xllm::wait_barrier;

constexpr int kPieces = 4;  // a block's chunk arrives in this many bulk copies, each with its own barrier

// This thread's vectors of a chunk of n elements cut into pieces of `piece` elements: f(i)
// for each vector start i, piece by piece; before each piece, arrive(p).
template <int THREADS, int VEC, typename Arrive, typename F>
__device__ __forceinline__ void for_each_vector(int n, int piece, Arrive arrive, F f) {
  for (int p = 0; p * piece < n; ++p) {
    const int from = p * piece, to = min(from + piece, n);
    arrive(p);
#pragma unroll 4
    for (int i = from + threadIdx.x * VEC; i < to; i += THREADS * VEC) f(i);
  }
}

// A block's share of one row: its chunk, cached in shared memory as the logits' own type.
// BULK: the chunk arrives through kPieces bulk copies (rows 16-byte aligned and a whole number
// of 16-byte vectors), and the block takes each piece's max as soon as it lands; otherwise the
// threads copy it element by element. Then each thread sums 2^((x - max) * c) over the same
// elements against the block's max (no data-dependent branch). Returns the block's Stats (c: the
// row's exp2_scale).
template <typename T, int VEC, bool BULK, int THREADS>
__device__ Stats cache_chunk(const T* __restrict__ x, int n, float c, T* cache, uint64_t* arrived) {
  // Piece p is [p * piece, min((p + 1) * piece, n)); piece is a whole number of vectors.
  const int piece = BULK ? static_cast<int>(round_up((n + kPieces - 1) / kPieces, VEC)) : n;
  float m = -INFINITY;
  if constexpr (BULK) {
    if (threadIdx.x == 0) {
      for (int p = 0; p < kPieces; ++p) {
        init_barrier(&arrived[p]);
      }
      fence_barrier_init();
      for (int from = 0, p = 0; from < n; from += piece, ++p) {
        const int bytes = (min(from + piece, n) - from) * static_cast<int>(sizeof(T));
        bulk_load(cache + from, x + from, static_cast<uint32_t>(bytes), &arrived[p]);
      }
    }
    __syncthreads();
    for_each_vector<THREADS, VEC>(n, piece, [&](int p) { wait_barrier(&arrived[p]); }, [&](int i) {
      const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(cache + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) m = nan_max(m, to_float(v.v[j]));
    });
  } else {
    for_each_vector<THREADS, 1>(n, piece, [](int) {}, [&](int i) {
      const T v = x[i];
      cache[i] = v;
      m = nan_max(m, to_float(v));
    });
  }
  return block_stats<THREADS>(m, [&](float max) {
    float s = 0.f;
    for_each_vector<THREADS, VEC>(n, piece, [](int) {}, [&](int i) {
      const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(cache + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += exp2f((to_float(v.v[j]) - max) * c);  // NaN stays NaN
    });
    return s;
  });
}

// Writes the cached chunk of n elements normalised by the row's (max, sum) to y.
template <typename T, int VEC, bool LOG, int THREADS>
__device__ __forceinline__ void write_chunk(const T* cache, int n, float t, float c, Stats total, float* __restrict__ y) {
  const float sum_term = inv_or_log_sum<LOG>(total);
#pragma unroll 4
  for (int i = threadIdx.x * VEC; i < n; i += THREADS * VEC) {
    const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(cache + i);
    Vec<float, VEC> r;
#pragma unroll
    for (int j = 0; j < VEC; ++j) r.v[j] = normalised<LOG>(to_float(v.v[j]), total, t, c, sum_term);
    *reinterpret_cast<Vec<float, VEC>*>(y + i) = r;
  }
}

// One cluster per row: the blocks combine their (max, sum) through distributed shared memory.
template <typename T, int VEC, bool LOG, bool BULK, int THREADS>
__global__ void __launch_bounds__(THREADS) cluster_softmax(const T* __restrict__ logits, const float* __restrict__ temp,
                                                          float temp_scalar, float* __restrict__ out, int64_t vocab,
                                                          int64_t chunk) {
  extern __shared__ __align__(128) unsigned char cache_bytes[];
  T* cache = reinterpret_cast<T*>(cache_bytes);
  __shared__ Stats block_stats, row_stats;
  __shared__ uint64_t arrived[kPieces];
  cg::cluster_group cluster = cg::this_cluster();
  const int64_t row = blockIdx.y;
  const float t = row_temperature(temp, temp_scalar, row), c = exp2_scale(t);
  const int64_t begin = static_cast<int64_t>(cluster.block_rank()) * chunk;
  const int n = static_cast<int>(min(begin + chunk, vocab) - begin);
  const Stats st = cache_chunk<T, VEC, BULK, THREADS>(logits + row * vocab + begin, n, c, cache, arrived);
  if (threadIdx.x == 0) block_stats = st;
  cluster.sync();
  if (threadIdx.x < 32) {
    const unsigned lane = threadIdx.x;
    const Stats v = warp_combine(
        lane < cluster.num_blocks() ? *cluster.map_shared_rank(&block_stats, lane) : Stats{-INFINITY, 0.f}, c);
    if (lane == 0) row_stats = v;
  }
  cluster.sync();  // every block's stats were read before any block moves on (and may exit)
  write_chunk<T, VEC, LOG, THREADS>(cache, n, t, c, row_stats, out + row * vocab + begin);
}

// The grid path's exchange of (max, sum) between the blocks of a row, with no fence: each value
// travels with the row's epoch number in one 8-byte word (an 8-byte store is seen whole or not at
// all), so a reader that finds the epoch it expects has the value too. Slot (row, block) belongs
// to that block of that row in every launch, and a row's epoch only grows (by one per launch,
// wrapping after 2^32), so a stale slot never shows the current epoch. Readers wait at the row's
// barrier first (one word polled per block, not every slot by every block).
__device__ __forceinline__ uint64_t epoch_word(float value, unsigned epoch) {
  return static_cast<uint64_t>(epoch) << 32 | __float_as_uint(value);
}
using xllm::load_relaxed;
using xllm::store_relaxed;

// One lane per call: publish this block's Stats as slot pair `mine` with `epoch`.
__device__ __forceinline__ void publish(uint64_t* mine, Stats st, unsigned epoch) {
  store_relaxed(mine, epoch_word(st.m, epoch));
  store_relaxed(mine + 1, epoch_word(st.s, epoch));
}

// One warp, past the row's barrier: the combined Stats of the row's `blocks` slot pairs, once
// every one shows `epoch` (lane L reads blocks L, L + 32, ..., all of its loads in flight at
// once, again for any not yet visible).
__device__ Stats gather(const uint64_t* slots, unsigned blocks, unsigned epoch, float c) {
  constexpr int kPerLane = kGridMaxSplits / 32;
  const unsigned lane = threadIdx.x % 32;
  uint64_t word[kPerLane][2];
  unsigned pending = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) pending |= (lane + 32 * i < blocks ? 1u : 0u) << i;
  while (pending != 0) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (pending >> i & 1) {
        word[i][0] = load_relaxed(slots + 2 * (lane + 32 * i));
        word[i][1] = load_relaxed(slots + 2 * (lane + 32 * i) + 1);
      }
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if ((pending >> i & 1) && word[i][0] >> 32 == epoch && word[i][1] >> 32 == epoch) pending &= ~(1u << i);
    }
  }
  // The row's max first, then every slot's sum rescaled to it: independent exp2s, where a chain of
  // pairwise combines made each wait for the one before. The loops stop at the lane's last slot.
  auto slot = [&](int i) {
    return Stats{__uint_as_float(static_cast<uint32_t>(word[i][0])), __uint_as_float(static_cast<uint32_t>(word[i][1]))};
  };
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    if (lane + 32 * i >= blocks) break;
    m = nan_max(m, slot(i).m);
  }
  m = warp_max(m);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    if (lane + 32 * i >= blocks) break;
    s += rescaled(slot(i), m, c);
  }
  return {m, warp_sum(s)};
}

// Grid path: small batches over the whole GPU. Each row is split over gridDim.x blocks (more than
// a cluster holds), all resident at once (cooperative launch); each thread holds its at most
// kGridItems elements of the block's chunk in registers. Warp 0 publishes the block's (max, sum),
// arrives at the row's barrier, and past it gathers all of the row's (see publish); block 0 then
// moves the row's epoch on for the next launch (every block of the row has read it by then).
// Every thread writes its elements.
template <typename T, int VEC, bool LOG>
__global__ void __launch_bounds__(kGridThreads, 2) grid_softmax(const T* __restrict__ logits, const float* __restrict__ temp,
                                                                float temp_scalar, float* __restrict__ out, int64_t vocab,
                                                                int64_t chunk, uint64_t* __restrict__ slots,
                                                                unsigned* __restrict__ epochs, unsigned* __restrict__ counters) {
  constexpr int kLoads = kGridItems / VEC;
  __shared__ Stats total;
  const int64_t row = blockIdx.y;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int n = static_cast<int>(min(begin + chunk, vocab) - begin);
  auto at = [](int u) { return (u * kGridThreads + static_cast<int>(threadIdx.x)) * VEC; };
  // f(u) for this thread's vectors u = 0, 1, ... of the chunk, stopping at the first past its end:
  // the work on them is not run as all kLoads iterations predicated off, whose unused ones cost
  // more than the used (at B = 1 a thread holds 2 of its 8 vectors). The loads themselves stay
  // predicated, so that they all issue back to back.
  auto live_vectors = [&](auto f) {
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      if (at(u) >= n) break;
      f(u);
    }
  };
  const T* x = logits + row * vocab + begin;
  Vec<T, VEC> v[kLoads];
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    if (at(u) < n) v[u] = load<T, VEC>(x + at(u));
  }
  // Behind the loads (what waits for these must not hold them up): the temperature and, in
  // thread 0, this launch's epoch and the barrier's phase.
  const unsigned epoch = threadIdx.x == 0 ? load_relaxed(epochs + row) + 1 : 0;
  const unsigned phase = threadIdx.x == 0 ? xllm::row_phase(counters + row) : 0;
  const float t = row_temperature(temp, temp_scalar, row), c = exp2_scale(t);
  float m = -INFINITY;
  live_vectors([&](int u) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) m = nan_max(m, to_float(v[u].v[j]));
  });
  const Stats st = block_stats<kGridThreads>(m, [&](float max) {
    float s = 0.f;
    live_vectors([&](int u) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += exp2f((to_float(v[u].v[j]) - max) * c);
    });
    return s;
  });
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp == 0) {
    const unsigned row_epoch = __shfl_sync(0xffffffff, epoch, 0);
    uint64_t* row_slots = slots + 2 * row * kGridMaxSplits;
    if (lane == 0) {
      publish(row_slots + 2 * blockIdx.x, st, row_epoch);
      xllm::row_arrive(counters + row, gridDim.x, blockIdx.x == 0);
      xllm::row_wait(counters + row, phase);
    }
    __syncwarp();
    const Stats r = gather(row_slots, gridDim.x, row_epoch, c);
    if (lane == 0) {
      total = r;
      if (blockIdx.x == 0) store_relaxed(epochs + row, row_epoch);
    }
  }
  __syncthreads();
  const Stats row_total = total;
  const float sum_term = inv_or_log_sum<LOG>(row_total);
  float* y = out + row * vocab + begin;
  live_vectors([&](int u) {
    Vec<float, VEC> r;
#pragma unroll
    for (int j = 0; j < VEC; ++j) r.v[j] = normalised<LOG>(to_float(v[u].v[j]), row_total, t, c, sum_term);
    *reinterpret_cast<Vec<float, VEC>*>(y + at(u)) = r;
  });
}

// Blocks per row for cluster_softmax, 0 when a row does not fit 16 blocks' shared memory:
// the fewest whose chunk fits kChunkBytes (kMaxChunkBytes at 16 blocks), doubled while the
// batch leaves SMs idle.
int cluster_size(int sms, int64_t batch, int64_t vocab, int vec, int64_t elem_bytes) {
  auto chunk_bytes = [&](int cs) { return round_up((vocab + cs - 1) / cs, vec) * elem_bytes; };
  int cs = 1;
  while (cs < kMaxCluster && chunk_bytes(cs) > kChunkBytes) cs *= 2;
  if (chunk_bytes(cs) > kMaxChunkBytes || batch > 65535) return 0;
  while (cs < kMaxCluster && batch * cs < sms && chunk_bytes(2 * cs) >= kMinClusterChunk * elem_bytes) cs *= 2;
  return cs;
}

// Elements per block for grid_softmax, 0 when the batch is better served by clusters: the
// grid path is for rows that want more blocks than a cluster holds (all of the batch's
// blocks resident at once, at least kGridMinChunk elements each, at most kGridItems a thread).
int64_t grid_chunk(int sms, int64_t batch, int64_t vocab, int vec) {
  const int64_t by_gpu = std::min<int64_t>(kGridBlocksPerSm * sms, kGridMaxSplits) / batch;
  const int64_t by_work = (vocab + kGridMinChunk - 1) / kGridMinChunk;
  const int64_t splits = std::min(by_gpu, by_work);
  if (splits <= kMaxCluster || batch > kGridMaxRows) return 0;
  const int64_t chunk = round_up((vocab + splits - 1) / splits, vec);
  return chunk <= kGridThreads * kGridItems ? chunk : 0;
}

// The grid path's scratch on each device, made once and zeroed: a pair of exchange slots per
// (row, block), an epoch and a barrier counter per row (see publish).
struct GridScratch {
  uint64_t* slots;
  unsigned* epochs;
  unsigned* counters;
};

GridScratch grid_scratch(int device) {
  static GridScratch scratch[64];
  static std::once_flag once[64];
  std::call_once(once[device], [&] {
    const size_t slots = 2 * static_cast<size_t>(kGridMaxRows) * kGridMaxSplits;
    C10_CUDA_CHECK(cudaMalloc(&scratch[device].slots, slots * sizeof(uint64_t)));
    C10_CUDA_CHECK(cudaMalloc(&scratch[device].epochs, 2 * kGridMaxRows * sizeof(unsigned)));
    scratch[device].counters = scratch[device].epochs + kGridMaxRows;
    C10_CUDA_CHECK(cudaMemset(scratch[device].slots, 0, slots * sizeof(uint64_t)));
    C10_CUDA_CHECK(cudaMemset(scratch[device].epochs, 0, 2 * kGridMaxRows * sizeof(unsigned)));
  });
  return scratch[device];
}

template <typename T, int VEC, bool LOG>
void launch_grid(const torch::Tensor& logits, const float* temp, float temp_scalar, torch::Tensor& out, int64_t chunk) {
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  const int device = logits.get_device();
  const GridScratch scratch = grid_scratch(device);
  const dim3 grid(static_cast<unsigned>((vocab + chunk - 1) / chunk), static_cast<unsigned>(batch));
  xllm::launch_with(xllm::cooperative(), grid_softmax<T, VEC, LOG>, grid, dim3(kGridThreads), 0,
                    reinterpret_cast<const T*>(logits.data_ptr()), temp, temp_scalar, out.data_ptr<float>(), vocab, chunk,
                    scratch.slots, scratch.epochs, scratch.counters);
}

template <typename T, int VEC, bool LOG, int THREADS>
void launch_cluster(const torch::Tensor& logits, const float* temp, float temp_scalar, torch::Tensor& out, int cs) {
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  const int64_t chunk = round_up((vocab + cs - 1) / cs, VEC);
  constexpr auto kernel = cluster_softmax<T, VEC, LOG, (VEC > 1), THREADS>;
  xllm::configure_once<kernel>(logits.get_device(), kMaxChunkBytes, /*nonportable_clusters=*/true);
  xllm::launch_with(xllm::cluster_of(cs), kernel, dim3(cs, static_cast<unsigned>(batch)), dim3(THREADS),
                    static_cast<size_t>(chunk) * sizeof(T), reinterpret_cast<const T*>(logits.data_ptr()), temp,
                    temp_scalar, out.data_ptr<float>(), vocab, chunk);
}

// Threads per cluster block: 512 while the grid is smaller than the GPU (latency-bound rows
// get more hands each), else 256 so that more blocks share an SM.
template <typename T, int VEC, bool LOG>
void launch_cluster(const torch::Tensor& logits, const float* temp, float temp_scalar, torch::Tensor& out, int sms,
                    int cs) {
  if (logits.size(0) * cs <= sms) {
    launch_cluster<T, VEC, LOG, 512>(logits, temp, temp_scalar, out, cs);
  } else {
    launch_cluster<T, VEC, LOG, 256>(logits, temp, temp_scalar, out, cs);
  }
}

template <typename T, int VEC>
void launch(const torch::Tensor& logits, const float* temp, float temp_scalar, bool log, torch::Tensor& out) {
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (const int64_t chunk = grid_chunk(sms, batch, vocab, VEC); chunk > 0) {
    if (log) {
      launch_grid<T, VEC, true>(logits, temp, temp_scalar, out, chunk);
    } else {
      launch_grid<T, VEC, false>(logits, temp, temp_scalar, out, chunk);
    }
    return;
  }
  if (const int cs = cluster_size(sms, batch, vocab, VEC, sizeof(T)); cs > 0) {
    if (log) {
      launch_cluster<T, VEC, true>(logits, temp, temp_scalar, out, sms, cs);
    } else {
      launch_cluster<T, VEC, false>(logits, temp, temp_scalar, out, sms, cs);
    }
    return;
  }
  // Enough blocks for ~4 per SM, but at least 4 vector loads per thread in each chunk.
  const int64_t by_gpu = (4 * sms + batch - 1) / batch;
  const int64_t by_work = (vocab + kThreads * VEC * 4 - 1) / (kThreads * VEC * 4);
  const int64_t splits = std::max<int64_t>(1, std::min(by_gpu, by_work));
  const int64_t chunk = ((vocab + splits - 1) / splits + VEC - 1) / VEC * VEC;
  const int64_t chunks = (vocab + chunk - 1) / chunk;
  auto partials = torch::empty({batch * chunks * 2}, logits.options().dtype(torch::kFloat32));
  Stats* p = reinterpret_cast<Stats*>(partials.data_ptr<float>());
  const dim3 grid(batch, chunks);  // batch on x: up to 2^31 - 1 rows
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* x = reinterpret_cast<const T*>(logits.data_ptr());
  partial_stats<T, VEC><<<grid, kThreads, 0, stream>>>(x, temp, temp_scalar, p, vocab, chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (log) {
    normalize<T, VEC, true><<<grid, kThreads, 0, stream>>>(x, temp, temp_scalar, p, out.data_ptr<float>(), vocab, chunk);
  } else {
    normalize<T, VEC, false><<<grid, kThreads, 0, stream>>>(x, temp, temp_scalar, p, out.data_ptr<float>(), vocab, chunk);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_vec(const torch::Tensor& logits, const float* temp, float temp_scalar, bool log, torch::Tensor& out) {
  constexpr int kVec = 16 / sizeof(T);
  // Rows start on vector boundaries when vocab % kVec == 0 and both bases are aligned
  // (the float32 output vector is 4 * kVec bytes wide).
  const bool aligned = logits.size(1) % kVec == 0 && reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(out.data_ptr()) % (4 * kVec) == 0;
  if (aligned) {
    launch<T, kVec>(logits, temp, temp_scalar, log, out);
  } else {
    launch<T, 1>(logits, temp, temp_scalar, log, out);
  }
}

}  // namespace

// The binding: writes into `out` when given, else into a new float32 tensor shaped like logits
// (allocated here, where it costs a fraction of a Python torch.empty); returns it.
torch::Tensor logit_softmax(torch::Tensor logits, c10::optional<torch::Tensor> temperature, double temp_scalar,
                            bool log, c10::optional<torch::Tensor> out_opt) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous(), "logits: contiguous 2-D CUDA tensor");
  torch::Tensor out = out_opt.has_value() ? *out_opt : torch::empty(logits.sizes(), logits.options().dtype(torch::kFloat32));
  TORCH_CHECK(out.is_cuda() && out.is_contiguous() && out.scalar_type() == torch::kFloat32 && out.sizes() == logits.sizes(),
              "out: contiguous float32 tensor shaped like logits");
  const float* temp = nullptr;
  if (temperature.has_value()) {
    TORCH_CHECK(temperature->is_cuda() && temperature->scalar_type() == torch::kFloat32 &&
                    temperature->is_contiguous() && temperature->numel() == logits.size(0),
                "temperature: contiguous float32 (batch,)");
    temp = temperature->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  switch (logits.scalar_type()) {
    case torch::kFloat32: dispatch_vec<float>(logits, temp, static_cast<float>(temp_scalar), log, out); break;
    case torch::kBFloat16: dispatch_vec<__nv_bfloat16>(logits, temp, static_cast<float>(temp_scalar), log, out); break;
    case torch::kFloat16: dispatch_vec<__half>(logits, temp, static_cast<float>(temp_scalar), log, out); break;
    default: TORCH_CHECK(false, "logits: float32, bfloat16 or float16");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("logit_softmax", &logit_softmax, "softmax / log-softmax of logits / temperature (float32 out)");
}
