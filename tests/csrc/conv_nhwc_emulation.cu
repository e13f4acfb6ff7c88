// Host emulation of the channels_last conv forward, input gradient and weight gradient
// (csrc/expanded_conv_nhwc.cu) on each tile they launch (wgmma's three, the WMMA math's one,
// fp32's SIMT one),
// checked against a float64 direct convolution of the expanded layer and its gradients.  Built with nvcc and run on the CPU by
// test_tile_emulation.py; no GPU involved.
//
// The real code: the launch parameters and grid (build_nhwc_fwd), each block's problem for each
// of its threads (nhwc_fwd_problem: segment, tile, the pixels of the thread's A rows), the
// gathered copies of every k-tile (CoreSmem::load_a / load_b with the problem's ASrc / BSrc,
// cp.async a plain or zero 16-byte copy on the host) and the write-out (nhwc_fwd_write_out).
// Restated here, marked "as the kernel": gemm_mainloop's walk over phases and k-tiles and the
// product of each stage, read back through Layout::a_at / b_at.  Each stage is also compared,
// element by element, with the im2col operands its definition gives (the reduction order
// included: tap-major, channel innermost, as the (rows, KH, KW, channels) weights are stored).
//
// Operands hold small integers, so every sum is exact in fp32.  What must never be read is NaN:
// x's channel padding and the gaps between its rows and images, the weight channels past each
// frozen group's k_end.  A stage must hold no NaN after its copy (a chunk read from the wrong
// place or never written), and an output left unwritten stays NaN.
#include "expanded_conv_nhwc.cu"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace expanse_fast {
// Defined with the other kernels in the extension; this emulation is the wgmma build's path.
bool wgmma_enabled(DType) { return true; }
bool conv_shape_ok(const ConvShape&) { return true; }
}  // namespace expanse_fast

using namespace expanse_fast;

namespace {

int failures = 0;
int64_t blocks = 0, k_tiles = 0, compared = 0;

struct Case {
  const char* name;
  int64_t batch, H, W, in, frozen_in, new_out;
  int KH, KW, sh, sw, ph, pw, dh, dw;
  std::vector<int64_t> groups, k_ends;
  bool coupled, bias, bn;
  bool wide, narrow;  // which launches the segments' widths ask for
};

int64_t out_size(int64_t n, int k, int s, int p, int d) {
  return (n + 2 * p - d * (k - 1) - 1) / s + 1;
}

// Small random integers: every sum the kernels form is exact in fp32.
struct SmallInts {
  std::mt19937 rng;
  explicit SmallInts(unsigned seed) : rng(seed) {}
  double operator()() { return static_cast<double>(static_cast<int>(rng() % 5) - 2); }
};

// An NHWC activation (batch, H, W, C) of small integers, stored with gaps after each pixel,
// row and image (multiples of 8 elements) or as a plain (pixels, C) matrix, with NaN in every
// gap and in 64 elements past the end; `d` holds the values densely, in float64.
template <typename T>
struct NhwcTensor {
  int64_t H, W, C;
  Strides4 st;
  std::vector<T> v;
  std::vector<double> d;
  NhwcTensor(int64_t batch, int64_t h, int64_t w, int64_t c, bool gaps, SmallInts& rnd)
      : H(h), W(w), C(c) {
    const int64_t g = gaps ? 8 : 0;
    st = {H * (W * (C + g) + g) + 2 * g, 1, W * (C + g) + g, C + g};
    v.assign(batch * st.n + 64, from_f<T>(NAN));
    d.resize(batch * H * W * C);
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x < W; ++x)
          for (int64_t ch = 0; ch < C; ++ch)
            v[n * st.n + y * st.h + x * st.w + ch] =
                from_f<T>(d[((n * H + y) * W + x) * C + ch] = rnd());
  }
  double at(int64_t n, int64_t y, int64_t x, int64_t ch) const {
    return d[((n * H + y) * W + x) * C + ch];
  }
};

// One pipeline stage's shared memory, 16-byte aligned, on the host.
template <class L, typename T>
struct Stage {
  std::vector<uint4> raw = std::vector<uint4>((L::STAGE * sizeof(T) + 15) / 16);
  T* a() { return L::a(reinterpret_cast<unsigned char*>(raw.data()), 0); }
  T* b() { return L::b(reinterpret_cast<unsigned char*>(raw.data()), 0); }
};

// One stage as the kernel copies it (every thread's Layout::load_a / load_b; cp.async is a
// plain or zero-filling 16-byte copy on the host), from NaN, then every element of A and B
// against its definition, want_a(m, k) and want_b(k, n).  Returns the mismatches (the first
// few printed with `where`).
template <class M, class L, typename T, class Probs, class WantA, class WantB>
int copy_stage(T* As, T* Bs, const Probs& probs, int ph, int k0, WantA want_a, WantB want_b,
               const std::string& where) {
  ++k_tiles;
  for (int i = 0; i < L::STAGE; ++i) As[i] = from_f<T>(NAN);
  for (int tid = 0; tid < M::THREADS; ++tid) {
    L::load_a(As, probs[tid].tile_a(ph, k0), tid);
    L::load_b(Bs, probs[tid].tile_b(ph, k0), tid);
  }
  int bad = 0;
  for (int k = 0; k < M::BK; ++k) {
    for (int m = 0; m < M::BM; ++m) {
      const double got = to_f(L::a_at(As, m, k)), want = want_a(m, k);
      if (!(got == want) && bad++ < 3)
        std::printf("  %s, k0 %d: A(%d, %d) = %g, want %g\n", where.c_str(), k0, m, k, got,
                    want);
    }
    for (int n = 0; n < M::BN; ++n) {
      const double got = to_f(L::b_at(Bs, k, n)), want = want_b(k, n);
      if (!(got == want) && bad++ < 3)
        std::printf("  %s, k0 %d: B(%d, %d) = %g, want %g\n", where.c_str(), k0, k, n, got,
                    want);
    }
  }
  return bad;
}

// acc += the stage's A * B, and colsum (if given: the fused db) += A's rows.
template <class M, class L, typename T>
void multiply_stage(const T* As, const T* Bs, std::vector<double>& acc,
                    std::vector<double>* colsum) {
  for (int m = 0; m < M::BM; ++m)
    for (int k = 0; k < M::BK; ++k) {
      const double a = to_f(L::a_at(As, m, k));
      if (colsum != nullptr) (*colsum)[m] += a;
      if (a == 0.0) continue;
      for (int n = 0; n < M::BN; ++n) acc[m * M::BN + n] += a * to_f(L::b_at(Bs, k, n));
    }
}

