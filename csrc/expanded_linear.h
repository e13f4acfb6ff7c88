// Launchers of the expanded-linear CUDA kernels: raw pointers, sizes, strides, a dtype enum and a
// stream.  No torch headers, so CI can compile the kernels with nvcc alone.
//
// Storage (expanse_fast/layout.py): w_frozen (O_f, I_f), w_new (o_T, I), w_couple (O_f, i_T) or
// null (isolated layout).  Frozen output group g (rows r0..r0+rows_g) reads inputs 0..k_end[g];
// its columns past k_end[g] are never read.  Every 2-D operand is row-major with unit column
// stride and a row stride ("ld", in elements; 0 is allowed for broadcast inputs).  All operands
// share one dtype; products accumulate in fp32.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace expanse_fast {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The input-gradient kernel keeps every frozen group in its launch parameters.
constexpr int kMaxFrozenGroups = 64;

struct LinearShape {
  DType dtype;
  int64_t rows;         // N: rows of x
  int64_t in_features;  // I
  int64_t frozen_in;    // I_f
  int64_t frozen_out;   // O_f (= sum of frozen_out_groups)
  int64_t new_out;      // o_T
  int num_frozen_groups;
  const int64_t* frozen_out_groups;  // host arrays of num_frozen_groups entries
  const int64_t* frozen_k_ends;
};

struct LinearWeights {
  const void* w_frozen; int64_t ld_w_frozen;
  const void* w_new;    int64_t ld_w_new;
  const void* w_couple; int64_t ld_w_couple;  // w_couple == nullptr: isolated layout
};

// The forward's epilogue after the bias: an activation, and optionally the store of its input
// (the pre-activation) for output columns pre_col0.. into pre (N, O - pre_col0), which the
// activation's backward reads.  Codes match expanse_fast/backends/cuda.py.
enum class Activation : int { kNone = 0, kReLU = 1, kGeluTanh = 2, kSiLU = 3, kGelu = 4 };
struct LinearEpilogue {
  Activation activation = Activation::kNone;
  void* pre = nullptr;  // null: nothing stored
  int64_t ld_pre = 0;
  int64_t pre_col0 = 0;
};

// y (N, O_f + o_T) = act([frozen groups | new group] of x + bias) (either bias may be null).
// One launch per 32 non-empty output groups (one in practice).
cudaError_t linear_forward(const LinearShape& s, const LinearWeights& w, const void* x,
                           int64_t ld_x, const void* b_frozen, const void* b_new, void* y,
                           int64_t ld_y, const LinearEpilogue& epilogue, cudaStream_t stream);

// dx (N, I).  Columns I_f.. (dx_new) always; columns ..I_f (dx_old) when need_dx_old, else
// they are written as zeros.
cudaError_t linear_backward_input(const LinearShape& s, const LinearWeights& w, const void* dy,
                                  int64_t ld_dy, bool need_dx_old, void* dx, int64_t ld_dx,
                                  cudaStream_t stream);

// Weight gradient out (m, n) = A^T B with A = a[:, a_col0 : a_col0 + m] and
// B = b[:, b_col0 : b_col0 + n] over `rows` rows, and db (m) = column sums of A.  With
// A = dy, a_col0 = O_f, B = x this is dW_new and db_new; with A = dy, a_col0 = 0, B = x,
// b_col0 = I_f it is dW_couple.  out or db may be null.  When few output tiles would fill the
// GPU the row (reduction) range is split over blocks; the fp32 partial sums then need a
// workspace of plan.workspace_bytes (deterministic order: no atomics).
struct WeightGradPlan {
  int splits;          // blocks along the reduction
  int64_t rows_per_split;
  size_t workspace_bytes;
};
WeightGradPlan plan_weight_grad(DType dtype, int64_t rows, int64_t m, int64_t n, int num_sms);
cudaError_t linear_weight_grad(DType dtype, int64_t rows, int64_t m, int64_t n, const void* a,
                               int64_t ld_a, int64_t a_col0, const void* b, int64_t ld_b,
                               int64_t b_col0, void* out, int64_t ld_out, void* db,
                               const WeightGradPlan& plan, void* workspace, cudaStream_t stream);

// The tile math the kernels use for `dtype` on the current device, now: "wgmma" (Hopper
// warpgroup MMA; needs the sm_90a build and is on unless EXPANSE_FAST_CUDA_WGMMA=0), "wmma"
// (portable tensor-core fragments) or "simt" (fp32).
const char* linear_math_name(DType dtype);

}  // namespace expanse_fast
