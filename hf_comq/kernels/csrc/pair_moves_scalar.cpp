// The pair-move pass's row loops for CPUs without AVX2 (and non-x86 machines).
#include <cstdint>
#include <limits>

#include "pair_moves.h"

#define HF_COMQ_AVX2 0
#define HF_COMQ_ISA scalar
#include "pair_moves_impl.h"
