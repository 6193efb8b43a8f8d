// The draw's weights of rows without filters, shared by the sampler's two kernels (torch-free).
// A token's weight 2^((x - row max) c), c = log2(e) / temperature, is computed as its tile's
// float64 scale 2^((tile max - row max) c) times 2^((x - tile max) c) in float32, where the tiles
// are the vocabulary-aligned runs of kTile tokens: a streaming pass knows a tile's max when it
// meets the tile, the row's only at the end. stream_sampling.cuh (which streams the row),
// sampling.cuh (which caches it, for its rows without top-k, top-p or min-p) and the torch path
// (xllm_sampling/ops/sampler.py) all use this arithmetic, so an unfiltered request draws the same
// token whichever kernel its batch takes.
#pragma once

namespace xllm::sampler {

constexpr int kTile = 512;
constexpr int kTileShift = 9;

// The tile's reference for tile_weight: its max, or 0 for a tile of -inf only (weight 0, not NaN).
__device__ __forceinline__ float tile_reference(float tile_max) { return tile_max == -INFINITY ? 0.f : tile_max; }

// 2^((tile max - row max) c) in float64; 0 for a tile of -inf only.
__device__ __forceinline__ double tile_scale(float tile_max, float row_max, float c) {
  return tile_max == -INFINITY ? 0.0 : exp2(static_cast<double>(tile_max - row_max) * static_cast<double>(c));
}

// A token's float32 weight within its tile (before the tile's scale).
__device__ __forceinline__ float tile_weight(float x, float reference, float c) { return exp2f((x - reference) * c); }

}  // namespace xllm::sampler
