// The compute loops for CPUs without AVX2 + FMA (and non-x86 machines).
#include <cstdint>
#include <cstring>

#include "kernels.h"

#define HF_COMQ_AVX2 0
#define HF_COMQ_ISA scalar
#include "kernels_impl.h"
