// The cp.async GEMM pipeline the expanded linear and the channels_last conv kernels share:
// 16-byte asynchronous copies (plain or gathered, zero-filled outside), the shared-memory
// layouts of the stages (padded rows; wgmma core matrices, optionally 128-byte swizzled), the
// tile maths (wgmma, WMMA, SIMT FMA), the main loop over a problem's phases and k-tiles, and
// the staged row-wise write-outs of an output tile.
//
// A "problem" tells the main loop num_phases(), phase_len(p), tile_a(p, k0) and tile_b(p, k0):
// each tile is a TileSrc (a dense rectangle of a row-major matrix) or a gather source (one
// pointer a 16-byte chunk, null for zeros; see GatherSrc).  Everything that decides where an
// element goes is __host__ __device__, so the tile emulations in tests/csrc run it on the host.
//
// Included by one .cu file each: its contents live in that file's anonymous namespace.
#pragma once

#include "kernel_common.cuh"
#include "wgmma.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

namespace expanse_fast {
namespace {

using namespace nvcuda;
using namespace common;

// ---- asynchronous 16-byte copies (sm_80+) --------------------------------------------------
__host__ __device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#else
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}
// The same, but the 16 bytes are zeros (nothing is read) when !valid: a gathered chunk outside
// the operand (an im2col pixel in the padding) costs no branch.  gmem must still be a valid
// address then (callers pass the operand's base).
__host__ __device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem,
                                                          bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(valid ? 16 : 0));
#else
  *reinterpret_cast<uint4*>(smem) = valid ? *reinterpret_cast<const uint4*>(gmem) : uint4{};
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int PENDING>  // waits until at most PENDING of the newest groups are in flight
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
#endif
}

// Where one operand tile comes from: its top-left element in global memory, the row stride,
// and how many rows/columns are valid (the rest is zero-filled, never read).
template <typename T>
struct TileSrc {
  const T* ptr;
  int64_t ld;
  int rows, cols;
};

// Copies one 16-byte chunk (VEC elements of a global row) to shared memory: cp.async when it
// is in range and aligned, else element by element with zeros past the valid region.
template <typename T>
__host__ __device__ __forceinline__ void copy_chunk(T* sp, const TileSrc<T>& src, int r, int col) {
  constexpr int VEC = 16 / sizeof(T);
  const T* gp = src.ptr + r * src.ld + col;
  if (r < src.rows && col + VEC <= src.cols && (reinterpret_cast<uintptr_t>(gp) & 15) == 0) {
    cp_async16(sp, gp);
  } else {
    const T zero = from_f<T>(0.f);
#pragma unroll
    for (int e = 0; e < VEC; ++e) sp[e] = (r < src.rows && col + e < src.cols) ? gp[e] : zero;
  }
}

// Whether an OUTER x INNER tile lies wholly inside src with every 16-byte chunk aligned: then
// its copies need no per-chunk checks.  The same answer for every thread of the block.
template <int OUTER, int INNER, typename T>
__host__ __device__ __forceinline__ bool tile_inside(const TileSrc<T>& src) {
  constexpr int VEC = 16 / sizeof(T);
  return src.rows >= OUTER && src.cols >= INNER && src.ld % VEC == 0 &&
         (reinterpret_cast<uintptr_t>(src.ptr) & 15) == 0;
}

// Copies one thread's chunks of an OUTER x INNER tile (INNER contiguous): chunk i starts at
// row r0 + i * ROW_STEP, column col of src, and goes to dst(i) in shared memory.  Both smem
// layouts give a thread chunks THREADS / PER_ROW rows apart in one column, so a tile wholly
// inside src (most of them) takes the unchecked copy: one pointer per thread, stepped by a
// constant number of rows, instead of per-chunk bounds and alignment tests.
template <typename T, int OUTER, int INNER, int THREADS, class Dst>
__host__ __device__ __forceinline__ void copy_rows(const TileSrc<T>& src, int r0, int col,
                                                   Dst dst) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int PER_ROW = INNER / VEC, CHUNKS = OUTER * PER_ROW;
  static_assert(INNER % VEC == 0 && CHUNKS % THREADS == 0, "tile must split evenly in chunks");
  static_assert(THREADS % PER_ROW == 0, "a thread's chunks share their column");
  constexpr int ROW_STEP = THREADS / PER_ROW;  // rows between a thread's chunks
  if (tile_inside<OUTER, INNER>(src)) {
    const T* g = src.ptr + r0 * src.ld + col;
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) cp_async16(dst(i), g + i * ROW_STEP * src.ld);
  } else {
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) copy_chunk(dst(i), src, r0 + i * ROW_STEP, col);
  }
}

// Copy a ROWS x COLS tile (columns contiguous in global and shared memory, row stride sld);
// thread tid of THREADS copies chunks tid, tid + THREADS, ...
template <typename T, int ROWS, int COLS, int THREADS>
__host__ __device__ __forceinline__ void load_tile(T* s, int sld, const TileSrc<T>& src, int tid) {
  constexpr int VEC = 16 / sizeof(T), PER_ROW = COLS / VEC, ROW_STEP = THREADS / PER_ROW;
  const int r0 = tid / PER_ROW, col = (tid % PER_ROW) * VEC;
  T* d = s + r0 * sld + col;
  copy_rows<T, ROWS, COLS, THREADS>(src, r0, col, [&](int i) { return d + i * ROW_STEP * sld; });
}

// Where a block's staged output tile goes: element (m, n) of the tile is base[offset + m * ld +
// n], written for rows m < rows and columns col_lo <= n < col_hi only (offset may name an
// element outside the buffer when col_lo > 0; no such element is touched).
struct OutRegion {
  int64_t offset, ld;
  int rows, col_lo, col_hi;
};

// The rows (or columns) of a tile of `tile` that lie inside when `left` remain from its first.
__host__ __device__ __forceinline__ int tile_extent(int64_t left, int tile) {
  return left < tile ? static_cast<int>(left) : tile;
}

