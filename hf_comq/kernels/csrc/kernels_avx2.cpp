// The compute loops built for AVX2 + FMA; chosen at run time only on CPUs that have both.
// GCC only (#pragma GCC target); other compilers build just the portable loops.
#include "cpu_features.h"
#if HF_COMQ_HAVE_AVX2_BUILDS
#include <cstdint>
#include <cstring>

#include <immintrin.h>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define HF_COMQ_AVX2 1
#define HF_COMQ_ISA avx2
#include "kernels_impl.h"
#pragma GCC pop_options
#endif
