// Step sampler, unfiltered rows: greedy and plain sampling (temperature only: no top-k, top-p,
// min-p or penalties) in one streaming pass (torch-free kernel; the binding is sampler.cu).
// sampling.cuh caches each block's chunk in shared memory for its filters' passes, which limits
// the loads in flight at large batch; without filters one read suffices.
//
// One cluster of blocks per row, each block a tile-aligned chunk. Each warp takes the chunk's
// tiles (tile_weight.cuh) in turn, loading its next tile while it takes one (16-bit logits on
// aligned rows through a ring of shared-memory stages that the bulk copy engine keeps filled;
// others in registers), and records each tile's max and float64 sum of
// 2^((x - tile max) c); it keeps the lowest index of its largest value, and a NaN or +inf shows as
// a NaN sum. The blocks exchange max, argmax and that flag over distributed shared memory (invalid
// row: token -1, logprob NaN; temperature 0: the argmax), then their masses (each tile's sum times
// its scale). A float64 uniform from Philox keyed by (seed, position, round 0) times the row's mass
// picks a block, a tile and -- re-reading that one tile -- the token by the running mass in
// vocabulary order: the first draw of sampling.cuh with the same weights, so the same token up to
// the order of float64 sums (never a token of weight 0: when rounding leaves the running mass
// short, the last positive one).
#pragma once

#include <cooperative_groups.h>

#include <cstdint>

#include "bulk_copy.cuh"
#include "philox.cuh"
#include "sampler/sampling.cuh"
#include "sampler/tile_weight.cuh"
#include "sampler/warp_walk.cuh"
#include "vector_load.cuh"
#include "warp_reduce.cuh"

namespace xllm::sampler {

constexpr int kStreamThreads = 512;
constexpr int kStreamWarps = kStreamThreads / 32;
constexpr int kStreamMaxTiles = 512;  // tiles of a block's chunk at most (262144 tokens)
constexpr int kStreamStageBytes = 64 * 1024;  // a block's ring of bulk-copied tiles (two blocks per SM)

// Tiles in flight per warp in the bulk path (4 of a 16-bit type).
template <typename T>
constexpr int kStreamStages = kStreamStageBytes / (kStreamWarps * kTile * static_cast<int>(sizeof(T)));

struct StreamShared {
  float tile_max[kStreamMaxTiles];
  double tile_mass[kStreamMaxTiles];  // the tile's sum of tile weights, then times its scale
  float warp_max[kStreamWarps];
  int warp_argmax[kStreamWarps], warp_flags[kStreamWarps];
  double warp_mass[kStreamWarps];
  Slot slot[2];  // [0]: max, argmax, flags; [1]: mass (read by the other blocks of the cluster)
  float max;
  int argmax, invalid, chosen_block;
  double total, target;  // the row's mass; the draw's target within the chosen block
};

// One lane's share of a tile: kTile / 32 values, loaded VEC at a time (coalesced across the warp).
template <typename T, int VEC>
struct TilePart {
  static constexpr int kLoads = kTile / (32 * VEC);
  Vec<T, VEC> v[kLoads];

  // Element j of load q is the tile's element q * 32 * VEC + lane * VEC + j (lane order inside).
  __device__ __forceinline__ static int index(int q, int lane, int j) { return q * 32 * VEC + lane * VEC + j; }

  // The tile starting at x (global or shared memory), of `n` elements (a multiple of VEC; those
  // past n are not read).
  __device__ __forceinline__ void load_from(const T* x, int n, int lane) {
#pragma unroll
    for (int q = 0; q < kLoads; ++q) {
      const int i = index(q, lane, 0);
      if (i < n) v[q] = load<T, VEC>(x + i);
    }
  }
  // Element j of load q as float; -inf past the tile's n elements unless FULL (n = kTile).
  template <bool FULL>
  __device__ __forceinline__ float value(int q, int j, int lane, int n) const {
    return FULL || index(q, lane, j) < n ? to_float(v[q].v[j]) : -INFINITY;
  }
};

// A warp's state of the streaming pass: the max so far and its lowest index (in the chunk), and
// whether a NaN or +inf was seen.
struct WarpBest {
  float value = -INFINITY;
  int index = INT32_MAX;
  bool bad = false;
};

// Warp `warp`'s work on one tile (tile number tl of the block, at chunk offset tl * kTile): the
// tile's max and sum of tile weights into shared memory; the argmax only when the tile's max
// beats the warp's (rare after the first tiles); a NaN or +inf seen as a NaN sum (a NaN weighs
// NaN; a +inf is its tile's max, and inf - inf is NaN). FULL: a tile of kTile elements.
template <bool FULL, typename T, int VEC>
__device__ __forceinline__ void take_tile(const TilePart<T, VEC>& part, int tl, int n, float c, WarpBest& best,
                                          StreamShared& sh) {
  using Part = TilePart<T, VEC>;
  const int lane = threadIdx.x % 32, base = tl * kTile, left = n - base;
  float m = -INFINITY;
#pragma unroll
  for (int q = 0; q < Part::kLoads; ++q) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) m = fmaxf(m, part.template value<FULL>(q, j, lane, left));
  }
  m = warp_fmax(m);
  if (m > best.value) {  // warp-uniform: the lowest index holding m
    int first = INT32_MAX;
#pragma unroll
    for (int q = Part::kLoads - 1; q >= 0; --q) {
#pragma unroll
      for (int j = VEC - 1; j >= 0; --j) first = part.template value<FULL>(q, j, lane, left) == m ? Part::index(q, lane, j) : first;
    }
    best.value = m;
    best.index = base + static_cast<int>(__reduce_min_sync(kFull, static_cast<unsigned>(first)));
  }
  const float reference = tile_reference(m);
  double acc[4] = {};
