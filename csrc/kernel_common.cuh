// Helpers both kernel files use: element conversions, the dtype switch and grid arithmetic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "expanded_linear.h"  // DType

namespace expanse_fast {
namespace common {

// ---- element conversions: explicit, since torch builds with __CUDA_NO_HALF_CONVERSIONS__ ----
__host__ __device__ __forceinline__ float to_f(float v) { return v; }
__host__ __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __host__ __device__ __forceinline__ T from_f(float v);
template <> __host__ __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __host__ __device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <> __host__ __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls f with a value of the element type that `dt` names.
template <class F>
cudaError_t dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kMaxGridY = 65535;  // gridDim.y and gridDim.z limit

// The frozen groups of a layer's launch description: every width and k_end in range
// (k_end <= frozen_in), and the widths adding up to frozen_out.
inline bool frozen_groups_ok(int num_groups, const int64_t* widths, const int64_t* k_ends,
                             int64_t frozen_in, int64_t frozen_out) {
  int64_t total = 0;
  for (int g = 0; g < num_groups; ++g) {
    if (widths[g] < 0 || k_ends[g] < 0 || k_ends[g] > frozen_in) return false;
    total += widths[g];
  }
  return total == frozen_out;
}

}  // namespace common

// Whether the fp16/bf16 GEMMs of this call use wgmma (Hopper warpgroup MMA) on the current
// device: built for sm_90a, running there, and not turned off by EXPANSE_FAST_CUDA_WGMMA=0.
// Defined with the linear kernels; the conv kernels ask it too.
bool wgmma_enabled(DType dtype);

}  // namespace expanse_fast
