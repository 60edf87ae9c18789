"""Block re-solve: a move the coordinate sweeps cannot make.

A COMQ sweep changes one code at a time, so it stops at a point where no single
code can improve the objective; moving two or more correlated codes together
often still can.  This pass takes one block of consecutive columns (in the
solver's column order) at a time and, with every other column fixed, solves the
block's own problem again:

    minimise over the block's values V:  (T - V) H_BB (T - V)^T   per output row,

where ``T = Vq + H_BB^-1 R_B`` is the block's continuous optimum given the other
columns (``R = H (W - Wq)^T`` is the solver's residual, ``Vq`` the current values).
The block is rounded by error feedback (nearest-plane, as the solver's start does)
towards ``T``; each output row keeps the new values only if its exact objective
drops, so the pass never raises the objective.  After it, the sweeps polish the
new point again.  This is block coordinate descent with GPTQ-style rounding as the
block solver (as in CDQuant's block variant), started from COMQ's local optimum.
"""

from __future__ import annotations

import torch

from ..kernels.gemm import add_matmul_, matmul
from .grid import ColumnGrid
from .residual import subtract_at_rows
from .start import damped_cholesky, error_feedback_start, plan_error_feedback


def block_resolve_pass(
    residual_t: torch.Tensor,
    dequant_t: torch.Tensor,
    codes_t: torch.Tensor,
    hessian: torch.Tensor,
    grid: ColumnGrid,
    max_code: int,
    damp: float,
    block_size: int = 128,
) -> torch.Tensor:
    """Re-solve every block of ``block_size`` columns in place; return which output rows
    took new codes in some block (bool, one per row: the only rows a sweep after this
    pass can find changed).

    All tables are ``in x out`` in the solver's column order; ``residual_t`` stays
    exact.  ``damp`` regularises the block's Cholesky factor exactly as in the
    error-feedback start (it also keeps ``T`` finite when ``H_BB`` is singular);
    acceptance is judged on the undamped objective.
    """
    n_cols = residual_t.shape[0]
    moved = torch.zeros(residual_t.shape[1], dtype=torch.bool, device=residual_t.device)
    for b0 in range(0, n_cols, block_size):
        b1 = min(b0 + block_size, n_cols)
        block_h = hessian[b0:b1, b0:b1]
        residual, values = residual_t[b0:b1], dequant_t[b0:b1]
        target = _block_target(values, residual, block_h, damp)
        if target is None:
            continue
        plan = plan_error_feedback(block_h, damp)
        block_grid = grid.columns(b0, b1)
        new_codes, _ = error_feedback_start(target, block_grid, max_code, plan, block_size)
        new_values = block_grid.dequantize(new_codes, out=target)
        # Moving the block's values by ``delta`` changes a row's objective by
        # ``-2 delta . R_B + delta H_BB delta``: exact, and needs no full GEMM.
        delta = new_values.sub_(values)
        change = matmul(block_h, delta).sub_(residual, alpha=2.0).mul_(delta).sum(0)
        better = change < 0
        if not bool(better.any()):
            continue
        delta.mul_(better)
        block_codes = codes_t[b0:b1]
        moved |= better & (new_codes != block_codes).any(0)  # not rows whose values were only snapped to their codes
        codes_t[b0:b1] = torch.where(better, new_codes, block_codes)
        values.add_(delta)
        _push_moves(residual_t, hessian[:, b0:b1], delta, better)
    return moved


def _push_moves(residual_t: torch.Tensor, h_columns: torch.Tensor, delta: torch.Tensor, moved: torch.Tensor) -> None:
    """``residual_t -= H[:, B] @ delta``, where only the output rows in ``moved`` have
    a nonzero ``delta``: on real layers few rows take a block's new values, and
    the product over those rows alone costs that fraction of the full one."""
    rows = torch.nonzero(moved).squeeze(1)
    if 2 * rows.numel() >= moved.numel():
        add_matmul_(residual_t, h_columns, delta, alpha=-1.0)
    else:
        subtract_at_rows(residual_t, rows, matmul(h_columns, delta.index_select(1, rows)))


def _block_target(values: torch.Tensor, residual: torch.Tensor, block_h: torch.Tensor, damp: float) -> torch.Tensor | None:
    """``values + (H_BB + D)^-1 R_B`` with the start's damping rule for ``D``; ``None`` if
    even the most damped block does not factorise (its rows then keep their values)."""
    try:
        factor, _ = damped_cholesky(block_h, damp)
    except ValueError:
        return None
    # The explicit inverse and one GEMM: torch's cholesky_solve is far slower on
    # this many right-hand sides (one per output row).
    return matmul(torch.cholesky_inverse(factor), residual).add_(values)
