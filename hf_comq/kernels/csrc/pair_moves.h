// Interface between the torch operator hf_comq_cpu::pair_moves (pair_moves.cpp) and the
// row loops of the pair-move pass, which are compiled three times: for AVX-512
// (solver_loops_avx512.cpp), for AVX2 (solver_loops_avx2.cpp) and for the plain target
// (solver_loops_scalar.cpp).  As with kernels.h, the loops see raw pointers only, so the
// vector translation units include no torch or standard-container header whose inline
// functions the linker could share with the rest of the extension.
#pragma once

#include <cstdint>

#include "cpu_features.h"

namespace hf_comq {

// Output rows gathered together: a 64-byte line of each transposed table.
constexpr int64_t kPairTileRows = 16;

// Candidates scanned at once by the AVX2 pair scan.
constexpr int64_t kPairLanes = 8;

// Entries of padding after each of a row's scratch lists: the widest build's last vector
// (sixteen lanes in the AVX-512 build) reads and writes past a list's end into it, and
// masks off what it finds there.
constexpr int64_t kPairPadding = 16;

// Most candidates the AVX2 pair scan takes (each pair's place in the scan fits an int32);
// more go through the scalar scan, which makes the same choice.
constexpr int64_t kMostVectorCandidates = 4096;

// Longest short list whose candidates the AVX2 build ranks by counting (its cost grows with
// the square of the length); longer ones are sorted by insertion, with the same result.
constexpr int64_t kMostRankedListed = 128;

// The solver's tables, all in x out in its column order (row k of the layer is column k
// here), the grid's scales one row per group (`group_of[j]`: column j's row of `scale`), and
// the pass's settings.
struct PairMoveTables {
  float* residual;
  int64_t residual_ld;
  float* dequant;
  int64_t dequant_ld;
  float* codes;
  int64_t codes_ld;
  const float* scale;
  int64_t scale_ld;
  const int64_t* group_of;  // width entries
  const float* hessian;  // width x width, contiguous
  const float* diag;     // its diagonal
  int64_t width, rows;
  int64_t count;  // candidates per row, 1..width
  float top;      // the largest code
  float min_relative_gain;
  int64_t max_rounds;
  bool* capped;  // rows entries: set where a row still moved in its last allowed round
};

// One thread's working memory for the pass: a tile of rows' copies and one row's scratch.
// The caller owns it (sizes in pair_moves.cpp), so the loops allocate nothing.
struct PairMoveScratch {
  float* tile_residual;  // kPairTileRows * width each
  float* tile_codes;
  float* tile_scale;
  float* cost;  // width each
  float* step;
  float* short_cost;    // width + kPairPadding each
  int32_t* short_list;
  float* value;        // count + kPairPadding each: the candidates' signed step values,
  int32_t* picked;     // their columns
  float* picked_cost;  // and their costs, ascending
};

#define HF_COMQ_DECLARE_PAIR_MOVES(ns)                                                               \
  namespace ns {                                                                                     \
  /* Every row of tiles [tile_begin, tile_end) moved to its end, in place in the tables, and    */ \
  /* its `capped` entry set; returns the number of moves made (a pair is one move).              */ \
  int64_t move_tiles(const PairMoveTables& tables, PairMoveScratch& scratch, int64_t tile_begin,   \
                     int64_t tile_end);                                                             \
  }

HF_COMQ_DECLARE_PAIR_MOVES(scalar)
#if HF_COMQ_HAVE_AVX2_BUILDS
HF_COMQ_DECLARE_PAIR_MOVES(avx2)
HF_COMQ_DECLARE_PAIR_MOVES(avx512)
#endif

}  // namespace hf_comq
