// Step sampler: the binding's view of the launches (dispatch.cuh), instantiated per logits type in
// dispatch_float.cu, dispatch_bfloat16.cu and dispatch_half.cu.
#pragma once

#include <torch/extension.h>

#include <cstdint>

#include "sampler/sampling.cuh"
#include "slice_top_keys.cuh"

namespace xllm::sampler {

constexpr int64_t kMaxChunkBytes = 100 * 1024;  // the most one block of the caching kernel caches
// Logits (rows x vocab) per 64 of k from which a short top-k takes the top-k kernels: below it
// the caching kernel is faster (H200, top-k 50 and 128: docs/dev/benchmark-log.md).
constexpr int64_t kTopKMinElements = 4'000'000;

// Whether a batch whose top_k is the number k for every row, without penalties, takes the top-k
// kernels (top_k_sampling.cuh).
constexpr bool short_top_k(int64_t batch, int64_t vocab, int64_t k) {
  return k >= 1 && k <= slice::kMaxKeys && k < vocab && batch * vocab >= kTopKMinElements * ((k + 63) / 64);
}

// The largest vocab the kernels take; the op takes its torch path beyond.
constexpr int64_t max_vocab() { return kMaxCluster * (kMaxChunkBytes / 4); }

// Launch the kernels that `logits` (T: float, __nv_bfloat16 or __half; contiguous, on the current
// device) and the settings call for, writing args.tokens and args.logprobs: the top-k kernels
// when short_top_k; else the streaming kernel when unfiltered (no filters or penalties, the
// settings numbers) and the row fits it; else the caching kernel (its penalty pass when
// penalty). All draw the same tokens.
template <typename T>
void dispatch(const torch::Tensor& logits, Args args, bool penalty, bool unfiltered, bool short_top_k);

}  // namespace xllm::sampler
