// CUDA kernels of the expanded linear layer (see expanded_linear.h for the storage).
//
// All three products are one tiled GEMM main loop with different operand views:
//   forward  y[n, o]  = sum_k x[n, k] w[o, k]       A = x (k-major), B = w rows (k-major)
//   dW       dw[o, k] = sum_n dy[n, o] x[n, k]      A = dy^T (m-major), B = x (n-major)
//   dx       dx[n, k] = sum_o dy[n, o] w[o, k]      A = dy (k-major), B = w (n-major)
// A block owns one BM x BN output tile and walks a short list of "phases": contiguous K ranges
// that read different weight tensors (the frozen block, the coupling block, the new rows).
// Blocks never cross an output group, so the zero blocks of the staircase are never read.
//
// The tile math is a template policy chosen per call on the host:
//   fp16/bf16 on an sm_90a build (H100/H200): wgmma m64n256k16 from shared memory, two
//     warpgroups on a 128 x 256 x 64 tile, four stages, one k-tile's MMAs in flight across
//     the barrier (wgmma.cuh; EXPANSE_FAST_CUDA_WGMMA=0 turns it off; with
//     EXPANSE_FAST_CUDA_SWIZZLE=1 the k-major operand tiles use the 128-byte swizzle);
//   fp16/bf16 elsewhere: WMMA 16x16x16 fragments (portable sm_80+), 128 x 128 x 32, two stages;
//   fp32: shared-memory-tiled SIMT FMA (exact fp32, no tf32), 64 x 64 x 16, two stages.
// All accumulate in fp32.  Tiles are copied with 16-byte cp.async where a chunk is aligned and
// in range (scalar zero-filling copy otherwise); STAGES - 1 tiles are in flight while one
// multiplies.  Blocks start in groups of kGroupM row tiles (grouped_tile), so the blocks
// running at once share their operands in L2.  The wgmma kernels stage their output tiles in
// shared memory and write them out by rows (write_tile_rows).  The copies, layouts, maths and
// main loop live in gemm_pipeline.cuh (the channels_last conv forward runs on them too).
#include "expanded_linear.h"
#include "gemm_pipeline.cuh"
#include "kernel_common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cudaTypedefs.h>
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace expanse_fast {
namespace {

using namespace nvcuda;
using namespace common;

// ================================ forward ================================================
// One output segment (an output group): its rows read x[:, 0:k1] through w1 and, in the
// coupled layout, x[:, k2_col0 : k2_col0 + k2] through w2.  Pointers start at the group's row.
struct FwdSeg {
  const void* w1;
  const void* w2;
  const void* bias;  // may be null
  int64_t ld1, ld2;
  int col0, rows, tile0, k1, k2_col0, k2;
};
constexpr int kSegsPerLaunch = 32;
struct FwdParams {
  const void* x;
  void* y;
  void* pre;  // may be null
  int64_t ld_x, ld_y, rows, ld_pre, pre_col0;
  int nseg, activation;
  FwdSeg seg[kSegsPerLaunch];
};

// The same functions as torch's relu, gelu (exact and tanh) and silu, in fp32: one per
// activation (the staged epilogue's write-out is instantiated for each) and one that switches.
template <Activation A>
__host__ __device__ __forceinline__ float activate_as(float v) {
  if constexpr (A == Activation::kReLU) {
    return v < 0.f ? 0.f : v;  // NaN stays NaN, as in torch
  } else if constexpr (A == Activation::kGeluTanh) {
    // x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))
    return v / (1.f + expf(-1.5957691216057308f * (v + 0.044715f * v * v * v)));
  } else if constexpr (A == Activation::kSiLU) {
    return v / (1.f + expf(-v));
  } else if constexpr (A == Activation::kGelu) {
    return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
  } else {
    return v;
  }
}
__host__ __device__ __forceinline__ float activate(int act, float v) {
  switch (static_cast<Activation>(act)) {
    case Activation::kReLU: return activate_as<Activation::kReLU>(v);
    case Activation::kGeluTanh: return activate_as<Activation::kGeluTanh>(v);
    case Activation::kSiLU: return activate_as<Activation::kSiLU>(v);
    case Activation::kGelu: return activate_as<Activation::kGelu>(v);
    default: return v;
  }
}

template <typename T>
struct FwdProblem {
  const FwdParams& p;
  const FwdSeg& s;
  int64_t m0;
  int n0;
  __host__ __device__ int num_phases() const { return 2; }
  __host__ __device__ int phase_len(int ph) const { return ph == 0 ? s.k1 : s.k2; }
  __host__ __device__ TileSrc<T> tile_a(int ph, int k0) const {
    const int col = (ph == 0 ? 0 : s.k2_col0) + k0;
    return {static_cast<const T*>(p.x) + m0 * p.ld_x + col, p.ld_x,
            clamp_rows(p.rows - m0), phase_len(ph) - k0};
  }
  __host__ __device__ TileSrc<T> tile_b(int ph, int k0) const {
    const int64_t ld = ph == 0 ? s.ld1 : s.ld2;
    const T* w = static_cast<const T*>(ph == 0 ? s.w1 : s.w2);
    return {w + n0 * ld + k0, ld, s.rows - n0, phase_len(ph) - k0};
  }
};

// Block b of a grid_x x grid_y forward launch: its output segment, rows and columns.
template <typename T, class M>
__host__ __device__ __forceinline__ FwdProblem<T> fwd_problem(const FwdParams& p, int64_t b,
                                                              int64_t grid_x, int64_t grid_y) {
  const GridTile t = grouped_tile(b, grid_x, grid_y, kGroupM);
  int si = 0;
  while (si + 1 < p.nseg && p.seg[si + 1].tile0 <= t.n) ++si;
  return FwdProblem<T>{p, p.seg[si], t.m * M::BM, (t.n - p.seg[si].tile0) * M::BN};
}

// The staged forward epilogue's write-out (thread tid), for activation A: the block's tile
// (rows m0.., columns n0.. of segment s), staged as fp32 accumulators [BM][OUT_LD_F32], plus
// the bias, goes to pre where its columns reach pre_col0 and, activated, to y.  One pass, the
// activation chosen at compile time; each value rounded to T once.
template <typename T, class M, Activation A>
__host__ __device__ __forceinline__ void fwd_write_out_as(const FwdParams& p, const FwdSeg& s,
                                                          const float* staged, int64_t m0,
                                                          int n0, int tid) {
  constexpr int VEC = 16 / sizeof(T);
  const int rows = tile_extent(p.rows - m0, M::BM), cols = tile_extent(s.rows - n0, M::BN);
  const int64_t col0 = s.col0 + n0;  // the tile's first output column
  const T* bias = s.bias == nullptr ? nullptr : static_cast<const T*>(s.bias) + n0;
  T* pre = static_cast<T*>(p.pre);
  const int64_t skip = p.pre_col0 - col0;  // the tile's columns before pre's first
  const OutRegion pre_region{m0 * p.ld_pre + col0 - p.pre_col0, p.ld_pre, rows,
                             static_cast<int>(skip < 0 ? 0 : (skip > M::BN ? M::BN : skip)),
                             cols};
  write_f32_tile_rows<T, M::BM, M::BN, M::THREADS>(
      staged, M::OUT_LD_F32, static_cast<T*>(p.y), {m0 * p.ld_y + col0, p.ld_y, rows, 0, cols},
      tid, [&](int m, int c, float(&v)[VEC]) {
        if (bias != nullptr) {
          alignas(16) T b[VEC];
          if (c + VEC <= cols && (reinterpret_cast<uintptr_t>(bias + c) & 15) == 0) {
            *reinterpret_cast<uint4*>(b) = *reinterpret_cast<const uint4*>(bias + c);
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) b[e] = c + e < cols ? bias[c + e] : from_f<T>(0.f);
          }
#pragma unroll
          for (int e = 0; e < VEC; ++e) v[e] += to_f(b[e]);
        }
        if (pre != nullptr && c + VEC > pre_region.col_lo) {
          alignas(16) T out[VEC];
#pragma unroll
          for (int e = 0; e < VEC; ++e) out[e] = from_f<T>(v[e]);
          put_chunk(out, pre, pre_region.offset + m * pre_region.ld, c, pre_region);
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = activate_as<A>(v[e]);
      });
}

template <typename T, class M>
__host__ __device__ __forceinline__ void fwd_write_out(const FwdParams& p, const FwdSeg& s,
                                                       const float* staged, int64_t m0, int n0,
                                                       int tid) {
  switch (static_cast<Activation>(p.activation)) {
    case Activation::kReLU:
      return fwd_write_out_as<T, M, Activation::kReLU>(p, s, staged, m0, n0, tid);
    case Activation::kGeluTanh:
      return fwd_write_out_as<T, M, Activation::kGeluTanh>(p, s, staged, m0, n0, tid);
    case Activation::kSiLU:
      return fwd_write_out_as<T, M, Activation::kSiLU>(p, s, staged, m0, n0, tid);
    case Activation::kGelu:
      return fwd_write_out_as<T, M, Activation::kGelu>(p, s, staged, m0, n0, tid);
    default: return fwd_write_out_as<T, M, Activation::kNone>(p, s, staged, m0, n0, tid);
  }
}

template <typename T, class M>
__global__ void __launch_bounds__(M::THREADS, M::MIN_BLOCKS)
linear_fwd_kernel(const __grid_constant__ FwdParams p) {
  using L = typename M::template Layout<true, true>;
  extern __shared__ __align__(1024) unsigned char smem[];  // (swizzled tiles: 1024)
  const FwdProblem<T> prob = fwd_problem<T, M>(p, block_index(), gridDim.x, gridDim.y);
  const FwdSeg& s = prob.s;
  const int64_t m0 = prob.m0;
  const int n0 = prob.n0;
  if constexpr (M::STAGED_EPILOGUE) {
    fwd_write_out<T, M>(p, s, gemm_staged_f32<T, M, L>(prob, smem), m0, n0, threadIdx.x);
    return;
  }
  typename M::Acc acc;
  float unused = 0.f;
  gemm_mainloop<T, M, L>(prob, acc, smem, false, unused);
  __syncthreads();  // the epilogue scratch reuses the tile buffers
  T* y = static_cast<T*>(p.y);
  T* pre = static_cast<T*>(p.pre);
  const T* bias = static_cast<const T*>(s.bias);
  M::store(acc, reinterpret_cast<float*>(smem), [&](int m, int n, float v) {
    const int64_t row = m0 + m;
    const int col = n0 + n;
    if (row < p.rows && col < s.rows) {
      if (bias != nullptr) v += to_f(bias[col]);
      const int64_t out_col = s.col0 + col;
      if (pre != nullptr && out_col >= p.pre_col0)
        pre[row * p.ld_pre + out_col - p.pre_col0] = from_f<T>(v);
      y[row * p.ld_y + out_col] = from_f<T>(activate(p.activation, v));
    }
  });
}

// ---- the forward through the copy engine (EXPANSE_FAST_CUDA_PIPELINE=tma, an experiment) ----
// The same blocks, phases and epilogue as linear_fwd_kernel with WgmmaMath<T, true> (the
// copy engine writes the 128-byte swizzled layout those tiles have), but one thread issues
// each k-tile's two boxes (x's 128 rows, w's 256) and every thread waits on the stage's
// barrier: no per-thread copies and no proxy fence per k-tile.  Four operands a segment, each
// its own tensor map whose extent ends where the phase ends: the partial last k-tile of a
// phase and the rows past the end read zeros from the engine itself.
struct FwdTmaMaps {
  CUtensorMap map[kSegsPerLaunch][4];  // per segment: x phase 0, x phase 1, w1, w2
};

// Segment si's four operands: phase 0 reads x[:, 0:k1] through w1, phase 1 (the coupled
// layout) x[:, k2_col0 : k2_col0 + k2] through w2.
template <typename T, class M>
__host__ __device__ inline void fwd_tma_operands(const FwdParams& p, int si,
                                                 tma::Operand (&ops)[4]) {
  const FwdSeg& s = p.seg[si];
  const T* x = static_cast<const T*>(p.x);
  ops[0] = {x, p.rows, s.k1, p.ld_x, M::BM};
  ops[1] = {x + s.k2_col0, p.rows, s.k2, p.ld_x, M::BM};
  ops[2] = {s.w1, s.rows, s.k1, s.ld1, M::BN};
  ops[3] = {s.w2, s.rows, s.k2, s.ld2, M::BN};
}

template <typename T>
__global__ void __launch_bounds__(256, 1)
linear_fwd_tma_kernel(const __grid_constant__ FwdParams p,
                      const __grid_constant__ FwdTmaMaps maps) {
  using M = WgmmaMath<T, true>;
  using L = typename M::template Layout<true, true>;
  static_assert(L::A_SW && L::B_SW && M::BK == tma::kBoxCols, "the engine's 128-byte swizzle");
  constexpr int S = M::STAGES, AHEAD = S - 1;
  constexpr uint32_t TILE_BYTES = (M::BM + M::BN) * M::BK * sizeof(T);
  extern __shared__ __align__(1024) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::BYTES);  // one barrier a stage
  const FwdProblem<T> prob = fwd_problem<T, M>(p, block_index(), gridDim.x, gridDim.y);
  const FwdSeg& s = prob.s;
  const CUtensorMap* seg_maps = maps.map[&s - p.seg];
  const int m0 = static_cast<int>(prob.m0), n0 = prob.n0;
  if (threadIdx.x == 0) {
    for (int i = 0; i < S; ++i) tma::barrier_init(&full[i], 1);
    tma::barrier_init_fence();
  }
  __syncthreads();
  typename M::Acc acc;
  M::zero(acc);
  int ph = 0, k0 = 0, fetched = 0;  // cursor: the next tile to fetch (block-uniform)
  auto skip_empty = [&]() {
    while (ph < 2 && k0 >= prob.phase_len(ph)) { ++ph; k0 = 0; }
  };
  auto fetch_next = [&]() {
    if (ph >= 2) return;
    const int stage = fetched % S;
    if (threadIdx.x == 0) {
      tma::arrive_expect_bytes(&full[stage], TILE_BYTES);
      tma::load_box(L::a(smem, stage), &seg_maps[ph], k0, m0, &full[stage]);
      tma::load_box(L::b(smem, stage), &seg_maps[2 + ph], k0, n0, &full[stage]);
    }
    k0 += M::BK;
    skip_empty();
    ++fetched;
  };
  skip_empty();
#pragma unroll
  for (int i = 0; i < AHEAD; ++i) fetch_next();
  if (fetched > 0) {
    // (one exit, after the last tile's after_mma: see gemm_mainloop)
    bool landed = true;
    for (int tile = 0;; ++tile) {
      const int stage = tile % S;
      landed &= tma::wait_phase(&full[stage], (tile / S) & 1);
      M::template mma<L>(acc, L::a(smem, stage), L::b(smem, stage));
      M::after_mma(acc);
      __syncthreads();  // every warpgroup's MMAs of tile - 1 are done: its stage is free
      fetch_next();
      if (tile + 1 >= fetched) break;
    }
    M::finish(acc);
    if (!landed) __trap();  // a copy never landed: an error for the host, not a hang
  }
  __syncthreads();  // the staged tile reuses the stages
  float* staged = reinterpret_cast<float*>(smem);
  M::store_pairs(acc, [&](int m, int n, float v0, float v1) {
    *reinterpret_cast<float2*>(staged + m * M::OUT_LD_F32 + n) = make_float2(v0, v1);
  });
  __syncthreads();
  fwd_write_out<T, M>(p, s, staged, m0, n0, threadIdx.x);
}

// ================================ input gradient =========================================
// Column tiles 0..old_tiles cover dx_old = dx[:, :I_f] (in the bands of common::OldBands, cut
// at every k_end), the rest dx_new = dx[:, I_f:].
// Phases of an old tile: the new rows (w_new[:, :I_f]), then each frozen group g whose inputs
// reach the tile (k_end[g] > c0: then past all it stores), masked at k_end[g].  Phases of a new tile: the new rows
// (w_new[:, I_f:]) and, coupled, every frozen row (w_couple).  Old tiles without need_old
// have no phases: they store zeros.
struct DxParams {
  const void* dy;
  void* dx;
  const void* w_new;
  const void* w_frozen;
  const void* w_couple;
  int64_t ld_dy, ld_dx, ld_wn, ld_wf, ld_wc, rows;
  int in_features, frozen_in, frozen_out, new_out, old_tiles, need_old, ngroups;
  int g_row0[kMaxFrozenGroups], g_rows[kMaxFrozenGroups], g_kend[kMaxFrozenGroups];
  common::OldBands<kMaxFrozenGroups> bands;
};

template <typename T>
struct DxProblem {
  const DxParams& p;
  int64_t m0;
  int c0, c_end;  // the tile's first column and its segment's end (I_f or I)
  bool old;
  __host__ __device__ int num_phases() const {
    if (old) return p.need_old ? 1 + p.ngroups : 0;
    return 2;
  }
  __host__ __device__ int phase_len(int ph) const {
    if (ph == 0) return p.new_out;
    if (old) return p.g_kend[ph - 1] > c0 ? p.g_rows[ph - 1] : 0;
    return p.w_couple != nullptr ? p.frozen_out : 0;
  }
  __host__ __device__ TileSrc<T> tile_a(int ph, int k0) const {
    const int col = ph == 0 ? p.frozen_out : (old ? p.g_row0[ph - 1] : 0);
    return {static_cast<const T*>(p.dy) + m0 * p.ld_dy + col + k0, p.ld_dy,
            clamp_rows(p.rows - m0), phase_len(ph) - k0};
  }
  __host__ __device__ TileSrc<T> tile_b(int ph, int k0) const {
    const int rows = phase_len(ph) - k0;
    if (ph == 0)
      return {static_cast<const T*>(p.w_new) + k0 * p.ld_wn + c0, p.ld_wn, rows, c_end - c0};
    if (old) {
      const int g = ph - 1;
      return {static_cast<const T*>(p.w_frozen) + (p.g_row0[g] + k0) * p.ld_wf + c0, p.ld_wf,
              rows, p.g_kend[g] - c0};
    }
    return {static_cast<const T*>(p.w_couple) + k0 * p.ld_wc + (c0 - p.frozen_in), p.ld_wc,
            rows, c_end - c0};
  }
};

// Block b of a grid_x x grid_y dx launch: its rows and its column tile (an old tile in its
// band).
template <typename T, class M>
__host__ __device__ __forceinline__ DxProblem<T> dx_problem(const DxParams& p, int64_t b,
                                                            int64_t grid_x, int64_t grid_y) {
  const GridTile t = grouped_tile(b, grid_x, grid_y, kGroupM);
  const bool old = t.n < p.old_tiles;
  int c0 = p.frozen_in + (t.n - p.old_tiles) * M::BN, c_end = p.in_features;
  if (old) p.bands.tile(t.n, M::BN, c0, c_end);
  return DxProblem<T>{p, t.m * M::BM, c0, c_end, old};
}

// The staged input-gradient epilogue's write-out (thread tid): columns c0 .. c_end of dx.
template <typename T, class M>
__host__ __device__ __forceinline__ void dx_write_out(const DxParams& p, const T* dxs,
                                                      int64_t m0, int c0, int c_end, int tid) {
  const int rows = tile_extent(p.rows - m0, M::BM), cols = tile_extent(c_end - c0, M::BN);
  write_tile_rows<T, M::BM, M::BN, M::THREADS>(dxs, M::OUT_LD, static_cast<T*>(p.dx),
                                               {m0 * p.ld_dx + c0, p.ld_dx, rows, 0, cols}, tid);
}

template <typename T, class M>
__global__ void __launch_bounds__(M::THREADS, M::MIN_BLOCKS)
linear_dx_kernel(const __grid_constant__ DxParams p) {
  using L = typename M::template Layout<true, false>;
  extern __shared__ __align__(1024) unsigned char smem[];  // (swizzled tiles: 1024)
  const DxProblem<T> prob = dx_problem<T, M>(p, block_index(), gridDim.x, gridDim.y);
  const int64_t m0 = prob.m0;
  const int c0 = prob.c0, c_end = prob.c_end;
  typename M::Acc acc;
  float unused = 0.f;
  gemm_mainloop<T, M, L>(prob, acc, smem, false, unused);
  __syncthreads();
  T* dx = static_cast<T*>(p.dx);
  if constexpr (M::STAGED_EPILOGUE) {
    T* dxs = reinterpret_cast<T*>(smem);
    M::store(acc, nullptr, [&](int m, int n, float v) { dxs[m * M::OUT_LD + n] = from_f<T>(v); });
    __syncthreads();
    dx_write_out<T, M>(p, dxs, m0, c0, c_end, threadIdx.x);
    return;
  }
  M::store(acc, reinterpret_cast<float*>(smem), [&](int m, int n, float v) {
    const int64_t row = m0 + m;
    const int col = c0 + n;
    if (row < p.rows && col < c_end) dx[row * p.ld_dx + col] = from_f<T>(v);
  });
}

// ================================ weight gradient ========================================
struct DwParams {
  const void* a;  // dy
  const void* b;  // x
  void* out;      // dW (null: skip), written directly when splits == 1
  void* db;       // column sums of A (null: skip)
  float* ws;      // splits > 1: fp32 partials [splits][m][n], then [splits][m] for db
  int64_t ld_a, ld_b, ld_out, rows, rows_per_split;
  int a_col0, b_col0, m, n, splits;
};

template <typename T>
struct DwProblem {
  const DwParams& p;
  int64_t r0;  // first reduction row of this split
  int m0, n0, len;
  __host__ __device__ int num_phases() const { return 1; }
  __host__ __device__ int phase_len(int) const { return len; }
  __host__ __device__ TileSrc<T> tile_a(int, int k0) const {
    return {static_cast<const T*>(p.a) + (r0 + k0) * p.ld_a + p.a_col0 + m0, p.ld_a, len - k0,
            p.m - m0};
  }
  __host__ __device__ TileSrc<T> tile_b(int, int k0) const {
    return {static_cast<const T*>(p.b) + (r0 + k0) * p.ld_b + p.b_col0 + n0, p.ld_b, len - k0,
            p.n - n0};
  }
};

template <typename T, class M>
__global__ void __launch_bounds__(M::THREADS, M::MIN_BLOCKS)
linear_dw_kernel(const __grid_constant__ DwParams p) {
  using L = typename M::template Layout<false, false>;
  extern __shared__ __align__(1024) unsigned char smem[];  // (swizzled tiles: 1024)
  const int m0 = blockIdx.x * M::BM, n0 = blockIdx.y * M::BN, split = blockIdx.z;
  const int64_t r0 = split * p.rows_per_split;
  const int len = clamp_rows(p.rows - r0 < p.rows_per_split ? p.rows - r0 : p.rows_per_split);
  DwProblem<T> prob{p, r0, m0, n0, len};
  const bool do_db = p.db != nullptr && blockIdx.y == 0;  // one column of blocks sums db
  float colsum = 0.f;
  typename M::Acc acc;
  gemm_mainloop<T, M, L>(prob, acc, smem, do_db, colsum);
  dw_epilogue<T, M>(p, acc, colsum, do_db, m0, n0, split, smem);
}

// db alone (a frozen weight with a trainable bias): one thread per column, rows in order.
template <typename T>
__global__ void column_sum_kernel(const T* a, int64_t ld_a, int64_t rows, int m, T* db) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= m) return;
  float s = 0.f;
  for (int64_t r = 0; r < rows; ++r) s += to_f(a[r * ld_a + j]);
  db[j] = from_f<T>(s);
}

