// Row loops of the pair-move pass (hf_comq/solver/pair_moves.py) for pair_moves.h, included
// by solver_loops_avx2.cpp (compiled for AVX2) and solver_loops_scalar.cpp.  HF_COMQ_ISA names
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
// compute the same roundings in wider or narrower registers: the same moves.  The AVX2
// build (HF_COMQ_AVX2 = 1) also lists, ranks and pairs a row's candidates eight at a
// time, by the rules of the plain loops it stands beside, so it picks the same ones, and
// moves a tile's rows into and out of their copies eight by eight.

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
void cheapest(const float* cost, const int32_t* columns, int64_t width, int64_t count, int32_t* picked,
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
    picked[at] = columns == nullptr ? static_cast<int32_t>(j) : columns[j];
  }
}

// Lists the columns whose cost is at most `bound` (never a NaN), in column order; returns how many.
int64_t list_under_in_order(const float* cost, int64_t begin, int64_t width, float bound, float* short_cost,
                            int32_t* short_list, int64_t listed) {
  // Every column is written and the count advances only past those under the bound:
  // no branch to mispredict on the column's cost.
  for (int64_t j = begin; j < width; ++j) {
    short_cost[listed] = cost[j];
    short_list[listed] = static_cast<int32_t>(j);
    listed += cost[j] <= bound;
  }
  return listed;
}

#if HF_COMQ_AVX512
// The AVX-512 build's lanes: sixteen columns, list entries or pairs a step.
constexpr int64_t kWideLanes = 16;
static_assert(kWideLanes <= kPairPadding, "the scratch's padding must cover a vector's overreach");

inline __m512i wide_lane_index() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }

// list_under_in_order sixteen columns at a time: the columns under the bound are
// compressed to the front of a vector and all sixteen lanes stored, the list growing by
// the selected count only (the scratch's padding takes the rest).
int64_t list_under(const float* cost, int64_t width, float bound, float* short_cost, int32_t* short_list) {
  const __m512 limit = _mm512_set1_ps(bound);
  const __m512i lane = wide_lane_index();
  int64_t listed = 0, j = 0;
  for (; j + kWideLanes <= width; j += kWideLanes) {
    const __m512 costs = _mm512_loadu_ps(cost + j);
    const __mmask16 under = _mm512_cmp_ps_mask(costs, limit, _CMP_LE_OQ);
    const __m512i columns = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j)), lane);
    _mm512_storeu_ps(short_cost + listed, _mm512_maskz_compress_ps(under, costs));
    _mm512_storeu_si512(short_list + listed, _mm512_maskz_compress_epi32(under, columns));
    listed += __builtin_popcount(static_cast<unsigned>(under));
  }
  return list_under_in_order(cost, j, width, bound, short_cost, short_list, listed);
}

// cheapest_listed of the AVX2 build (below), sixteen entries against every entry in turn;
// the kept entries are scattered to their places.
void cheapest_listed(const float* cost, const int32_t* columns, int64_t listed, int64_t count, int32_t* picked,
                     float* picked_cost) {
  if (listed > kMostRankedListed) {
    cheapest(cost, columns, listed, count, picked, picked_cost);
    return;
  }
  const __m512i lane = wide_lane_index(), one = _mm512_set1_epi32(1), kept = _mm512_set1_epi32(static_cast<int32_t>(count));
  for (int64_t first = 0; first < listed; first += kWideLanes) {
    const int64_t last = first + kWideLanes < listed ? first + kWideLanes : listed;
    const __m512 own = _mm512_loadu_ps(cost + first);
    const __m512i own_index = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(first)), lane);
    __m512i before = _mm512_setzero_si512();
    for (int64_t m = 0; m < first; ++m) {
      before = _mm512_mask_add_epi32(before, _mm512_cmp_ps_mask(_mm512_set1_ps(cost[m]), own, _CMP_LE_OQ), before, one);
    }
    __m512i index = _mm512_set1_epi32(static_cast<int32_t>(first));
    for (int64_t m = first; m < last; ++m, index = _mm512_add_epi32(index, one)) {
      const __m512 other = _mm512_set1_ps(cost[m]);
      const __mmask16 tied_earlier = _mm512_cmp_ps_mask(other, own, _CMP_EQ_OQ) & _mm512_cmpgt_epi32_mask(own_index, index);
      const __mmask16 lower = _mm512_cmp_ps_mask(other, own, _CMP_LT_OQ);
      before = _mm512_mask_add_epi32(before, lower | tied_earlier, before, one);
    }
    for (int64_t m = last; m < listed; ++m) {
      before = _mm512_mask_add_epi32(before, _mm512_cmp_ps_mask(_mm512_set1_ps(cost[m]), own, _CMP_LT_OQ), before, one);
    }
    const __mmask16 live = static_cast<__mmask16>((1u << (last - first)) - 1u);
    const __mmask16 placed = live & _mm512_cmplt_epi32_mask(before, kept);
    _mm512_mask_i32scatter_epi32(picked, placed, before, _mm512_loadu_si512(columns + first), 4);
    _mm512_mask_i32scatter_ps(picked_cost, placed, before, own, 4);
  }
}
#elif HF_COMQ_AVX2
// 0, 1, ..., 7: each lane's offset in an eight-wide step over columns, list entries or pairs.
inline __m256i lane_index() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }

