// Interface between the torch operator hf_comq_cpu::clip_errors (clip_search.cpp) and its
// row loops, compiled twice: for AVX2 (solver_loops_avx2.cpp) and for the plain target
// (solver_loops_scalar.cpp).  As with pair_moves.h, the loops see raw pointers only.
#pragma once

#include <cstdint>

#include "cpu_features.h"

namespace hf_comq {

// A group's weighted sum is kept in this many partial sums (entry s of the group goes to
// partial s % kClipLanes) and they are added in one fixed order: the same sum whether eight
// entries go at once (AVX2) or one at a time.
constexpr int64_t kClipLanes = 8;

// Column weightings summed in one pass over a group; more take further passes.
constexpr int64_t kClipWeightingsAtOnce = 4;

// The search's tables.  weight: rows x columns; weightings: count x columns; scale and zero:
// candidates x rows x groups, contiguous; errors: candidates x count x rows x groups,
// contiguous.  Each group holds columns / groups consecutive columns.
struct ClipSearchTables {
  const float* weight;
  int64_t weight_ld;
  const float* weightings;
  int64_t weightings_ld;
  int64_t weightings_count;
  const float* scale;
  const float* zero;
  float* errors;
  int64_t rows, columns, groups, candidates;
  float top;  // the largest code
};

#define HF_COMQ_DECLARE_CLIP_SEARCH(ns)                                                          \
  namespace ns {                                                                                 \
  /* errors[c, k, r, g] for every candidate c, weighting k, group g of rows [row_begin, row_end) */ \
  void clip_rows(const ClipSearchTables& tables, int64_t row_begin, int64_t row_end);           \
  }

HF_COMQ_DECLARE_CLIP_SEARCH(scalar)
#if HF_COMQ_HAVE_AVX2_BUILDS
HF_COMQ_DECLARE_CLIP_SEARCH(avx2)
#endif

}  // namespace hf_comq
