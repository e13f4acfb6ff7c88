// CUDA kernels of the expanded conv2d (NCHW, groups = 1; see expanded_conv.h for the storage).
//
// Three implicit GEMMs, each a tiled main loop over "phases" (contiguous reduction ranges that
// read different weight tensors), like the linear kernels:
//   forward  y[p, o]   = sum_k  X[p, k]  w[o, k]        p: output pixel (n, ho, wo)
//   dW       dw[o, k]  = sum_p  dy[p, o] X[p, k]        k = (c, kh, kw)
//   dx       dx[q, c]  = sum_j  D[q, j]  w[o, c, kh, kw] q: input pixel, j = (o, kh, kw)
// where X is the im2col view of x (never materialised: gathered into shared memory tile by
// tile, zero outside the image) and D[q, (o, kh, kw)] = dy[n, o, ho, wo] for the output pixel
// (ho, wo) that reads input pixel q through tap (kh, kw), zero when there is none.
// A block never crosses an output group (forward) or the old/new input-channel boundary (dx),
// so the zero blocks of the staircase are never read nor multiplied.
//
// fp16/bf16: wgmma m64n64k16 on an sm_90a build (two warpgroups; EXPANSE_FAST_CUDA_WGMMA=0
// turns it off), else WMMA 16x16x16 fragments (8 warps, 32x32 each); fp32 accumulators.  fp32:
// shared-memory-tiled SIMT FMA (exact fp32, no tf32).  Tiles are gathered with bounds-checked
// scalar loads into registers while the previous tile multiplies (two shared-memory stages).
//
// A channels_last fp16/bf16 forward with channel counts in multiples of 8 runs on an sm_90a
// build as expanded_conv_nhwc.cu's NHWC implicit GEMM instead (16-byte gathers).
//
// Every index helper is __host__ __device__ and takes the thread index as an argument, so the
// tile logic can be exercised on the host against a reference without a GPU.
#include "expanded_conv.h"
#include "kernel_common.cuh"
#include "wgmma.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#define XF_HD __host__ __device__ __forceinline__

namespace expanse_fast {
namespace {

using namespace nvcuda;
using namespace common;

// ---- tile shapes ----------------------------------------------------------------------------
// A tile of SLOW x FAST elements, stored [slow][fast] in shared memory with a padded row
// (LD = FAST + PAD).  Thread t loads the elements (fast = t % FAST, slow = t / FAST + i * STEP)
// for i < ELEMS: consecutive threads read consecutive "fast" indices, which is the direction in
// which the global operand is (most nearly) contiguous.
template <int FAST, int SLOW, int THREADS, int PAD>
struct TileMap {
  static constexpr int LD = FAST + PAD;
  static constexpr int STEP = THREADS / FAST;
  static constexpr int ELEMS = FAST * SLOW / THREADS;
  static constexpr int SIZE = SLOW * LD;  // elements
  static_assert(THREADS % FAST == 0 && SLOW % STEP == 0, "tile must split evenly over threads");
  XF_HD static int fast(int t) { return t % FAST; }
  XF_HD static int slow(int t, int i) { return t / FAST + i * STEP; }
};

enum class Kind { kFwd, kDx, kDw };

// Block tile (BM x BN outputs, BK-deep reduction steps) and shared-memory plan of each GEMM.
//  kFwd, kDx: M = pixels (fast in NCHW memory), N = channels.  A tile stored [k][m]
//             (WMMA col-major A), B tile [n][k] (WMMA col-major B).  Epilogue walks m fastest.
//  kDw:       M = output channels, N = (c, kh, kw), K = pixels.  A tile stored [m][k]
//             (row-major A), B tile [n][k].  Epilogue walks n fastest (dW rows are contiguous).
template <typename T, Kind K>
struct Tiles {
  static constexpr bool SIMT = std::is_same<T, float>::value;
  static constexpr bool A_KM = K != Kind::kDw;
  static constexpr bool M_FAST = K != Kind::kDw;
  static constexpr int BM = SIMT ? 64 : (K == Kind::kDw ? 64 : 128);
  static constexpr int BN = SIMT ? 64 : (K == Kind::kDw ? 128 : 64);
  static constexpr int BK = SIMT ? 16 : 32;
  static constexpr int THREADS = 256;
  // SIMT: one element of padding makes the strided shared reads conflict-free.  WMMA: 16 bytes
  // keep every fragment pointer 32-byte aligned and the leading dimension a multiple of 8.
  static constexpr int PAD = SIMT ? 1 : 8;
  using AMap = std::conditional_t<A_KM, TileMap<BM, BK, THREADS, PAD>,
                                  TileMap<BK, BM, THREADS, PAD>>;
  using BMap = TileMap<BK, BN, THREADS, PAD>;
  static constexpr int LDA = AMap::LD, LDB = BMap::LD;
  static constexpr int A_SIZE = AMap::SIZE;
  static constexpr int STAGE = AMap::SIZE + BMap::SIZE;
  static constexpr size_t TILE_BYTES = 2 * static_cast<size_t>(STAGE) * sizeof(T);
  static constexpr size_t SCRATCH_BYTES = SIMT ? 0 : (THREADS / 32) * 256 * sizeof(float);
  static constexpr size_t SMEM_BYTES = TILE_BYTES > SCRATCH_BYTES ? TILE_BYTES : SCRATCH_BYTES;
  static_assert(SIMT || ((A_SIZE * sizeof(T)) % 32 == 0 && (STAGE * sizeof(T)) % 32 == 0 &&
                         LDA % 8 == 0 && LDB % 8 == 0),
                "WMMA needs 32-byte aligned tiles and a leading dimension that is a multiple of 8");
  static_assert(SMEM_BYTES <= 48 * 1024, "static shared memory is limited to 48 KiB");

  // The operands as the math sees them: A(m, k) and B(k, n) of one stage.
  XF_HD static float a_at(const T* As, int m, int k) {
    return to_f(A_KM ? As[k * LDA + m] : As[m * LDA + k]);
  }
  XF_HD static float b_at(const T* Bs, int k, int n) { return to_f(Bs[n * LDB + k]); }
};

// ---- tile math ------------------------------------------------------------------------------
// Each math owns its shared-memory stages (STAGE, A_SIZE elements; SMEM_BYTES in all, the
// epilogue's scratch included), how a thread's gathered registers land there (scatter), what a
// thread does before the barrier that publishes them (before_barrier), and how tiles multiply
// (zero, mma) and leave (store, calling f(m, n, value) tile-relative).  retire(acc) waits for
// the MMAs mma issued: WgmmaMath's run on while the next tile is scattered into the other
// stage; the others are done when mma returns.

// Writes a thread's gathered registers into one stage: A at stage[0, a_size), B after it,
// element (slow, fast) of each tile at a_at(slow, fast) / b_at(slow, fast).
template <typename T, Kind K, class AAt, class BAt>
__device__ __forceinline__ void scatter_stage(T* stage, int a_size,
                                              const T (&ra)[Tiles<T, K>::AMap::ELEMS],
                                              const T (&rb)[Tiles<T, K>::BMap::ELEMS],
                                              AAt a_at, BAt b_at) {
  using TA = typename Tiles<T, K>::AMap;
  using TB = typename Tiles<T, K>::BMap;
  const int t = threadIdx.x;
#pragma unroll
  for (int i = 0; i < TA::ELEMS; ++i) stage[a_at(TA::slow(t, i), TA::fast(t))] = ra[i];
#pragma unroll
  for (int i = 0; i < TB::ELEMS; ++i) stage[a_size + b_at(TB::slow(t, i), TB::fast(t))] = rb[i];
}

// The padded [slow][fast] stages of Tiles (the WMMA and SIMT maths).
template <typename T, Kind K>
struct PaddedStages {
  using TL = Tiles<T, K>;
  static constexpr int STAGE = TL::STAGE, A_SIZE = TL::A_SIZE;
  static constexpr size_t SMEM_BYTES = TL::SMEM_BYTES;
  __device__ static void before_barrier() {}
  template <class Acc>
  __device__ static void retire(Acc&) {}
  __device__ static void scatter(T* stage, const T (&ra)[TL::AMap::ELEMS],
                                 const T (&rb)[TL::BMap::ELEMS]) {
    scatter_stage<T, K>(stage, A_SIZE, ra, rb,
                        [](int slow, int fast) { return slow * TL::AMap::LD + fast; },
                        [](int slow, int fast) { return slow * TL::BMap::LD + fast; });
  }
};

// fp32: 256 threads as 16 x 16, each a 4 x 4 micro-tile (rows m_of(t, i), columns n_of(t, j))
// of the 64 x 64 block tile.
template <Kind K>
struct SimtMath : PaddedStages<float, K> {
  using TL = Tiles<float, K>;
  static_assert(TL::BM == 64 && TL::BN == 64 && TL::THREADS == 256, "SIMT tile is 64 x 64");
  struct Acc { float v[4][4]; };

