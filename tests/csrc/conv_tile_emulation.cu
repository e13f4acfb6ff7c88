// Host emulation of the conv implicit-GEMM tiles (csrc/expanded_conv_kernels.cu), checked
// against a direct float64 convolution.  Built with nvcc and run on the CPU by
// test_tile_emulation.py; no GPU involved.
//
// The real code: the launch parameters and grids (build_fwd, build_dx, build_dw, the planner),
// every thread's gather (FwdProblem, DxProblem, DwProblem and its dw_col table), the block's
// cursor over phases and k-tiles (skip_empty, advance, finished) and the epilogue's store.
// Each thread's registers land in a dense tile through the Tiles<T, K> thread -> element maps
// (one tile shape for the SIMT, WMMA and wgmma maths); the tile is multiplied in float64.
// Restated here: the shared-memory multiply, the fill of the dW column table and the split sum.
//
// Operands hold small integers, so every sum is exact in fp32 and the comparison is exact.
// The frozen weight columns past each group's k_end are NaN: gathering one is a fault.  Both
// tiles are NaN before every gather (each element must be gathered), and the outputs and the
// split-K workspace start as NaN (each element must be written).
#include "expanded_conv_kernels.cu"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

// The launchers ask wgmma_enabled(), which is defined with the linear kernels (not in this
// binary).  Nothing is launched here.
namespace expanse_fast {
bool wgmma_enabled(DType) { return false; }
}  // namespace expanse_fast

using namespace expanse_fast;

