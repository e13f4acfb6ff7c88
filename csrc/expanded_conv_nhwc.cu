// The expanded conv2d's forward, input gradient and weight gradients for NHWC activations
// (fp16/bf16, fp32): implicit GEMMs on the linear kernels' pipeline (gemm_pipeline.cuh:
// 16-byte cp.async copies, the staged write-outs).  fp16/bf16 on an sm_90a build: wgmma on
// 128 x 128 x 64 tiles, or 128 x 64 and 64 x 256 where those would idle less (NhwcNarrowMath,
// NhwcShortMath), four stages; elsewhere (or EXPANSE_FAST_CUDA_WGMMA=0) the linear kernels'
// portable WMMA math, 128 x 128 x 32 tiles, two stages.  fp32: their SIMT math, 64 x 64 x 16
// tiles.  A 16-byte chunk is 8 channels of fp16/bf16, 4 of fp32.  The forward first; the
// gradients below say their own GEMMs.
//
//   y[p, o] = sum_j X[p, j] w[o, j]      p = (n, ho, wo): output pixel, row of the GEMM
//                                        j = (kh, kw, c): tap-major, channel innermost
// In NHWC the channels of one input pixel are contiguous, so the im2col row of p is, tap by tap,
// a run of contiguous channels: a 16-byte chunk (8 channels) is one cp.async from x, or zeros
// where the tap falls in the padding.  The weights are read as (rows, KH, KW, channels)
// (channels_last weights), so B's chunks are contiguous too.  The output y (n, ho, wo, o) is
// the linear layer's (pixels, O) row-major y: the staged tile leaves by rows in 16-byte chunks.
//
// The phases are those of the NCHW kernels: a frozen output group reads channels [0, k_end)
// through w_frozen and, coupled, [I_f, I) through w_couple; the new rows read every channel.
// A chunk never straddles two taps: every channel count a phase reads is a multiple of 8
// (conv2d_forward_nhwc_ok).  Other shapes take expanded_conv_kernels.cu; NCHW activations
// come here as channels_last copies (bindings.cpp), which cost a fraction of what the NCHW
// kernels' pixel-by-pixel gathers do.
#include "expanded_conv.h"
#include "gemm_pipeline.cuh"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

namespace expanse_fast {
namespace {

// The tile maths.  Wide: 128 x 128, two warpgroups of m64n128k16 (conv layers are narrower
// than linear ones, so BN = 256 would leave more of each new group's tile idle).  Where an
// extent would leave much of its last wide tile idle (a 64-channel new group: half of it),
// narrow tiles: 128 x 64 for a forward segment's or dx's columns, 64 x 256 for the rows of
// a weight gradient (its two warpgroups side by side, each m64n128k16 as the wide tile's).
template <typename T>
using NhwcMath = WgmmaMath<T, false, 64, 4, 128>;
template <typename T>
using NhwcNarrowMath = WgmmaMath<T, false, 64, 4, 64>;
template <typename T>
using NhwcShortMath = WgmmaMath<T, false, 64, 4, 256, 64>;
// The portable maths (any sm_80+ GPU): one tile for every product, WMMA for fp16/bf16, SIMT
// FMA for fp32.
template <typename T>
using NhwcWmmaMath = WmmaMath<T>;
template <typename T>
using NhwcPortableMath =
    std::conditional_t<std::is_same<T, float>::value, SimtMath, NhwcWmmaMath<T>>;

// Whether tiles computing `narrow` cells pay against wide ones computing `wide` for the same
// outputs: at least a quarter fewer (a narrow tile moves more operand bytes a multiply-add).
// EXPANSE_FAST_CUDA_CONV_NARROW=0 keeps every product on the wide tiles (the GPU run times
// both).  (A weight gradient's plan and launch each ask; any plan suits either tile: its
// splits are whole 64-pixel k-tiles and its workspace [splits][m][n].)
inline bool narrow_pays(int64_t narrow, int64_t wide) {
  const char* env = std::getenv("EXPANSE_FAST_CUDA_CONV_NARROW");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  return narrow * 4 <= wide * 3;
}
// The tile width of an output segment of `rows` channels (the forward).
inline int nhwc_seg_bn(int64_t rows) {
  return narrow_pays(ceil_div(rows, 64) * 64, ceil_div(rows, 128) * 128) ? 64 : 128;
}
// Whether a weight gradient of m rows and n columns takes the 64 x 256 tiles.
inline bool nhwc_dw_short(int64_t m, int64_t n) {
  return narrow_pays(ceil_div(m, 64) * 64 * ceil_div(n, 256) * 256,
                     ceil_div(m, 128) * 128 * ceil_div(n, 128) * 128);
}

// n / d for 0 <= n < 2^31 by a multiply and a shift (Hacker's Delight, 10-9), d >= 1.
struct FastDiv {
  uint32_t d, mul, shift;
  __host__ __device__ static FastDiv of(uint32_t d) {
    uint32_t shift = 0;
    while ((uint64_t{1} << shift) < d) ++shift;
    const uint64_t mul = ((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1;
    return {d, static_cast<uint32_t>(mul), shift};
  }
  __host__ __device__ uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t t = __umulhi(n, mul);
#else
    const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(n) * mul) >> 32);
#endif
    return (t + n) >> shift;
  }
};

// One phase of a segment: weight rows (rows, KH, KW, cw) starting at the segment's first row;
// the phase reads channels [0, cp) of each tap of them, against x's channels [c_off, c_off + cp).
struct NhwcPhase {
  const void* w;
  int cw, cp, c_off;
  FastDiv by_cp;  // (a reduction index's tap: j / cp)
};

// One output segment (an output group): channels [col0, col0 + rows) of y.
struct NhwcSeg {
  NhwcPhase ph[2];       // ph[1].cp == 0: no second phase (new group, isolated layout)
  const void* bias;      // may be null; starts at the segment's first channel
  const float* bn_scale;  // folded BatchNorm of a frozen segment, or null
  const float* bn_shift;
  int col0, rows, tile0;
};

// Frozen groups a launch carries: few enough that the parameters stay within the classic
// 4 KB of kernel arguments (more groups take the NCHW kernels).
constexpr int kNhwcMaxFrozenGroups = 32;

struct NhwcFwdParams {
  const void* x;
  void* y;
  int64_t sxn, sxh, sxw;  // x's element strides (the channel stride is 1)
  int64_t pixels, hw_out, ld_y;
  int H, W, Wo, KW, KK, sh, sw, ph, pw, dh, dw;
  FastDiv by_kw;
  int nseg;
  NhwcSeg seg[kNhwcMaxFrozenGroups + 1];
};
static_assert(sizeof(NhwcFwdParams) <= 4096, "within the classic kernel-argument limit");

// 0 <= v < n in one unsigned compare.
__host__ __device__ __forceinline__ bool inside(int v, int n) {
  return static_cast<unsigned>(v) < static_cast<unsigned>(n);
}

// For each of a thread's A chunks: an offset into the activation and a pixel (h, w).
template <int N>
struct PixelRows {
  int64_t off[N];
  int h[N], w[N];
};

// A block's problem, seen by one thread (tid): its output tile, and for each of its A chunks
// the pixel that chunk's row is (the same rows every k-tile: CoreSmem::a_chunk).
template <typename T, class L>
struct NhwcFwdProblem {
  const NhwcFwdParams& p;
  const NhwcSeg& s;
  int64_t m0;
  int n0, tid;
  PixelRows<L::A_CHUNKS> rows;  // off: x offset of the row's pixel at tap (0, 0), may lie
                                // outside; h, w: its top-left input pixel (past the end: h < 0)