  XF_HD static int m_of(int t, int i) { return (TL::M_FAST ? t % 16 : t / 16) + 16 * i; }
  XF_HD static int n_of(int t, int j) { return (TL::M_FAST ? t / 16 : t % 16) + 16 * j; }

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc.v[i][j] = 0.f;
  }

  __device__ static void mma(Acc& acc, const float* As, const float* Bs) {
    const int t = threadIdx.x;
#pragma unroll
    for (int k = 0; k < TL::BK; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = TL::a_at(As, m_of(t, i), k);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = TL::b_at(Bs, k, n_of(t, j));
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc.v[i][j] = fmaf(a[i], b[j], acc.v[i][j]);
    }
  }

  template <class F>
  __device__ static void store(Acc& acc, float*, F&& f) {
    const int t = threadIdx.x;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) f(m_of(t, i), n_of(t, j), acc.v[i][j]);
  }
};

// fp16 / bf16: 8 warps, each a 32 x 32 warp tile (2 x 2 fragments) of the block tile.
template <typename T, Kind K>
struct WmmaMath : PaddedStages<T, K> {
  using TL = Tiles<T, K>;
  static constexpr int WARPS_N = TL::BN / 32;
  static_assert((TL::BM / 32) * WARPS_N == TL::THREADS / 32, "one 32 x 32 tile per warp");
  struct Acc { wmma::fragment<wmma::accumulator, 16, 16, 16, float> f[2][2]; };

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc.f[i][j], 0.f);
  }

  // A(m, k) is As[k * LDA + m] (col-major) or As[m * LDA + k] (row-major); B(k, n) is
  // Bs[n * LDB + k] (col-major): the same elements a_at / b_at name.
  __device__ static void mma(Acc& acc, const T* As, const T* Bs) {
    using ALay = std::conditional_t<TL::A_KM, wmma::col_major, wmma::row_major>;
    const int warp = threadIdx.x / 32;
    const int wm = (warp / WARPS_N) * 32, wn = (warp % WARPS_N) * 32;
#pragma unroll
    for (int kk = 0; kk < TL::BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALay> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int m = wm + 16 * i;
        wmma::load_matrix_sync(a[i], TL::A_KM ? As + kk * TL::LDA + m : As + m * TL::LDA + kk,
                               TL::LDA);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = wn + 16 * j;
        wmma::load_matrix_sync(b[j], Bs + n * TL::LDB + kk, TL::LDB);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc.f[i][j], a[i], b[j], acc.f[i][j]);
    }
  }

  // Hand every accumulator to f(m, n, value), tile-relative, through a per-warp 16 x 16 fp32
  // scratch (fragment element order is unspecified).  Lanes walk m (M_FAST) or n fastest.
  template <class F>
  __device__ static void store(Acc& acc, float* scratch, F&& f) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = (warp / WARPS_N) * 32, wn = (warp % WARPS_N) * 32;
    float* scr = scratch + warp * 256;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(scr, acc.f[i][j], 16,
                                TL::M_FAST ? wmma::mem_col_major : wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int idx = e * 32 + lane;
          const int m = TL::M_FAST ? idx % 16 : idx / 16;
          const int n = TL::M_FAST ? idx / 16 : idx % 16;
          f(wm + 16 * i + m, wn + 16 * j + n, scr[idx]);
        }
        __syncwarp();
      }
  }
};

// fp16 / bf16 on an sm_90a build: two warpgroups, each a 64 x 64 wgmma tile (m64n64k16) of the
// block tile (fwd, dx: 128 x 64, split along M; dW: 64 x 128, split along N).  The same gather
// as the other maths; its registers land in 8 x 16-byte core matrices (wgmma.cuh) instead of
// padded rows.  A is stored [k][m] (fwd, dx: M-major) or [m][k] (dW: K-major), B [n][k].
template <typename T, Kind K>
struct WgmmaMath {
  using TL = Tiles<T, K>;
  static constexpr int VEC = 16 / sizeof(T);
  static constexpr bool A_KMAJOR = !TL::A_KM;
  static constexpr int A_INNER = TL::A_KM ? TL::BM : TL::BK;
  static constexpr bool SPLIT_M = TL::BM == 128;  // else the warpgroups split N
  static constexpr int WG_N = SPLIT_M ? TL::BN : TL::BN / 2;
  static_assert((TL::BM == 128 || TL::BM == 64) && WG_N == 64 && TL::BK % 16 == 0 &&
                    TL::THREADS == 256,
                "two warpgroups of m64n64 per block tile");
  static constexpr int A_SIZE = TL::BM * TL::BK, STAGE = A_SIZE + TL::BN * TL::BK;
  static constexpr size_t SMEM_BYTES = 2 * static_cast<size_t>(STAGE) * sizeof(T);
  static_assert(SMEM_BYTES <= 48 * 1024, "static shared memory is limited to 48 KiB");
  struct Acc { float d[WG_N / 2]; };

  __device__ static void before_barrier() { wgmma::fence_shared_for_async_proxy(); }
  __device__ static void retire(Acc& acc) {
    wgmma::wait_all();
    wgmma::pin(acc.d);
  }
  __device__ static void scatter(T* stage, const T (&ra)[TL::AMap::ELEMS],
                                 const T (&rb)[TL::BMap::ELEMS]) {
    scatter_stage<T, K>(stage, A_SIZE, ra, rb,
                        [](int slow, int fast) {
                          return wgmma::tile_offset<A_INNER, VEC>(slow, fast);
                        },
                        [](int slow, int fast) {
                          return wgmma::tile_offset<TL::BK, VEC>(slow, fast);
                        });
  }

