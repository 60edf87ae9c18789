// Row loops of the pair-move pass (hf_comq/solver/pair_moves.py) for pair_moves.h, included
// by pair_moves_avx2.cpp (compiled for AVX2) and pair_moves_scalar.cpp.  HF_COMQ_ISA names
// the namespace, so each build gets its own copy of every function here.
//
// The torch pass moves every still-moving output row once per round, a dozen vector
// operators per round over all of them; real layers take tens of rounds, and the
// gathers and temporaries cost far more than the arithmetic.  Rows are independent, so
// here each row runs its own rounds to the end.  A row's rounds are those of the torch
// pass: its single steps, its `count` cheapest (ascending, ties to the lower column), the
// best single step or pair among them, applied when it gains enough.  The arithmetic is
// the same float32 arithmetic; torch's vectorised kernels may fuse a multiply-add and
// break a tie the other way, so the two paths can make a different move now and then
// (tests/solver/test_pair_moves.py bounds the difference).  The AVX2 and plain builds
// compute the same roundings in wider or narrower registers: the same moves.

#include "fp_contract_off.h"

// Floating-point operations here never trap (torch never enables FP exceptions), so the
// compiler may evaluate both sides of a selection: that is what lets it vectorise the
// per-column cost loop.  Every result is rounded exactly as before.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace hf_comq {
namespace HF_COMQ_ISA {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// The helpers below are this file's own rather than <algorithm>'s: under the
// fp-contract pragma GCC does not inline functions from headers compiled without it,
// and a call per table entry would cost more than the arithmetic.
inline float smaller(float a, float b) { return b < a ? b : a; }

// One row's view of its tile's copies and of the thread's scratch.  The solver's tables
// are transposed (in x out: a row's entries lie one table row apart), so rows are
// gathered a tile at a time, one cache line of each table serving every row of the tile,
// into contiguous copies (row r's entries at r * width); every round of a row reads
// those, and the residual and codes go back to the tables when the tile is done.
struct RowState {
  float* residual = nullptr;
  float* codes = nullptr;
  const float* scale = nullptr;
  PairMoveScratch* scratch = nullptr;
  float bound = kInf;  // a cost the row's candidates are expected under (from its last round); inf: none yet
};

// The `count` cheapest columns of `cost` (count <= width), ascending, ties to the lower
// column, kept sorted as they are found.  The columns are scanned from the last: in the
// solver's act order the costs tend to fall with the column, so backwards most columns
// are dearer than the worst kept one and pass by with one comparison.
// `columns` (ascending; null: 0..width-1) name the entries of `cost`.
void cheapest(const float* cost, const int64_t* columns, int64_t width, int64_t count, int64_t* picked,
              float* picked_cost) {
  int64_t filled = 0;
  for (int64_t j = width - 1; j >= 0; --j) {
    const float c = cost[j];
    if (filled == count && !(c <= picked_cost[count - 1])) continue;  // a tie goes to this lower column
    int64_t at = filled < count ? filled++ : count - 1;
    while (at > 0 && picked_cost[at - 1] >= c) {
      picked_cost[at] = picked_cost[at - 1];
      picked[at] = picked[at - 1];
      --at;
    }
    picked_cost[at] = c;
    picked[at] = columns == nullptr ? j : columns[j];
  }
}

// The row's candidates, as :func:`cheapest` picks them from all columns.  When at least
// `count` columns cost no more than the row's bound, every candidate is among them (the
// count-th cheapest costs no more than the bound), so only those are ranked: one
// comparison per column instead of a sorted insertion for every column that beats the
// worst kept so far.  The bound for the next round sits a little above this round's
// worst candidate, since one move shifts the costs only a little.
void pick_candidates(RowState& row, int64_t width, int64_t count) {
  PairMoveScratch& s = *row.scratch;
  const float* cost = s.cost;
  int64_t listed = 0;
  if (row.bound < kInf) {
    // Every column is written and the count advances only past those under the bound:
    // no branch to mispredict on the column's cost.
    const float bound = row.bound;
    for (int64_t j = 0; j < width; ++j) {
      s.short_cost[listed] = cost[j];
      s.short_list[listed] = j;
      listed += cost[j] <= bound;
    }
  }
  if (listed >= count) {
    cheapest(s.short_cost, s.short_list, listed, count, s.picked, s.picked_cost);
  } else {
    cheapest(cost, nullptr, width, count, s.picked, s.picked_cost);
  }
  const float worst = s.picked_cost[count - 1], spread = worst - s.picked_cost[0];
  row.bound = worst + 0.25f * spread;
}

// One round of one row: returns whether it moved.  A step is written to the row's own
// copies and to its entries of the solver's `dequant` table (`dequant[j * stride]`, the
// row's column j).
bool move_once(RowState& row, float* dequant, const PairMoveTables& t) {
  PairMoveScratch& s = *row.scratch;
  const int64_t width = t.width, count = t.count, stride = t.dequant_ld;
  const float* hessian = t.hessian;
  const float* diag = t.diag;
  float* residual = row.residual;
  float* codes = row.codes;
  const float* scale = row.scale;
  float* cost = s.cost;
  float* step = s.step;
  float* value = s.value;
  const int64_t* picked = s.picked;
  const float top = t.top;
  for (int64_t j = 0; j < width; ++j) {
    const float sj = scale[j];
    const float quadratic = (sj * sj) * diag[j];
    const float linear = (sj * residual[j]) * 2.0f;
    const float up = codes[j] < top ? quadratic - linear : kInf;
    const float down = codes[j] > 0.0f ? quadratic + linear : kInf;
    step[j] = up <= down ? 1.0f : -1.0f;
    cost[j] = smaller(up, down);
  }
  pick_candidates(row, width, count);
  for (int64_t i = 0; i < count; ++i) value[i] = step[picked[i]] * scale[picked[i]];

  // The best pair.  The torch pass scans the whole table, each pair twice, rounded in
  // either order; the smaller of the two is what it can pick, so that is what is kept
  // here, reading each Gram entry once.
  float best = kInf;
  int64_t first = 0, second = 0;
  for (int64_t i = 0; i < count; ++i) {
    const float* h_row = hessian + picked[i] * width;
    const float ci = cost[picked[i]], vi = value[i];
    for (int64_t j = i + 1; j < count; ++j) {
      const float cj = cost[picked[j]], vj = value[j];
      const float cross = h_row[picked[j]];
      const float term = (cross * (vi * vj)) * 2.0f;  // vi * vj == vj * vi exactly: one product serves both orders
      const float change = smaller((term + ci) + cj, (term + cj) + ci);
      if (change < best) {
        best = change;
        first = i;
        second = j;
      }
    }
  }
  const float single = cost[picked[0]];
  if (!(best < single)) {
    best = single;
    first = second = 0;
  }
  const int64_t a = picked[first], b = picked[second];
  const float va = value[first], vb = value[second];
  float quadratic = (va * va) * diag[a];
  if (b != a) quadratic += (vb * vb) * diag[b];
  if (!(best < -t.min_relative_gain * quadratic)) return false;

  codes[a] += step[a];
  dequant[a * stride] += va;
  const float* h_a = hessian + a * width;
  if (b == a) {
    for (int64_t i = 0; i < width; ++i) residual[i] -= h_a[i] * va;
  } else {
    codes[b] += step[b];
    dequant[b * stride] += vb;
    const float* h_b = hessian + b * width;
    for (int64_t i = 0; i < width; ++i) residual[i] -= h_a[i] * va + h_b[i] * vb;
  }
  return true;
}

}  // namespace

