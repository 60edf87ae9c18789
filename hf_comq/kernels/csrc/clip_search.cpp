// torch operator hf_comq_cpu::clip_errors: the error table of the solver's clipping search
// (hf_comq/solver/grid.py, search_shrink) for float32 tables on CPU.  The row loops live in
// clip_search_impl.h, built for AVX2 and for the plain target; this file checks the tables
// and spreads the rows over torch's threads with the build the CPU can run.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "clip_search.h"
#include "isa_request.h"
#include "solver_tables.h"

namespace hf_comq {
namespace {

using at::Tensor;

// A float32 CPU table of candidates x rows x groups, contiguous.
void check_candidate_table(const Tensor& table, const char* name, int64_t candidates, int64_t rows, int64_t groups) {
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.device().is_cpu() && table.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(table.dim() == 3 && table.size(0) == candidates && table.size(1) == rows && table.size(2) == groups,
              name, " must be ", candidates, " x ", rows, " x ", groups, ", got ", table.sizes());
}

// errors[c, k, r, g]: the rounding error of row r's group g on candidate grid c (scale
// scales[c, r, g], zero point zeros[c, r, g]), weighted by weightings[k] and measured in
// weight units, scale^2 * sum_s weightings[k, s] * (clamp(round(w / scale + zero)) - (w / scale + zero))^2.
Tensor clip_errors(const Tensor& weight, const Tensor& weightings, const Tensor& scales, const Tensor& zeros,
                   int64_t max_code, const std::string& isa) {
  TORCH_CHECK(weight.dim() == 2, "weight must be rows x columns, got ", weight.sizes());
  const int64_t rows = weight.size(0), columns = weight.size(1);
  check_table(weight, "weight", rows, columns);
  TORCH_CHECK(weightings.dim() == 2, "weightings must be count x ", columns, ", got ", weightings.sizes());
  check_table(weightings, "weightings", weightings.size(0), columns);
  TORCH_CHECK(scales.dim() == 3, "scales must be candidates x rows x groups, got ", scales.sizes());
  const int64_t candidates = scales.size(0), groups = scales.size(2);
  TORCH_CHECK(groups > 0 && columns % groups == 0, "the ", columns, " columns do not split into ", groups, " groups");
  check_candidate_table(scales, "scales", candidates, rows, groups);
  check_candidate_table(zeros, "zeros", candidates, rows, groups);
  TORCH_CHECK(max_code > 0, "max_code must be positive, got ", max_code);
  const bool avx2 = avx2_requested(isa, cpu_has_avx2(), "clip_errors", "or build lacks AVX2");
  const int64_t count = weightings.size(0);
  Tensor errors = at::empty({candidates, count, rows, groups}, weight.options());
  if (errors.numel() == 0) return errors;
  const ClipSearchTables tables{weight.data_ptr<float>(),  weight.stride(0),          weightings.data_ptr<float>(),
                                weightings.stride(0),      count,                     scales.data_ptr<float>(),
                                zeros.data_ptr<float>(),   errors.data_ptr<float>(),  rows,
                                columns,                   groups,                    candidates,
                                static_cast<float>(max_code)};
  const int64_t grain = columns >= 4096 ? 1 : 4096 / columns;  // a few thousand entries per task at least
  at::parallel_for(0, rows, grain, [&](int64_t row_begin, int64_t row_end) {
#if HF_COMQ_HAVE_AVX2_BUILDS
    if (avx2) return avx2::clip_rows(tables, row_begin, row_end);
#endif
    scalar::clip_rows(tables, row_begin, row_end);
  });
  return errors;
}

}  // namespace
}  // namespace hf_comq

TORCH_LIBRARY_FRAGMENT(hf_comq_cpu, m) {
  m.def("clip_errors(Tensor weight, Tensor weightings, Tensor scales, Tensor zeros, int max_code, str isa='auto') -> Tensor");
}

TORCH_LIBRARY_IMPL(hf_comq_cpu, CPU, m) { m.impl("clip_errors", &hf_comq::clip_errors); }
