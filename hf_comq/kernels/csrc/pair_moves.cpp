// torch operator hf_comq_cpu::pair_moves: the solver's pair-move pass
// (hf_comq/solver/pair_moves.py) for float32 tables on CPU.
//
// The torch pass moves every still-moving output row once per round, a dozen vector
// operators per round over all of them; real layers take tens of rounds, and the
// gathers and temporaries cost far more than the arithmetic.  Rows are independent, so
// here each row runs its own rounds to the end, rows spread over torch's threads.  A
// row's rounds are those of the torch pass: its single steps, its `candidates` cheapest
// (ascending, ties to the lower column), the best single step or pair among them, applied
// when it gains enough.  The arithmetic is the same float32 arithmetic; torch's
// vectorised kernels may fuse a multiply-add and break a tie the other way, so the two
// paths can make a different move now and then (tests/solver/test_pair_moves.py bounds
// the difference).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

#include "solver_tables.h"
#include "fp_contract_off.h"

// Floating-point operations here never trap (torch never enables FP exceptions), so the
// compiler may evaluate both sides of a selection: that is what lets it vectorise the
// per-column cost loop.  Every result is rounded exactly as before.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace hf_comq {
namespace {

using at::Tensor;

constexpr float kInf = std::numeric_limits<float>::infinity();

// The helpers below are this file's own rather than <algorithm>'s: under the
// fp-contract pragma GCC does not inline functions from headers compiled without it,
// and a call per table entry would cost more than the arithmetic.
inline float smaller(float a, float b) { return b < a ? b : a; }

constexpr int64_t kTileRows = 16;  // output rows gathered together: a 64-byte line of each transposed table

// A tile of rows' copies.  The solver's tables are transposed (in x out: a row's entries
// lie one table row apart), so rows are gathered a tile at a time, one cache line of
// each table serving every row of the tile, into contiguous copies (row r's entries at
// r * width); every round of a row reads those, and the residual and codes go back
// to the tables when the tile is done.
struct Tile {
  std::vector<float> residual, codes, scale;

  explicit Tile(int64_t width) : residual(kTileRows * width), codes(kTileRows * width), scale(kTileRows * width) {}
};

// One row's view of its tile's copies, and its scratch (reused across its rounds and
// across the rows of one thread).
struct RowState {
  float* residual = nullptr;
  float* codes = nullptr;
  const float* scale = nullptr;
  std::vector<float> cost, step, value, picked_cost, short_cost;
  std::vector<int64_t> picked, short_list;  // the candidates' columns, cheapest first; a pre-filter's columns
  float bound = kInf;  // a cost the row's candidates are expected under (from its last round); inf: none yet

  RowState(int64_t width, int64_t count)
      : cost(width), step(width), value(count), picked_cost(count), short_cost(width), picked(count),
        short_list(width) {}

