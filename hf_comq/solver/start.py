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

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .grid import ColumnGrid, quantize_to_codes
from .passes import error_feedback_pass
from .spans import spans



def round_to_nearest(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, max_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of plain round-to-nearest."""
    codes = quantize_to_codes(weight, scale, zero, max_code)
    return codes, torch.sub(codes, zero).mul_(scale)


FACTORISATION_FAILED = "the Hessian could not be factorised even with strong damping; it may contain huge values"


def damped_cholesky(
    hessian: torch.Tensor, damp: float, saved: SavedUpperTriangle | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factor of ``H + D`` and the diagonal ``D`` that was added (the damping
    rule of :func:`damped_inverse_cholesky`, for callers that solve with ``H + D`` itself).
    ``saved``: the factor borrows ``hessian``'s storage, as in :func:`damped_inverse_cholesky`."""
    for attempt, added in enumerate(_dampings(hessian, damp)):
        if saved is not None and attempt > 0:
            saved.restore(hessian)
        factor = _factor(hessian, added, in_place=saved is not None)
        if factor is not None:
            return factor, added
    raise ValueError(FACTORISATION_FAILED)


def damped_inverse_cholesky(
    hessian: torch.Tensor, damp: float, saved: SavedUpperTriangle | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor ``U`` of ``(H + D)^-1`` and the diagonal ``D`` that was added.

    ``D`` is ``damp * mean(diag H)`` (the mean over live inputs) on every input, dead ones (zero
    diagonal) included: that is all they need for the factorisation to exist, and it keeps their
    errors, which cost nothing, from weighing in the damped objective.  It scales with H, so the
    result does not depend on H's overall scale (a mean over tokens or a sum).  If the damped matrix
    is still numerically indefinite (rank-deficient H in float32), the damping grows tenfold until it
    factorises.  With ``saved`` (``hessian``'s upper triangle), ``U`` is made in ``hessian``'s own
    storage, whose values are then lost (``saved`` rebuilds them, and does so before each stronger
    damping is tried).

    ``U`` comes from one factorisation, not three (factor, invert, factor the inverse): with ``J`` the
    order-reversing permutation and ``J (H + D) J = L L^T``, ``(H + D)^-1 = U^T U`` for
    ``U = J L^-1 J``, upper triangular (the same ``U``: a Cholesky factor is unique).  Reversing the
    order of rows and columns is reversing the matrix's storage, so it needs no copy.
    """
    for attempt, added in enumerate(_dampings(hessian, damp)):
        if saved is not None and attempt > 0:
            saved.restore(hessian)
        # Every step works in the factor's own storage (LAPACK works in place on the
        # column-major factor): one in x in matrix beside H, where a copy per step would
        # hold two, for a wide layer the solve's largest ones.
        factor = _factor(hessian, added, in_place=saved is not None, reverse_order=True)
        if factor is None:
            continue
        upper = _reverse_storage(_invert_lower_in_place(factor))
        if all_finite(upper):  # an inverse that overflowed takes more damping, as a failed factorisation does
            return upper, added
    raise ValueError(FACTORISATION_FAILED)


INVERSE_BLOCK = 128
"""Columns per block of the in-place triangular inverse (its temporaries: a block column)."""


def _invert_lower_in_place(lower: torch.Tensor) -> torch.Tensor:
    """``L^-1`` written over the lower triangular ``L`` (whose upper triangle holds zeros), a block column
    at a time from the last: each block column below the diagonal becomes ``-L22^-1 L21 L11^-1`` from the
    already inverted trailing block ``L22^-1``, LAPACK's ``trtri`` order, in GEMMs."""
    size = lower.shape[0]
    for start in reversed(range(0, size, INVERSE_BLOCK)):
        stop = min(start + INVERSE_BLOCK, size)
        block = lower[start:stop, start:stop]
        identity = torch.eye(stop - start, dtype=lower.dtype, device=lower.device)
        block_inverse = torch.linalg.solve_triangular(block, identity, upper=False)
        if stop < size:
            below = lower[stop:, start:stop]
            below.copy_(torch.matmul(torch.matmul(lower[stop:, stop:], below), block_inverse).neg_())
        block.copy_(block_inverse)
    return lower


def _reverse_storage(matrix: torch.Tensor) -> torch.Tensor:
    """``J M J`` (rows and columns in reverse order) in ``matrix``'s own storage, a square matrix laid out
    densely (row- or column-major): that is its storage read backwards.  Swaps chunks of the two ends."""
    flat = matrix.T.reshape(-1) if matrix.T.is_contiguous() else matrix.view(-1)
    count = flat.numel()
    for start in range(0, count // 2, REVERSE_CHUNK):
        stop = min(start + REVERSE_CHUNK, count // 2)
        head = flat[start:stop].clone()
        flat[start:stop] = flat[count - stop : count - start].flip(0)
        flat[count - stop : count - start] = head.flip(0)
    return matrix


REVERSE_CHUNK = 1 << 16  # elements per swapped chunk of :func:`_reverse_storage`


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf: NaN propagates into min/max and infinities are the extremes,
    so one reduction decides, about 20x cheaper than ``isfinite(t).all()``."""
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _dampings(hessian: torch.Tensor, damp: float) -> Iterator[torch.Tensor]:
    """The diagonals to try: ``damp * mean(diag H)`` (over live inputs) on every input, then tenfold
    more, five times."""
    diag = torch.diagonal(hessian)
    mean_diag = diag[diag > 0].mean() if bool((diag > 0).any()) else torch.ones((), dtype=hessian.dtype)
    for attempt in range(6):
        yield torch.full_like(diag, damp * 10**attempt) * mean_diag


def _factor(
    hessian: torch.Tensor, added: torch.Tensor, in_place: bool = False, reverse_order: bool = False
) -> torch.Tensor | None:
    """Lower Cholesky factor of ``H + diag(added)``, ``None`` if it is not positive definite.

    The damped copy is laid out column-major, LAPACK's own layout, so it is factorised
    in its own storage: torch would otherwise hold the copy and a new factor at once.
    ``in_place``: no copy, ``hessian`` itself (symmetric and contiguous, so its transpose
    is the same matrix laid out column-major) is damped and factorised.  ``reverse_order``:
    factorise ``J (H + diag(added)) J``, rows and columns in reverse order (``added`` is one
    value on every input, which the reversal leaves as it is).
    """
    size = hessian.shape[-1]
    if in_place:
        damped = hessian.T
    else:
        damped = torch.empty_strided((size, size), (1, size), dtype=hessian.dtype, device=hessian.device)
        damped.copy_(hessian)
    if reverse_order:
        _reverse_storage(damped)
    damped.diagonal().add_(added)
    factor, info = torch.linalg.cholesky_ex(damped, out=(damped, _info_like(damped)))
    return factor if int(info) == 0 else None


def _info_like(matrix: torch.Tensor) -> torch.Tensor:
    """The status tensor ``torch.linalg.cholesky_ex`` writes when given ``out=``."""
    return torch.empty((), dtype=torch.int32, device=matrix.device)


SAVED_PANEL_ROWS = 256  # rows per panel of a saved upper triangle: its squares below the diagonal stay small


class SavedUpperTriangle:
    """A symmetric matrix's upper triangle, kept aside row panel by row panel (half the
    matrix), so that the matrix's storage can be lent out and the matrix rebuilt in it
    exactly: a solve that needs ``H`` again after its start then holds one ``in x in``
    matrix and a half during the start instead of two."""

    def __init__(self, matrix: torch.Tensor):
        self._spans = spans(matrix.shape[0], SAVED_PANEL_ROWS)
        self._panels = [matrix[rows, rows.start :].clone() for rows in self._spans]

    def restore(self, matrix: torch.Tensor) -> None:
        """Write the saved matrix back into ``matrix`` (both triangles)."""
        for rows, panel in zip(self._spans, self._panels):
            width = rows.stop - rows.start
            matrix[rows, rows.start :] = panel
            matrix[rows.stop :, rows] = panel[:, width:].T


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
    lent: tuple[torch.Tensor, SavedUpperTriangle] | None = None  # H, whose storage holds the coupling

    def give_back(self) -> None:
        """Rebuild the Hessian whose storage the coupling borrowed (``lend_storage``);
        the plan is unusable afterwards."""
        if self.lent is not None:
            hessian, saved = self.lent
            saved.restore(hessian)


def plan_error_feedback(hessian: torch.Tensor, damp: float, lend_storage: bool = False) -> ErrorFeedbackPlan:
    """Act-order (decreasing ``diag(H)``: the most energetic inputs first, which is
    what makes GPTQ's rounding strong) and ``-U / diag(U)`` for ``U`` the upper
    Cholesky factor of the damped ``H^-1``.

    ``lend_storage``: make ``U`` inside ``hessian``'s own storage (symmetric and
    contiguous), keeping its upper triangle aside; :meth:`ErrorFeedbackPlan.give_back`
    rebuilds ``hessian`` exactly.  Columns out of act-order are factorised in their
    permuted copy, which needs no lending.
    """
    perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    lent = None
    if bool(torch.equal(perm, torch.arange(perm.numel(), device=perm.device))):
        perm = None
        if lend_storage:
            lent = (hessian, SavedUpperTriangle(hessian))
    else:
        hessian = hessian[perm][:, perm]
    upper, added = damped_inverse_cholesky(hessian, damp, saved=None if lent is None else lent[1])
    upper_diag = torch.diagonal(upper).clone()
    return ErrorFeedbackPlan(
        perm=perm,
        coupling=upper.div_(upper_diag.neg().unsqueeze(1)),  # -U / diag(U), in U's own storage
        move_weight=upper_diag.square().reciprocal(),
        added_diagonal=added,
        lent=lent,
    )


def error_feedback_start(
    weight_t: torch.Tensor,
    grid: ColumnGrid,
    max_code: int,
    plan: ErrorFeedbackPlan,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes from one error-feedback pass in act-order, and each output row's
    objective ``(w - wq) H (w - wq)^T``.

    ``weight_t`` is ``in x out``; ``grid`` may stack several grids side by side
    (width ``n_grids * out``), and the codes are stacked the same way: one pass
    starts every grid.  Per-channel grids run the pass in code units (see
    :func:`error_feedback_pass`).  The values are left to the caller
    (``grid.dequantize``): a solver that keeps one grid per row needs them for
    the kept rows only.

    The pass leaves ``W - Wq = E U`` with ``E`` its scaled rounding errors, and
    ``U (H + D) U^T = I``, so a row's damped objective is ``||e||^2`` and its exact
    one that minus ``sum_j D_j (w_j - wq_j)^2``: a per-row objective for the
    price of an elementwise pass, where the direct route costs one GEMM.
    """
    n_cols, out_features = weight_t.shape
    n_grids = grid.scale.shape[1] // out_features
    if plan.perm is not None:
        weight_t = weight_t[plan.perm]
        grid = grid.permuted(plan.perm)
    if grid.per_channel:
        # The pass consumes its state: here the weights in code units, one copy per grid,
        # made by the division itself rather than copied first and divided in place.
        scale_row, zero_row = grid.scale[0], grid.zero[0]
        state_t = torch.div(weight_t.unsqueeze(1), scale_row.view(n_grids, out_features))
        codes_t, damped_rows = error_feedback_pass(
            state_t.reshape(n_cols, -1).add_(zero_row), plan.coupling, plan.move_weight, max_code, block_size=block_size
        )
        damped_rows.mul_(scale_row.square())
    else:
        codes_t, damped_rows = error_feedback_pass(
            weight_t.repeat(1, n_grids), plan.coupling, plan.move_weight, max_code, grid, block_size=block_size
        )
    # Grid by grid through one weight-sized buffer: a stacked table of values or
    # errors would be a fresh n_grids-times larger allocation.
    error_t = torch.empty_like(weight_t)
    damping_terms = []
    for k in range(n_grids):
        columns = slice(k * out_features, (k + 1) * out_features)
        one_grid = ColumnGrid(grid.scale[:, columns], grid.zero[:, columns], grid.groups)
        one_grid.dequantize(codes_t[:, columns], out=error_t).sub_(weight_t).square_()
        damping_terms.append(torch.mv(error_t.T, plan.added_diagonal))
    row_objective = damped_rows - torch.cat(damping_terms)
    if plan.perm is not None:
        codes_t = codes_t[torch.argsort(plan.perm)]
    return codes_t, row_objective
