// Host emulation of the expanded-linear GEMM tiles (csrc/expanded_linear_kernels.cu), checked
// against a float64 dense reference of the expanded layer.  Built with nvcc and run on the CPU
// by test_tile_emulation.py; no GPU involved.
//
// The real code: the launch parameters and grids (build_fwd, build_dx, build_dw, the planner)
// and each block's problem (fwd_problem and dx_problem: the block order and its tile;
// FwdProblem, DxProblem, DwProblem: phases, TileSrc pointers, row and column masks).  Walked
// the way gemm_mainloop walks them, BK-deep k-tiles, for the tile shape of every math a dtype
// can run: SimtMath (fp32), WmmaMath and WgmmaMath (fp16; its tiles unswizzled and 128-byte
// swizzled).  Restated here, marked "as
// <kernel>": the dW kernel's first lines and each kernel's epilogue, which live inside the
// __global__ functions.
//
// Operands hold small integers, so every sum is exact in fp32 and the comparison is exact.
// Every buffer starts as NaN, its row padding and the frozen columns past each group's k_end
// included: reading such an element is a fault, and an output left unwritten shows as NaN.
// Any access outside every buffer is a fault too.
#include "expanded_linear_kernels.cu"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

using namespace expanse_fast;

namespace {

int failures = 0;
int64_t blocks = 0, k_tiles = 0, compared = 0;  // what was emulated, for the summary line
int64_t copies_whole = 0, copies_checked = 0;     // operand tiles by copy path (tile_inside)

// ---- buffers ----------------------------------------------------------------------------------
struct Extent {
  uintptr_t lo, hi;
};
std::vector<Extent> extents;  // of every live buffer

void fault(const char* what, const void* p) {
  if (failures++ < 20) std::printf("  %s at %p\n", what, p);
}

template <typename T>
bool in_bounds(const T* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (const Extent& e : extents)
    if (a >= e.lo && a + sizeof(T) <= e.hi) return true;
  fault("access outside every buffer", p);
  return false;
}

// A row-major (rows, cols) matrix with row stride cols + pad, every element NaN at first, and
// one NaN guard row past its end (outside its extent): a copy that reads a row too far copies
// NaN, and a store there is an access outside every buffer.
template <typename T>
struct Mat {
  int64_t rows, cols, ld;
  std::vector<T> v;
  Mat(int64_t r, int64_t c, int64_t pad)
      : rows(r), cols(c), ld(c + pad), v((r + 1) * (c + pad), from_f<T>(NAN)) {
    extents.push_back(extent());
  }
  ~Mat() {
    for (size_t i = 0; i < extents.size(); ++i)
      if (extents[i].lo == extent().lo && extents[i].hi == extent().hi) {
        extents.erase(extents.begin() + i);
        break;
      }
  }
  Mat(const Mat&) = delete;
  Mat& operator=(const Mat&) = delete;
  Extent extent() const {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(v.data());
    return {lo, lo + rows * ld * sizeof(T)};
  }
  T* data() { return v.data(); }
  T& at(int64_t r, int64_t c) { return v[r * ld + c]; }
};

template <typename T>
void store(T* p, float value) {
  if (in_bounds(p)) *p = from_f<T>(value);
}

// Compares every element with its float64 reference, rounded as the kernel rounds its fp32
// value, and checks that the row padding and the guard row past the end were left alone (the
// staged epilogues write through plain pointers, not through store()).
template <typename T, class Ref>
void expect(const std::string& what, Mat<T>& got, Ref ref) {
  int bad = 0;
  for (int64_t c = 0; c < got.ld; ++c)
    if (!std::isnan(to_f(got.at(got.rows, c))) && bad++ < 5)
      std::printf("  %s: guard row past the end written at column %lld\n", what.c_str(),
                  (long long)c);
  for (int64_t r = 0; r < got.rows; ++r)
    for (int64_t c = 0; c < got.ld; ++c) {
      const float g = to_f(got.at(r, c));
      if (c >= got.cols) {
        if (!std::isnan(g) && bad++ < 5)
          std::printf("  %s: padding [%lld, %lld] written (%g)\n", what.c_str(), (long long)r,
                      (long long)c, g);
        continue;
      }
      const float want = to_f(from_f<T>(static_cast<float>(ref(r, c))));
      ++compared;
      if (!(g == want || (std::isnan(g) && std::isnan(want))) && bad++ < 5)
        std::printf("  %s[%lld, %lld] = %g, want %g\n", what.c_str(), (long long)r,
                    (long long)c, g, want);
    }
  if (bad) {
    ++failures;
    std::printf("%s: %d mismatches\n", what.c_str(), bad);
  }
}

// ---- the main loop ----------------------------------------------------------------------------
// Element (r, c) of an operand tile as Layout::load_a / load_b copy it (copy_chunk): memory
// inside the TileSrc's rows x cols, zero outside.  Reading a NaN (row padding, a frozen column
// past k_end) is a fault even where the product would not reach a stored output.
template <typename T>
double tile_at(const TileSrc<T>& src, int r, int c) {
  if (r >= src.rows || c >= src.cols) return 0.0;
  const T* p = src.ptr + r * src.ld + c;
  if (!in_bounds(p)) return NAN;
  const double v = to_f(*p);
  if (std::isnan(v)) fault("read of an element never to be read", p);
  return v;
}

// The kernels' own copy of one stage (Layout::load_a / load_b, run for every thread of the
// block; cp.async is a plain 16-byte copy on the host) must leave in shared memory, as
// Layout::a_at / b_at read it, exactly the operand elements tile_at restates: a (BM x BK) and
// b (BK x BN) here.  The stage starts as NaN, so a chunk left unwritten shows.
template <class M, bool AK, bool BKM, typename T>
void check_stage_copy(const TileSrc<T>& ta, const TileSrc<T>& tb, const std::vector<double>& a,
                      const std::vector<double>& b) {
  using L = typename M::template Layout<AK, BKM>;
  constexpr int BM = M::BM, BN = M::BN, BK = M::BK;
  std::vector<uint4> raw((L::STAGE * sizeof(T) + 15) / 16);
  unsigned char* bytes = reinterpret_cast<unsigned char*>(raw.data());
  T* As = L::a(bytes, 0);
  T* Bs = L::b(bytes, 0);
  for (int i = 0; i < L::STAGE; ++i) As[i] = from_f<T>(NAN);
  for (int tid = 0; tid < M::THREADS; ++tid) {
    L::load_a(As, ta, tid);
    L::load_b(Bs, tb, tid);
  }
  copies_whole += (AK ? tile_inside<BM, BK>(ta) : tile_inside<BK, BM>(ta)) +
                  (BKM ? tile_inside<BN, BK>(tb) : tile_inside<BK, BN>(tb));
  copies_checked += 2;
  int bad = 0;
  for (int m = 0; m < BM; ++m)
    for (int k = 0; k < BK; ++k) {
      const double got = to_f(L::a_at(As, m, k)), want = a[m * BK + k];
      if (!(got == want) && !std::isnan(want) && bad++ < 3)
        std::printf("  stage copy: A(%d, %d) = %g, want %g\n", m, k, got, want);
    }
  for (int k = 0; k < BK; ++k)
    for (int n = 0; n < BN; ++n) {
      const double got = to_f(L::b_at(Bs, k, n)), want = b[k * BN + n];
      if (!(got == want) && !std::isnan(want) && bad++ < 3)
        std::printf("  stage copy: B(%d, %d) = %g, want %g\n", k, n, got, want);
    }
  if (bad) ++failures;
}

// A block's fp32 accumulators (exact here) as gemm_mainloop leaves them: the phases in order,
// empty ones skipped, BK-deep k-tiles.  The kernel's Layout<AK, BKM> reads A(m, k) from row m
// (AK) or row k of tile_a, B(k, n) from row n (BKM) or row k of tile_b.  colsum (if given): the
// fused bias gradient, thread m < BM summing A(m, k) over k.
template <class M, bool AK, bool BKM, class P>
std::vector<double> block_gemm(const P& prob, std::vector<double>* colsum) {
  constexpr int BM = M::BM, BN = M::BN, BK = M::BK;
  std::vector<double> acc(BM * BN, 0.0), a(BM * BK), b(BK * BN);
  ++blocks;
  const int np = prob.num_phases();
  int p = 0, k0 = 0;
  auto skip_empty = [&]() {
    while (p < np && k0 >= prob.phase_len(p)) { ++p; k0 = 0; }
  };
  for (skip_empty(); p < np; k0 += BK, skip_empty()) {
    const auto ta = prob.tile_a(p, k0);
    const auto tb = prob.tile_b(p, k0);
    ++k_tiles;
    for (int m = 0; m < BM; ++m)
      for (int k = 0; k < BK; ++k) a[m * BK + k] = AK ? tile_at(ta, m, k) : tile_at(ta, k, m);
    for (int k = 0; k < BK; ++k)
      for (int n = 0; n < BN; ++n) b[k * BN + n] = BKM ? tile_at(tb, n, k) : tile_at(tb, k, n);
    check_stage_copy<M, AK, BKM>(ta, tb, a, b);
    for (int m = 0; m < BM; ++m)
      for (int k = 0; k < BK; ++k) {
        const double av = a[m * BK + k];
        for (int n = 0; n < BN; ++n) acc[m * BN + n] += av * b[k * BN + n];
        if (colsum != nullptr) (*colsum)[m] += av;
      }
  }
  return acc;
}

// ---- the layer --------------------------------------------------------------------------------
struct Case {
  const char* name;
  int64_t rows, in, frozen_in, new_out;
  std::vector<int64_t> groups, k_ends;
  bool coupled, bias_frozen, bias_new;
  Activation act;
  int64_t pre_col0;  // -1: no pre-activation store
  // row strides a multiple of 16 bytes (else odd): whole tiles copy unchecked
  bool aligned = false;
};

// The kernels' own fp32 activations (activate, host-callable), applied to exact values: what
// is compared here is where each value goes; how close those functions come to torch's is
// the GPU tests' part (float64 references).
double activation(Activation a, double v) {
  return activate(static_cast<int>(a), static_cast<float>(v));
}

int64_t sum(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t e : v) s += e;
  return s;
}