  __device__ static int wg_m0() { return SPLIT_M ? 64 * (threadIdx.x / 128) : 0; }
  __device__ static int wg_n0() { return SPLIT_M ? 0 : 64 * (threadIdx.x / 128); }

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < WG_N / 2; ++i) acc.d[i] = 0.f;
  }

  __device__ static void mma(Acc& acc, const T* As, const T* Bs) {
    const int m0 = wg_m0(), n0 = wg_n0();
    wgmma::pin(acc.d);
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < TL::BK; kk += 16) {
      const wgmma::DescFields fa = wgmma::desc_fields<A_KMAJOR, A_INNER, VEC>(m0, kk);
      const wgmma::DescFields fb = wgmma::desc_fields<true, TL::BK, VEC>(n0, kk);
      wgmma::mma_m64k16<T, WG_N, A_KMAJOR ? 0 : 1, 0>(
          acc.d, wgmma::descriptor(As + fa.start, fa.lbo, fa.sbo),
          wgmma::descriptor(Bs + fb.start, fb.lbo, fb.sbo), 1);
    }
    wgmma::commit();  // retired before the barrier after which this stage is scattered into
  }

  template <class F>
  __device__ static void store(Acc& acc, float*, F&& f) {
    const int t = threadIdx.x % 128, m0 = wg_m0(), n0 = wg_n0();
#pragma unroll
    for (int i = 0; i < WG_N / 2; ++i)
      f(m0 + wgmma::acc_row(t, i), n0 + wgmma::acc_col(t, i), acc.d[i]);
  }
};

// ---- reduction-index arithmetic ---------------------------------------------------------------
// A reduction index k = (c * KH + kh) * KW + kw as (c, kh, kw); kstep adds a small step without
// dividing (a thread's k values in one tile differ by a fixed STEP).
struct KPos {
  int c, kh, kw;
};
XF_HD KPos kpos(int k, int KK, int KW) {
  KPos q;
  q.c = k / KK;
  const int r = k - q.c * KK;
  q.kh = r / KW;
  q.kw = r - q.kh * KW;
  return q;
}
XF_HD void kstep(KPos& q, int step, int KH, int KW) {
  q.kw += step;
  while (q.kw >= KW) {
    q.kw -= KW;
    if (++q.kh == KH) {
      q.kh = 0;
      ++q.c;
    }
  }
}

XF_HD bool in_range(int v, int n) { return static_cast<unsigned>(v) < static_cast<unsigned>(n); }

// Spatial constants every kernel needs (device copy of ConvGeometry, checked to fit int).
struct ConvDims {
  int H, W, Ho, Wo, KH, KW, KK, sh, sw, ph, pw, dh, dw;
};

// ---- the main loop ----------------------------------------------------------------------------
// A cursor over the problem's (phase, k0) tiles; P provides num_phases(), phase_len(p) and
// gather(cursor, ra, rb), all block-uniform but gather (per thread).
struct Cursor {
  int p, k0;
};
template <class P>
XF_HD void skip_empty(const P& prob, Cursor& c) {
  const int np = prob.num_phases();
  while (c.p < np && c.k0 >= prob.phase_len(c.p)) {
    ++c.p;
    c.k0 = 0;
  }
}
template <int BK, class P>
XF_HD void advance(const P& prob, Cursor& c) {
  c.k0 += BK;
  skip_empty(prob, c);
}
template <class P>
XF_HD bool finished(const P& prob, const Cursor& c) { return c.p >= prob.num_phases(); }

// acc = sum over every tile of A_tile * B_tile.  The next tile's global loads are in flight
// (in registers) while the current one multiplies (and, with asynchronous MMAs, while they are
// scattered into the other stage); two shared stages, one barrier per tile.
template <typename T, Kind K, class M, class P>
__device__ void mainloop(const P& prob, typename M::Acc& acc, unsigned char* smem) {
  using TL = Tiles<T, K>;
  M::zero(acc);
  T* const base = reinterpret_cast<T*>(smem);
  T ra[TL::AMap::ELEMS], rb[TL::BMap::ELEMS];
  Cursor cur{0, 0};
  skip_empty(prob, cur);
  if (finished(prob, cur)) return;  // block-uniform: an empty reduction leaves zeros
  prob.gather(cur, ra, rb);
  advance<TL::BK>(prob, cur);
  int stage = 0;
  M::scatter(base, ra, rb);
  M::before_barrier();
  __syncthreads();
  for (;;) {
    const bool more = !finished(prob, cur);
    if (more) {
      prob.gather(cur, ra, rb);
      advance<TL::BK>(prob, cur);
    }
    const T* st = base + stage * M::STAGE;
    M::mma(acc, st, st + M::A_SIZE);
    if (!more) {
      M::retire(acc);
      break;
    }
    stage ^= 1;
    // Safe: every thread retired its MMAs of the previous tile before the previous barrier,
    // so nobody still reads this stage.
    M::scatter(base + stage * M::STAGE, ra, rb);
    M::retire(acc);
    M::before_barrier();
    __syncthreads();
  }
}

// ================================ forward ====================================================
// Output segments: each non-empty frozen group (phase 0: w_frozen over channels [0, k_end);
// phase 1, coupled: w_couple over channels [I_f, I)), then the new group (phase 0: w_new over
// every channel).  blockIdx.y enumerates the segments' BN-wide channel tiles.
struct FwdParams {
  const void* x;
  void* y;
  const void* w_frozen;
  const void* w_new;
  const void* w_couple;  // null: isolated, or no new input channels
  const void* b_frozen;
  const void* b_new;
  const float* bn_scale;  // folded BatchNorm of the frozen channels, or null
  const float* bn_shift;
  Strides4 sx;
  int64_t pixels;   // N * Ho * Wo
  int64_t hw_out;   // Ho * Wo
  int64_t y_batch;  // (O_f + o_T) * Ho * Wo: y's batch stride
  ConvDims d;
  int in_ch, frozen_in, nseg, has_new;
  int seg_ch0[kMaxConvFrozenGroups + 1];   // first output channel (= row of w_frozen/w_couple)
  int seg_rows[kMaxConvFrozenGroups + 1];  // output channels of the segment
  int seg_kend[kMaxConvFrozenGroups + 1];  // input channels read through w_frozen / w_new
  int seg_tile0[kMaxConvFrozenGroups + 2]; // first blockIdx.y; [nseg] = total tiles
};

template <typename T>
struct FwdProblem {
  using TL = Tiles<T, Kind::kFwd>;
  using TA = typename TL::AMap;
  using TB = typename TL::BMap;
  const FwdParams& p;
  int tid, seg, n0;
  bool is_new;
  int64_t m0;
  // This thread's A pixel (fixed for the whole block).
  bool a_ok;
  int64_t a_base;
  int hi0, wi0;

  XF_HD FwdProblem(const FwdParams& params, int t, int64_t bx, int by) : p(params), tid(t) {
    seg = 0;
    while (seg + 1 < p.nseg && by >= p.seg_tile0[seg + 1]) ++seg;
    is_new = p.has_new && seg == p.nseg - 1;
    n0 = (by - p.seg_tile0[seg]) * TL::BN;
    m0 = bx * TL::BM;
    const int64_t m = m0 + TA::fast(tid);
    a_ok = m < p.pixels;
    const int64_t mm = a_ok ? m : 0;
    const int64_t img = mm / p.hw_out;
    const int64_t rem = mm - img * p.hw_out;
    const int ho = static_cast<int>(rem / p.d.Wo);
    const int wo = static_cast<int>(rem - static_cast<int64_t>(ho) * p.d.Wo);
    hi0 = ho * p.d.sh - p.d.ph;
    wi0 = wo * p.d.sw - p.d.pw;
    a_base = img * p.sx.n;
  }

  XF_HD int num_phases() const { return is_new ? 1 : 2; }
  XF_HD int phase_len(int ph) const {
    if (ph == 0) return p.seg_kend[seg] * p.d.KK;
    return p.w_couple != nullptr ? (p.in_ch - p.frozen_in) * p.d.KK : 0;
  }

