// The Hopper copy engine (TMA) for the linear forward's experimental kernel: 2-D tile copies
// from global to shared memory through a tensor map, completing on an mbarrier (sm_90), and
// the host's description of each operand before it is encoded.
//
// A copy-engine write is an async-proxy write, as the wgmma reads are: the kernel needs no
// proxy fence per tile (the cp.async kernels fence every k-tile, and in SASS that fence is a
// MEMBAR.ALL.CTA).  Completion is the barrier's phase flipping once the expected bytes landed;
// the consumers wait on the phase's parity.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (the driver call is looked up at run time)
#include <cuda_runtime.h>

#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define EXPANSE_FAST_TMA 1
#else
#define EXPANSE_FAST_TMA 0
#endif

namespace expanse_fast {
namespace tma {

// ---- host: one operand as the copy engine reads it ------------------------------------------
// A row-major matrix of 2-byte elements, rows x cols (row stride ld elements), read in boxes of
// box_rows x 64 elements (128-byte box rows, stored with the 128-byte swizzle); what lies
// outside rows x cols reads as zeros, so a box at a phase's last, partial k-tile or past the
// last row needs no mask.  cols == 0: the operand is absent.
struct Operand {
  const void* base;
  int64_t rows, cols, ld;
  int box_rows;
};
constexpr int kBoxCols = 64;  // 128 bytes of fp16/bf16

// Whether the copy engine takes it: 16-byte aligned base and row stride, extents it can
// address.  (A caller that gets false runs its cp.async kernel instead.)
inline bool usable(const Operand& op) {
  const auto at = reinterpret_cast<uintptr_t>(op.base);
  return op.rows > 0 && op.cols > 0 && at % 16 == 0 && (op.ld * 2) % 16 == 0 &&
         op.ld >= op.cols && op.rows < (int64_t{1} << 31) && op.cols < (int64_t{1} << 31) &&
         op.box_rows > 0 && op.box_rows <= 256;
}

// Element (r, c) of the box at (col c0, row r0), as the engine fills it (host-side model
// for the emulation; the engine's swizzle places it at wgmma::tile_offset_sw128(r, c)).
template <typename T>
inline T box_element(const Operand& op, int64_t c0, int64_t r0, int r, int c, T zero) {
  const int64_t row = r0 + r, col = c0 + c;
  if (row >= op.rows || col >= op.cols) return zero;
  return static_cast<const T*>(op.base)[row * op.ld + col];
}

// Encodes op into map (bf16 or fp16 elements).  False where the driver lacks the call or
// refuses the map.  Defined in expanded_linear_kernels.cu.
bool encode(CUtensorMap* map, const Operand& op, bool bf16);

// ---- device ---------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void barrier_init(uint64_t* bar, uint32_t arrivals) {
#if EXPANSE_FAST_TMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(arrivals)
               : "memory");
#endif
}

// After the barriers' initialisation, before any thread waits on them or a copy completes on
// them: visible to the other threads (the __syncthreads that follows) and to the copy engine.
__device__ __forceinline__ void barrier_init_fence() {
#if EXPANSE_FAST_TMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// This thread's arrival, announcing `bytes` that copies will deliver in this phase.
__device__ __forceinline__ void arrive_expect_bytes(uint64_t* bar, uint32_t bytes) {
#if EXPANSE_FAST_TMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
#endif
}

// Waits until the phase of this parity has completed; false if it gave up.  Bounded: a copy
// that never lands (a wrong map) must not hang the GPU; the caller traps once no MMA is in
// flight (a trap here, with a k-tile's MMAs running, made ptxas wait for them every tile).
__device__ __forceinline__ bool wait_phase(uint64_t* bar, uint32_t parity) {
#if EXPANSE_FAST_TMA
  const uint32_t at = smem_u32(bar);
  for (uint32_t tries = 0; tries < (1u << 22); ++tries) {
    uint32_t done = 0;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(at), "r"(parity)
        : "memory");
    if (done) return true;
  }
  return false;
#else
  return true;
#endif
}

// The box at (column c0, row r0) of the map's operand into dst (1024-byte aligned), completing
// on bar.
__device__ __forceinline__ void load_box(void* dst, const CUtensorMap* map, int c0, int r0,
                                         uint64_t* bar) {
#if EXPANSE_FAST_TMA
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(r0), "r"(smem_u32(bar))
      : "memory");
#endif
}

}  // namespace tma
}  // namespace expanse_fast