  __host__ __device__ NhwcFwdProblem(const NhwcFwdParams& params, const NhwcSeg& seg,
                                     int64_t m0_, int n0_, int tid_)
      : p(params), s(seg), m0(m0_), n0(n0_), tid(tid_) {
#pragma unroll
    for (int i = 0; i < L::A_CHUNKS; ++i) {
      int row, col;
      L::a_chunk(tid, i, row, col);
      const int64_t m = m0 + row;
      const int64_t img = m / p.hw_out, rem = m - img * p.hw_out;
      const int ho = static_cast<int>(rem / p.Wo), wo = static_cast<int>(rem - ho * p.Wo);
      rows.h[i] = m < p.pixels ? ho * p.sh - p.ph : -(1 << 30);
      rows.w[i] = wo * p.sw - p.pw;
      rows.off[i] = img * p.sxn + static_cast<int64_t>(rows.h[i]) * p.sxh +
                    static_cast<int64_t>(rows.w[i]) * p.sxw;
    }
  }

  __host__ __device__ int num_phases() const { return 2; }
  __host__ __device__ int phase_len(int ph) const { return p.KK * s.ph[ph].cp; }

  // The tap and channel of reduction index j of phase ph (j < phase_len).
  __host__ __device__ void tap_of(int ph, int j, int& kh, int& kw, int& c) const {
    const NhwcPhase& f = s.ph[ph];
    const int tap = static_cast<int>(f.by_cp.div(static_cast<uint32_t>(j)));
    c = j - tap * f.cp;
    kh = static_cast<int>(p.by_kw.div(static_cast<uint32_t>(tap)));
    kw = tap - kh * p.KW;
  }

  // A's k-tile at k0: every chunk of this thread shares its column (chunk_of), so its tap and
  // channel are found once a tile.  (It holds its rows by value: a pointer back to the
  // problem put the problem in local memory.)
  struct ASrc {
    const T* x;
    const T* at;  // x at the column's channel and tap, before the row's pixel offset
    PixelRows<L::A_CHUNKS> rows;
    int dkh, dkw;  // the tap's offset from the row's top-left input pixel
    int H, W;
    bool k_ok;
    __host__ __device__ const T* base() const { return x; }
    __host__ __device__ const T* chunk(int i, int, int) const {
      const int hi = rows.h[i] + dkh, wi = rows.w[i] + dkw;
      if (!k_ok || !inside(hi, H) || !inside(wi, W)) return nullptr;
      return at + rows.off[i];
    }
  };
  __host__ __device__ ASrc tile_a(int ph, int k0) const {
    int row, col;
    L::a_chunk(tid, 0, row, col);
    const int j = k0 + col;
    ASrc a{static_cast<const T*>(p.x), nullptr, rows, 0, 0, p.H, p.W, j < phase_len(ph)};
    int kh = 0, kw = 0, c = 0;
    if (a.k_ok) tap_of(ph, j, kh, kw, c);
    a.dkh = kh * p.dh;
    a.dkw = kw * p.dw;
    a.at = static_cast<const T*>(p.x) + s.ph[ph].c_off + c + a.dkh * p.sxh + a.dkw * p.sxw;
    return a;
  }

  // B's k-tile at k0: rows are the segment's output channels n0 + row.
  struct BSrc {
    const T* at;  // the segment's row n0 at the column's tap and channel
    const T* w;
    int64_t ld;   // elements between weight rows
    int rows_left;
    bool k_ok;
    __host__ __device__ const T* base() const { return w; }
    __host__ __device__ const T* chunk(int, int row, int) const {
      return k_ok && row < rows_left ? at + row * ld : nullptr;
    }
  };
  __host__ __device__ BSrc tile_b(int ph, int k0) const {
    int row, col;
    L::b_chunk(tid, 0, row, col);
    const NhwcPhase& f = s.ph[ph];
    const int j = k0 + col;
    const int64_t ld = static_cast<int64_t>(p.KK) * f.cw;
    BSrc b{nullptr, static_cast<const T*>(f.w), ld, s.rows - n0, j < phase_len(ph)};
    int kh = 0, kw = 0, c = 0;
    if (b.k_ok) tap_of(ph, j, kh, kw, c);
    b.at = b.w + n0 * ld + static_cast<int64_t>(kh * p.KW + kw) * f.cw + c;
    return b;
  }
};

// Block b of a grid_x x grid_y launch, thread tid: its segment and output tile.
template <typename T, class M, class L>
__host__ __device__ __forceinline__ NhwcFwdProblem<T, L> nhwc_fwd_problem(
    const NhwcFwdParams& p, int64_t b, int64_t grid_x, int64_t grid_y, int tid) {
  const GridTile t = grouped_tile(b, grid_x, grid_y, kGroupM);
  int si = 0;
  while (si + 1 < p.nseg && p.seg[si + 1].tile0 <= t.n) ++si;
  return NhwcFwdProblem<T, L>(p, p.seg[si], t.m * M::BM, (t.n - p.seg[si].tile0) * M::BN, tid);
}

// The write-out of a block's tile (thread tid), staged as fp32 [BM][OUT_LD_F32]: bias, then the
// folded BatchNorm of a frozen segment, one rounding to T, 16-byte stores along the channels.
template <typename T, class M>
__host__ __device__ __forceinline__ void nhwc_fwd_write_out(const NhwcFwdParams& p,
                                                            const NhwcSeg& s,
                                                            const float* staged, int64_t m0,
                                                            int n0, int tid) {
  constexpr int VEC = 16 / sizeof(T);
  const int rows = tile_extent(p.pixels - m0, M::BM), cols = tile_extent(s.rows - n0, M::BN);
  const T* bias = s.bias == nullptr ? nullptr : static_cast<const T*>(s.bias) + n0;
  const float* scale = s.bn_scale == nullptr ? nullptr : s.bn_scale + n0;
  const float* shift = s.bn_shift == nullptr ? nullptr : s.bn_shift + n0;
  write_f32_tile_rows<T, M::BM, M::BN, M::THREADS>(
      staged, M::OUT_LD_F32, static_cast<T*>(p.y),
      {m0 * p.ld_y + s.col0 + n0, p.ld_y, rows, 0, cols}, tid,
      [&](int, int c, float(&v)[VEC]) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (c + e >= cols) break;
          if (bias != nullptr) v[e] += to_f(bias[c + e]);
          if (scale != nullptr) v[e] = fmaf(v[e], scale[c + e], shift[c + e]);
        }
      });
}

template <typename T, class M>
__global__ void __launch_bounds__(M::THREADS, M::MIN_BLOCKS)
conv_nhwc_fwd_kernel(const __grid_constant__ NhwcFwdParams p) {
  using L = typename M::template Layout<true, true>;
  extern __shared__ __align__(1024) unsigned char smem[];
  const NhwcFwdProblem<T, L> prob =
      nhwc_fwd_problem<T, M, L>(p, block_index(), gridDim.x, gridDim.y, threadIdx.x);
  nhwc_fwd_write_out<T, M>(p, prob.s, gemm_staged_f32<T, M, L>(prob, smem), prob.m0, prob.n0,
                          threadIdx.x);
}