#pragma unroll
  for (int q = 0; q < Part::kLoads; ++q) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[(q * VEC + j) % 4] += tile_weight(part.template value<FULL>(q, j, lane, left), reference, c);
  }
  const double sum = warp_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
  best.bad |= sum != sum;
  if (lane == 0) {
    sh.tile_max[tl] = m;
    sh.tile_mass[tl] = sum;
  }
}

// BULK: the row's tiles arrive by bulk copies into kStreamStages<T> stages per warp (rows of
// 16-byte vectors at 16-byte aligned addresses, VEC = 16 / sizeof(T); kStreamStageBytes of
// dynamic shared memory); otherwise each warp loads its tiles into registers, one tile ahead.
template <typename T, int VEC, bool BULK>
__global__ void __launch_bounds__(kStreamThreads, 2) stream_sample_kernel(const T* __restrict__ logits, Args a) {
  constexpr int kStages = kStreamStages<T>;
  extern __shared__ __align__(16) unsigned char stage_memory[];
  __shared__ uint64_t arrived[BULK ? kStreamWarps * kStages : 1];  // the bulk path's barriers
  __shared__ StreamShared sh;
  cg::cluster_group cluster = cg::this_cluster();
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const unsigned rank = cluster.block_rank(), blocks = cluster.num_blocks();
  const int64_t row = blockIdx.y, vocab = a.vocab;
  const int64_t begin = static_cast<int64_t>(rank) * a.chunk;
  const int n = static_cast<int>(min(begin + a.chunk, vocab) - begin);
  const int tiles = (n + kTile - 1) / kTile;
  const T* x = logits + row * vocab + begin;
  const float t = a.temperature[row];
  const bool greedy = t == 0.f;
  const float c = weight_scale(t);

  // The streaming pass: a warp's tiles one at a time, the next ones already loading (registers:
  // one tile ahead, 64 KB in flight per SM; bulk copies: kStages tiles ahead, 128 KB per SM).
  const WarpRing<T, kStages, kTile> ring{reinterpret_cast<T*>(stage_memory) + warp * kStages * kTile, arrived + warp * kStages};
  const int own = warp < tiles ? (tiles - warp + kStreamWarps - 1) / kStreamWarps : 0;  // the warp's tiles
  auto source = [&](int64_t j, const T** src, int* elems) {  // the warp's j-th tile: tile warp + j W of the chunk
    const int tl = warp + static_cast<int>(j) * kStreamWarps;
    *src = x + tl * kTile;
    *elems = min(kTile, n - tl * kTile);
  };
  if constexpr (BULK) ring.start(lane, own, source);
  TilePart<T, VEC> next;  // the register path: the warp's next tile, loading while it takes this one
  if (!BULK && warp < tiles) next.load_from(x + warp * kTile, n - warp * kTile, lane);
  WarpBest best;
  for (int k = 0, tl = warp; tl < tiles; ++k, tl += kStreamWarps) {
    TilePart<T, VEC> part;
    if constexpr (BULK) {
      ring.wait(k);
      part.load_from(ring.stage(k), n - tl * kTile, lane);
      ring.refill(lane, k, own, source);  // the stage is read: refill it with the warp's tile kStages ahead
    } else {
      part = next;
      if (tl + kStreamWarps < tiles) next.load_from(x + (tl + kStreamWarps) * kTile, n - (tl + kStreamWarps) * kTile, lane);
    }
    if (n - tl * kTile >= kTile) {
      take_tile<true>(part, tl, n, c, best, sh);
    } else {
      take_tile<false>(part, tl, n, c, best, sh);
    }
  }
  if (lane == 0) {
    sh.warp_max[warp] = best.value;
    sh.warp_argmax[warp] = best.index == INT32_MAX ? INT32_MAX : static_cast<int>(begin) + best.index;
    sh.warp_flags[warp] = best.bad;
  }
  __syncthreads();
  if (tid == 0) {
    Slot s{0.0, 0.0, -INFINITY, INT32_MAX, 0};
    for (int w = 0; w < kStreamWarps; ++w) keep_max(s, sh.warp_max[w], sh.warp_argmax[w], sh.warp_flags[w]);
    sh.slot[0] = s;
  }
  cluster.sync();
  if (warp == 0) {  // lane r: block r's max, argmax and flags
    const Slot v = warp_keep_max(lane < static_cast<int>(blocks) ? *cluster.map_shared_rank(&sh.slot[0], lane)
                                                                 : Slot{0.0, 0.0, -INFINITY, INT32_MAX, 0});
    if (lane == 0) {
      sh.max = v.value;
      sh.argmax = v.index;
      sh.invalid = v.flags != 0 || v.value == -INFINITY;
    }
  }
  __syncthreads();
  const float row_max = sh.max;
  const bool invalid = sh.invalid;

  // The tiles' masses and the block's.
  double mine = 0.0;
  if (!invalid) {
    for (int tl = tid; tl < tiles; tl += kStreamThreads) {
      const double m = sh.tile_mass[tl] * tile_scale(sh.tile_max[tl], row_max, c);
      sh.tile_mass[tl] = m;
      mine += m;
    }
  }
  mine = warp_sum(mine);
  if (lane == 0) sh.warp_mass[warp] = mine;
  __syncthreads();
  if (tid == 0) {
    double block = 0.0;
    for (int w = 0; w < kStreamWarps; ++w) block += sh.warp_mass[w];
    sh.slot[1].mass = block;
  }
  cluster.sync();
  if (warp == 0) {  // the row's mass; the block where u times it falls, and the target within it
    const double m = lane < static_cast<int>(blocks) ? cluster.map_shared_rank(&sh.slot[1], lane)->mass : 0.0;
    const double total = warp_sum(m);
    if (!invalid && !greedy) {
      const double u = philox_uniform(static_cast<uint64_t>(a.seed[row]), static_cast<uint64_t>(a.position[row]), 0u);
      const double target = u * total;
      const double inclusive = warp_inclusive_scan(m, lane);
      const unsigned cross = __ballot_sync(kFull, m > 0.0 && inclusive > target);
      const unsigned positive = __ballot_sync(kFull, m > 0.0);
      const int b = cross ? __ffs(cross) - 1 : 31 - __clz(positive);
      const double before = __shfl_sync(kFull, inclusive - m, b);
      if (lane == 0) {
        sh.chosen_block = b;
        sh.target = target - before;
      }
    }
    if (lane == 0) sh.total = total;
  }
  cluster.sync();  // every block's slots read: from here on, no remote access
  const double total = sh.total;
  const float t_eff = greedy ? 1.f : t;
  auto logprob = [&](float value) {
    return static_cast<float>((static_cast<double>(value) - row_max) / t_eff - log(total));
  };
  if (invalid || greedy) {
    if (rank == 0 && tid == 0) {
      a.tokens[row] = invalid ? -1 : sh.argmax;
      a.logprobs[row] = invalid ? NAN : logprob(row_max);
    }
    return;
  }
  if (static_cast<int>(rank) != sh.chosen_block || warp != 0) return;
  double before = 0.0;
  const int tile = warp_walk(tiles, sh.target, &before, [&](int i) { return sh.tile_mass[i]; });
  const float tile_max = sh.tile_max[tile], reference = tile_reference(tile_max);
  const double scale = tile_scale(tile_max, row_max, c);
  const T* tile_x = x + tile * kTile;
  const int in_tile = min(n - tile * kTile, kTile);
  const int i = warp_walk(in_tile, sh.target - before, &before, [&](int j) {
    return static_cast<double>(tile_weight(to_float(tile_x[j]), reference, c)) * scale;
  });
  if (lane == 0) {
    a.tokens[row] = begin + tile * kTile + i;
    a.logprobs[row] = logprob(to_float(tile_x[i]));
  }
}

}  // namespace xllm::sampler
