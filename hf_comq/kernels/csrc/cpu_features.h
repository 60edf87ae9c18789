// Which instruction-set builds of the compute loops this extension has, and which of them
// the running CPU can execute: the one rule both operators (packed_linear.cpp,
// pair_moves.cpp) and their AVX2 translation units follow.  Include it before any target
// pragma: its functions must be compiled for the plain target, whoever includes them.
#pragma once

// The AVX2 builds use GCC's `#pragma GCC target` on x86-64; other compilers and machines
// build the plain loops only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HF_COMQ_HAVE_AVX2_BUILDS 1
#else
#define HF_COMQ_HAVE_AVX2_BUILDS 0
#endif

namespace hf_comq {

// Each asked of the CPU once.  Always false where there are no AVX2 builds.
inline bool cpu_has_avx2() {
#if HF_COMQ_HAVE_AVX2_BUILDS
  static const bool supported = __builtin_cpu_supports("avx2");
  return supported;
#else
  return false;
#endif
}

inline bool cpu_has_avx2_and_fma() {
#if HF_COMQ_HAVE_AVX2_BUILDS
  static const bool supported = cpu_has_avx2() && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

inline bool cpu_has_avx512f() {
#if HF_COMQ_HAVE_AVX2_BUILDS
  static const bool supported = __builtin_cpu_supports("avx512f");
  return supported;
#else
  return false;
#endif
}

}  // namespace hf_comq
