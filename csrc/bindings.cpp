// torch bindings of the expanded-linear and expanded-conv2d CUDA kernels: op schemas
// (namespace expanse_fast_cuda), argument checks, output allocation, and the current CUDA
// stream.  The fake (meta) implementations live in Python (expanse_fast/backends/cuda.py).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "expanded_conv.h"
#include "expanded_linear.h"

namespace {

using at::Tensor;
using expanse_fast::DType;

// ---- error messages, built without iostreams ------------------------------------------------
// TORCH_CHECK with several arguments formats them through a std::ostringstream that this
// library instantiates itself.  On the GPU image (torch 2.11, cu130) those instantiations
// looked up a wrong locale facet: the first failed check crashed (SIGSEGV in
// ostream::_M_insert<long>, stack read with cuda-gdb) instead of raising.  So every check
// here builds its message in a std::string (integers by std::to_string, which needs no
// locale) and hands TORCH_CHECK that one string, which c10 passes through unformatted.
void put(std::string& s, const char* v) { s += v; }
void put(std::string& s, const std::string& v) { s += v; }
void put(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
void put(std::string& s, const c10::Device& v) { s += v.str(); }
void put(std::string& s, at::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
void put(std::string& s, T v) { s += std::to_string(v); }

template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  std::string message;
  (put(message, args), ...);
  TORCH_CHECK(false, message);
}

#define EXPANSE_CHECK(cond, ...)                   \
  do {                                             \
    if (C10_UNLIKELY(!(cond))) fail(__VA_ARGS__);  \
  } while (0)

DType dtype_of(const Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      fail("expanse_fast_cuda::", op,
                  ": expected dtype float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

// The kernels read rows with unit column stride; anything else is copied once.
Tensor rows_unit_stride(const Tensor& t) {
  return (t.dim() == 2 && t.size(1) > 1 && t.stride(1) != 1) ? t.contiguous() : t;
}

void check_2d(const Tensor& t, const char* op, const char* name, int64_t rows, int64_t cols) {
  EXPANSE_CHECK(t.dim() == 2, "expanse_fast_cuda::", op, ": ", name, " must be 2-D, got shape ",
              t.sizes());
  EXPANSE_CHECK(rows < 0 || t.size(0) == rows, "expanse_fast_cuda::", op, ": ", name,
              " must have ", rows, " rows, got shape ", t.sizes());
  EXPANSE_CHECK(cols < 0 || t.size(1) == cols, "expanse_fast_cuda::", op, ": ", name,
              " must have ", cols, " columns, got shape ", t.sizes());
}

void check_like(const Tensor& t, const Tensor& ref, const char* op, const char* name) {
  EXPANSE_CHECK(t.device() == ref.device(), "expanse_fast_cuda::", op, ": ", name,
              " must be on device ", ref.device(), ", got ", t.device());
  EXPANSE_CHECK(t.scalar_type() == ref.scalar_type(), "expanse_fast_cuda::", op, ": ", name,
              " must have dtype ", ref.scalar_type(), " (all operands share one dtype), got ",
              t.scalar_type());
}

// The staircase's frozen groups: as many k_ends as groups, widths >= 0 summing to w_frozen's
// rows, each k_end within w_frozen's columns, and no more groups than the kernels take.
void check_groups(const char* op, at::IntArrayRef groups, at::IntArrayRef k_ends, int64_t o_f,
                  int64_t i_f, int64_t max_groups) {
  EXPANSE_CHECK(groups.size() == k_ends.size(), "expanse_fast_cuda::", op,
              ": frozen_out_groups and frozen_k_ends must have the same length, got ",
              groups.size(), " and ", k_ends.size());
  EXPANSE_CHECK(static_cast<int64_t>(groups.size()) <= max_groups, "expanse_fast_cuda::", op,
              ": at most ", max_groups, " frozen groups are supported, got ", groups.size());
  int64_t total = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    EXPANSE_CHECK(groups[g] >= 0, "expanse_fast_cuda::", op,
                ": frozen_out_groups must be >= 0, got ", groups);
    EXPANSE_CHECK(k_ends[g] >= 0 && k_ends[g] <= i_f, "expanse_fast_cuda::", op,
                ": frozen_k_ends must lie in [0, ", i_f, "], got ", k_ends);
    total += groups[g];
  }
  EXPANSE_CHECK(total == o_f, "expanse_fast_cuda::", op, ": frozen_out_groups ", groups,
              " sum to ", total, " but w_frozen has ", o_f, " rows");
}

// Checks the layout arguments and fills the launcher's shape description.
expanse_fast::LinearShape describe(const char* op, const Tensor& x, const Tensor& w_frozen,
                                   const Tensor& w_new, const std::optional<Tensor>& w_couple,
                                   at::IntArrayRef groups, at::IntArrayRef k_ends) {
  EXPANSE_CHECK(x.is_cuda(), "expanse_fast_cuda::", op, ": expected CUDA tensors, got x on ",
              x.device());
  check_2d(x, op, "x", -1, -1);
  const int64_t in = x.size(1);
  check_2d(w_frozen, op, "w_frozen", -1, -1);
  const int64_t o_f = w_frozen.size(0), i_f = w_frozen.size(1);
  EXPANSE_CHECK(i_f <= in, "expanse_fast_cuda::", op, ": w_frozen reads ", i_f,
              " inputs but x has only ", in);
  check_2d(w_new, op, "w_new", -1, in);
  check_like(w_frozen, x, op, "w_frozen");
  check_like(w_new, x, op, "w_new");
  if (w_couple.has_value()) {
    check_2d(*w_couple, op, "w_couple", o_f, in - i_f);
    check_like(*w_couple, x, op, "w_couple");
  }
  check_groups(op, groups, k_ends, o_f, i_f, expanse_fast::kMaxFrozenGroups);
  expanse_fast::LinearShape s{};
  s.dtype = dtype_of(x, op);
  s.rows = x.size(0);
  s.in_features = in;
  s.frozen_in = i_f;
  s.frozen_out = o_f;
  s.new_out = w_new.size(0);
  s.num_frozen_groups = static_cast<int>(groups.size());
  s.frozen_out_groups = groups.data();
  s.frozen_k_ends = k_ends.data();
  return s;
}

expanse_fast::LinearWeights weights(const Tensor& w_frozen, const Tensor& w_new,
                                    const std::optional<Tensor>& w_couple) {
  return {w_frozen.data_ptr(), w_frozen.stride(0), w_new.data_ptr(), w_new.stride(0),
          w_couple ? w_couple->data_ptr() : nullptr, w_couple ? w_couple->stride(0) : 0};
}

// A bias of `n` entries like `x` (dtype, device), contiguous; none stays none.
std::optional<Tensor> checked_bias(const std::optional<Tensor>& b, int64_t n, const Tensor& x,
                                   const char* op, const char* name) {
  if (!b) return std::nullopt;
  EXPANSE_CHECK(b->dim() == 1 && b->size(0) == n, "expanse_fast_cuda::", op, ": ", name,
              " must have shape [", n, "], got ", b->sizes());
  check_like(*b, x, op, name);
  return b->contiguous();
}

// A folded BatchNorm's per-channel scale or shift: fp32, `n` entries, on x's device.
std::optional<Tensor> checked_bn(const std::optional<Tensor>& t, int64_t n, const Tensor& x,
                                 const char* op, const char* name) {
  if (!t) return std::nullopt;
  EXPANSE_CHECK(t->dim() == 1 && t->size(0) == n && t->scalar_type() == at::kFloat,
              "expanse_fast_cuda::", op, ": ", name, " must be a float32 tensor of shape [", n,
              "], got ", t->scalar_type(), " ", t->sizes());
  EXPANSE_CHECK(t->device() == x.device(), "expanse_fast_cuda::", op, ": ", name, " is on ",
              t->device(), " but x is on ", x.device());
  return t->contiguous();
}

void check_launch(cudaError_t err, const char* op) {
  EXPANSE_CHECK(err == cudaSuccess, "expanse_fast_cuda::", op, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

Tensor linear_forward(const Tensor& x_in, const Tensor& w_frozen_in,
                      const std::optional<Tensor>& b_frozen_in, const Tensor& w_new_in,
                      const std::optional<Tensor>& b_new_in,
                      const std::optional<Tensor>& w_couple_in, at::IntArrayRef groups,
                      at::IntArrayRef k_ends, int64_t activation,
                      const std::optional<Tensor>& pre) {
  const char* op = "linear_forward";
  const Tensor x = rows_unit_stride(x_in), w_frozen = rows_unit_stride(w_frozen_in);
  const Tensor w_new = rows_unit_stride(w_new_in);
  std::optional<Tensor> w_couple;
  if (w_couple_in) w_couple = rows_unit_stride(*w_couple_in);
  const auto s = describe(op, x, w_frozen, w_new, w_couple, groups, k_ends);
  const std::optional<Tensor> b_frozen = checked_bias(b_frozen_in, s.frozen_out, x, op,
                                                     "b_frozen");
  const std::optional<Tensor> b_new = checked_bias(b_new_in, s.new_out, x, op, "b_new");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t out = s.frozen_out + s.new_out;
  const int64_t last_activation = static_cast<int64_t>(expanse_fast::Activation::kGelu);
  EXPANSE_CHECK(activation >= 0 && activation <= last_activation,
              "expanse_fast_cuda::", op, ": unknown activation code ", activation);
  expanse_fast::LinearEpilogue epi;
  epi.activation = static_cast<expanse_fast::Activation>(activation);
  if (pre && pre->numel() > 0) {
    EXPANSE_CHECK(pre->dim() == 2 && pre->size(0) == s.rows && pre->size(1) <= out &&
                    pre->stride(1) == 1,
                "expanse_fast_cuda::", op, ": pre must be a row-major [", s.rows, ", <= ", out,
                "] tensor, got ", pre->sizes(), " with strides ", pre->strides());
    check_like(*pre, x, op, "pre");
    epi.pre = pre->data_ptr();
    epi.ld_pre = pre->stride(0);
    epi.pre_col0 = out - pre->size(1);
  }
  Tensor y = at::empty({s.rows, out}, x.options());
  check_launch(expanse_fast::linear_forward(
                   s, weights(w_frozen, w_new, w_couple), x.data_ptr(), x.stride(0),
                   b_frozen ? b_frozen->data_ptr() : nullptr,
                   b_new ? b_new->data_ptr() : nullptr, y.data_ptr(), y.stride(0), epi,
                   at::cuda::getCurrentCUDAStream()),
               op);
  return y;
}

// One weight-gradient product (dW_new or dW_couple), with the split-reduction workspace.
void weight_grad(DType dt, const Tensor& dy, int64_t dy_col0, int64_t m, const Tensor& x,
                 int64_t x_col0, int64_t n, Tensor* out, Tensor* db) {
  const auto plan = expanse_fast::plan_weight_grad(
      dt, dy.size(0), m, out ? n : 0, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  Tensor ws;
  if (plan.workspace_bytes > 0)
    ws = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, dy.options().dtype(at::kByte));
  check_launch(expanse_fast::linear_weight_grad(
                   dt, dy.size(0), m, n, dy.data_ptr(), dy.stride(0), dy_col0, x.data_ptr(),
                   x.stride(0), x_col0, out ? out->data_ptr() : nullptr,
                   out ? out->stride(0) : 0, db ? db->data_ptr() : nullptr, plan,
                   ws.defined() ? ws.data_ptr() : nullptr, at::cuda::getCurrentCUDAStream()),
               "linear_backward");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_backward(
    const Tensor& dy_in, const Tensor& x_in, const Tensor& w_frozen_in, const Tensor& w_new_in,
    const std::optional<Tensor>& w_couple_in, at::IntArrayRef groups, at::IntArrayRef k_ends,
    bool need_dx_new, bool need_dx_old, bool need_dw, bool need_db, bool need_dcouple) {
  const char* op = "linear_backward";
  const Tensor x = rows_unit_stride(x_in), w_frozen = rows_unit_stride(w_frozen_in);
  const Tensor w_new = rows_unit_stride(w_new_in), dy = rows_unit_stride(dy_in);
  std::optional<Tensor> w_couple;
  if (w_couple_in) w_couple = rows_unit_stride(*w_couple_in);
  const auto s = describe(op, x, w_frozen, w_new, w_couple, groups, k_ends);
  check_2d(dy, op, "dy", s.rows, s.frozen_out + s.new_out);
  check_like(dy, x, op, "dy");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  Tensor dx, dw, db, dcouple;  // undefined = None in Python
  if (need_dw) dw = at::empty({s.new_out, s.in_features}, x.options());
  if (need_db) db = at::empty({s.new_out}, x.options());
  if (need_dw || need_db)
    weight_grad(s.dtype, dy, s.frozen_out, s.new_out, x, 0, s.in_features,
                need_dw ? &dw : nullptr, need_db ? &db : nullptr);
  if (need_dcouple && w_couple) {
    dcouple = at::empty({s.frozen_out, s.in_features - s.frozen_in}, x.options());
    weight_grad(s.dtype, dy, 0, s.frozen_out, x, s.frozen_in, s.in_features - s.frozen_in,
                &dcouple, nullptr);
  }
  if (need_dx_new || need_dx_old) {
    dx = at::empty({s.rows, s.in_features}, x.options());
    check_launch(expanse_fast::linear_backward_input(s, weights(w_frozen, w_new, w_couple),
                                                     dy.data_ptr(), dy.stride(0), need_dx_old,
                                                     dx.data_ptr(), dx.stride(0), stream),
                 op);
  }
  return {dx, dw, db, dcouple};
}

// ---------------------------------------------------------------------------------------
// Conv2d (NCHW, groups = 1).  x and dy are read through their strides (any layout); weights
// are made contiguous (they are small); outputs are contiguous NCHW.
// ---------------------------------------------------------------------------------------
void check_4d(const Tensor& t, const char* op, const char* name) {
  EXPANSE_CHECK(t.dim() == 4, "expanse_fast_cuda::", op, ": ", name,
              " must be 4-D (N, C, H, W) / (rows, channels, KH, KW), got shape ", t.sizes());
}

expanse_fast::Strides4 strides4(const Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// One value per spatial dimension: [v] or [vh, vw].
std::pair<int64_t, int64_t> pair_arg(at::IntArrayRef v, const char* op, const char* name) {
  EXPANSE_CHECK(v.size() == 1 || v.size() == 2, "expanse_fast_cuda::", op, ": ", name,
              " must have 1 or 2 entries, got ", v);
  return {v[0], v.size() == 2 ? v[1] : v[0]};
}

// Checks the operands and layout arguments and fills the launchers' shape description.
expanse_fast::ConvShape describe_conv(const char* op, const Tensor& x, const Tensor& w_frozen,
                                      const Tensor& w_new, const std::optional<Tensor>& w_couple,
                                      at::IntArrayRef groups, at::IntArrayRef k_ends,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation) {
  EXPANSE_CHECK(x.is_cuda(), "expanse_fast_cuda::", op, ": expected CUDA tensors, got x on ",
              x.device());
  check_4d(x, op, "x");
  const int64_t in = x.size(1);
  check_4d(w_new, op, "w_new");
  check_4d(w_frozen, op, "w_frozen");
  check_like(w_new, x, op, "w_new");
  check_like(w_frozen, x, op, "w_frozen");
  EXPANSE_CHECK(w_new.size(1) == in, "expanse_fast_cuda::", op, ": w_new must have ", in,
              " input channels (x has ", in, "), got shape ", w_new.sizes());
  const int64_t kh = w_new.size(2), kw = w_new.size(3);
  EXPANSE_CHECK(kh >= 1 && kw >= 1, "expanse_fast_cuda::", op,
              ": the kernel must be at least 1 x 1, got w_new of shape ", w_new.sizes());
  const int64_t o_f = w_frozen.size(0), i_f = w_frozen.size(1);
  EXPANSE_CHECK(i_f <= in, "expanse_fast_cuda::", op, ": w_frozen reads ", i_f,
              " input channels but x has only ", in);
  EXPANSE_CHECK(o_f == 0 || (w_frozen.size(2) == kh && w_frozen.size(3) == kw),
              "expanse_fast_cuda::", op, ": w_frozen must have the kernel size of w_new (", kh,
              " x ", kw, "), got shape ", w_frozen.sizes());
  if (w_couple.has_value()) {
    check_4d(*w_couple, op, "w_couple");
    check_like(*w_couple, x, op, "w_couple");
    EXPANSE_CHECK(w_couple->size(0) == o_f && w_couple->size(1) == in - i_f &&
                    w_couple->size(2) == kh && w_couple->size(3) == kw,
                "expanse_fast_cuda::", op, ": w_couple must have shape [", o_f, ", ", in - i_f,
                ", ", kh, ", ", kw, "], got ", w_couple->sizes());
  }
  check_groups(op, groups, k_ends, o_f, i_f, expanse_fast::kMaxConvFrozenGroups);
  const auto [sh, sw] = pair_arg(stride, op, "stride");
  const auto [ph, pw] = pair_arg(padding, op, "padding");
  const auto [dh, dw] = pair_arg(dilation, op, "dilation");
  EXPANSE_CHECK(sh >= 1 && sw >= 1, "expanse_fast_cuda::", op, ": stride must be >= 1, got ",
              stride);
  EXPANSE_CHECK(dh >= 1 && dw >= 1, "expanse_fast_cuda::", op, ": dilation must be >= 1, got ",
              dilation);
  EXPANSE_CHECK(ph >= 0 && pw >= 0, "expanse_fast_cuda::", op, ": padding must be >= 0, got ",
              padding);
  constexpr int64_t kLim = int64_t{1} << 30;
  EXPANSE_CHECK(sh < kLim && sw < kLim && ph < kLim && pw < kLim && dh < kLim && dw < kLim &&
                  kh < kLim && kw < kLim,
              "expanse_fast_cuda::", op, ": stride, padding, dilation and kernel must be < 2^30");
  const int64_t h = x.size(2), w = x.size(3);
  const int64_t span_h = h + 2 * ph - dh * (kh - 1) - 1;
  const int64_t span_w = w + 2 * pw - dw * (kw - 1) - 1;
  EXPANSE_CHECK(span_h >= 0 && span_w >= 0, "expanse_fast_cuda::", op, ": the input (", h, " x ",
              w, ", padding ", ph, " x ", pw, ") is smaller than the dilated kernel (",
              dh * (kh - 1) + 1, " x ", dw * (kw - 1) + 1, ")");
  expanse_fast::ConvShape s{};
  s.dtype = dtype_of(x, op);
  s.geo.batch = x.size(0);
  s.geo.height = h;
  s.geo.width = w;
  s.geo.out_h = span_h / sh + 1;
  s.geo.out_w = span_w / sw + 1;
  s.geo.kernel_h = static_cast<int>(kh);
  s.geo.kernel_w = static_cast<int>(kw);
  s.geo.stride_h = static_cast<int>(sh);
  s.geo.stride_w = static_cast<int>(sw);
  s.geo.pad_h = static_cast<int>(ph);
  s.geo.pad_w = static_cast<int>(pw);
  s.geo.dil_h = static_cast<int>(dh);
  s.geo.dil_w = static_cast<int>(dw);
  s.in_channels = in;
  s.frozen_in = i_f;
  s.frozen_out = o_f;
  s.new_out = w_new.size(0);
  s.num_frozen_groups = static_cast<int>(groups.size());
  s.frozen_out_groups = groups.data();
  s.frozen_k_ends = k_ends.data();
  EXPANSE_CHECK(expanse_fast::conv_shape_ok(s), "expanse_fast_cuda::", op,
              ": shape too large for the kernels' 32-bit index arithmetic (x ", x.sizes(),
              ", w_new ", w_new.sizes(), ", w_frozen ", w_frozen.sizes(),
              "): channels * KH * KW, H, W and output channels must stay below 2^30");
  return s;
}

expanse_fast::ConvWeights conv_weights(const Tensor& w_frozen, const Tensor& w_new,
                                       const std::optional<Tensor>& w_couple) {
  return {w_frozen.data_ptr(), w_new.data_ptr(), w_couple ? w_couple->data_ptr() : nullptr};
}

// torch_ref.conv_memory_format's rule (the fakes' too): channels_last, and not NCHW as well.
bool is_channels_last(const Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// t permuted into the order the NHWC kernels read a weight in, contiguous and starting on 16
// bytes (their 16-byte chunks need it; a permutation that is already contiguous, as a 1 x 1
// kernel's, would otherwise keep t's own start).
Tensor nhwc_weight(const Tensor& t, at::IntArrayRef order) {
  Tensor w = t.permute(order).contiguous();
  if (reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 != 0) w = w.clone();
  return w;
}

// A conv activation as the NHWC kernels read it: the tensor itself where it is channels_last,
// else a channels_last copy, made on first use (the copies cost a fraction of what the NCHW
// kernels' pixel-by-pixel gathers do in fp16/bf16).  Whether a kernel takes it is asked with
// the strides and the alignment it will have: a fresh copy's, or its own.  An NCHW fp32
// operand is not copied (routed() says no): both kernel families multiply fp32 with FMA,
// compute-bound, and the NCHW kernels' loads along pixels are 4 bytes wide.
class NhwcOperand {
 public:
  explicit NhwcOperand(const Tensor& t) : t_(t), channels_last_(is_channels_last(t)) {}
  bool channels_last() const { return channels_last_; }
  bool routed() const { return channels_last_ || t_.scalar_type() != at::kFloat; }
  // (null: a copy, which the caching allocator starts on 512 bytes)
  const void* data_for_checks() const { return channels_last_ ? t_.data_ptr() : nullptr; }
  expanse_fast::Strides4 strides() const {
    if (channels_last_) return strides4(t_);
    const int64_t c = t_.size(1), h = t_.size(2), w = t_.size(3);
    return {h * w * c, 1, w * c, c};
  }
  const Tensor& get() {
    if (channels_last_) return t_;
    if (!copy_) {  // a fresh tensor, so that its strides and alignment are the ones checked
      // (contiguous() would hand back a tensor that is NCHW and channels_last at once as it is)
      copy_ = at::empty(t_.sizes(), t_.options().memory_format(at::MemoryFormat::ChannelsLast));
      copy_->copy_(t_);
    }
    return *copy_;
  }

 private:
  const Tensor& t_;
  bool channels_last_;
  std::optional<Tensor> copy_;
};

Tensor conv2d_forward(const Tensor& x, const Tensor& w_frozen_in,
                      const std::optional<Tensor>& b_frozen_in, const Tensor& w_new_in,
                      const std::optional<Tensor>& b_new_in,
                      const std::optional<Tensor>& w_couple_in, at::IntArrayRef groups,
                      at::IntArrayRef k_ends, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, const std::optional<Tensor>& bn_scale_in,
                      const std::optional<Tensor>& bn_shift_in) {
  const char* op = "conv2d_forward";
  const Tensor w_frozen = w_frozen_in.contiguous(), w_new = w_new_in.contiguous();
  std::optional<Tensor> w_couple;
  if (w_couple_in) w_couple = w_couple_in->contiguous();
  const auto s = describe_conv(op, x, w_frozen, w_new, w_couple, groups, k_ends, stride, padding,
                               dilation);
  const std::optional<Tensor> b_frozen = checked_bias(b_frozen_in, s.frozen_out, x, op,
                                                     "b_frozen");
  const std::optional<Tensor> b_new = checked_bias(b_new_in, s.new_out, x, op, "b_new");
  EXPANSE_CHECK(bn_scale_in.has_value() == bn_shift_in.has_value(), "expanse_fast_cuda::", op,
              ": bn_scale and bn_shift go together");
  const std::optional<Tensor> bn_scale = checked_bn(bn_scale_in, s.frozen_out, x, op, "bn_scale");
  const std::optional<Tensor> bn_shift = checked_bn(bn_shift_in, s.frozen_out, x, op, "bn_shift");
  const c10::cuda::CUDAGuard guard(x.device());
  const std::vector<int64_t> y_shape{s.geo.batch, s.frozen_out + s.new_out, s.geo.out_h,
                                     s.geo.out_w};
  const void* bf = b_frozen ? b_frozen->data_ptr() : nullptr;
  const void* bnew = b_new ? b_new->data_ptr() : nullptr;
  const float* scale = bn_scale ? bn_scale->data_ptr<float>() : nullptr;
  const float* shift = bn_shift ? bn_shift->data_ptr<float>() : nullptr;
  // y takes x's memory format (torch_ref.conv_memory_format: the fake implementation's rule).
  NhwcOperand xo(x);
  const bool channels_last = xo.channels_last();
  if (xo.routed() && expanse_fast::conv2d_forward_nhwc_ok(s, xo.data_for_checks(),
                                                          xo.strides())) {
    // The implicit GEMM over NHWC reads the weights as (rows, KH, KW, channels).
    const auto cl = [](const Tensor& w) { return nhwc_weight(w, {0, 2, 3, 1}); };
    const Tensor wf = cl(w_frozen), wn = cl(w_new);
    std::optional<Tensor> wc;
    if (w_couple) wc = cl(*w_couple);
    const Tensor& xn = xo.get();
    Tensor y = at::empty(y_shape, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    check_launch(expanse_fast::conv2d_forward_nhwc(s, conv_weights(wf, wn, wc), xn.data_ptr(),
                                                   strides4(xn), bf, bnew, scale, shift,
                                                   y.data_ptr(),
                                                   at::cuda::getCurrentCUDAStream()),
                 op);
    return channels_last ? y : y.contiguous();
  }
  // The NCHW kernels gather along pixels: a channels_last x read through its strides would
  // make every thread's 2-byte load its own transaction, so it is copied to NCHW first.
  const Tensor xk = channels_last ? x.contiguous() : x;
  Tensor y = at::empty(y_shape, x.options());
  check_launch(expanse_fast::conv2d_forward(s, conv_weights(w_frozen, w_new, w_couple),
                                            xk.data_ptr(), strides4(xk), bf, bnew, scale, shift,
                                            y.data_ptr(), at::cuda::getCurrentCUDAStream()),
               op);
  return channels_last ? y.contiguous(at::MemoryFormat::ChannelsLast) : y;
}

// One conv weight-gradient product (dW_new or dW_couple) into out, with its split workspace.
void conv_weight_grad(const expanse_fast::ConvShape& s, const Tensor& dy, int64_t dy_c0,
                      int64_t m, const Tensor& x, int64_t x_c0, int64_t n_ch, Tensor& out) {
  const int64_t pixels = s.geo.batch * s.geo.out_h * s.geo.out_w;
  const auto plan = expanse_fast::plan_conv_weight_grad(
      s.dtype, pixels, m, n_ch, s.geo.kernel_h * s.geo.kernel_w,
      at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  Tensor ws;
  if (plan.workspace_bytes > 0)
    ws = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, dy.options().dtype(at::kByte));
  check_launch(expanse_fast::conv2d_weight_grad(
                   s.dtype, s.geo, dy.data_ptr(), strides4(dy), dy_c0, m, x.data_ptr(),
                   strides4(x), x_c0, n_ch, out.data_ptr(), plan,
                   ws.defined() ? ws.data_ptr() : nullptr, at::cuda::getCurrentCUDAStream()),
               "conv2d_backward");
}

// The same on channels_last dy and x (conv2d_weight_grad_nhwc_ok): computed as (m, KH, KW, n_ch)
// and returned contiguous (m, n_ch, KH, KW), as the fake says; db (if given: m entries, when
// dy_c0 + m are the new rows) fused in.
Tensor conv_weight_grad_nhwc(const expanse_fast::ConvShape& s, const Tensor& dy, int64_t dy_c0,
                             int64_t m, const Tensor& x, int64_t x_c0, int64_t n_ch,
                             Tensor* db) {
  const int64_t pixels = s.geo.batch * s.geo.out_h * s.geo.out_w;
  const auto plan = expanse_fast::plan_conv_weight_grad_nhwc(
      pixels, m, n_ch, s.geo.kernel_h * s.geo.kernel_w,
      at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  Tensor ws;
  if (plan.workspace_bytes > 0)
    ws = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, dy.options().dtype(at::kByte));
  Tensor out = at::empty({m, s.geo.kernel_h, s.geo.kernel_w, n_ch}, x.options());
  if (db != nullptr) *db = at::empty({m}, x.options());
  check_launch(expanse_fast::conv2d_weight_grad_nhwc(
                   s, dy.data_ptr(), strides4(dy), dy_c0, m, x.data_ptr(), strides4(x), x_c0,
                   n_ch, out.data_ptr(), db != nullptr ? db->data_ptr() : nullptr, plan,
                   ws.defined() ? ws.data_ptr() : nullptr, at::cuda::getCurrentCUDAStream()),
               "conv2d_backward");
  return out.permute({0, 3, 1, 2}).contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv2d_backward(
    const Tensor& dy, const Tensor& x, const Tensor& w_frozen_in, const Tensor& w_new_in,
    const std::optional<Tensor>& w_couple_in, at::IntArrayRef groups, at::IntArrayRef k_ends,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool need_dx_new,
    bool need_dx_old, bool need_dw, bool need_db, bool need_dcouple) {
  const char* op = "conv2d_backward";
  const Tensor w_frozen = w_frozen_in.contiguous(), w_new = w_new_in.contiguous();
  std::optional<Tensor> w_couple;
  if (w_couple_in) w_couple = w_couple_in->contiguous();
  const auto s = describe_conv(op, x, w_frozen, w_new, w_couple, groups, k_ends, stride, padding,
                               dilation);
  check_4d(dy, op, "dy");
  check_like(dy, x, op, "dy");
  const std::vector<int64_t> dy_shape{s.geo.batch, s.frozen_out + s.new_out, s.geo.out_h,
                                      s.geo.out_w};
  EXPANSE_CHECK(dy.sizes() == at::IntArrayRef(dy_shape), "expanse_fast_cuda::", op,
              ": dy must have shape ", at::IntArrayRef(dy_shape), ", got ", dy.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  // The NHWC kernels where they qualify, on dy and x or channels_last copies of them; the NCHW
  // kernels gather along pixels, so a channels_last operand is copied to NCHW for them.  Each
  // copy is made once, and only when a kernel that reads it runs.
  NhwcOperand dyo(dy), xo(x);
  // dx takes x's memory format (torch_ref.conv_memory_format, as the fake implementation).
  const bool x_cl = xo.channels_last();
  std::optional<Tensor> dy_nchw, x_nchw;
  const auto pixel_major = [&](const Tensor& t, std::optional<Tensor>& copy) -> const Tensor& {
    if (!copy) copy = is_channels_last(t) ? t.contiguous() : t;
    return *copy;
  };
  const bool dw_nhwc = dyo.routed() && xo.routed() &&
                       expanse_fast::conv2d_weight_grad_nhwc_ok(
                           s, dyo.data_for_checks(), dyo.strides(), xo.data_for_checks(),
                           xo.strides());
  const bool dx_nhwc = dyo.routed() && expanse_fast::conv2d_backward_input_nhwc_ok(
                                           s, dyo.data_for_checks(), dyo.strides());
  Tensor dx, dw, db, dcouple;  // undefined = None in Python
  if (need_dw && dw_nhwc) {
    dw = conv_weight_grad_nhwc(s, dyo.get(), s.frozen_out, s.new_out, xo.get(), 0,
                               s.in_channels, need_db ? &db : nullptr);
  } else if (need_dw) {
    dw = at::empty(w_new.sizes(), x.options());
    conv_weight_grad(s, pixel_major(dy, dy_nchw), s.frozen_out, s.new_out,
                     pixel_major(x, x_nchw), 0, s.in_channels, dw);
  }
  if (need_db && !db.defined()) {
    db = at::empty({s.new_out}, x.options());
    const Tensor& d = pixel_major(dy, dy_nchw);
    check_launch(expanse_fast::conv2d_bias_grad(s.dtype, s.geo, d.data_ptr(), strides4(d),
                                                s.frozen_out, s.new_out, db.data_ptr(), stream),
                 op);
  }
  if (need_dcouple && w_couple && dw_nhwc) {
    dcouple = conv_weight_grad_nhwc(s, dyo.get(), 0, s.frozen_out, xo.get(), s.frozen_in,
                                    s.in_channels - s.frozen_in, nullptr);
  } else if (need_dcouple && w_couple) {
    dcouple = at::empty(w_couple->sizes(), x.options());
    conv_weight_grad(s, pixel_major(dy, dy_nchw), 0, s.frozen_out, pixel_major(x, x_nchw),
                     s.frozen_in, s.in_channels - s.frozen_in, dcouple);
  }
  if ((need_dx_new || need_dx_old) && dx_nhwc) {
    // The NHWC implicit GEMM reads each weight as (channels, KH, KW, rows).
    const auto transposed = [](const Tensor& w) { return nhwc_weight(w, {1, 2, 3, 0}); };
    const Tensor wf = transposed(w_frozen), wn = transposed(w_new);
    std::optional<Tensor> wc;
    if (w_couple) wc = transposed(*w_couple);
    const Tensor& d = dyo.get();
    dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
    check_launch(expanse_fast::conv2d_backward_input_nhwc(s, conv_weights(wf, wn, wc),
                                                          d.data_ptr(), strides4(d), need_dx_old,
                                                          dx.data_ptr(), stream),
                 op);
    if (!x_cl) dx = dx.contiguous();
  } else if (need_dx_new || need_dx_old) {
    dx = at::empty(x.sizes(), x.options());
    const Tensor& d = pixel_major(dy, dy_nchw);
    check_launch(expanse_fast::conv2d_backward_input(s, conv_weights(w_frozen, w_new, w_couple),
                                                     d.data_ptr(), strides4(d), need_dx_old,
                                                     dx.data_ptr(), stream),
                 op);
    if (x_cl) dx = dx.contiguous(at::MemoryFormat::ChannelsLast);
  }
  return {dx, dw, db, dcouple};
}

// The linear kernels' tile math for `dtype` on the current device ("wgmma", "wmma", "simt").
std::string linear_math(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return expanse_fast::linear_math_name(DType::kFloat32);
    case at::kHalf: return expanse_fast::linear_math_name(DType::kFloat16);
    case at::kBFloat16: return expanse_fast::linear_math_name(DType::kBFloat16);
    default:
      fail("expanse_fast_cuda::linear_math: expected dtype float32, float16 or "
                  "bfloat16, got ", dtype);
  }
  return "";  // unreachable
}

}  // namespace

TORCH_LIBRARY(expanse_fast_cuda, m) {
  m.def("linear_math(ScalarType dtype) -> str", &linear_math);
  m.def("linear_forward(Tensor x, Tensor w_frozen, Tensor? b_frozen, Tensor w_new, "
        "Tensor? b_new, Tensor? w_couple, int[] frozen_out_groups, int[] frozen_k_ends, "
        "int activation=0, Tensor(a!)? pre=None) -> Tensor");
  m.def("linear_backward(Tensor dy, Tensor x, Tensor w_frozen, Tensor w_new, Tensor? w_couple, "
        "int[] frozen_out_groups, int[] frozen_k_ends, bool need_dx_new, bool need_dx_old, "
        "bool need_dw, bool need_db, bool need_dcouple) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("conv2d_forward(Tensor x, Tensor w_frozen, Tensor? b_frozen, Tensor w_new, "
        "Tensor? b_new, Tensor? w_couple, int[] frozen_out_groups, int[] frozen_k_ends, "
        "int[] stride, int[] padding, int[] dilation, Tensor? bn_scale=None, "
        "Tensor? bn_shift=None) -> Tensor");
  m.def("conv2d_backward(Tensor dy, Tensor x, Tensor w_frozen, Tensor w_new, Tensor? w_couple, "
        "int[] frozen_out_groups, int[] frozen_k_ends, int[] stride, int[] padding, "
        "int[] dilation, bool need_dx_new, bool need_dx_old, bool need_dw, bool need_db, "
        "bool need_dcouple) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(expanse_fast_cuda, CUDA, m) {
  m.impl("linear_forward", &linear_forward);
  m.impl("linear_backward", &linear_backward);
  m.impl("conv2d_forward", &conv2d_forward);
  m.impl("conv2d_backward", &conv2d_backward);
}

// An empty Python module, so that a prebuilt extension (setup.py: expanse_fast._C) imports.
#ifdef TORCH_EXTENSION_NAME
#define EXPANSE_CAT2(a, b) a##b
#define EXPANSE_CAT(a, b) EXPANSE_CAT2(a, b)
#define EXPANSE_STR2(a) #a
#define EXPANSE_STR(a) EXPANSE_STR2(a)
PyMODINIT_FUNC EXPANSE_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, EXPANSE_STR(TORCH_EXTENSION_NAME),
                                   nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
#endif
