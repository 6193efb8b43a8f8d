// Step sampler: which kernel a batch takes, and their launches (host code, instantiated per logits
// type in dispatch_*.cu so that the three compile side by side).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

#include <algorithm>

#include "launch_helpers.cuh"
#include "sampler/dispatch.h"
#include "sampler/sampling.cuh"
#include "sampler/stream_sampling.cuh"
#include "sampler/top_k_sampling.cuh"

namespace xllm::sampler::host {

namespace s = xllm::sampler;
namespace slice = xllm::slice;
using xllm::offset;
using xllm::round_up;

constexpr int64_t kChunkBytes = 40 * 1024;     // cached floats per block where the row allows (several blocks per SM)
constexpr int64_t kMinChunk = 1024;             // rows are not split finer than this (elements)
constexpr int64_t kPenaltyBytes = 2 * s::kPenaltySlots * sizeof(int);
static_assert(kMaxChunkBytes / 4 <= s::kMaxTiles * s::kTile, "a chunk's tiles fit Shared::tile_ref");

// Blocks per row: the fewest whose chunk fits kChunkBytes, doubled while the batch leaves SMs
// idle; 0 when a row does not fit 16 blocks' shared memory.
inline int cluster_size(int sms, int64_t batch, int64_t vocab) {
  auto chunk = [&](int cs) { return round_up((vocab + cs - 1) / cs, s::kTile); };
  int cs = 1;
  while (cs < s::kMaxCluster && chunk(cs) * 4 > kChunkBytes) cs *= 2;
  if (chunk(cs) * 4 > kMaxChunkBytes) return 0;
  while (cs < s::kMaxCluster && batch * cs < sms && chunk(2 * cs) >= kMinChunk) cs *= 2;
  while (cs > 1 && (cs - 1) * chunk(cs) >= vocab) cs /= 2;  // no block without elements
  return cs;
}

// Blocks per row of the streaming kernel: the fewest whose chunks have at most kStreamMaxTiles
// tiles, doubled while the grid stays within one wave (two blocks per SM) and every other warp
// keeps a tile; 0 when a row needs more than 16 blocks.
inline int stream_cluster_size(int sms, int64_t batch, int64_t vocab) {
  auto tiles = [&](int cs) { return ((vocab + cs - 1) / cs + s::kTile - 1) / s::kTile; };
  int cs = 1;
  while (cs < s::kMaxCluster && tiles(cs) > s::kStreamMaxTiles) cs *= 2;
  if (tiles(cs) > s::kStreamMaxTiles) return 0;
  while (cs < s::kMaxCluster && batch * 2 * cs <= 2 * sms && 2 * tiles(2 * cs) >= s::kStreamWarps) cs *= 2;
  while (cs > 1 && (cs - 1) * tiles(cs) * s::kTile >= vocab) cs /= 2;  // no block without elements
  return cs;
}

constexpr int64_t kMaxRows = 65535;  // rows per launch (the grid's y limit)

// The arguments of the rows from `start` on.
inline s::Args rows_from(const s::Args& args, int64_t start) {
  s::Args part = args;
  part.temperature = offset(args.temperature, start);
  part.top_p = offset(args.top_p, start);
  part.min_p = offset(args.min_p, start);
  part.top_k = offset(args.top_k, start);
  part.seed = offset(args.seed, start);
  part.position = offset(args.position, start);
  part.frequency = offset(args.frequency, start);
  part.presence = offset(args.presence, start);
  part.repetition = offset(args.repetition, start);
  part.penalty_tokens = offset(args.penalty_tokens, start * args.penalty_len);
  part.tokens = args.tokens + start;
  part.logprobs = args.logprobs + start;
  return part;
}

// One launch per kMaxRows rows, each with its rows' pointers.
template <auto kernel, typename T>
void launch_rows(const torch::Tensor& logits, s::Args args, int cs, int threads, int64_t shared) {
  const int64_t batch = logits.size(0);
  for (int64_t start = 0; start < batch; start += kMaxRows) {
    const unsigned rows = static_cast<unsigned>(std::min(kMaxRows, batch - start));
    xllm::launch_with(xllm::cluster_of(cs), kernel, dim3(cs, rows), dim3(threads), static_cast<size_t>(shared),
                      reinterpret_cast<const T*>(logits.data_ptr()) + start * args.vocab, rows_from(args, start));
  }
}

template <typename T, int VEC, bool PENALTY, int kMinBlocks>
void launch(const torch::Tensor& logits, s::Args args, int cs) {
  constexpr auto kernel = s::sample_kernel<T, VEC, PENALTY, kMinBlocks>;
  constexpr int64_t kListBytes = s::kGather * sizeof(uint64_t);
  const int64_t shared = s::list_offset(args.chunk) * 4 + kListBytes + (PENALTY ? kPenaltyBytes : 0);
  xllm::configure_once<kernel>(logits.get_device(), static_cast<int>(kMaxChunkBytes + kListBytes + kPenaltyBytes),
                               /*nonportable_clusters=*/true);
  launch_rows<kernel, T>(logits, args, cs, s::kThreads, shared);
}

// The streaming kernel; BULK (bulk copies through shared memory): rows of 16-byte vectors at
// 16-byte aligned addresses, VEC = 16 / sizeof(T).
template <typename T, int VEC, bool BULK>
void launch_stream(const torch::Tensor& logits, s::Args args, int cs) {
  constexpr auto kernel = s::stream_sample_kernel<T, VEC, BULK>;
  constexpr int shared = BULK ? s::kStreamStageBytes : 0;
  xllm::configure_once<kernel>(logits.get_device(), shared, /*nonportable_clusters=*/true);
  launch_rows<kernel, T>(logits, args, cs, s::kStreamThreads, shared);
}

// Slices per row of the top-k kernels: as many as fit one wave of two blocks per SM, each at
// least slice::kMinSlice elements, and no more keys per row than the merge ranks at once.
inline int64_t top_k_slices(int sms, int64_t batch, int64_t vocab, int64_t k) {
  const int64_t wanted = 2 * sms / std::min(batch, kMaxRows);
  const int64_t by_length = (vocab + slice::kMinSlice - 1) / slice::kMinSlice;
  return std::max<int64_t>(1, std::min({wanted, by_length, slice::kCapacity / k}));
}

// Both top-k kernels (top_k_sampling.cuh) per kMaxRows rows; BULK: rows of 16-byte vectors at
// 16-byte aligned addresses.
template <typename T, bool BULK>
void launch_top_k(const torch::Tensor& logits, s::Args args, int k) {
  constexpr auto candidates = s::top_k_candidates_kernel<T, BULK>;
  const int64_t batch = logits.size(0), vocab = args.vocab, vec = 16 / sizeof(T);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = top_k_slices(sms, batch, vocab, k);
  const int64_t chunk = round_up((vocab + wanted - 1) / wanted, vec);
  const int64_t slices = (vocab + chunk - 1) / chunk;
  const int64_t rows = std::min(batch, kMaxRows);
  auto keys = torch::empty({rows * slices * k}, logits.options().dtype(torch::kInt64));
  auto partial = torch::empty({rows * slices * static_cast<int64_t>(sizeof(slice::Partial<double>))},
                              logits.options().dtype(torch::kUInt8));
  const s::TopKWork work{reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()),
                         reinterpret_cast<slice::Partial<double>*>(partial.data_ptr<uint8_t>())};
  xllm::configure_once<candidates>(logits.get_device(), slice::kStreamBytes);
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t start = 0; start < batch; start += kMaxRows) {
    const unsigned part = static_cast<unsigned>(std::min(kMaxRows, batch - start));
    const s::Args a = rows_from(args, start);
    candidates<<<dim3(static_cast<unsigned>(slices), part), slice::kThreads, slice::kStreamBytes, stream>>>(
        reinterpret_cast<const T*>(logits.data_ptr()) + start * vocab, chunk, k, work, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // launched while the candidates kernel runs; it waits for its keys
    xllm::launch_with(xllm::programmatic(), s::top_k_draw_kernel, dim3(part), dim3(slice::kThreads), 0,
                      static_cast<int>(slices), k, work, a);
  }
}


}  // namespace xllm::sampler::host

