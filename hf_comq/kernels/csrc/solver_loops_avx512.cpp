// The pair-move pass's row loops (pair_moves_impl.h) built for AVX-512 (the foundation
// set, AVX512F), sixteen lanes where the AVX2 build has eight, and like it without FMA:
// every product and sum is rounded on its own, so all three builds make the same moves.
// Chosen at run time only on CPUs that have it.  GCC only, as the AVX2 build.
#include "cpu_features.h"
#if HF_COMQ_HAVE_AVX2_BUILDS
#include <immintrin.h>

#include <cstdint>
#include <limits>

#include "pair_moves.h"

#pragma GCC push_options
#pragma GCC target("avx2,avx512f,prefer-vector-width=512")
#define HF_COMQ_AVX2 1
#define HF_COMQ_AVX512 1
#define HF_COMQ_ISA avx512
#include "pair_moves_impl.h"
#pragma GCC pop_options
#endif