// The stored tensors of one expanded layer (odd row strides) and, in float64, the dense
// (O, I) weight with the staircase's zeros, x (N, I) and dy (N, O).
template <typename T>
struct Layer {
  const Case& c;
  const int64_t N, I, I_f, O_f, o_T, O;
  Mat<T> wf, wn, wc, bf, bn, x, dy;
  std::vector<double> W, X, DY, bias;
  LinearShape shape;
  LinearWeights weights;

  // Row padding: odd, or up to a multiple of 8 elements (16 bytes in fp16) when aligned.
  static int64_t pad(const Case& cs, int64_t cols, int64_t odd) {
    return cs.aligned ? (8 - cols % 8) % 8 + 8 : odd;
  }

  explicit Layer(const Case& cs)
      : c(cs), N(cs.rows), I(cs.in), I_f(cs.frozen_in), O_f(sum(cs.groups)), o_T(cs.new_out),
        O(O_f + o_T), wf(O_f, I_f, pad(cs, I_f, 1)), wn(o_T, I, pad(cs, I, 2)),
        wc(O_f, I - I_f, pad(cs, I - I_f, 3)), bf(1, O_f, 0), bn(1, o_T, 0),
        x(N, I, pad(cs, I, 3)), dy(N, O, pad(cs, O, 1)), W(O * I, 0.0), X(N * I), DY(N * O),
        bias(O, 0.0) {
    std::mt19937 rng(7);
    auto rnd = [&]() { return static_cast<double>(static_cast<int>(rng() % 5) - 2); };
    auto put = [](Mat<T>& m, int64_t r, int64_t col, double v) { m.at(r, col) = from_f<T>(v); };
    for (int64_t g = 0, r0 = 0; g < static_cast<int64_t>(c.groups.size()); r0 += c.groups[g++])
      for (int64_t o = r0; o < r0 + c.groups[g]; ++o)
        for (int64_t k = 0; k < c.k_ends[g]; ++k) put(wf, o, k, W[o * I + k] = rnd());
    if (c.coupled)
      for (int64_t o = 0; o < O_f; ++o)
        for (int64_t k = I_f; k < I; ++k) put(wc, o, k - I_f, W[o * I + k] = rnd());
    for (int64_t o = 0; o < o_T; ++o)
      for (int64_t k = 0; k < I; ++k) put(wn, o, k, W[(O_f + o) * I + k] = rnd());
    for (int64_t o = 0; o < O_f; ++o)
      if (c.bias_frozen) put(bf, 0, o, bias[o] = rnd());
    for (int64_t o = 0; o < o_T; ++o)
      if (c.bias_new) put(bn, 0, o, bias[O_f + o] = rnd());
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < I; ++k) put(x, n, k, X[n * I + k] = rnd());
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < O; ++o) put(dy, n, o, DY[n * O + o] = rnd());
    shape = LinearShape{std::is_same<T, float>::value ? DType::kFloat32 : DType::kFloat16,
                        N, I, I_f, O_f, o_T, static_cast<int>(c.groups.size()),
                        c.groups.data(), c.k_ends.data()};
    weights = LinearWeights{wf.data(), wf.ld, wn.data(), wn.ld,
                            c.coupled ? wc.data() : nullptr, wc.ld};
  }
};

