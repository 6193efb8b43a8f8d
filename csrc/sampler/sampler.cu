// Step sampler: the binding of the sampling kernel (sampling.cuh) and of the generator (philox.cu).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <algorithm>

#include "launch_helpers.cuh"
#include "per_row_args.h"
#include "sampler/sampling.cuh"
#include "sampler/stream_sampling.cuh"
#include "sampler/top_k_sampling.cuh"

torch::Tensor uniform(torch::Tensor seed, torch::Tensor position, int64_t stream);

namespace {

namespace s = xllm::sampler;
namespace slice = xllm::slice;
using xllm::offset;
using xllm::per_row;
using xllm::round_up;

constexpr int64_t kChunkBytes = 40 * 1024;     // cached floats per block where the row allows (several blocks per SM)
constexpr int64_t kMaxChunkBytes = 100 * 1024;  // the most one block caches
constexpr int64_t kMinChunk = 1024;             // rows are not split finer than this (elements)
constexpr int64_t kPenaltyBytes = 2 * s::kPenaltySlots * sizeof(int);
static_assert(kMaxChunkBytes / 4 <= s::kMaxTiles * s::kTile, "a chunk's tiles fit Shared::tile_ref");

// Blocks per row: the fewest whose chunk fits kChunkBytes, doubled while the batch leaves SMs
// idle; 0 when a row does not fit 16 blocks' shared memory.
int cluster_size(int sms, int64_t batch, int64_t vocab) {
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
int stream_cluster_size(int sms, int64_t batch, int64_t vocab) {
  auto tiles = [&](int cs) { return ((vocab + cs - 1) / cs + s::kTile - 1) / s::kTile; };
  int cs = 1;
  while (cs < s::kMaxCluster && tiles(cs) > s::kStreamMaxTiles) cs *= 2;
  if (tiles(cs) > s::kStreamMaxTiles) return 0;
  while (cs < s::kMaxCluster && batch * 2 * cs <= 2 * sms && 2 * tiles(2 * cs) >= s::kStreamWarps) cs *= 2;
  while (cs > 1 && (cs - 1) * tiles(cs) * s::kTile >= vocab) cs /= 2;  // no block without elements
  return cs;
}

constexpr int64_t kMaxRows = 65535;  // rows per launch (the grid's y limit)
// Logits (rows x vocab) per 64 of k from which a short top-k takes the top-k kernels: below it
// the caching kernel is faster (H200, top-k 50 and 128: docs/dev/benchmark-log.md).
constexpr int64_t kTopKMinElements = 4'000'000;

// The arguments of the rows from `start` on.
s::Args rows_from(const s::Args& args, int64_t start) {
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

template <typename T, int VEC, bool PENALTY>
void launch(const torch::Tensor& logits, s::Args args, int cs) {
  constexpr auto kernel = s::sample_kernel<T, VEC, PENALTY>;
  constexpr int64_t kListBytes = s::kGather * sizeof(uint64_t);
  const int64_t shared = s::list_offset(args.chunk) * 4 + kListBytes + (PENALTY ? kPenaltyBytes : 0);
  xllm::configure_once<kernel>(logits.get_device(), static_cast<int>(kMaxChunkBytes + kListBytes + kPenaltyBytes),
                               /*nonportable_clusters=*/true);
  launch_rows<kernel, T>(logits, args, cs, s::kThreads, shared);
}

template <typename T, int VEC>
void launch_stream(const torch::Tensor& logits, s::Args args, int cs) {
  constexpr auto kernel = s::stream_sample_kernel<T, VEC>;
  xllm::configure_once<kernel>(logits.get_device(), 0, /*nonportable_clusters=*/true);
  launch_rows<kernel, T>(logits, args, cs, s::kStreamThreads, 0);
}

// Slices per row of the top-k kernels: as many as fit one wave of two blocks per SM, each at
// least slice::kMinSlice elements, and no more keys per row than the merge ranks at once.
int64_t top_k_slices(int sms, int64_t batch, int64_t vocab, int64_t k) {
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

}  // namespace

// The largest vocab the kernel takes; the op takes its torch path beyond.
int64_t max_vocab() { return s::kMaxCluster * (kMaxChunkBytes / 4); }

namespace {

// Rows without filters or penalties (every row: the settings are numbers) take the streaming
// kernel; large batches whose top_k is one number up to slice::kMaxKeys, without penalties, the
// top-k kernels; the others the caching one. All draw the same tokens.
template <typename T>
void dispatch(const torch::Tensor& logits, s::Args args, bool penalty, bool unfiltered, bool short_top_k) {
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
      aligned ? launch_stream<T, kVec>(logits, args, cs) : launch_stream<T, 1>(logits, args, cs);
      return;
    }
  }
  const int cs = cluster_size(sms, batch, vocab);
  TORCH_CHECK(cs > 0, "sample: vocab ", vocab, " above the kernel's ", max_vocab());
  args.chunk = round_up((vocab + cs - 1) / cs, s::kTile);
  if (aligned) {
    penalty ? launch<T, kVec, true>(logits, args, cs) : launch<T, kVec, false>(logits, args, cs);
  } else {
    penalty ? launch<T, 1, true>(logits, args, cs) : launch<T, 1, false>(logits, args, cs);
  }
}

}  // namespace

void sample(torch::Tensor logits, c10::optional<torch::Tensor> temperature, double temperature_scalar,
            c10::optional<torch::Tensor> top_k, int64_t top_k_scalar, c10::optional<torch::Tensor> top_p,
            double top_p_scalar, c10::optional<torch::Tensor> min_p, double min_p_scalar,
            c10::optional<torch::Tensor> seed, int64_t seed_scalar, c10::optional<torch::Tensor> position,
            int64_t position_scalar, c10::optional<torch::Tensor> penalty_tokens,
            c10::optional<torch::Tensor> frequency, double frequency_scalar, c10::optional<torch::Tensor> presence,
            double presence_scalar, c10::optional<torch::Tensor> repetition, double repetition_scalar,
            torch::Tensor tokens, torch::Tensor logprobs) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous(), "logits: contiguous 2-D CUDA tensor");
  const int64_t batch = logits.size(0);
  TORCH_CHECK(tokens.is_cuda() && tokens.scalar_type() == torch::kInt64 && tokens.is_contiguous() && tokens.numel() == batch,
              "tokens: contiguous int64 (batch,)");
  TORCH_CHECK(logprobs.is_cuda() && logprobs.scalar_type() == torch::kFloat32 && logprobs.is_contiguous() &&
                  logprobs.numel() == batch,
              "logprobs: contiguous float32 (batch,)");
  TORCH_CHECK(logits.size(1) < (int64_t{1} << 31), "logits: vocab below 2^31");
  s::Args args{};
  args.vocab = logits.size(1);
  auto f32 = [](double v) { return static_cast<float>(v); };
  args.temperature = per_row(temperature, f32(temperature_scalar), batch, torch::kFloat32, "temperature");
  args.top_p = per_row(top_p, f32(top_p_scalar), batch, torch::kFloat32, "top_p");
  args.min_p = per_row(min_p, f32(min_p_scalar), batch, torch::kFloat32, "min_p");
  args.top_k = per_row(top_k, top_k_scalar, batch, torch::kInt64, "top_k");
  args.seed = per_row(seed, seed_scalar, batch, torch::kInt64, "seed");
  args.position = per_row(position, position_scalar, batch, torch::kInt64, "position");
  const bool penalty = penalty_tokens.has_value();
  if (penalty) {
    TORCH_CHECK(penalty_tokens->is_cuda() && penalty_tokens->scalar_type() == torch::kInt64 &&
                    penalty_tokens->is_contiguous() && penalty_tokens->dim() == 2 && penalty_tokens->size(0) == batch &&
                    penalty_tokens->size(1) <= s::kMaxPenaltyTokens,
                "penalty_tokens: contiguous int64 (batch, L) with L <= ", s::kMaxPenaltyTokens);
    args.penalty_tokens = penalty_tokens->data_ptr<int64_t>();
    args.penalty_len = penalty_tokens->size(1);
  }
  args.frequency = per_row(frequency, f32(frequency_scalar), batch, torch::kFloat32, "frequency_penalty");
  args.presence = per_row(presence, f32(presence_scalar), batch, torch::kFloat32, "presence_penalty");
  args.repetition = per_row(repetition, f32(repetition_scalar), batch, torch::kFloat32, "repetition_penalty");
  args.tokens = tokens.data_ptr<int64_t>();
  args.logprobs = logprobs.data_ptr<float>();
  const bool unfiltered = !penalty && !top_k.has_value() && (top_k_scalar <= 0 || top_k_scalar >= args.vocab) &&
                          !top_p.has_value() && args.top_p.scalar >= 1.f && !min_p.has_value() && args.min_p.scalar <= 0.f;
  const bool short_top_k = !penalty && !top_k.has_value() && top_k_scalar >= 1 && top_k_scalar <= slice::kMaxKeys &&
                           top_k_scalar < args.vocab &&
                           batch * args.vocab >= kTopKMinElements * ((top_k_scalar + 63) / 64);
  const c10::cuda::CUDAGuard guard(logits.device());
  switch (logits.scalar_type()) {
    case torch::kFloat32: dispatch<float>(logits, args, penalty, unfiltered, short_top_k); break;
    case torch::kBFloat16: dispatch<__nv_bfloat16>(logits, args, penalty, unfiltered, short_top_k); break;
    case torch::kFloat16: dispatch<__half>(logits, args, penalty, unfiltered, short_top_k); break;
    default: TORCH_CHECK(false, "logits: float32, bfloat16 or float16");
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("uniform", &uniform, "Philox-4x32-10 uniforms keyed by (seed, position, stream)");
  m.def("sample", &sample, "one token per row from logits: penalties, temperature, top-k, top-p, min-p, greedy");
  m.def("max_vocab", &max_vocab, "the largest vocab the sampling kernel takes");
}