// The accumulators as gemm_staged_f32 leaves them: fp32, [BM][OUT_LD_F32].
template <class M>
std::vector<float> staged_f32(const std::vector<double>& acc) {
  std::vector<float> staged(M::BM * M::OUT_LD_F32);
  for (int m = 0; m < M::BM; ++m)
    for (int n = 0; n < M::BN; ++n)
      staged[m * M::OUT_LD_F32 + n] = static_cast<float>(acc[m * M::BN + n]);
  return staged;
}

// Whether an output element differs from its float64 value rounded as the kernel rounds.
template <typename T>
bool differs(float got, double v) {
  ++compared;
  return !(got == to_f(from_f<T>(static_cast<float>(v))));
}

// The end of a case: nothing written past the output's end, and the mismatches counted.
template <typename T>
void finish_case(const char* name, const std::vector<T>& out, size_t end, int bad) {
  for (size_t i = end; i < out.size(); ++i)
    if (!std::isnan(to_f(out[i])) && bad++ < 5)
      std::printf("  %s: written past the output's end (element %zu)\n", name, i);
  if (bad) {
    ++failures;
    std::printf("%s: %d mismatches\n", name, bad);
  }
}

template <typename T>
ConvShape shape_of(int64_t batch, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int KH, int KW,
                   int sh, int sw, int ph, int pw, int dh, int dw) {
  ConvShape s{};
  s.dtype = std::is_same<T, float>::value    ? DType::kFloat32
            : std::is_same<T, __half>::value ? DType::kFloat16
                                             : DType::kBFloat16;
  s.geo = {batch, H, W, Ho, Wo, KH, KW, sh, sw, ph, pw, dh, dw};
  return s;
}

// The blocks of one forward launch on M's tiles (the segments of its width) into y; returns
// the mismatches of the copied stages, and false in `launched` where there is nothing to launch.
template <typename T, class M>
int run_fwd_launch(const Case& c, const ConvShape& s, const ConvWeights& w,
                   const NhwcTensor<T>& x, const std::vector<double>& Wd, int64_t Ho, int64_t Wo,
                   const T* bf, const T* bn, const float* scale, const float* shift,
                   std::vector<T>& y, bool& launched) {
  using L = typename M::template Layout<true, true>;
  const int64_t I = c.in, KK = c.KH * c.KW, P = c.batch * Ho * Wo;
  NhwcFwdParams p;
  dim3 grid;
  constexpr bool one_tile = !M::STAGED_EPILOGUE;  // as conv2d_forward_nhwc: the WMMA math
  launched = build_nhwc_fwd<M::BM, M::BN>(s, w, x.v.data(), x.st, bf, bn, scale, shift,
                                           y.data(), p, grid, one_tile);
  if (!launched) return 0;
  Stage<L, T> stage;
  T* const As = stage.a();
  T* const Bs = stage.b();
  int bad = 0;
  for (int64_t b = 0; b < static_cast<int64_t>(grid.x) * grid.y; ++b) {
    ++blocks;
    std::vector<NhwcFwdProblem<T, L>> probs;
    for (int tid = 0; tid < M::THREADS; ++tid)
      probs.push_back(nhwc_fwd_problem<T, M, L>(p, b, grid.x, grid.y, tid));
    const auto& p0 = probs[0];
    if (!one_tile && nhwc_seg_bn(p0.s.rows) != M::BN && bad++ < 3)
      std::printf("  %s: a segment of %d rows on %d-wide tiles\n", c.name, p0.s.rows, M::BN);
    std::vector<double> acc(M::BM * M::BN, 0.0);
    // as the kernel (gemm_mainloop): the phases in order, empty ones skipped, BK-deep k-tiles
    for (int ph = 0; ph < p0.num_phases(); ++ph)
      for (int k0 = 0; k0 < p0.phase_len(ph); k0 += M::BK) {
        // A(m, k): x at the pixel tap (kh, kw) of output pixel m0 + m reads, channel c_off + c,
        // for reduction index k0 + k = (kh * KW + kw) * cp + c; zero past the phase, in the
        // padding and past the last pixel.  B(k, n): the weight of row n0 + n there.
        const NhwcPhase& f = p0.s.ph[ph];
        auto tap_of = [&](int k, int64_t& tap, int64_t& ch) {
          tap = (k0 + k) / f.cp;
          ch = f.c_off + (k0 + k) % f.cp;
          return k0 + k < p0.phase_len(ph);
        };
        auto want_a = [&](int m, int k) {
          int64_t tap, ch;
          const bool k_in = tap_of(k, tap, ch);
          const int64_t pix = p0.m0 + m, n = pix / (Ho * Wo), r = pix % (Ho * Wo);
          const int64_t hi = r / Wo * c.sh - c.ph + tap / c.KW * c.dh;
          const int64_t wi = r % Wo * c.sw - c.pw + tap % c.KW * c.dw;
          const bool in = k_in && pix < P && hi >= 0 && hi < c.H && wi >= 0 && wi < c.W;
          return in ? x.at(n, hi, wi, ch) : 0.0;
        };
        auto want_b = [&](int k, int n) {
          int64_t tap, ch;
          const bool in = tap_of(k, tap, ch) && p0.n0 + n < p0.s.rows;
          return in ? Wd[((p0.s.col0 + p0.n0 + n) * KK + tap) * I + ch] : 0.0;
        };
        bad += copy_stage<M, L>(As, Bs, probs, ph, k0, want_a, want_b,
                                std::string(c.name) + ", " + std::to_string(M::BN) +
                                    "-wide block " + std::to_string(b));
        multiply_stage<M, L>(As, Bs, acc, nullptr);
      }
    // as the kernel: the staged accumulators, then every thread's write-out
    const std::vector<float> staged = staged_f32<M>(acc);
    for (int tid = 0; tid < M::THREADS; ++tid)
      nhwc_fwd_write_out<T, M>(p, p0.s, staged.data(), p0.m0, p0.n0, tid);
  }
  return bad;
}

