// Step beam_search: the binding of the beam-search step (beam_search.cuh).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <algorithm>

#include "beam_search/beam_search.cuh"
#include "launch_helpers.cuh"

namespace {

namespace bs = xllm::beam;
using xllm::round_up;

// Slices per beam row: as many as fit one wave of the two blocks per SM that fit (a second,
// partial wave costs more than longer slices), each slice at least kMinSlice elements, and no
// more keys per request than the merge buffers.
int64_t splits_for(int sms, int64_t rows, int64_t vocab, int64_t beams, int64_t candidates) {
  const int64_t by_merge = bs::kCapacity / (beams * candidates);
  const int64_t by_length = (vocab + bs::kMinSlice - 1) / bs::kMinSlice;
  const int64_t wanted = 2 * sms / rows;
  return std::max<int64_t>(1, std::min({wanted, by_merge, by_length}));
}

void check(const torch::Tensor& t, c10::ScalarType type, int64_t numel, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == type && t.is_contiguous() && t.numel() == numel, name, ": contiguous ",
              c10::toString(type), " CUDA tensor of ", numel, " elements");
}

template <typename T, bool BULK>
void launch_candidates(const torch::Tensor& logits, int64_t chunk, int64_t slices, int candidates, bs::Workspace ws,
                       const int64_t* steps, const bs::Lengths& lengths) {
  constexpr auto kernel = bs::candidates_kernel<T, BULK>;
  xllm::configure_once<kernel>(logits.get_device(), bs::kStreamBytes);
  const dim3 grid(static_cast<unsigned>(slices), static_cast<unsigned>(logits.size(0)));
  kernel<<<grid, bs::kThreads, bs::kStreamBytes, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(logits.data_ptr()), logits.size(1), chunk, candidates, ws, steps, lengths);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Rows of 16-byte vectors at 16-byte aligned addresses stream by vectors (slice_top_keys.cuh).
template <typename T>
void launch_candidates(const torch::Tensor& logits, int64_t chunk, int64_t slices, bool bulk, int candidates,
                       bs::Workspace ws, const int64_t* steps, const bs::Lengths& lengths) {
  if (bulk) {
    launch_candidates<T, true>(logits, chunk, slices, candidates, ws, steps, lengths);
  } else {
    launch_candidates<T, false>(logits, chunk, slices, candidates, ws, steps, lengths);
  }
}

}  // namespace

int64_t max_candidates() { return bs::kMaxCandidates; }

void beam_step(torch::Tensor logits, torch::Tensor eos, torch::Tensor steps, torch::Tensor running_scores,
               torch::Tensor history_tokens, torch::Tensor history_parents, torch::Tensor pool_scores,
               torch::Tensor pool_finished, torch::Tensor pool_step, torch::Tensor pool_parent, torch::Tensor pool_token,
               torch::Tensor improvable, torch::Tensor all_hit, int64_t beams, int64_t candidates, int64_t prompt_len,
               int64_t max_length, double length_penalty, int64_t early_stopping) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous(), "logits: contiguous 2-D CUDA tensor");
  TORCH_CHECK(beams >= 1 && beams <= bs::kMaxBeams, "beams: 1 to ", bs::kMaxBeams);
  TORCH_CHECK(candidates >= 2 && candidates <= bs::kMaxCandidates, "candidates: 2 to ", bs::kMaxCandidates);
  const int64_t rows = logits.size(0), vocab = logits.size(1), batch = rows / beams, n_new = max_length - prompt_len;
  TORCH_CHECK(rows % beams == 0 && vocab * beams < (int64_t{1} << 31), "logits: rows a multiple of beams, beams x vocab below 2^31");
  check(eos, torch::kInt64, eos.numel(), "eos");
  check(steps, torch::kInt64, 1, "steps");
  check(running_scores, torch::kFloat32, rows, "running_scores");
  check(history_tokens, torch::kInt64, rows * n_new, "history_tokens");
  check(history_parents, torch::kInt64, rows * n_new, "history_parents");
  check(pool_scores, torch::kFloat32, rows, "pool_scores");
  check(pool_finished, torch::kBool, rows, "pool_finished");
  check(pool_step, torch::kInt64, rows, "pool_step");
  check(pool_parent, torch::kInt64, rows, "pool_parent");
  check(pool_token, torch::kInt64, rows, "pool_token");
  check(improvable, torch::kBool, batch, "improvable");
  check(all_hit, torch::kBool, batch, "all_hit");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // each beam row in `slices` slices of `chunk` elements (a multiple of the vector width)
  const int64_t vec = 16 / logits.element_size();
  const bool bulk = vocab % vec == 0 && reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0;
  const int64_t splits = splits_for(sms, rows, vocab, beams, candidates);
  const int64_t chunk = round_up((vocab + splits - 1) / splits, vec);
  const int64_t slices = (vocab + chunk - 1) / chunk;
  auto options = logits.options().dtype(torch::kInt64);
  auto keys = torch::empty({rows * slices * candidates}, options);
  auto partial = torch::empty({rows * slices * 2 + 2}, options.dtype(torch::kFloat32));  // the partials, then the divisors
  auto step = torch::empty({1}, options);
  bs::Workspace ws{reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()), reinterpret_cast<float2*>(partial.data_ptr<float>()),
                   step.data_ptr<int64_t>(), partial.data_ptr<float>() + rows * slices * 2};
  const int c = static_cast<int>(candidates);
  const int64_t* steps_in = steps.data_ptr<int64_t>();
  const bs::Lengths lengths{prompt_len, max_length, length_penalty, static_cast<int>(early_stopping)};
  switch (logits.scalar_type()) {
    case torch::kFloat32: launch_candidates<float>(logits, chunk, slices, bulk, c, ws, steps_in, lengths); break;
    case torch::kBFloat16: launch_candidates<__nv_bfloat16>(logits, chunk, slices, bulk, c, ws, steps_in, lengths); break;
    case torch::kFloat16: launch_candidates<__half>(logits, chunk, slices, bulk, c, ws, steps_in, lengths); break;
    default: TORCH_CHECK(false, "logits: float32, bfloat16 or float16");
  }
  bs::State st{eos.data_ptr<int64_t>(), static_cast<int>(eos.numel()), steps.data_ptr<int64_t>(),
               running_scores.data_ptr<float>(), history_tokens.data_ptr<int64_t>(), history_parents.data_ptr<int64_t>(),
               pool_scores.data_ptr<float>(), pool_finished.data_ptr<bool>(), pool_step.data_ptr<int64_t>(),
               pool_parent.data_ptr<int64_t>(), pool_token.data_ptr<int64_t>(), improvable.data_ptr<bool>(),
               all_hit.data_ptr<bool>(), static_cast<int>(beams), c, lengths};
  // launched while candidates_kernel runs: it reads the state, then waits for the candidates
  xllm::launch_with(xllm::programmatic(), bs::update_kernel, dim3(static_cast<unsigned>(batch)), dim3(bs::kThreads), 0,
                    vocab, static_cast<int>(slices), ws, st);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("beam_step", &beam_step, "one beam-search step (transformers' semantics), updating the state in place");
  m.def("max_candidates", &max_candidates, "the most continuations per request and step the kernel keeps");
}
