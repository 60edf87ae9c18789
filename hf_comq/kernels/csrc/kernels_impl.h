// Compute loops for kernels.h, included by kernels_avx2.cpp (HF_COMQ_AVX2 = 1, compiled
// for avx2+fma) and kernels_scalar.cpp (HF_COMQ_AVX2 = 0).  HF_COMQ_ISA names the
// namespace, so each build gets its own copy of every function here and no inline
// function compiled for AVX2 can be picked by the linker for the other build.
//
// Exactness: dequantize (and so the tile GEMM) forms every weight as
// float(code - zero) * scale, the single rounding of the torch fallback, bit for bit.
// The GEMV sums x * float(code - zero) over a group and multiplies by the scale once.
// Either way the result differs from F.linear only by fp32 rounding in the sums.

namespace hf_comq {
namespace HF_COMQ_ISA {
namespace {

// Code i of a row, reading only bytes that belong to the row.
inline int32_t code_at(const uint8_t* row, int64_t i, int bits) {
  const int64_t bit = i * bits;
  const uint8_t* p = row + (bit >> 3);
  const int offset = static_cast<int>(bit & 7);
  uint32_t window = p[0];
  if (offset + bits > 8) window |= static_cast<uint32_t>(p[1]) << 8;
  return static_cast<int32_t>((window >> offset) & ((1u << bits) - 1u));
}

inline float weight_at(const PackedWeight& w, const uint8_t* row, int64_t o, int64_t i) {
  const int64_t g = i / w.group_size;
  const int32_t zero = w.zero[o * w.groups + g];
  return static_cast<float>(code_at(row, i, w.bits) - zero) * w.scale[o * w.groups + g];
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Eight consecutive codes (8 * B bits) start on a byte boundary, at byte B * blk.  The
// vector decoder reads block_read_bytes(B) bytes from there, which can pass the end of
// the row for its last few blocks; those (at most kTailBlocks) are decoded from a
// zero-padded copy of the row's end, so no load ever leaves the tensor.
constexpr int64_t block_read_bytes(int B) { return B <= 4 ? 4 : B == 8 ? 8 : (4 * B) / 8 + 4; }
constexpr int64_t kTailBlocks = 4;
constexpr int64_t kTailBytes = kTailBlocks * 8 + 8;

// Blocks [0, safe_blocks) can be read in place.
template <int B>
inline int64_t safe_blocks(const PackedWeight& w) {
  const int64_t full = w.in_features / 8;
  const int64_t safe = w.row_bytes < block_read_bytes(B) ? 0 : (w.row_bytes - block_read_bytes(B)) / B + 1;
  return safe < full ? safe : full;
}

// The bytes of a row from block `first` on, zero padded to kTailBytes.
template <int B>
inline void copy_tail(const PackedWeight& w, const uint8_t* row, int64_t first, uint8_t (&tail)[kTailBytes]) {
  std::memset(tail, 0, kTailBytes);
  const int64_t start = first * B;
  if (start < w.row_bytes) {
    const int64_t n = w.row_bytes - start < kTailBytes ? w.row_bytes - start : kTailBytes;
    std::memcpy(tail, row + start, static_cast<size_t>(n));
  }
}

// Blocks [first, last) of group g that the vector loop handles.
inline void group_blocks(const PackedWeight& w, int64_t g, int64_t nvec, int64_t* first, int64_t* last) {
  *first = g * w.group_size / 8;
  const int64_t end = (g + 1) * w.group_size / 8;
  *last = end < nvec ? end : nvec;
}

// Inputs [from, K) past the last whole block of 8, one weight at a time (both builds).
template <int MR, int RO>
inline void add_tail_columns(const PackedWeight& w, const uint8_t* const (&rows)[RO], int64_t o, const float* x,
                             int64_t from, float (&out)[MR][RO]) {
  const int64_t K = w.in_features;
  for (int64_t i = from; i < K; ++i) {
    for (int r = 0; r < RO; ++r) {
      const float wi = weight_at(w, rows[r], o + r, i);
      for (int m = 0; m < MR; ++m) out[m][r] += wi * x[m * K + i];
    }
  }
}

#if HF_COMQ_AVX2

template <int B>
inline __m256i codes8(const uint8_t* p) {
  const __m256i mask = _mm256_set1_epi32((1 << B) - 1);
  if constexpr (B == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (B <= 4) {
    const __m256i shifts = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(load_u32(p))), shifts), mask);
  } else {
    // 5-7 bits: codes 0-3 from the word at the block start, codes 4-7 from the word
    // holding stream bit 4B (each group of four spans at most 4 + 28 = 32 bits).
    constexpr int o = (4 * B) % 8;
    const __m256i shifts = _mm256_setr_epi32(0, B, 2 * B, 3 * B, o, o + B, o + 2 * B, o + 3 * B);
    const __m256i words = _mm256_blend_epi32(_mm256_set1_epi32(static_cast<int>(load_u32(p))),
                                             _mm256_set1_epi32(static_cast<int>(load_u32(p + (4 * B) / 8))), 0xF0);
    return _mm256_and_si256(_mm256_srlv_epi32(words, shifts), mask);
  }
}

inline __m256 dequant8(__m256i codes, __m256i zero, __m256 scale) {
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(codes, zero)), scale);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Dot products of RO consecutive weight rows (from o) with MR activation rows.
// Within a group the scale is common to every term, so the vector loop sums
// x * float(code - zero) and multiplies by the scale once per group (the
// distributive law; it changes only the fp32 rounding, like another summation
// order, and saves a multiply per eight weights).
template <int B, int MR, int RO>
inline void dot_rows(const PackedWeight& w, int64_t o, const float* x, float (&out)[MR][RO]) {
  const int64_t K = w.in_features;
  const int64_t full = K / 8;
  const int64_t safe = safe_blocks<B>(w);
  const uint8_t* rows[RO];
  uint8_t tails[RO][kTailBytes];
  for (int r = 0; r < RO; ++r) {
    rows[r] = w.data + (o + r) * w.row_bytes;
    if (safe < full) copy_tail<B>(w, rows[r], safe, tails[r]);
  }
  __m256 total[MR][RO];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < RO; ++r) total[m][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    int64_t first, last;
    group_blocks(w, g, full, &first, &last);
    if (first >= last) break;
    __m256 acc[MR][RO];
    __m256i zero[RO];
    for (int r = 0; r < RO; ++r) zero[r] = _mm256_set1_epi32(w.zero[(o + r) * w.groups + g]);
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < RO; ++r) acc[m][r] = _mm256_setzero_ps();
    auto step = [&](int64_t blk, const uint8_t* const* src, int64_t src_blk) {
      __m256 xv[MR];
      for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * K + blk * 8);
      for (int r = 0; r < RO; ++r) {
        const __m256 centred = _mm256_cvtepi32_ps(_mm256_sub_epi32(codes8<B>(src[r] + src_blk * B), zero[r]));
        for (int m = 0; m < MR; ++m) acc[m][r] = _mm256_fmadd_ps(centred, xv[m], acc[m][r]);
      }
    };
    const int64_t mid = last < safe ? last : (first > safe ? first : safe);
    for (int64_t blk = first; blk < mid; ++blk) step(blk, rows, blk);
    if (mid < last) {
      const uint8_t* tail_ptrs[RO];
      for (int r = 0; r < RO; ++r) tail_ptrs[r] = tails[r];
      for (int64_t blk = mid; blk < last; ++blk) step(blk, tail_ptrs, blk - safe);
    }
    for (int r = 0; r < RO; ++r) {
      const __m256 scale = _mm256_set1_ps(w.scale[(o + r) * w.groups + g]);
      for (int m = 0; m < MR; ++m) total[m][r] = _mm256_fmadd_ps(acc[m][r], scale, total[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < RO; ++r) out[m][r] = hsum(total[m][r]);
  add_tail_columns(w, rows, o, x, full * 8, out);
}

template <int B>
inline void dequantize_row(const PackedWeight& w, int64_t o, int64_t k_begin, int64_t k_end, float* out) {
  const uint8_t* row = w.data + o * w.row_bytes;
  const int64_t safe = safe_blocks<B>(w);
  const int64_t full = k_end / 8;
  uint8_t tail[kTailBytes];
  if (safe < full) copy_tail<B>(w, row, safe, tail);
  int64_t i = k_begin;
  for (int64_t g = k_begin / w.group_size; g < w.groups && i / 8 < full; ++g) {
    int64_t first, last;
    group_blocks(w, g, full, &first, &last);
    if (first < k_begin / 8) first = k_begin / 8;
    const __m256 scale = _mm256_set1_ps(w.scale[o * w.groups + g]);
    const __m256i zero = _mm256_set1_epi32(w.zero[o * w.groups + g]);
    for (int64_t blk = first; blk < last; ++blk) {
      const uint8_t* src = blk < safe ? row + blk * B : tail + (blk - safe) * B;
      _mm256_storeu_ps(out + (blk * 8 - k_begin), dequant8(codes8<B>(src), zero, scale));
    }
    if (last * 8 > i) i = last * 8;
  }
  for (; i < k_end; ++i) out[i - k_begin] = weight_at(w, row, o, i);
}

// kTileRows output features x 16 tokens over kc input columns, all in registers: the
// row loops have constant bounds, so the compiler unrolls them and keeps acc in ymm registers.
inline void micro_kernel(const float* wt, int64_t ldw, const float* xp, int64_t kc, float (&c)[kTileRows][kPanel]) {
  static_assert(kPanel == 16, "a row of the tile is two 8-float registers");
  __m256 acc[kTileRows][2];
#pragma GCC unroll 16
  for (int r = 0; r < kTileRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(xp + k * kPanel);
    const __m256 b1 = _mm256_loadu_ps(xp + k * kPanel + 8);
#pragma GCC unroll 16
    for (int r = 0; r < kTileRows; ++r) {
      const __m256 a = _mm256_broadcast_ss(wt + r * ldw + k);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kTileRows; ++r) {
    _mm256_storeu_ps(c[r], acc[r][0]);
    _mm256_storeu_ps(c[r] + 8, acc[r][1]);
  }
}

#else  // portable build: the same loops over plain arrays, for the compiler to vectorise

// Eight codes from exactly the B bytes that hold them (never past the row).
template <int B>
inline void codes8(const uint8_t* p, int32_t (&c)[8]) {
  uint64_t v = 0;
  for (int b = 0; b < B; ++b) v |= static_cast<uint64_t>(p[b]) << (8 * b);
  for (int j = 0; j < 8; ++j) c[j] = static_cast<int32_t>((v >> (j * B)) & ((1u << B) - 1u));
}

template <int B, int MR, int RO>
inline void dot_rows(const PackedWeight& w, int64_t o, const float* x, float (&out)[MR][RO]) {
  const int64_t K = w.in_features;
  const int64_t full = K / 8;
  const uint8_t* rows[RO];
  for (int r = 0; r < RO; ++r) rows[r] = w.data + (o + r) * w.row_bytes;
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < RO; ++r) out[m][r] = 0.0f;
  for (int64_t g = 0; g < w.groups; ++g) {
    int64_t first, last;
    group_blocks(w, g, full, &first, &last);
    if (first >= last) break;
    float acc[MR][RO][8] = {};
    for (int64_t blk = first; blk < last; ++blk) {
      for (int r = 0; r < RO; ++r) {
        int32_t c[8];
        codes8<B>(rows[r] + blk * B, c);
        const int32_t zero = w.zero[(o + r) * w.groups + g];
        float centred[8];
        for (int j = 0; j < 8; ++j) centred[j] = static_cast<float>(c[j] - zero);
        for (int m = 0; m < MR; ++m)
          for (int j = 0; j < 8; ++j) acc[m][r][j] += centred[j] * x[m * K + blk * 8 + j];
      }
    }
    for (int r = 0; r < RO; ++r) {
      const float scale = w.scale[(o + r) * w.groups + g];
      for (int m = 0; m < MR; ++m) {
        float sum = 0.0f;
        for (int j = 0; j < 8; ++j) sum += acc[m][r][j];
        out[m][r] += scale * sum;
      }
    }
  }
  add_tail_columns(w, rows, o, x, full * 8, out);
}

template <int B>
inline void dequantize_row(const PackedWeight& w, int64_t o, int64_t k_begin, int64_t k_end, float* out) {
  const uint8_t* row = w.data + o * w.row_bytes;
  const int64_t full = k_end / 8;
  int64_t i = k_begin;
  for (int64_t g = k_begin / w.group_size; g < w.groups && i / 8 < full; ++g) {
    int64_t first, last;
    group_blocks(w, g, full, &first, &last);
    if (first < k_begin / 8) first = k_begin / 8;
    const float scale = w.scale[o * w.groups + g];
    const int32_t zero = w.zero[o * w.groups + g];
    for (int64_t blk = first; blk < last; ++blk) {
      int32_t c[8];
      codes8<B>(row + blk * B, c);
      float* dst = out + (blk * 8 - k_begin);
      for (int j = 0; j < 8; ++j) dst[j] = static_cast<float>(c[j] - zero) * scale;
    }
    if (last * 8 > i) i = last * 8;
  }
  for (; i < k_end; ++i) out[i - k_begin] = weight_at(w, row, o, i);
}

inline void micro_kernel(const float* wt, int64_t ldw, const float* xp, int64_t kc, float (&c)[kTileRows][kPanel]) {
  for (int r = 0; r < kTileRows; ++r)
    for (int t = 0; t < kPanel; ++t) c[r][t] = 0.0f;
  for (int64_t k = 0; k < kc; ++k)
    for (int r = 0; r < kTileRows; ++r) {
      const float a = wt[r * ldw + k];
      for (int t = 0; t < kPanel; ++t) c[r][t] += a * xp[k * kPanel + t];
    }
}

#endif

// y rows for activations [t, t + MR) and features [o_begin, o_end).
template <int B, int MR>
void gemv_tokens(const PackedWeight& w, const float* x, const float* bias, float* y, int64_t o_begin, int64_t o_end) {
  constexpr int RO = MR == 1 ? 4 : 2;  // RO * MR independent accumulators, at most 8
  const int64_t N = w.out_features;
  int64_t o = o_begin;
  for (; o + RO <= o_end; o += RO) {
    float out[MR][RO];
    dot_rows<B, MR, RO>(w, o, x, out);
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < RO; ++r) y[m * N + o + r] = out[m][r] + (bias ? bias[o + r] : 0.0f);
  }
  for (; o < o_end; ++o) {
    float out[MR][1];
    dot_rows<B, MR, 1>(w, o, x, out);
    for (int m = 0; m < MR; ++m) y[m * N + o] = out[m][0] + (bias ? bias[o] : 0.0f);
  }
}

