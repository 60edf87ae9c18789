"""The column passes solve the same problem in the compiled kernel as in their torch loops.

The kernel (hf_comq/kernels/csrc/column_passes.cpp) moves the per-column loop out of
Python with the same float32 arithmetic (how close the two must be: kernel_paths.py).
"""

from __future__ import annotations

import pytest
import torch

from hf_comq.kernels import DISABLE_ENV_VAR, compiled_solver_ops
from hf_comq.solver import comq_quantize, layer_objective
from hf_comq.solver.grid import ColumnGrid, minmax_grid
from hf_comq.solver.passes import coordinate_sweep, error_feedback_pass
from hf_comq.solver.start import damped_cholesky
from tests.solver.kernel_paths import assert_same_solution, both_paths, require_kernel
from tests.solver.reference import make_layer


@pytest.fixture(scope="module", autouse=True)
def kernel():
    """Skipped only without a toolchain (see :func:`require_kernel`)."""
    require_kernel()


def column_grid(weight: torch.Tensor, bits: int, group_size: int) -> tuple[ColumnGrid, torch.Tensor, torch.Tensor]:
    """The min-max grid as the passes see it, and its scales and zero points per weight entry (transposed)."""
    grid = minmax_grid(weight, bits, group_size)
    scale, zero = grid.per_column()
    return ColumnGrid.of([grid], [j // group_size for j in range(weight.shape[1])]), scale.T, zero.T


def coupling_of(hessian: torch.Tensor) -> torch.Tensor:
    """The error-feedback start's coupling: the upper Cholesky factor of the damped inverse, rows scaled
    to a unit diagonal (a transposed view, as the start makes it)."""
    factor, _ = damped_cholesky(hessian, 0.01)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    return upper / upper.diagonal().unsqueeze(1)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [None, 32])
def test_coordinate_sweep_is_the_same_in_the_kernel_and_in_torch(monkeypatch, bits, group_size):
    weight, inputs = make_layer(40, 160, 600, seed=3)
    hessian = inputs.T @ inputs
    columns = group_size or weight.shape[1]
    grid, scale_t, zero_t = column_grid(weight, bits, columns)
    max_code = 2**bits - 1
    codes_start = torch.clamp(torch.round(weight.T / scale_t) + zero_t, 0, max_code)

    def sweep():
        codes_t = codes_start.clone()
        dequant_t = torch.empty_like(codes_t)
        grid.dequantize(codes_t, out=dequant_t)
        residual_t = hessian @ (weight.T - dequant_t)
        inv_diag = [1.0 / float(value) for value in hessian.diagonal()]
        coordinate_sweep(residual_t, dequant_t, codes_t, hessian, inv_diag, grid, max_code, block_size=64)
        # the residual is kept exact by the pass, so this is the layer objective ||X (W - Wq)^T||^2
        return codes_t, float(((weight.T - dequant_t) * residual_t).sum())

    (codes, objective), (codes_torch, objective_torch) = both_paths(monkeypatch, sweep)
    assert not torch.equal(codes, codes_start), "the sweep moved no code: the comparison tests nothing"
    assert_same_solution(codes, codes_torch, objective, objective_torch)


@pytest.mark.parametrize("group_size", [None, 32])
def test_error_feedback_pass_is_the_same_in_the_kernel_and_in_torch(monkeypatch, group_size):
    weight, inputs = make_layer(48, 160, 600, seed=4)
    hessian = inputs.T @ inputs
    coupling = coupling_of(hessian)
    assert not coupling.is_contiguous()  # the kernel reads the coupling through its strides
    columns = group_size or weight.shape[1]
    grid, scale_t, zero_t = column_grid(weight, 3, columns)
    if group_size is None:  # per channel: the pass runs in code units, without a grid
        state = weight.T / scale_t + zero_t
        pass_grid = None
    else:
        state, pass_grid = weight.T.clone(), grid
    move_weight = torch.rand(weight.shape[1], generator=torch.Generator().manual_seed(0)) + 0.5

    def feedback():
        return error_feedback_pass(state.clone(), coupling, move_weight, 7, pass_grid, block_size=64)

    (codes, loss), (codes_torch, loss_torch) = both_paths(monkeypatch, feedback)
    assert_same_solution(codes, codes_torch, float(loss.sum()), float(loss_torch.sum()))


@pytest.mark.parametrize("settings", [{}, {"group_size": 32}, {"bits": 2, "group_size": 32}, {"symmetric": True}])
def test_a_whole_solve_is_the_same_with_and_without_the_kernel(monkeypatch, medium_layer, settings):
    weight, _, hessian = medium_layer
    (compiled, in_torch) = both_paths(monkeypatch, lambda: comq_quantize(weight, hessian, **settings))
    assert_same_solution(
        compiled.codes, in_torch.codes,
        layer_objective(weight, compiled.dequantize(), hessian), layer_objective(weight, in_torch.dequantize(), hessian),
    )  # fmt: skip


def test_the_kernel_is_used_only_for_float32_cpu_tables_with_contiguous_rows(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    table, square = torch.zeros(4, 6), torch.zeros(4, 4)
    assert compiled_solver_ops([table, None], square.T) is not None  # any layout of the square matrix
    assert compiled_solver_ops([table.double()], square.double()) is None
    assert compiled_solver_ops([torch.zeros(6, 4).T], square) is None
    monkeypatch.setenv(DISABLE_ENV_VAR, "1")
    assert compiled_solver_ops([table], square) is None