// ================================ input gradient (NHWC dy and dx) ============================
//   dx[q, c] = sum_j D[q, j] wt[c, j]     q: input pixel, row of the GEMM
//                                         j = (tap, o): tap-major, output channel innermost
// D[q, (tap, o)] = dy[n, ho, wo, o] for the output pixel (ho, wo) that reads q through the
// tap, zero where it falls outside dy; 8 output channels of one pixel are one cp.async.  wt is
// each weight transposed to (channels, KH, KW, rows).
// Stride phases: with stride (sh, sw), input row h is read by tap kh only where
// (h + ph - kh * dh) % sh == 0, so the pixels of one residue (h % sh, w % sw) share their
// taps.  The rows of the GEMM go phase by phase (the pixels of residue (rh, rw): image n,
// phase row hh, column ww at h = hh * sh + rh, w = ww * sw + rw), and a phase's reduction
// runs over its own taps only: at stride 2 a 3 x 3 kernel's 4, 2, 2 or 1 of 9, where
// otherwise three quarters of the products would be zeros.  Then ho = hh + (rh + ph -
// kh * dh) / sh exactly (no division per chunk).  At stride 1: one phase, every tap.
// Column tiles and phases as the NCHW kernel's (expanded_conv_kernels.cu): tiles 0..old_tiles
// cover dx_old = channels [0, I_f) in the bands of common::OldBands (cut at every k_end); an
// old tile multiplies the new rows, then each frozen group that reaches it, masked at its
// k_end (none without need_old: the tile stores zeros); a new tile the new rows, then
// (coupled) every frozen row through w_couple.  Every row count a phase reads (o_T, each
// frozen group's, O_f) is a multiple of 8, so a chunk never straddles two taps.
constexpr int kNhwcMaxStride = 8, kNhwcMaxKernel = 16;  // (larger: the NCHW kernels)

struct NhwcDxParams {
  const void* dy;
  void* dx;
  const void* wt_frozen;  // (I_f, KH, KW, O_f)
  const void* wt_new;     // (I, KH, KW, o_T)
  const void* wt_couple;  // (I - I_f, KH, KW, O_f), or null
  int64_t sdyn, sdyh, sdyw;  // dy's element strides (the channel stride is 1)
  int64_t batch;
  int H, W, Ho, Wo, KW, KK, sh, sw;
  int in_ch, frozen_in, frozen_out, new_out, old_tiles, need_old, ngroups;
  int g_row0[kNhwcMaxFrozenGroups], g_rows[kNhwcMaxFrozenGroups], g_kend[kNhwcMaxFrozenGroups];
  common::OldBands<kNhwcMaxFrozenGroups> bands;
  // a reduction index's tap (j / rows) in each phase
  FastDiv by_new_out, by_frozen_out, by_g_rows[kNhwcMaxFrozenGroups];
  // The stride phases, rh * sw + rw: the phase rows of residue rh (rows_h) and columns of rw
  // (cols_w), a phase's first row tile (row_tile0; one past the last at stride_phases), and
  // the taps that reach it: kh_of[rh][0 .. nkh[rh]) x kw_of[rw][0 .. nkw[rw]), each with its
  // offset (rh + ph - kh * dh) / sh from the phase row (oh_of, ow_of).
  int stride_phases;
  int rows_h[kNhwcMaxStride], cols_w[kNhwcMaxStride];
  int64_t row_tile0[kNhwcMaxStride * kNhwcMaxStride + 1];
  int8_t nkh[kNhwcMaxStride], nkw[kNhwcMaxStride];
  int8_t kh_of[kNhwcMaxStride][kNhwcMaxKernel], kw_of[kNhwcMaxStride][kNhwcMaxKernel];
  int8_t oh_of[kNhwcMaxStride][kNhwcMaxKernel], ow_of[kNhwcMaxStride][kNhwcMaxKernel];
  FastDiv by_nkw[kNhwcMaxStride];  // a phase tap's (kh, kw) indices
};
static_assert(sizeof(NhwcDxParams) <= 4096, "within the classic kernel-argument limit");

// A phase-local row i of phase (rh, rw): its image, phase row and column.
__host__ __device__ __forceinline__ void nhwc_dx_row(const NhwcDxParams& p, int rh, int rw,
                                                     int64_t i, int64_t& img, int& hh,
                                                     int& ww) {
  const int64_t hw = static_cast<int64_t>(p.rows_h[rh]) * p.cols_w[rw];
  img = i / hw;
  const int64_t rem = i - img * hw;
  hh = static_cast<int>(rem / p.cols_w[rw]);
  ww = static_cast<int>(rem - static_cast<int64_t>(hh) * p.cols_w[rw]);
}

template <typename T, class L>
struct NhwcDxProblem {
  const NhwcDxParams& p;
  int64_t m0, rows_in_phase;  // the tile's first phase-local row; the phase's row count
  int rh, rw, c0, c_end, tid;
  bool old;
  PixelRows<L::A_CHUNKS> rows;  // off: dy offset of the row's image; h, w: its phase row and
                                // column (rows past the phase's end: h < 0)

  __host__ __device__ NhwcDxProblem(const NhwcDxParams& params, int64_t tile_m, int by, int bn,
                                    int bm, int tid_)
      : p(params), tid(tid_) {
    int sp = 0;  // the stride phase (the main loop's phases are the reduction's segments)
    while (sp + 1 < p.stride_phases && p.row_tile0[sp + 1] <= tile_m) ++sp;
    rh = sp / p.sw;
    rw = sp - rh * p.sw;
    m0 = (tile_m - p.row_tile0[sp]) * bm;
    rows_in_phase = p.batch * p.rows_h[rh] * p.cols_w[rw];
    old = by < p.old_tiles;
    c0 = p.frozen_in + (by - p.old_tiles) * bn;
    c_end = p.in_ch;
    if (old) p.bands.tile(by, bn, c0, c_end);
#pragma unroll
    for (int i = 0; i < L::A_CHUNKS; ++i) {
      int row, col;
      L::a_chunk(tid, i, row, col);
      int64_t img = 0;
      int hh = 0, ww = 0;
      if (m0 + row < rows_in_phase) nhwc_dx_row(p, rh, rw, m0 + row, img, hh, ww);
      rows.h[i] = m0 + row < rows_in_phase ? hh : -(1 << 30);
      rows.w[i] = ww;
      rows.off[i] = img * p.sdyn;
    }
  }

  __host__ __device__ int num_phases() const {
    if (old) return p.need_old ? 1 + p.ngroups : 0;
    return 2;
  }
  // Rows (output channels) phase ph reads; its reduction is as many times as long as the
  // stride phase has taps.
  __host__ __device__ int phase_rows(int ph) const {
    if (ph == 0) return p.new_out;
    if (old) return p.g_kend[ph - 1] > c0 ? p.g_rows[ph - 1] : 0;
    return p.wt_couple != nullptr ? p.frozen_out : 0;
  }
  __host__ __device__ int taps() const { return p.nkh[rh] * p.nkw[rw]; }
  __host__ __device__ int phase_len(int ph) const { return taps() * phase_rows(ph); }
  // Reduction index j of phase ph as its tap and row: j = t * rows + o, t the stride phase's
  // tap (ih, iw): kh = kh_of[rh][ih], kw = kw_of[rw][iw].
  __host__ __device__ void tap_of(int ph, int j, int& ih, int& iw, int& o) const {
    const FastDiv& by = ph == 0 ? p.by_new_out : (old ? p.by_g_rows[ph - 1] : p.by_frozen_out);
    const int t = static_cast<int>(by.div(static_cast<uint32_t>(j)));
    o = j - t * static_cast<int>(by.d);
    ih = static_cast<int>(p.by_nkw[rw].div(static_cast<uint32_t>(t)));
    iw = t - ih * p.nkw[rw];
  }