  XF_HD void gather(const Cursor& cur, T (&ra)[TA::ELEMS], T (&rb)[TB::ELEMS]) const {
    const ConvDims& d = p.d;
    const T zero = from_f<T>(0.f);
    const int K = phase_len(cur.p);
    // A: im2col(x)[pixel, k], channels offset by I_f in the coupling phase.
    const T* x = static_cast<const T*>(p.x);
    const int c_off = cur.p == 0 ? 0 : p.frozen_in;
    int k = cur.k0 + TA::slow(tid, 0);
    KPos q = kpos(k, d.KK, d.KW);
#pragma unroll
    for (int i = 0; i < TA::ELEMS; ++i) {
      T v = zero;
      if (a_ok && k < K) {
        const int hi = hi0 + q.kh * d.dh, wi = wi0 + q.kw * d.dw;
        if (in_range(hi, d.H) && in_range(wi, d.W))
          v = x[a_base + static_cast<int64_t>(c_off + q.c) * p.sx.c +
                static_cast<int64_t>(hi) * p.sx.h + static_cast<int64_t>(wi) * p.sx.w];
      }
      ra[i] = v;
      k += TA::STEP;
      kstep(q, TA::STEP, d.KH, d.KW);
    }
    // B: weight rows of the segment, row-major (rows, channels * KK).
    const T* w;
    int64_t ld, row0;
    if (cur.p == 0) {
      w = static_cast<const T*>(is_new ? p.w_new : p.w_frozen);
      ld = static_cast<int64_t>(is_new ? p.in_ch : p.frozen_in) * d.KK;
      row0 = is_new ? 0 : p.seg_ch0[seg];
    } else {
      w = static_cast<const T*>(p.w_couple);
      ld = static_cast<int64_t>(p.in_ch - p.frozen_in) * d.KK;
      row0 = p.seg_ch0[seg];
    }
    const int kb = cur.k0 + TB::fast(tid);
    const int rows = p.seg_rows[seg];
#pragma unroll
    for (int i = 0; i < TB::ELEMS; ++i) {
      const int n = n0 + TB::slow(tid, i);
      rb[i] = (kb < K && n < rows) ? w[(row0 + n) * ld + kb] : zero;
    }
  }

  // Tile-relative output (m, n): bias, the folded BatchNorm of a frozen channel, convert,
  // write y[img, ch0 + n0 + n, ho, wo].
  XF_HD void store(int m, int n, float v) const {
    const int64_t mm = m0 + m;
    const int col = n0 + n;
    if (mm >= p.pixels || col >= p.seg_rows[seg]) return;
    const T* bias = static_cast<const T*>(is_new ? p.b_new : p.b_frozen);
    if (bias != nullptr) v += to_f(bias[is_new ? col : p.seg_ch0[seg] + col]);
    if (!is_new && p.bn_scale != nullptr) {
      const int c = p.seg_ch0[seg] + col;
      v = fmaf(v, p.bn_scale[c], p.bn_shift[c]);
    }
    const int64_t img = mm / p.hw_out;
    const int64_t rem = mm - img * p.hw_out;
    static_cast<T*>(p.y)[img * p.y_batch + static_cast<int64_t>(p.seg_ch0[seg] + col) * p.hw_out +
                         rem] = from_f<T>(v);
  }
};

template <typename T, class M>
__global__ void __launch_bounds__(256) conv_fwd_kernel(const __grid_constant__ FwdParams p) {
  __shared__ __align__(128) unsigned char smem[M::SMEM_BYTES];
  const FwdProblem<T> prob(p, threadIdx.x, blockIdx.x, blockIdx.y);
  typename M::Acc acc;
  mainloop<T, Kind::kFwd, M>(prob, acc, smem);
  __syncthreads();  // the epilogue scratch reuses the tile buffers
  M::store(acc, reinterpret_cast<float*>(smem),
           [&](int m, int n, float v) { prob.store(m, n, v); });
}

// ================================ input gradient ============================================
// Column (channel) tiles 0..old_tiles cover dx_old = channels [0, I_f) (in the bands of
// common::OldBands, cut at every k_end), the rest dx_new = [I_f, I).  Phases of an old tile:
// the new rows (w_new's old channels), then each frozen group g whose channels reach the tile
// (k_end[g] > c0: then past all it stores), masked at k_end[g]; none without need_old
// (the tile stores zeros).  Phases of a new tile: the new rows, then (coupled) every frozen row
// through w_couple.  The reduction index of a phase is j = (o * KH + kh) * KW + kw over its rows.
struct DxParams {
  const void* dy;
  void* dx;
  const void* w_frozen;
  const void* w_new;
  const void* w_couple;  // null: isolated, or no frozen rows, or no new input channels
  Strides4 sdy;
  int64_t pixels;    // N * H * W
  int64_t hw_in;     // H * W
  int64_t dx_batch;  // I * H * W
  ConvDims d;
  int in_ch, frozen_in, frozen_out, new_out, old_tiles, need_old, ngroups;
  int g_row0[kMaxConvFrozenGroups], g_rows[kMaxConvFrozenGroups], g_kend[kMaxConvFrozenGroups];
  common::OldBands<kMaxConvFrozenGroups> bands;
};

template <typename T>
struct DxProblem {
  using TL = Tiles<T, Kind::kDx>;
  using TA = typename TL::AMap;
  using TB = typename TL::BMap;
  const DxParams& p;
  int tid, c0, c_end;
  bool old;
  int64_t m0;
  bool a_ok;
  int64_t a_base;
  int h, w;

  XF_HD DxProblem(const DxParams& params, int t, int64_t bx, int by) : p(params), tid(t) {
    old = by < p.old_tiles;
    c0 = p.frozen_in + (by - p.old_tiles) * TL::BN;
    c_end = p.in_ch;
    if (old) p.bands.tile(by, TL::BN, c0, c_end);
    m0 = bx * TL::BM;
    const int64_t m = m0 + TA::fast(tid);
    a_ok = m < p.pixels;
    const int64_t mm = a_ok ? m : 0;
    const int64_t img = mm / p.hw_in;
    const int64_t rem = mm - img * p.hw_in;
    h = static_cast<int>(rem / p.d.W);
    w = static_cast<int>(rem - static_cast<int64_t>(h) * p.d.W);
    a_base = img * p.sdy.n;
  }

  XF_HD int num_phases() const {
    if (old) return p.need_old ? 1 + p.ngroups : 0;
    return 2;
  }
  XF_HD int phase_len(int ph) const {
    if (ph == 0) return p.new_out * p.d.KK;
    if (old) return p.g_kend[ph - 1] > c0 ? p.g_rows[ph - 1] * p.d.KK : 0;
    return p.w_couple != nullptr ? p.frozen_out * p.d.KK : 0;
  }