// ---- forward ----------------------------------------------------------------------------------
// A forward's outputs (y, and pre where the case stores it, both NaN-padded), its epilogue
// and output segments, and the check of what the emulated launches wrote.
template <typename T>
struct FwdOutputs {
  Layer<T>& L;
  const bool has_pre;
  Mat<T> y, pre;
  LinearEpilogue epi;
  std::vector<FwdSeg> segs;
  explicit FwdOutputs(Layer<T>& layer)
      : L(layer), has_pre(layer.c.pre_col0 >= 0),
        y(L.N, L.O, Layer<T>::pad(L.c, L.O, 5)),
        pre(L.N, has_pre ? L.O - L.c.pre_col0 : 0,
            Layer<T>::pad(L.c, has_pre ? L.O - L.c.pre_col0 : 0, 2)) {
    epi.activation = L.c.act;
    epi.pre = has_pre ? pre.data() : nullptr;
    epi.ld_pre = pre.ld;
    epi.pre_col0 = has_pre ? L.c.pre_col0 : 0;
    segs = fwd_segments<T>(L.shape, L.weights, L.c.bias_frozen ? L.bf.data() : nullptr,
                           L.c.bias_new ? L.bn.data() : nullptr);
  }
  void expect_reference(const std::string& tag) {
    auto pre_ref = [&](int64_t n, int64_t o) {
      double v = L.bias[o];
      for (int64_t k = 0; k < L.I; ++k) v += L.X[n * L.I + k] * L.W[o * L.I + k];
      return v;
    };
    expect(tag + " y", y,
           [&](int64_t n, int64_t o) { return activation(L.c.act, pre_ref(n, o)); });
    if (has_pre) expect(tag + " pre", pre, [&](int64_t n, int64_t j) {
      return pre_ref(n, L.c.pre_col0 + j);
    });
  }
};

