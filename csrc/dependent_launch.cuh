// Programmatic dependent launch (sm_90), device side: helpers shared by the steps' CUDA sources
// (torch-free). A kernel launched with xllm::programmatic() (launch_helpers.cuh) may start while
// the kernel before it on the stream still runs; it must call wait_for_prerequisite() before it
// reads anything that kernel writes.
#pragma once

namespace xllm {

// Let the next kernel on the stream (launched with the programmatic attribute) start now.
__device__ __forceinline__ void launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

// Wait until the kernel before this one on the stream has completed and its writes are visible
// (returns at once when this kernel was launched without the programmatic attribute).
__device__ __forceinline__ void wait_for_prerequisite() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

}  // namespace xllm
