// The solver kernels' row loops (the pair-move pass, the clipping search) built for AVX2,
// without FMA: every product and sum is rounded on its own, as in the plain build
// (solver_loops_scalar.cpp), so both make the same moves and the same errors.  Chosen at
// run time only on CPUs that have it.  GCC only (#pragma GCC target); other compilers build
// just the plain loops.
#include "cpu_features.h"
#if HF_COMQ_HAVE_AVX2_BUILDS
#include <immintrin.h>

#include <cstdint>
#include <limits>

#include "clip_search.h"
#include "pair_moves.h"

#pragma GCC push_options
#pragma GCC target("avx2")
#define HF_COMQ_AVX2 1
#define HF_COMQ_ISA avx2
#include "pair_moves_impl.h"
#include "clip_search_impl.h"
#pragma GCC pop_options
#endif