template <int B>
void gemv_bits(const PackedWeight& w, const float* x, int64_t m, const float* bias, float* y, int64_t o_begin,
               int64_t o_end) {
  const int64_t K = w.in_features, N = w.out_features;
  int64_t t = 0;
  for (; t + 4 <= m; t += 4) gemv_tokens<B, 4>(w, x + t * K, bias, y + t * N, o_begin, o_end);
  if (m - t >= 2) {
    gemv_tokens<B, 2>(w, x + t * K, bias, y + t * N, o_begin, o_end);
    t += 2;
  }
  if (m - t == 1) gemv_tokens<B, 1>(w, x + t * K, bias, y + t * N, o_begin, o_end);
}

template <int B>
void dequantize_bits(const PackedWeight& w, int64_t o_begin, int64_t o_end, int64_t k_begin, int64_t k_end, float* out,
                     int64_t ld) {
  for (int64_t o = o_begin; o < o_end; ++o) dequantize_row<B>(w, o, k_begin, k_end, out + (o - o_begin) * ld);
}

}  // namespace

#define HF_COMQ_SWITCH_BITS(bits, call) \
  switch (bits) {                       \
    case 1: call(1); break;             \
    case 2: call(2); break;             \
    case 3: call(3); break;             \
    case 4: call(4); break;             \
    case 5: call(5); break;             \
    case 6: call(6); break;             \
    case 7: call(7); break;             \
    default: call(8); break;            \
  }