// The forward's float64 reference: y[pixel, o] = bn(bias + sum over taps and channels),
// rounded to T, against y; then the case's end (finish_case).
template <typename T>
void check_forward(const Case& c, const NhwcTensor<T>& x, const std::vector<double>& Wd,
                   const std::vector<double>& bias, const std::vector<float>& scale,
                   const std::vector<float>& shift, const std::vector<T>& y, int64_t Ho,
                   int64_t Wo, int64_t O_f, int bad, const char* name) {
  const int64_t I = c.in, KK = c.KH * c.KW, O = O_f + c.new_out, P = c.batch * Ho * Wo;
  for (int64_t n = 0; n < c.batch; ++n)
    for (int64_t ho = 0; ho < Ho; ++ho)
      for (int64_t wo = 0; wo < Wo; ++wo)
        for (int64_t o = 0; o < O; ++o) {
          double v = bias[o];
          for (int kh = 0; kh < c.KH; ++kh)
            for (int kw = 0; kw < c.KW; ++kw) {
              const int64_t hi = ho * c.sh - c.ph + kh * c.dh, wi = wo * c.sw - c.pw + kw * c.dw;
              if (hi < 0 || hi >= c.H || wi < 0 || wi >= c.W) continue;
              for (int64_t ch = 0; ch < I; ++ch)
                v += x.at(n, hi, wi, ch) * Wd[(o * KK + kh * c.KW + kw) * I + ch];
            }
          if (c.bn && o < O_f) v = v * scale[o] + shift[o];
          const int64_t pix = (n * Ho + ho) * Wo + wo;
          const float got = to_f(y[pix * O + o]);
          if (differs<T>(got, v) && bad++ < 5)
            std::printf("  %s: y[pixel %lld, channel %lld] = %g, want %g\n", name,
                        (long long)pix, (long long)o, got, v);
        }
  finish_case(name, y, P * O, bad);
}

template <typename T>
void run_case(const Case& c) {
  const int64_t I = c.in, I_f = c.frozen_in, KK = c.KH * c.KW;
  int64_t O_f = 0;
  for (int64_t g : c.groups) O_f += g;
  const int64_t O = O_f + c.new_out;
  const int64_t Ho = out_size(c.H, c.KH, c.sh, c.ph, c.dh);
  const int64_t Wo = out_size(c.W, c.KW, c.sw, c.pw, c.dw);
  const int64_t P = c.batch * Ho * Wo;
  SmallInts rnd(11);
  const T nan = from_f<T>(NAN);
  const NhwcTensor<T> x(c.batch, c.H, c.W, I, true, rnd);
  // Weights (rows, KH, KW, cw); Wd: the dense (O, KK, I) weight with the staircase's zeros.
  std::vector<T> wf(O_f * KK * I_f + 8, nan), wn(c.new_out * KK * I + 8, nan),
      wc(O_f * KK * (I - I_f) + 8, nan);
  std::vector<double> Wd(O * KK * I, 0.0);
  for (int64_t g = 0, r0 = 0; g < static_cast<int64_t>(c.groups.size()); r0 += c.groups[g++])
    for (int64_t o = r0; o < r0 + c.groups[g]; ++o)
      for (int64_t t = 0; t < KK; ++t) {
        for (int64_t ch = 0; ch < c.k_ends[g]; ++ch)
          wf[(o * KK + t) * I_f + ch] = from_f<T>(Wd[(o * KK + t) * I + ch] = rnd());
        if (c.coupled)
          for (int64_t ch = I_f; ch < I; ++ch)
            wc[(o * KK + t) * (I - I_f) + ch - I_f] = from_f<T>(Wd[(o * KK + t) * I + ch] = rnd());
      }
  for (int64_t o = 0; o < c.new_out; ++o)
    for (int64_t t = 0; t < KK; ++t)
      for (int64_t ch = 0; ch < I; ++ch)
        wn[(o * KK + t) * I + ch] = from_f<T>(Wd[((O_f + o) * KK + t) * I + ch] = rnd());
  std::vector<T> bf(O_f + 1), bn(c.new_out + 1);
  std::vector<float> scale(O_f + 1), shift(O_f + 1);
  std::vector<double> bias(O, 0.0);
  for (int64_t o = 0; o < O; ++o) {
    bias[o] = c.bias ? rnd() : 0.0;
    (o < O_f ? bf[o] : bn[o - O_f]) = from_f<T>(bias[o]);
  }
  for (int64_t o = 0; o < O_f; ++o) {
    scale[o] = static_cast<float>(std::ldexp(1.0, static_cast<int>(rnd.rng() % 3) - 1));
    shift[o] = static_cast<float>(rnd());
  }
  ConvShape s = shape_of<T>(c.batch, c.H, c.W, Ho, Wo, c.KH, c.KW, c.sh, c.sw, c.ph, c.pw, c.dh,
                            c.dw);
  s.in_channels = I, s.frozen_in = I_f, s.frozen_out = O_f, s.new_out = c.new_out;
  s.num_frozen_groups = static_cast<int>(c.groups.size());
  s.frozen_out_groups = c.groups.data();
  s.frozen_k_ends = c.k_ends.data();
  const ConvWeights w{wf.data(), wn.data(), c.coupled ? wc.data() : nullptr};
  // as conv2d_forward_nhwc: the launch on wide tiles, then the one on narrow tiles
  const T* bfp = c.bias ? bf.data() : nullptr;
  const T* bnp = c.bias ? bn.data() : nullptr;
  const float* scp = c.bn ? scale.data() : nullptr;
  const float* shp = c.bn ? shift.data() : nullptr;
  if constexpr (!std::is_same<T, float>::value) {  // the wgmma maths: fp16/bf16
    std::vector<T> y(P * O + 64, nan);
    bool wide = false, narrow = false;
    int bad =
        run_fwd_launch<T, NhwcMath<T>>(c, s, w, x, Wd, Ho, Wo, bfp, bnp, scp, shp, y, wide);
    bad += run_fwd_launch<T, NhwcNarrowMath<T>>(c, s, w, x, Wd, Ho, Wo, bfp, bnp, scp, shp, y,
                                                 narrow);
    if (!wide && !narrow) {
      std::printf("%s: nothing to launch\n", c.name);
      ++failures;
      return;
    }
    if (wide != c.wide || narrow != c.narrow) {
      std::printf("%s: launches wide %d narrow %d, want %d %d\n", c.name, wide, narrow,
                  c.wide, c.narrow);
      ++bad;
    }
    check_forward<T>(c, x, Wd, bias, scale, shift, y, Ho, Wo, O_f, bad, c.name);
  }
  // the portable math (WMMA, or SIMT for fp32): one launch, every segment on its one tile
  std::vector<T> y_port(P * O + 64, nan);
  bool one = false;
  const std::string port_name = std::string(c.name) + ", portable " + std::to_string(sizeof(T));
  int bad = run_fwd_launch<T, NhwcPortableMath<T>>(c, s, w, x, Wd, Ho, Wo, bfp, bnp, scp, shp,
                                                    y_port, one);
  if (!one && bad++ == 0) std::printf("%s: nothing to launch\n", port_name.c_str());
  check_forward<T>(c, x, Wd, bias, scale, shift, y_port, Ho, Wo, O_f, bad, port_name.c_str());
}


