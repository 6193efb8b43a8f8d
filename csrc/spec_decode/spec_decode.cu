// Step spec_decode (in progress): the binding of the rejection sampler (spec_decode.cuh).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "spec_decode/spec_decode.cuh"

namespace {

namespace sd = xllm::spec;

void check(const torch::Tensor& t, c10::ScalarType type, int64_t numel, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == type && t.is_contiguous() && t.numel() == numel, name, ": contiguous ",
              c10::toString(type), " CUDA tensor of ", numel, " elements");
}

}  // namespace

void rejection_sample(torch::Tensor logits, torch::Tensor drafts, c10::optional<torch::Tensor> draft_probs,
                      torch::Tensor num_draft, c10::optional<torch::Tensor> temperature, double temperature_value,
                      torch::Tensor seed, torch::Tensor position, torch::Tensor tokens, torch::Tensor emitted) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 3 && logits.is_contiguous(), "logits: contiguous (batch, K + 1, vocab) CUDA tensor");
  const int64_t batch = logits.size(0), k = logits.size(1) - 1, vocab = logits.size(2);
  check(drafts, torch::kInt64, batch * k, "draft_token_ids");
  if (draft_probs) check(*draft_probs, torch::kFloat32, batch * k * vocab, "draft_probs");
  check(num_draft, torch::kInt64, batch, "num_draft");
  if (temperature) check(*temperature, torch::kFloat32, batch, "temperature");
  check(seed, torch::kInt64, batch, "seed");
  check(position, torch::kInt64, batch, "position");
  check(tokens, torch::kInt64, batch * (k + 1), "tokens");
  check(emitted, torch::kInt64, batch, "emitted");
  if (batch == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  sd::Inputs in{logits.data_ptr(), drafts.data_ptr<int64_t>(), draft_probs ? draft_probs->data_ptr<float>() : nullptr,
                num_draft.data_ptr<int64_t>(), temperature ? temperature->data_ptr<float>() : nullptr,
                static_cast<float>(temperature_value), seed.data_ptr<int64_t>(), position.data_ptr<int64_t>(), k, vocab};
  sd::Outputs out{tokens.data_ptr<int64_t>(), emitted.data_ptr<int64_t>()};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(batch));
  switch (logits.scalar_type()) {
    case torch::kFloat32: sd::rejection_kernel<float><<<grid, sd::kThreads, 0, stream>>>(in, out); break;
    case torch::kBFloat16: sd::rejection_kernel<__nv_bfloat16><<<grid, sd::kThreads, 0, stream>>>(in, out); break;
    case torch::kFloat16: sd::rejection_kernel<__half><<<grid, sd::kThreads, 0, stream>>>(in, out); break;
    default: TORCH_CHECK(false, "logits: float32, bfloat16 or float16");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rejection_sample", &rejection_sample, "speculative decoding's rejection sampler, one launch for the batch");
}