// For each 8-bit mask, the lanes whose bit is set, first to last (then lane 0): the
// permutation that packs a vector's selected lanes to its front.
struct alignas(32) PackingTable {
  int32_t lanes[256][kPairLanes];
};

constexpr PackingTable packing_table() {
  PackingTable table{};
  for (int mask = 0; mask < 256; ++mask) {
    int packed = 0;
    for (int lane = 0; lane < kPairLanes; ++lane) {
      if ((mask >> lane) & 1) table.lanes[mask][packed++] = lane;
    }
  }
  return table;
}

constexpr PackingTable kPacking = packing_table();

// list_under_in_order eight columns at a time and without a branch: the columns under the
// bound are packed to the front of a vector and all eight lanes stored, the list growing
// by the selected count only (the scratch's padding takes the rest).
int64_t list_under(const float* cost, int64_t width, float bound, float* short_cost, int32_t* short_list) {
  const __m256 limit = _mm256_set1_ps(bound);
  const __m256i lane = lane_index();
  int64_t listed = 0, j = 0;
  for (; j + kPairLanes <= width; j += kPairLanes) {
    const __m256 costs = _mm256_loadu_ps(cost + j);
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(costs, limit, _CMP_LE_OQ));
    const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPacking.lanes[mask]));
    const __m256i columns = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(j)), lane);
    _mm256_storeu_ps(short_cost + listed, _mm256_permutevar8x32_ps(costs, order));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(short_list + listed), _mm256_permutevar8x32_epi32(columns, order));
    listed += __builtin_popcount(static_cast<unsigned>(mask));
  }
  return list_under_in_order(cost, j, width, bound, short_cost, short_list, listed);
}

// cheapest() of a short list, without its sorted insertion (a mispredicted branch or two
// per entry): each entry's place among the kept ones is the number of entries before it in
// (cost, column) order, counted for eight entries at once against every entry in turn.
// `columns` ascend, so on equal costs the entry listed first comes first: an entry listed
// before an eight's first counts on ties, one listed after its last does not, and only
// the eight's own entries need their list places compared.  The list has no NaN (it holds
// the costs at most a bound), so the order is total and the places are those cheapest()
// gives.  Lanes past `listed` read the scratch's padding; their places are not used.
void cheapest_listed(const float* cost, const int32_t* columns, int64_t listed, int64_t count, int32_t* picked,
                     float* picked_cost) {
  if (listed > kMostRankedListed) {
    cheapest(cost, columns, listed, count, picked, picked_cost);
    return;
  }
  const __m256i lane = lane_index(), one = _mm256_set1_epi32(1);
  alignas(32) int32_t place[kPairLanes];
  for (int64_t first = 0; first < listed; first += kPairLanes) {
    const int64_t last = first + kPairLanes < listed ? first + kPairLanes : listed;
    const __m256 own = _mm256_loadu_ps(cost + first);
    const __m256i own_index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(first)), lane);
    __m256i before = _mm256_setzero_si256();  // a true comparison is -1: minus the count
    for (int64_t m = 0; m < first; ++m) {
      before = _mm256_add_epi32(before, _mm256_castps_si256(_mm256_cmp_ps(_mm256_broadcast_ss(cost + m), own, _CMP_LE_OQ)));
    }
    __m256i index = _mm256_set1_epi32(static_cast<int32_t>(first));
    for (int64_t m = first; m < last; ++m, index = _mm256_add_epi32(index, one)) {
      const __m256 other = _mm256_broadcast_ss(cost + m);
      const __m256i tied_earlier = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(other, own, _CMP_EQ_OQ)),
                                                    _mm256_cmpgt_epi32(own_index, index));
      const __m256i lower = _mm256_castps_si256(_mm256_cmp_ps(other, own, _CMP_LT_OQ));
      before = _mm256_add_epi32(before, _mm256_or_si256(lower, tied_earlier));
    }
    for (int64_t m = last; m < listed; ++m) {
      before = _mm256_add_epi32(before, _mm256_castps_si256(_mm256_cmp_ps(_mm256_broadcast_ss(cost + m), own, _CMP_LT_OQ)));
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(place), _mm256_sub_epi32(_mm256_setzero_si256(), before));
    // Entries placed past the kept ones land in slot `count`, the first of the padding (the
    // places are distinct, so no kept entry is overwritten): a store per entry and no branch
    // on its place, which is about as likely to be kept as not.
    for (int64_t l = 0; l < last - first; ++l) {
      const int64_t at = place[l] < count ? place[l] : count;
      picked[at] = columns[first + l];
      picked_cost[at] = cost[first + l];
    }
  }
  picked[count] = 0;  // the padding is zeros again
  picked_cost[count] = 0.0f;
}
#else
int64_t list_under(const float* cost, int64_t width, float bound, float* short_cost, int32_t* short_list) {
  return list_under_in_order(cost, 0, width, bound, short_cost, short_list, 0);
}