// Stores one 16-byte chunk of VEC values, the columns c .. c + VEC - 1 of the row whose
// element 0 is base[at]: as one 16-byte store when the chunk lies wholly inside the region's
// columns and is aligned in global memory, else element by element inside them.
template <typename T>
__host__ __device__ __forceinline__ void put_chunk(const T* vals, T* base, int64_t at, int c,
                                                   const OutRegion& r) {
  constexpr int VEC = 16 / sizeof(T);
  if (c >= r.col_lo && c + VEC <= r.col_hi &&
      (reinterpret_cast<uintptr_t>(base + at + c) & 15) == 0) {
    *reinterpret_cast<uint4*>(base + at + c) = *reinterpret_cast<const uint4*>(vals);
  } else {
    for (int e = 0; e < VEC; ++e)
      if (c + e >= r.col_lo && c + e < r.col_hi) base[at + c + e] = vals[e];
  }
}

// Writes the region of a ROWS x COLS tile staged in shared memory (row stride lds) to global
// memory: thread tid takes 16-byte chunks tid, tid + THREADS, ... row by row, so a warp writes
// 512 contiguous bytes of a row; a chunk that is not wholly inside the region or not 16-byte
// aligned in global memory goes element by element.
template <typename T, int ROWS, int COLS, int THREADS>
__host__ __device__ __forceinline__ void write_tile_rows(const T* s, int lds, T* base,
                                                         const OutRegion& r, int tid) {
  constexpr int VEC = 16 / sizeof(T), PER_ROW = COLS / VEC;
  static_assert(COLS % VEC == 0, "whole chunks a row");
  for (int j = tid; j < ROWS * PER_ROW; j += THREADS) {
    const int m = j / PER_ROW, c = (j % PER_ROW) * VEC;
    if (m >= r.rows || c + VEC <= r.col_lo || c >= r.col_hi) continue;
    put_chunk(s + m * lds + c, base, r.offset + m * r.ld, c, r);
  }
}

// The same for a tile staged as fp32 and written as T: each output chunk's VEC values are
// read (lds and the chunks' columns keep them 16-byte aligned), passed through op(m, c, v)
// (row m, first column c of the chunk in the tile) and converted once.  Row m of the tile
// starts at base[row_at(m)] (r.offset and r.ld unread): rows need not be evenly spaced.
template <typename T, int ROWS, int COLS, int THREADS, class RowAt, class Op>
__host__ __device__ __forceinline__ void write_f32_tile_rows_at(const float* s, int lds,
                                                                T* base, const OutRegion& r,
                                                                RowAt&& row_at, int tid,
                                                                Op&& op) {
  constexpr int VEC = 16 / sizeof(T), PER_ROW = COLS / VEC;
  static_assert(COLS % VEC == 0 && VEC % 4 == 0, "whole chunks a row, read as float4");
  for (int j = tid; j < ROWS * PER_ROW; j += THREADS) {
    const int m = j / PER_ROW, c = (j % PER_ROW) * VEC;
    if (m >= r.rows || c + VEC <= r.col_lo || c >= r.col_hi) continue;
    float v[VEC];
    const float* src = s + m * lds + c;
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const float4 f = reinterpret_cast<const float4*>(src)[q];
      v[4 * q] = f.x, v[4 * q + 1] = f.y, v[4 * q + 2] = f.z, v[4 * q + 3] = f.w;
    }
    op(m, c, v);
    alignas(16) T out[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = from_f<T>(v[e]);
    put_chunk(out, base, row_at(m), c, r);
  }
}
// Rows evenly spaced: row m at r.offset + m * r.ld.
template <typename T, int ROWS, int COLS, int THREADS, class Op>
__host__ __device__ __forceinline__ void write_f32_tile_rows(const float* s, int lds, T* base,
                                                             const OutRegion& r, int tid,
                                                             Op&& op) {
  write_f32_tile_rows_at<T, ROWS, COLS, THREADS>(
      s, lds, base, r, [&](int m) { return r.offset + m * r.ld; }, tid, op);
}

// Shared-memory layout of the pipeline stages, rows padded (the WMMA and SIMT math).
// AK: A tile stored k-contiguous ([BM][BK]) else m-contiguous ([BK][BM]); BKM: B tile stored
// k-contiguous ([BN][BK]) else n-contiguous.  Rows are padded by one 16-byte chunk: keeps
// cp.async/WMMA alignment, staggers the banks.
template <typename T, int BM_, int BN_, int BK_, int THREADS, int STAGES, bool AK_, bool BKM_>
struct Smem {
  static constexpr bool AK = AK_, BKM = BKM_;
  static constexpr int PAD = 16 / sizeof(T);
  static constexpr int LDA = AK ? BK_ + PAD : BM_ + PAD;
  static constexpr int LDB = BKM ? BK_ + PAD : BN_ + PAD;
  static constexpr int A_ELEMS = (AK ? BM_ : BK_) * LDA;
  static constexpr int B_ELEMS = (BKM ? BN_ : BK_) * LDB;
  static constexpr int STAGE = A_ELEMS + B_ELEMS;
  static constexpr size_t BYTES = STAGES * STAGE * sizeof(T);
  static_assert((A_ELEMS * sizeof(T)) % 32 == 0 && (STAGE * sizeof(T)) % 32 == 0,
                "WMMA needs 32-byte aligned tiles");

  __host__ __device__ static T* a(unsigned char* raw, int stage) {
    return reinterpret_cast<T*>(raw) + stage * STAGE;
  }
  __host__ __device__ static T* b(unsigned char* raw, int stage) { return a(raw, stage) + A_ELEMS; }
  __host__ __device__ static void load_a(T* s, const TileSrc<T>& src, int tid) {
    if (AK) load_tile<T, BM_, BK_, THREADS>(s, LDA, src, tid);
    else load_tile<T, BK_, BM_, THREADS>(s, LDA, src, tid);
  }
  __host__ __device__ static void load_b(T* s, const TileSrc<T>& src, int tid) {
    if (BKM) load_tile<T, BN_, BK_, THREADS>(s, LDB, src, tid);
    else load_tile<T, BK_, BN_, THREADS>(s, LDB, src, tid);
  }
  __host__ __device__ static T a_at(const T* s, int m, int k) {
    return AK ? s[m * LDA + k] : s[k * LDA + m];
  }
  __host__ __device__ static T b_at(const T* s, int k, int n) {
    return BKM ? s[n * LDB + k] : s[k * LDB + n];
  }

