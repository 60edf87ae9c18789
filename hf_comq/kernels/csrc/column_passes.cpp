// torch operators hf_comq_cpu::{sweep_block, feedback_block}: the column-by-column part
// of one outer block of the solver's rounding passes (hf_comq/solver/passes.py); and
// hf_comq_cpu::dequantize_columns, the values of a group-wise grid's codes (grid.py).
//
// In torch that part is a handful of vector operators per column, each dispatched from
// Python and holding the GIL while it is: on layers a few hundred columns wide the
// dispatch costs more than the arithmetic, and layers solved side by side on Python
// threads wait for each other.  Here the same float32 arithmetic runs in one call per
// outer block, in the same order, each product and sum rounded on its own.  torch's own
// vectorised kernels may fuse a multiply-add into one rounding (which ones depends on the
// CPU and the torch build), so a value can differ in its last bit from the torch loops
// kept as the fallback, and now and then a code then rounds the other way: the same
// algorithm, not a bit-identical twin (tests/solver/test_passes.py bounds the difference).
//
// All matrices are transposed (in x width): one weight column is one contiguous row.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "solver_tables.h"
#include "rounding.h"  // last: its fp-contract pragma applies to what follows

namespace hf_comq {
namespace {

using at::Tensor;

// The scale (and zero point) rows of a group-wise grid, looked up per column.
struct GroupRows {
  const float* first = nullptr;
  const float* second = nullptr;
  int64_t first_stride = 0;
  int64_t second_stride = 0;
  const int64_t* group_of = nullptr;

  static GroupRows of(const std::optional<Tensor>& first, const std::optional<Tensor>& second,
                      const std::optional<Tensor>& group_of, int64_t columns, int64_t width) {
    GroupRows rows;
    if (!first.has_value()) {
      TORCH_CHECK(!second.has_value() && !group_of.has_value(), "the grid tables come together or not at all");
      return rows;
    }
    TORCH_CHECK(second.has_value() && group_of.has_value(), "the grid tables come together or not at all");
    check_table(*first, "scale table", first->size(0), width);
    check_table(*second, "second table", first->size(0), width);
    const int64_t* groups = checked_group_of(*group_of, columns, first->size(0));
    rows.first = first->data_ptr<float>();
    rows.second = second->data_ptr<float>();
    rows.first_stride = first->stride(0);
    rows.second_stride = second->stride(0);
    rows.group_of = groups;
    return rows;
  }