// ---- the input gradient -------------------------------------------------------------------
// dx[q, c] = sum over the taps and output channels that reach q of dy * w, with dy and dx in
// NHWC (dy with NaN gaps), the weights transposed to (channels, KH, KW, rows).
struct DxCase {
  const char* name;
  int64_t batch, H, W, in, frozen_in, new_out;
  int KH, KW, sh, sw, ph, pw, dh, dw;
  std::vector<int64_t> groups, k_ends;
  bool coupled, need_old;
  bool narrow;  // the launch's tiles (nhwc_dx_narrow)
};

// Each case runs on both tile widths (the launch takes the one nhwc_dx_narrow says).
template <typename T, class M>
void run_dx_case(const DxCase& c) {
  using L = typename M::template Layout<true, true>;
  const int64_t I = c.in, I_f = c.frozen_in, KK = c.KH * c.KW;
  int64_t O_f = 0;
  for (int64_t g : c.groups) O_f += g;
  const int64_t O = O_f + c.new_out, o_T = c.new_out;
  const int64_t Ho = out_size(c.H, c.KH, c.sh, c.ph, c.dh);
  const int64_t Wo = out_size(c.W, c.KW, c.sw, c.pw, c.dw);
  const int64_t Q = c.batch * c.H * c.W;
  SmallInts rnd(5);
  const T nan = from_f<T>(NAN);
  const NhwcTensor<T> dy(c.batch, Ho, Wo, O, true, rnd);
  // Transposed weights (channels, KK, rows); Wd the dense (O, KK, I) with the staircase zeros.
  std::vector<T> wf(I_f * KK * O_f + 8, nan), wn(I * KK * o_T + 8, nan),
      wc((I - I_f) * KK * O_f + 8, nan);
  std::vector<double> Wd(O * KK * I, 0.0);
  for (int64_t g = 0, r0 = 0; g < static_cast<int64_t>(c.groups.size()); r0 += c.groups[g++])
    for (int64_t o = r0; o < r0 + c.groups[g]; ++o)
      for (int64_t t = 0; t < KK; ++t) {
        for (int64_t ch = 0; ch < c.k_ends[g]; ++ch)
          wf[(ch * KK + t) * O_f + o] = from_f<T>(Wd[(o * KK + t) * I + ch] = rnd());
        if (c.coupled)
          for (int64_t ch = I_f; ch < I; ++ch)
            wc[((ch - I_f) * KK + t) * O_f + o] = from_f<T>(Wd[(o * KK + t) * I + ch] = rnd());
      }
  for (int64_t o = 0; o < o_T; ++o)
    for (int64_t t = 0; t < KK; ++t)
      for (int64_t ch = 0; ch < I; ++ch)
        wn[(ch * KK + t) * o_T + o] = from_f<T>(Wd[((O_f + o) * KK + t) * I + ch] = rnd());
  std::vector<T> dx(Q * I + 64, nan);

  ConvShape s = shape_of<T>(c.batch, c.H, c.W, Ho, Wo, c.KH, c.KW, c.sh, c.sw, c.ph, c.pw, c.dh,
                            c.dw);
  s.in_channels = I, s.frozen_in = I_f, s.frozen_out = O_f, s.new_out = o_T;
  s.num_frozen_groups = static_cast<int>(c.groups.size());
  s.frozen_out_groups = c.groups.data();
  s.frozen_k_ends = c.k_ends.data();
  const ConvWeights wt{wf.data(), wn.data(), c.coupled ? wc.data() : nullptr};
  const std::string name = std::string(c.name) + ", " + std::to_string(M::BN) + "-wide tiles" +
                           (M::STAGED_EPILOGUE ? "" : (sizeof(T) == 4 ? ", SIMT" : ", WMMA"));
  int bad = 0;
  if (nhwc_dx_narrow(s, c.need_old) != c.narrow && bad++ == 0)
    std::printf("  %s: narrow tiles %d, want %d\n", name.c_str(), !c.narrow, c.narrow);
  NhwcDxParams p;
  dim3 grid;
  if (!build_nhwc_dx<M::BM, M::BN>(s, wt, dy.v.data(), dy.st, c.need_old, dx.data(), p, grid)) {
    std::printf("%s: nothing to launch\n", name.c_str());
    ++failures;
    return;
  }
  Stage<L, T> stage;
  T* const As = stage.a();
  T* const Bs = stage.b();
  std::vector<int64_t> phase_blocks(c.sh * c.sw, 0);
  for (int64_t b = 0; b < static_cast<int64_t>(grid.x) * grid.y; ++b) {
    ++blocks;
    std::vector<NhwcDxProblem<T, L>> probs;
    for (int tid = 0; tid < M::THREADS; ++tid)
      probs.push_back(nhwc_dx_problem<T, M, L>(p, b, grid.x, grid.y, tid));
    const auto& p0 = probs[0];
    // The block's stride phase (rh, rw): its pixels h = hh * sh + rh, w = ww * sw + rw, and
    // the taps (kh, kw) that reach them, kh-major, found here from the definition.
    const int64_t Hr = (c.H - p0.rh + c.sh - 1) / c.sh, Wr = (c.W - p0.rw + c.sw - 1) / c.sw;
    std::vector<std::pair<int, int>> taps;
    for (int kh = 0; kh < c.KH; ++kh)
      for (int kw = 0; kw < c.KW; ++kw)
        if ((p0.rh + c.ph - kh * c.dh) % c.sh == 0 && (p0.rw + c.pw - kw * c.dw) % c.sw == 0)
          taps.emplace_back(kh, kw);
    if (p0.taps() != static_cast<int>(taps.size()) && bad++ < 3)
      std::printf("  %s, block %lld: %d taps, want %zu\n", name.c_str(), (long long)b,
                  p0.taps(), taps.size());
    ++phase_blocks[p0.rh * c.sw + p0.rw];
    std::vector<double> acc(M::BM * M::BN, 0.0);
    for (int ph = 0; ph < p0.num_phases(); ++ph)  // as the kernel (gemm_mainloop)
      for (int k0 = 0; k0 < p0.phase_len(ph); k0 += M::BK) {
        // Reduction index k0 + k = t * rows + o over the stride phase's taps t and this
        // phase's rows (output channels o0 + o).  A(m, k): dy at the output pixel that reads
        // the tile's input pixel m through the tap, zero where it lies outside; B(k, n): the
        // weight there of channel c0 + n, zero past the phase's channel limit.
        const int rows = p0.phase_rows(ph);
        const int64_t o0 = ph == 0 ? O_f : (p0.old ? p.g_row0[ph - 1] : 0);
        const int64_t lim =
            ph > 0 && p0.old ? std::min<int64_t>(p.g_kend[ph - 1], p0.c_end) : p0.c_end;
        auto want_a = [&](int m, int k) {
          const int64_t j = k0 + k, t = j / rows, o = o0 + j % rows, i = p0.m0 + m;
          if (j >= p0.phase_len(ph) || i >= c.batch * Hr * Wr) return 0.0;
          if (t >= static_cast<int64_t>(taps.size())) return double(NAN);  // (a tap too many)
          const int64_t n = i / (Hr * Wr), h = i % (Hr * Wr) / Wr * c.sh + p0.rh;
          const int64_t w = i % Wr * c.sw + p0.rw;
          const int64_t th = h + c.ph - taps[t].first * c.dh;
          const int64_t tw = w + c.pw - taps[t].second * c.dw;
          const bool in = th >= 0 && tw >= 0 && th % c.sh == 0 && tw % c.sw == 0 &&
                          th / c.sh < Ho && tw / c.sw < Wo;
          return in ? dy.at(n, th / c.sh, tw / c.sw, o) : 0.0;
        };
        auto want_b = [&](int k, int nn) {
          const int64_t j = k0 + k, t = j / rows, o = o0 + j % rows, ch = p0.c0 + nn;
          if (j >= p0.phase_len(ph) || ch >= lim) return 0.0;
          if (t >= static_cast<int64_t>(taps.size())) return double(NAN);
          return Wd[(o * KK + taps[t].first * c.KW + taps[t].second) * I + ch];
        };
        bad += copy_stage<M, L>(As, Bs, probs, ph, k0, want_a, want_b,
                                name + ", block " + std::to_string(b) +
                                    ", phase " + std::to_string(ph));
        multiply_stage<M, L>(As, Bs, acc, nullptr);
      }
    const std::vector<float> staged = staged_f32<M>(acc);  // as the kernel
    for (int tid = 0; tid < M::THREADS; ++tid)
      nhwc_dx_write_out<T, M>(p0, staged.data(), tid);
  }
  // every stride phase with pixels has its row tiles: ceil(its pixels / BM) blocks a column
  for (int rh = 0; rh < c.sh; ++rh)
    for (int rw = 0; rw < c.sw; ++rw) {
      const int64_t px = c.batch * ((c.H - rh + c.sh - 1) / c.sh) * ((c.W - rw + c.sw - 1) / c.sw);
      const int64_t want = (px + M::BM - 1) / M::BM * grid.y;
      if (phase_blocks[rh * c.sw + rw] != want && bad++ < 3)
        std::printf("  %s: phase (%d, %d) had %lld blocks, want %lld\n", name.c_str(), rh, rw,
                    (long long)phase_blocks[rh * c.sw + rw], (long long)want);
    }

  for (int64_t n = 0; n < c.batch; ++n)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t w = 0; w < c.W; ++w)
        for (int64_t ch = 0; ch < I; ++ch) {
          double v = 0.0;
          if (ch >= I_f || c.need_old)
            for (int64_t ho = 0; ho < Ho; ++ho)
              for (int64_t wo = 0; wo < Wo; ++wo)
                for (int kh = 0; kh < c.KH; ++kh)
                  for (int kw = 0; kw < c.KW; ++kw) {
                    if (ho * c.sh - c.ph + kh * c.dh != h || wo * c.sw - c.pw + kw * c.dw != w)
                      continue;
                    for (int64_t o = 0; o < O; ++o)
                      v += dy.at(n, ho, wo, o) * Wd[(o * KK + kh * c.KW + kw) * I + ch];
                  }
          const int64_t q = (n * c.H + h) * c.W + w;
          const float got = to_f(dx[q * I + ch]);
          if (differs<T>(got, v) && bad++ < 5)
            std::printf("  %s: dx[pixel %lld, channel %lld] = %g, want %g\n", name.c_str(),
                        (long long)q, (long long)ch, got, v);
        }
  finish_case(name.c_str(), dx, Q * I, bad);
}

