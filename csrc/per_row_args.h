// The bindings' side of per_row.cuh: a per-request argument given as an optional (batch,) tensor
// and a number for every request.
#pragma once

#include <torch/extension.h>

#include "per_row.cuh"

namespace xllm {

// `values` (checked: a contiguous (batch,) CUDA tensor of `type`) or, when absent, `scalar`.
template <typename T>
PerRow<T> per_row(const c10::optional<torch::Tensor>& values, T scalar, int64_t batch, c10::ScalarType type,
                  const char* name) {
  if (!values.has_value()) return {nullptr, scalar};
  TORCH_CHECK(values->is_cuda() && values->scalar_type() == type && values->is_contiguous() && values->numel() == batch,
              name, ": contiguous (batch,) CUDA tensor of ", c10::toString(type));
  return {values->data_ptr<T>(), scalar};
}

}  // namespace xllm