template <typename T, class M>
void check_forward(Layer<T>& L, const std::string& tag) {
  FwdOutputs<T> out(L);
  Mat<T>& y = out.y;
  const LinearEpilogue& epi = out.epi;
  const std::vector<FwdSeg>& segs = out.segs;
  for (size_t first = 0; first < segs.size(); first += kSegsPerLaunch) {
    FwdParams p;
    dim3 grid;
    if (build_fwd<M>(segs, first, L.shape, L.x.data(), L.x.ld, y.data(), y.ld, epi, p, grid)) {
      ++failures;
      std::printf("%s: build_fwd refused\n", tag.c_str());
      return;
    }
    for (int64_t b = 0; b < static_cast<int64_t>(grid.x) * grid.y; ++b) {
      // as linear_fwd_kernel
      const FwdProblem<T> prob = fwd_problem<T, M>(p, b, grid.x, grid.y);
      const FwdSeg& s = prob.s;
      const int64_t m0 = prob.m0;
      const int n0 = prob.n0;
      const std::vector<double> acc = block_gemm<M, true, true>(prob, nullptr);
      T* out = static_cast<T*>(p.y);
      T* pre_out = static_cast<T*>(p.pre);
      const T* bias = static_cast<const T*>(s.bias);
      if constexpr (M::STAGED_EPILOGUE) {
        // every accumulator into the staged fp32 tile (its pad columns NaN), then the kernel's
        // own write-out (bias, pre, activation), run for every thread
        std::vector<float> staged(M::BM * M::OUT_LD_F32, NAN);
        for (int m = 0; m < M::BM; ++m)
          for (int n = 0; n < M::BN; ++n)
            staged[m * M::OUT_LD_F32 + n] = static_cast<float>(acc[m * M::BN + n]);
        for (int tid = 0; tid < M::THREADS; ++tid)
          fwd_write_out<T, M>(p, s, staged.data(), m0, n0, tid);
      } else {
        for (int m = 0; m < M::BM; ++m)
          for (int n = 0; n < M::BN; ++n) {
            const int64_t row = m0 + m;
            const int col = n0 + n;
            if (row >= p.rows || col >= s.rows) continue;
            float v = static_cast<float>(acc[m * M::BN + n]);
            if (bias != nullptr && in_bounds(bias + col)) v += to_f(bias[col]);
            const int64_t out_col = s.col0 + col;
            if (pre_out != nullptr && out_col >= p.pre_col0)
              store(pre_out + row * p.ld_pre + out_col - p.pre_col0, v);
            const double act = activation(static_cast<Activation>(p.activation), v);
            store(out + row * p.ld_y + out_col, static_cast<float>(act));
          }
      }
    }
  }
  out.expect_reference(tag);
}

// ---- forward through the copy engine (linear_forward_tma) --------------------------------------
// Where every operand of every launch is one the engine takes (tma::usable), as the launcher
// decides: each block's k-tiles as the engine would fill them from the segment's four
// operands (fwd_tma_operands, tma::box_element: zeros outside the operand), placed by the
// 128-byte swizzle, read back through the kernel's layout, then the kernel's write-out.
int64_t tma_launches = 0;
template <typename T>
void check_forward_tma(Layer<T>& L, const std::string& tag) {
  using M = WgmmaMath<T, true>;
  using Lay = typename M::template Layout<true, true>;
  constexpr int BM = M::BM, BN = M::BN, BK = M::BK, VEC = 16 / sizeof(T);
  FwdOutputs<T> out(L);
  Mat<T>& y = out.y;
  const LinearEpilogue& epi = out.epi;
  const std::vector<FwdSeg>& segs = out.segs;
  std::vector<FwdParams> launches;
  std::vector<dim3> grids;
  for (size_t first = 0; first < segs.size(); first += kSegsPerLaunch) {
    FwdParams p;
    dim3 grid;
    if (build_fwd<M>(segs, first, L.shape, L.x.data(), L.x.ld, y.data(), y.ld, epi, p, grid))
      return;
    for (int si = 0; si < p.nseg; ++si) {
      tma::Operand ops[4];
      fwd_tma_operands<T, M>(p, si, ops);
      for (const tma::Operand& op : ops)
        if (op.cols > 0 && !tma::usable(op)) return;  // the launcher runs cp.async instead
    }
    launches.push_back(p);
    grids.push_back(grid);
  }
  std::vector<T> As(BM * BK), Bs(BN * BK);
  for (size_t li = 0; li < launches.size(); ++li) {
    const FwdParams& p = launches[li];
    ++tma_launches;
    for (int64_t b = 0; b < static_cast<int64_t>(grids[li].x) * grids[li].y; ++b) {
      const FwdProblem<T> prob = fwd_problem<T, M>(p, b, grids[li].x, grids[li].y);
      const FwdSeg& s = prob.s;
      tma::Operand ops[4];
      fwd_tma_operands<T, M>(p, static_cast<int>(&s - p.seg), ops);
      std::vector<double> acc(BM * BN, 0.0);
      ++blocks;
      auto box = [&](const tma::Operand& op, int64_t c0, int64_t r0, int rows, T* dst) {
        for (int r = 0; r < rows; ++r)
          for (int k = 0; k < BK; ++k) {
            const T v = tma::box_element(op, c0, r0, r, k, from_f<T>(0.f));
            if (std::isnan(to_f(v))) fault("the engine read an element never to be read", &v);
            dst[wgmma::tile_offset_sw128<BK, VEC>(r, k)] = v;
          }
      };
      for (int ph = 0; ph < prob.num_phases(); ++ph)
        for (int k0 = 0; k0 < prob.phase_len(ph); k0 += BK) {
          ++k_tiles;
          box(ops[ph], k0, prob.m0, BM, As.data());
          box(ops[2 + ph], k0, prob.n0, BN, Bs.data());
          for (int m = 0; m < BM; ++m)
            for (int k = 0; k < BK; ++k) {
              const double av = to_f(Lay::a_at(As.data(), m, k));
              for (int n = 0; n < BN; ++n) acc[m * BN + n] += av * to_f(Lay::b_at(Bs.data(), k, n));
            }
        }
      std::vector<float> staged(BM * M::OUT_LD_F32, NAN);
      for (int m = 0; m < BM; ++m)
        for (int n = 0; n < BN; ++n)
          staged[m * M::OUT_LD_F32 + n] = static_cast<float>(acc[m * BN + n]);
      for (int tid = 0; tid < M::THREADS; ++tid)
        fwd_write_out<T, M>(p, s, staged.data(), prob.m0, prob.n0, tid);
    }
  }
  out.expect_reference(tag + " tma");
}

