// Host-only check of the wgmma operand layout in csrc/wgmma.cuh (built by test_wgmma_layout.py
// with nvcc, run on the CPU; no GPU involved).  A tile is copied chunk by chunk the way the
// kernels copy it; then every m64 (A) or n256 / n64 (B) x k16 block that the kernels hand
// wgmma is read back through its descriptor fields by the PTX ISA's canonical no-swizzle
// layouts, restated here independently:
//   K-major  ((8,m),(T,2k)):((1T,SBO),(1,LBO))   MN-major ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))
// with T = 8 elements (16 bytes), and must give the global tile's elements.  The accumulator
// fragment map must cover the 64 x N warpgroup tile exactly once (N = 256, 64).
#include <cstdio>
#include <vector>

#include "wgmma.cuh"

using namespace expanse_fast::wgmma;

constexpr int VEC = 8;  // fp16/bf16
static int failures = 0;

static void expect(bool ok, const char* what, int a, int b, int c) {
  if (!ok && failures++ < 20) std::printf("FAIL %s (%d, %d, %d)\n", what, a, b, c);
}

// Byte address of element (mn, k) of a block by the canonical layout (independent of wgmma.cuh).
static long canonical_byte(bool k_major, long start_byte, long lbo, long sbo, int mn, int k) {
  if (k_major) return start_byte + (mn % 8) * 16 + (mn / 8) * sbo + (k % 8) * 2 + (k / 8) * lbo;
  return start_byte + (mn % 8) * 2 + (mn / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo;
}

// A tile of OUTER global rows x INNER columns; K_MAJOR: rows are M/N, columns K.
template <bool K_MAJOR, int OUTER, int INNER>
static void check_tile(int mn_block, const std::vector<int>& mn0s, const char* name) {
  std::vector<int> global(OUTER * INNER), smem(OUTER * INNER, -1);
  for (int i = 0; i < OUTER * INNER; ++i) global[i] = i;
  const int per_row = INNER / VEC;
  for (int j = 0; j < OUTER * per_row; ++j) {  // the kernels' copy: chunk j to bytes 16 j..
    int o, c;
    chunk_origin(j, per_row, o, c);
    expect(o < OUTER && c < per_row, name, j, o, c);
    for (int e = 0; e < VEC; ++e) smem[j * VEC + e] = global[o * INNER + c * VEC + e];
  }
  for (int o = 0; o < OUTER; ++o)
    for (int i = 0; i < INNER; ++i)
      expect(smem[tile_offset<INNER, VEC>(o, i)] == global[o * INNER + i], name, o, i, -1);
  const int k_extent = K_MAJOR ? INNER : OUTER;
  for (int mn0 : mn0s)
    for (int k0 = 0; k0 < k_extent; k0 += 16) {
      const DescFields f = desc_fields<K_MAJOR, INNER, VEC>(mn0, k0);
      expect(f.lbo % 16 == 0 && f.sbo % 16 == 0 && f.start % VEC == 0, name, mn0, k0, -2);
      for (int mn = 0; mn < mn_block; ++mn)
        for (int k = 0; k < 16; ++k) {
          const long byte = canonical_byte(K_MAJOR, 2L * f.start, f.lbo, f.sbo, mn, k);
          const int want = K_MAJOR ? global[(mn0 + mn) * INNER + k0 + k]
                                   : global[(k0 + k) * INNER + mn0 + mn];
          expect(byte % 2 == 0 && byte / 2 < OUTER * INNER && smem[byte / 2] == want, name,
                 mn0 + mn, k0 + k, static_cast<int>(byte));
        }
    }
}

// The 128-byte swizzle (the descriptor's layout type 1), restated: element (mn, k) of a K-major
// block sits at start + (mn / 8) * SBO + (mn % 8) * 128 + 2 k as if unswizzled, and the
// hardware XORs that address's bits 4-6 (the 16-byte chunk of a 128-byte row) with its bits
// 7-9 (the row within 1024 bytes); the tile starts on 1024 bytes.
static long swizzled_byte(long start_byte, long sbo, int mn, int k) {
  const long a = start_byte + (mn / 8) * sbo + (mn % 8) * 128 + 2L * k;
  return a ^ (((a >> 7) & 7) << 4);
}

// A K-major tile of OUTER rows x 64 columns (128-byte rows) copied the way the swizzled
// kernels copy it (chunk j: row j / 8, chunk j % 8), then read back through each m64 / n256
// x k16 block's descriptor fields.
template <int OUTER>
static void check_tile_sw128(int mn_block, const std::vector<int>& mn0s, const char* name) {
  constexpr int INNER = 64, per_row = INNER / VEC;
  std::vector<int> global(OUTER * INNER), smem(OUTER * INNER, -1);
  for (int i = 0; i < OUTER * INNER; ++i) global[i] = i;
  for (int j = 0; j < OUTER * per_row; ++j) {
    const int o = j / per_row, c = j % per_row;
    const int at = tile_offset_sw128<INNER, VEC>(o, c * VEC);
    expect(at % VEC == 0 && at / INNER == o, name, j, o, c);  // whole chunks, in their row
    for (int e = 0; e < VEC; ++e) smem[at + e] = global[o * INNER + c * VEC + e];
  }
  for (int i = 0; i < OUTER * INNER; ++i) expect(smem[i] >= 0, name, i, -1, -1);  // all landed
  for (int o = 0; o < OUTER; o += 8)  // eight rows of one chunk column: eight chunks
    for (int c = 0; c < per_row; ++c) {
      int seen = 0;
      for (int r = 0; r < 8; ++r) seen |= 1 << (tile_offset_sw128<INNER, VEC>(o + r, c * VEC) % INNER / VEC);
      expect(seen == 0xFF, name, o, c, seen);
    }
  for (int mn0 : mn0s)
    for (int k0 = 0; k0 < INNER; k0 += 16) {
      const DescFields f = desc_fields_sw128<INNER, VEC>(mn0, k0);
      expect(f.sbo == 1024 && f.lbo % 16 == 0 && f.start % VEC == 0, name, mn0, k0, -2);
      for (int mn = 0; mn < mn_block; ++mn)
        for (int k = 0; k < 16; ++k) {
          const long byte = swizzled_byte(2L * f.start, f.sbo, mn, k);
          expect(byte % 2 == 0 && byte / 2 < OUTER * INNER &&
                     smem[byte / 2] == global[(mn0 + mn) * INNER + k0 + k],
                 name, mn0 + mn, k0 + k, static_cast<int>(byte));
        }
    }
}

// The m64nN fp32 accumulators of a warpgroup (N / 2 per thread) cover 64 x N exactly once.
static void check_accumulators(int n) {
  std::vector<int> seen(64 * n, 0);
  for (int t = 0; t < 128; ++t)
    for (int i = 0; i < n / 2; ++i) {
      const int r = acc_row(t, i), c = acc_col(t, i);
      expect(r >= 0 && r < 64 && c >= 0 && c < n, "accumulator in range", n, t, i);
      if (r >= 0 && r < 64 && c >= 0 && c < n) ++seen[r * n + c];
    }
  for (int i = 0; i < 64 * n; ++i) expect(seen[i] == 1, "accumulator covers once", n, i, 0);
  // store_pairs hands over d[i], d[i + 1] (i even) as one 8-byte store at (row, even column)
  for (int t = 0; t < 128; ++t)
    for (int i = 0; i < n / 2; i += 2)
      expect(acc_row(t, i + 1) == acc_row(t, i) && acc_col(t, i + 1) == acc_col(t, i) + 1 &&
                 acc_col(t, i) % 2 == 0,
             "accumulator pairs adjacent", n, t, i);
}

int main() {
  // The linear kernels' tiles: BM = 128, BN = 256, BK = 64; A blocks of 64 rows per
  // warpgroup, B blocks of all 256 columns (m64n256k16).
  check_tile<true, 128, 64>(64, {0, 64}, "linear A K-major (x, dy)");
  check_tile<false, 64, 128>(64, {0, 64}, "linear A M-major (dy^T)");
  check_tile<true, 256, 64>(256, {0}, "linear B K-major (w rows)");
  check_tile<false, 64, 256>(256, {0}, "linear B N-major (w, x)");
  // (the k128x2 experiment: BK = 128, so A [128][128] / [128][128], B [256][128] / [128][256])
  check_tile<true, 128, 128>(64, {0, 64}, "linear A K-major, BK 128 (x, dy)");
  check_tile<false, 128, 128>(64, {0, 64}, "linear A M-major, BK 128 (dy^T)");
  check_tile<true, 256, 128>(256, {0}, "linear B K-major, BK 128 (w rows)");
  check_tile<false, 128, 256>(256, {0}, "linear B N-major, BK 128 (w, x)");
  check_tile_sw128<128>(64, {0, 64}, "linear A K-major, 128-byte swizzle (x, dy)");
  check_tile_sw128<256>(256, {0}, "linear B K-major, 128-byte swizzle (w rows)");
  // The conv kernels' tiles (BK = 32; m64n64 per warpgroup): forward and dx 128 x 64 with A
  // stored [k][m]; dW 64 x 128 with A stored [m][k], the warpgroups splitting N.
  check_tile<false, 32, 128>(64, {0, 64}, "conv A M-major (im2col x, dy taps)");
  check_tile<true, 64, 32>(64, {0}, "conv B K-major (fwd/dx weights)");
  check_tile<true, 64, 32>(64, {0}, "conv A K-major (dW: dy)");
  check_tile<true, 128, 32>(64, {0, 64}, "conv B K-major (dW: x taps)");
  check_accumulators(256);
  check_accumulators(64);
  std::printf(failures ? "%d failures\n" : "wgmma layout OK\n", failures);
  return failures ? 1 : 0;
}