namespace xllm::sampler {

template <typename T>
void dispatch(const torch::Tensor& logits, Args args, bool penalty, bool unfiltered, bool short_top_k) {
  using namespace host;
  constexpr int kVec = 16 / sizeof(T);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const bool aligned = vocab % kVec == 0 && reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0;
  if (short_top_k) {
    const int k = static_cast<int>(args.top_k.scalar);
    aligned ? launch_top_k<T, true>(logits, args, k) : launch_top_k<T, false>(logits, args, k);
    return;
  }
  if (unfiltered) {
    const int cs = stream_cluster_size(sms, batch, vocab);
    if (cs > 0) {
      args.chunk = round_up((vocab + cs - 1) / cs, s::kTile);
      // bulk copies for 16-bit logits (H200, B = 256, V = 151936: bf16 47.7 -> 38.8 us), registers
      // for float32 (there bulk copies lost 2-4 us at B = 256)
      aligned ? launch_stream<T, kVec, sizeof(T) == 2>(logits, args, cs) : launch_stream<T, 1, false>(logits, args, cs);
      return;
    }
  }
  const int cs = cluster_size(sms, batch, vocab);
  TORCH_CHECK(cs > 0, "sample: vocab ", vocab, " above the kernel's ", max_vocab());
  args.chunk = round_up((vocab + cs - 1) / cs, s::kTile);
  const bool one_wave = batch * cs <= sms;  // at most one block an SM: registers rather than occupancy
  if (aligned) {
    if (one_wave) {
      penalty ? launch<T, kVec, true, 1>(logits, args, cs) : launch<T, kVec, false, 1>(logits, args, cs);
    } else {
      penalty ? launch<T, kVec, true, 4>(logits, args, cs) : launch<T, kVec, false, 4>(logits, args, cs);
    }
  } else {  // rows not of 16-byte vectors (odd vocabularies): one instance, to keep the build short
    penalty ? launch<T, 1, true, 4>(logits, args, cs) : launch<T, 1, false, 4>(logits, args, cs);
  }
}

}  // namespace xllm::sampler
