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

// Which output tile block b (blockIdx.x fastest, the order blocks start in) of an m_tiles x
// n_tiles grid computes: the grid is taken `group` row tiles at a time, column tile by column
// tile within a group.  The blocks running at once then share a few row tiles of A and a few
// column tiles of B, which stay in L2; in plain row order each running block had a row tile
// of its own, and all of A streamed from memory again for every column tile.
struct GridTile {
  int64_t m;  // row tile
  int n;      // column tile (gridDim.y: below 2^16)
};
__host__ __device__ __forceinline__ GridTile grouped_tile(int64_t b, int64_t m_tiles,
                                                          int64_t n_tiles, int group) {
  const int64_t per_group = static_cast<int64_t>(group) * n_tiles;
  const int64_t first = b / per_group * group;  // the group's first row tile
  const int64_t rows = m_tiles - first < group ? m_tiles - first : group;
  const int64_t in_group = b % per_group;
  return {first + in_group % rows, static_cast<int>(in_group / rows)};
}
constexpr int kGroupM = 8;  // row tiles per group

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

// The old input columns (channels) [0, frozen_in) of a dx launch, in bands tiled apart.  With
// dx_old the bands are cut at every frozen group's k_end: a group then reaches all of a tile's
// stored columns or none, so no tile multiplies its dy by the zeros past its k_end (0 * NaN:
// a NaN or Inf in an old output's gradient stays out of columns that output never reads).
// Without dx_old, one band (its tiles store zeros).  Band b is [b ? end[b - 1] : 0, end[b]),
// its tiles tile0[b] .. tile0[b + 1] - 1; tile0[n] counts the old tiles.
template <int kMaxGroups>
struct OldBands {
  int n;
  int end[kMaxGroups + 1];
  int tile0[kMaxGroups + 2];

  // Built on the host from the launch's groups; returns the number of old tiles.
  int64_t build(int num_groups, const int64_t* k_ends, int64_t frozen_in, bool need_old,
                int block) {
    n = 0;
    if (need_old)
      for (int g = 0; g < num_groups; ++g) {  // the distinct k_ends inside, ascending
        const int k = static_cast<int>(k_ends[g]);
        if (k <= 0 || k >= frozen_in) continue;
        int at = 0;
        while (at < n && end[at] < k) ++at;
        if (at < n && end[at] == k) continue;
        for (int j = n; j > at; --j) end[j] = end[j - 1];
        end[at] = k;
        ++n;
      }
    end[n++] = static_cast<int>(frozen_in);
    tile0[0] = 0;
    for (int b = 0; b < n; ++b)
      tile0[b + 1] = tile0[b] + static_cast<int>(ceil_div(end[b] - (b ? end[b - 1] : 0), block));
    return tile0[n];
  }

  // Old tile t: its first column c0 and its band's end c_end.
  __host__ __device__ __forceinline__ void tile(int t, int block, int& c0, int& c_end) const {
    int b = 0;
    while (b + 1 < n && tile0[b + 1] <= t) ++b;
    c0 = (b ? end[b - 1] : 0) + (t - tile0[b]) * block;
    c_end = end[b];
  }
};

}  // namespace common

// Whether the fp16/bf16 GEMMs of this call use wgmma (Hopper warpgroup MMA) on the current
// device: built for sm_90a, running there, and not turned off by EXPANSE_FAST_CUDA_WGMMA=0.
// Defined with the linear kernels; the conv kernels ask it too.
bool wgmma_enabled(DType dtype);
// The linear wgmma kernels' variant for this call: the default, their K-major operand tiles
// stored with the 128-byte swizzle (EXPANSE_FAST_CUDA_SWIZZLE=1), two stages of 128-wide
// k-tiles (EXPANSE_FAST_CUDA_PIPELINE=k128x2) or the forward's tiles loaded by the copy engine
// (EXPANSE_FAST_CUDA_PIPELINE=tma), all experiments.  Defined with them.
enum class WgmmaVariant { kDefault, kSwizzled, kDeepK, kTma };
WgmmaVariant wgmma_variant();

}  // namespace expanse_fast
