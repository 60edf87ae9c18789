// torch operator hf_comq_cpu::pair_moves: the solver's pair-move pass
// (hf_comq/solver/pair_moves.py) for float32 tables on CPU.  The row loops live in
// pair_moves_impl.h, built for AVX-512, AVX2 and the plain target; this file checks the
// tables, gives each thread its working memory and spreads the tiles of rows over torch's
// threads with the build the CPU can run.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "isa_request.h"
#include "pair_moves.h"
#include "solver_tables.h"

namespace hf_comq {
namespace {

using at::Tensor;

// One thread's working memory (see PairMoveScratch).
struct Scratch {
  std::vector<float> tile_residual, tile_codes, tile_scale, cost, step, short_cost, value, picked_cost;
  std::vector<int32_t> short_list, picked;

  // The padding (zeros) is what the vector loops' last vectors read past a list's end.
  Scratch(int64_t width, int64_t count)
      : tile_residual(kPairTileRows * width), tile_codes(kPairTileRows * width), tile_scale(kPairTileRows * width),
        cost(width), step(width), short_cost(width + kPairPadding), value(count + kPairPadding),
        picked_cost(count + kPairPadding), short_list(width + kPairPadding), picked(count + kPairPadding) {}

  PairMoveScratch view() {
    return {tile_residual.data(), tile_codes.data(), tile_scale.data(), cost.data(),        step.data(),
            short_cost.data(),    short_list.data(), value.data(),      picked.data(),      picked_cost.data()};
  }
};

// Every row's rounds, in place in the solver's transposed tables (in x out), with the
// scales one row per group (`group_of`: each column's row of `scales`); `capped` (bool, one
// per row) is set where the round limit stopped a row that was still moving.  Returns the
// number of moves made (a pair is one move).
int64_t pair_moves(Tensor residual_t, Tensor dequant_t, Tensor codes_t, const Tensor& hessian, const Tensor& scales,
                   const Tensor& group_of, Tensor capped, int64_t max_code, int64_t candidates, int64_t max_rounds,
                   double min_relative_gain, const std::string& isa) {
  const int64_t width = residual_t.size(0), rows = residual_t.size(1);
  check_table(residual_t, "residual_t", width, rows);
  check_table(dequant_t, "dequant_t", width, rows);
  check_table(codes_t, "codes_t", width, rows);
  TORCH_CHECK(scales.dim() == 2, "scales must be groups x ", rows, ", got ", scales.sizes());
  check_table(scales, "scales", scales.size(0), rows);
  check_table(hessian, "hessian", width, width);
  const int64_t* group = checked_group_of(group_of, width, scales.size(0));
  TORCH_CHECK(hessian.is_contiguous(), "hessian must be contiguous");
  TORCH_CHECK(capped.scalar_type() == at::kBool && capped.device().is_cpu() && capped.is_contiguous() &&
                  capped.dim() == 1 && capped.size(0) == rows,
              "capped must be a contiguous bool CPU tensor of ", rows, " rows, got ", capped.scalar_type(), " ",
              capped.sizes());
  TORCH_CHECK(width <= std::numeric_limits<int32_t>::max(), "pair_moves takes at most 2^31 - 1 columns, got ", width);
  const Build build = requested_build(isa, cpu_has_avx2(), cpu_has_avx512f(), "pair_moves");
  if (rows == 0 || width == 0) return 0;
  const float* hessian_data = hessian.data_ptr<float>();
  std::vector<float> diag(width);
  for (int64_t j = 0; j < width; ++j) diag[j] = hessian_data[j * width + j];
  const PairMoveTables tables{
      residual_t.data_ptr<float>(), residual_t.stride(0), dequant_t.data_ptr<float>(), dequant_t.stride(0),
      codes_t.data_ptr<float>(),    codes_t.stride(0),    scales.data_ptr<float>(),    scales.stride(0),
      group,                        hessian_data,         diag.data(),                 width,
      rows,                         candidates < 1 ? 1 : (candidates < width ? candidates : width),
      static_cast<float>(max_code), static_cast<float>(min_relative_gain), max_rounds,
      capped.data_ptr<bool>()};
  std::atomic<int64_t> moves{0};
  const int64_t tiles = (rows + kPairTileRows - 1) / kPairTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    Scratch scratch(width, tables.count);
    PairMoveScratch view = scratch.view();
#if HF_COMQ_HAVE_AVX2_BUILDS
    if (build == Build::kAvx512) {
      moves += avx512::move_tiles(tables, view, tile_begin, tile_end);
      return;
    }
    if (build == Build::kAvx2) {
      moves += avx2::move_tiles(tables, view, tile_begin, tile_end);
      return;
    }
#endif
    moves += scalar::move_tiles(tables, view, tile_begin, tile_end);
  });
  return moves.load();
}

}  // namespace
}  // namespace hf_comq

TORCH_LIBRARY_FRAGMENT(hf_comq_cpu, m) {
  m.def(
      "pair_moves(Tensor(a!) residual, Tensor(b!) dequant, Tensor(c!) codes, Tensor hessian, Tensor scales, "
      "Tensor group_of, Tensor(d!) capped, int max_code, int candidates, int max_rounds, float min_relative_gain, str isa='auto') -> int");
}

TORCH_LIBRARY_IMPL(hf_comq_cpu, CPU, m) { m.impl("pair_moves", &hf_comq::pair_moves); }