  // A's k-tile: every chunk of this thread shares its column, hence its tap and channel.
  // (Rows by value, as in the forward.)
  struct ASrc {
    const T* dy;
    const T* at;  // dy at the column's output channel
    PixelRows<L::A_CHUNKS> rows;
    int oh, ow;   // the tap's offset: ho = hh + oh, wo = ww + ow
    int Ho, Wo;
    int64_t sdyh, sdyw;
    bool k_ok;
    __host__ __device__ const T* base() const { return dy; }
    __host__ __device__ const T* chunk(int i, int, int) const {
      const int ho = rows.h[i] + oh, wo = rows.w[i] + ow;
      if (!k_ok || !inside(ho, Ho) || !inside(wo, Wo)) return nullptr;
      return at + rows.off[i] + ho * sdyh + wo * sdyw;
    }
  };
  __host__ __device__ ASrc tile_a(int ph, int k0) const {
    int row, col;
    L::a_chunk(tid, 0, row, col);
    const int j = k0 + col;
    const T* dy = static_cast<const T*>(p.dy);
    ASrc a{dy, dy, rows, 0, 0, p.Ho, p.Wo, p.sdyh, p.sdyw, j < phase_len(ph)};
    if (!a.k_ok) return a;
    int ih, iw, o;
    tap_of(ph, j, ih, iw, o);
    const int dy_c0 = ph == 0 ? p.frozen_out : (old ? p.g_row0[ph - 1] : 0);
    a.at += dy_c0 + o;
    a.oh = p.oh_of[rh][ih];
    a.ow = p.ow_of[rw][iw];
    return a;
  }

  // B's k-tile: rows are the tile's input channels c0 + row, masked at lim.
  struct BSrc {
    const T* at;  // wt at channel c0 and the column's tap and row
    const T* w;
    int64_t ld;   // elements between the channels of wt
    int lim;      // channels past c0 that are read
    bool k_ok;
    __host__ __device__ const T* base() const { return w; }
    __host__ __device__ const T* chunk(int, int row, int) const {
      return k_ok && row < lim ? at + row * ld : nullptr;
    }
  };
  __host__ __device__ BSrc tile_b(int ph, int k0) const {
    int row, col;
    L::b_chunk(tid, 0, row, col);
    const int j = k0 + col;
    const T* wt;
    int total_rows, row0, col_off, lim;
    if (ph == 0) {
      wt = static_cast<const T*>(p.wt_new), total_rows = p.new_out, row0 = 0, col_off = 0;
      lim = c_end;
    } else if (old) {
      const int g = ph - 1;
      wt = static_cast<const T*>(p.wt_frozen), total_rows = p.frozen_out, row0 = p.g_row0[g];
      col_off = 0;
      lim = p.g_kend[g] < c_end ? p.g_kend[g] : c_end;
    } else {
      wt = static_cast<const T*>(p.wt_couple), total_rows = p.frozen_out, row0 = 0;
      col_off = p.frozen_in;
      lim = c_end;
    }
    const int64_t ld = static_cast<int64_t>(p.KK) * total_rows;
    BSrc b{wt, wt, ld, lim - c0, j < phase_len(ph)};
    if (!b.k_ok) return b;
    int ih, iw, o;
    tap_of(ph, j, ih, iw, o);
    const int tap = p.kh_of[rh][ih] * p.KW + p.kw_of[rw][iw];
    b.at = wt + (c0 - col_off) * ld + static_cast<int64_t>(tap) * total_rows + row0 + o;
    return b;
  }
  // The offset in dx of the tile's row m (its pixel's first channel).
  __host__ __device__ int64_t dx_row_at(int m) const {
    int64_t img;
    int hh, ww;
    nhwc_dx_row(p, rh, rw, m0 + m, img, hh, ww);
    const int64_t h = static_cast<int64_t>(hh) * p.sh + rh;
    const int64_t w = static_cast<int64_t>(ww) * p.sw + rw;
    return ((img * p.H + h) * p.W + w) * p.in_ch;
  }
};

template <typename T, class M, class L>
__host__ __device__ __forceinline__ NhwcDxProblem<T, L> nhwc_dx_problem(const NhwcDxParams& p,
                                                                       int64_t b, int64_t grid_x,
                                                                       int64_t grid_y, int tid) {
  const GridTile t = grouped_tile(b, grid_x, grid_y, kGroupM);
  return NhwcDxProblem<T, L>(p, t.m, t.n, M::BN, M::BM, tid);
}

// dx's tile (thread tid), staged as fp32: channels [c0, c_end) of the tile's input pixels,
// each row at its pixel (a phase's pixels are sh x sw apart).
template <typename T, class M, class L>
__host__ __device__ __forceinline__ void nhwc_dx_write_out(const NhwcDxProblem<T, L>& prob,
                                                           const float* staged, int tid) {
  const NhwcDxParams& p = prob.p;
  const int rows = tile_extent(prob.rows_in_phase - prob.m0, M::BM);
  const int cols = tile_extent(prob.c_end - prob.c0, M::BN);
  T* dx = static_cast<T*>(p.dx) + prob.c0;
  write_f32_tile_rows_at<T, M::BM, M::BN, M::THREADS>(
      staged, M::OUT_LD_F32, dx, {0, 0, rows, 0, cols},
      [&](int m) { return prob.dx_row_at(m); }, tid, [](int, int, auto&) {});
}

template <typename T, class M>
__global__ void __launch_bounds__(M::THREADS, M::MIN_BLOCKS)
conv_nhwc_dx_kernel(const __grid_constant__ NhwcDxParams p) {
  using L = typename M::template Layout<true, true>;
  extern __shared__ __align__(1024) unsigned char smem[];
  const NhwcDxProblem<T, L> prob =
      nhwc_dx_problem<T, M, L>(p, block_index(), gridDim.x, gridDim.y, threadIdx.x);
  nhwc_dx_write_out<T, M>(prob, gemm_staged_f32<T, M, L>(prob, smem), threadIdx.x);
}

// ================================ weight gradient (NHWC dy and x) ============================
//   dW[o, j] = sum_p dy[p, dy_c0 + o] X[p, j]     j = (kh, kw, c): tap-major, channel innermost
// A = dy^T: a dense M-major tile of the (pixels, O) matrix that a channels_last dy is (its
// columns summed on the way for db).  B = X: per pixel row, 8 channels of one tap are one
// cp.async from x, zeros in the padding.  A thread's B chunks share their column, so its tap
// and channel are fixed for the block; their pixels change every k-tile (divided by the
// output size with multiply-shift divisors).  dW comes out (rows, KH, KW, channels).  When few
// output tiles would fill the GPU, the pixels split over blocks whose fp32 partials are
// summed in a fixed order (splitk_reduce_kernel).

