// A barrier in global memory for the blocks that share one row, for kernels whose blocks are
// all resident at once (cooperative launch), the relaxed loads and stores it polls with, and a
// ticket counter (which block of a row finishes last).
// Shared by the steps' CUDA sources.
#pragma once

#include <cstdint>

namespace xllm {

// What one of a row's `blocks` blocks adds to the row's counter on arriving: the leader
// 2^31 - (blocks - 1), the others 1; together 2^31, so the top bit of the counter flips once
// every block has arrived and its low bits come back to where they were. The counter needs no
// reset between launches (CUDA graph replays included).
__device__ __forceinline__ unsigned arrival(unsigned blocks, bool leader) { return leader ? 0x80000000u - (blocks - 1) : 1u; }

// Thread 0 of each of the row's `blocks` blocks calls this (after a __syncthreads, so that its
// release covers the whole block's writes); it returns once all have arrived. Writes made
// before the call are visible to every block after it.
__device__ __forceinline__ void row_barrier(unsigned* counter, unsigned blocks, bool leader) {
  unsigned old, now;
  asm volatile("atom.add.release.gpu.global.u32 %0, [%1], %2;" : "=r"(old) : "l"(counter), "r"(arrival(blocks, leader)) : "memory");
  do {
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(now) : "l"(counter) : "memory");
  } while (((old ^ now) & 0x80000000u) == 0);
}

// Take a ticket: add 1 to *counter and return the count before, with acquire and release
// semantics at gpu scope. Called by thread 0 after a __syncthreads, its release covers the whole
// block's writes; after the next __syncthreads, the block sees the writes of every block that
// took an earlier ticket.
__device__ __forceinline__ unsigned ticket(unsigned* counter) {
  unsigned old;
  asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], 1;" : "=r"(old) : "l"(counter) : "memory");
  return old;
}

// Loads and stores that other SMs see without ordering anything else (gpu scope, relaxed).
__device__ __forceinline__ unsigned load_relaxed(const unsigned* p) {
  unsigned v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint64_t load_relaxed(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void store_relaxed(unsigned* p, unsigned v) {
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void store_relaxed(uint64_t* p, uint64_t v) {
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// The same barrier split in two, with no memory ordering, for data that shows by itself
// whether it has arrived: row_phase before arriving (the top bit cannot flip until this block
// has arrived), row_arrive (does not wait for the counter's reply), then row_wait(phase).
__device__ __forceinline__ unsigned row_phase(const unsigned* counter) { return load_relaxed(counter) & 0x80000000u; }

__device__ __forceinline__ void row_arrive(unsigned* counter, unsigned blocks, bool leader) {
  asm volatile("red.relaxed.gpu.global.add.u32 [%0], %1;" ::"l"(counter), "r"(arrival(blocks, leader)) : "memory");
}

__device__ __forceinline__ void row_wait(const unsigned* counter, unsigned phase) {
  while (row_phase(counter) == phase) {
  }
}

}  // namespace xllm