// ---- input gradient ---------------------------------------------------------------------------
// With need_old, a second launch with an infinity in dy at (1, first row of a frozen group whose
// k_end lies inside the old columns): it must reach dx's row 1 at the columns that group reads
// (< k_end, and the new ones where coupled; Inf * w, NaN where w is 0) and nowhere else (the
// old columns are tiled in bands cut at every k_end; a tile across k_end once multiplied it by
// the zeroed weights: NaN).  (A NaN would be read as an element never to be read.)
template <typename T, class M>
void check_input_grad(Layer<T>& L, bool need_old, const std::string& tag) {
  Mat<T> dx(L.N, L.I, Layer<T>::pad(L.c, L.I, 7));
  DxParams p;
  dim3 grid;
  if (build_dx<M>(L.shape, L.weights, L.dy.data(), L.dy.ld, need_old, dx.data(), dx.ld, p,
                  grid)) {
    ++failures;
    std::printf("%s: build_dx refused\n", tag.c_str());
    return;
  }
  auto launch = [&]() {
    for (int64_t b = 0; b < static_cast<int64_t>(grid.x) * grid.y; ++b) {
      // as linear_dx_kernel
      const DxProblem<T> prob = dx_problem<T, M>(p, b, grid.x, grid.y);
      const int64_t m0 = prob.m0;
      const int c0 = prob.c0, c_end = prob.c_end;
      const std::vector<double> acc = block_gemm<M, true, false>(prob, nullptr);
      if constexpr (M::STAGED_EPILOGUE) {  // staged, then the kernel's write-out
        std::vector<T> dxs(M::BM * M::OUT_LD, from_f<T>(NAN));
        for (int m = 0; m < M::BM; ++m)
          for (int n = 0; n < M::BN; ++n)
            dxs[m * M::OUT_LD + n] = from_f<T>(static_cast<float>(acc[m * M::BN + n]));
        for (int tid = 0; tid < M::THREADS; ++tid)
          dx_write_out<T, M>(p, dxs.data(), m0, c0, c_end, tid);
      } else {
        for (int m = 0; m < M::BM; ++m)
          for (int n = 0; n < M::BN; ++n) {
            const int64_t row = m0 + m;
            const int col = c0 + n;
            if (row < p.rows && col < c_end)
              store(static_cast<T*>(p.dx) + row * p.ld_dx + col,
                    static_cast<float>(acc[m * M::BN + n]));
          }
      }
    }
  };
  auto ref = [&](int64_t n, int64_t k) {
    double v = 0;
    if (k >= L.I_f || need_old)
      for (int64_t o = 0; o < L.O; ++o) v += L.DY[n * L.O + o] * L.W[o * L.I + k];
    return v;
  };
  launch();
  expect(tag + " dx", dx, ref);
  if (!need_old || L.N < 2) return;
  for (int64_t g = 0, r0 = 0; g < static_cast<int64_t>(L.c.groups.size());
       r0 += L.c.groups[g++]) {
    const int64_t k_end = L.c.k_ends[g];
    if (L.c.groups[g] == 0 || k_end == 0 || k_end >= L.I_f) continue;
    const T kept = L.dy.at(1, r0);
    L.dy.at(1, r0) = from_f<T>(INFINITY);
    launch();
    L.dy.at(1, r0) = kept;
    expect(tag + " dx, Inf in dy[1, " + std::to_string(r0) + "]", dx,
           [&](int64_t n, int64_t k) {  // (coupled: every frozen row reads the new inputs)
             const bool reads = k < k_end || (L.c.coupled && k >= L.I_f);
             return n == 1 && reads ? ref(n, k) + INFINITY * L.W[r0 * L.I + k] : ref(n, k);
           });
    return;  // one group a case
  }
}