  // Gathered operand tiles, as CoreSmem's (the channels_last conv kernels on the WMMA and
  // SIMT maths):
  // thread tid's chunk i of an OUTER x INNER tile (row stride LD) is the one load_tile
  // copies, row tid / PER_ROW + i * ROW_STEP, column (tid % PER_ROW) * VEC, so a thread's
  // chunks share their column.
  static constexpr int VEC = 16 / sizeof(T);
  template <int OUTER, int INNER>
  __host__ __device__ static void chunk_of(int tid, int i, int& row, int& col, int& at) {
    constexpr int PER_ROW = INNER / VEC, ROW_STEP = THREADS / PER_ROW;
    static_assert(THREADS % PER_ROW == 0 && (OUTER * PER_ROW) % THREADS == 0, "tile chunks");
    row = tid / PER_ROW + i * ROW_STEP;
    col = (tid % PER_ROW) * VEC;
    at = row * (INNER + PAD) + col;
  }
  template <int OUTER, int INNER>
  static constexpr int chunks_per_thread() { return OUTER * INNER / VEC / THREADS; }
  static constexpr int A_INNER = AK ? BK_ : BM_, A_OUTER = AK ? BM_ : BK_;
  static constexpr int B_INNER = BKM ? BK_ : BN_, B_OUTER = BKM ? BN_ : BK_;
  static constexpr int A_CHUNKS = chunks_per_thread<A_OUTER, A_INNER>();
  static constexpr int B_CHUNKS = chunks_per_thread<B_OUTER, B_INNER>();
  __host__ __device__ static void a_chunk(int tid, int i, int& row, int& col) {
    int at;
    chunk_of<A_OUTER, A_INNER>(tid, i, row, col, at);
  }
  __host__ __device__ static void b_chunk(int tid, int i, int& row, int& col) {
    int at;
    chunk_of<B_OUTER, B_INNER>(tid, i, row, col, at);
  }
  template <int OUTER, int INNER, class G>
  __host__ __device__ static void gather(T* s, const G& g, int tid) {
#pragma unroll
    for (int i = 0; i < chunks_per_thread<OUTER, INNER>(); ++i) {
      int row, col, at;
      chunk_of<OUTER, INNER>(tid, i, row, col, at);
      const T* gp = g.chunk(i, row, col);
      cp_async16_zfill(s + at, gp != nullptr ? gp : g.base(), gp != nullptr);
    }
  }
  template <class G>  // a gather source (a TileSrc takes the overloads above)
  __host__ __device__ static void load_a(T* s, const G& g, int tid) {
    gather<A_OUTER, A_INNER>(s, g, tid);
  }
  template <class G>
  __host__ __device__ static void load_b(T* s, const G& g, int tid) {
    gather<B_OUTER, B_INNER>(s, g, tid);
  }
};

// Shared-memory layout for wgmma: each operand tile in 8 x 16-byte core matrices, row block
// by row block (wgmma.cuh says how), so that a tile's descriptor needs no padding or swizzle.
// SW_: a K-major operand with 128-byte rows is stored with the 128-byte swizzle instead
// (wgmma::tile_offset_sw128; an experiment the GPU run times, EXPANSE_FAST_CUDA_SWIZZLE=1).
template <typename T, int BM_, int BN_, int BK_, int THREADS, int STAGES, bool AK_, bool BKM_,
          bool SW_ = false>
struct CoreSmem {
  static constexpr bool AK = AK_, BKM = BKM_;
  static constexpr int VEC = 16 / sizeof(T);  // elements per 16-byte core row
  static constexpr int A_INNER = AK ? BK_ : BM_, A_OUTER = AK ? BM_ : BK_;
  static constexpr int B_INNER = BKM ? BK_ : BN_, B_OUTER = BKM ? BN_ : BK_;
  static constexpr bool A_SW = SW_ && AK && A_INNER == 8 * VEC;
  static constexpr bool B_SW = SW_ && BKM && B_INNER == 8 * VEC;
  static constexpr int A_ELEMS = BM_ * BK_, B_ELEMS = BN_ * BK_;
  static constexpr int STAGE = A_ELEMS + B_ELEMS;
  static constexpr size_t BYTES = STAGES * STAGE * sizeof(T);
  static_assert(BM_ % 64 == 0 && BN_ % 8 == 0 && BK_ % 16 == 0, "wgmma tile shape");
  // (a swizzled tile must start on 1024 bytes: the kernels' smem is aligned so, and so are
  // A's and each stage's sizes)
  static_assert(!SW_ || ((A_ELEMS * sizeof(T)) % 1024 == 0 && (STAGE * sizeof(T)) % 1024 == 0),
                "swizzled tiles start on 1024 bytes");