// ================================ host side ==============================================

bool shape_ok(const LinearShape& s, const LinearWeights& w) {
  if (s.rows < 0 || s.in_features < 0 || s.frozen_in < 0 || s.frozen_in > s.in_features ||
      s.frozen_out < 0 || s.new_out < 0 || s.num_frozen_groups < 0)
    return false;
  if (s.in_features > INT32_MAX / 2 || s.frozen_out + s.new_out > INT32_MAX / 2) return false;
  return frozen_groups_ok(s.num_frozen_groups, s.frozen_out_groups, s.frozen_k_ends,
                          s.frozen_in, s.frozen_out);
}

// The wgmma variant this call takes (wgmma_variant(): the default, or an experiment).
template <typename T, class F>
cudaError_t dispatch_wgmma(F&& f) {
  switch (wgmma_variant()) {
    case WgmmaVariant::kSwizzled: return f(T{}, WgmmaMath<T, true>{});
    case WgmmaVariant::kDeepK: return f(T{}, WgmmaMath<T, false, 128, 2>{});
    default: return f(T{}, WgmmaMath<T>{});  // (kTma too: its forward is linear_forward's)
  }
}

// ---- tensor maps (the TMA forward) ------------------------------------------------------------
}  // namespace

namespace tma {
// cuTensorMapEncodeTiled, looked up once in the driver the runtime loaded (the extension does
// not link libcuda).
bool encode(CUtensorMap* map, const Operand& op, bool bf16) {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = []() -> PFN_cuTensorMapEncodeTiled_v12000 {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t looked = cudaGetDriverEntryPointByVersion(
        "cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t looked =
        cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &found);
#endif
    if (looked != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  if (fn == nullptr || !usable(op)) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(op.cols), static_cast<cuuint64_t>(op.rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(op.ld) * 2};
  const cuuint32_t box[2] = {kBoxCols, static_cast<cuuint32_t>(op.box_rows)};
  const cuuint32_t steps[2] = {1, 1};
  return fn(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
            const_cast<void*>(op.base), dims, strides, box, steps, CU_TENSOR_MAP_INTERLEAVE_NONE,
            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}
}  // namespace tma

namespace {

// The TMA forward launch of p (built by build_fwd with WgmmaMath<T, true>'s tiles): its maps,
// then the kernel.  cudaErrorNotSupported where an operand is not one the engine takes (the
// caller runs the cp.async kernel instead).
template <typename T>
cudaError_t launch_fwd_tma(const FwdParams& p, dim3 grid, cudaStream_t stream) {
  using M = WgmmaMath<T, true>;
  using L = typename M::template Layout<true, true>;
  static_assert(alignof(FwdTmaMaps) >= 64, "tensor maps are 64-byte aligned");
  FwdTmaMaps maps{};
  for (int si = 0; si < p.nseg; ++si) {
    tma::Operand ops[4];
    fwd_tma_operands<T, M>(p, si, ops);
    for (int i = 0; i < 4; ++i) {
      if (ops[i].cols == 0) continue;  // no such phase: its map is never read
      if (!tma::encode(&maps.map[si][i], ops[i], std::is_same<T, __nv_bfloat16>::value))
        return cudaErrorNotSupported;
    }
  }
  constexpr size_t bytes = L::BYTES + M::STAGES * sizeof(uint64_t);
  static_assert(bytes <= 227 * 1024, "the stages and their barriers fit");
  static std::atomic<bool> raised[kSmemDevices];
  const cudaError_t err = raise_smem_limit(linear_fwd_tma_kernel<T>, bytes, raised);
  if (err != cudaSuccess) return err;
  linear_fwd_tma_kernel<T><<<grid, M::THREADS, bytes, stream>>>(p, maps);
  return cudaGetLastError();
}

// Calls f(element, math) with the element type `dt` names and the tile math for this call.
template <class F>
cudaError_t dispatch_math(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{}, SimtMath{});
    case DType::kFloat16:
      if (!wgmma_enabled(dt)) return f(__half{}, WmmaMath<__half>{});
      return dispatch_wgmma<__half>(f);
    case DType::kBFloat16:
      if (!wgmma_enabled(dt)) return f(__nv_bfloat16{}, WmmaMath<__nv_bfloat16>{});
      return dispatch_wgmma<__nv_bfloat16>(f);
  }
  return cudaErrorInvalidValue;
}

// Launches a GEMM kernel with its dynamic shared memory (raising the 48 KB default if needed).
// One kernel per instantiation, so the attribute is raised once per device.
template <class M, bool AK, bool BKM, class Params>
cudaError_t launch_gemm(void (*kernel)(Params), dim3 grid, const Params& p, cudaStream_t stream) {
  constexpr size_t bytes = smem_bytes<M, AK, BKM>();
  if (bytes > 48 * 1024) {
    static std::atomic<bool> raised[kSmemDevices];
    const cudaError_t err = raise_smem_limit(kernel, bytes, raised);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, M::THREADS, bytes, stream>>>(p);
  return cudaGetLastError();
}

// ---- launch parameters (host), kept apart from the launches so that a host harness can walk
// the very same tiles (tests/csrc/linear_tile_emulation.cu).  M gives the tile shape. --------

// The forward's output segments: every non-empty frozen group, then the new rows.
template <typename T>
std::vector<FwdSeg> fwd_segments(const LinearShape& s, const LinearWeights& w,
                                 const void* b_frozen, const void* b_new) {
  std::vector<FwdSeg> segs;
  int64_t r0 = 0;
  for (int g = 0; g < s.num_frozen_groups; ++g) {
    const int64_t rows = s.frozen_out_groups[g];
    if (rows > 0) {
      FwdSeg seg{};
      seg.w1 = static_cast<const T*>(w.w_frozen) + r0 * w.ld_w_frozen;
      seg.ld1 = w.ld_w_frozen;
      seg.k1 = static_cast<int>(s.frozen_k_ends[g]);
      if (w.w_couple != nullptr) {
        seg.w2 = static_cast<const T*>(w.w_couple) + r0 * w.ld_w_couple;
        seg.ld2 = w.ld_w_couple;
        seg.k2_col0 = static_cast<int>(s.frozen_in);
        seg.k2 = static_cast<int>(s.in_features - s.frozen_in);
      }
      seg.bias = b_frozen != nullptr ? static_cast<const T*>(b_frozen) + r0 : nullptr;
      seg.col0 = static_cast<int>(r0);
      seg.rows = static_cast<int>(rows);
      segs.push_back(seg);
    }
    r0 += rows;
  }
  if (s.new_out > 0) {
    FwdSeg seg{};
    seg.w1 = w.w_new;
    seg.ld1 = w.ld_w_new;
    seg.k1 = static_cast<int>(s.in_features);
    seg.bias = b_new;
    seg.col0 = static_cast<int>(s.frozen_out);
    seg.rows = static_cast<int>(s.new_out);
    segs.push_back(seg);
  }
  return segs;
}

// The forward launch of segs[first, first + kSegsPerLaunch).
template <class M>
cudaError_t build_fwd(const std::vector<FwdSeg>& segs, size_t first, const LinearShape& s,
                      const void* x, int64_t ld_x, void* y, int64_t ld_y,
                      const LinearEpilogue& epilogue, FwdParams& p, dim3& grid) {
  p = FwdParams{};
  p.x = x; p.y = y; p.ld_x = ld_x; p.ld_y = ld_y; p.rows = s.rows;
  p.pre = epilogue.pre; p.ld_pre = epilogue.ld_pre; p.pre_col0 = epilogue.pre_col0;
  p.activation = static_cast<int>(epilogue.activation);
  p.nseg = static_cast<int>(std::min<size_t>(kSegsPerLaunch, segs.size() - first));
  int tiles = 0;
  for (int i = 0; i < p.nseg; ++i) {
    p.seg[i] = segs[first + i];
    p.seg[i].tile0 = tiles;
    tiles += static_cast<int>(ceil_div(p.seg[i].rows, M::BN));
  }
  if (tiles > kMaxGridY) return cudaErrorInvalidValue;
  grid = dim3(static_cast<unsigned>(ceil_div(s.rows, M::BM)), tiles);
  return cudaSuccess;
}

template <class M>
cudaError_t build_dx(const LinearShape& s, const LinearWeights& w, const void* dy,
                     int64_t ld_dy, bool need_dx_old, void* dx, int64_t ld_dx, DxParams& p,
                     dim3& grid) {
  p = DxParams{};
  p.dy = dy; p.dx = dx; p.ld_dy = ld_dy; p.ld_dx = ld_dx; p.rows = s.rows;
  p.w_new = w.w_new; p.ld_wn = w.ld_w_new;
  p.w_frozen = w.w_frozen; p.ld_wf = w.ld_w_frozen;
  p.w_couple = (w.w_couple != nullptr && s.frozen_out > 0) ? w.w_couple : nullptr;
  p.ld_wc = w.ld_w_couple;
  p.in_features = static_cast<int>(s.in_features);
  p.frozen_in = static_cast<int>(s.frozen_in);
  p.frozen_out = static_cast<int>(s.frozen_out);
  p.new_out = static_cast<int>(s.new_out);
  p.need_old = need_dx_old ? 1 : 0;
  int r0 = 0;
  for (int g = 0; g < s.num_frozen_groups; ++g) {
    p.g_row0[g] = r0;
    p.g_rows[g] = static_cast<int>(s.frozen_out_groups[g]);
    p.g_kend[g] = static_cast<int>(s.frozen_k_ends[g]);
    r0 += p.g_rows[g];
  }
  p.ngroups = s.num_frozen_groups;
  p.old_tiles = static_cast<int>(
      p.bands.build(s.num_frozen_groups, s.frozen_k_ends, s.frozen_in, need_dx_old, M::BN));
  const int64_t tiles = p.old_tiles + ceil_div(s.in_features - s.frozen_in, M::BN);
  if (tiles > kMaxGridY) return cudaErrorInvalidValue;
  grid = dim3(static_cast<unsigned>(ceil_div(s.rows, M::BM)), static_cast<unsigned>(tiles));
  return cudaSuccess;
}

// The GEMM launch of linear_weight_grad (its arguments already checked, out non-null).
template <class M>
cudaError_t build_dw(int64_t rows, int64_t m, int64_t n, const void* a, int64_t ld_a,
                     int64_t a_col0, const void* b, int64_t ld_b, int64_t b_col0, void* out,
                     int64_t ld_out, void* db, const WeightGradPlan& plan, void* workspace,
                     DwParams& p, dim3& grid) {
  p = DwParams{};
  p.a = a; p.b = b; p.out = out; p.db = db;
  p.ws = plan.splits > 1 ? static_cast<float*>(workspace) : nullptr;
  p.ld_a = ld_a; p.ld_b = ld_b; p.ld_out = ld_out; p.rows = rows;
  p.rows_per_split = plan.splits > 1 ? plan.rows_per_split : std::max<int64_t>(rows, 1);
  p.a_col0 = static_cast<int>(a_col0); p.b_col0 = static_cast<int>(b_col0);
  p.m = static_cast<int>(m); p.n = static_cast<int>(n); p.splits = plan.splits;
  const int64_t ny = ceil_div(n, M::BN);
  if (ny > kMaxGridY || plan.splits > kMaxGridY) return cudaErrorInvalidValue;
  grid = dim3(static_cast<unsigned>(ceil_div(m, M::BM)), static_cast<unsigned>(ny),
              static_cast<unsigned>(plan.splits));
  return cudaSuccess;
}

// ---- how often dW splits its reduction ---------------------------------------------------------
// The splits that minimise the estimated time, in k-tiles of one block: the waves of blocks
// (blocks_per_sm at once on each SM) times each block's k-tiles, plus the fp32 partials of a
// split reduction (2 x splits x m x n elements: written by the blocks, read back by the
// reduction) at M::WS_ELEMS_PER_KTILE elements an SM streams from memory in one k-tile's
// time.  The tail wave counts whole: 160 output tiles on 132 SMs take two waves, the second
// 21% full, unless the reduction is split (4 splits: 640 blocks in 5 waves).  A split must
// save a tenth of the unsplit time (the model leaves out the reduction's launch and the
// workspace's allocation) and its workspace stay within kMaxSplitWorkspace.  At least 8
// k-tiles a split, at most 64 splits, and at least as many as keep a block's rows an int.
constexpr double kMaxSplitWorkspace = 256.0 * 1024 * 1024;  // bytes

template <class M>
WeightGradPlan plan_for(int64_t rows, int64_t m, int64_t n, int num_sms, int blocks_per_sm) {
  WeightGradPlan plan{1, std::max<int64_t>(rows, 1), 0};
  if (m <= 0 || n <= 0 || rows <= 0) return plan;
  const int64_t tiles = ceil_div(m, M::BM) * ceil_div(n, M::BN);
  const int64_t ktiles = ceil_div(rows, M::BK);
  const int64_t slots = std::max<int64_t>(num_sms, 1) * std::max(blocks_per_sm, 1);
  const int64_t min_splits = ceil_div(rows, int64_t{1} << 30);
  const int64_t max_splits = std::max<int64_t>(min_splits, std::min<int64_t>(64, ktiles / 8));
  const double mn = static_cast<double>(m) * static_cast<double>(n);
  auto cost = [&](int64_t s, int64_t per) {
    double c = static_cast<double>(ceil_div(tiles * s, slots)) * static_cast<double>(per);
    if (s > 1) c += 2.0 * static_cast<double>(s) * mn / (slots * M::WS_ELEMS_PER_KTILE);
    return c;
  };
  const double base = cost(min_splits, ceil_div(ktiles, min_splits));
  int64_t best = min_splits;
  double best_cost = base;
  for (int64_t s = min_splits + 1; s <= max_splits; ++s) {
    const int64_t per = ceil_div(ktiles, s);  // k-tiles a split
    if (ceil_div(ktiles, per) != s) continue;  // a smaller s's splits
    if (static_cast<double>(s) * (mn + m) * sizeof(float) > kMaxSplitWorkspace) break;
    const double c = cost(s, per);
    if (c < best_cost) {
      best = s;
      best_cost = c;
    }
  }
  if (best > min_splits && best_cost > 0.9 * base) best = min_splits;
  if (best <= 1) return plan;
  plan.rows_per_split = ceil_div(ktiles, best) * M::BK;
  plan.splits = static_cast<int>(ceil_div(rows, plan.rows_per_split));
  if (plan.splits <= 1) return WeightGradPlan{1, rows, 0};
  plan.workspace_bytes = static_cast<size_t>(plan.splits) * (m * n + m) * sizeof(float);
  return plan;
}

// ---- which tile math runs --------------------------------------------------------------------
__global__ void wgmma_probe_kernel(int* out) { *out = EXPANSE_FAST_WGMMA; }

// Whether the binary loaded for the current device holds the wgmma code (built for sm_90a and
// running on a compute-capability 9.0 GPU): asked once per device with a one-thread kernel.
// The Python loader asks for the current device right after loading the extension, so the
// probe (a malloc, a launch, a copy) does not first run inside a CUDA graph capture.
bool wgmma_compiled() {
  constexpr int kDevices = 64;
  static std::atomic<int> known[kDevices];  // 0 unknown, 1 no, 2 yes
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kDevices) return false;
  int v = known[dev].load();
  if (v != 0) return v == 2;
  int* buf = nullptr;
  if (cudaMalloc(&buf, sizeof(int)) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;  // not cached: ask again next time (e.g. after a graph capture)
  }
  int has = 0;
  wgmma_probe_kernel<<<1, 1>>>(buf);
  const cudaError_t launched = cudaGetLastError();  // no image for this GPU: not wgmma
  const cudaError_t copied = launched == cudaSuccess
                                 ? cudaMemcpy(&has, buf, sizeof(int), cudaMemcpyDeviceToHost)
                                 : cudaSuccess;
  cudaFree(buf);
  if (copied != cudaSuccess) {
    (void)cudaGetLastError();
    return false;  // not cached
  }
  known[dev] = has == 1 ? 2 : 1;
  return has == 1;
}

// How many blocks of the dW kernel an SM runs at once on the current device (the
// occupancy calculator: registers and shared memory), asked once per device; MIN_BLOCKS where
// it cannot say (no device, the shared-memory limit not yet raised for this kernel).
template <typename T, class M>
int dw_blocks_per_sm() {
  constexpr int kDevices = 64;
  static std::atomic<int> known[kDevices];  // 0: not asked yet
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kDevices) {
    (void)cudaGetLastError();
    return M::MIN_BLOCKS;
  }
  int v = known[dev].load();
  if (v > 0) return v;
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, linear_dw_kernel<T, M>,
                                                    M::THREADS,
                                                    smem_bytes<M, false, false>()) !=
          cudaSuccess ||
      blocks < 1) {
    (void)cudaGetLastError();
    return M::MIN_BLOCKS;  // not cached: ask again once the kernel has run
  }
  known[dev] = blocks;
  return blocks;
}

}  // namespace

