// Step sampler: the binding of the sampling kernels (dispatch.h) and of the generator (philox.cu).
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "per_row_args.h"
#include "sampler/dispatch.h"

torch::Tensor uniform(torch::Tensor seed, torch::Tensor position, int64_t stream);

namespace s = xllm::sampler;
using xllm::per_row;

// (tokens int64, logprobs float32), each (batch,).
std::tuple<torch::Tensor, torch::Tensor> sample(torch::Tensor logits, c10::optional<torch::Tensor> temperature, double temperature_scalar,
            c10::optional<torch::Tensor> top_k, int64_t top_k_scalar, c10::optional<torch::Tensor> top_p,
            double top_p_scalar, c10::optional<torch::Tensor> min_p, double min_p_scalar,
            c10::optional<torch::Tensor> seed, int64_t seed_scalar, c10::optional<torch::Tensor> position,
            int64_t position_scalar, c10::optional<torch::Tensor> penalty_tokens,
            c10::optional<torch::Tensor> frequency, double frequency_scalar, c10::optional<torch::Tensor> presence,
            double presence_scalar, c10::optional<torch::Tensor> repetition, double repetition_scalar) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous(), "logits: contiguous 2-D CUDA tensor");
  const int64_t batch = logits.size(0);
  TORCH_CHECK(logits.size(1) < (int64_t{1} << 31), "logits: vocab below 2^31");
  const c10::cuda::CUDAGuard guard(logits.device());
  auto tokens = torch::empty({batch}, logits.options().dtype(torch::kInt64));
  auto logprobs = torch::empty({batch}, logits.options().dtype(torch::kFloat32));
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
  const bool short_top_k = !penalty && !top_k.has_value() && s::short_top_k(batch, args.vocab, top_k_scalar);
  switch (logits.scalar_type()) {
    case torch::kFloat32: s::dispatch<float>(logits, args, penalty, unfiltered, short_top_k); break;
    case torch::kBFloat16: s::dispatch<__nv_bfloat16>(logits, args, penalty, unfiltered, short_top_k); break;
    case torch::kFloat16: s::dispatch<__half>(logits, args, penalty, unfiltered, short_top_k); break;
    default: TORCH_CHECK(false, "logits: float32, bfloat16 or float16");
  }
  return {tokens, logprobs};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("uniform", &uniform, "Philox-4x32-10 uniforms keyed by (seed, position, stream)");
  m.def("sample", &sample, "one token and its logprob per row from logits: penalties, temperature, top-k, top-p, min-p, greedy");
  m.def("max_vocab", [] { return s::max_vocab(); }, "the largest vocab the sampling kernel takes");
}
