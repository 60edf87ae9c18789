// Rounding to the nearest grid code in plain float32 arithmetic, the way torch.round and
// clamp do it: the one rule the solver kernels (column_passes.cpp, clip_search_impl.h)
// share.  Everything here has internal linkage, so a translation unit built for AVX2 and
// one built for the plain target each keep their own copy (the linker never swaps one
// build's inline function for the other's).  It brings the fp-contract pragma with it:
// every function after it rounds each product and sum on its own.  And floating-point
// operations never trap (torch never enables FP exceptions), so the compiler may evaluate
// both sides of a clamp's selection, which is what lets it vectorise a loop of them; the
// functions after it must share that setting for GCC to inline these into them.
#pragma once

#include "fp_contract_off.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace hf_comq {
namespace {

// 1.5 * 2^23: adding and subtracting it rounds a float below 2^22 in magnitude to an
// integer, half to even (the default rounding mode, as torch.round and std::nearbyint),
// in plain arithmetic the compiler vectorises.
constexpr float kRoundingShift = 12582912.0f;

inline float round_small(float value) { return (value + kRoundingShift) - kRoundingShift; }

// std::min and std::max, written out: under the fp-contract pragma GCC does not inline
// <algorithm>'s (compiled without it) into the loops, and a call per entry would cost more
// than the arithmetic.  The same results, NaN included (a NaN `value` comes back).
inline float at_most(float value, float bound) { return bound < value ? bound : value; }
inline float at_least(float value, float bound) { return value < bound ? bound : value; }

// clamp(round(value), 0, top), rounding a copy first clamped to [-1, top + 1]: the
// result is the same, and the clamped copy is small enough for round_small.  A NaN
// stays NaN through every step, as through torch's round and clamp.
inline float nearest_code(float value, float top) {
  const float bounded = at_most(at_least(value, -1.0f), top + 1.0f);
  return at_most(at_least(round_small(bounded), 0.0f), top);
}

}  // namespace
}  // namespace hf_comq