void cheapest_listed(const float* cost, const int32_t* columns, int64_t listed, int64_t count, int32_t* picked,
                     float* picked_cost) {
  cheapest(cost, columns, listed, count, picked, picked_cost);
}
#endif

// The row's candidates, as :func:`cheapest` picks them from all columns.  When at least
// `count` columns cost no more than the row's bound, every candidate is among them (the
// count-th cheapest costs no more than the bound), so only those are ranked: one
// comparison per column instead of a sorted insertion for every column that beats the
// worst kept so far.  The bound for the next round sits a little above this round's
// worst candidate, since one move shifts the costs only a little.
void pick_candidates(RowState& row, int64_t width, int64_t count) {
  PairMoveScratch& s = *row.scratch;
  const float* cost = s.cost;
  const int64_t listed = row.bound < kInf ? list_under(cost, width, row.bound, s.short_cost, s.short_list) : 0;
  if (listed >= count) {
    cheapest_listed(s.short_cost, s.short_list, listed, count, s.picked, s.picked_cost);
  } else {
    cheapest(cost, nullptr, width, count, s.picked, s.picked_cost);
  }
  const float worst = s.picked_cost[count - 1], spread = worst - s.picked_cost[0];
  row.bound = worst + 0.25f * spread;
}

// Asks the cache for every Gram entry the pair scan will read, before it reads them.  The
// entries lie scattered over the whole Gram matrix, which on real layers outgrows the core's
// own caches: issued together, their fetches overlap instead of each stalling the scan.
void prefetch_pairs(const float* hessian, int64_t width, const int32_t* picked, int64_t count) {
  for (int64_t i = 0; i + 1 < count; ++i) {
    const float* h_row = hessian + static_cast<int64_t>(picked[i]) * width;
    for (int64_t j = i + 1; j < count; ++j) __builtin_prefetch(h_row + picked[j]);
  }
}

// The pair of candidates whose two steps together change the row's objective the least,
// the first such pair in the order (0, 1), (0, 2), ..., (1, 2), ... on ties; `change` is
// infinite (and the pair (0, 0)) when no pair has a finite change.  `candidate_cost[i]`
// and `value[i]` are candidate i's single-step change and signed step value.
struct PairChoice {
  float change;
  int64_t first, second;
};

// The torch pass scans the whole table, each pair twice, rounded in either order; the
// smaller of the two is what it can pick, so that is what is kept here, reading each Gram
// entry once.
PairChoice best_pair_in_order(const float* hessian, int64_t width, const int32_t* picked,
                              const float* candidate_cost, const float* value, int64_t count) {
  PairChoice choice{kInf, 0, 0};
  for (int64_t i = 0; i < count; ++i) {
    const float* h_row = hessian + static_cast<int64_t>(picked[i]) * width;
    const float ci = candidate_cost[i], vi = value[i];
    for (int64_t j = i + 1; j < count; ++j) {
      const float cj = candidate_cost[j], vj = value[j];
      const float cross = h_row[picked[j]];
      const float term = (cross * (vi * vj)) * 2.0f;  // vi * vj == vj * vi exactly: one product serves both orders
      const float change = smaller((term + ci) + cj, (term + cj) + ci);
      if (change < choice.change) choice = {change, i, j};
    }
  }
  return choice;
}