struct NhwcDwParams {
  const void* dy;
  const void* x;
  void* out;  // (m, KK, n_ch) (null: skip), written directly when splits == 1
  void* db;   // dy's column sums over the pixels (null: skip)
  float* ws;  // splits > 1: fp32 partials [splits][m][n], then [splits][m] for db
  int64_t ld_dy, sxn, sxh, sxw;  // dy's pixel stride; x's element strides (channel stride 1)
  int pixels, rows_per_split;    // pixels < 2^31 (conv2d_weight_grad_nhwc_ok)
  FastDiv hw_out, w_out;         // Ho * Wo and Wo
  int H, W, KW, sh, sw, ph, pw, dh, dw;
  int dy_c0, x_c0, n_ch, m, n, splits;  // n = KK * n_ch
  int64_t ld_out;                        // = n (dw_epilogue's name for out's row stride)
};
static_assert(sizeof(NhwcDwParams) <= 4096, "within the classic kernel-argument limit");

template <typename T, class L>
struct NhwcDwProblem {
  const NhwcDwParams& p;
  int r0, len, m0, n0;
  const T* x_at;  // x at this thread's B column's channel, before the pixel
  int dkh, dkw;   // its tap's offset from an output pixel's top-left input pixel
  bool n_ok;

  __host__ __device__ NhwcDwProblem(const NhwcDwParams& params, int m0_, int n0_, int split,
                                    int tid)
      : p(params), m0(m0_), n0(n0_) {
    r0 = split * p.rows_per_split;
    len = p.pixels - r0 < p.rows_per_split ? p.pixels - r0 : p.rows_per_split;
    int row, col;
    L::b_chunk(tid, 0, row, col);
    const int j = n0 + col, c_all = p.n_ch;
    n_ok = j < p.n;
    const int tap = n_ok ? j / c_all : 0, c = n_ok ? j - tap * c_all : 0;
    const int kh = tap / p.KW, kw = tap - kh * p.KW;
    dkh = kh * p.dh - p.ph;
    dkw = kw * p.dw - p.pw;
    x_at = static_cast<const T*>(p.x) + p.x_c0 + c;
  }

  __host__ __device__ int num_phases() const { return 1; }
  __host__ __device__ int phase_len(int) const { return len; }
  __host__ __device__ TileSrc<T> tile_a(int, int k0) const {
    return {static_cast<const T*>(p.dy) + (r0 + k0) * p.ld_dy + p.dy_c0 + m0, p.ld_dy,
            len - k0, p.m - m0};
  }
  // (Its own copies of what it needs, as the other problems' sources.)
  struct BSrc {
    const T* x;
    const T* at;
    int pix0, pix_end;  // the k-tile's first pixel, the split's end
    FastDiv hw_out, w_out;
    int sh, sw, H, W, dkh, dkw;
    int64_t sxn, sxh, sxw;
    bool n_ok;
    __host__ __device__ const T* base() const { return x; }
    __host__ __device__ const T* chunk(int, int row, int) const {
      const int pix = pix0 + row;
      if (!n_ok || pix >= pix_end) return nullptr;
      const uint32_t img = hw_out.div(static_cast<uint32_t>(pix));
      const uint32_t rem = static_cast<uint32_t>(pix) - img * hw_out.d;
      const uint32_t ho = w_out.div(rem), wo = rem - ho * w_out.d;
      const int hi = static_cast<int>(ho) * sh + dkh, wi = static_cast<int>(wo) * sw + dkw;
      if (!inside(hi, H) || !inside(wi, W)) return nullptr;
      return at + img * sxn + hi * sxh + wi * sxw;
    }
  };
  __host__ __device__ BSrc tile_b(int, int k0) const {
    return {static_cast<const T*>(p.x), x_at, r0 + k0, r0 + len, p.hw_out, p.w_out, p.sh, p.sw,
            p.H, p.W, dkh, dkw, p.sxn, p.sxh, p.sxw, n_ok};
  }
};

template <typename T, class M>
__global__ void __launch_bounds__(M::THREADS, M::MIN_BLOCKS)
conv_nhwc_dw_kernel(const __grid_constant__ NhwcDwParams p) {
  using L = typename M::template Layout<false, false>;
  extern __shared__ __align__(1024) unsigned char smem[];
  const int m0 = blockIdx.x * M::BM, n0 = blockIdx.y * M::BN, split = blockIdx.z;
  const NhwcDwProblem<T, L> prob(p, m0, n0, split, threadIdx.x);
  const bool do_db = p.db != nullptr && blockIdx.y == 0;  // one column of blocks sums db
  float colsum = 0.f;
  typename M::Acc acc;
  gemm_mainloop<T, M, L>(prob, acc, smem, do_db, colsum);
  dw_epilogue<T, M>(p, acc, colsum, do_db, m0, n0, split, smem);
}

// ---- host ---------------------------------------------------------------------------------
bool fits_int(int64_t v) { return v >= 0 && v <= INT32_MAX / 4; }

// The launch parameters and grid of a forward on BM x BN tiles (host; the emulation walks them
// too): the output segments whose tile width (nhwc_seg_bn) is BN, a launch of each width
// computing y, or with `every_segment` (one tile for all: a portable math) all of them.  False
// where there is nothing to launch (no pixels or no such segment).
template <int BM, int BN>
bool build_nhwc_fwd(const ConvShape& s, const ConvWeights& w, const void* x, const Strides4& sx,
                    const void* b_frozen, const void* b_new, const float* bn_scale,
                    const float* bn_shift, void* y, NhwcFwdParams& p, dim3& grid,
                    bool every_segment = false) {
  const ConvGeometry& g = s.geo;
  const int64_t I = s.in_channels, I_f = s.frozen_in, KK = g.kernel_h * g.kernel_w;
  p = NhwcFwdParams{};
  if (s.num_frozen_groups > kNhwcMaxFrozenGroups) return false;  // (refused by _ok first)
  p.x = x;
  p.y = y;
  p.sxn = sx.n, p.sxh = sx.h, p.sxw = sx.w;
  p.hw_out = g.out_h * g.out_w;
  p.pixels = g.batch * p.hw_out;
  p.ld_y = s.frozen_out + s.new_out;
  p.H = static_cast<int>(g.height), p.W = static_cast<int>(g.width);
  p.Wo = static_cast<int>(g.out_w), p.KW = g.kernel_w, p.KK = static_cast<int>(KK);
  p.sh = g.stride_h, p.sw = g.stride_w, p.ph = g.pad_h, p.pw = g.pad_w;
  p.dh = g.dil_h, p.dw = g.dil_w;
  p.by_kw = FastDiv::of(static_cast<uint32_t>(g.kernel_w));
  const size_t es = s.dtype == DType::kFloat32 ? 4 : 2;
  auto phase = [](const void* w, int64_t cw, int64_t cp, int64_t c_off) {
    return NhwcPhase{w, static_cast<int>(cw), static_cast<int>(cp), static_cast<int>(c_off),
                     FastDiv::of(static_cast<uint32_t>(std::max<int64_t>(cp, 1)))};
  };
  int tiles = 0, n = 0;
  auto add = [&](NhwcSeg seg) {
    if (seg.rows == 0 || (!every_segment && nhwc_seg_bn(seg.rows) != BN)) return;
    seg.tile0 = tiles;
    tiles += static_cast<int>(ceil_div(seg.rows, BN));
    p.seg[n++] = seg;
  };
  int r0 = 0;  // the group's first row
  for (int gi = 0; gi < s.num_frozen_groups; r0 += static_cast<int>(s.frozen_out_groups[gi++])) {
    NhwcSeg seg{};
    const auto* wf = static_cast<const unsigned char*>(w.w_frozen);
    seg.ph[0] = phase(wf + r0 * KK * I_f * es, I_f, s.frozen_k_ends[gi], 0);
    if (w.w_couple != nullptr && I > I_f) {
      const auto* wc = static_cast<const unsigned char*>(w.w_couple);
      seg.ph[1] = phase(wc + r0 * KK * (I - I_f) * es, I - I_f, I - I_f, I_f);
    }
    seg.bias =
        b_frozen == nullptr ? nullptr : static_cast<const unsigned char*>(b_frozen) + r0 * es;
    seg.bn_scale = bn_scale == nullptr ? nullptr : bn_scale + r0;
    seg.bn_shift = bn_shift == nullptr ? nullptr : bn_shift + r0;
    seg.col0 = r0;
    seg.rows = static_cast<int>(s.frozen_out_groups[gi]);
    add(seg);
  }
  NhwcSeg seg{};
  seg.ph[0] = phase(w.w_new, I, I, 0);
  seg.bias = b_new;
  seg.col0 = static_cast<int>(s.frozen_out);
  seg.rows = static_cast<int>(s.new_out);
  add(seg);
  p.nseg = n;
  grid = dim3(static_cast<unsigned>(ceil_div(p.pixels, BM)), static_cast<unsigned>(tiles));
  return p.pixels > 0 && tiles > 0;
}

