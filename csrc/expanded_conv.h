// Launchers of the expanded-conv2d CUDA kernels (NCHW, groups = 1): raw pointers, sizes,
// strides, a dtype enum and a stream.  No torch headers, so CI can compile the kernels with
// nvcc alone.  Depthwise convolutions have no kernels here: the Python backend hands them to
// the structured PyTorch path (cuDNN), which already skips every frozen block.
//
// Storage (expanse_fast/layout.py), every weight a contiguous (rows, channels, KH, KW) tensor:
//   w_frozen (O_f, I_f, KH, KW), w_new (o_T, I, KH, KW), w_couple (O_f, I - I_f, KH, KW) or
//   null (isolated layout).  Frozen output group g (rows r0 .. r0 + rows_g) reads input
//   channels [0, k_end[g]) through w_frozen (its channels past k_end[g] are never read) and,
//   coupled, the newest channels [I_f, I) through w_couple.  The new rows read every channel.
// As an implicit GEMM the reduction index of a weight row is k = (c * KH + kh) * KW + kw, so a
// channel prefix [0, k_end) is the prefix [0, k_end * KH * KW) of the row: the staircase is a
// shorter K range, exactly as in the linear kernels.
//
// x and dy are read through arbitrary element strides (NCHW, channels_last, any view); the
// outputs y, dx, dW are written contiguous (NCHW).  All operands share one dtype; products
// accumulate in fp32.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "expanded_linear.h"  // DType