void gemv(const PackedWeight& w, const float* x, int64_t m, const float* bias, float* y, int64_t o_begin,
          int64_t o_end) {
#define HF_COMQ_CALL(B) gemv_bits<B>(w, x, m, bias, y, o_begin, o_end)
  HF_COMQ_SWITCH_BITS(w.bits, HF_COMQ_CALL)
#undef HF_COMQ_CALL
}

void dequantize(const PackedWeight& w, int64_t o_begin, int64_t o_end, int64_t k_begin, int64_t k_end, float* out,
                int64_t ld) {
#define HF_COMQ_CALL(B) dequantize_bits<B>(w, o_begin, o_end, k_begin, k_end, out, ld)
  HF_COMQ_SWITCH_BITS(w.bits, HF_COMQ_CALL)
#undef HF_COMQ_CALL
}

void gemm_tile(const float* wt, int64_t rows, int64_t kc, const float* xp, int64_t k_offset, int64_t in_features,
               int64_t m, float* y, int64_t ldy, int64_t n_valid, const float* bias, bool accumulate) {
  // Token panels outside, feature rows inside: the panel (kc x 16 floats) stays in L1
  // while the dequantized tile (rows x kc, in L2) streams past it.
  for (int64_t t0 = 0; t0 < m; t0 += kPanel) {
    const float* panel = xp + t0 * in_features + k_offset * kPanel;
    const int64_t tokens = m - t0 < kPanel ? m - t0 : kPanel;
    for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
      float c[kTileRows][kPanel];
      micro_kernel(wt + r0 * kc, kc, panel, kc, c);
      const int64_t valid = n_valid - r0 < kTileRows ? n_valid - r0 : kTileRows;
      for (int64_t t = 0; t < tokens; ++t) {
        float* dst = y + (t0 + t) * ldy + r0;
        for (int64_t r = 0; r < valid; ++r) {
          const float base = accumulate ? dst[r] : (bias ? bias[r0 + r] : 0.0f);
          dst[r] = base + c[r][t];
        }
      }
    }
  }
}

}  // namespace HF_COMQ_ISA
}  // namespace hf_comq