// A launcher's dispatch: launch(element, math) on the portable math where the call runs one
// (fp32; fp16/bf16 without wgmma), else on_wgmma(element), which picks the wgmma tiles.
template <class Launch, class OnWgmma>
cudaError_t launch_nhwc(DType dt, Launch&& launch, OnWgmma&& on_wgmma) {
  return dispatch(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if constexpr (std::is_same<T, float>::value) {
      return launch(tag, NhwcPortableMath<T>{});
    } else {
      if (!wgmma_enabled(dt)) return launch(tag, NhwcPortableMath<T>{});
      return on_wgmma(tag);
    }
  });
}

// Strides and kernels the input gradient's phase tables hold (an offset fits int8 too).
bool nhwc_dx_geometry_ok(const ConvGeometry& g) {
  return g.stride_h >= 1 && g.stride_w >= 1 && g.stride_h <= kNhwcMaxStride &&
         g.stride_w <= kNhwcMaxStride && g.kernel_h <= kNhwcMaxKernel &&
         g.kernel_w <= kNhwcMaxKernel && g.pad_h <= 64 && g.pad_w <= 64 &&
         (g.kernel_h - 1) * static_cast<int64_t>(g.dil_h) <= 64 &&
         (g.kernel_w - 1) * static_cast<int64_t>(g.dil_w) <= 64;
}

// The input gradient's launch (host; the emulation walks it too).  False where there is
// nothing to launch.
template <int BM, int BN>
bool build_nhwc_dx(const ConvShape& s, const ConvWeights& wt, const void* dy,
                   const Strides4& sdy, bool need_dx_old, void* dx, NhwcDxParams& p,
                   dim3& grid) {
  const ConvGeometry& g = s.geo;
  p = NhwcDxParams{};
  // (refused by _ok first)
  if (s.num_frozen_groups > kNhwcMaxFrozenGroups || !nhwc_dx_geometry_ok(g)) return false;
  p.dy = dy;
  p.dx = dx;
  p.wt_frozen = wt.w_frozen;
  p.wt_new = wt.w_new;
  const bool coupled = wt.w_couple != nullptr && s.frozen_out > 0 && s.in_channels > s.frozen_in;
  p.wt_couple = coupled ? wt.w_couple : nullptr;
  p.sdyn = sdy.n, p.sdyh = sdy.h, p.sdyw = sdy.w;
  p.batch = g.batch;
  p.H = static_cast<int>(g.height), p.W = static_cast<int>(g.width);
  p.Ho = static_cast<int>(g.out_h), p.Wo = static_cast<int>(g.out_w);
  p.KW = g.kernel_w, p.KK = g.kernel_h * g.kernel_w;
  p.sh = g.stride_h, p.sw = g.stride_w;
  p.in_ch = static_cast<int>(s.in_channels);
  p.frozen_in = static_cast<int>(s.frozen_in);
  p.frozen_out = static_cast<int>(s.frozen_out);
  p.new_out = static_cast<int>(s.new_out);
  p.need_old = need_dx_old ? 1 : 0;
  p.ngroups = s.num_frozen_groups;
  const auto by = [](int64_t d) {
    return FastDiv::of(static_cast<uint32_t>(std::max<int64_t>(d, 1)));
  };
  p.by_new_out = by(s.new_out);
  p.by_frozen_out = by(s.frozen_out);
  int64_t r0 = 0;
  for (int gi = 0; gi < s.num_frozen_groups; ++gi) {
    p.g_row0[gi] = static_cast<int>(r0);
    p.g_rows[gi] = static_cast<int>(s.frozen_out_groups[gi]);
    p.g_kend[gi] = static_cast<int>(s.frozen_k_ends[gi]);
    p.by_g_rows[gi] = by(s.frozen_out_groups[gi]);
    r0 += s.frozen_out_groups[gi];
  }
  // The stride phases: per residue of h (of w), its phase rows and the taps that reach them
  // with their offsets (exact divisions: the residue makes them whole).
  auto residues = [](int stride, int64_t size, int kernel, int pad, int dil, int* count,
                     int8_t (*tap)[kNhwcMaxKernel], int8_t (*off)[kNhwcMaxKernel], int8_t* ntaps) {
    for (int r = 0; r < stride; ++r) {
      count[r] = r < size ? static_cast<int>(ceil_div(size - r, stride)) : 0;
      ntaps[r] = 0;
      for (int k = 0; k < kernel; ++k) {
        const int t = r + pad - k * dil;
        if (((t % stride) + stride) % stride != 0) continue;
        tap[r][ntaps[r]] = static_cast<int8_t>(k);
        off[r][ntaps[r]++] = static_cast<int8_t>(t / stride);
      }
    }
  };
  residues(g.stride_h, g.height, g.kernel_h, g.pad_h, g.dil_h, p.rows_h, p.kh_of, p.oh_of,
           p.nkh);
  residues(g.stride_w, g.width, g.kernel_w, g.pad_w, g.dil_w, p.cols_w, p.kw_of, p.ow_of,
           p.nkw);
  p.stride_phases = g.stride_h * g.stride_w;
  p.row_tile0[0] = 0;
  for (int sp = 0; sp < p.stride_phases; ++sp) {
    const int rh = sp / g.stride_w, rw = sp % g.stride_w;
    p.row_tile0[sp + 1] =
        p.row_tile0[sp] + ceil_div(g.batch * p.rows_h[rh] * p.cols_w[rw], BM);
  }
  for (int rw = 0; rw < g.stride_w; ++rw) p.by_nkw[rw] = by(p.nkw[rw]);
  const int64_t old_tiles =
      p.bands.build(s.num_frozen_groups, s.frozen_k_ends, s.frozen_in, need_dx_old, BN);
  p.old_tiles = static_cast<int>(old_tiles);
  const int64_t tiles = old_tiles + ceil_div(s.in_channels - s.frozen_in, BN);
  const int64_t row_tiles = p.row_tile0[p.stride_phases];
  grid = dim3(static_cast<unsigned>(row_tiles), static_cast<unsigned>(tiles));
  return row_tiles > 0 && tiles > 0;
}

