"""Start points for the COMQ coordinate sweeps.

Sweeps never increase the objective, so they refine whatever they start from; the
start decides most of the final quality:

* ``"fp"``: the full-precision weights (the reference code).  The first sweep puts
  every coordinate on the grid.
* ``"rtn"``: round-to-nearest on the grid.
* ``"error_feedback"``: nearest-plane (Babai) rounding on the Cholesky factor of the
  damped inverse Gram matrix, in decreasing ``diag(H)`` order: the rounding GPTQ
  performs with act-order.  Starts the sweeps at a point that already accounts for
  the correlations between inputs, which the sweeps then polish against the
  undamped objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import quantize_to_codes
from .passes import error_feedback_pass



def round_to_nearest(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, max_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of plain round-to-nearest."""
    codes = quantize_to_codes(weight, scale, zero, max_code)
    return codes, torch.sub(codes, zero).mul_(scale)


def damped_inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor ``U`` of ``(H + D)^-1`` and the diagonal ``D`` that was added.

    ``D`` is ``damp * mean(diag H)``; dead inputs (zero diagonal) also get 1, so the
    factorisation exists.  If the damped matrix is still numerically indefinite
    (rank-deficient H in float32), the damping grows tenfold until it factorises.
    """
    diag = torch.diagonal(hessian)
    mean_diag = diag[diag > 0].mean() if bool((diag > 0).any()) else torch.ones((), dtype=hessian.dtype)
    dead = (diag <= 0).to(hessian.dtype)
    for attempt in range(6):
        added = dead + (damp * 10**attempt) * mean_diag
        # Each step's input is dropped as soon as its output exists: at most two
        # in x in matrices beside H, for a wide layer the solve's largest ones.
        damped = hessian.clone()
        damped.diagonal().add_(added)
        factor, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            del factor
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0:
                return upper, added
    raise ValueError("the Hessian could not be factorised even with strong damping; it may contain huge values")


@dataclass(frozen=True)
class ErrorFeedbackPlan:
    """Act-order permutation and coupling matrix of the error-feedback pass.

    Depends on H and the damping only, not on the grid, so one plan serves every
    grid the solver starts from.  ``move_weight`` and ``added_diagonal`` turn the
    pass's rounding moves into each row's exact objective without a GEMM.
    """

    perm: torch.Tensor | None  # None when the columns already are in act-order
    coupling: torch.Tensor  # -U / diag(U), in act-order
    move_weight: torch.Tensor  # 1 / diag(U)**2, in act-order
    added_diagonal: torch.Tensor  # the damping D, in act-order


def plan_error_feedback(hessian: torch.Tensor, damp: float) -> ErrorFeedbackPlan:
    """Act-order (decreasing ``diag(H)``: the most energetic inputs first, which is
    what makes GPTQ's rounding strong) and ``-U / diag(U)`` for ``U`` the upper
    Cholesky factor of the damped ``H^-1``."""
    perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    if bool(torch.equal(perm, torch.arange(perm.numel(), device=perm.device))):
        perm = None
    else:
        hessian = hessian[perm][:, perm]
    upper, added = damped_inverse_cholesky(hessian, damp)
    upper_diag = torch.diagonal(upper).clone()
    return ErrorFeedbackPlan(
        perm=perm,
        coupling=upper.div_(upper_diag.neg().unsqueeze(1)),  # -U / diag(U), in U's own storage
        move_weight=upper_diag.square().reciprocal(),
        added_diagonal=added,
    )


def error_feedback_start(
    weight_t: torch.Tensor,
    scale_t: torch.Tensor,
    zero_t: torch.Tensor,
    max_code: int,
    plan: ErrorFeedbackPlan,
    block_size: int,
    per_channel: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes and values from one error-feedback pass in act-order, and each output
    row's objective ``(w - wq) H (w - wq)^T``.

    ``weight_t`` is ``in x out``; ``scale_t``/``zero_t`` are per-column grid tables
    that may stack several grids side by side (``in x (n_grids * out)``), and the
    results are stacked the same way: one pass starts every grid.  With
    ``per_channel`` the pass runs in code units (see :func:`error_feedback_pass`).

    The pass leaves ``W - Wq = E U`` with ``E`` its scaled rounding errors, and
    ``U (H + D) U^T = I``, so a row's damped objective is ``||e||^2`` and its exact
    one that minus ``sum_j D_j (w_j - wq_j)^2``: a per-row objective for the
    price of an elementwise pass, where the direct route costs one GEMM.
    """
    n_cols, out_features = weight_t.shape
    n_grids = scale_t.shape[1] // out_features
    if plan.perm is not None:
        weight_t = weight_t[plan.perm]
        if not per_channel:  # per-channel tables are the same on every row: nothing to permute
            scale_t, zero_t = scale_t[plan.perm], zero_t[plan.perm]
    state_t = weight_t.repeat(1, n_grids)  # consumed by the pass
    if per_channel:
        scale_row, zero_row = scale_t[0], zero_t[0]
        codes_t, damped_rows = error_feedback_pass(
            state_t.div_(scale_row).add_(zero_row), plan.coupling, plan.move_weight, max_code, block_size=block_size
        )
        damped_rows.mul_(scale_row.square())
    else:
        codes_t, damped_rows = error_feedback_pass(
            state_t, plan.coupling, plan.move_weight, max_code, scale_t, zero_t, block_size=block_size
        )
    values_t = torch.sub(codes_t, zero_t, out=state_t).mul_(scale_t)
    error_t = (values_t.view(n_cols, n_grids, out_features) - weight_t.unsqueeze(1)).square_()
    row_objective = damped_rows - torch.mv(error_t.view(n_cols, -1).T, plan.added_diagonal)
    if plan.perm is not None:
        inverse = torch.argsort(plan.perm)
        codes_t, values_t = codes_t[inverse], values_t[inverse]
    return codes_t, values_t, row_objective
