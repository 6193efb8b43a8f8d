// Vector loads of logits and their float32 values, shared by the steps' CUDA sources (torch-free).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace xllm {

template <typename T>
__device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// VEC elements of T per 16-byte load (VEC = 1: scalar loads for unaligned rows).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

}  // namespace xllm