// The input gradient's column tiles of width bn that multiply (the new channels', and the old
// bands' where dx_old is asked for; otherwise those only store zeros), and whether narrow ones
// pay (the launch takes one width).
int64_t nhwc_dx_mma_tiles(const ConvShape& s, bool need_dx_old, int bn) {
  common::OldBands<kNhwcMaxFrozenGroups> bands;
  const int64_t old = bands.build(s.num_frozen_groups, s.frozen_k_ends, s.frozen_in,
                                  need_dx_old, bn);
  return (need_dx_old ? old : 0) + ceil_div(s.in_channels - s.frozen_in, bn);
}
bool nhwc_dx_narrow(const ConvShape& s, bool need_dx_old) {
  return narrow_pays(nhwc_dx_mma_tiles(s, need_dx_old, 64) * 64,
                     nhwc_dx_mma_tiles(s, need_dx_old, 128) * 128);
}

// The weight gradient's split of the pixels: while the output tiles leave SMs idle (one block
// an SM), more blocks along the reduction, each at least 8 k-tiles long.
template <int BM, int BN, int BK>
ConvWeightGradPlan plan_nhwc_dw(int64_t pixels, int64_t m, int64_t n, int num_sms) {
  ConvWeightGradPlan plan{1, std::max<int64_t>(pixels, 1), 0};
  if (m <= 0 || n <= 0 || pixels <= 0) return plan;
  const int64_t tiles = ceil_div(m, BM) * ceil_div(n, BN), ktiles = ceil_div(pixels, BK);
  int64_t want = tiles >= num_sms ? 1 : ceil_div(std::max(num_sms, 1), tiles);
  want = std::min<int64_t>({want, ktiles / 8, 64});
  if (want <= 1) return plan;
  plan.pixels_per_split = ceil_div(ktiles, want) * BK;
  plan.splits = static_cast<int>(ceil_div(pixels, plan.pixels_per_split));
  if (plan.splits <= 1) return ConvWeightGradPlan{1, pixels, 0};
  plan.workspace_bytes = static_cast<size_t>(plan.splits) * static_cast<size_t>(m) *
                         static_cast<size_t>(n + 1) * sizeof(float);
  return plan;
}

// The weight gradient's launch (host; the emulation walks it too).  False where there is
// nothing to launch.
template <int BM, int BN>
bool build_nhwc_dw(const ConvGeometry& g, const void* dy, const Strides4& sdy, int64_t dy_c0,
                   int64_t m, const void* x, const Strides4& sx, int64_t x_c0, int64_t n_ch,
                   void* out, void* db, const ConvWeightGradPlan& plan, void* workspace,
                   NhwcDwParams& p, dim3& grid) {
  p = NhwcDwParams{};
  p.dy = dy;
  p.x = x;
  p.out = out;
  p.db = db;
  p.ws = plan.splits > 1 ? static_cast<float*>(workspace) : nullptr;
  p.ld_dy = sdy.w;
  p.sxn = sx.n, p.sxh = sx.h, p.sxw = sx.w;
  p.pixels = static_cast<int>(g.batch * g.out_h * g.out_w);
  p.rows_per_split = static_cast<int>(plan.pixels_per_split);
  p.hw_out = FastDiv::of(static_cast<uint32_t>(std::max<int64_t>(g.out_h * g.out_w, 1)));
  p.w_out = FastDiv::of(static_cast<uint32_t>(std::max<int64_t>(g.out_w, 1)));
  p.H = static_cast<int>(g.height), p.W = static_cast<int>(g.width), p.KW = g.kernel_w;
  p.sh = g.stride_h, p.sw = g.stride_w, p.ph = g.pad_h, p.pw = g.pad_w;
  p.dh = g.dil_h, p.dw = g.dil_w;
  p.dy_c0 = static_cast<int>(dy_c0), p.x_c0 = static_cast<int>(x_c0);
  p.n_ch = static_cast<int>(n_ch), p.m = static_cast<int>(m);
  p.n = static_cast<int>(n_ch * g.kernel_h * g.kernel_w);
  p.splits = plan.splits;
  p.ld_out = p.n;
  grid = dim3(static_cast<unsigned>(ceil_div(p.m, BM)), static_cast<unsigned>(ceil_div(p.n, BN)),
              static_cast<unsigned>(plan.splits));
  return p.m > 0 && (p.n > 0 || db != nullptr);
}

// What the NHWC products ask of a call: not turned off, few enough groups, and an activation
// t (x or dy) whose channels are contiguous and whose pixels start on 16 bytes.
bool nhwc_call_ok(const ConvShape& s, const void* t, const Strides4& st) {
  const char* env = std::getenv("EXPANSE_FAST_CUDA_CONV_NHWC");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (!conv_shape_ok(s)) return false;
  if (s.num_frozen_groups > kNhwcMaxFrozenGroups) return false;
  return st.c == 1 && st.n % 8 == 0 && st.h % 8 == 0 && st.w % 8 == 0 &&
         reinterpret_cast<uintptr_t>(t) % 16 == 0;
}

}  // namespace

bool conv2d_backward_input_nhwc_ok(const ConvShape& s, const void* dy, const Strides4& sdy) {
  if (!nhwc_call_ok(s, dy, sdy)) return false;
  constexpr int VEC = 8;  // a chunk of dy: 8 output channels of one tap
  if (s.new_out % VEC || s.frozen_out % VEC) return false;
  for (int g = 0; g < s.num_frozen_groups; ++g)
    if (s.frozen_out_groups[g] % VEC) return false;
  const int64_t KK = static_cast<int64_t>(s.geo.kernel_h) * s.geo.kernel_w;
  const int64_t col_tiles = ceil_div(s.in_channels, NhwcNarrowMath<__half>::BN) +
                            s.num_frozen_groups + 1;
  return fits_int(KK * (s.frozen_out + s.new_out)) && fits_int(s.in_channels) &&
         col_tiles <= kMaxGridY && s.geo.height * s.geo.width > 0 &&
         nhwc_dx_geometry_ok(s.geo);
}

cudaError_t conv2d_backward_input_nhwc(const ConvShape& s, const ConvWeights& wt,
                                       const void* dy, const Strides4& sdy, bool need_dx_old,
                                       void* dx, cudaStream_t stream) {
  if (!conv2d_backward_input_nhwc_ok(s, dy, sdy)) return cudaErrorInvalidValue;
  auto launch = [&](auto tag, auto math) -> cudaError_t {
    using T = decltype(tag);
    using M = decltype(math);
    NhwcDxParams p;
    dim3 grid;
    if (!build_nhwc_dx<M::BM, M::BN>(s, wt, dy, sdy, need_dx_old, dx, p, grid))
      return cudaSuccess;  // nothing to compute
    constexpr size_t bytes = staged_smem_bytes<M, true, true>();
    static std::atomic<bool> raised[kSmemDevices];
    const cudaError_t err = raise_smem_limit(conv_nhwc_dx_kernel<T, M>, bytes, raised);
    if (err != cudaSuccess) return err;
    conv_nhwc_dx_kernel<T, M><<<grid, M::THREADS, bytes, stream>>>(p);
    return cudaGetLastError();
  };
  return launch_nhwc(s.dtype, launch, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    return nhwc_dx_narrow(s, need_dx_old) ? launch(tag, NhwcNarrowMath<T>{})
                                          : launch(tag, NhwcMath<T>{});
  });
}

