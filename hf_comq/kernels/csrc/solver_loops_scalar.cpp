// The solver kernels' row loops (the pair-move pass, the clipping search) for CPUs without
// AVX2 (and non-x86 machines).
#include <cstdint>
#include <limits>

#include "clip_search.h"
#include "pair_moves.h"

#define HF_COMQ_AVX2 0
#define HF_COMQ_ISA scalar
#include "pair_moves_impl.h"
#include "clip_search_impl.h"
