// The clipping search's row loops for CPUs without AVX2 (and non-x86 machines).
#include <cstdint>

#include "clip_search.h"

#define HF_COMQ_AVX2 0
#define HF_COMQ_ISA scalar
#include "clip_search_impl.h"
