"""Updating some output rows of the residual: against a column-by-column loop."""

import torch

from hf_comq.solver.residual import subtract_at_rows


def test_subtract_at_rows_changes_only_those_rows_by_exactly_the_change():
    generator = torch.Generator().manual_seed(0)
    residual_t = torch.randn(7, 11, generator=generator)
    rows = torch.tensor([9, 0, 4])
    change = torch.randn(7, 3, generator=generator)
    expected = residual_t.clone()
    for position, row in enumerate(rows.tolist()):
        expected[:, row] = expected[:, row] - change[:, position]
    subtract_at_rows(residual_t, rows, change)
    assert torch.equal(residual_t, expected)


def test_subtract_at_rows_with_no_rows_leaves_the_residual_alone():
    residual_t = torch.randn(4, 5)
    before = residual_t.clone()
    subtract_at_rows(residual_t, torch.empty(0, dtype=torch.long), torch.empty(4, 0))
    assert torch.equal(residual_t, before)
