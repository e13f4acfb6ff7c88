// Hopper warpgroup MMA (wgmma, sm_90a) for the expanded linear and conv kernels: the layout of
// an operand tile in shared memory, its descriptor, the m64nNk16 instructions (N = 256, 128, 64)
// with fp32 accumulators, their fences and the accumulators' fragment map.
//
// Everything here compiles on every target; the instructions exist only where nvcc defines
// __CUDA_ARCH_FEAT_SM90_ALL (-gencode=arch=compute_90a,code=sm_90a).  EXPANSE_FAST_WGMMA says
// so in device code; the host asks the loaded binary (wgmma_probe_kernel) before it launches
// a wgmma kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define EXPANSE_FAST_WGMMA 1
#else
#define EXPANSE_FAST_WGMMA 0
#endif

namespace expanse_fast {
namespace wgmma {

// ---- operand tiles in shared memory (host-testable index math) -------------------------------
// A no-swizzle ("interleaved") operand is made of core matrices of 8 rows x 16 bytes, each 128
// contiguous bytes.  The descriptor gives the start and two strides in bytes: LBO between cores
// adjacent along K, SBO between cores adjacent along M (or N).  That reading holds for both
// K-major and MN-major operands (PTX ISA, wgmma "canonical layouts", no swizzling).
//
// A tile whose global rows are OUTER long and INNER wide (INNER contiguous; VEC elements per
// 16 bytes) is stored row block by row block: the 8 rows of block o/8 as INNER/VEC cores side
// by side, core c holding columns c*VEC.. of those rows, 16 bytes a row.  Chunk j of the copy
// (16 bytes) goes to byte 16 j, so a warp writes 512 contiguous bytes.  For a K-major operand
// (rows are M or N) cores along K are 128 bytes apart (LBO) and row blocks INNER*16 (SBO); for
// an MN-major one (rows are K) it is the other way round.
template <int INNER, int VEC>
__host__ __device__ __forceinline__ int tile_offset(int o, int i) {  // element (row o, column i)
  return ((o / 8) * (INNER / VEC) + i / VEC) * (8 * VEC) + (o % 8) * VEC + i % VEC;
}
// Row and first column of copy chunk j (per_row = INNER / VEC chunks a row).
__host__ __device__ __forceinline__ void chunk_origin(int j, int per_row, int& o, int& col_chunk) {
  o = (j / (8 * per_row)) * 8 + j % 8;
  col_chunk = (j / 8) % per_row;
}
struct DescFields {
  int start;          // elements from the tile's base
  uint32_t lbo, sbo;  // bytes
};
// The operand block whose first element is (mn0, k0) (multiples of 8) of such a tile, whose
// contiguous dimension is K (K_MAJOR: rows are M/N) or M/N (rows are K).
template <bool K_MAJOR, int INNER, int VEC>
__host__ __device__ __forceinline__ DescFields desc_fields(int mn0, int k0) {
  constexpr uint32_t CORE = 128, BLOCK = INNER * 16;
  return K_MAJOR ? DescFields{tile_offset<INNER, VEC>(mn0, k0), CORE, BLOCK}
                 : DescFields{tile_offset<INNER, VEC>(k0, mn0), BLOCK, CORE};
}

// A K-major operand whose rows are 128 bytes (64 fp16/bf16: the linear kernels' BK) can
// instead be stored with the 128-byte swizzle (EXPANSE_FAST_CUDA_SWIZZLE=1, an experiment):
// row o, 16-byte chunk c goes to chunk c ^ (o % 8) of that row, i.e. byte address bits 4-6
// XOR bits 7-9 of a tile whose base is 1024-byte aligned, which is how wgmma's swizzle mode
// (TMA's too) reads it.  Eight rows of one chunk column then lie in eight different 16-byte
// bank groups, for the copies' stores and for the tensor cores' reads alike.
template <int INNER, int VEC>
__host__ __device__ __forceinline__ int tile_offset_sw128(int o, int i) {
  static_assert(INNER == 8 * VEC, "128-byte rows");
  return o * INNER + ((i / VEC) ^ (o % 8)) * VEC + i % VEC;
}
// The block whose first element is (mn0, k0) (mn0 a multiple of 8, k0 of 16): its start as
// if unswizzled (the hardware applies the XOR to every address it forms), the stride between
// 8-row groups as SBO; LBO is not read for a K extent inside one 128-byte row (set to 16).
template <int INNER, int VEC>
__host__ __device__ __forceinline__ DescFields desc_fields_sw128(int mn0, int k0) {
  static_assert(INNER == 8 * VEC, "128-byte rows");
  return DescFields{mn0 * INNER + k0, 16, 8 * 128};
}
constexpr uint64_t kNoSwizzle = 0, kSwizzle128 = 1;  // the descriptor's layout type (bits 62-63)

// ---- instructions ------------------------------------------------------------------------------
__device__ __forceinline__ uint64_t descriptor(const void* smem, uint32_t lbo, uint32_t sbo,
                                               uint64_t layout = kNoSwizzle) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32) |  // base offset 0
         (layout << 62);
}

