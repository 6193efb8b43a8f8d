// Step spec_decode: the binding of the rejection sampler (spec_decode.cuh): one launch of
// thread-block clusters, one cluster per request.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <algorithm>

#include "launch_helpers.cuh"
#include "per_row_args.h"
#include "spec_decode/spec_decode.cuh"

namespace {

namespace sd = xllm::spec;
using xllm::offset;
using xllm::per_row;
using xllm::round_up;

constexpr int64_t kMinChunk = 2048;  // a row is not split finer than this (elements per block)
constexpr int64_t kMaxRequests = 65535;  // the grid's y limit: one launch per this many requests

void check(const torch::Tensor& t, c10::ScalarType type, int64_t numel, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == type && t.is_contiguous() && t.numel() == numel, name, ": contiguous ",
              c10::toString(type), " CUDA tensor of ", numel, " elements");
}

constexpr int64_t kMaxChunk = int64_t{sd::kMaxTiles} * sd::kTile;

// Blocks per request: the fewest whose chunks hold kMaxTiles tiles at most, doubled while the
// batch leaves the GPU's SMs short of two blocks each and the chunks stay at least kMinChunk long.
int cluster_size(int sms, int64_t batch, int64_t vocab) {
  int cs = 1;
  while (cs < sd::kMaxCluster && (vocab + cs - 1) / cs > kMaxChunk) cs *= 2;
  while (cs < sd::kMaxCluster && batch * cs < 2 * sms && vocab / (2 * cs) >= kMinChunk) cs *= 2;
  return cs;
}

template <typename T>
void launch(const torch::Tensor& logits, sd::Inputs in, sd::Outputs out) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t batch = logits.size(0), vocab = in.vocab;
  const bool aligned = vocab % kVec == 0 && reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0;
  const int cs = cluster_size(at::cuda::getCurrentDeviceProperties()->multiProcessorCount, batch, vocab);
  in.chunk = round_up((vocab + cs - 1) / cs, sd::kTile);  // whole tiles (and whole vectors)
  auto kernel = aligned ? sd::rejection_kernel<T, kVec> : sd::rejection_kernel<T, 1>;
  static std::once_flag once[64];
  std::call_once(once[logits.get_device()], [] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(sd::rejection_kernel<T, kVec>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    C10_CUDA_CHECK(cudaFuncSetAttribute(sd::rejection_kernel<T, 1>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  });
  for (int64_t start = 0; start < batch; start += kMaxRequests) {
    sd::Inputs part = in;
    const int64_t rows = in.k + 1;
    part.logits = static_cast<const T*>(in.logits) + start * rows * vocab;
    part.drafts = in.drafts + start * in.k;
    part.draft_probs = in.draft_probs ? in.draft_probs + start * in.k * vocab : nullptr;
    part.num_draft = offset(in.num_draft, start);
    part.temperature = offset(in.temperature, start);
    part.seed = offset(in.seed, start);
    part.position = offset(in.position, start);
    const sd::Outputs part_out{out.tokens + start * rows, out.emitted + start};
    const unsigned requests = static_cast<unsigned>(std::min(kMaxRequests, batch - start));
    xllm::launch_with(xllm::cluster_of(cs), kernel, dim3(cs, requests), dim3(sd::kThreads), 0, part, part_out);
  }
}

}  // namespace

// The largest vocab the kernel takes; the op takes its torch loop beyond.
int64_t max_vocab() { return sd::kMaxCluster * kMaxChunk; }

// num_draft, temperature, seed, position: a (batch,) CUDA tensor each, or the number beside it for every request.
void rejection_sample(torch::Tensor logits, torch::Tensor drafts, c10::optional<torch::Tensor> draft_probs,
                      c10::optional<torch::Tensor> num_draft, int64_t num_draft_scalar,
                      c10::optional<torch::Tensor> temperature, double temperature_scalar,
                      c10::optional<torch::Tensor> seed, int64_t seed_scalar, c10::optional<torch::Tensor> position,
                      int64_t position_scalar, torch::Tensor tokens, torch::Tensor emitted) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 3 && logits.is_contiguous(), "logits: contiguous (batch, K + 1, vocab) CUDA tensor");
  const int64_t batch = logits.size(0), k = logits.size(1) - 1, vocab = logits.size(2);
  TORCH_CHECK(vocab <= max_vocab(), "logits: vocab ", vocab, " above the kernel's ", max_vocab());
  check(drafts, torch::kInt64, batch * k, "draft_token_ids");
  if (draft_probs) check(*draft_probs, torch::kFloat32, batch * k * vocab, "draft_probs");
  check(tokens, torch::kInt64, batch * (k + 1), "tokens");
  check(emitted, torch::kInt64, batch, "emitted");
  sd::Inputs in{};
  in.logits = logits.data_ptr();
  in.drafts = drafts.data_ptr<int64_t>();
  in.draft_probs = draft_probs ? draft_probs->data_ptr<float>() : nullptr;
  in.num_draft = per_row(num_draft, num_draft_scalar, batch, torch::kInt64, "num_draft");
  in.temperature = per_row(temperature, static_cast<float>(temperature_scalar), batch, torch::kFloat32, "temperature");
  in.seed = per_row(seed, seed_scalar, batch, torch::kInt64, "seed");
  in.position = per_row(position, position_scalar, batch, torch::kInt64, "position");
  in.k = k;
  in.vocab = vocab;
  if (batch == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  const sd::Outputs out{tokens.data_ptr<int64_t>(), emitted.data_ptr<int64_t>()};
  switch (logits.scalar_type()) {
    case torch::kFloat32: launch<float>(logits, in, out); break;
    case torch::kBFloat16: launch<__nv_bfloat16>(logits, in, out); break;
    case torch::kFloat16: launch<__half>(logits, in, out); break;
    default: TORCH_CHECK(false, "logits: float32, bfloat16 or float16");
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rejection_sample", &rejection_sample, "speculative decoding's rejection sampler, one launch for the batch");
  m.def("max_vocab", &max_vocab, "the largest vocab the rejection kernel takes");
}