namespace {

int failures = 0;
int64_t blocks = 0, k_tiles = 0, compared = 0;  // what was emulated, for the summary line

// Counts the mismatches of one output, printing the first few.
struct Check {
  std::string what;
  int bad = 0;
  explicit Check(std::string w) : what(std::move(w)) {}
  ~Check() {
    if (bad == 0) return;
    ++failures;
    std::printf("%s: %d mismatches\n", what.c_str(), bad);
  }
  // got against the float64 reference rounded as the kernel rounds its fp32 value.
  template <typename T>
  void operator()(T got_t, double ref, int i0, int i1, int i2, int i3) {
    const float got = to_f(got_t), want = to_f(from_f<T>(static_cast<float>(ref)));
    ++compared;
    if (!(got == want || (std::isnan(got) && std::isnan(want))) && bad++ < 5)
      std::printf("  %s[%d, %d, %d, %d] = %g, want %g\n", what.c_str(), i0, i1, i2, i3, got,
                  want);
  }
};

// A tensor with NaN guard zones longer than itself on both sides: a gather from outside it reads
// NaN (a fault), a store outside it leaves a guard that is not NaN (a fault).
template <typename T>
struct Guarded {
  size_t n = 0;
  std::vector<T> v;
  void reset(size_t size) {
    n = size;
    v.assign(3 * size + 2, from_f<T>(NAN));
  }
  T* data() { return v.data() + n + 1; }
  T& operator[](size_t i) { return data()[i]; }
  void expect_guards(const std::string& what) const {
    for (size_t i = 0; i < v.size(); ++i)
      if ((i <= n || i > 2 * n) && !std::isnan(to_f(v[i]))) {
        ++failures;
        std::printf("%s: written outside the tensor (element %lld)\n", what.c_str(),
                    static_cast<long long>(i) - static_cast<long long>(n + 1));
        return;
      }
  }
};

// Runs every block of a grid.  make(t, bx, by, bz) builds thread t's problem as the kernel
// does.  Per k-tile each thread gathers its registers, which land in the dense A (m, k) and
// B (k, n) tiles where the TileMaps put them; then the tile product, in float64.
template <typename T, Kind K, class P, class Make>
void emulate(const std::string& what, const dim3& grid, Make make) {
  using TL = Tiles<T, K>;
  using TA = typename TL::AMap;
  using TB = typename TL::BMap;
  constexpr int BM = TL::BM, BN = TL::BN, BK = TL::BK;
  std::vector<P> threads;
  std::vector<double> acc(BM * BN), a(BM * BK), b(BK * BN);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        ++blocks;
        threads.clear();
        for (int t = 0; t < TL::THREADS; ++t) threads.push_back(make(t, bx, by, bz));
        const P& block = threads[0];
        for (const P& th : threads) {  // the loop's bounds are block-uniform
          bool same = th.num_phases() == block.num_phases();
          for (int ph = 0; same && ph < block.num_phases(); ++ph)
            same = th.phase_len(ph) == block.phase_len(ph);
          if (!same && failures++ < 20)
            std::printf("%s: block (%u, %u, %u) phases differ between threads\n", what.c_str(),
                        bx, by, bz);
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        Cursor cur{0, 0};
        skip_empty(block, cur);
        while (!finished(block, cur)) {
          ++k_tiles;
          std::fill(a.begin(), a.end(), NAN);
          std::fill(b.begin(), b.end(), NAN);
          bool nan_read = false;  // a never-read weight column, even if its product is unused
          for (int t = 0; t < TL::THREADS; ++t) {
            T ra[TA::ELEMS], rb[TB::ELEMS];
            threads[t].gather(cur, ra, rb);
            for (const T& v : ra) nan_read |= std::isnan(to_f(v));
            for (const T& v : rb) nan_read |= std::isnan(to_f(v));
            for (int i = 0; i < TA::ELEMS; ++i) {  // A stored [k][m] (A_KM) or [m][k]
              const int m = TL::A_KM ? TA::fast(t) : TA::slow(t, i);
              const int k = TL::A_KM ? TA::slow(t, i) : TA::fast(t);
              a[m * BK + k] = to_f(ra[i]);
            }
            for (int i = 0; i < TB::ELEMS; ++i)  // B stored [n][k]
              b[TB::fast(t) * BN + TB::slow(t, i)] = to_f(rb[i]);
          }
          for (int m = 0; m < BM; ++m)
            for (int k = 0; k < BK; ++k)
              for (int n = 0; n < BN; ++n) acc[m * BN + n] += a[m * BK + k] * b[k * BN + n];
          if (nan_read && failures++ < 20)
            std::printf("%s: block (%u, %u, %u) gathered a never-read element\n", what.c_str(),
                        bx, by, bz);
          advance<BK>(block, cur);
        }
        for (int m = 0; m < BM; ++m)
          for (int n = 0; n < BN; ++n) block.store(m, n, static_cast<float>(acc[m * BN + n]));
      }
}

// ---- the layer ---------------------------------------------------------------------------------
struct Case {
  const char* name;
  int N, I, H, W, KH, KW, sh, sw, ph, pw, dh, dw;
  std::vector<int64_t> groups, k_ends;
  int I_f, o_T;
  bool coupled, x_channels_last, dy_channels_last, bias_bn;
};

Strides4 strides(bool channels_last, int64_t C, int64_t H, int64_t W) {
  return channels_last ? Strides4{C * H * W, 1, W * C, C} : Strides4{C * H * W, H * W, W, 1};
}

// The stored tensors of one expanded conv (w_frozen with NaN past each group's k_end) and, in
// float64, the dense (O, I, KH, KW) weight with the staircase's zeros, x and dy.
template <typename T>
struct Layer {
  const Case& c;
  int O_f = 0, O, I, I_f, o_T, KK, Ho, Wo;
  ConvShape s{};
  Strides4 sx, sdy;
  Guarded<T> wf, wn, wc, bf, bn, x, dy;
  std::vector<double> Wd, xd, dyd, bias;  // xd, dyd indexed like x, dy (through sx, sdy)
  std::vector<float> bn_scale, bn_shift;
  ConvWeights weights;