// ---- weight gradient --------------------------------------------------------------------------
// out (m, n) = dy[:, a_col0 : a_col0 + m]^T x[:, b_col0 : b_col0 + n], db (m) = column sums of
// the same dy columns; dW_new (a_col0 = O_f, b_col0 = 0) or dW_couple (a_col0 = 0, b_col0 = I_f).
template <typename T, class M>
void check_weight_grad(Layer<T>& L, bool couple, bool with_db, const WeightGradPlan& plan,
                       const std::string& tag) {
  const int64_t a_col0 = couple ? 0 : L.O_f, m = couple ? L.O_f : L.o_T;
  const int64_t b_col0 = couple ? L.I_f : 0, n = couple ? L.I - L.I_f : L.I;
  if (m == 0 || n == 0) return;  // linear_weight_grad launches no GEMM
  Mat<T> out(m, n, Layer<T>::pad(L.c, n, 3)), db(1, with_db ? m : 0, 0);
  Mat<float> ws(1, plan.splits > 1 ? plan.splits * (m * n + m) : 0, 0);
  DwParams p;
  dim3 grid;
  if (build_dw<M>(L.N, m, n, L.dy.data(), L.dy.ld, a_col0, L.x.data(), L.x.ld, b_col0,
                  out.data(), out.ld, with_db ? db.data() : nullptr, plan, ws.data(), p,
                  grid)) {
    ++failures;
    std::printf("%s: build_dw refused\n", tag.c_str());
    return;
  }
  const int64_t mn = static_cast<int64_t>(p.m) * p.n;
  for (int split = 0; split < static_cast<int>(grid.z); ++split)
    for (int by = 0; by < static_cast<int>(grid.y); ++by)
      for (int bx = 0; bx < static_cast<int>(grid.x); ++bx) {
        // as linear_dw_kernel
        const int m0 = bx * M::BM, n0 = by * M::BN;
        const int64_t r0 = split * p.rows_per_split;
        const int len =
            clamp_rows(p.rows - r0 < p.rows_per_split ? p.rows - r0 : p.rows_per_split);
        const DwProblem<T> prob{p, r0, m0, n0, len};
        const bool do_db = p.db != nullptr && by == 0;
        std::vector<double> colsum(M::BM, 0.0);
        const std::vector<double> acc =
            block_gemm<M, false, false>(prob, do_db ? &colsum : nullptr);
        for (int t = 0; do_db && t < M::BM && m0 + t < p.m; ++t) {
          const int mm = m0 + t;
          const float v = static_cast<float>(colsum[t]);
          if (p.splits == 1) {
            store(static_cast<T*>(p.db) + mm, v);
          } else {
            float* w = p.ws + p.splits * mn + static_cast<int64_t>(split) * p.m + mm;
            if (in_bounds(w)) *w = v;
          }
        }
        if constexpr (M::STAGED_EPILOGUE) {  // staged (fp32 partials or T), the kernel's write-out
          std::vector<float> part(M::BM * M::OUT_LD_F32, NAN);
          std::vector<T> dws(M::BM * M::OUT_LD, from_f<T>(NAN));
          for (int mi = 0; mi < M::BM; ++mi)
            for (int ni = 0; ni < M::BN; ++ni) {
              const float v = static_cast<float>(acc[mi * M::BN + ni]);
              part[mi * M::OUT_LD_F32 + ni] = v;
              dws[mi * M::OUT_LD + ni] = from_f<T>(v);
            }
          const void* staged = p.splits > 1 ? static_cast<const void*>(part.data())
                                             : static_cast<const void*>(dws.data());
          for (int tid = 0; tid < M::THREADS; ++tid)
            dw_write_out<T, M>(p, staged, m0, n0, split, tid);
        } else {
          for (int mi = 0; mi < M::BM; ++mi)
            for (int ni = 0; ni < M::BN; ++ni) {
              const int mm = m0 + mi, nn = n0 + ni;
              if (mm >= p.m || nn >= p.n) continue;
              const float v = static_cast<float>(acc[mi * M::BN + ni]);
              if (p.splits == 1) {
                store(static_cast<T*>(p.out) + mm * p.ld_out + nn, v);
              } else {
                float* w = p.ws + split * mn + static_cast<int64_t>(mm) * p.n + nn;
                if (in_bounds(w)) *w = v;
              }
            }
        }
      }
  // (the staged write-out writes through plain pointers: nothing past the workspace's end)
  int64_t guard_writes = 0;
  for (int64_t c = 0; c < ws.ld; ++c) guard_writes += !std::isnan(ws.at(1, c));
  if (guard_writes) {
    ++failures;
    std::printf("%s: %lld elements of the workspace's guard row written\n", tag.c_str(),
                (long long)guard_writes);
  }
  if (p.splits > 1) {  // as splitk_reduce_kernel
    for (int64_t i = 0; i < mn; ++i) {
      float s = 0.f;
      for (int k = 0; k < p.splits; ++k) s += p.ws[k * mn + i];
      store(static_cast<T*>(p.out) + (i / p.n) * p.ld_out + i % p.n, s);
    }
    for (int64_t j = 0; with_db && j < p.m; ++j) {
      float s = 0.f;
      for (int k = 0; k < p.splits; ++k) s += p.ws[p.splits * mn + k * p.m + j];
      store(static_cast<T*>(p.db) + j, s);
    }
  }
  expect(tag + " dW", out, [&](int64_t o, int64_t k) {
    double v = 0;
    for (int64_t r = 0; r < L.N; ++r) v += L.DY[r * L.O + a_col0 + o] * L.X[r * L.I + b_col0 + k];
    return v;
  });
  if (with_db) expect(tag + " db", db, [&](int64_t, int64_t o) {
    double v = 0;
    for (int64_t r = 0; r < L.N; ++r) v += L.DY[r * L.O + a_col0 + o];
    return v;
  });
}