  bool present() const { return first != nullptr; }
  const float* first_row(int64_t column) const { return first + group_of[column] * first_stride; }
  const float* second_row(int64_t column) const { return second + group_of[column] * second_stride; }
};

// rows[k] -= coupling[j, k] * move for the later columns k of the inner block: the
// rank-1 updates of torch's addr_(alpha=-1), product then difference.
void push_inside(float* rows, int64_t row_stride, const float* move, int64_t width, const Tensor& block, int64_t j,
                 int64_t stop) {
  const float* coupling = block.data_ptr<float>();
  const int64_t s0 = block.stride(0), s1 = block.stride(1);
  for (int64_t k = j + 1; k < stop; ++k) {
    const float factor = coupling[j * s0 + k * s1];
    float* row = rows + k * row_stride;
    for (int64_t r = 0; r < width; ++r) row[r] -= factor * move[r];
  }
}

// The inner block's moves pushed to the rest of the outer block with one small GEMM.
void push_past(Tensor& rows, const Tensor& moves, const Tensor& block, int64_t start, int64_t stop) {
  const int64_t size = rows.size(0);
  if (stop >= size) return;
  rows.narrow(0, stop, size - stop)
      .addmm_(block.narrow(0, start, stop - start).narrow(1, stop, size - stop).t(),
              moves.narrow(0, start, stop - start), 1.0, -1.0);
}

// One outer block of a COMQ coordinate sweep.  local: the block's residual rows (in code
// units for a per-channel grid); codes: the block's code rows, updated in place; moves:
// each column's move, in code units (per channel) or weight units (groups).
void sweep_block(Tensor local, Tensor codes, Tensor moves, Tensor hessian_block, Tensor inv_diag,
                 std::optional<Tensor> inv_scales, std::optional<Tensor> scales, std::optional<Tensor> group_of,
                 int64_t max_code, int64_t inner_block_size) {
  const int64_t size = local.size(0), width = local.size(1);
  check_table(local, "local", size, width);
  check_table(codes, "codes", size, width);
  check_table(moves, "moves", size, width);
  check_table(hessian_block, "hessian block", size, size, false);
  TORCH_CHECK(inv_diag.scalar_type() == at::kDouble && inv_diag.is_contiguous() && inv_diag.numel() == size,
              "inv_diag must hold one float64 per column of the block");
  TORCH_CHECK(inner_block_size > 0, "inner_block_size must be positive");
  const GroupRows grid = GroupRows::of(inv_scales, scales, group_of, size, width);
  float* local_data = local.data_ptr<float>();
  float* code_data = codes.data_ptr<float>();
  float* move_data = moves.data_ptr<float>();
  const double* inverse_diagonal = inv_diag.data_ptr<double>();
  const float top = static_cast<float>(max_code);
  for (int64_t start = 0; start < size; start += inner_block_size) {
    const int64_t stop = std::min(start + inner_block_size, size);
    for (int64_t j = start; j < stop; ++j) {
      const float* residual = local_data + j * local.stride(0);
      float* code = code_data + j * codes.stride(0);
      float* move = move_data + j * moves.stride(0);
      const float step = static_cast<float>(inverse_diagonal[j]);
      if (grid.present()) {
        // torch.addcmul(code, local, inv_scale, value=step): (step * local) * inv_scale
        const float* inv_scale = grid.first_row(j);
        const float* scale = grid.second_row(j);
        for (int64_t r = 0; r < width; ++r) {
          const float shift = nearest_code(code[r] + (step * residual[r]) * inv_scale[r], top) - code[r];
          code[r] += shift;
          move[r] = shift * scale[r];
        }
      } else {
        for (int64_t r = 0; r < width; ++r) {
          const float shift = nearest_code(code[r] + step * residual[r], top) - code[r];
          code[r] += shift;
          move[r] = shift;
        }
      }
      push_inside(local_data, local.stride(0), move, width, hessian_block, j, stop);
    }
    push_past(local, moves, hessian_block, start, stop);
  }
}

// One outer block of the error-feedback pass.  state: the block's rows of the corrected
// weight (code units without a grid, weight units with one), each overwritten by its
// codes once rounded; moves: each column's rounding move, in the state's units.
void feedback_block(Tensor state, Tensor moves, Tensor coupling_block, std::optional<Tensor> scales,
                    std::optional<Tensor> zeros, std::optional<Tensor> group_of, int64_t max_code,
                    int64_t inner_block_size) {
  const int64_t size = state.size(0), width = state.size(1);
  check_table(state, "state", size, width);
  check_table(moves, "moves", size, width);
  check_table(coupling_block, "coupling block", size, size, false);
  TORCH_CHECK(inner_block_size > 0, "inner_block_size must be positive");
  const GroupRows grid = GroupRows::of(scales, zeros, group_of, size, width);
  float* state_data = state.data_ptr<float>();
  float* move_data = moves.data_ptr<float>();
  const int64_t state_stride = state.stride(0);
  const float top = static_cast<float>(max_code);
  for (int64_t start = 0; start < size; start += inner_block_size) {
    const int64_t stop = std::min(start + inner_block_size, size);
    for (int64_t j = start; j < stop; ++j) {
      float* row = state_data + j * state_stride;
      float* move = move_data + j * moves.stride(0);
      if (grid.present()) {
        // torch: code = clamp(round(state / scale) + zero, 0, top); move = (code - zero) * scale - state
        const float* scale = grid.first_row(j);
        const float* zero = grid.second_row(j);
        for (int64_t r = 0; r < width; ++r) {
          const float ratio = at_most(at_least(row[r] / scale[r], -zero[r] - 1.0f), top - zero[r] + 1.0f);
          const float code = at_most(at_least(round_small(ratio) + zero[r], 0.0f), top);
          move[r] = (code - zero[r]) * scale[r] - row[r];
          row[r] = code;
        }
      } else {
        for (int64_t r = 0; r < width; ++r) {
          const float code = nearest_code(row[r], top);
          move[r] = code - row[r];
          row[r] = code;
        }
      }
      push_inside(state_data, state_stride, move, width, coupling_block, j, stop);
    }
    push_past(state, moves, coupling_block, start, stop);
  }
}

// The values of a group-wise grid's code rows: out[j] = (codes[j] - zero[g]) * scale[g], g the
// group of column j, in one pass (torch gathers each group's rows, scattered by the column
// order, and writes them back: four passes and a temporary).  The same two roundings as
// torch's sub then mul.
void dequantize_columns(Tensor codes, Tensor scales, Tensor zeros, Tensor group_of, Tensor out) {
  const int64_t size = codes.size(0), width = codes.size(1);
  check_table(codes, "codes", size, width);
  check_table(out, "out", size, width);
  const GroupRows grid = GroupRows::of(scales, zeros, group_of, size, width);
  const float* code_data = codes.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  for (int64_t j = 0; j < size; ++j) {
    const float* code = code_data + j * codes.stride(0);
    const float* scale = grid.first_row(j);
    const float* zero = grid.second_row(j);
    float* value = out_data + j * out.stride(0);
    for (int64_t r = 0; r < width; ++r) value[r] = (code[r] - zero[r]) * scale[r];
  }
}

}  // namespace
}  // namespace hf_comq

TORCH_LIBRARY_FRAGMENT(hf_comq_cpu, m) {
  m.def(
      "sweep_block(Tensor(a!) local, Tensor(b!) codes, Tensor(c!) moves, Tensor hessian_block, Tensor inv_diag, "
      "Tensor? inv_scales, Tensor? scales, Tensor? group_of, int max_code, int inner_block_size) -> ()");
  m.def(
      "feedback_block(Tensor(a!) state, Tensor(b!) moves, Tensor coupling_block, Tensor? scales, Tensor? zeros, "
      "Tensor? group_of, int max_code, int inner_block_size) -> ()");
  m.def("dequantize_columns(Tensor codes, Tensor scales, Tensor zeros, Tensor group_of, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(hf_comq_cpu, CPU, m) {
  m.impl("sweep_block", &hf_comq::sweep_block);
  m.impl("feedback_block", &hf_comq::feedback_block);
  m.impl("dequantize_columns", &hf_comq::dequantize_columns);
}
