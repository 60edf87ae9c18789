"""The closed-form scale refit against least squares written out on X."""

import pytest
import torch

from hf_comq.solver.scale_refit import refit_scales
from tests.solver.reference import rounded_layer


# How the group-wise refit splits the 12 rows: (rows per chunk, PASS_BYTES).  H's
# panels (half of H: 9216 bytes here) are gathered for each pass of chunks when they
# outweigh PASS_BYTES, else once; a chunk's offsets and gram take 336 (groups of 8) or
# 228 (groups of 16) bytes per row.  None: the module's budgets (one chunk, panels kept).
CHUNKINGS = [
    None,
    (1, 1),  # one row per chunk, one chunk per pass
    (2, 2688),  # passes of two 2-row chunks
    (5, 7000),  # 5, 5 and 2 rows: two passes with groups of 8, one with groups of 16
    (3, 10**6),  # 3-row chunks, the panels gathered once
]


def split_rows(monkeypatch, chunking):
    """Make the refit cut the rows into chunks and passes as ``chunking`` says."""
    if chunking is None:
        return
    rows, pass_bytes = chunking
    monkeypatch.setattr("hf_comq.solver.scale_refit.CHUNK_BYTES", 1)
    monkeypatch.setattr("hf_comq.solver.scale_refit.MIN_CHUNK_ROWS", rows)
    monkeypatch.setattr("hf_comq.solver.scale_refit.PASS_BYTES", pass_bytes)


@pytest.mark.parametrize("group_size", [None, 8, 16])
@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_refit_is_each_rows_least_squares_on_x_in_any_column_order(group_size, chunking, monkeypatch):
    split_rows(monkeypatch, chunking)
    weight, inputs, hessian, grid, *_ = layer = rounded_layer(12, 48, 200, seed=5, group_size=group_size)
    offsets = layer.offsets  # out x in
    group = torch.arange(48) // (group_size or 48)

    expected = torch.empty_like(grid.scale)
    for k in range(weight.shape[0]):
        # Row k's values are sum_g s_g * (offsets on group g): least squares in the s_g.
        design = torch.stack([inputs[:, group == g] @ offsets[k, group == g] for g in range(grid.scale.shape[1])], 1)
        expected[k] = torch.linalg.lstsq(design, inputs @ weight[k]).solution

    perm = torch.randperm(48, generator=torch.Generator().manual_seed(0))  # the solver works in act-order
    new_scale, dequant_h_t, _ = refit_scales(
        weight.T[perm].contiguous(), hessian[perm][:, perm], layer.codes.T[perm].contiguous(), grid.zero_point,
        grid.scale, group[perm],
    )  # fmt: skip
    torch.testing.assert_close(new_scale, expected)
    dequant = offsets * new_scale.repeat_interleave(group_size or 48, dim=1)
    torch.testing.assert_close(dequant_h_t, (hessian @ dequant.T)[perm])


def test_rows_whose_objective_would_rise_keep_their_old_scales():
    weight, inputs, hessian, grid, scale_c, *_ = layer = rounded_layer(12, 48, 200, seed=6, group_size=16)
    offsets = layer.offsets
    offsets[:6, 16:32] *= -1  # group 1 of rows 0-5 now wants a negative scale: not a valid grid
    group = torch.arange(48) // 16

    def row_objective(k, scales):
        return float((inputs @ (weight[k] - offsets[k] * scales.repeat_interleave(16))).square().sum())

    expected = grid.scale.clone()
    for k in range(12):
        design = torch.stack([inputs[:, group == g] @ offsets[k, group == g] for g in range(3)], 1)
        solution = torch.linalg.lstsq(design, inputs @ weight[k]).solution
        candidate = torch.where(solution > 0, solution, grid.scale[k])  # an invalid group keeps its scale
        if row_objective(k, candidate) <= row_objective(k, grid.scale[k]):
            expected[k] = candidate

    residual_t = hessian @ (weight - offsets * scale_c).T
    codes = offsets + layer.zero  # off the grid in rows 0-5: the refit takes the codes as they are
    new_scale, _, change = refit_scales(
        weight.T.contiguous(), hessian, codes.T.contiguous(), grid.zero_point, grid.scale, group, residual_t=residual_t
    )
    torch.testing.assert_close(new_scale, expected)
    expected_change = torch.tensor([row_objective(k, new_scale[k]) - row_objective(k, grid.scale[k]) for k in range(12)])
    torch.testing.assert_close(change, expected_change.to(change.dtype))
    kept = [k for k in range(12) if torch.equal(expected[k], grid.scale[k])]
    assert kept and all(k < 6 for k in kept)  # the case is exercised, and only where a group was invalid
    assert all(row_objective(k, new_scale[k]) <= row_objective(k, grid.scale[k]) for k in range(12))


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_refit_without_the_product_finds_the_same_scales_and_objective_change(chunking, monkeypatch):
    # The last refit of a solve keeps no residual: the symmetric half of the gram
    # and the exact per-row change must agree with the full refit.
    split_rows(monkeypatch, chunking)
    weight, inputs, hessian, grid, scale_c, *_ = layer = rounded_layer(12, 48, 200, seed=7, group_size=8)
    offsets = layer.offsets
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    group = (torch.arange(48) // 8)[perm]
    residual_t = (hessian @ (weight - offsets * scale_c).T)[perm]
    codes_t = layer.codes.T[perm].contiguous()
    args = (weight.T[perm].contiguous(), hessian[perm][:, perm], codes_t, grid.zero_point, grid.scale, group)

    full = refit_scales(*args, residual_t=residual_t)
    lean = refit_scales(*args, residual_t=residual_t, with_product=False)

    assert lean.dequant_h_t is None
    torch.testing.assert_close(lean.scale, full.scale)
    torch.testing.assert_close(lean.objective_change, full.objective_change)
    new_values = offsets * lean.scale.repeat_interleave(8, dim=1)
    exact = ((inputs @ (weight - new_values).T).square().sum(0) - (inputs @ (weight - offsets * scale_c).T).square().sum(0))
    torch.testing.assert_close(lean.objective_change, exact)


def test_per_channel_refit_sums_rows_in_blocks_as_in_the_whole_table(monkeypatch):
    """Per channel the refit's offsets and products are formed a block of rows at a time;
    blocks of a multiple of the SIMD width give every row the sums, and so the scales, of
    the whole table at once."""
    weight, _, hessian, grid, *_ = layer = rounded_layer(150, 48, 200, seed=7, group_size=None)
    per_channel = torch.zeros(48, dtype=torch.long)
    tables = weight.T.contiguous(), hessian, layer.codes.T.contiguous(), grid.zero_point, grid.scale, per_channel
    whole_scale, whole_product, _ = refit_scales(*tables)
    monkeypatch.setattr("hf_comq.solver.spans.SUM_BLOCK_ROWS", 64)  # 64, 64 and 22 rows
    scale, product, _ = refit_scales(*tables)
    assert torch.equal(scale, whole_scale) and torch.equal(product, whole_product)
    design = (layer.offsets @ hessian * layer.offsets).sum(1)  # ||X q_k||^2 per row
    torch.testing.assert_close(scale[:, 0], (layer.offsets @ hessian * weight).sum(1) / design)