// Keeps the compiler from moving accumulator reads or writes across the asynchronous MMA.
template <int R>
__device__ __forceinline__ void pin(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ void fence() {  // before the first wgmma that reads d
#if EXPANSE_FAST_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void commit() {  // the MMAs issued since the last commit: a group
#if EXPANSE_FAST_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Every committed group of this warpgroup but the newest PENDING done: with PENDING = 1 the
// MMAs of one k-tile run on while the next tile's barrier is reached and its MMAs are issued.
template <int PENDING>
__device__ __forceinline__ void wait() {
#if EXPANSE_FAST_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
#endif
}
__device__ __forceinline__ void wait_all() { wait<0>(); }  // every committed group done
// Shared memory written by the generic proxy (cp.async, plain stores) and read next by the
// tensor cores (the async proxy): each writing thread fences before the barrier.
__device__ __forceinline__ void fence_shared_for_async_proxy() {
#if EXPANSE_FAST_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// The accumulators d[i] .. d[i + 31] as read-write ("+f") asm operands.
#define EXPANSE_FAST_D4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define EXPANSE_FAST_D32(i)                                                            \
  EXPANSE_FAST_D4(i), EXPANSE_FAST_D4(i + 4), EXPANSE_FAST_D4(i + 8), EXPANSE_FAST_D4(i + 12), \
      EXPANSE_FAST_D4(i + 16), EXPANSE_FAST_D4(i + 20), EXPANSE_FAST_D4(i + 24),       \
      EXPANSE_FAST_D4(i + 28)

// One asm statement per instruction shape; TY is the operand type's PTX name ("f16", "bf16").
// Operands: the N / 2 accumulators d, then desc_a, desc_b, scale_d, TRANS_A, TRANS_B.
#define EXPANSE_FAST_WGMMA_M64N256K16(TY)                                              \
  asm volatile(                                                                        \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                        \
  "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " "                         \
  "{"                                                                                  \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "                                 \
  "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "                       \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "                       \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                       \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, "                       \
  "%60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, "                       \
  "%72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, "                       \
  "%84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                       \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, "               \
  "%108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, "           \
  "%120, %121, %122, %123, %124, %125, %126, %127"                                     \
  "}, %128, %129, p, 1, 1, %131, %132;\n}\n"                                         \
  : EXPANSE_FAST_D32(0), EXPANSE_FAST_D32(32), EXPANSE_FAST_D32(64), EXPANSE_FAST_D32(96) \
  : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B)                 \
  : "memory")

#define EXPANSE_FAST_WGMMA_M64N128K16(TY)                                              \
  asm volatile(                                                                        \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                         \
  "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                         \
  "{"                                                                                  \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "                                 \
  "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, "                       \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "                       \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                       \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, "                       \
  "%60, %61, %62, %63"                                                                 \
  "}, %64, %65, p, 1, 1, %67, %68;\n}\n"                                             \
  : EXPANSE_FAST_D32(0), EXPANSE_FAST_D32(32)                                          \
  : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B)                 \
  : "memory")

#define EXPANSE_FAST_WGMMA_M64N64K16(TY)                                               \
  asm volatile(                                                                        \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                         \
  "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                          \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "            \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "  \
  "%32, %33, p, 1, 1, %35, %36;\n}\n"                                                  \
  : EXPANSE_FAST_D32(0)                                                                \
  : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B)                 \
  : "memory")

// d (64 x N per warpgroup, fp32; N = 256, 128 or 64) += A (64 x 16) * B (16 x N), both from shared
// memory.  TRANS_A / TRANS_B: 0 = K-major, 1 = M-major / N-major (16-bit types only).
// scale_d == 0 ignores d's old value.  Each thread holds N / 2 accumulators.
template <typename T, int N, int TRANS_A, int TRANS_B>
__device__ __forceinline__ void mma_m64k16(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                           int scale_d) {
#if EXPANSE_FAST_WGMMA
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                "wgmma here takes fp16 or bf16");
  static_assert(N == 256 || N == 128 || N == 64,
                "instantiated shapes: m64n256k16, m64n128k16, m64n64k16");
  constexpr bool kHalf = std::is_same<T, __half>::value;
  if constexpr (N == 256 && kHalf) {
    EXPANSE_FAST_WGMMA_M64N256K16("f16");
  } else if constexpr (N == 256) {
    EXPANSE_FAST_WGMMA_M64N256K16("bf16");
  } else if constexpr (N == 128 && kHalf) {
    EXPANSE_FAST_WGMMA_M64N128K16("f16");
  } else if constexpr (N == 128) {
    EXPANSE_FAST_WGMMA_M64N128K16("bf16");
  } else if constexpr (kHalf) {
    EXPANSE_FAST_WGMMA_M64N64K16("f16");
  } else {
    EXPANSE_FAST_WGMMA_M64N64K16("bf16");
  }
#else
  __trap();  // the host never launches wgmma kernels from a binary without them
#endif
}

// Accumulator element i of thread t (of its warpgroup's 128): row and column in the 64 x N
// tile (the m64nN fp32 fragment layout: each warp owns 16 rows, pairs of adjacent columns).
__host__ __device__ __forceinline__ int acc_row(int t, int i) {
  return 16 * (t / 32) + (t % 32) / 4 + 8 * ((i >> 1) & 1);
}
__host__ __device__ __forceinline__ int acc_col(int t, int i) {
  return 8 * (i >> 2) + 2 * (t % 4) + (i & 1);
}

}  // namespace wgmma
}  // namespace expanse_fast
