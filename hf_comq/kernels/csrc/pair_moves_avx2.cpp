// The pair-move pass's row loops built for AVX2 (no FMA: every product and sum is rounded
// on its own, as in the plain build, so both make the same moves); chosen at run time
// only on CPUs that have it.  GCC only (#pragma GCC target); other compilers build just
// the plain loops.
#include "cpu_features.h"
#if HF_COMQ_HAVE_AVX2_BUILDS
#include <immintrin.h>

#include <cstdint>
#include <limits>

#include "pair_moves.h"

#pragma GCC push_options
#pragma GCC target("avx2")
#define HF_COMQ_AVX2 1
#define HF_COMQ_ISA avx2
#include "pair_moves_impl.h"
#pragma GCC pop_options
#endif
