// The argument checks both solver kernels (column_passes.cpp, pair_moves.cpp) make of the
// tables torch hands them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace hf_comq {

// A float32 CPU table of `rows` x `width`, each row contiguous unless `contiguous_rows`
// is false (a broadcast view, or a square matrix read in any layout).
inline void check_table(const at::Tensor& tensor, const char* name, int64_t rows, int64_t width,
                        bool contiguous_rows = true) {
  TORCH_CHECK(tensor.scalar_type() == at::kFloat && tensor.device().is_cpu(), name, " must be a float32 CPU tensor");
  TORCH_CHECK(tensor.dim() == 2 && tensor.size(0) == rows && tensor.size(1) == width, name, " must be ", rows, " x ",
              width, ", got ", tensor.sizes());
  TORCH_CHECK(!contiguous_rows || tensor.stride(1) == 1, name, " must have contiguous rows");
}

// Each column's group as the kernels read it: `columns` int64 entries, each a row of a
// grid table with `groups` rows; returns the entries.
inline const int64_t* checked_group_of(const at::Tensor& group_of, int64_t columns, int64_t groups) {
  TORCH_CHECK(group_of.scalar_type() == at::kLong && group_of.device().is_cpu() && group_of.is_contiguous() &&
                  group_of.numel() == columns,
              "group_of must hold one int64 group index per column (", columns, ")");
  const int64_t* entries = group_of.data_ptr<int64_t>();
  for (int64_t j = 0; j < columns; ++j) {
    TORCH_CHECK(entries[j] >= 0 && entries[j] < groups, "group index ", entries[j], " out of range");
  }
  return entries;
}

}  // namespace hf_comq