namespace expanse_fast {

// Frozen output groups a launch carries in its parameters.
constexpr int kMaxConvFrozenGroups = 64;

// Spatial description of one convolution.  Sizes are checked by the caller to fit the kernels'
// index types (see conv_geometry_ok below).
struct ConvGeometry {
  int64_t batch;                  // N
  int64_t height, width;          // H, W of x
  int64_t out_h, out_w;           // Ho, Wo of y
  int kernel_h, kernel_w;         // KH, KW
  int stride_h, stride_w;         // >= 1
  int pad_h, pad_w;               // >= 0
  int dil_h, dil_w;               // >= 1
};

// Element strides of a 4-D (N, C, H, W) tensor.
struct Strides4 {
  int64_t n, c, h, w;
};

struct ConvShape {
  DType dtype;
  ConvGeometry geo;
  int64_t in_channels;  // I: channels of x
  int64_t frozen_in;    // I_f (<= I)
  int64_t frozen_out;   // O_f (= sum of frozen_out_groups)
  int64_t new_out;      // o_T
  int num_frozen_groups;
  const int64_t* frozen_out_groups;  // host arrays of num_frozen_groups entries
  const int64_t* frozen_k_ends;      // each in [0, I_f]
};

struct ConvWeights {
  const void* w_frozen;  // contiguous (O_f, I_f, KH, KW)
  const void* w_new;     // contiguous (o_T, I, KH, KW)
  const void* w_couple;  // contiguous (O_f, I - I_f, KH, KW), or null: isolated layout
};

// True when every size fits the kernels' index arithmetic (channel * KH * KW, H, W, Ho, Wo and
// output channels in int32 with headroom; pixel counts in int64).  The launchers refuse
// (cudaErrorInvalidValue) shapes for which this is false.
bool conv_shape_ok(const ConvShape& s);

// y (N, O_f + o_T, Ho, Wo), contiguous: every output group in one launch (frozen groups over
// their channel prefix, plus the coupling block; the new group over all channels), biases
// fused (either may be null).  bn_scale / bn_shift (fp32, O_f entries, both or neither): a
// folded eval-mode BatchNorm of the frozen channels, y_c = v_c * bn_scale[c] + bn_shift[c]
// after the bias and the coupling term.
cudaError_t conv2d_forward(const ConvShape& s, const ConvWeights& w, const void* x,
                           const Strides4& sx, const void* b_frozen, const void* b_new,
                           const float* bn_scale, const float* bn_shift, void* y,
                           cudaStream_t stream);

// The same forward for channels_last x (expanded_conv_nhwc.cu): fp16/bf16 (wgmma on an sm_90a
// build, else WMMA) or fp32 (SIMT FMA), x's channels contiguous (sx.c == 1) with 16-byte aligned pixels, every channel count a
// phase reads (I, I_f, each k_end) a multiple of 8; conv2d_forward_nhwc_ok says whether a
// call qualifies (EXPANSE_FAST_CUDA_CONV_NHWC=0 says no to all).  Here the weights are
// (rows, KH, KW, channels), contiguous (channels_last weights), and y is written
// (N, Ho, Wo, O_f + o_T), contiguous (a channels_last (N, O, Ho, Wo) tensor).
bool conv2d_forward_nhwc_ok(const ConvShape& s, const void* x, const Strides4& sx);
cudaError_t conv2d_forward_nhwc(const ConvShape& s, const ConvWeights& w_channels_last,
                                const void* x, const Strides4& sx, const void* b_frozen,
                                const void* b_new, const float* bn_scale, const float* bn_shift,
                                void* y, cudaStream_t stream);

// The input gradient for channels_last dy (expanded_conv_nhwc.cu), on the same terms: dy's
// channels contiguous with 16-byte aligned pixels, every row count (o_T, O_f, each frozen
// group's) a multiple of 8.  The weights are each transposed to (channels, KH, KW, rows),
// contiguous, and dx is written (N, H, W, I), contiguous (a channels_last dx); otherwise as
// conv2d_backward_input below.
bool conv2d_backward_input_nhwc_ok(const ConvShape& s, const void* dy, const Strides4& sdy);
cudaError_t conv2d_backward_input_nhwc(const ConvShape& s, const ConvWeights& w_transposed,
                                       const void* dy, const Strides4& sdy, bool need_dx_old,
                                       void* dx, cudaStream_t stream);

// dx (N, I, H, W), contiguous.  Channels [I_f, I) (dx_new) always: the new rows, plus the
// coupling block; channels [0, I_f) (dx_old) when need_dx_old (the new rows and every frozen
// group over its prefix), else they are written as zeros.
cudaError_t conv2d_backward_input(const ConvShape& s, const ConvWeights& w, const void* dy,
                                  const Strides4& sdy, bool need_dx_old, void* dx,
                                  cudaStream_t stream);

// Weight gradient of rows [dy_c0, dy_c0 + m) of dy against input channels [x_c0, x_c0 + n_ch)
// of x: out (m, n_ch, KH, KW), contiguous.  dy_c0 = O_f, x_c0 = 0, n_ch = I gives dW_new;
// dy_c0 = 0, x_c0 = I_f, n_ch = I - I_f gives dW_couple.  The reduction runs over the
// N * Ho * Wo output pixels; when few output tiles would fill the GPU it is split over blocks
// whose fp32 partial sums go to a workspace of plan.workspace_bytes and are added in a fixed
// order (deterministic, no atomics).
struct ConvWeightGradPlan {
  int splits;              // blocks along the reduction
  int64_t pixels_per_split;
  size_t workspace_bytes;
};
ConvWeightGradPlan plan_conv_weight_grad(DType dtype, int64_t pixels, int64_t m, int64_t n_ch,
                                         int kernel_area, int num_sms);
cudaError_t conv2d_weight_grad(DType dtype, const ConvGeometry& geo, const void* dy,
                               const Strides4& sdy, int64_t dy_c0, int64_t m, const void* x,
                               const Strides4& sx, int64_t x_c0, int64_t n_ch, void* out,
                               const ConvWeightGradPlan& plan, void* workspace,
                               cudaStream_t stream);

// The weight gradient for channels_last dy and x (expanded_conv_nhwc.cu), on the same terms
// as the forward for x, and dy the (pixels, O_f + o_T) matrix of a channels_last tensor
// (N * Ho * Wo < 2^31): out (m, KH, KW, n_ch) contiguous (x_c0 and n_ch multiples of 8), and
// when db is not null the sums of dy's channels [dy_c0, dy_c0 + m) fused in.  Split as
// plan_conv_weight_grad_nhwc says (its workspace: fp32 partials).
bool conv2d_weight_grad_nhwc_ok(const ConvShape& s, const void* dy, const Strides4& sdy,
                                const void* x, const Strides4& sx);
ConvWeightGradPlan plan_conv_weight_grad_nhwc(int64_t pixels, int64_t m, int64_t n_ch,
                                              int kernel_area, int num_sms);
cudaError_t conv2d_weight_grad_nhwc(const ConvShape& s, const void* dy, const Strides4& sdy,
                                    int64_t dy_c0, int64_t m, const void* x, const Strides4& sx,
                                    int64_t x_c0, int64_t n_ch, void* out, void* db,
                                    const ConvWeightGradPlan& plan, void* workspace,
                                    cudaStream_t stream);

// db (m) = sums of dy channels [dy_c0, dy_c0 + m) over batch and pixels (fp32, fixed order).
cudaError_t conv2d_bias_grad(DType dtype, const ConvGeometry& geo, const void* dy,
                             const Strides4& sdy, int64_t dy_c0, int64_t m, void* db,
                             cudaStream_t stream);

}  // namespace expanse_fast