int64_t move_tiles(const PairMoveTables& t, PairMoveScratch& s, int64_t tile_begin, int64_t tile_end) {
  const int64_t width = t.width;
  RowState row;
  row.scratch = &s;
  int64_t made = 0;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t k0 = tile * kPairTileRows, n = t.rows - k0 < kPairTileRows ? t.rows - k0 : kPairTileRows;
    for (int64_t j = 0; j < width; ++j) {
      const float* scale = t.scale + t.group_of[j] * t.scale_ld + k0;
      for (int64_t r = 0; r < n; ++r) {
        s.tile_residual[r * width + j] = t.residual[j * t.residual_ld + k0 + r];
        s.tile_codes[r * width + j] = t.codes[j * t.codes_ld + k0 + r];
        s.tile_scale[r * width + j] = scale[r];
      }
    }
    int64_t tile_moves = 0;
    for (int64_t r = 0; r < n; ++r) {
      row.residual = s.tile_residual + r * width;
      row.codes = s.tile_codes + r * width;
      row.scale = s.tile_scale + r * width;
      row.bound = kInf;
      int64_t round = 0;
      while (round < t.max_rounds && move_once(row, t.dequant + k0 + r, t)) ++round;
      tile_moves += round;
    }
    if (tile_moves == 0) continue;
    for (int64_t j = 0; j < width; ++j) {
      for (int64_t r = 0; r < n; ++r) {
        t.residual[j * t.residual_ld + k0 + r] = s.tile_residual[r * width + j];
        t.codes[j * t.codes_ld + k0 + r] = s.tile_codes[r * width + j];
      }
    }
    made += tile_moves;
  }
  return made;
}

}  // namespace HF_COMQ_ISA
}  // namespace hf_comq
