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

}  // namespace hf_comq