#if HF_COMQ_AVX2
// The vector scans' choice from their lanes: each lane's lowest change (``lane_best``) and that
// pair's place in the scan order (``lane_at``, -1 where the lane saw none finite); the lowest of
// all, the earliest place on ties, is the pair the scalar scan picks.
PairChoice lowest_lane(const float* lane_best, const int32_t* lane_at, int lanes, int64_t count) {
  PairChoice choice{kInf, 0, 0};
  int32_t chosen = -1;
  for (int l = 0; l < lanes; ++l) {
    if (lane_at[l] < 0) continue;  // never lower than infinity
    if (chosen < 0 || lane_best[l] < choice.change || (lane_best[l] == choice.change && lane_at[l] < chosen)) {
      choice.change = lane_best[l];
      chosen = lane_at[l];
    }
  }
  if (chosen >= 0) {
    choice.first = chosen / count;
    choice.second = chosen % count;
  }
  return choice;
}
#endif

#if HF_COMQ_AVX512
// best_pair of the AVX2 build (below), sixteen pairs at a time.
PairChoice best_pair(const float* hessian, int64_t width, const int32_t* picked, const float* candidate_cost,
                     const float* value, int64_t count) {
  if (count > kMostVectorCandidates) return best_pair_in_order(hessian, width, picked, candidate_cost, value, count);
  const __m512 inf = _mm512_set1_ps(kInf), two = _mm512_set1_ps(2.0f), zero = _mm512_setzero_ps();
  const __m512i lane = wide_lane_index();
  __m512 best = inf;
  __m512i best_at = _mm512_set1_epi32(-1);
  for (int64_t i = 0; i + 1 < count; ++i) {
    const float* h_row = hessian + static_cast<int64_t>(picked[i]) * width;
    const __m512 ci = _mm512_set1_ps(candidate_cost[i]), vi = _mm512_set1_ps(value[i]);
    for (int64_t j = i + 1; j < count; j += kWideLanes) {
      const __mmask16 live = _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(static_cast<int32_t>(count - j)), lane);
      const __m512i columns = _mm512_loadu_si512(picked + j);
      const __m512 cross = _mm512_mask_i32gather_ps(zero, live, columns, h_row, 4);
      const __m512 cj = _mm512_loadu_ps(candidate_cost + j), vj = _mm512_loadu_ps(value + j);
      const __m512 term = _mm512_mul_ps(_mm512_mul_ps(cross, _mm512_mul_ps(vi, vj)), two);
      const __m512 ab = _mm512_add_ps(_mm512_add_ps(term, ci), cj), ba = _mm512_add_ps(_mm512_add_ps(term, cj), ci);
      const __m512 change = _mm512_mask_blend_ps(live, inf, _mm512_min_ps(ba, ab));
      const __mmask16 lower = _mm512_cmp_ps_mask(change, best, _CMP_LT_OQ);
      const __m512i at = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(i * count + j)), lane);
      best = _mm512_mask_blend_ps(lower, best, change);
      best_at = _mm512_mask_blend_epi32(lower, best_at, at);
    }
  }
  alignas(64) float lane_best[kWideLanes];
  alignas(64) int32_t lane_at[kWideLanes];
  _mm512_store_ps(lane_best, best);
  _mm512_store_si512(lane_at, best_at);
  return lowest_lane(lane_best, lane_at, kWideLanes, count);
}
#elif HF_COMQ_AVX2
// best_pair_in_order eight pairs at a time: the same products and sums, each rounded on
// its own.  Every lane keeps the first of its own lowest changes (a strict comparison, as
// the scalar scan), with the pair's place in the scan order, and the lowest change of
// all lanes, the earliest on ties, is the scalar scan's choice.  Lanes past the last
// candidate read the scratch's padding and are masked to an infinite change.
PairChoice best_pair(const float* hessian, int64_t width, const int32_t* picked, const float* candidate_cost,
                     const float* value, int64_t count) {
  if (count > kMostVectorCandidates) return best_pair_in_order(hessian, width, picked, candidate_cost, value, count);
  const __m256 inf = _mm256_set1_ps(kInf), two = _mm256_set1_ps(2.0f), zero = _mm256_setzero_ps();
  const __m256i lane = lane_index();
  __m256 best = inf;
  __m256i best_at = _mm256_set1_epi32(-1);
  for (int64_t i = 0; i + 1 < count; ++i) {
    const float* h_row = hessian + static_cast<int64_t>(picked[i]) * width;
    const __m256 ci = _mm256_set1_ps(candidate_cost[i]), vi = _mm256_set1_ps(value[i]);
    for (int64_t j = i + 1; j < count; j += kPairLanes) {
      const __m256i left = _mm256_set1_epi32(static_cast<int32_t>(count - j));
      const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(left, lane));
      const __m256i columns = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(picked + j));
      const __m256 cross = _mm256_mask_i32gather_ps(zero, h_row, columns, live, 4);
      const __m256 cj = _mm256_loadu_ps(candidate_cost + j), vj = _mm256_loadu_ps(value + j);
      const __m256 term = _mm256_mul_ps(_mm256_mul_ps(cross, _mm256_mul_ps(vi, vj)), two);
      const __m256 ab = _mm256_add_ps(_mm256_add_ps(term, ci), cj), ba = _mm256_add_ps(_mm256_add_ps(term, cj), ci);
      const __m256 change = _mm256_blendv_ps(inf, _mm256_min_ps(ba, ab), live);  // min_ps(x, y): x < y ? x : y
      const __m256 lower = _mm256_cmp_ps(change, best, _CMP_LT_OQ);
      const __m256i at = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(i * count + j)), lane);
      best = _mm256_blendv_ps(best, change, lower);
      best_at = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(best_at), _mm256_castsi256_ps(at), lower));
    }
  }
  alignas(32) float lane_best[kPairLanes];
  alignas(32) int32_t lane_at[kPairLanes];
  _mm256_store_ps(lane_best, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_at), best_at);
  return lowest_lane(lane_best, lane_at, kPairLanes, count);
}
#else
PairChoice best_pair(const float* hessian, int64_t width, const int32_t* picked, const float* candidate_cost,
                     const float* value, int64_t count) {
  return best_pair_in_order(hessian, width, picked, candidate_cost, value, count);
}
#endif

