// Interface between the torch-facing operator (packed_linear.cpp) and the compute
// loops, which are compiled twice: once for AVX2+FMA (kernels_avx2.cpp) and once for
// the plain target (kernels_scalar.cpp).  The loops see raw pointers only, so the
// AVX2 translation unit includes no torch header and cannot leak AVX2 code into
// functions the rest of the extension shares.
#pragma once

#include <cstdint>

#include "cpu_features.h"

namespace hf_comq {

// A compressed-tensors "pack-quantized" weight in nn.Linear (out, in) layout.
// Row o is a little-endian bit stream of `in_features` unsigned codes of `bits`
// bits each (code i at stream bits [i*bits, (i+1)*bits)), `row_bytes` bytes long.
// W[o, i] = float(code - zero[o, g]) * scale[o, g] with g = i / group_size.
struct PackedWeight {
  const uint8_t* data;
  int64_t row_bytes;
  const float* scale;   // (out_features, groups)
  const uint8_t* zero;  // (out_features, groups)
  int64_t out_features;
  int64_t in_features;
  int64_t groups;
  int64_t group_size;  // in_features when groups == 1; else a multiple of 8
  int bits;            // 1..8
};

// Output features the GEMM kernel computes at once (rows of a dequantized tile).
constexpr int64_t kTileRows = 6;
// Tokens per packed activation panel (two 8-float vectors).
constexpr int64_t kPanel = 16;

#define HF_COMQ_DECLARE_KERNELS(ns)                                                                  \
  namespace ns {                                                                                     \
  /* y[t, o] = sum_i x[t, i] W[o, i] + bias[o] for t < m and o in [o_begin, o_end); W never      */ \
  /* materialised.  x is (m, in_features) row-major, y is (m, out_features) row-major.           */ \
  void gemv(const PackedWeight& w, const float* x, int64_t m, const float* bias, float* y,          \
            int64_t o_begin, int64_t o_end);                                                        \
  /* out[(o - o_begin) * ld + (i - k_begin)] = W[o, i] exactly, for k_begin % 8 == 0.          */   \
  void dequantize(const PackedWeight& w, int64_t o_begin, int64_t o_end, int64_t k_begin,          \
                  int64_t k_end, float* out, int64_t ld);                                           \
  /* A dequantized tile (rows x kc floats, rows a multiple of kTileRows, zero padded past      */ \
  /* n_valid) times every packed token panel of xp (see pack_activations); writes y[t, 0..n_valid) */ \
  /* = bias + product, or adds the product when accumulate (later blocks of the inputs).         */ \
  void gemm_tile(const float* wt, int64_t rows, int64_t kc, const float* xp, int64_t k_offset,      \
                 int64_t in_features, int64_t m, float* y, int64_t ldy, int64_t n_valid,            \
                 const float* bias, bool accumulate);                                               \
  }

HF_COMQ_DECLARE_KERNELS(scalar)
#if HF_COMQ_HAVE_AVX2_BUILDS
HF_COMQ_DECLARE_KERNELS(avx2)
#endif

// x (m, in) row-major -> panels of kPanel tokens, each (in, kPanel) k-major, zero padded:
// the GEMM micro-kernel then reads kPanel consecutive floats per input column.
inline void pack_activations(const float* x, int64_t m, int64_t in_features, float* xp) {
  for (int64_t t0 = 0; t0 < m; t0 += kPanel) {
    float* panel = xp + t0 * in_features;
    const int64_t tokens = m - t0 < kPanel ? m - t0 : kPanel;
    for (int64_t k = 0; k < in_features; ++k) {
      float* dst = panel + k * kPanel;
      int64_t t = 0;
      for (; t < tokens; ++t) dst[t] = x[(t0 + t) * in_features + k];
      for (; t < kPanel; ++t) dst[t] = 0.0f;
    }
  }
}

}  // namespace hf_comq