  XF_HD void gather(const Cursor& cur, T (&ra)[TA::ELEMS], T (&rb)[TB::ELEMS]) const {
    const ConvDims& d = p.d;
    const T zero = from_f<T>(0.f);
    const int K = phase_len(cur.p);
    // A: D[q, (o, kh, kw)] = dy[img, dy_c0 + o, ho, wo] where ho * sh - ph + kh * dh = h
    // (and the same along w).
    const int dy_c0 = cur.p == 0 ? p.frozen_out : (old ? p.g_row0[cur.p - 1] : 0);
    const T* dy = static_cast<const T*>(p.dy);
    int k = cur.k0 + TA::slow(tid, 0);
    KPos q = kpos(k, d.KK, d.KW);  // q.c is the output channel o
#pragma unroll
    for (int i = 0; i < TA::ELEMS; ++i) {
      T v = zero;
      if (a_ok && k < K) {
        const int th = h + d.ph - q.kh * d.dh, tw = w + d.pw - q.kw * d.dw;
        if (th >= 0 && tw >= 0) {
          const int ho = d.sh == 1 ? th : th / d.sh;  // stride 1: no division
          const int wo = d.sw == 1 ? tw : tw / d.sw;
          if (ho * d.sh == th && wo * d.sw == tw && ho < d.Ho && wo < d.Wo)
            v = dy[a_base + static_cast<int64_t>(dy_c0 + q.c) * p.sdy.c +
                   static_cast<int64_t>(ho) * p.sdy.h + static_cast<int64_t>(wo) * p.sdy.w];
        }
      }
      ra[i] = v;
      k += TA::STEP;
      kstep(q, TA::STEP, d.KH, d.KW);
    }
    // B: w[row0 + o, c - col_off, kh, kw] for channels c < lim.
    const T* wt;
    int64_t ld;
    int row0, col_off, lim;
    if (cur.p == 0) {
      wt = static_cast<const T*>(p.w_new);
      ld = static_cast<int64_t>(p.in_ch) * d.KK;
      row0 = 0;
      col_off = 0;
      lim = c_end;
    } else if (old) {
      const int g = cur.p - 1;
      wt = static_cast<const T*>(p.w_frozen);
      ld = static_cast<int64_t>(p.frozen_in) * d.KK;
      row0 = p.g_row0[g];
      col_off = 0;
      lim = p.g_kend[g] < c_end ? p.g_kend[g] : c_end;
    } else {
      wt = static_cast<const T*>(p.w_couple);
      ld = static_cast<int64_t>(p.in_ch - p.frozen_in) * d.KK;
      row0 = 0;
      col_off = p.frozen_in;
      lim = c_end;
    }
    const int kb = cur.k0 + TB::fast(tid);
    const int o = kb / d.KK;
    const int r = kb - o * d.KK;
    const int64_t row_base = static_cast<int64_t>(row0 + o) * ld + r;
#pragma unroll
    for (int i = 0; i < TB::ELEMS; ++i) {
      const int c = c0 + TB::slow(tid, i);
      rb[i] = (kb < K && c < lim) ? wt[row_base + static_cast<int64_t>(c - col_off) * d.KK] : zero;
    }
  }

  XF_HD void store(int m, int n, float v) const {
    const int64_t mm = m0 + m;
    const int c = c0 + n;
    if (mm >= p.pixels || c >= c_end) return;
    const int64_t img = mm / p.hw_in;
    const int64_t rem = mm - img * p.hw_in;
    static_cast<T*>(p.dx)[img * p.dx_batch + static_cast<int64_t>(c) * p.hw_in + rem] =
        from_f<T>(v);
  }
};

template <typename T, class M>
__global__ void __launch_bounds__(256) conv_dx_kernel(const __grid_constant__ DxParams p) {
  __shared__ __align__(128) unsigned char smem[M::SMEM_BYTES];
  const DxProblem<T> prob(p, threadIdx.x, blockIdx.x, blockIdx.y);
  typename M::Acc acc;
  mainloop<T, Kind::kDx, M>(prob, acc, smem);
  __syncthreads();
  M::store(acc, reinterpret_cast<float*>(smem),
           [&](int m, int n, float v) { prob.store(m, n, v); });
}

// ================================ weight gradient ===========================================
// out[o, (c, kh, kw)] = sum over output pixels of dy[img, dy_c0 + o, ho, wo] *
// x[img, x_c0 + c, ho * sh - ph + kh * dh, wo * sw - pw + kw * dw].  blockIdx.z splits the
// pixel range; a block's BN columns are decoded once into a shared table.
struct DwParams {
  const void* dy;
  const void* x;
  void* out;  // (m, n), contiguous; written directly when splits == 1
  float* ws;  // splits > 1: fp32 partials [splits][m][n]
  Strides4 sdy, sx;
  int64_t pixels;  // N * Ho * Wo
  int64_t hw_out;  // Ho * Wo
  int64_t pixels_per_split;
  ConvDims d;
  int dy_c0, x_c0, m, n, splits;  // n = n_ch * KK
};

struct DwCol {
  int64_t off;  // (x_c0 + c) * sx.c
  int hk, wk;   // kh * dh, kw * dw
};

XF_HD DwCol dw_col(const DwParams& p, int kk) {
  DwCol col{0, 0, 0};
  if (kk < 0 || kk >= p.n) return col;
  const KPos q = kpos(kk, p.d.KK, p.d.KW);
  col.off = static_cast<int64_t>(p.x_c0 + q.c) * p.sx.c;
  col.hk = q.kh * p.d.dh;
  col.wk = q.kw * p.d.dw;
  return col;
}

template <typename T>
struct DwProblem {
  using TL = Tiles<T, Kind::kDw>;
  using TA = typename TL::AMap;
  using TB = typename TL::BMap;
  static_assert(TA::STEP * TA::ELEMS == TL::BM && TB::STEP * TB::ELEMS == TL::BN,
                "A and B tiles walk the reduction (pixels) fastest");
  const DwParams& p;
  const DwCol* cols;  // BN entries for columns n0 .. n0 + BN
  int tid, m0, n0, split, len;
  int64_t r0;

  XF_HD DwProblem(const DwParams& params, const DwCol* table, int t, int bx, int by, int bz)
      : p(params), cols(table), tid(t) {
    m0 = bx * TL::BM;
    n0 = by * TL::BN;
    split = bz;
    r0 = static_cast<int64_t>(bz) * p.pixels_per_split;
    const int64_t left = p.pixels - r0;
    const int64_t l = left < p.pixels_per_split ? left : p.pixels_per_split;
    len = l > 0 ? static_cast<int>(l) : 0;
  }

  XF_HD int num_phases() const { return 1; }
  XF_HD int phase_len(int) const { return len; }

  XF_HD void gather(const Cursor& cur, T (&ra)[TA::ELEMS], T (&rb)[TB::ELEMS]) const {
    const ConvDims& d = p.d;
    const T zero = from_f<T>(0.f);
    const int kr = cur.k0 + TA::fast(tid);  // == TB::fast(tid): the same pixel for A and B
    const bool r_ok = kr < len;
    const int64_t r = r_ok ? r0 + kr : 0;
    const int64_t img = r / p.hw_out;
    const int64_t rem = r - img * p.hw_out;
    const int ho = static_cast<int>(rem / d.Wo);
    const int wo = static_cast<int>(rem - static_cast<int64_t>(ho) * d.Wo);
    // A: dy[img, dy_c0 + o, ho, wo]
    const T* dy = static_cast<const T*>(p.dy) + img * p.sdy.n +
                  static_cast<int64_t>(ho) * p.sdy.h + static_cast<int64_t>(wo) * p.sdy.w;
#pragma unroll
    for (int i = 0; i < TA::ELEMS; ++i) {
      const int o = m0 + TA::slow(tid, i);
      ra[i] = (r_ok && o < p.m) ? dy[static_cast<int64_t>(p.dy_c0 + o) * p.sdy.c] : zero;
    }
    // B: x at the tap of each column
    const T* x = static_cast<const T*>(p.x) + img * p.sx.n;
    const int hi0 = ho * d.sh - d.ph, wi0 = wo * d.sw - d.pw;
#pragma unroll
    for (int i = 0; i < TB::ELEMS; ++i) {
      const int j = TB::slow(tid, i);
      T v = zero;
      if (r_ok && n0 + j < p.n) {
        const DwCol col = cols[j];
        const int hi = hi0 + col.hk, wi = wi0 + col.wk;
        if (in_range(hi, d.H) && in_range(wi, d.W))
          v = x[col.off + static_cast<int64_t>(hi) * p.sx.h + static_cast<int64_t>(wi) * p.sx.w];
      }
      rb[i] = v;
    }
  }

