// A per-request parameter of a kernel: a (batch,) array, or one value for every request.
// Shared by the steps' CUDA sources (torch-free; the bindings build them with per_row_args.h).
#pragma once

#include <cstdint>

namespace xllm {

// A (batch,) array, or one value for every row when `values` is null.
template <typename T>
struct PerRow {
  const T* values;
  T scalar;
  __host__ __device__ __forceinline__ T operator[](int64_t row) const { return values ? values[row] : scalar; }
};

// The rows from `rows` on (a launch's share of the batch).
template <typename T>
__host__ __device__ __forceinline__ const T* offset(const T* p, int64_t rows) { return p ? p + rows : nullptr; }
template <typename T>
__host__ __device__ __forceinline__ PerRow<T> offset(PerRow<T> p, int64_t rows) { return {offset(p.values, rows), p.scalar}; }

}  // namespace xllm