// The splits to try: none, the planner's with many SMs (it splits long reductions), and three
// by hand (rows_per_split a multiple of this math's BK, as the planner makes them, and not).
template <class M>
std::vector<WeightGradPlan> plans(DType dt, int64_t rows, int64_t m, int64_t n) {
  std::vector<WeightGradPlan> out = {plan_for<M>(rows, m, n, 1, M::MIN_BLOCKS),
                                     plan_for<M>(rows, m, n, 1000, M::MIN_BLOCKS)};
  for (int64_t per : {ceil_div(ceil_div(rows, 3), M::BK) * M::BK, ceil_div(rows, 3)}) {
    const int splits = static_cast<int>(ceil_div(rows, per));
    if (splits > 1)
      out.push_back({splits, per, static_cast<size_t>(splits) * (m * n + m) * sizeof(float)});
  }
  return out;
}

const char* math_name(SimtMath) { return "simt"; }
const char* math_name(WmmaMath<__half>) { return "wmma"; }
const char* math_name(WgmmaMath<__half>) { return "wgmma"; }
const char* math_name(WgmmaMath<__half, true>) { return "wgmma-sw128"; }
const char* math_name(WgmmaMath<__half, false, 128, 2>) { return "wgmma-k128x2"; }

template <typename T, class M>
void run(const Case& c) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "[%s, %s %dx%dx%d]", c.name, math_name(M{}), M::BM, M::BN,
                M::BK);
  const std::string tag = buf;
  Layer<T> L(c);
  if (!shape_ok(L.shape, L.weights)) {  // the launchers' own check
    ++failures;
    std::printf("%s: the launchers refuse this shape\n", tag.c_str());
    return;
  }
  check_forward<T, M>(L, tag);
  if constexpr (std::is_same<M, WgmmaMath<__half, true>>::value) check_forward_tma<T>(L, tag);
  for (bool need_old : {false, true})
    check_input_grad<T, M>(L, need_old, tag + (need_old ? " need_old=1" : " need_old=0"));
  for (bool couple : {false, true}) {
    if (couple && !c.coupled) continue;
    const int64_t m = couple ? L.O_f : L.o_T, n = couple ? L.I - L.I_f : L.I;
    for (const WeightGradPlan& plan : plans<M>(L.shape.dtype, L.N, m, n)) {
      std::snprintf(buf, sizeof buf, "%s splits=%d rows/split=%lld", couple ? " couple" : " new",
                    plan.splits, (long long)plan.rows_per_split);
      // db with dW_new always; with dW_couple (a frozen bias) when split, for its partials
      check_weight_grad<T, M>(L, couple, !couple || plan.splits > 1, plan, tag + buf);
    }
  }
}

// plan_for's choices where the answer is clear: the H200 benchmark's dW (16384 rows, 1024 x
// 5120 on 132 SMs: 160 wgmma tiles, two waves with the second 21% full, unsplit) splits in 4
// (640 blocks in 5 waves); a dW of 4096 x 4096 (256 tiles, two full-ish waves) does not split;
// nor does one whose best split would save under a tenth (1024 x 14336: 448 tiles, 3.8%) or
// need over 256 MB of partials (8192 x 8192 on a huge GPU); a small one (m = 64) splits as
// far as 8 k-tiles a split allow, 64 at most; every plan's splits cover the rows.
void check_weight_grad_plans() {
  struct Want {
    int64_t rows, m, n;
    int sms, splits;
  };
  const Want wants[] = {{16384, 1024, 5120, 132, 4},    {16384, 4096, 4096, 132, 1},
                        {16384, 1024, 14336, 132, 1},   {16384, 8192, 8192, 100000, 1},
                        {16384, 64, 256, 132, 32},      {1 << 20, 64, 256, 132, 64},
                        {100, 1024, 5120, 132, 1}};
  for (const Want& w : wants) {
    const WeightGradPlan p = plan_for<WgmmaMath<__half>>(w.rows, w.m, w.n, w.sms, 1);
    const bool covers = static_cast<int64_t>(p.splits) * p.rows_per_split >= w.rows &&
                        static_cast<int64_t>(p.splits - 1) * p.rows_per_split < w.rows;
    if (p.splits != w.splits || !covers) {
      ++failures;
      std::printf("plan_for<wgmma>(%lld rows, %lld x %lld, %d SMs): %d splits of %lld rows, "
                  "want %d\n", (long long)w.rows, (long long)w.m, (long long)w.n, w.sms,
                  p.splits, (long long)p.rows_per_split, w.splits);
    }
  }
}