  // Unswizzled: chunk j = i * THREADS + tid goes to byte 16 j (wgmma::chunk_origin says from
  // where), so a warp's stores are 512 contiguous bytes (its reads: 8 rows, 64 bytes each);
  // with THREADS a multiple of a row block's chunks, a thread's chunks share their column.
  // Swizzled: thread tid copies chunk tid % 8 of rows tid / 8 + i * THREADS / 8, so a warp
  // reads 4 whole 128-byte rows and stores them to 512 contiguous bytes (the XOR permutes
  // chunks inside a row); chunk (row o, column c) goes to chunk c ^ (o % 8) of row o, and a
  // thread's rows are THREADS / 8 apart, a multiple of 8, so they share that chunk too.
  // Where chunk i of thread tid's copy of an OUTER x INNER operand tile comes from (its row
  // and first column in the tile) and goes (element offset in the stage), in either layout:
  // the same chunks load() copies.
  template <int OUTER, int INNER, bool SWZ>
  __host__ __device__ static void chunk_of(int tid, int i, int& row, int& col, int& at) {
    constexpr int PER_ROW = INNER / VEC, ROW_STEP = THREADS / PER_ROW;
    static_assert(OUTER % 8 == 0 && THREADS % (8 * PER_ROW) == 0, "tile chunks");
    int o0, c;
    if constexpr (SWZ) {
      o0 = tid / PER_ROW, c = tid % PER_ROW;
      at = wgmma::tile_offset_sw128<INNER, VEC>(o0, c * VEC) + i * ROW_STEP * INNER;
    } else {
      wgmma::chunk_origin(tid, PER_ROW, o0, c);
      at = (i * THREADS + tid) * VEC;
    }
    row = o0 + i * ROW_STEP;
    col = c * VEC;
  }
  template <int OUTER, int INNER>
  static constexpr int chunks_per_thread() { return OUTER * INNER / VEC / THREADS; }
  static constexpr int A_CHUNKS = chunks_per_thread<A_OUTER, A_INNER>();
  static constexpr int B_CHUNKS = chunks_per_thread<B_OUTER, B_INNER>();
  // A's and B's chunk i of thread tid (row, column in the tile; the stage offset is dropped).
  __host__ __device__ static void a_chunk(int tid, int i, int& row, int& col) {
    int at;
    chunk_of<A_OUTER, A_INNER, A_SW>(tid, i, row, col, at);
  }
  __host__ __device__ static void b_chunk(int tid, int i, int& row, int& col) {
    int at;
    chunk_of<B_OUTER, B_INNER, B_SW>(tid, i, row, col, at);
  }

  // A gathered operand tile: g.chunk(i, row, col) names the 16 bytes of (row, col .. col +
  // VEC - 1) for this thread's chunk i, or null for zeros; g.base() is any valid address.
  // Every chunk is one zero-filling cp.async, in the same places load() puts them.
  template <int OUTER, int INNER, bool SWZ, class G>
  __host__ __device__ static void gather(T* s, const G& g, int tid) {
#pragma unroll
    for (int i = 0; i < chunks_per_thread<OUTER, INNER>(); ++i) {
      int row, col, at;
      chunk_of<OUTER, INNER, SWZ>(tid, i, row, col, at);
      const T* gp = g.chunk(i, row, col);
      cp_async16_zfill(s + at, gp != nullptr ? gp : g.base(), gp != nullptr);
    }
  }

  template <int OUTER, int INNER, bool SWZ>
  __host__ __device__ static void load(T* s, const TileSrc<T>& src, int tid) {
    static_assert(OUTER % 8 == 0 && THREADS % (8 * (INNER / VEC)) == 0, "tile chunks");
    if constexpr (SWZ) {
      constexpr int PER_ROW = INNER / VEC, ROW_STEP = THREADS / PER_ROW;
      static_assert(PER_ROW == 8 && ROW_STEP % 8 == 0, "a thread's chunks keep their swizzle");
      const int o0 = tid / PER_ROW, c = tid % PER_ROW;
      T* d = s + wgmma::tile_offset_sw128<INNER, VEC>(o0, c * VEC);
      copy_rows<T, OUTER, INNER, THREADS>(src, o0, c * VEC,
                                          [&](int i) { return d + i * ROW_STEP * INNER; });
    } else {
      int o0, c;
      wgmma::chunk_origin(tid, INNER / VEC, o0, c);
      copy_rows<T, OUTER, INNER, THREADS>(src, o0, c * VEC,
                                          [&](int i) { return s + (i * THREADS + tid) * VEC; });
    }
  }

  __host__ __device__ static T* a(unsigned char* raw, int stage) {
    return reinterpret_cast<T*>(raw) + stage * STAGE;
  }
  __host__ __device__ static T* b(unsigned char* raw, int stage) { return a(raw, stage) + A_ELEMS; }
  __host__ __device__ static void load_a(T* s, const TileSrc<T>& src, int tid) {
    load<A_OUTER, A_INNER, A_SW>(s, src, tid);
  }
  __host__ __device__ static void load_b(T* s, const TileSrc<T>& src, int tid) {
    load<B_OUTER, B_INNER, B_SW>(s, src, tid);
  }
  template <class G>  // a gather source (a TileSrc takes the overloads above)
  __host__ __device__ static void load_a(T* s, const G& g, int tid) {
    gather<A_OUTER, A_INNER, A_SW>(s, g, tid);
  }
  template <class G>
  __host__ __device__ static void load_b(T* s, const G& g, int tid) {
    gather<B_OUTER, B_INNER, B_SW>(s, g, tid);
  }
  __host__ __device__ static T a_at(const T* s, int m, int k) {
    if constexpr (A_SW) return s[wgmma::tile_offset_sw128<A_INNER, VEC>(m, k)];
    return s[AK ? wgmma::tile_offset<A_INNER, VEC>(m, k) : wgmma::tile_offset<A_INNER, VEC>(k, m)];
  }
  __host__ __device__ static T b_at(const T* s, int k, int n) {
    if constexpr (B_SW) return s[wgmma::tile_offset_sw128<B_INNER, VEC>(n, k)];
    return s[BKM ? wgmma::tile_offset<B_INNER, VEC>(n, k) : wgmma::tile_offset<B_INNER, VEC>(k, n)];
  }

  template <bool K_MAJOR, int INNER, bool SWZ>
  __device__ static uint64_t desc(const T* s, int mn0, int k0) {
    if constexpr (SWZ) {
      const wgmma::DescFields f = wgmma::desc_fields_sw128<INNER, VEC>(mn0, k0);
      return wgmma::descriptor(s + f.start, f.lbo, f.sbo, wgmma::kSwizzle128);
    }
    const wgmma::DescFields f = wgmma::desc_fields<K_MAJOR, INNER, VEC>(mn0, k0);
    return wgmma::descriptor(s + f.start, f.lbo, f.sbo);
  }
  __device__ static uint64_t desc_a(const T* s, int m0, int k0) {
    return desc<AK, A_INNER, A_SW>(s, m0, k0);
  }
  __device__ static uint64_t desc_b(const T* s, int n0, int k0) {
    return desc<BKM, B_INNER, B_SW>(s, n0, k0);
  }
};