// ---- the weight gradient ------------------------------------------------------------------
// dW[o, (kh, kw, c)] = sum over output pixels p of dy[p, dy_c0 + o] * x at the pixel the tap
// reads (channel x_c0 + c), and db[o] = sum_p dy[p, dy_c0 + o]; dy a plain (pixels, O) matrix,
// x NHWC with NaN gaps.  num_sms small: the planner splits the pixels.
struct DwCase {
  const char* name;
  int64_t batch, H, W, in, O;
  int KH, KW, sh, sw, ph, pw, dh, dw;
  int64_t dy_c0, m, x_c0, n_ch;
  bool db;
  int num_sms;
  bool short_tiles;  // the launch's tiles (nhwc_dw_short): 64 x 256
};

// Each case runs on both tiles; the launch and plan_conv_weight_grad_nhwc take the one
// nhwc_dw_short says.
template <typename T, class M>
void run_dw_case(const DwCase& c) {
  using L = typename M::template Layout<false, false>;
  const int64_t I = c.in, O = c.O, KK = c.KH * c.KW;
  const int64_t Ho = out_size(c.H, c.KH, c.sh, c.ph, c.dh);
  const int64_t Wo = out_size(c.W, c.KW, c.sw, c.pw, c.dw);
  const int64_t P = c.batch * Ho * Wo, N = KK * c.n_ch;
  SmallInts rnd(3);
  const T nan = from_f<T>(NAN);
  const NhwcTensor<T> x(c.batch, c.H, c.W, I, true, rnd);
  const NhwcTensor<T> dy(c.batch, Ho, Wo, O, false, rnd);  // the plain (pixels, O) matrix
  std::vector<T> out(c.m * N + 64, nan), db(c.m + 64, nan);

  const ConvShape s = shape_of<T>(c.batch, c.H, c.W, Ho, Wo, c.KH, c.KW, c.sh, c.sw, c.ph, c.pw,
                                  c.dh, c.dw);
  // The launch's plan, as the op makes it (plan_conv_weight_grad_nhwc: the wgmma tile that
  // nhwc_dw_short picks): every tile runs on it, the ones a launch never pairs with it too
  // (any plan suits any tile).
  const ConvWeightGradPlan plan =
      plan_conv_weight_grad_nhwc(P, c.m, c.n_ch, c.KH * c.KW, c.num_sms);
  std::vector<float> ws(plan.workspace_bytes / sizeof(float) + 1, NAN);
  const char* math = M::STAGED_EPILOGUE ? "" : (sizeof(T) == 4 ? ", SIMT" : ", WMMA");
  const std::string name = std::string(c.name) + ", " + std::to_string(M::BM) + " x " +
                           std::to_string(M::BN) + " tiles" + math;
  int bad = 0;
  if (nhwc_dw_short(c.m, N) != c.short_tiles && bad++ == 0)
    std::printf("  %s: short tiles %d, want %d\n", name.c_str(), !c.short_tiles,
                c.short_tiles);
  // the plan is the tile's own where a wgmma launch takes this tile
  const ConvWeightGradPlan own = plan_nhwc_dw<M::BM, M::BN, M::BK>(P, c.m, N, c.num_sms);
  const bool launched_tile = M::STAGED_EPILOGUE && (M::BM == 64) == c.short_tiles;
  if (launched_tile && (own.splits != plan.splits ||
                        own.pixels_per_split != plan.pixels_per_split ||
                        own.workspace_bytes != plan.workspace_bytes) && bad++ == 0)
    std::printf("  %s: plan_conv_weight_grad_nhwc plans %d splits, the tile %d\n",
                name.c_str(), plan.splits, own.splits);
  NhwcDwParams p;
  dim3 grid;
  if (!build_nhwc_dw<M::BM, M::BN>(s.geo, dy.v.data(), dy.st, c.dy_c0, c.m, x.v.data(), x.st,
                                   c.x_c0, c.n_ch, out.data(), c.db ? db.data() : nullptr, plan,
                                   ws.data(), p, grid)) {
    std::printf("%s: nothing to launch\n", name.c_str());
    ++failures;
    return;
  }
  if ((plan.splits > 1) != (c.num_sms > 1)) {
    std::printf("%s: %d splits (num_sms %d)\n", name.c_str(), plan.splits, c.num_sms);
    ++failures;
  }
  Stage<L, T> stage;
  T* const As = stage.a();
  T* const Bs = stage.b();
  // Output pixel p's image and position, and what tap j of it reads (false: the padding).
  auto pixel = [&](int64_t pix, int64_t& n, int64_t& ho, int64_t& wo) {
    n = pix / (Ho * Wo), ho = pix % (Ho * Wo) / Wo, wo = pix % Wo;
  };
  auto reads = [&](int64_t ho, int64_t wo, int64_t tap, int64_t& hi, int64_t& wi) {
    hi = ho * c.sh - c.ph + tap / c.KW * c.dh;
    wi = wo * c.sw - c.pw + tap % c.KW * c.dw;
    return hi >= 0 && hi < c.H && wi >= 0 && wi < c.W;
  };
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {  // as the kernel: its first lines
        ++blocks;
        const int m0 = bx * M::BM, n0 = by * M::BN, split = bz;
        std::vector<NhwcDwProblem<T, L>> probs;
        for (int tid = 0; tid < M::THREADS; ++tid) probs.emplace_back(p, m0, n0, split, tid);
        const auto& p0 = probs[0];
        std::vector<double> acc(M::BM * M::BN, 0.0), colsum(M::BM, 0.0);
        for (int k0 = 0; k0 < p0.phase_len(0); k0 += M::BK) {  // as gemm_mainloop
          // A(m, k) = dy[pixel r0 + k0 + k, dy_c0 + m0 + m]; B(k, n) = x where that pixel's tap
          // reads, channel x_c0 + c, for column n0 + n = tap * n_ch + c; zero past the split.
          auto want_a = [&](int m, int k) {
            const int64_t pix = p0.r0 + k0 + k;
            return k0 + k < p0.len && m0 + m < c.m ? dy.d[pix * O + c.dy_c0 + m0 + m] : 0.0;
          };
          auto want_b = [&](int k, int nn) {
            const int64_t j = n0 + nn, tap = j / c.n_ch;
            int64_t n, ho, wo, hi, wi;
            pixel(p0.r0 + k0 + k, n, ho, wo);
            const bool in = k0 + k < p0.len && j < N && reads(ho, wo, tap, hi, wi);
            return in ? x.at(n, hi, wi, c.x_c0 + j % c.n_ch) : 0.0;
          };
          bad += copy_stage<M, L>(As, Bs, probs, 0, k0, want_a, want_b,
                                  name + ", block (" + std::to_string(bx) + ", " +
                                      std::to_string(by) + ", " + std::to_string(bz) + ")");
          multiply_stage<M, L>(As, Bs, acc, &colsum);
        }
        // as the kernel (dw_epilogue): db from the first column of blocks, then the staged tile
        const int64_t mn = static_cast<int64_t>(p.m) * p.n;
        if (p.db != nullptr && by == 0)
          for (int m = 0; m < M::BM && m0 + m < p.m; ++m) {
            if (p.splits > 1) p.ws[p.splits * mn + static_cast<int64_t>(split) * p.m + m0 + m] =
                static_cast<float>(colsum[m]);
            else db[m0 + m] = from_f<T>(static_cast<float>(colsum[m]));
          }
        const std::vector<float> staged = staged_f32<M>(acc);
        if constexpr (M::STAGED_EPILOGUE) {
          std::vector<T> staged_t(M::BM * M::OUT_LD);
          for (int m = 0; m < M::BM; ++m)
            for (int n = 0; n < M::BN; ++n)
              staged_t[m * M::OUT_LD + n] = from_f<T>(staged[m * M::OUT_LD_F32 + n]);
          for (int tid = 0; tid < M::THREADS; ++tid)
            dw_write_out<T, M>(p, p.splits > 1 ? static_cast<const void*>(staged.data())
                                               : static_cast<const void*>(staged_t.data()),
                               m0, n0, split, tid);
        } else {  // the WMMA math: each element stored where it lies
          for (int m = 0; m < M::BM; ++m)
            for (int n = 0; n < M::BN; ++n) {
              const int mm = m0 + m, nn = n0 + n;
              if (mm >= p.m || nn >= p.n) continue;
              const float v = staged[m * M::OUT_LD_F32 + n];
              if (p.splits > 1) p.ws[split * mn + static_cast<int64_t>(mm) * p.n + nn] = v;
              else out[mm * p.ld_out + nn] = from_f<T>(v);
            }
        }
      }
  if (p.splits > 1) {  // as splitk_reduce_kernel: the splits in order
    const int64_t mn = static_cast<int64_t>(p.m) * p.n;
    for (int64_t i = 0; i < mn; ++i) {
      float sum = 0.f;
      for (int k = 0; k < p.splits; ++k) sum += p.ws[k * mn + i];
      out[i] = from_f<T>(sum);
    }
    if (c.db)
      for (int64_t j = 0; j < p.m; ++j) {
        float sum = 0.f;
        for (int k = 0; k < p.splits; ++k) sum += p.ws[p.splits * mn + k * p.m + j];
        db[j] = from_f<T>(sum);
      }
  }

  for (int64_t o = 0; o < c.m; ++o) {
    for (int64_t tap = 0; tap < KK; ++tap)
      for (int64_t ch = 0; ch < c.n_ch; ++ch) {
        double v = 0.0;
        for (int64_t pix = 0; pix < P; ++pix) {
          int64_t n, ho, wo, hi, wi;
          pixel(pix, n, ho, wo);
          if (reads(ho, wo, tap, hi, wi))
            v += dy.d[pix * O + c.dy_c0 + o] * x.at(n, hi, wi, c.x_c0 + ch);
        }
        const float got = to_f(out[(o * KK + tap) * c.n_ch + ch]);
        if (differs<T>(got, v) && bad++ < 5)
          std::printf("  %s: dW[%lld, tap %lld, %lld] = %g, want %g\n", name.c_str(), (long long)o,
                      (long long)tap, (long long)ch, got, v);
      }
    if (c.db) {
      double v = 0.0;
      for (int64_t pix = 0; pix < P; ++pix) v += dy.d[pix * O + c.dy_c0 + o];
      if (differs<T>(to_f(db[o]), v) && bad++ < 5)
        std::printf("  %s: db[%lld] = %g, want %g\n", name.c_str(), (long long)o, to_f(db[o]), v);
    }
  }
  finish_case(name.c_str(), out, c.m * N, bad);
}