  XF_HD void store(int m, int n, float v) const {
    const int o = m0 + m, kk = n0 + n;
    if (o >= p.m || kk >= p.n) return;
    const int64_t idx = static_cast<int64_t>(o) * p.n + kk;
    if (p.splits > 1)
      p.ws[static_cast<int64_t>(split) * p.m * p.n + idx] = v;
    else
      static_cast<T*>(p.out)[idx] = from_f<T>(v);
  }
};

template <typename T, class M>
__global__ void __launch_bounds__(256) conv_dw_kernel(const __grid_constant__ DwParams p) {
  using TL = Tiles<T, Kind::kDw>;
  __shared__ __align__(128) unsigned char smem[M::SMEM_BYTES];
  __shared__ DwCol cols[TL::BN];
  const int n0 = blockIdx.y * TL::BN;
  for (int j = threadIdx.x; j < TL::BN; j += TL::THREADS) cols[j] = dw_col(p, n0 + j);
  __syncthreads();
  const DwProblem<T> prob(p, cols, threadIdx.x, blockIdx.x, blockIdx.y, blockIdx.z);
  typename M::Acc acc;
  mainloop<T, Kind::kDw, M>(prob, acc, smem);
  __syncthreads();
  M::store(acc, reinterpret_cast<float*>(smem),
           [&](int m, int n, float v) { prob.store(m, n, v); });
}

// Sums the split partials in a fixed order (deterministic) and converts.
template <typename T>
__global__ void conv_split_sum_kernel(const float* ws, int splits, int64_t mn, T* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < mn;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < splits; ++k) s += ws[k * mn + i];
    out[i] = from_f<T>(s);
  }
}

// db[o] = sum of dy[:, dy_c0 + o] over batch and pixels: one block per channel, a fixed
// reduction tree (deterministic).
constexpr int kBiasThreads = 256;
template <typename T>
__global__ void __launch_bounds__(kBiasThreads)
conv_bias_grad_kernel(const T* dy, Strides4 s, int64_t total, int64_t hw, int Wo, int dy_c0,
                      T* db) {
  __shared__ float red[kBiasThreads];
  const int o = blockIdx.x;
  const T* base = dy + static_cast<int64_t>(dy_c0 + o) * s.c;
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < total; i += kBiasThreads) {
    const int64_t img = i / hw;
    const int64_t rem = i - img * hw;
    const int64_t ho = rem / Wo;
    const int64_t wo = rem - ho * Wo;
    acc += to_f(base[img * s.n + ho * s.h + wo * s.w]);
  }
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int width = kBiasThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) red[threadIdx.x] += red[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) db[o] = from_f<T>(red[0]);
}

// ================================ host side ==================================================
constexpr int64_t kMaxGridX = INT32_MAX;
constexpr int64_t kIndexLimit = int64_t{1} << 30;  // int32 index math with headroom

bool geometry_ok(const ConvGeometry& g) {
  if (g.batch < 0 || g.height < 0 || g.width < 0 || g.out_h < 0 || g.out_w < 0) return false;
  if (g.kernel_h < 1 || g.kernel_w < 1 || g.stride_h < 1 || g.stride_w < 1 || g.pad_h < 0 ||
      g.pad_w < 0 || g.dil_h < 1 || g.dil_w < 1)
    return false;
  if (g.height >= kIndexLimit || g.width >= kIndexLimit || g.pad_h >= kIndexLimit ||
      g.pad_w >= kIndexLimit ||
      static_cast<int64_t>(g.kernel_h) * g.kernel_w >= kIndexLimit ||
      static_cast<int64_t>(g.dil_h) * (g.kernel_h - 1) >= kIndexLimit ||
      static_cast<int64_t>(g.dil_w) * (g.kernel_w - 1) >= kIndexLimit)
    return false;
  // The output size must be the convolution's (the index math relies on it).
  const int64_t span_h =
      g.height + 2 * g.pad_h - static_cast<int64_t>(g.dil_h) * (g.kernel_h - 1) - 1;
  const int64_t span_w =
      g.width + 2 * g.pad_w - static_cast<int64_t>(g.dil_w) * (g.kernel_w - 1) - 1;
  if (span_h < 0 || span_w < 0) return false;
  if (g.out_h != span_h / g.stride_h + 1 || g.out_w != span_w / g.stride_w + 1) return false;
  if (static_cast<int64_t>(g.out_h) * g.stride_h >= kIndexLimit ||
      static_cast<int64_t>(g.out_w) * g.stride_w >= kIndexLimit)
    return false;
  // Pixel counts in int64 without overflow.
  if (g.batch > 0 && (g.height * g.width > INT64_MAX / 4 / g.batch ||
                      g.out_h * g.out_w > INT64_MAX / 4 / g.batch))
    return false;
  return true;
}

ConvDims dims_of(const ConvGeometry& g) {
  ConvDims d{};
  d.H = static_cast<int>(g.height);
  d.W = static_cast<int>(g.width);
  d.Ho = static_cast<int>(g.out_h);
  d.Wo = static_cast<int>(g.out_w);
  d.KH = g.kernel_h;
  d.KW = g.kernel_w;
  d.KK = g.kernel_h * g.kernel_w;
  d.sh = g.stride_h;
  d.sw = g.stride_w;
  d.ph = g.pad_h;
  d.pw = g.pad_w;
  d.dh = g.dil_h;
  d.dw = g.dil_w;
  return d;
}