// fp16/bf16 use wgmma where compiled in, unless EXPANSE_FAST_CUDA_WGMMA=0 (read at every call,
// so a process can compare both paths).  The conv kernels ask too.
bool wgmma_enabled(DType dt) {
  if (dt == DType::kFloat32) return false;
  const char* env = std::getenv("EXPANSE_FAST_CUDA_WGMMA");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  return wgmma_compiled();
}

// The linear wgmma kernels' experiments, off by default and read at every call (as
// EXPANSE_FAST_CUDA_WGMMA is): EXPANSE_FAST_CUDA_SWIZZLE=1, 128-byte swizzled operand tiles;
// else EXPANSE_FAST_CUDA_PIPELINE=k128x2, two stages of 128-wide k-tiles.
WgmmaVariant wgmma_variant() {
  const char* swizzle = std::getenv("EXPANSE_FAST_CUDA_SWIZZLE");
  if (swizzle != nullptr && std::strcmp(swizzle, "1") == 0) return WgmmaVariant::kSwizzled;
  const char* pipeline = std::getenv("EXPANSE_FAST_CUDA_PIPELINE");
  if (pipeline != nullptr && std::strcmp(pipeline, "k128x2") == 0) return WgmmaVariant::kDeepK;
  if (pipeline != nullptr && std::strcmp(pipeline, "tma") == 0) return WgmmaVariant::kTma;
  return WgmmaVariant::kDefault;
}

