// The bulk copy engine (sm_90) from global into shared memory, completing on an mbarrier:
// helpers shared by the steps' CUDA sources (torch-free).
#pragma once

#include <cstdint>

namespace xllm {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Initialise `barrier` for one arrival per phase (the thread that issues the copies); the
// caller then makes the initialisation visible (fence_barrier_init and a barrier among the waiters).
__device__ __forceinline__ void init_barrier(uint64_t* barrier) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(barrier)) : "memory");
}

__device__ __forceinline__ void fence_barrier_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }

// Orders this thread's earlier ordinary shared-memory accesses before later bulk copies into the same memory.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Copy `bytes` (a multiple of 16, both addresses 16-byte aligned) from global memory into this
// block's shared memory; `barrier`'s current phase completes when they have arrived.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* barrier) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(barrier)), "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   shared_address(dst)),
               "l"(src), "r"(bytes), "r"(shared_address(barrier))
               : "memory");
}

// Wait until `barrier`'s phase of parity `parity` (0 for its first use, then alternating) has completed.
__device__ __forceinline__ void wait_barrier(uint64_t* barrier, uint32_t parity = 0) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(shared_address(barrier)),
      "r"(parity)
      : "memory");
}

// One warp's ring of Stages shared-memory stages of TileElems elements of T, filled by bulk copies
// that its lane 0 issues: the warp's j-th tile (j = 0, 1, ... below `count`, the warp's own
// numbering) goes to stage j % Stages, whose barrier completes phase j / Stages when it arrives.
// source(j, &src, &elems) names the j-th tile's global address and length (elements whose bytes
// are a multiple of 16, the address 16-byte aligned).
template <typename T, int Stages, int TileElems>
struct WarpRing {
  T* stages;      // this warp's Stages * TileElems elements of shared memory
  uint64_t* bar;  // its Stages barriers

  // The stage that holds the warp's j-th tile.
  __device__ __forceinline__ T* stage(int64_t j) const { return stages + static_cast<int>(j % Stages) * TileElems; }

  // Lane 0 initialises the barriers and requests the first Stages tiles; then the warp syncs.
  template <typename Source>
  __device__ __forceinline__ void start(int lane, int64_t count, Source source) const {
    if (lane == 0) {
      for (int slot = 0; slot < Stages; ++slot) init_barrier(&bar[slot]);
      fence_barrier_init();
      for (int64_t j = 0; j < Stages && j < count; ++j) fetch(j, source);
    }
    __syncwarp();
  }

  // Wait until the warp's j-th tile has arrived in stage(j).
  __device__ __forceinline__ void wait(int64_t j) const {
    wait_barrier(&bar[j % Stages], static_cast<uint32_t>(j / Stages) & 1);
  }

  // After the warp's lanes have read their j-th tile: lane 0 refills its stage with tile j + Stages.
  template <typename Source>
  __device__ __forceinline__ void refill(int lane, int64_t j, int64_t count, Source source) const {
    __syncwarp();
    if (lane == 0 && j + Stages < count) {
      fence_proxy_async();
      fetch(j + Stages, source);
    }
  }

 private:
  template <typename Source>
  __device__ __forceinline__ void fetch(int64_t j, Source source) const {
    const T* src;
    int elems;
    source(j, &src, &elems);
    bulk_load(stage(j), src, static_cast<uint32_t>(elems * static_cast<int>(sizeof(T))), &bar[j % Stages]);
  }
};

}  // namespace xllm
