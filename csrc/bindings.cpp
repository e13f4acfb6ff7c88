// torch bindings of the expanded-linear CUDA kernels: op schemas (namespace expanse_fast_cuda),
// argument checks, output allocation, and the current CUDA stream.  The fake (meta)
// implementations live in Python (expanse_fast/backends/cuda.py).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "expanded_linear.h"

namespace {

using at::Tensor;
using expanse_fast::DType;

DType dtype_of(const Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "expanse_fast_cuda::", op,
                  ": expected dtype float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

// The kernels read rows with unit column stride; anything else is copied once.
Tensor rows_unit_stride(const Tensor& t) {
  return (t.dim() == 2 && t.size(1) > 1 && t.stride(1) != 1) ? t.contiguous() : t;
}

void check_2d(const Tensor& t, const char* op, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2, "expanse_fast_cuda::", op, ": ", name, " must be 2-D, got shape ",
              t.sizes());
  TORCH_CHECK(rows < 0 || t.size(0) == rows, "expanse_fast_cuda::", op, ": ", name,
              " must have ", rows, " rows, got shape ", t.sizes());
  TORCH_CHECK(cols < 0 || t.size(1) == cols, "expanse_fast_cuda::", op, ": ", name,
              " must have ", cols, " columns, got shape ", t.sizes());
}

void check_like(const Tensor& t, const Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "expanse_fast_cuda::", op, ": ", name,
              " must be on device ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "expanse_fast_cuda::", op, ": ", name,
              " must have dtype ", ref.scalar_type(), " (all operands share one dtype), got ",
              t.scalar_type());
}

// Checks the layout arguments and fills the launcher's shape description.
expanse_fast::LinearShape describe(const char* op, const Tensor& x, const Tensor& w_frozen,
                                   const Tensor& w_new, const std::optional<Tensor>& w_couple,
                                   at::IntArrayRef groups, at::IntArrayRef k_ends) {
  TORCH_CHECK(x.is_cuda(), "expanse_fast_cuda::", op, ": expected CUDA tensors, got x on ",
              x.device());
  check_2d(x, op, "x", -1, -1);
  const int64_t in = x.size(1);
  check_2d(w_frozen, op, "w_frozen", -1, -1);
  const int64_t o_f = w_frozen.size(0), i_f = w_frozen.size(1);
  TORCH_CHECK(i_f <= in, "expanse_fast_cuda::", op, ": w_frozen reads ", i_f,
              " inputs but x has only ", in);
  check_2d(w_new, op, "w_new", -1, in);
  check_like(w_frozen, x, op, "w_frozen");
  check_like(w_new, x, op, "w_new");
  if (w_couple.has_value()) {
    check_2d(*w_couple, op, "w_couple", o_f, in - i_f);
    check_like(*w_couple, x, op, "w_couple");
  }
  TORCH_CHECK(groups.size() == k_ends.size(), "expanse_fast_cuda::", op,
              ": frozen_out_groups and frozen_k_ends must have the same length, got ",
              groups.size(), " and ", k_ends.size());
  int64_t total = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    TORCH_CHECK(groups[g] >= 0, "expanse_fast_cuda::", op,
                ": frozen_out_groups must be >= 0, got ", groups);
    TORCH_CHECK(k_ends[g] >= 0 && k_ends[g] <= i_f, "expanse_fast_cuda::", op,
                ": frozen_k_ends must lie in [0, ", i_f, "], got ", k_ends);
    total += groups[g];
  }
  TORCH_CHECK(total == o_f, "expanse_fast_cuda::", op, ": frozen_out_groups ", groups,
              " sum to ", total, " but w_frozen has ", o_f, " rows");
  TORCH_CHECK(static_cast<int64_t>(groups.size()) <= expanse_fast::kMaxFrozenGroups,
              "expanse_fast_cuda::", op, ": at most ", expanse_fast::kMaxFrozenGroups,
              " frozen groups are supported, got ", groups.size());
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

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "expanse_fast_cuda::", op, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

Tensor linear_forward(const Tensor& x_in, const Tensor& w_frozen_in,
                      const std::optional<Tensor>& b_frozen_in, const Tensor& w_new_in,
                      const std::optional<Tensor>& b_new_in,
                      const std::optional<Tensor>& w_couple_in, at::IntArrayRef groups,
                      at::IntArrayRef k_ends) {
  const char* op = "linear_forward";
  const Tensor x = rows_unit_stride(x_in), w_frozen = rows_unit_stride(w_frozen_in);
  const Tensor w_new = rows_unit_stride(w_new_in);
  std::optional<Tensor> w_couple;
  if (w_couple_in) w_couple = rows_unit_stride(*w_couple_in);
  const auto s = describe(op, x, w_frozen, w_new, w_couple, groups, k_ends);
  std::optional<Tensor> b_frozen, b_new;
  if (b_frozen_in) {
    TORCH_CHECK(b_frozen_in->dim() == 1 && b_frozen_in->size(0) == s.frozen_out,
                "expanse_fast_cuda::", op, ": b_frozen must have shape [", s.frozen_out,
                "], got ", b_frozen_in->sizes());
    check_like(*b_frozen_in, x, op, "b_frozen");
    b_frozen = b_frozen_in->contiguous();
  }
  if (b_new_in) {
    TORCH_CHECK(b_new_in->dim() == 1 && b_new_in->size(0) == s.new_out, "expanse_fast_cuda::",
                op, ": b_new must have shape [", s.new_out, "], got ", b_new_in->sizes());
    check_like(*b_new_in, x, op, "b_new");
    b_new = b_new_in->contiguous();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty({s.rows, s.frozen_out + s.new_out}, x.options());
  check_launch(expanse_fast::linear_forward(
                   s, weights(w_frozen, w_new, w_couple), x.data_ptr(), x.stride(0),
                   b_frozen ? b_frozen->data_ptr() : nullptr,
                   b_new ? b_new->data_ptr() : nullptr, y.data_ptr(), y.stride(0),
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

}  // namespace

TORCH_LIBRARY(expanse_fast_cuda, m) {
  m.def("linear_forward(Tensor x, Tensor w_frozen, Tensor? b_frozen, Tensor w_new, "
        "Tensor? b_new, Tensor? w_couple, int[] frozen_out_groups, int[] frozen_k_ends) "
        "-> Tensor");
  m.def("linear_backward(Tensor dy, Tensor x, Tensor w_frozen, Tensor w_new, Tensor? w_couple, "
        "int[] frozen_out_groups, int[] frozen_k_ends, bool need_dx_new, bool need_dx_old, "
        "bool need_dw, bool need_db, bool need_dcouple) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(expanse_fast_cuda, CUDA, m) {
  m.impl("linear_forward", &linear_forward);
  m.impl("linear_backward", &linear_backward);
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