  explicit Layer(const Case& cs) : c(cs), I(cs.I), I_f(cs.I_f), o_T(cs.o_T) {
    for (int64_t g : c.groups) O_f += static_cast<int>(g);
    O = O_f + o_T;
    KK = c.KH * c.KW;
    s.dtype = std::is_same<T, float>::value ? DType::kFloat32 : DType::kFloat16;
    ConvGeometry& g = s.geo;
    g = ConvGeometry{c.N, c.H, c.W, 0, 0, c.KH, c.KW, c.sh, c.sw, c.ph, c.pw, c.dh, c.dw};
    g.out_h = Ho = (c.H + 2 * c.ph - c.dh * (c.KH - 1) - 1) / c.sh + 1;
    g.out_w = Wo = (c.W + 2 * c.pw - c.dw * (c.KW - 1) - 1) / c.sw + 1;
    s.in_channels = I;
    s.frozen_in = I_f;
    s.frozen_out = O_f;
    s.new_out = o_T;
    s.num_frozen_groups = static_cast<int>(c.groups.size());
    s.frozen_out_groups = c.groups.data();
    s.frozen_k_ends = c.k_ends.data();
    sx = strides(c.x_channels_last, I, c.H, c.W);
    sdy = strides(c.dy_channels_last, O, Ho, Wo);

    std::mt19937 rng(1);
    auto rnd = [&]() { return static_cast<double>(static_cast<int>(rng() % 5) - 2); };
    wf.reset(static_cast<size_t>(O_f) * I_f * KK);
    wn.reset(static_cast<size_t>(o_T) * I * KK);
    wc.reset(static_cast<size_t>(O_f) * (I - I_f) * KK);
    Wd.assign(static_cast<size_t>(O) * I * KK, 0.0);
    for (int gi = 0, r0 = 0; gi < static_cast<int>(c.groups.size()); r0 += c.groups[gi++])
      for (int o = r0; o < r0 + c.groups[gi]; ++o)
        for (int ci = 0; ci < c.k_ends[gi]; ++ci)
          for (int q = 0; q < KK; ++q)
            wf[(o * I_f + ci) * KK + q] = from_f<T>(Wd[(o * I + ci) * KK + q] = rnd());
    if (c.coupled)
      for (int o = 0; o < O_f; ++o)
        for (int ci = I_f; ci < I; ++ci)
          for (int q = 0; q < KK; ++q)
            wc[(o * (I - I_f) + ci - I_f) * KK + q] = from_f<T>(Wd[(o * I + ci) * KK + q] = rnd());
    for (int o = 0; o < o_T; ++o)
      for (int ci = 0; ci < I; ++ci)
        for (int q = 0; q < KK; ++q)
          wn[(o * I + ci) * KK + q] = from_f<T>(Wd[((O_f + o) * I + ci) * KK + q] = rnd());
    bias.assign(O, 0.0);
    bf.reset(O_f);
    bn.reset(o_T);
    for (int o = 0; o < O; ++o) {
      const double v = c.bias_bn ? rnd() : 0.0;
      (o < O_f ? bf[o] : bn[o - O_f]) = from_f<T>(bias[o] = v);
      if (o < O_f) {  // exact in fp32: multiples of 0.5
        bn_scale.push_back(0.5f * (o % 3 + 1));
        bn_shift.push_back((o % 4) - 1.5f);
      }
    }
    fill(x, xd, static_cast<size_t>(c.N) * I * c.H * c.W, rnd);
    fill(dy, dyd, static_cast<size_t>(c.N) * O * Ho * Wo, rnd);
    weights = ConvWeights{wf.data(), wn.data(), c.coupled ? wc.data() : nullptr};
  }
  template <class R>
  static void fill(Guarded<T>& v, std::vector<double>& vd, size_t n, R& rnd) {
    v.reset(n);
    vd.resize(n);
    for (size_t i = 0; i < n; ++i) v[i] = from_f<T>(vd[i] = rnd());
  }
  int64_t xi(int n, int ci, int h, int w) const {
    return n * sx.n + ci * sx.c + h * sx.h + w * sx.w;
  }
  int64_t dyi(int n, int o, int ho, int wo) const {
    return n * sdy.n + o * sdy.c + ho * sdy.h + wo * sdy.w;
  }
  double w(int o, int ci, int kh, int kw) const {
    return Wd[((o * I + ci) * c.KH + kh) * c.KW + kw];
  }
  // The input row (column) that output row ho (column wo) reads through tap kh (kw); may lie
  // outside the image.
  int hi(int ho, int kh) const { return ho * c.sh - c.ph + kh * c.dh; }
  int wi(int wo, int kw) const { return wo * c.sw - c.pw + kw * c.dw; }
  bool inside(int h, int w) const { return h >= 0 && h < c.H && w >= 0 && w < c.W; }
};

// ---- the three products ------------------------------------------------------------------------
template <typename T>
void check_forward(Layer<T>& L, const std::string& tag) {
  const Case& c = L.c;
  Guarded<T> y;
  y.reset(static_cast<size_t>(c.N) * L.O * L.Ho * L.Wo);
  FwdParams p;
  dim3 grid;
  if (build_fwd<T>(L.s, L.weights, L.x.data(), L.sx, c.bias_bn ? L.bf.data() : nullptr,
                   c.bias_bn ? L.bn.data() : nullptr, y.data(), p, grid) != cudaSuccess) {
    ++failures;
    std::printf("%s: build_fwd refused\n", tag.c_str());
    return;
  }
  p.bn_scale = c.bias_bn ? L.bn_scale.data() : nullptr;  // as conv2d_forward
  p.bn_shift = c.bias_bn ? L.bn_shift.data() : nullptr;
  emulate<T, Kind::kFwd, FwdProblem<T>>(tag + " fwd", grid, [&](int t, int bx, int by, int) {
    return FwdProblem<T>(p, t, bx, by);
  });
  y.expect_guards(tag + " y");
  Check check(tag + " y");
  for (int n = 0; n < c.N; ++n)
    for (int o = 0; o < L.O; ++o)
      for (int ho = 0; ho < L.Ho; ++ho)
        for (int wo = 0; wo < L.Wo; ++wo) {
          double v = L.bias[o];
          for (int ci = 0; ci < L.I; ++ci)
            for (int kh = 0; kh < c.KH; ++kh)
              for (int kw = 0; kw < c.KW; ++kw)
                if (L.inside(L.hi(ho, kh), L.wi(wo, kw)))
                  v += L.w(o, ci, kh, kw) * L.xd[L.xi(n, ci, L.hi(ho, kh), L.wi(wo, kw))];
          if (o < L.O_f && c.bias_bn) v = v * L.bn_scale[o] + L.bn_shift[o];
          check(y[((static_cast<size_t>(n) * L.O + o) * L.Ho + ho) * L.Wo + wo], v, n, o, ho,
                wo);
        }
}

// With need_old, a second launch with an infinity in dy at (image 1, first row of a frozen group
// whose k_end lies inside the old channels, pixel 0): it must reach dx at the channels that group
// reads (< k_end, and the new ones where coupled; Inf * w, NaN where w is 0) and nowhere else
// (the old channels are tiled in bands cut at every k_end; a tile across k_end once multiplied
// it by the zeroed weights: NaN).  (A NaN would be gathered as a never-read element.)
template <typename T>
void check_input_grad(Layer<T>& L, bool need_old, const std::string& tag) {
  const Case& c = L.c;
  const size_t size = static_cast<size_t>(c.N) * L.I * c.H * c.W;
  Guarded<T> dx;
  dx.reset(size);
  DxParams p;
  dim3 grid;
  if (build_dx<T>(L.s, L.weights, L.dy.data(), L.sdy, need_old, dx.data(), p, grid) !=
      cudaSuccess) {
    ++failures;
    std::printf("%s: build_dx refused\n", tag.c_str());
    return;
  }
  auto at = [&](int n, int ci, int h, int w) {
    return ((static_cast<size_t>(n) * L.I + ci) * c.H + h) * c.W + w;
  };
  // Launch, then compare with the float64 reference: every output pixel's gradient scattered
  // back through every tap; dy at `inf` (if any) is an infinity that frozen row `inf_o`
  // sends to the channels below `inf_k_end` (and the new ones where coupled) only.
  auto run = [&](const std::string& what, int64_t inf, int inf_o, int inf_k_end) {
    emulate<T, Kind::kDx, DxProblem<T>>(what, grid, [&](int t, int bx, int by, int) {
      return DxProblem<T>(p, t, bx, by);
    });
    dx.expect_guards(what);
    std::vector<double> ref(size, 0.0);
    for (int n = 0; n < c.N; ++n)
      for (int o = 0; o < L.O; ++o)
        for (int ho = 0; ho < L.Ho; ++ho)
          for (int wo = 0; wo < L.Wo; ++wo)
            for (int ci = need_old ? 0 : L.I_f; ci < L.I; ++ci) {
              const int64_t i = L.dyi(n, o, ho, wo);
              const bool poisoned = i == inf;
              if (poisoned && o == inf_o && ci >= inf_k_end && !(c.coupled && ci >= L.I_f))
                continue;  // the infinity never meets this channel
              const double g = poisoned ? INFINITY : L.dyd[i];
              for (int kh = 0; kh < c.KH; ++kh)
                for (int kw = 0; kw < c.KW; ++kw)
                  if (L.inside(L.hi(ho, kh), L.wi(wo, kw)))
                    ref[at(n, ci, L.hi(ho, kh), L.wi(wo, kw))] += L.w(o, ci, kh, kw) * g;
            }
    Check check(what);
    for (int n = 0; n < c.N; ++n)
      for (int ci = 0; ci < L.I; ++ci)
        for (int h = 0; h < c.H; ++h)
          for (int w = 0; w < c.W; ++w)
            check(dx[at(n, ci, h, w)], ref[at(n, ci, h, w)], n, ci, h, w);
  };
  run(tag + " dx", -1, -1, 0);
  if (!need_old || c.N < 2) return;
  for (int gi = 0, r0 = 0; gi < static_cast<int>(c.groups.size()); r0 += c.groups[gi++]) {
    const int k_end = static_cast<int>(c.k_ends[gi]);
    if (c.groups[gi] == 0 || k_end == 0 || k_end >= L.I_f) continue;
    const int64_t i = L.dyi(1, r0, 0, 0);
    const T kept = L.dy[i];
    L.dy[i] = from_f<T>(INFINITY);
    run(tag + " dx, Inf in dy[1, " + std::to_string(r0) + ", 0, 0]", i, r0, k_end);
    L.dy[i] = kept;
    return;  // one group a case
  }
}

// dW_new (dy channels O_f.., every x channel) or dW_couple (dy channels ..O_f, x channels I_f..).
template <typename T>
void check_weight_grad(Layer<T>& L, bool couple, const ConvWeightGradPlan& plan,
                       const std::string& tag) {
  const Case& c = L.c;
  const int dy_c0 = couple ? 0 : L.O_f, m = couple ? L.O_f : L.o_T;
  const int x_c0 = couple ? L.I_f : 0, n_ch = couple ? L.I - L.I_f : L.I;
  const int64_t mn = static_cast<int64_t>(m) * n_ch * L.KK;
  Guarded<float> ws;
  Guarded<T> out;
  ws.reset(plan.splits > 1 ? plan.splits * mn : 0);
  out.reset(mn);
  DwParams p;
  dim3 grid;
  if (build_dw<T>(L.s.geo, L.dy.data(), L.sdy, dy_c0, m, L.x.data(), L.sx, x_c0, n_ch,
                  out.data(), plan, ws.data(), p, grid) != cudaSuccess) {
    ++failures;
    std::printf("%s: build_dw refused\n", tag.c_str());
    return;
  }
  using TL = Tiles<T, Kind::kDw>;
  std::vector<std::vector<DwCol>> tables(grid.y);  // as conv_dw_kernel: one per column of blocks
  for (unsigned by = 0; by < grid.y; ++by)
    for (int j = 0; j < TL::BN; ++j) tables[by].push_back(dw_col(p, by * TL::BN + j));
  emulate<T, Kind::kDw, DwProblem<T>>(tag + " dW", grid, [&](int t, int bx, int by, int bz) {
    return DwProblem<T>(p, tables[by].data(), t, bx, by, bz);
  });
  ws.expect_guards(tag + " dW workspace");
  out.expect_guards(tag + " dW");
  if (p.splits > 1)  // as conv_split_sum_kernel
    for (int64_t i = 0; i < mn; ++i) {
      float sum = 0.f;
      for (int k = 0; k < p.splits; ++k) sum += ws[k * mn + i];
      out[i] = from_f<T>(sum);
    }
  Check check(tag + " dW");
  for (int o = 0; o < m; ++o)
    for (int ci = 0; ci < n_ch; ++ci)
      for (int kh = 0; kh < c.KH; ++kh)
        for (int kw = 0; kw < c.KW; ++kw) {
          double v = 0;
          for (int n = 0; n < c.N; ++n)
            for (int ho = 0; ho < L.Ho; ++ho)
              for (int wo = 0; wo < L.Wo; ++wo)
                if (L.inside(L.hi(ho, kh), L.wi(wo, kw)))
                  v += L.dyd[L.dyi(n, dy_c0 + o, ho, wo)] *
                       L.xd[L.xi(n, x_c0 + ci, L.hi(ho, kh), L.wi(wo, kw))];
          check(out[((o * n_ch + ci) * c.KH + kh) * c.KW + kw], v, o, ci, kh, kw);
        }
}

// The splits to try: none, the planner's with many SMs, and (if that did not split) three by
// hand, pixels_per_split not a multiple of BK.
std::vector<ConvWeightGradPlan> plans(DType dt, int64_t pixels, int64_t m, int64_t n_ch, int kk) {
  std::vector<ConvWeightGradPlan> out = {plan_conv_weight_grad(dt, pixels, m, n_ch, kk, 1),
                                         plan_conv_weight_grad(dt, pixels, m, n_ch, kk, 1000)};
  if (out.back().splits == 1 && pixels >= 3) {
    const int64_t per = ceil_div(pixels, 3);
    const int splits = static_cast<int>(ceil_div(pixels, per));
    out.back() = {splits, per, static_cast<size_t>(splits) * m * n_ch * kk * sizeof(float)};
  }
  return out;
}

template <typename T>
void run(const Case& c) {
  const std::string tag =
      std::string("[") + c.name + (std::is_same<T, float>::value ? ", fp32]" : ", fp16]");
  Layer<T> L(c);
  check_forward(L, tag);
  for (bool need_old : {false, true})
    check_input_grad(L, need_old, tag + (need_old ? " need_old=1" : " need_old=0"));
  for (bool couple : {false, true}) {
    const int m = couple ? L.O_f : L.o_T, n_ch = couple ? L.I - L.I_f : L.I;
    if ((couple && !c.coupled) || m == 0 || n_ch == 0) continue;  // no dW to compute
    const int64_t pixels = static_cast<int64_t>(c.N) * L.Ho * L.Wo;
    for (const ConvWeightGradPlan& plan : plans(L.s.dtype, pixels, m, n_ch, L.KK))
      check_weight_grad(L, couple,
                        plan, tag + (couple ? " couple" : " new") + " splits=" +
                                  std::to_string(plan.splits));
  }
}

}  // namespace