// Each "math" below owns a tile shape, its shared-memory layout (Layout<AK, BKM>), the
// pipeline depth, and how tiles multiply and leave: zero(acc), mma<L>(acc, As, Bs),
// store(acc, scratch, f) calling f(m, n, value) tile-relative, before_barrier(acc) (what each
// thread must do after its copies land and before the barrier that publishes them),
// after_mma(acc) (after a tile's mma) and finish(acc) after the last tile.  ASYNC_MMA: mma
// only issues the tile's MMAs, which run on while the next copies are issued; after_mma then
// waits until the previous tile's MMAs are done (gemm_mainloop says when stages are refilled).

// ---- wgmma (sm_90a, fp16/bf16): 2 warpgroups, each 64 x 256 of a 128 x 256 tile -------------
// One block per SM, four stages of 48 KB.  The wide tile halves the operand bytes each
// multiply-add needs from L2 and shared memory against 128 x 128 (the Triton kernels' fastest
// H200 tile is 128 x 256 too), and one k-tile's MMAs stay in flight while the block waits for
// the previous tile's, synchronises and issues the next copies.
// BK_ = 128, STAGES_ = 2 (EXPANSE_FAST_CUDA_PIPELINE=k128x2, an experiment the GPU run times):
// two stages of 96 KB, one k-tile fetched ahead.  Each k-tile's proxy fence (a MEMBAR.ALL.CTA
// in SASS) then comes when no newer copies are in flight, and there are half as many fences
// and barriers per K; with four stages two k-tiles' copies are still in flight at every fence,
// and if the fence waits for them the pipeline has nothing ahead (the H200 ran the forward at
// a quarter of Triton's cp.async kernels' rate, cause not yet profiled).
// BN_ = 128 or 64 (the channels_last conv kernels): 64 x BN_ a warpgroup, for narrower
// outputs.  BM_ = 64: the two warpgroups side by side, each 64 x BN_ / 2 (a weight gradient
// whose output has at most 64 rows would leave half of a 128-row tile idle).
template <typename T, bool SWIZZLE = false, int BK_ = 64, int STAGES_ = 4, int BN_ = 256,
          int BM_ = 128>
struct WgmmaMath {
  static_assert(!SWIZZLE || BK_ == 64, "the swizzled tiles have 128-byte rows");
  static constexpr int BM = BM_, BN = BN_, BK = BK_, THREADS = 256, STAGES = STAGES_;
  // the warpgroups' arrangement: WG_M along the rows, each 64 x WN
  static constexpr int WG_M = BM / 64, WN = BN * WG_M / 2;
  static_assert((BM == 128 || BM == 64) && (WN == 256 || WN == 128 || WN == 64),
                "two warpgroups, each an m64nWNk16 instruction shape");
  static constexpr int MIN_BLOCKS = 1;
  static constexpr size_t SCRATCH_BYTES = 0;  // the epilogue reads the registers directly
  // The kernels stage their outputs in the stages' shared memory and write them out by rows
  // (write_tile_rows): each accumulator pair of a thread lies in another row, so stored
  // directly every warp store would touch 8 rows.  The forward's tile and dW's split partials
  // are staged as fp32 ([BM][OUT_LD_F32]; the forward adds its bias and activation on the way
  // out), dx's and dW's unsplit tile as T ([BM][OUT_LD]).  The pads keep a warp's stores free
  // of bank conflicts: OUT_LD = BN + 8 for one 2-byte accumulator a thread (32 banks), and
  // OUT_LD_F32 = BN + 8 for one 8-byte accumulator pair (each half-warp's 16 pairs, 4 rows x
  // 4 pairs, on 32 banks).
  static constexpr bool STAGED_EPILOGUE = true;
  static constexpr int OUT_LD = BN + 16 / sizeof(T), OUT_LD_F32 = BN + 8;
  static_assert(BM * OUT_LD * sizeof(T) <= STAGES * (BM + BN) * BK * sizeof(T) &&
                    BM * OUT_LD_F32 * sizeof(float) <= STAGES * (BM + BN) * BK * sizeof(T),
                "the staged output tiles fit in the stages");
  template <bool AK, bool BKM>
  using Layout = CoreSmem<T, BM, BN, BK, THREADS, STAGES, AK, BKM, SWIZZLE>;
  static constexpr bool ASYNC_MMA = true;
  // fp32 elements an SM streams from memory while a block multiplies one k-tile (H200: 2M
  // multiply-adds in about 1000 cycles, at about 19 bytes a cycle: plan_for)
  static constexpr double WS_ELEMS_PER_KTILE = 5000.0 * BK / 64;
  struct Acc { float d[WN / 2]; };
  // this thread's warpgroup's first row and column in the tile
  __host__ __device__ static int wg_m0(int tid) { return 64 * ((tid / 128) % WG_M); }
  __host__ __device__ static int wg_n0(int tid) { return WN * ((tid / 128) / WG_M); }

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < WN / 2; ++i) acc.d[i] = 0.f;
  }
  // The copies this thread made land before the barrier that publishes them to wgmma, cp.async
  // ones too: they are generic-proxy writes and wgmma reads through the async proxy.  (Triton
  // 3.6 left this fence out of its cp.async + MMA loops; its 3.7 releases put it back after
  // races seen on a B200 with ptxas 13, the ptxas major the H200 machine builds with.)
  __device__ static void before_barrier(Acc&) { wgmma::fence_shared_for_async_proxy(); }
  // After a tile's MMAs are issued: the previous tile's are done (this warpgroup's), so once
  // every thread has passed the barrier after this, the stage they read may be refilled.
  __device__ static void after_mma(Acc& acc) {
    wgmma::wait<1>();
    wgmma::pin(acc.d);
  }
  __device__ static void finish(Acc& acc) {
    wgmma::wait_all();
    wgmma::pin(acc.d);
  }

  template <class L>
  __device__ static void mma(Acc& acc, const T* As, const T* Bs) {
    const int m0 = wg_m0(threadIdx.x), n0 = wg_n0(threadIdx.x);  // this warpgroup's
    wgmma::pin(acc.d);
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16)
      wgmma::mma_m64k16<T, WN, L::AK ? 0 : 1, L::BKM ? 0 : 1>(
          acc.d, L::desc_a(As, m0, kk), L::desc_b(Bs, n0, kk), 1);
    wgmma::commit();
  }

  template <class F>
  __device__ static void store(Acc& acc, float*, F&& f) {
    const int t = threadIdx.x % 128, m0 = wg_m0(threadIdx.x), n0 = wg_n0(threadIdx.x);
#pragma unroll
    for (int i = 0; i < WN / 2; ++i)
      f(m0 + wgmma::acc_row(t, i), n0 + wgmma::acc_col(t, i), acc.d[i]);
  }
  // The same by pairs of adjacent columns: f(m, n, value at n, value at n + 1), n even.
  template <class F>
  __device__ static void store_pairs(Acc& acc, F&& f) {
    const int t = threadIdx.x % 128, m0 = wg_m0(threadIdx.x), n0 = wg_n0(threadIdx.x);
#pragma unroll
    for (int i = 0; i < WN / 2; i += 2)
      f(m0 + wgmma::acc_row(t, i), n0 + wgmma::acc_col(t, i), acc.d[i], acc.d[i + 1]);
  }
};