// Each column's cheaper single step (`step`: +1 or -1) and what it changes in the row's
// objective (`cost`; infinite where the code sits at that end of the grid), from column
// `begin` on.
void single_steps_from(int64_t begin, const float* scale, const float* diag, const float* residual,
                       const float* codes, float top, int64_t width, float* step, float* cost) {
  for (int64_t j = begin; j < width; ++j) {
    const float sj = scale[j];
    const float quadratic = (sj * sj) * diag[j];
    const float linear = (sj * residual[j]) * 2.0f;
    const float up = codes[j] < top ? quadratic - linear : kInf;
    const float down = codes[j] > 0.0f ? quadratic + linear : kInf;
    step[j] = up <= down ? 1.0f : -1.0f;
    cost[j] = smaller(up, down);
  }
}

#if HF_COMQ_AVX512
// single_steps of the AVX2 build (below), sixteen columns at a time.
void single_steps(const float* scale, const float* diag, const float* residual, const float* codes, float top,
                  int64_t width, float* step, float* cost) {
  const __m512 inf = _mm512_set1_ps(kInf), two = _mm512_set1_ps(2.0f), zero = _mm512_setzero_ps();
  const __m512 plus = _mm512_set1_ps(1.0f), minus = _mm512_set1_ps(-1.0f), highest = _mm512_set1_ps(top);
  int64_t j = 0;
  for (; j + kWideLanes <= width; j += kWideLanes) {
    const __m512 sj = _mm512_loadu_ps(scale + j), code = _mm512_loadu_ps(codes + j);
    const __m512 quadratic = _mm512_mul_ps(_mm512_mul_ps(sj, sj), _mm512_loadu_ps(diag + j));
    const __m512 linear = _mm512_mul_ps(_mm512_mul_ps(sj, _mm512_loadu_ps(residual + j)), two);
    const __m512 up = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(code, highest, _CMP_LT_OQ), inf, _mm512_sub_ps(quadratic, linear));
    const __m512 down = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(code, zero, _CMP_GT_OQ), inf, _mm512_add_ps(quadratic, linear));
    _mm512_storeu_ps(step + j, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(up, down, _CMP_LE_OQ), minus, plus));
    _mm512_storeu_ps(cost + j, _mm512_min_ps(down, up));
  }
  single_steps_from(j, scale, diag, residual, codes, top, width, step, cost);
}
#elif HF_COMQ_AVX2
// single_steps_from eight columns at a time, the same roundings: min_ps(down, up) is
// `down < up ? down : up`, which is smaller(up, down), NaN included, and the ordered
// comparisons are false on a NaN as the plain ones are.  (Written out because the
// compiler's own vectorisation of the selections costs about twice the instructions.)
void single_steps(const float* scale, const float* diag, const float* residual, const float* codes, float top,
                  int64_t width, float* step, float* cost) {
  const __m256 inf = _mm256_set1_ps(kInf), two = _mm256_set1_ps(2.0f), zero = _mm256_setzero_ps();
  const __m256 plus = _mm256_set1_ps(1.0f), minus = _mm256_set1_ps(-1.0f), highest = _mm256_set1_ps(top);
  int64_t j = 0;
  for (; j + kPairLanes <= width; j += kPairLanes) {
    const __m256 sj = _mm256_loadu_ps(scale + j), code = _mm256_loadu_ps(codes + j);
    const __m256 quadratic = _mm256_mul_ps(_mm256_mul_ps(sj, sj), _mm256_loadu_ps(diag + j));
    const __m256 linear = _mm256_mul_ps(_mm256_mul_ps(sj, _mm256_loadu_ps(residual + j)), two);
    const __m256 up = _mm256_blendv_ps(inf, _mm256_sub_ps(quadratic, linear), _mm256_cmp_ps(code, highest, _CMP_LT_OQ));
    const __m256 down = _mm256_blendv_ps(inf, _mm256_add_ps(quadratic, linear), _mm256_cmp_ps(code, zero, _CMP_GT_OQ));
    _mm256_storeu_ps(step + j, _mm256_blendv_ps(minus, plus, _mm256_cmp_ps(up, down, _CMP_LE_OQ)));
    _mm256_storeu_ps(cost + j, _mm256_min_ps(down, up));
  }
  single_steps_from(j, scale, diag, residual, codes, top, width, step, cost);
}
#else
void single_steps(const float* scale, const float* diag, const float* residual, const float* codes, float top,
                  int64_t width, float* step, float* cost) {
  single_steps_from(0, scale, diag, residual, codes, top, width, step, cost);
}
#endif

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
  const int32_t* picked = s.picked;
  single_steps(scale, diag, residual, codes, t.top, width, step, cost);
  pick_candidates(row, width, count);
  prefetch_pairs(hessian, width, picked, count);
  for (int64_t i = 0; i < count; ++i) value[i] = step[picked[i]] * scale[picked[i]];

  // picked_cost[i] is cost[picked[i]], kept by the candidates' ranking
  PairChoice choice = best_pair(hessian, width, picked, s.picked_cost, value, count);
  float best = choice.change;
  int64_t first = choice.first, second = choice.second;
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

