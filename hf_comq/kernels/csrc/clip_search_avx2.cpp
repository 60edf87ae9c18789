// The clipping search's row loops built for AVX2 (no FMA: every product and sum is rounded
// on its own, as in the plain build, so both give the same errors); chosen at run time only
// on CPUs that have it.  GCC only (#pragma GCC target); other compilers build just the
// plain loops.
#include "cpu_features.h"
#if HF_COMQ_HAVE_AVX2_BUILDS
#include <immintrin.h>

#include <cstdint>

#include "clip_search.h"

#pragma GCC push_options
#pragma GCC target("avx2")
#define HF_COMQ_AVX2 1
#define HF_COMQ_ISA avx2
#include "clip_search_impl.h"
#pragma GCC pop_options
#endif