// ---- launch parameters (host), kept apart from the launches so a host harness can drive the
// very same tile logic.  grid.x == 0: nothing to launch. -------------------------------------
template <typename T>
cudaError_t build_fwd(const ConvShape& s, const ConvWeights& w, const void* x, const Strides4& sx,
                      const void* b_frozen, const void* b_new, void* y, FwdParams& p,
                      dim3& grid) {
  grid = dim3(0, 0, 0);
  if (!conv_shape_ok(s)) return cudaErrorInvalidValue;
  const ConvGeometry& g = s.geo;
  const int64_t hw_out = g.out_h * g.out_w;
  const int64_t pixels = g.batch * hw_out;
  const int64_t outs = s.frozen_out + s.new_out;
  if (pixels == 0 || outs == 0) return cudaSuccess;
  // A weight is only dereferenced where its reduction range is non-empty.
  if ((x == nullptr && s.in_channels > 0) || y == nullptr ||
      (s.new_out > 0 && s.in_channels > 0 && w.w_new == nullptr))
    return cudaErrorInvalidValue;
  using TL = Tiles<T, Kind::kFwd>;
  const bool coupled = w.w_couple != nullptr && s.in_channels > s.frozen_in;
  p = FwdParams{};
  p.x = x;
  p.y = y;
  p.w_frozen = w.w_frozen;
  p.w_new = w.w_new;
  p.w_couple = coupled ? w.w_couple : nullptr;
  p.b_frozen = b_frozen;
  p.b_new = b_new;
  p.sx = sx;
  p.pixels = pixels;
  p.hw_out = hw_out;
  p.y_batch = outs * hw_out;
  p.d = dims_of(g);
  p.in_ch = static_cast<int>(s.in_channels);
  p.frozen_in = static_cast<int>(s.frozen_in);
  int64_t tiles = 0, ch0 = 0;
  int nseg = 0;
  for (int gi = 0; gi < s.num_frozen_groups; ++gi) {
    const int64_t rows = s.frozen_out_groups[gi];
    if (rows > 0) {
      if (w.w_frozen == nullptr && s.frozen_k_ends[gi] > 0) return cudaErrorInvalidValue;
      p.seg_ch0[nseg] = static_cast<int>(ch0);
      p.seg_rows[nseg] = static_cast<int>(rows);
      p.seg_kend[nseg] = static_cast<int>(s.frozen_k_ends[gi]);
      p.seg_tile0[nseg] = static_cast<int>(std::min<int64_t>(tiles, INT32_MAX));
      tiles += ceil_div(rows, TL::BN);
      ++nseg;
    }
    ch0 += rows;
  }
  if (s.new_out > 0) {
    p.seg_ch0[nseg] = static_cast<int>(s.frozen_out);
    p.seg_rows[nseg] = static_cast<int>(s.new_out);
    p.seg_kend[nseg] = static_cast<int>(s.in_channels);
    p.seg_tile0[nseg] = static_cast<int>(std::min<int64_t>(tiles, INT32_MAX));
    tiles += ceil_div(s.new_out, TL::BN);
    ++nseg;
    p.has_new = 1;
  }
  p.seg_tile0[nseg] = static_cast<int>(std::min<int64_t>(tiles, INT32_MAX));
  p.nseg = nseg;
  const int64_t gx = ceil_div(pixels, TL::BM);
  if (nseg == 0 || tiles > kMaxGridY || gx > kMaxGridX) return cudaErrorInvalidValue;
  grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(tiles), 1);
  return cudaSuccess;
}

template <typename T>
cudaError_t build_dx(const ConvShape& s, const ConvWeights& w, const void* dy,
                     const Strides4& sdy, bool need_dx_old, void* dx, DxParams& p, dim3& grid) {
  grid = dim3(0, 0, 0);
  if (!conv_shape_ok(s)) return cudaErrorInvalidValue;
  const ConvGeometry& g = s.geo;
  const int64_t hw_in = g.height * g.width;
  const int64_t pixels = g.batch * hw_in;
  if (pixels == 0 || s.in_channels == 0) return cudaSuccess;
  if (dy == nullptr || dx == nullptr || (s.new_out > 0 && w.w_new == nullptr) ||
      (need_dx_old && s.frozen_out > 0 && s.frozen_in > 0 && w.w_frozen == nullptr))
    return cudaErrorInvalidValue;
  using TL = Tiles<T, Kind::kDx>;
  const bool coupled = w.w_couple != nullptr && s.frozen_out > 0 && s.in_channels > s.frozen_in;
  p = DxParams{};
  p.dy = dy;
  p.dx = dx;
  p.w_frozen = w.w_frozen;
  p.w_new = w.w_new;
  p.w_couple = coupled ? w.w_couple : nullptr;
  p.sdy = sdy;
  p.pixels = pixels;
  p.hw_in = hw_in;
  p.dx_batch = s.in_channels * hw_in;
  p.d = dims_of(g);
  p.in_ch = static_cast<int>(s.in_channels);
  p.frozen_in = static_cast<int>(s.frozen_in);
  p.frozen_out = static_cast<int>(s.frozen_out);
  p.new_out = static_cast<int>(s.new_out);
  p.need_old = need_dx_old ? 1 : 0;
  p.ngroups = s.num_frozen_groups;
  int64_t r0 = 0;
  for (int gi = 0; gi < s.num_frozen_groups; ++gi) {
    p.g_row0[gi] = static_cast<int>(r0);
    p.g_rows[gi] = static_cast<int>(s.frozen_out_groups[gi]);
    p.g_kend[gi] = static_cast<int>(s.frozen_k_ends[gi]);
    r0 += s.frozen_out_groups[gi];
  }
  const int64_t old_tiles = p.bands.build(s.num_frozen_groups, s.frozen_k_ends, s.frozen_in,
                                          need_dx_old, TL::BN);
  const int64_t tiles = old_tiles + ceil_div(s.in_channels - s.frozen_in, TL::BN);
  const int64_t gx = ceil_div(pixels, TL::BM);
  if (tiles > kMaxGridY || gx > kMaxGridX) return cudaErrorInvalidValue;
  p.old_tiles = static_cast<int>(old_tiles);
  grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(tiles), 1);
  return cudaSuccess;
}


template <typename T>
cudaError_t build_dw(const ConvGeometry& geo, const void* dy, const Strides4& sdy, int64_t dy_c0,
                     int64_t m, const void* x, const Strides4& sx, int64_t x_c0, int64_t n_ch,
                     void* out, const ConvWeightGradPlan& plan, void* workspace, DwParams& p,
                     dim3& grid) {
  grid = dim3(0, 0, 0);
  if (!geometry_ok(geo)) return cudaErrorInvalidValue;
  const int64_t kk = static_cast<int64_t>(geo.kernel_h) * geo.kernel_w;
  if (m < 0 || n_ch < 0 || dy_c0 < 0 || x_c0 < 0 || m >= kIndexLimit ||
      n_ch * kk >= kIndexLimit || dy_c0 + m >= kIndexLimit || x_c0 + n_ch >= kIndexLimit)
    return cudaErrorInvalidValue;
  const int64_t n = n_ch * kk;
  const int64_t pixels = geo.batch * geo.out_h * geo.out_w;
  if (m == 0 || n == 0) return cudaSuccess;  // an empty dW: nothing to write
  if (out == nullptr || (pixels > 0 && (dy == nullptr || x == nullptr)) || plan.splits < 1 ||
      plan.pixels_per_split < 1 || plan.pixels_per_split > kIndexLimit + 64 ||
      plan.splits > kMaxGridY ||
      static_cast<int64_t>(plan.splits) * plan.pixels_per_split < pixels ||
      (plan.splits > 1 && (workspace == nullptr ||
                           plan.workspace_bytes < static_cast<size_t>(plan.splits) *
                                                      static_cast<size_t>(m * n) * sizeof(float))))
    return cudaErrorInvalidValue;
  using TL = Tiles<T, Kind::kDw>;
  p = DwParams{};
  p.dy = dy;
  p.x = x;
  p.out = out;
  p.ws = plan.splits > 1 ? static_cast<float*>(workspace) : nullptr;
  p.sdy = sdy;
  p.sx = sx;
  p.pixels = pixels;
  p.hw_out = geo.out_h * geo.out_w;
  p.pixels_per_split = plan.pixels_per_split;
  p.d = dims_of(geo);
  p.dy_c0 = static_cast<int>(dy_c0);
  p.x_c0 = static_cast<int>(x_c0);
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.splits = plan.splits;
  const int64_t gx = ceil_div(m, TL::BM), gy = ceil_div(n, TL::BN);
  if (gy > kMaxGridY || gx > kMaxGridX) return cudaErrorInvalidValue;
  grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
              static_cast<unsigned>(plan.splits));
  return cudaSuccess;
}

