// Row loops of the clipping search (hf_comq/solver/grid.py, search_shrink) for
// clip_search.h, included by solver_loops_avx2.cpp (compiled for AVX2) and
// solver_loops_scalar.cpp.  HF_COMQ_ISA names the namespace, so each build gets its own copy.
//
// In torch the search is a dozen elementwise passes over the weight per candidate
// clipping, each writing a weight-sized temporary, then a small GEMM of the squared
// rounding offsets with the column weightings.  Here each (row, group) is read once per
// candidate from cache and its weighted sums are made on the spot.  The elementwise
// arithmetic is torch's, step by step (divide, add the zero point, round half to even,
// clamp, subtract, square); the sums are added in the fixed order of clip_search.h, where
// torch's GEMM picks its own, so an error can differ in its last bits from the torch path
// and a near-tie between two clippings can go the other way.  The AVX2 and plain builds
// compute the same roundings in wider or narrower registers: the same errors, bit for bit.

#include "rounding.h"

namespace hf_comq {
namespace HF_COMQ_ISA {
namespace {

#if HF_COMQ_AVX2
// The first `size - size % 8` entries of group_sums' loop, eight lanes in one register:
// the same operations on each lane as the plain loop (max_ps(bound, v) is at_least(v, bound)
// and min_ps(bound, v) at_most(v, bound), NaN and signed zeros included).
template <int count>
int64_t group_sums_wide(const float* weight, const float* const* weighting, int64_t size, float scale, float zero,
                        float top, float (*partial)[kClipLanes]) {
  const __m256 scale_v = _mm256_set1_ps(scale), zero_v = _mm256_set1_ps(zero);
  const __m256 low = _mm256_set1_ps(-1.0f), high = _mm256_set1_ps(top + 1.0f);
  const __m256 floor_v = _mm256_set1_ps(0.0f), top_v = _mm256_set1_ps(top), shift = _mm256_set1_ps(kRoundingShift);
  __m256 sums[count];
  for (int k = 0; k < count; ++k) sums[k] = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + kClipLanes <= size; s += kClipLanes) {
    const __m256 scaled = _mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(weight + s), scale_v), zero_v);
    const __m256 bounded = _mm256_min_ps(high, _mm256_max_ps(low, scaled));
    const __m256 rounded = _mm256_sub_ps(_mm256_add_ps(bounded, shift), shift);
    const __m256 offset = _mm256_sub_ps(_mm256_min_ps(top_v, _mm256_max_ps(floor_v, rounded)), scaled);
    const __m256 square = _mm256_mul_ps(offset, offset);
    for (int k = 0; k < count; ++k) {
      sums[k] = _mm256_add_ps(sums[k], _mm256_mul_ps(square, _mm256_loadu_ps(weighting[k] + s)));
    }
  }
  for (int k = 0; k < count; ++k) _mm256_storeu_ps(partial[k], sums[k]);
  return s;
}
#endif

// Entry s's squared rounding offset, weighted by each of `count` weightings, added to partial sum `lane`.
template <int count>
inline void add_entry(const float* weight, const float* const* weighting, int64_t s, int64_t lane, float scale,
                      float zero, float top, float (*partial)[kClipLanes]) {
  const float scaled = weight[s] / scale + zero;
  const float offset = nearest_code(scaled, top) - scaled;
  const float square = offset * offset;
  for (int k = 0; k < count; ++k) partial[k][lane] += square * weighting[k][s];
}

// The weighted sums of one group's squared rounding offsets, `count` (1..kClipWeightingsAtOnce)
// weightings at a time: sums[k] = sum_s offset[s]^2 * weighting[k][s].
template <int count>
void group_sums(const float* weight, const float* const* weighting, int64_t size, float scale, float zero, float top,
                float* sums) {
  float partial[count][kClipLanes] = {};
#if HF_COMQ_AVX2
  int64_t s = group_sums_wide<count>(weight, weighting, size, scale, zero, top, partial);
#else
  int64_t s = 0;
  for (; s + kClipLanes <= size; s += kClipLanes) {
    for (int64_t lane = 0; lane < kClipLanes; ++lane) {
      add_entry<count>(weight, weighting, s + lane, lane, scale, zero, top, partial);
    }
  }
#endif
  for (int64_t lane = 0; s < size; ++s, ++lane) add_entry<count>(weight, weighting, s, lane, scale, zero, top, partial);
  for (int k = 0; k < count; ++k) {
    const float* p = partial[k];
    sums[k] = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  }
}

static_assert(kClipLanes == 8, "group_sums adds its partial sums as eight");

void group_sums_of(int count, const float* weight, const float* const* weighting, int64_t size, float scale,
                   float zero, float top, float* sums) {
  switch (count) {
    case 1: return group_sums<1>(weight, weighting, size, scale, zero, top, sums);
    case 2: return group_sums<2>(weight, weighting, size, scale, zero, top, sums);
    case 3: return group_sums<3>(weight, weighting, size, scale, zero, top, sums);
    default: return group_sums<4>(weight, weighting, size, scale, zero, top, sums);
  }
}

static_assert(kClipWeightingsAtOnce == 4, "group_sums_of dispatches one to four weightings");

}  // namespace

void clip_rows(const ClipSearchTables& t, int64_t row_begin, int64_t row_end) {
  const int64_t size = t.columns / t.groups;
  const int64_t row_cells = t.rows * t.groups;  // one (candidate, weighting) slab of errors
  const float* weighting[kClipWeightingsAtOnce];
  float sums[kClipWeightingsAtOnce];
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* row = t.weight + r * t.weight_ld;
    for (int64_t g = 0; g < t.groups; ++g) {
      const float* group = row + g * size;
      for (int64_t first = 0; first < t.weightings_count; first += kClipWeightingsAtOnce) {
        const int count = static_cast<int>(
            t.weightings_count - first < kClipWeightingsAtOnce ? t.weightings_count - first : kClipWeightingsAtOnce);
        for (int k = 0; k < count; ++k) weighting[k] = t.weightings + (first + k) * t.weightings_ld + g * size;
        for (int64_t c = 0; c < t.candidates; ++c) {
          const int64_t cell = (c * t.rows + r) * t.groups + g;
          const float scale = t.scale[cell], zero = t.zero[cell];
          group_sums_of(count, group, weighting, size, scale, zero, t.top, sums);
          for (int k = 0; k < count; ++k) {
            t.errors[(c * t.weightings_count + first + k) * row_cells + r * t.groups + g] = sums[k] * (scale * scale);
          }
        }
      }
    }
  }
}

}  // namespace HF_COMQ_ISA
}  // namespace hf_comq