#if HF_COMQ_AVX2
// Eight runs of eight floats (`from[l]`) written as eight runs (`to[m]`): to[m][l] = from[l][m].
inline void transpose_eight(const float* const* from, float* const* to) {
  __m256 t[kPairLanes], u[kPairLanes];
  for (int l = 0; l < kPairLanes; l += 2) {
    const __m256 a = _mm256_loadu_ps(from[l]), b = _mm256_loadu_ps(from[l + 1]);
    t[l] = _mm256_unpacklo_ps(a, b);      // a0 b0 a1 b1 | a4 b4 a5 b5
    t[l + 1] = _mm256_unpackhi_ps(a, b);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int half = 0; half < kPairLanes; half += 4) {  // rows 0-3, then 4-7: four entries of each column per lane group
    u[half] = _mm256_shuffle_ps(t[half], t[half + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[half + 1] = _mm256_shuffle_ps(t[half], t[half + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[half + 2] = _mm256_shuffle_ps(t[half + 1], t[half + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[half + 3] = _mm256_shuffle_ps(t[half + 1], t[half + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int m = 0; m < 4; ++m) {
    _mm256_storeu_ps(to[m], _mm256_permute2f128_ps(u[m], u[m + 4], 0x20));
    _mm256_storeu_ps(to[m + 4], _mm256_permute2f128_ps(u[m], u[m + 4], 0x31));
  }
}
#endif

// A tile's rows gathered from a transposed table (`column(j)`: where column j's entries for
// the tile's `n` rows lie, one after another) into row-major copies (`tile`, row r at
// r * width), and back.  The AVX2 build moves eight by eight blocks through registers.
template <typename Column>
void gather_tile(Column column, int64_t width, int64_t n, float* tile) {
  int64_t j0 = 0, r0 = 0;
#if HF_COMQ_AVX2
  const float* from[kPairLanes];
  float* to[kPairLanes];
  for (; j0 + kPairLanes <= width; j0 += kPairLanes) {
    for (int l = 0; l < kPairLanes; ++l) from[l] = column(j0 + l);
    for (r0 = 0; r0 + kPairLanes <= n; r0 += kPairLanes) {
      for (int l = 0; l < kPairLanes; ++l) to[l] = tile + (r0 + l) * width + j0;
      transpose_eight(from, to);
      for (int l = 0; l < kPairLanes; ++l) from[l] += kPairLanes;
    }
    for (int64_t j = j0; j < j0 + kPairLanes; ++j) {
      for (int64_t r = r0; r < n; ++r) tile[r * width + j] = column(j)[r];
    }
  }
#endif
  for (int64_t j = j0; j < width; ++j) {
    const float* entries = column(j);
    for (int64_t r = 0; r < n; ++r) tile[r * width + j] = entries[r];
  }
}

template <typename Column>
void scatter_tile(const float* tile, int64_t width, int64_t n, Column column) {
  int64_t j0 = 0, r0 = 0;
#if HF_COMQ_AVX2
  const float* from[kPairLanes];
  float* to[kPairLanes];
  for (; j0 + kPairLanes <= width; j0 += kPairLanes) {
    for (r0 = 0; r0 + kPairLanes <= n; r0 += kPairLanes) {
      for (int l = 0; l < kPairLanes; ++l) {
        from[l] = tile + (r0 + l) * width + j0;
        to[l] = column(j0 + l) + r0;
      }
      transpose_eight(from, to);
    }
    for (int64_t j = j0; j < j0 + kPairLanes; ++j) {
      for (int64_t r = r0; r < n; ++r) column(j)[r] = tile[r * width + j];
    }
  }
#endif
  for (int64_t j = j0; j < width; ++j) {
    float* entries = column(j);
    for (int64_t r = 0; r < n; ++r) entries[r] = tile[r * width + j];
  }
}

int64_t move_tiles(const PairMoveTables& t, PairMoveScratch& s, int64_t tile_begin, int64_t tile_end) {
  const int64_t width = t.width;
  RowState row;
  row.scratch = &s;
  int64_t made = 0;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t k0 = tile * kPairTileRows, n = t.rows - k0 < kPairTileRows ? t.rows - k0 : kPairTileRows;
    const auto residual = [&](int64_t j) { return t.residual + j * t.residual_ld + k0; };
    const auto codes = [&](int64_t j) { return t.codes + j * t.codes_ld + k0; };
    gather_tile(residual, width, n, s.tile_residual);
    gather_tile(codes, width, n, s.tile_codes);
    gather_tile([&](int64_t j) { return t.scale + t.group_of[j] * t.scale_ld + k0; }, width, n, s.tile_scale);
    int64_t tile_moves = 0;
    for (int64_t r = 0; r < n; ++r) {
      row.residual = s.tile_residual + r * width;
      row.codes = s.tile_codes + r * width;
      row.scale = s.tile_scale + r * width;
      row.bound = kInf;
      int64_t round = 0;
      while (round < t.max_rounds && move_once(row, t.dequant + k0 + r, t)) ++round;
      t.capped[k0 + r] = round == t.max_rounds;  // its last round moved: it may have more to gain
      tile_moves += round;
    }
    if (tile_moves == 0) continue;
    scatter_tile(s.tile_residual, width, n, residual);
    scatter_tile(s.tile_codes, width, n, codes);
    made += tile_moves;
  }
  return made;
}

}  // namespace HF_COMQ_ISA
}  // namespace hf_comq
