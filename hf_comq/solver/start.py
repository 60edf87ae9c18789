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

START_POINTS = ("fp", "rtn", "error_feedback")


def round_to_nearest(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, max_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of plain round-to-nearest."""
    codes = quantize_to_codes(weight, scale, zero, max_code)
    return codes, (codes - zero) * scale


def damped_inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``.

    Dead inputs (zero diagonal) get a unit diagonal so the factorisation exists.  If
    the damped matrix is still numerically indefinite (rank-deficient H in float32),
    the damping grows tenfold until it factorises.
    """
    diag = torch.diagonal(hessian)
    mean_diag = diag[diag > 0].mean() if bool((diag > 0).any()) else torch.ones((), dtype=hessian.dtype)
    base = hessian.clone()
    dead = diag <= 0
    base[dead, dead] = 1.0
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(6):
        damped = base + (damp * 10**attempt) * mean_diag * eye
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("the Hessian could not be factorised even with strong damping; it may contain huge values")


@dataclass(frozen=True)
class ErrorFeedbackPlan:
    """Act-order permutation and coupling matrix of the error-feedback pass.

    Depends on H and the damping only, not on the grid, so one plan serves every
    grid the solver starts from.
    """

    perm: torch.Tensor | None  # None when the columns already are in act-order
    coupling: torch.Tensor


def plan_error_feedback(hessian: torch.Tensor, damp: float) -> ErrorFeedbackPlan:
    """Act-order (decreasing ``diag(H)``: the most energetic inputs first, which is
    what makes GPTQ's rounding strong) and ``-U / diag(U)`` for ``U`` the upper
    Cholesky factor of the damped ``H^-1``."""
    perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    if bool(torch.equal(perm, torch.arange(perm.numel(), device=perm.device))):
        perm = None
    else:
        hessian = hessian[perm][:, perm]
    upper = damped_inverse_cholesky(hessian, damp)
    return ErrorFeedbackPlan(perm=perm, coupling=-upper / torch.diagonal(upper).unsqueeze(1))


def error_feedback_start(
    weight_t: torch.Tensor,
    scale_t: torch.Tensor,
    zero_t: torch.Tensor,
    max_code: int,
    plan: ErrorFeedbackPlan,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and values (``in x out``) from one error-feedback pass in act-order."""
    if plan.perm is not None:
        weight_t, scale_t, zero_t = weight_t[plan.perm], scale_t[plan.perm], zero_t[plan.perm]
    codes_t, values_t = error_feedback_pass(weight_t.clone(), plan.coupling, scale_t, zero_t, max_code, block_size)
    if plan.perm is not None:
        inverse = torch.argsort(plan.perm)
        codes_t, values_t = codes_t[inverse], values_t[inverse]
    return codes_t, values_t