// ---- tensor-core tile math (fp16, bf16): 8 warps as 2 x 4, each 64 x 32 of a 128 x 128 tile --
template <typename T>
struct WmmaMath {
  static constexpr int BM = 128, BN = 128, BK = 32, THREADS = 256, STAGES = 2, MIN_BLOCKS = 1;
  static constexpr int WARPS_N = 4, WM = 64, WN = 32, FM = WM / 16, FN = WN / 16;
  // (an A100: 0.5M multiply-adds in about 500 cycles, at about 13 bytes a cycle)
  static constexpr double WS_ELEMS_PER_KTILE = 1700;
  static constexpr size_t SCRATCH_BYTES = (THREADS / 32) * 16 * 16 * sizeof(float);
  template <bool AK, bool BKM>
  using Layout = Smem<T, BM, BN, BK, THREADS, STAGES, AK, BKM>;
  struct Acc { wmma::fragment<wmma::accumulator, 16, 16, 16, float> f[FM][FN]; };

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc.f[i][j], 0.f);
  }
  static constexpr bool ASYNC_MMA = false;
  static constexpr bool STAGED_EPILOGUE = false;  // (each element stored where it lies)
  // (the channels_last conv kernels stage their fp32 tile all the same: gemm_staged_f32, in
  // staged_smem_bytes past the stages)
  static constexpr int OUT_LD_F32 = BN + 8;
  __device__ static void before_barrier(Acc&) {}
  __device__ static void after_mma(Acc&) {}
  __device__ static void finish(Acc&) {}

  template <class L>
  __device__ static void mma(Acc& acc, const T* As, const T* Bs) {
    using ALay = std::conditional_t<L::AK, wmma::row_major, wmma::col_major>;
    using BLay = std::conditional_t<L::BKM, wmma::col_major, wmma::row_major>;
    const int warp = threadIdx.x / 32;
    const int wm = (warp / WARPS_N) * WM, wn = (warp % WARPS_N) * WN;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALay> a[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLay> b[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int m = wm + 16 * i;
        wmma::load_matrix_sync(a[i], L::AK ? As + m * L::LDA + kk : As + kk * L::LDA + m, L::LDA);
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        const int n = wn + 16 * j;
        wmma::load_matrix_sync(b[j], L::BKM ? Bs + n * L::LDB + kk : Bs + kk * L::LDB + n, L::LDB);
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc.f[i][j], a[i], b[j], acc.f[i][j]);
    }
  }

  // Hand every accumulator to f(m, n, value), tile-relative, through a per-warp 16x16 scratch
  // (fragment element order is unspecified, so it has to pass through memory).
  template <class F>
  __device__ static void store(Acc& acc, float* scratch, F&& f) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = (warp / WARPS_N) * WM, wn = (warp % WARPS_N) * WN;
    float* scr = scratch + warp * 256;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        wmma::store_matrix_sync(scr, acc.f[i][j], 16, wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int idx = e * 32 + lane;  // a warp writes two 16-wide rows per step
          f(wm + 16 * i + idx / 16, wn + 16 * j + idx % 16, scr[idx]);
        }
        __syncwarp();
      }
  }
};

// ---- SIMT tile math (fp32): 16 x 16 threads, each a 4 x 4 micro-tile of a 64 x 64 tile --------
struct SimtMath {
  static constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256, TM = 4, TN = 4, STAGES = 2;
  static constexpr int MIN_BLOCKS = 1;
  // (64K fp32 fused multiply-adds in about 1000 cycles, at about 13 bytes a cycle)
  static constexpr double WS_ELEMS_PER_KTILE = 3300;
  static constexpr size_t SCRATCH_BYTES = 0;
  template <bool AK, bool BKM>
  using Layout = Smem<float, BM, BN, BK, THREADS, STAGES, AK, BKM>;
  struct Acc { float v[TM][TN]; };

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc.v[i][j] = 0.f;
  }
  static constexpr bool ASYNC_MMA = false;
  static constexpr bool STAGED_EPILOGUE = false;  // (each element stored where it lies)
  // (the channels_last conv kernels stage their fp32 tile all the same: gemm_staged_f32, in
  // staged_smem_bytes past the stages)
  static constexpr int OUT_LD_F32 = BN + 8;
  __device__ static void before_barrier(Acc&) {}
  __device__ static void after_mma(Acc&) {}
  __device__ static void finish(Acc&) {}

  template <class L>
  __device__ static void mma(Acc& acc, const float* As, const float* Bs) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = L::a_at(As, ty + 16 * i, k);
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = L::b_at(Bs, k, tx + 16 * j);
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc.v[i][j] = fmaf(a[i], b[j], acc.v[i][j]);
    }
  }

  template <class F>
  __device__ static void store(Acc& acc, float*, F&& f) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) f(ty + 16 * i, tx + 16 * j, acc.v[i][j]);
  }
};

