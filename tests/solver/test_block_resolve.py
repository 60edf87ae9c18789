"""The block re-solve pass against a slow reference on X, and its place in the solver."""

import pytest
import torch

from hf_comq import comq_quantize, layer_objective
from hf_comq.solver import REFERENCE_CODE
from hf_comq.solver.block_resolve import block_resolve_pass
from hf_comq.solver.grid import ColumnGrid
from tests.solver.reference import block_resolve_reference, rounded_layer


@pytest.mark.parametrize("group_size", [None, 16])  # code-unit and weight-unit rounding
def test_block_resolve_matches_reference_on_x(group_size):
    weight, inputs, hessian, grid, scale, zero, codes = layer = rounded_layer(24, 48, 256, seed=3, group_size=group_size)
    values = layer.values  # round to nearest: room to improve
    expected_codes, expected_values = block_resolve_reference(
        weight, values, inputs, scale, zero, grid.max_code, damp=0.01, block_size=16
    )

    residual_t = hessian @ (weight - values).T
    codes_t, values_t = codes.T.contiguous(), values.T.contiguous()
    column_grid = ColumnGrid.of([grid], [j // grid.group_size for j in range(48)])
    moved = block_resolve_pass(
        residual_t, values_t, codes_t, hessian, column_grid, grid.max_code, damp=0.01, block_size=16,
    )

    assert torch.equal(moved, (expected_codes != codes).any(1))  # the rows that took new codes
    assert moved.any()
    assert torch.equal(codes_t.T, expected_codes)
    torch.testing.assert_close(values_t.T, expected_values)
    # The residual the solver relies on stays exact after the in-place updates.
    torch.testing.assert_close(residual_t, hessian @ (weight - values_t.T).T)
    assert layer_objective(weight, values_t.T, hessian) < layer_objective(weight, values, hessian)


def test_block_resolve_never_raises_the_objective(medium_layer):
    weight, _, hessian = medium_layer
    for bits in (2, 3, 4):
        common = dict(bits=bits, iterations=1, tol=0.0, compute_dtype=torch.float64)
        without = comq_quantize(weight, hessian, block_resolve=False, **common)
        with_pass = comq_quantize(weight, hessian, block_resolve=True, **common)
        # Same start and first sweep; the pass only takes per-row improvements.
        assert with_pass.stats["objective"][0] == without.stats["objective"][0]
        assert with_pass.stats["objective"][-1] <= without.stats["objective"][-1]
        assert with_pass.stats["objective"][-1] == pytest.approx(
            layer_objective(weight, with_pass.dequantize(), hessian), rel=1e-6
        )


def test_reference_code_setting_never_runs_the_block_resolve(medium_layer):
    weight, _, hessian = medium_layer
    paper = comq_quantize(weight, hessian, **REFERENCE_CODE)
    asked = comq_quantize(weight, hessian, **dict(REFERENCE_CODE, block_resolve=True))
    assert torch.equal(paper.codes, asked.codes)


def test_block_resolve_where_few_rows_move_matches_reference_on_x():
    # Rows whose weights already lie on the grid cannot improve, so every block
    # updates the residual for the few other rows only.
    weight, inputs, hessian, grid, scale, zero, codes = layer = rounded_layer(24, 48, 256, seed=4, group_size=16)
    values = layer.values
    weight[4:] = values[4:]
    expected_codes, expected_values = block_resolve_reference(
        weight, values, inputs, scale, zero, grid.max_code, damp=0.01, block_size=16
    )

    residual_t = hessian @ (weight - values).T
    codes_t, values_t = codes.T.contiguous(), values.T.contiguous()
    moved = block_resolve_pass(
        residual_t, values_t, codes_t, hessian, ColumnGrid.of([grid], [j // 16 for j in range(48)]), grid.max_code,
        damp=0.01, block_size=16,
    )

    assert moved[:4].any() and not moved[4:].any()
    assert torch.equal(codes_t.T, expected_codes)
    torch.testing.assert_close(values_t.T, expected_values)
    torch.testing.assert_close(residual_t, hessian @ (weight - values_t.T).T)