bool conv2d_weight_grad_nhwc_ok(const ConvShape& s, const void* dy, const Strides4& sdy,
                                const void* x, const Strides4& sx) {
  if (!nhwc_call_ok(s, x, sx)) return false;
  constexpr int VEC = 8;  // a chunk of x: 8 channels of one tap
  if (s.in_channels % VEC || s.frozen_in % VEC) return false;
  // dy: the (pixels, O) matrix of a channels_last tensor (one pixel stride), 16-byte aligned
  const int64_t O = s.frozen_out + s.new_out;
  if (sdy.c != 1 || sdy.w != O || sdy.h != s.geo.out_w * O ||
      sdy.n != s.geo.out_h * s.geo.out_w * O || reinterpret_cast<uintptr_t>(dy) % 16 != 0)
    return false;
  const int64_t KK = static_cast<int64_t>(s.geo.kernel_h) * s.geo.kernel_w;
  const int64_t pixels = s.geo.batch * s.geo.out_h * s.geo.out_w;
  return pixels > 0 && pixels < (int64_t{1} << 31) && fits_int(KK * s.in_channels) &&
         fits_int(O) && ceil_div(KK * s.in_channels, SimtMath::BN) <= kMaxGridY;  // (narrowest)
}

ConvWeightGradPlan plan_conv_weight_grad_nhwc(int64_t pixels, int64_t m, int64_t n_ch,
                                              int kernel_area, int num_sms) {
  // (the same tiles in bf16; a wgmma launch picks the same one, nhwc_dw_short; a portable
  // math's launch takes the plan as it is: any plan suits any tile, see narrow_pays)
  using Wide = NhwcMath<__half>;
  using Short = NhwcShortMath<__half>;
  const int64_t n = n_ch * std::max(kernel_area, 1);
  return nhwc_dw_short(m, n)
             ? plan_nhwc_dw<Short::BM, Short::BN, Short::BK>(pixels, m, n, num_sms)
             : plan_nhwc_dw<Wide::BM, Wide::BN, Wide::BK>(pixels, m, n, num_sms);
}

cudaError_t conv2d_weight_grad_nhwc(const ConvShape& s, const void* dy, const Strides4& sdy,
                                    int64_t dy_c0, int64_t m, const void* x, const Strides4& sx,
                                    int64_t x_c0, int64_t n_ch, void* out, void* db,
                                    const ConvWeightGradPlan& plan, void* workspace,
                                    cudaStream_t stream) {
  if (!conv2d_weight_grad_nhwc_ok(s, dy, sdy, x, sx) || m < 0 || n_ch < 0 || dy_c0 < 0 ||
      x_c0 < 0 || dy_c0 + m > s.frozen_out + s.new_out || x_c0 + n_ch > s.in_channels ||
      x_c0 % 8 != 0 || n_ch % 8 != 0 || plan.splits < 1 || plan.splits > 64 ||
      (plan.splits > 1 && workspace == nullptr))
    return cudaErrorInvalidValue;
  auto launch = [&](auto tag, auto math) -> cudaError_t {
    using T = decltype(tag);
    using M = decltype(math);
    NhwcDwParams p;
    dim3 grid;
    if (!build_nhwc_dw<M::BM, M::BN>(s.geo, dy, sdy, dy_c0, m, x, sx, x_c0, n_ch, out, db, plan,
                                     workspace, p, grid))
      return cudaSuccess;  // nothing to compute
    if (grid.y == 0) grid.y = 1;  // db alone: one column of blocks
    constexpr size_t bytes = smem_bytes<M, false, false>();
    static std::atomic<bool> raised[kSmemDevices];
    cudaError_t err = raise_smem_limit(conv_nhwc_dw_kernel<T, M>, bytes, raised);
    if (err != cudaSuccess) return err;
    conv_nhwc_dw_kernel<T, M><<<grid, M::THREADS, bytes, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess || p.splits == 1) return err;
    const int64_t total = static_cast<int64_t>(p.m) * p.n + (db != nullptr ? p.m : 0);
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256), 4096));
    splitk_reduce_kernel<T><<<blocks, 256, 0, stream>>>(p.ws, p.splits, p.m, p.n,
                                                        static_cast<T*>(out), p.n,
                                                        static_cast<T*>(db));
    return cudaGetLastError();
  };
  return launch_nhwc(s.dtype, launch, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    return nhwc_dw_short(m, n_ch * s.geo.kernel_h * s.geo.kernel_w)
               ? launch(tag, NhwcShortMath<T>{})
               : launch(tag, NhwcMath<T>{});
  });
}

bool conv2d_forward_nhwc_ok(const ConvShape& s, const void* x, const Strides4& sx) {
  if (!nhwc_call_ok(s, x, sx)) return false;
  constexpr int VEC = 8;  // 16 bytes of fp16/bf16: a chunk never straddles two taps
  if (s.in_channels % VEC || s.frozen_in % VEC) return false;
  for (int g = 0; g < s.num_frozen_groups; ++g)
    if (s.frozen_k_ends[g] % VEC) return false;
  // Pixel offsets are int64; a weight row's length and the channel counts int32; the column
  // tiles (one or more a segment) fit gridDim.y.
  const int64_t KK = static_cast<int64_t>(s.geo.kernel_h) * s.geo.kernel_w;
  const int64_t col_tiles = ceil_div(s.frozen_out + s.new_out, NhwcNarrowMath<__half>::BN) +
                            s.num_frozen_groups + 1;
  return fits_int(KK * s.in_channels) && fits_int(s.frozen_out + s.new_out) &&
         col_tiles <= kMaxGridY && s.geo.out_h * s.geo.out_w > 0;
}

cudaError_t conv2d_forward_nhwc(const ConvShape& s, const ConvWeights& w, const void* x,
                                const Strides4& sx, const void* b_frozen, const void* b_new,
                                const float* bn_scale, const float* bn_shift, void* y,
                                cudaStream_t stream) {
  if ((bn_scale == nullptr) != (bn_shift == nullptr)) return cudaErrorInvalidValue;
  if (!conv2d_forward_nhwc_ok(s, x, sx)) return cudaErrorInvalidValue;
  // one launch for the segments on wide tiles, one for those on narrow tiles
  auto launch = [&](auto tag, auto math) -> cudaError_t {
    using T = decltype(tag);
    using M = decltype(math);
    NhwcFwdParams p;
    dim3 grid;
    constexpr bool one_tile = !M::STAGED_EPILOGUE;  // (a portable math: every segment)
    if (!build_nhwc_fwd<M::BM, M::BN>(s, w, x, sx, b_frozen, b_new, bn_scale, bn_shift, y, p,
                                      grid, one_tile))
      return cudaSuccess;  // nothing to compute
    constexpr size_t bytes = staged_smem_bytes<M, true, true>();
    static std::atomic<bool> raised[kSmemDevices];
    const cudaError_t err = raise_smem_limit(conv_nhwc_fwd_kernel<T, M>, bytes, raised);
    if (err != cudaSuccess) return err;
    conv_nhwc_fwd_kernel<T, M><<<grid, M::THREADS, bytes, stream>>>(p);
    return cudaGetLastError();
  };
  return launch_nhwc(s.dtype, launch, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const cudaError_t err = launch(tag, NhwcMath<T>{});
    return err != cudaSuccess ? err : launch(tag, NhwcNarrowMath<T>{});
  });
}

}  // namespace expanse_fast