int main() {
  const std::vector<Case> cases = {
      // name, N, I, H, W, KH, KW, sh, sw, ph, pw, dh, dw, groups, k_ends, I_f, o_T,
      // coupled, x channels_last, dy channels_last, bias + BatchNorm
      {"3x3", 2, 7, 9, 8, 3, 3, 1, 1, 1, 1, 1, 1, {5, 3}, {4, 6}, 6, 4,
       false, false, false, true},
      {"stride, dilation, wide group", 2, 9, 11, 10, 3, 2, 2, 1, 1, 0, 1, 2, {70, 0, 6},
       {5, 0, 7}, 7, 66, true, true, false, true},
      {"1x1", 1, 5, 7, 7, 1, 1, 1, 1, 0, 0, 1, 1, {3}, {2}, 3, 2, true, false, false, true},
      {"5x3 strided", 3, 6, 13, 9, 5, 3, 3, 2, 2, 1, 2, 1, {4, 4}, {0, 5}, 5, 3,
       false, true, true, true},
      {"many channels", 1, 40, 6, 6, 3, 3, 1, 1, 1, 1, 1, 1, {20, 50}, {33, 35}, 35, 5,
       true, false, true, true},
      {"long reduction", 2, 3, 20, 17, 3, 3, 1, 1, 1, 1, 1, 1, {4}, {2}, 2, 5,
       true, false, false, true},
      {"no new inputs or rows", 2, 4, 5, 6, 2, 2, 2, 2, 0, 1, 1, 1, {3}, {4}, 4, 0,
       true, true, true, false},
  };
  for (const Case& c : cases) {
    run<float>(c);
    run<__half>(c);
  }
  if (failures) {
    std::printf("tile emulation FAILED (%d)\n", failures);
    return 1;
  }
  std::printf("tile emulation OK (%lld blocks, %lld k-tiles, %lld elements compared)\n",
              (long long)blocks, (long long)k_tiles, (long long)compared);
  return 0;
}