// Every element of a BM x BN tile is one accumulator of one thread: the warpgroups' places
// (wg_m0, wg_n0) and the m64nWN fragment map, as WgmmaMath::store reads them.
template <class M>
void check_accumulator_cover(const char* name) {
  std::vector<int> hits(M::BM * M::BN, 0);
  for (int tid = 0; tid < M::THREADS; ++tid)
    for (int i = 0; i < M::WN / 2; ++i) {
      const int m = M::wg_m0(tid) + wgmma::acc_row(tid % 128, i);
      const int n = M::wg_n0(tid) + wgmma::acc_col(tid % 128, i);
      if (m < M::BM && n < M::BN) ++hits[m * M::BN + n];
      else hits[0] += 2;  // outside: fails below
    }
  for (int e = 0; e < M::BM * M::BN; ++e)
    if (hits[e] != 1) {
      std::printf("%s: tile element (%d, %d) held %d times\n", name, e / M::BN, e % M::BN,
                  hits[e]);
      ++failures;
      return;
    }
}

}  // namespace

int main() {
  check_accumulator_cover<NhwcMath<__half>>("128 x 128 tile");
  check_accumulator_cover<NhwcNarrowMath<__half>>("128 x 64 tile");
  check_accumulator_cover<NhwcShortMath<__half>>("64 x 256 tile");
  check_accumulator_cover<WgmmaMath<__half>>("128 x 256 tile");
  {  // EXPANSE_FAST_CUDA_CONV_NARROW=0: the wide tiles for all three products
    ConvShape s{};
    const int64_t groups[] = {256}, k_ends[] = {256};
    s.in_channels = 320, s.frozen_in = 256, s.frozen_out = 256, s.new_out = 64;
    s.num_frozen_groups = 1, s.frozen_out_groups = groups, s.frozen_k_ends = k_ends;
    const bool on[] = {nhwc_seg_bn(64) == 64, nhwc_dx_narrow(s, false), nhwc_dw_short(64, 2880)};
    setenv("EXPANSE_FAST_CUDA_CONV_NARROW", "0", 1);
    const bool off[] = {nhwc_seg_bn(64) == 64, nhwc_dx_narrow(s, false),
                        nhwc_dw_short(64, 2880)};
    unsetenv("EXPANSE_FAST_CUDA_CONV_NARROW");
    for (int i = 0; i < 3; ++i)
      if (!on[i] || off[i]) {
        std::printf("EXPANSE_FAST_CUDA_CONV_NARROW: product %d narrow %d by default, %d off\n",
                    i, on[i], off[i]);
        ++failures;
      }
  }
  const std::vector<Case> cases = {
      // name, batch, H, W, in, frozen_in, new_out, KH, KW, sh, sw, ph, pw, dh, dw,
      // groups, k_ends, coupled, bias, bn, wide launch, narrow launch
      {"3x3 coupled, bias, bn", 2, 7, 5, 16, 8, 3, 3, 3, 1, 1, 1, 1, 1, 1, {5}, {8}, true,
       true, true, false, true},
      // 297 pixels: three row tiles; 72 channels: k-tiles that cross taps; a group of 130
      // rows: three narrow column tiles; one group reading a channel prefix
      {"3x3 many pixels, groups", 3, 9, 11, 72, 40, 5, 3, 3, 1, 1, 1, 1, 1, 1, {2, 130},
       {40, 16}, true, true, false, false, true},
      {"strided dilated 3x2, isolated", 2, 11, 9, 24, 16, 7, 3, 2, 2, 2, 2, 1, 2, 2, {3, 4},
       {8, 16}, false, false, true, false, true},
      {"1x1 single pixel, no old input", 1, 1, 1, 8, 0, 9, 1, 1, 1, 1, 0, 0, 1, 1, {4}, {0},
       false, true, false, false, true},
      {"empty prefix group, padding 2", 2, 4, 6, 16, 8, 1, 5, 3, 1, 2, 2, 1, 1, 1, {3, 2},
       {0, 8}, true, true, true, false, true},
      // both launches: a group of 200 rows on two wide tiles; a group of 40 and the 64 new
      // rows (the ResNet stage's new group) on narrow ones
      {"wide and narrow segments", 1, 5, 7, 24, 16, 64, 3, 3, 1, 1, 1, 1, 1, 1, {200, 40},
       {16, 8}, true, true, true, true, true},
  };
  for (const Case& c : cases) {
    run_case<__half>(c);
    run_case<__nv_bfloat16>(c);
    run_case<float>(c);
  }
  const std::vector<DxCase> dx_cases = {
      // name, batch, H, W, in, frozen_in, new_out, KH, KW, sh, sw, ph, pw, dh, dw,
      // groups, k_ends, coupled, need_old, narrow tiles
      {"dx 3x3 coupled", 2, 7, 5, 16, 8, 8, 3, 3, 1, 1, 1, 1, 1, 1, {8}, {8}, true, true, true},
      // two bands of old channels (k_end 8 inside I_f = 16); the stride skips input pixels
      {"dx strided dilated 3x2", 2, 11, 9, 24, 16, 8, 3, 2, 2, 2, 2, 1, 2, 2, {8, 16},
       {8, 16}, false, true, true},
      {"dx strided, no dx_old", 2, 11, 9, 24, 16, 8, 3, 2, 2, 2, 2, 1, 2, 2, {8, 16},
       {8, 16}, false, false, true},
      // 286 input pixels: three row tiles; 136 + 16 frozen rows: k-tiles across taps;
      // 72 channels
      {"dx many pixels", 2, 13, 11, 72, 56, 24, 3, 3, 1, 1, 1, 1, 1, 1, {16, 136}, {56, 56},
       true, true, true},
      {"dx 1x1 stride 2, no old input", 1, 5, 6, 8, 0, 8, 1, 1, 2, 2, 0, 0, 1, 1, {8}, {0},
       false, true, true},
      {"dx 5x3, group reading nothing", 2, 4, 6, 16, 8, 8, 5, 3, 1, 2, 2, 1, 1, 1, {8, 8},
       {0, 8}, false, true, true},
      // the ResNet downsample's 3 x 3, stride 2, pad 1, odd sizes: stride phases of 4, 2, 2
      // and 1 taps
      {"dx 3x3 stride 2", 2, 9, 7, 16, 8, 8, 3, 3, 2, 2, 1, 1, 1, 1, {8}, {8}, true, true, true},
      // 5 x 5 at stride 3: nine phases of 4, 2 and 1 taps (h % 3 == 2 ... )
      {"dx 5x5 stride 3", 1, 11, 10, 16, 8, 8, 5, 5, 3, 3, 2, 2, 1, 1, {8}, {8}, false, false,
       true},
      // 136 new channels past 64 old: two wide tiles (the second nearly idle) or three narrow
      // ones, beside the old channels' tile
      {"dx 136 new channels", 1, 4, 5, 200, 64, 8, 1, 1, 1, 1, 0, 0, 1, 1, {8}, {64}, false,
       false, true},
      // 128 old and 128 new channels: whole wide tiles
      {"dx whole wide tiles", 1, 4, 5, 256, 128, 8, 1, 1, 1, 1, 0, 0, 1, 1, {8}, {128}, false,
       true, false},
      // the ResNet stage's channels, 256 old and 64 new: narrow tiles where only the new
      // channels multiply (the old tiles store zeros), wide ones where dx_old is asked for too
      {"dx 64 new of 320, no dx_old", 1, 4, 5, 320, 256, 8, 1, 1, 1, 1, 0, 0, 1, 1, {8}, {256},
       false, false, true},
      {"dx 64 new of 320 with dx_old", 1, 4, 5, 320, 256, 8, 1, 1, 1, 1, 0, 0, 1, 1, {8}, {256},
       false, true, false},
  };
  for (const DxCase& c : dx_cases) {
    run_dx_case<__half, NhwcMath<__half>>(c);
    run_dx_case<__half, NhwcNarrowMath<__half>>(c);
    run_dx_case<__half, NhwcWmmaMath<__half>>(c);
    run_dx_case<__nv_bfloat16, NhwcMath<__nv_bfloat16>>(c);
    run_dx_case<__nv_bfloat16, NhwcNarrowMath<__nv_bfloat16>>(c);
    run_dx_case<__nv_bfloat16, NhwcWmmaMath<__nv_bfloat16>>(c);
    run_dx_case<float, NhwcPortableMath<float>>(c);
  }
  // FastDiv (the weight gradient's pixel decomposition) against division: every divisor up to
  // 4096 and some large ones, dividends at the edges of its range [0, 2^31) and random.
  {
    std::mt19937 rng(1);
    std::vector<uint32_t> ds;
    for (uint32_t d = 1; d <= 4096; ++d) ds.push_back(d);
    for (uint32_t d : {3136u, 50176u, 65535u, 65536u, 1048583u, 2147483647u}) ds.push_back(d);
    int bad = 0;
    for (uint32_t d : ds) {
      const FastDiv f = FastDiv::of(d);
      std::vector<uint32_t> ns = {0u, 1u, d - 1, d, d + 1, 2 * d - 1, 2147483647u, 2147483646u};
      for (int i = 0; i < 64; ++i) ns.push_back(rng() & 0x7fffffffu);
      for (uint32_t n : ns)
        if (n < 2147483648u && f.div(n) != n / d && bad++ < 5)
          std::printf("  FastDiv: %u / %u = %u, want %u\n", n, d, f.div(n), n / d);
    }
    if (bad) ++failures;
  }
  const std::vector<DwCase> dw_cases = {
      // name, batch, H, W, in, O, KH, KW, sh, sw, ph, pw, dh, dw, dy_c0, m, x_c0, n_ch, db,
      // num_sms, short tiles
      // 4096 pixels: 64 k-tiles, split (a partial last split's tiles included)
      {"dW_new 3x3 with db, split", 4, 32, 32, 16, 13, 3, 3, 1, 1, 1, 1, 1, 1, 5, 8, 0, 16,
       true, 8, true},
      {"dW_new 3x3 with db, whole", 2, 7, 5, 16, 13, 3, 3, 1, 1, 1, 1, 1, 1, 5, 8, 0, 16, true,
       1, true},
      // 130 rows: two or three row tiles; 9 x 24 columns: one or two column tiles, k-tiles
      // across taps; the coupling block's channels start at 8
      {"dW_couple strided dilated", 8, 33, 33, 32, 137, 3, 3, 2, 2, 2, 1, 2, 2, 0, 130, 8, 24,
       false, 8, true},
      // 5 rows but 8 or 120 columns: a 64 x 256 tile would leave as many cells idle as the
      // wide one, so the wide tiles
      {"dW 1x1 stride 2, odd dy_c0", 3, 40, 39, 8, 11, 1, 1, 2, 2, 0, 0, 1, 1, 3, 5, 0, 8, true,
       4, false},
      {"dW 5x3 many pixels", 6, 21, 19, 8, 16, 5, 3, 1, 2, 2, 1, 1, 1, 8, 8, 0, 8, true, 16,
       false},
      // 200 rows of 8 columns: the wide tiles
      {"dW 200 rows, db", 2, 6, 5, 8, 205, 1, 1, 1, 1, 0, 0, 1, 1, 5, 200, 0, 8, true, 1,
       false},
  };
  for (const DwCase& c : dw_cases) {
    run_dw_case<__half, NhwcMath<__half>>(c);
    run_dw_case<__half, NhwcShortMath<__half>>(c);
    run_dw_case<__half, NhwcWmmaMath<__half>>(c);
    run_dw_case<__nv_bfloat16, NhwcMath<__nv_bfloat16>>(c);
    run_dw_case<__nv_bfloat16, NhwcShortMath<__nv_bfloat16>>(c);
    run_dw_case<__nv_bfloat16, NhwcWmmaMath<__nv_bfloat16>>(c);
    run_dw_case<float, NhwcPortableMath<float>>(c);
  }
  std::printf("%lld blocks, %lld k-tiles, %lld outputs compared\n", (long long)blocks,
              (long long)k_tiles, (long long)compared);
  if (failures) {
    std::printf("FAILED: %d\n", failures);
    return 1;
  }
  std::printf("tile emulation OK\n");
  return 0;
}