const char* linear_math_name(DType dtype) {
  if (dtype == DType::kFloat32) return "simt";
  if (!wgmma_enabled(dtype)) return "wmma";
  switch (wgmma_variant()) {
    case WgmmaVariant::kSwizzled: return "wgmma-sw128";
    case WgmmaVariant::kDeepK: return "wgmma-k128x2";
    case WgmmaVariant::kTma: return "wgmma-tma";
    default: return "wgmma";
  }
}

// The forward through the copy engine, every launch's operands checked before the first
// runs: cudaErrorNotSupported (nothing launched) where the engine cannot take one of them.
static cudaError_t linear_forward_tma(const LinearShape& s, const LinearWeights& w, const void* x,
                               int64_t ld_x, const void* b_frozen, const void* b_new, void* y,
                               int64_t ld_y, const LinearEpilogue& epilogue,
                               cudaStream_t stream) {
  auto run = [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using M = WgmmaMath<T, true>;
    const std::vector<FwdSeg> segs = fwd_segments<T>(s, w, b_frozen, b_new);
    for (size_t first = 0; first < segs.size(); first += kSegsPerLaunch) {
      FwdParams p;
      dim3 grid;
      if (build_fwd<M>(segs, first, s, x, ld_x, y, ld_y, epilogue, p, grid) != cudaSuccess)
        return cudaErrorNotSupported;
      for (int si = 0; si < p.nseg; ++si) {
        tma::Operand ops[4];
        fwd_tma_operands<T, M>(p, si, ops);
        for (const tma::Operand& op : ops)
          if (op.cols > 0 && !tma::usable(op)) return cudaErrorNotSupported;
      }
    }
    for (size_t first = 0; first < segs.size(); first += kSegsPerLaunch) {
      FwdParams p;
      dim3 grid;
      cudaError_t err = build_fwd<M>(segs, first, s, x, ld_x, y, ld_y, epilogue, p, grid);
      if (err == cudaSuccess) err = launch_fwd_tma<T>(p, grid, stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  };
  if (s.dtype == DType::kBFloat16) return run(__nv_bfloat16{});
  if (s.dtype == DType::kFloat16) return run(__half{});
  return cudaErrorNotSupported;
}

cudaError_t linear_forward(const LinearShape& s, const LinearWeights& w, const void* x,
                           int64_t ld_x, const void* b_frozen, const void* b_new, void* y,
                           int64_t ld_y, const LinearEpilogue& epilogue, cudaStream_t stream) {
  if (!shape_ok(s, w)) return cudaErrorInvalidValue;
  const int act = static_cast<int>(epilogue.activation);
  if (act < 0 || act > static_cast<int>(Activation::kGelu)) return cudaErrorInvalidValue;
  if (s.rows == 0 || s.frozen_out + s.new_out == 0) return cudaSuccess;
  if (s.dtype != DType::kFloat32 && wgmma_enabled(s.dtype) &&
      wgmma_variant() == WgmmaVariant::kTma) {
    const cudaError_t err = linear_forward_tma(s, w, x, ld_x, b_frozen, b_new, y, ld_y,
                                               epilogue, stream);
    if (err != cudaErrorNotSupported) return err;  // (else the cp.async kernels below)
  }
  return dispatch_math(s.dtype, [&](auto tag, auto math) -> cudaError_t {
    using T = decltype(tag);
    using M = decltype(math);
    const std::vector<FwdSeg> segs = fwd_segments<T>(s, w, b_frozen, b_new);
    for (size_t first = 0; first < segs.size(); first += kSegsPerLaunch) {
      FwdParams p;
      dim3 grid;
      cudaError_t err = build_fwd<M>(segs, first, s, x, ld_x, y, ld_y, epilogue, p, grid);
      if (err == cudaSuccess)
        err = launch_gemm<M, true, true>(linear_fwd_kernel<T, M>, grid, p, stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
}

cudaError_t linear_backward_input(const LinearShape& s, const LinearWeights& w, const void* dy,
                                  int64_t ld_dy, bool need_dx_old, void* dx, int64_t ld_dx,
                                  cudaStream_t stream) {
  if (!shape_ok(s, w) || s.num_frozen_groups > kMaxFrozenGroups) return cudaErrorInvalidValue;
  if (s.rows == 0 || s.in_features == 0) return cudaSuccess;
  return dispatch_math(s.dtype, [&](auto tag, auto math) -> cudaError_t {
    using T = decltype(tag);
    using M = decltype(math);
    DxParams p;
    dim3 grid;
    const cudaError_t err = build_dx<M>(s, w, dy, ld_dy, need_dx_old, dx, ld_dx, p, grid);
    if (err != cudaSuccess) return err;
    return launch_gemm<M, true, false>(linear_dx_kernel<T, M>, grid, p, stream);
  });
}

WeightGradPlan plan_weight_grad(DType dtype, int64_t rows, int64_t m, int64_t n, int num_sms) {
  // the tile of the math linear_weight_grad will run, and how many of its blocks an SM holds
  WeightGradPlan plan{1, std::max<int64_t>(rows, 1), 0};
  dispatch_math(dtype, [&](auto tag, auto math) -> cudaError_t {
    using M = decltype(math);
    plan = plan_for<M>(rows, m, n, num_sms, dw_blocks_per_sm<decltype(tag), M>());
    return cudaSuccess;
  });
  return plan;
}

cudaError_t linear_weight_grad(DType dtype, int64_t rows, int64_t m, int64_t n, const void* a,
                               int64_t ld_a, int64_t a_col0, const void* b, int64_t ld_b,
                               int64_t b_col0, void* out, int64_t ld_out, void* db,
                               const WeightGradPlan& plan, void* workspace, cudaStream_t stream) {
  if (rows < 0 || m < 0 || n < 0 || plan.splits < 1 || plan.rows_per_split < 1 ||
      m > INT32_MAX / 2 || n > INT32_MAX / 2 || plan.rows_per_split > (int64_t{1} << 30) ||
      static_cast<int64_t>(plan.splits) * plan.rows_per_split < rows ||
      (plan.splits > 1 &&
       (workspace == nullptr ||
        plan.workspace_bytes < static_cast<size_t>(plan.splits) * (m * n + m) * sizeof(float))))
    return cudaErrorInvalidValue;
  if (n == 0) out = nullptr;  // an empty dW: nothing to write
  if (m == 0 || (out == nullptr && db == nullptr)) return cudaSuccess;
  return dispatch_math(dtype, [&](auto tag, auto math) -> cudaError_t {
    using T = decltype(tag);
    using M = decltype(math);
    if (out == nullptr) {  // db alone
      column_sum_kernel<T><<<static_cast<unsigned>(ceil_div(m, 256)), 256, 0, stream>>>(
          static_cast<const T*>(a) + a_col0, ld_a, rows, static_cast<int>(m), static_cast<T*>(db));
      return cudaGetLastError();
    }
    DwParams p;
    dim3 grid;
    cudaError_t err = build_dw<M>(rows, m, n, a, ld_a, a_col0, b, ld_b, b_col0, out, ld_out, db,
                                  plan, workspace, p, grid);
    if (err != cudaSuccess) return err;
    err = launch_gemm<M, false, false>(linear_dw_kernel<T, M>, grid, p, stream);
    if (err != cudaSuccess || plan.splits == 1) return err;
    const int64_t total = m * n + (db != nullptr ? m : 0);
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256), 4096));
    splitk_reduce_kernel<T><<<blocks, 256, 0, stream>>>(p.ws, plan.splits, p.m, p.n,
                                                        static_cast<T*>(out), ld_out,
                                                        static_cast<T*>(db));
    return cudaGetLastError();
  });
}

}  // namespace expanse_fast