  void start(Tile& tile, int64_t r, int64_t width) {
    residual = tile.residual.data() + r * width;
    codes = tile.codes.data() + r * width;
    scale = tile.scale.data() + r * width;
    bound = kInf;
  }
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
  const float* cost = row.cost.data();
  int64_t listed = 0;
  if (row.bound < kInf) {
    // Every column is written and the count advances only past those under the bound:
    // no branch to mispredict on the column's cost.
    float* short_cost = row.short_cost.data();
    int64_t* short_list = row.short_list.data();
    const float bound = row.bound;
    for (int64_t j = 0; j < width; ++j) {
      short_cost[listed] = cost[j];
      short_list[listed] = j;
      listed += cost[j] <= bound;
    }
  }
  if (listed >= count) {
    cheapest(row.short_cost.data(), row.short_list.data(), listed, count, row.picked.data(), row.picked_cost.data());
  } else {
    cheapest(cost, nullptr, width, count, row.picked.data(), row.picked_cost.data());
  }
  const float worst = row.picked_cost[count - 1], spread = worst - row.picked_cost[0];
  row.bound = worst + 0.25f * spread;
}

// One round of one row (its copies in `row`): returns whether it moved.  A step is
// written to the row's own copies and to its entries of the solver's `dequant` table
// (`dequant[j * stride]`, the row's column j).
bool move_once(RowState& row, float* dequant, int64_t stride, const float* hessian, const float* diag, int64_t width,
               int64_t count, float top, float min_relative_gain) {
  float* residual = row.residual;
  float* codes = row.codes;
  const float* scale = row.scale;
  float* cost = row.cost.data();
  float* step = row.step.data();
  float* value = row.value.data();
  int64_t* picked = row.picked.data();
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
  if (!(best < -min_relative_gain * quadratic)) return false;

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

// Every row's rounds, in place in the solver's transposed tables (in x out; the scale
// table may be a broadcast view); returns the number of moves made (a pair is one move).
int64_t pair_moves(Tensor residual_t, Tensor dequant_t, Tensor codes_t, const Tensor& hessian, const Tensor& scale_t,
                   int64_t max_code, int64_t candidates, int64_t max_rounds, double min_relative_gain) {
  const int64_t width = residual_t.size(0), rows = residual_t.size(1);
  check_table(residual_t, "residual_t", width, rows);
  check_table(dequant_t, "dequant_t", width, rows);
  check_table(codes_t, "codes_t", width, rows);
  check_table(scale_t, "scale_t", width, rows, false);
  check_table(hessian, "hessian", width, width);
  TORCH_CHECK(hessian.is_contiguous(), "hessian must be contiguous");
  if (rows == 0 || width == 0) return 0;
  const int64_t count = candidates < 1 ? 1 : (candidates < width ? candidates : width);
  const float top = static_cast<float>(max_code), gain = static_cast<float>(min_relative_gain);
  float* residual_data = residual_t.data_ptr<float>();
  float* dequant_data = dequant_t.data_ptr<float>();
  float* codes_data = codes_t.data_ptr<float>();
  const float* scale_data = scale_t.data_ptr<float>();
  const float* hessian_data = hessian.data_ptr<float>();
  const int64_t r_ld = residual_t.stride(0), d_ld = dequant_t.stride(0), c_ld = codes_t.stride(0);
  const int64_t s_ld = scale_t.stride(0), s_col = scale_t.stride(1);
  std::vector<float> diag(width);
  for (int64_t j = 0; j < width; ++j) diag[j] = hessian_data[j * width + j];
  std::atomic<int64_t> moves{0};
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    Tile tile(width);
    RowState row(width, count);
    int64_t made = 0;
    for (int64_t t = tile_begin; t < tile_end; ++t) {
      const int64_t k0 = t * kTileRows, n = rows - k0 < kTileRows ? rows - k0 : kTileRows;
      for (int64_t j = 0; j < width; ++j) {
        for (int64_t r = 0; r < n; ++r) {
          tile.residual[r * width + j] = residual_data[j * r_ld + k0 + r];
          tile.codes[r * width + j] = codes_data[j * c_ld + k0 + r];
          tile.scale[r * width + j] = scale_data[j * s_ld + (k0 + r) * s_col];
        }
      }
      int64_t tile_moves = 0;
      for (int64_t r = 0; r < n; ++r) {
        row.start(tile, r, width);
        int64_t round = 0;
        while (round < max_rounds && move_once(row, dequant_data + k0 + r, d_ld, hessian_data, diag.data(), width,
                                               count, top, gain)) {
          ++round;
        }
        tile_moves += round;
      }
      if (tile_moves == 0) continue;
      for (int64_t j = 0; j < width; ++j) {
        for (int64_t r = 0; r < n; ++r) {
          residual_data[j * r_ld + k0 + r] = tile.residual[r * width + j];
          codes_data[j * c_ld + k0 + r] = tile.codes[r * width + j];
        }
      }
      made += tile_moves;
    }
    moves += made;
  });
  return moves.load();
}

}  // namespace
}  // namespace hf_comq

TORCH_LIBRARY_FRAGMENT(hf_comq_cpu, m) {
  m.def(
      "pair_moves(Tensor(a!) residual, Tensor(b!) dequant, Tensor(c!) codes, Tensor hessian, Tensor scale, "
      "int max_code, int candidates, int max_rounds, float min_relative_gain) -> int");
}

TORCH_LIBRARY_IMPL(hf_comq_cpu, CPU, m) { m.impl("pair_moves", &hf_comq::pair_moves); }