// Dynamic shared memory of a kernel: the pipeline stages, reused by the epilogue's scratch.
template <class M, bool AK, bool BKM>
constexpr size_t smem_bytes() {
  constexpr size_t tiles = M::template Layout<AK, BKM>::BYTES;
  return tiles > M::SCRATCH_BYTES ? tiles : M::SCRATCH_BYTES;
}

// Row counts as int, for the masks.
__host__ __device__ __forceinline__ int clamp_rows(int64_t v) {
  return v < (int64_t{1} << 30) ? static_cast<int>(v) : (1 << 30);
}

// The main loop: acc = sum over the problem's phases and BK-wide k-tiles of A_tile * B_tile,
// M::STAGES tiles in flight.  P provides num_phases(), phase_len(p), tile_a(p, k0),
// tile_b(p, k0); all block-uniform.  If do_colsum, thread t < BM also adds A's row m = t over
// k into colsum (the fused bias grad).
template <typename T, class M, class L, class P>
__device__ void gemm_mainloop(const P& prob, typename M::Acc& acc, unsigned char* smem,
                              bool do_colsum, float& colsum) {
  constexpr int S = M::STAGES;
  // Tiles fetched ahead of the one multiplied: every other stage.  Iteration t refills the
  // stage of tile t - 1.  Synchronous math: before tile t's math, every thread being done with
  // tile t - 1 at the barrier that publishes tile t.  Asynchronous: once tile t's MMAs are
  // issued and tile t - 1's are done (after_mma), which a second barrier says of every
  // warpgroup; tile t's MMAs run on meanwhile (the schedule of Triton 3.6's cp.async + wgmma
  // loop).  (Refilling tile t - 2's stage instead takes one barrier a tile but fetches a
  // tile less ahead: two of four stages, about 1 us of copy latency covered on an H200.)
  constexpr int AHEAD = S - 1;
  static_assert(AHEAD >= 1, "the loop overlaps at least one copy with the math");
  M::zero(acc);
  const int np = prob.num_phases();
  int p = 0, k0 = 0;  // cursor: the next tile to fetch
  auto skip_empty = [&]() {
    while (p < np && k0 >= prob.phase_len(p)) { ++p; k0 = 0; }
  };
  int fetched = 0;
  auto fetch_next = [&]() {  // one commit group per call, possibly empty: keeps the count exact
    if (p < np) {
      const int stage = fetched % S;
      L::load_a(L::a(smem, stage), prob.tile_a(p, k0), threadIdx.x);
      L::load_b(L::b(smem, stage), prob.tile_b(p, k0), threadIdx.x);
      k0 += M::BK;
      skip_empty();
      ++fetched;
    }
    cp_async_commit();
  };
  skip_empty();
#pragma unroll
  for (int s = 0; s < AHEAD; ++s) fetch_next();
  if (fetched == 0) return;  // no phases: the tile stays zero
  // One exit, after the last tile's after_mma: finish (the wait for the last MMAs) comes
  // after it on that path only.  A wait also reached by the path that never enters the loop
  // (zeroed accumulators) made ptxas serialize every wgmma (its C7515); a loop that could exit
  // on either branch made it wait for every tile's MMAs at the back edge (C7517).
  for (int tile = 0;; ++tile) {
    cp_async_wait<AHEAD - 1>();  // tile `tile` has landed (this thread's copies)
    M::before_barrier(acc);
    __syncthreads();  // ...everyone's
    const int stage = tile % S;
    const T* As = L::a(smem, stage);
    if (!M::ASYNC_MMA) fetch_next();  // (synchronous math: every thread is done with tile - 1)
    M::template mma<L>(acc, As, L::b(smem, stage));
    if (do_colsum && threadIdx.x < M::BM) {
#pragma unroll 8
      for (int k = 0; k < M::BK; ++k) colsum += to_f(L::a_at(As, threadIdx.x, k));
    }
    M::after_mma(acc);
    if (M::ASYNC_MMA) {
      __syncthreads();  // every warpgroup's MMAs of tile - 1 are done: its stage is free
      fetch_next();
    }
    if (tile + 1 >= fetched) break;
  }
  M::finish(acc);
}

// Shared memory a gemm_staged_f32 kernel needs: its stages, which the staged tile reuses, and
// for the portable maths the tile and their scratch past it (WMMA's fragments pass through a
// per-warp scratch; SIMT needs none).
template <class M, bool AK, bool BKM>
constexpr size_t staged_smem_bytes() {
  constexpr size_t tiles = M::template Layout<AK, BKM>::BYTES;
  constexpr size_t staged = M::BM * M::OUT_LD_F32 * sizeof(float) +
                            (M::STAGED_EPILOGUE ? 0 : M::SCRATCH_BYTES);
  return tiles > staged ? tiles : staged;
}