// Calls f(element, math) with the element type `dt` names and the tile math of GEMM kind K for
// this call: SIMT for fp32, wgmma where the build and the GPU have it (wgmma_enabled), else WMMA.
template <Kind K, class F>
cudaError_t dispatch_math(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{}, SimtMath<K>{});
    case DType::kFloat16:
      return wgmma_enabled(dt) ? f(__half{}, WgmmaMath<__half, K>{})
                               : f(__half{}, WmmaMath<__half, K>{});
    case DType::kBFloat16:
      return wgmma_enabled(dt) ? f(__nv_bfloat16{}, WgmmaMath<__nv_bfloat16, K>{})
                               : f(__nv_bfloat16{}, WmmaMath<__nv_bfloat16, K>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

bool conv_shape_ok(const ConvShape& s) {
  if (!geometry_ok(s.geo)) return false;
  const int64_t kk = static_cast<int64_t>(s.geo.kernel_h) * s.geo.kernel_w;
  if (s.in_channels < 0 || s.frozen_in < 0 || s.frozen_in > s.in_channels || s.frozen_out < 0 ||
      s.new_out < 0 || s.num_frozen_groups < 0 || s.num_frozen_groups > kMaxConvFrozenGroups)
    return false;
  if (s.in_channels * kk >= kIndexLimit || s.frozen_out * kk >= kIndexLimit ||
      s.new_out * kk >= kIndexLimit || s.frozen_out + s.new_out >= kIndexLimit)
    return false;
  if (s.num_frozen_groups > 0 && (s.frozen_out_groups == nullptr || s.frozen_k_ends == nullptr))
    return false;
  return frozen_groups_ok(s.num_frozen_groups, s.frozen_out_groups, s.frozen_k_ends,
                          s.frozen_in, s.frozen_out);
}

cudaError_t conv2d_forward(const ConvShape& s, const ConvWeights& w, const void* x,
                           const Strides4& sx, const void* b_frozen, const void* b_new,
                           const float* bn_scale, const float* bn_shift, void* y,
                           cudaStream_t stream) {
  if ((bn_scale == nullptr) != (bn_shift == nullptr)) return cudaErrorInvalidValue;
  return dispatch_math<Kind::kFwd>(s.dtype, [&](auto tag, auto math) -> cudaError_t {
    using T = decltype(tag);
    using M = decltype(math);
    FwdParams p{};
    dim3 grid;
    const cudaError_t err = build_fwd<T>(s, w, x, sx, b_frozen, b_new, y, p, grid);
    if (err != cudaSuccess || grid.x == 0) return err;
    p.bn_scale = bn_scale;
    p.bn_shift = bn_shift;
    conv_fwd_kernel<T, M><<<grid, Tiles<T, Kind::kFwd>::THREADS, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t conv2d_backward_input(const ConvShape& s, const ConvWeights& w, const void* dy,
                                  const Strides4& sdy, bool need_dx_old, void* dx,
                                  cudaStream_t stream) {
  return dispatch_math<Kind::kDx>(s.dtype, [&](auto tag, auto math) -> cudaError_t {
    using T = decltype(tag);
    using M = decltype(math);
    DxParams p{};
    dim3 grid;
    const cudaError_t err = build_dx<T>(s, w, dy, sdy, need_dx_old, dx, p, grid);
    if (err != cudaSuccess || grid.x == 0) return err;
    conv_dx_kernel<T, M><<<grid, Tiles<T, Kind::kDx>::THREADS, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

ConvWeightGradPlan plan_conv_weight_grad(DType dtype, int64_t pixels, int64_t m, int64_t n_ch,
                                         int kernel_area, int num_sms) {
  const bool f32 = dtype == DType::kFloat32;
  const int bm = f32 ? Tiles<float, Kind::kDw>::BM : Tiles<__half, Kind::kDw>::BM;
  const int bn = f32 ? Tiles<float, Kind::kDw>::BN : Tiles<__half, Kind::kDw>::BN;
  const int bk = f32 ? Tiles<float, Kind::kDw>::BK : Tiles<__half, Kind::kDw>::BK;
  const int64_t n = n_ch * std::max(kernel_area, 1);
  ConvWeightGradPlan plan{1, std::max<int64_t>(pixels, 1), 0};
  if (m <= 0 || n <= 0 || pixels <= 0) return plan;
  // A block's pixel count is an int: split at least this often.
  const int64_t min_splits = ceil_div(pixels, kIndexLimit);
  const int64_t tiles = ceil_div(m, bm) * ceil_div(n, bn);
  const int64_t ktiles = ceil_div(pixels, bk);
  // Split the reduction only while the output tiles leave SMs idle, keeping >= 8 k-tiles each.
  int64_t want =
      tiles >= num_sms ? 1 : ceil_div(2 * static_cast<int64_t>(std::max(num_sms, 1)), tiles);
  want = std::min<int64_t>({want, ktiles / 8, 64});
  want = std::max<int64_t>(want, min_splits);
  if (want <= 1) return plan;
  plan.pixels_per_split = ceil_div(ktiles, want) * bk;
  plan.splits = static_cast<int>(ceil_div(pixels, plan.pixels_per_split));
  if (plan.splits <= 1) return ConvWeightGradPlan{1, pixels, 0};
  plan.workspace_bytes = static_cast<size_t>(plan.splits) * static_cast<size_t>(m) *
                         static_cast<size_t>(n) * sizeof(float);
  return plan;
}

cudaError_t conv2d_weight_grad(DType dtype, const ConvGeometry& geo, const void* dy,
                               const Strides4& sdy, int64_t dy_c0, int64_t m, const void* x,
                               const Strides4& sx, int64_t x_c0, int64_t n_ch, void* out,
                               const ConvWeightGradPlan& plan, void* workspace,
                               cudaStream_t stream) {
  return dispatch_math<Kind::kDw>(dtype, [&](auto tag, auto math) -> cudaError_t {
    using T = decltype(tag);
    using M = decltype(math);
    DwParams p{};
    dim3 grid;
    cudaError_t err = build_dw<T>(geo, dy, sdy, dy_c0, m, x, sx, x_c0, n_ch, out, plan,
                                  workspace, p, grid);
    if (err != cudaSuccess || grid.x == 0) return err;
    conv_dw_kernel<T, M><<<grid, Tiles<T, Kind::kDw>::THREADS, 0, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess || p.splits == 1) return err;
    const int64_t mn = static_cast<int64_t>(p.m) * p.n;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(mn, 256), 4096));
    conv_split_sum_kernel<T><<<blocks, 256, 0, stream>>>(p.ws, p.splits, mn,
                                                          static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t conv2d_bias_grad(DType dtype, const ConvGeometry& geo, const void* dy,
                             const Strides4& sdy, int64_t dy_c0, int64_t m, void* db,
                             cudaStream_t stream) {
  if (!geometry_ok(geo) || m < 0 || dy_c0 < 0 || m > kMaxGridX || dy_c0 + m >= kIndexLimit)
    return cudaErrorInvalidValue;
  if (m == 0) return cudaSuccess;
  if (db == nullptr) return cudaErrorInvalidValue;
  const int64_t hw = geo.out_h * geo.out_w;
  const int64_t total = geo.batch * hw;
  return dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    conv_bias_grad_kernel<T><<<static_cast<unsigned>(m), kBiasThreads, 0, stream>>>(
        static_cast<const T*>(dy), sdy, total, std::max<int64_t>(hw, 1),
        static_cast<int>(std::max<int64_t>(geo.out_w, 1)), static_cast<int>(dy_c0),
        static_cast<T*>(db));
    return cudaGetLastError();
  });
}

}  // namespace expanse_fast