// grouped_tile, the order the forward and dx kernels take their blocks in: every tile of the
// grid exactly once, whatever the grid (fewer row tiles than a group, a last group short).
void check_grouped_order() {
  for (int64_t m_tiles : {1, 2, 7, 8, 9, 17, 128})
    for (int64_t n_tiles : {1, 3, 8, 40}) {
      std::vector<int> seen(m_tiles * n_tiles, 0);
      for (int64_t b = 0; b < m_tiles * n_tiles; ++b) {
        const GridTile t = grouped_tile(b, m_tiles, n_tiles, kGroupM);
        const int64_t m = t.m, n = t.n;
        if (m < 0 || m >= m_tiles || n < 0 || n >= n_tiles) {
          if (failures++ < 20)
            std::printf("grouped_tile(%lld) of %lld x %lld: (%lld, %lld) outside\n",
                        (long long)b, (long long)m_tiles, (long long)n_tiles, (long long)m,
                        (long long)n);
          continue;
        }
        ++seen[m * n_tiles + n];
      }
      for (int v : seen)
        if (v != 1 && failures++ < 20)
          std::printf("grouped_tile of %lld x %lld: a tile taken %d times\n",
                      (long long)m_tiles, (long long)n_tiles, v);
    }
}

}  // namespace

int main() {
  check_grouped_order();
  check_weight_grad_plans();
  // plan_weight_grad asks wgmma_enabled(), which would probe for a GPU: the emulation picks
  // each math itself.
  setenv("EXPANSE_FAST_CUDA_WGMMA", "0", 1);
  std::vector<int64_t> many_groups, many_k_ends;  // more segments than one forward launch
  for (int g = 0; g < kSegsPerLaunch + 5; ++g) {
    many_groups.push_back(g % 4 * 3);
    many_k_ends.push_back(g * 7 % 51);
  }
  using A = Activation;
  const std::vector<Case> cases = {
      // name, N, I, I_f, o_T, groups, k_ends, coupled, bias_frozen, bias_new, act, pre_col0
      {"staircase", 150, 170, 140, 40, {129, 31, 17}, {130, 5, 131}, false, true, true,
       A::kNone, 177},
      {"coupled", 70, 300, 40, 130, {45, 7, 23}, {33, 11, 19}, true, true, true, A::kSiLU, 0},
      {"wide groups", 300, 272, 200, 10, {264, 136}, {200, 72}, false, true, true,
       A::kGeluTanh, -1},
      {"empty groups", 5, 20, 12, 0, {23, 0, 9}, {0, 7, 12}, true, false, true, A::kReLU, 0},
      {"many groups", 33, 75, 50, 9, many_groups, many_k_ends, true, true, false, A::kGelu, 40},
      {"long reduction", 700, 37, 24, 11, {20}, {17}, true, true, true, A::kNone, -1},
      {"no new inputs", 17, 9, 9, 5, {6}, {9}, true, true, true, A::kReLU, 3},
      {"no frozen rows", 9, 11, 0, 7, {}, {}, false, false, true, A::kNone, 0},
      // the GPU test that failed once (H200, fp32): one group, 7 rows, 37 -> 53
      {"one group, 7 rows", 7, 37, 0, 53, {}, {}, false, false, true, A::kNone, -1},
      // 16-byte rows: most tiles lie wholly inside their operands (the unchecked copy), the
      // edges and the staircase's last k-tiles do not
      // (255 rows: the last row tile and the last reduction k-tile are one row short); the
      // staged epilogues write whole 16-byte chunks, but for the pre-activation's first
      // columns (from 141: inside the second group's tile, mid-chunk)
      {"aligned", 255, 272, 200, 72, {136, 128}, {200, 64}, true, true, true, A::kGelu, 141,
       true},
      // wider than the wgmma tile's 256 columns everywhere: two column tiles a group in the
      // forward, two a band (old and new input columns) in dx, the second partial
      {"wider than a tile", 130, 563, 300, 257, {301}, {300}, false, true, true, A::kReLU, -1},
  };
  for (const Case& c : cases) {
    run<float, SimtMath>(c);
    run<__half, WmmaMath<__half>>(c);
    run<__half, WgmmaMath<__half>>(c);
    run<__half, WgmmaMath<__half, true>>(c);  // the swizzled copies and reads
    run<__half, WgmmaMath<__half, false, 128, 2>>(c);  // two stages of 128-wide k-tiles
  }
  if (tma_launches == 0) {
    ++failures;
    std::printf("no case gave the copy engine operands it takes: the TMA forward unemulated\n");
  }
  if (copies_whole == 0 || copies_whole == copies_checked) {
    ++failures;
    std::printf("the stage copies took one path only (%lld of %lld tiles whole)\n",
                (long long)copies_whole, (long long)copies_checked);
  }
  if (failures) {
    std::printf("tile emulation FAILED (%d)\n", failures);
    return 1;
  }
  std::printf("tile emulation OK (%lld blocks, %lld k-tiles, %lld elements compared; stage "
              "copies: %lld of %lld tiles whole; %lld TMA forward launches)\n",
              (long long)blocks, (long long)k_tiles, (long long)compared,
              (long long)copies_whole, (long long)copies_checked, (long long)tma_launches);
  return 0;
}