// The main loop, then its fp32 accumulators staged [BM][OUT_LD_F32] in the stages' shared
// memory (which they reuse) and published to the block: what the staged write-outs read.
template <typename T, class M, class L, class P>
__device__ __forceinline__ const float* gemm_staged_f32(const P& prob, unsigned char* smem) {
  static_assert(M::STAGED_EPILOGUE || (M::BM * M::OUT_LD_F32 * sizeof(float)) % 32 == 0,
                "the portable maths' scratch, past the staged tile, starts on 32 bytes (WMMA)");
  typename M::Acc acc;
  float unused = 0.f;
  gemm_mainloop<T, M, L>(prob, acc, smem, false, unused);
  __syncthreads();  // every warpgroup is done with the stages
  float* staged = reinterpret_cast<float*>(smem);
  if constexpr (M::STAGED_EPILOGUE) {
    M::store_pairs(acc, [&](int m, int n, float v0, float v1) {
      *reinterpret_cast<float2*>(staged + m * M::OUT_LD_F32 + n) = make_float2(v0, v1);
    });
  } else {
    M::store(acc, staged + M::BM * M::OUT_LD_F32,
             [&](int m, int n, float v) { staged[m * M::OUT_LD_F32 + n] = v; });
  }
  __syncthreads();
  return staged;
}

// ---- the weight gradients' split reduction and epilogue (linear and conv) ----------------------
// P: m, n (the output's shape), splits, ws (splits > 1: fp32 partials [splits][m][n], then
// [splits][m] for db), out (null: skip) with row stride ld_out, db (null: skip).

// The staged write-out (thread tid): the block's tile of split `split`'s fp32 partials
// (splits > 1: staged as float) or of dW itself (staged as T).
template <typename T, class M, class P>
__host__ __device__ __forceinline__ void dw_write_out(const P& p, const void* staged, int m0,
                                                      int n0, int split, int tid) {
  const int rows = tile_extent(p.m - m0, M::BM), cols = tile_extent(p.n - n0, M::BN);
  if (p.splits > 1) {
    const int64_t mn = static_cast<int64_t>(p.m) * p.n;
    write_tile_rows<float, M::BM, M::BN, M::THREADS>(
        static_cast<const float*>(staged), M::OUT_LD_F32, p.ws + split * mn,
        {static_cast<int64_t>(m0) * p.n + n0, p.n, rows, 0, cols}, tid);
  } else {
    write_tile_rows<T, M::BM, M::BN, M::THREADS>(
        static_cast<const T*>(staged), M::OUT_LD, static_cast<T*>(p.out),
        {static_cast<int64_t>(m0) * p.ld_out + n0, p.ld_out, rows, 0, cols}, tid);
  }
}

// After the main loop of a weight-gradient block (rows m0.., columns n0.., split `split`):
// thread t < BM's column sum (do_db) goes to db or its split's partials, and the tile to out or
// its split's partials; staged through shared memory where the math stages its outputs.
template <typename T, class M, class P>
__device__ __forceinline__ void dw_epilogue(const P& p, typename M::Acc& acc, float colsum,
                                            bool do_db, int m0, int n0, int split,
                                            unsigned char* smem) {
  const int64_t mn = static_cast<int64_t>(p.m) * p.n;
  if (do_db && threadIdx.x < M::BM && m0 + threadIdx.x < p.m) {
    const int mm = m0 + threadIdx.x;
    if (p.splits > 1) p.ws[p.splits * mn + static_cast<int64_t>(split) * p.m + mm] = colsum;
    else static_cast<T*>(p.db)[mm] = from_f<T>(colsum);
  }
  if (p.out == nullptr) return;
  __syncthreads();  // the staged tile reuses the stages
  if constexpr (M::STAGED_EPILOGUE) {
    if (p.splits > 1) {
      float* part = reinterpret_cast<float*>(smem);
      M::store_pairs(acc, [&](int m, int n, float v0, float v1) {
        *reinterpret_cast<float2*>(part + m * M::OUT_LD_F32 + n) = make_float2(v0, v1);
      });
    } else {
      T* dws = reinterpret_cast<T*>(smem);
      M::store(acc, nullptr,
               [&](int m, int n, float v) { dws[m * M::OUT_LD + n] = from_f<T>(v); });
    }
    __syncthreads();
    dw_write_out<T, M>(p, smem, m0, n0, split, threadIdx.x);
    return;
  }
  M::store(acc, reinterpret_cast<float*>(smem), [&](int m, int n, float v) {
    const int mm = m0 + m, nn = n0 + n;
    if (mm < p.m && nn < p.n) {
      if (p.splits > 1) p.ws[split * mn + static_cast<int64_t>(mm) * p.n + nn] = v;
      else static_cast<T*>(p.out)[mm * p.ld_out + nn] = from_f<T>(v);
    }
  });
}

// Sums a split reduction's fp32 partials ([splits][m][n], then [splits][m] for db) in a fixed
// order (deterministic) and converts: out (row stride ld_out) and db, either may be null.
template <typename T>
__global__ void splitk_reduce_kernel(const float* ws, int splits, int m, int n, T* out,
                                     int64_t ld_out, T* db) {
  const int64_t mn = static_cast<int64_t>(m) * n;
  const int64_t total = (out != nullptr ? mn : 0) + (db != nullptr ? m : 0);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (out != nullptr && i < mn) {
      float s = 0.f;
      for (int k = 0; k < splits; ++k) s += ws[k * mn + i];
      out[(i / n) * ld_out + i % n] = from_f<T>(s);
    } else {
      const int64_t j = i - (out != nullptr ? mn : 0);
      float s = 0.f;
      for (int k = 0; k < splits; ++k) s += ws[splits * mn + k * m + j];
      db[j] = from_f<T>(s);
    }
  }
}

// The block's place in a launch: blockIdx as one index, x fastest (the order blocks start in).
__device__ __forceinline__ int64_t block_index() {
  return blockIdx.x + static_cast<int64_t>(blockIdx.y) * gridDim.x;
}

// Raises kernel's dynamic shared-memory limit to `bytes` on the current device, once per
// device: raised[] is the caller's, one array per kernel.
constexpr int kSmemDevices = 64;
template <class K>
cudaError_t raise_smem_limit(K kernel, size_t bytes, std::atomic<bool> (&raised)[kSmemDevices]) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return cudaGetLastError();
  if (dev >= 0 && dev < kSmemDevices && raised[dev].load()) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kSmemDevices) raised[dev] = true;
  return cudaSuccess;
}

}  // namespace
}  // namespace expanse_fast
