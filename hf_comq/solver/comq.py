"""COMQ layer solver: ``comq_quantize(weight, hessian) -> QuantizedWeight``.

Minimises ``||X W^T - X Wq^T||_F^2 = sum_k (w_k - wq_k) H (w_k - wq_k)^T`` over
integer codes and per-(row, group) scales, working on ``H = X^T X`` only.  Pure
torch; no transformers import, so it can be used on any linear layer.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
from dataclasses import dataclass, field

import torch

from ..kernels.gemm import add_matmul_, matmul
from ..threads import single_thread
from .block_resolve import block_resolve_pass
from .grid import ColumnGrid, Grid, column_table, minmax_grid, search_shrink
from .options import (
    CLIP_WEIGHTS,
    DEFAULTS,
    MAX_START_GRIDS,
    ORDERS,
    START_POINTS,
    check_bits,
    check_damp,
    check_flag,
    check_pair_moves,
    check_ridge,
    default_damp,
    refits_by_default,
    resolve_group_size,
)
from .pair_moves import pair_move_pass
from .passes import coordinate_sweep, rowwise_order_sweep
from .scale_refit import refit_scales
from .shares import RowShare, part_of
from .start import ErrorFeedbackPlan, all_finite, error_feedback_start, plan_error_feedback, round_to_nearest
from .spans import SUM_BLOCK_ROWS, row_totals_in_blocks, rows_fitting, spans

GREEDY_BLOCK_BYTES = 64 * 1024 * 1024
HESSIAN_BLOCK_BYTES = 16 * 1024 * 1024  # temporaries of one row block while the solver's H is built
SLICE_TABLE_BYTES = 16 * 1024 * 1024
"""Largest weight-sized table (``in x rows``, compute dtype) of one slice of a solve.

Rows are independent in every step of the solve, so a layer is solved a slice of
output rows at a time, each slice with about five tables of its own (the weight,
``H W^T``, codes, values, residual); only ``H`` in sweep order is the whole layer's.
Every row is started first, in slices as many times narrower as the start stacks
grids side by side, while the start's factor exists (in H's own storage, H's upper
triangle kept aside: half an ``in x in`` matrix more); the started codes then wait as
uint8 while the slices sweep.  Without slices a wide
layer's solve would hold eight copies of its weight, more than the layer it
quantizes; the slice size follows from the layer's shape alone, so a run's codes do
not depend on where or how the model is placed."""
ROUNDING_BLOCK_BYTES = 1 << 18  # weight rows per grid search and rounding in plain rounding (temporaries: a few such)
SHRINK_CANDIDATES = 16
MIN_SHRINK = 0.25  # at 2-3 bits some rows of outlier-heavy layers (e.g. a ViT's fc2) clip below half their range


@dataclass
class QuantizedWeight:
    """Integer codes plus the grid that turns them back into a weight.

    ``codes`` is ``uint8`` of the weight's ``(out, in)`` shape with values in
    ``[0, 2**bits - 1]``; ``scale`` and ``zero_point`` are ``(out, n_groups)``
    (``n_groups == 1`` for per-channel grids), ``zero_point`` holding integers.
    ``stats`` records how the solve went (objective per step, relative error).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    group_size: int | None
    dtype: torch.dtype = torch.float32
    stats: dict = field(default_factory=dict)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        """The quantized weight ``scale * (codes - zero_point)`` in the original dtype."""
        grid = Grid(self.scale.float(), self.zero_point.float(), self.bits, self.group_size or self.codes.shape[1])
        scale, zero = grid.per_column()
        return ((self.codes.float() - zero) * scale).to(self.dtype)


@single_thread()  # many small operators; the sweeps' large GEMMs and the pair-move pass get the caller's threads back
def comq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int = DEFAULTS["bits"],
    group_size: int | None = DEFAULTS["group_size"],
    symmetric: bool = DEFAULTS["symmetric"],
    iterations: int = DEFAULTS["iterations"],
    order: str = DEFAULTS["order"],
    init: str = DEFAULTS["init"],
    scale_refit: bool | None = DEFAULTS["scale_refit"],
    scale_search: bool = DEFAULTS["scale_search"],
    clip_weights: str = DEFAULTS["clip_weights"],
    start_grids: int = DEFAULTS["start_grids"],
    block_resolve: bool = DEFAULTS["block_resolve"],
    pair_moves: int = DEFAULTS["pair_moves"],
    ridge: float = DEFAULTS["ridge"],
    shrink: float = DEFAULTS["shrink"],
    damp: float | None = DEFAULTS["damp"],
    tol: float = 1e-4,
    block_size: int = 128,
    compute_dtype: torch.dtype = torch.float32,
    overwrite_hessian: bool = False,
    share: RowShare | None = None,
) -> QuantizedWeight:
    """Quantize one linear layer's weight with COMQ coordinate descent.

    Args:
        weight: ``(out, in)`` float tensor in ``nn.Linear`` layout, any float dtype.
        hessian: ``(in, in)`` Gram matrix ``X^T X`` of the layer's calibration inputs
            (see :class:`HessianAccumulator`).
        bits: 2 to 8.
        group_size: columns sharing one scale and zero point; ``None`` for one per
            output channel (the paper's setting).  Must divide ``in``.
        symmetric: zero point fixed at mid-range instead of the asymmetric min-max grid.
        iterations: maximum number of coordinate sweeps (the reference code does 1).
            Each shared-order sweep costs about 2 GEMMs of ``W @ H``; sweeping
            stops early when one lowers the objective by less than ``tol`` (relative).
            With pair moves and no scale refit, a sweep after the first visits only the
            rows changed since the last pair pass (the block re-solve's, or rows the
            pass's round limit stopped), the only ones a sweep could still move; none
            left ends the solve.
            A wide layer is solved a slice of output rows at a time
            (:data:`SLICE_TABLE_BYTES`), each slice stopping by its own objective.
        order: column visiting order of a sweep. ``"greedy"``: each row by
            decreasing ``|w_kj| * ||x_j||`` (the reference code; per-row orders cost
            about ``in / 128`` GEMMs per sweep). ``"act_order"``: one order for all
            rows, by decreasing ``||x_j||`` (fast blocked sweep). ``"sequential"``:
            column index order (fast blocked sweep).
        init: start point: ``"fp"`` (full-precision weights, the reference code),
            ``"rtn"`` (round to nearest) or ``"error_feedback"`` (one GPTQ-style
            nearest-plane pass on the damped Cholesky factor; costs about as much as
            GPTQ itself and is what lets COMQ end below GPTQ).
        scale_refit: after every sweep, refit the scales in closed form for the
            current codes (the paper's delta update; never raises the objective;
            no GEMM per channel, about one and a half with groups, half for the
            last refit, which keeps no residual).  ``None`` (default): only at 2
            bits (:func:`~hf_comq.solver.options.refits_by_default`).  The refit
            lowers the layer objective, on held-out activations too, yet at 3 and 4
            bits whole models quantized with it did worse (SmolLM2's perplexity, per
            channel and group 64), while at 2 bits they did better
            (benchmarks/README.md, "The scale refit at 2 bits only").
        scale_search: choose each row's (group's) clipping of the min-max range by
            minimising a per-input weighted rounding error over 16 shrink factors
            in [0.25, 1] (elementwise, no GEMM; the weights are set by
            ``clip_weights``).  No such proxy sees everything error feedback does,
            so the start is also computed on other grids (``start_grids`` in all),
            stacked into the same pass, and each row keeps the grid that starts
            lower (the start's cost grows with their count).  Large gains at 2 and 3
            bits, and at 4 bits on real activations.
        clip_weights: how the clipping search weighs each input's rounding error
            when the start is ``"error_feedback"``.  ``"conditional"`` (default):
            by the part of input j's energy that the inputs rounded after it cannot
            explain, ``H_jj - H_j,>j H_>j,>j^-1 H_>j,j`` in act-order (on the damped
            H).  The error-feedback pass's objective is exactly
            ``sum_j d_j * move_j**2`` with these weights, so this is the search
            proxy that matches the start; the grid searched with ``diag(H)`` is then
            the stacked alternative.  ``"diagonal"``: search with ``diag(H)`` and
            stack the plain min-max grid beside it (the earlier default).  Other
            start points always search with ``diag(H)``.
        start_grids: with the conditional search, how many grids the error-feedback
            start runs side by side (1 to 4): the searched clipping, the
            ``diag(H)``-searched one, then the first 5 % tighter and 5 % looser.  Each row keeps
            the grid whose start has the lowest exact objective: a clipping search on
            the full objective in a neighbourhood the proxy cannot resolve.  Each
            grid adds about one GPTQ pass's worth of work to the start.
        pair_moves: after every sweep, step two codes of a row together where no
            single step helps (:mod:`.pair_moves`), searching the pairs among each
            row's ``pair_moves`` cheapest single steps; ``0`` turns the pass off.
            The sweeps' neighbourhood is one code; this one is two correlated codes,
            which the sweeps cannot reach.
        ridge: Tikhonov term against fitting the calibration set: the solver works
            on ``H + ridge * mean(diag H) * I`` throughout (clipping search, start,
            sweeps, refits, block re-solve), which adds ``ridge * mean(diag H) *
            ||w_k - wq_k||^2`` to each row's objective.  ``H`` is an estimate from the
            calibration tokens, and descending on it to the last digit also fits the
            estimate's noise; with few tokens per input a small ridge ends lower on
            held-out activations, with many it costs a little
            (``benchmarks/solver_heldout.py`` measures it on real layers).  The
            objective and relative error in ``stats`` include the term.  ``0`` solves
            the calibration objective exactly as given.
        shrink: fixed factor multiplying the initial min-max range (the reference
            code's ``scalar``: 1.0 at 4 bits, 0.65 at 2 bits); applied on top of the
            searched factor when ``scale_search`` is on.
        damp: relative diagonal damping of H for the ``error_feedback`` start only;
            the sweeps always use the exact objective.  ``None`` picks
            :func:`default_damp` (0.003 at 4 bits and above, 0.01 below): at 4 bits
            the rounding errors fed forward are small, so trusting H more wins
            (1-12 % lower objective, also on held-out activations), while at 2 and
            3 bits the larger damping GPTQ uses is safer.
        tol: relative objective decrease below which sweeping stops.
        block_size: columns per block of the blocked sweeps.
        compute_dtype: ``torch.float32`` (default) or ``torch.float64``.
        overwrite_hessian: let the solver build its working copy of H (symmetrized,
            columns in sweep order) inside ``hessian``'s own storage, whose values are
            then lost.  For a wide layer that is one ``in x in`` matrix less at the
            solve's peak; the calibration driver passes it for a Gram matrix no other
            layer reads.  Takes effect only when ``hessian`` is contiguous and already
            in ``compute_dtype`` on the weight's device (otherwise a copy is made anyway).
        share: solve one share of the layer's rows together with other workers (:mod:`.shares`):
            ``weight`` is then this worker's rows of the layer, :func:`shared_rows` of it, and every
            worker must call with the same ``hessian`` and settings.  The result holds those
            rows; its ``stats`` are the whole layer's.

    Returns:
        A :class:`QuantizedWeight`; ``stats["objective"]`` lists the objective after
        the start and after every sweep (with its refit, if on), ``stats["relative_error"]`` is
        the final ``||X(W - Wq)^T||^2 / ||X W^T||^2``.

    The paper-faithful setting (same codes as the reference code) is
    ``init="fp", order="greedy", iterations=1, scale_refit=False, scale_search=False, pair_moves=0``
    (:data:`~hf_comq.solver.options.REFERENCE_CODE`).
    """
    damp = default_damp(bits) if damp is None else damp
    _validate_arguments(
        weight, hessian, bits, iterations, order, init, shrink, damp, tol, block_size, compute_dtype,
        finite=all_finite if share is None else lambda rows: share.total([float(not all_finite(rows))])[0] == 0,
    )  # fmt: skip
    scale_refit = refits_by_default(bits) if scale_refit is None else scale_refit
    check_ridge(ridge)
    for name, flag in (("symmetric", symmetric), ("scale_search", scale_search), ("block_resolve", block_resolve),
                       ("overwrite_hessian", overwrite_hessian)):  # fmt: skip
        check_flag(name, flag)
    check_flag("scale_refit", scale_refit, optional=True)
    if clip_weights not in CLIP_WEIGHTS:
        raise ValueError(f"clip_weights must be one of {CLIP_WEIGHTS}, got {clip_weights!r}")
    if not isinstance(start_grids, int) or isinstance(start_grids, bool) or not 1 <= start_grids <= MAX_START_GRIDS:
        raise ValueError(f"start_grids must be an integer from 1 to {MAX_START_GRIDS}, got {start_grids!r}")
    check_pair_moves(pair_moves)
    in_features = weight.shape[1]
    cols_per_group = resolve_group_size(in_features, group_size)
    # The diagonal of (H + H^T) / 2, exactly: halving a doubled float is exact.
    h_diag = torch.diagonal(hessian.detach()).to(device=weight.device, dtype=compute_dtype).clamp_min(0.0)
    ridge_value = ridge * float(h_diag.mean()) if ridge else 0.0
    h_diag += ridge_value
    if iterations == 0 and (init == "fp" or (init == "rtn" and not scale_search)):
        # Plain rounding: nothing to sweep, so none of the solver's weight-sized state.
        stored_group = group_size if cols_per_group != in_features else None
        return _round_to_grid(
            weight.detach(), hessian.detach(), h_diag, bits, cols_per_group, symmetric, scale_search, shrink,
            stored_group, compute_dtype, ridge_value, share,
        )  # fmt: skip
    columns = _Columns.build(
        hessian.detach(), compute_dtype, weight.device, cols_per_group, order, overwrite_hessian, ridge_value
    )  # fmt: skip
    # The start reads the plan's factor and not H, so the factor borrows H's storage (H's
    # upper triangle waits aside: half an in x in matrix where a factor beside H is one).
    plan = plan_error_feedback(columns.hessian, damp, lend_storage=True) if init == "error_feedback" else None
    conditional = None
    if scale_search and init == "error_feedback" and clip_weights == "conditional":
        conditional = _in_original_order(columns.conditional_energy(plan), columns.perm)
    # H W^T serves the start's residual and the scale refits only; without refits its
    # storage becomes the residual (one weight-sized matrix less from the start on).
    spare_weight_h = init != "fp" and not (scale_refit and iterations > 0)
    # Every row starts before any row sweeps: the start's factor is then gone (and H
    # rebuilt in its storage) before the sweeps' and refits' tables exist.
    started = _start_layer(
        weight, columns, plan, conditional, h_diag, bits=bits, group_size=cols_per_group, symmetric=symmetric,
        scale_search=scale_search, shrink=shrink, start_grids=start_grids, init=init, damp=damp,
        block_size=block_size, compute_dtype=compute_dtype,
    )  # fmt: skip
    if plan is not None:
        plan.give_back()
    plan = conditional = None
    parts: list[_SolvedRows] = []
    for rows in _own_slices(weight.shape[0], in_features, compute_dtype, share):
        problem = _Problem.build(weight[rows].detach().to(compute_dtype), columns, started.grid.rows(rows))
        reference, history = problem.begin(started.rows(rows), consume_weight_h=spare_weight_h)
        reference, history[0], slice_rows_total = _totals([reference, history[0], problem.row_count], share)
        parts.append(_sweep_rows(problem, history, reference, int(slice_rows_total), init, damp, block_size,
                                 iterations, order, scale_refit, block_resolve, pair_moves, tol, share))  # fmt: skip
        del problem
    history = _summed_histories([part.history for part in parts])
    reference = sum(part.reference for part in parts)
    return QuantizedWeight(
        codes=_stacked_rows([part.codes for part in parts]),
        scale=_stacked_rows([part.grid.scale for part in parts]).float(),
        zero_point=_stacked_rows([part.grid.zero_point for part in parts]).float(),
        bits=bits,
        group_size=group_size if cols_per_group != in_features else None,
        dtype=weight.dtype,
        stats=_objective_stats(history, reference),
    )


@dataclass
class _StartedLayer:
    """A layer's start: its codes (``uint8``, ``in x out``, columns in sweep order; ``None``
    for the full-precision start) and the grid each row kept.  uint8 codes are a quarter
    of one float32 table: they wait there while the rows are swept a slice at a time."""

    codes_t: torch.Tensor | None
    grid: Grid

    def rows(self, rows: slice) -> torch.Tensor | None:
        """The codes of a slice of output rows (a strided view)."""
        return None if self.codes_t is None else self.codes_t[:, rows]


def _start_layer(
    weight: torch.Tensor,
    columns: _Columns,
    plan: ErrorFeedbackPlan | None,
    conditional: torch.Tensor | None,
    h_diag: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_search: bool,
    shrink: float,
    start_grids: int,
    init: str,
    damp: float,
    block_size: int,
    compute_dtype: torch.dtype,
) -> _StartedLayer:
    """Search every row's grid and start it (:meth:`_Problem.start`), a slice of rows at a time.

    The start stacks its grids side by side, so its slices are that many times
    narrower than the sweeps': each stacked table stays within one
    :data:`SLICE_TABLE_BYTES`.
    """
    out_features, in_features = weight.shape
    count = _start_grid_count(init, scale_search, conditional is not None, start_grids)
    codes_t = None if init == "fp" else torch.empty((in_features, out_features), dtype=torch.uint8, device=weight.device)
    grids: list[Grid] = []
    for rows in spans(out_features, slice_rows(in_features, compute_dtype, tables=count)):
        w = weight[rows].detach().to(compute_dtype)  # a slice's rows: a whole bf16 layer's never exist in float32
        grid, alternatives = _start_grids(w, h_diag, conditional, bits, group_size, symmetric, scale_search, shrink, count)
        problem = _Problem.build(w, columns, grid)
        del w  # the problem holds its own transposed copy
        codes = problem.start(init, damp, block_size, alternatives, plan)
        if codes is not None:
            codes_t[:, rows] = codes
        grids.append(problem.grid)
        del problem, codes, alternatives
    grid = Grid(
        scale=_stacked_rows([grid.scale for grid in grids]),
        zero_point=_stacked_rows([grid.zero_point for grid in grids]),
        bits=bits,
        group_size=group_size,
    )
    return _StartedLayer(codes_t=codes_t, grid=grid)


def _start_grid_count(init: str, scale_search: bool, conditional_search: bool, start_grids: int) -> int:
    """How many grids the start runs side by side (see :func:`_start_grids`)."""
    if conditional_search:
        return start_grids
    return 2 if scale_search and init != "fp" else 1


def _start_grids(
    w: torch.Tensor,
    h_diag: torch.Tensor,
    conditional: torch.Tensor | None,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_search: bool,
    shrink: float,
    count: int,
) -> tuple[Grid, list[Grid]]:
    """The grid of rows ``w`` and the ``count - 1`` alternatives each row may start on instead.

    Neither search proxy sees every effect of error feedback (inputs drift as errors
    are fed forward); rows are independent, so each keeps whichever grid starts lower.
    ``conditional``: the error-feedback objective's per-input weights (original column
    order), for the conditional clipping search; ``None`` for the ``diag(H)`` one.
    """
    if conditional is not None:
        factors = search_shrink(
            w, torch.stack([conditional, h_diag]), bits, group_size, symmetric, SHRINK_CANDIDATES, MIN_SHRINK
        )
        # The conditional clipping, the diag(H) one (a safety net where the conditional
        # proxy misjudges, e.g. some 2-bit fc2 rows), then the first 5 % tighter and looser.
        candidates = [factors[0], factors[1], factors[0] * 0.95, (factors[0] * 1.05).clamp(max=1.0)][:count]
        grid, *alternatives = [minmax_grid(w, bits, group_size, symmetric, f * shrink) for f in candidates]
        return grid, alternatives
    grid = _initial_grid(w, h_diag, bits, group_size, symmetric, scale_search, shrink)
    return grid, [minmax_grid(w, bits, group_size, symmetric, shrink)] * (count - 1)


def slice_rows(in_features: int, dtype: torch.dtype = torch.float32, tables: int = 1) -> int:
    """Output rows per slice of a solve (see :data:`SLICE_TABLE_BYTES`), for ``tables``
    weight-sized tables side by side (the start's stacked grids)."""
    return rows_fitting(SLICE_TABLE_BYTES, tables * in_features * dtype.itemsize)


def shared_rows(
    out_features: int, in_features: int, index: int, count: int, compute_dtype: torch.dtype = torch.float32
) -> list[slice]:
    """The rows of a layer that worker ``index`` of ``count`` solves (:class:`~.shares.RowShare`): its
    share of each slice of the solve, so that every slice stops where it would in one process."""
    layer_slices = spans(out_features, slice_rows(in_features, compute_dtype))
    return [part_of(span, index, count) for span in layer_slices]


def can_share_rows(out_features: int, in_features: int, count: int, compute_dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``count`` workers each get rows of every slice of this layer's solve."""
    return count > 1 and all(
        part.stop > part.start for index in range(count) for part in shared_rows(out_features, in_features, index, count, compute_dtype)
    )


def joined_shares(shares: list[QuantizedWeight], rows_by_share: list[list[slice]]) -> QuantizedWeight:
    """The whole layer from every worker's share of it (``shares[index]``: worker ``index``'s result, its rows
    ``rows_by_share[index]``, :func:`shared_rows`); the ``stats`` are the first share's, which are the whole layer's."""
    out_features = sum(share.codes.shape[0] for share in shares)

    def joined(field: str) -> torch.Tensor:
        first = getattr(shares[0], field)
        layer = first.new_empty((out_features, *first.shape[1:]))
        for share, rows in zip(shares, rows_by_share):
            values, start = getattr(share, field), 0
            for span in rows:
                layer[span] = values[start : start + span.stop - span.start]
                start += span.stop - span.start
        return layer

    return dataclasses.replace(shares[0], codes=joined("codes"), scale=joined("scale"), zero_point=joined("zero_point"))


def _own_slices(rows: int, in_features: int, compute_dtype: torch.dtype, share: RowShare | None) -> list[slice]:
    """The slices of the ``rows`` rows at hand, in their own indices: a share's parts of the layer's slices,
    one after another, as :func:`shared_rows` lists them."""
    if share is None:
        return spans(rows, slice_rows(in_features, compute_dtype))
    lengths = [part.stop - part.start for part in shared_rows(share.out_features, in_features, share.index, share.count, compute_dtype)]
    if sum(lengths) != rows or min(lengths) == 0:
        raise ValueError(
            f"a row share needs its rows of every slice of the layer ({sum(lengths)} rows of {share.out_features}, "
            f"see shared_rows and can_share_rows), got {rows}"
        )
    starts = [0, *itertools.accumulate(lengths)]
    return [slice(start, stop) for start, stop in itertools.pairwise(starts)]


def _totals(values: list[float], share: RowShare | None) -> list[float]:
    """``values`` summed over the workers sharing the layer (as they are in one process)."""
    return values if share is None else share.total(values)


@dataclass
class _SolvedRows:
    """One slice's result: codes in the weight's layout, its grid, its objective after each step."""

    codes: torch.Tensor
    grid: Grid
    history: list[float]
    reference: float


def _sweep_rows(
    problem: _Problem,
    history: list[float],
    reference: float,
    slice_rows_total: int,
    init: str,
    damp: float,
    block_size: int,
    iterations: int,
    order: str,
    scale_refit: bool,
    block_resolve: bool,
    pair_moves: int,
    tol: float,
    share: RowShare | None = None,
) -> _SolvedRows:
    """Sweep, refit and re-solve one started slice of rows; sweeping stops when the slice's own objective stalls,
    or when no row is left that a sweep could move.  ``slice_rows_total``: the slice's rows (every share's, with ``share``).

    A pair-move pass leaves each row it did not cap where no single step helps (and no pair
    of its candidates), so the next sweep and pair pass can move only the rows changed since
    (by the block re-solve) and the capped ones.  Where no scale refit changed every row,
    only those sweep again.
    """
    unsettled = None  # rows a sweep may still move (bool per row); None: every row
    unsettled_rows = slice_rows_total  # how many, in the whole slice
    for sweep_index in range(iterations):
        if unsettled is not None and unsettled_rows == 0:
            break
        on_grid = problem.codes_t is not None  # the fp start is off the grid: its objective means nothing
        before = history[-1]
        apart = unsettled is not None and unsettled_rows <= MOST_ROWS_SWEPT_APART * slice_rows_total
        capped = _sweep_and_pair(problem, unsettled if apart else None, order, block_size, pair_moves)
        resolving = block_resolve and init == "error_feedback" and sweep_index == 0
        if scale_refit:
            problem.refit_scales(keep_residual=resolving or sweep_index + 1 < iterations)
        moved = problem.resolve_blocks(damp, block_size) if resolving else None
        if capped is None or scale_refit:
            unsettled = None
        else:
            unsettled = capped if moved is None else capped | moved
        objective, unsettled_rows = _totals([problem.objective(), 0 if unsettled is None else int(unsettled.sum())], share)
        history.append(objective)
        if on_grid and before - history[-1] <= tol * before:
            break
    return _SolvedRows(codes=problem.codes_in_original_order(), grid=problem.grid, history=history, reference=reference)


MOST_ROWS_SWEPT_APART = 0.25
"""Largest share of a slice's rows that a sweep gathers into tables of their own when only
they can move; a larger share sweeps the whole slice in place (no copies; those rows move
as they would apart, up to summation order, and the rest by rounding noise at most)."""


def _sweep_and_pair(
    problem: _Problem, apart: torch.Tensor | None, order: str, block_size: int, pair_moves: int
) -> torch.Tensor | None:
    """One sweep and pair-move pass over every row, or over the rows in ``apart`` alone, in tables of
    their own (bool per row; given only with pair moves on); returns the rows the pair pass capped
    (bool per row of ``problem``), ``None`` without pair moves."""
    rows = None if apart is None else torch.nonzero(apart).squeeze(1)
    if rows is not None and rows.numel() == 0:  # none here: other shares of the slice hold them
        return torch.zeros_like(apart)
    part = problem if rows is None else problem.rows_apart(rows)
    part.sweep(order, block_size)
    capped = part.step_pairs(pair_moves) if pair_moves else None
    if rows is not None:
        problem.take_rows(rows, part)
        capped = torch.zeros_like(apart).index_fill_(0, rows[capped], True)
    return capped


def _stacked_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """The slices' tables one under the other (a single slice's as it is: no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _summed_histories(histories: list[list[float]]) -> list[float]:
    """The whole layer's objective after each step: a slice that stopped early keeps its last value."""
    steps = max(len(history) for history in histories)
    return [sum(history[min(step, len(history) - 1)] for history in histories) for step in range(steps)]


SOLVER_DEFAULTS: dict = {
    name: parameter.default
    for name, parameter in inspect.signature(comq_quantize).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
}
"""Defaults of every :func:`comq_quantize` keyword, as its signature has them (the
user-facing ones come from :data:`hf_comq.solver.options.DEFAULTS`)."""


def widest_threaded_gemm(out_features: int, in_features: int, **settings) -> float:
    """Floating point operations of the largest GEMM a solve may run on the caller's threads.

    :func:`comq_quantize` runs on one thread except the passes' updates of the columns
    after each block (``threads_for``) and the compiled pair-move pass over enough rows
    (``threads_for_rows``, one operator whose rows need no GEMM to share); the largest GEMM
    is the start's, with every start grid side by side over one of its slices of rows, or a
    sweep's over one of its (wider) slices.  A caller can tell from it whether a solve of
    this shape uses several threads for its GEMMs or leaves the other cores idle.
    """
    block = settings.get("block_size", SOLVER_DEFAULTS["block_size"])
    grids = settings.get("start_grids", SOLVER_DEFAULTS["start_grids"])
    dtype = settings.get("compute_dtype", SOLVER_DEFAULTS["compute_dtype"])
    start_columns = grids * min(out_features, slice_rows(in_features, dtype, tables=grids))
    sweep_columns = min(out_features, slice_rows(in_features, dtype))
    return 2.0 * block * max(start_columns, sweep_columns) * in_features


def layer_objective(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||X (W - Wq)^T||_F^2`` computed from ``H = X^T X``, in float64."""
    error = weight.double() - dequantized.double()
    return float(((error @ hessian.double()) * error).sum())


def _objective_stats(history: list[float], reference: float) -> dict[str, float | list[float]]:
    """``stats`` of a solve: its objective history and final relative error, each at least zero.

    Both are squared norms, summed from float products in the compute dtype; where ``H``
    is rank-deficient (a layer seen by few tokens) a near-zero objective can come out a
    little below zero by cancellation, a value no reader should be shown.  A sum that
    overflowed (weights or ``H`` too large for the compute dtype) is refused: its codes were
    chosen on meaningless numbers, and a relative error of ``nan / nan`` would read as zero.
    """
    if not all(math.isfinite(value) for value in [*history, reference]):
        raise ValueError(
            "the layer objective overflowed the compute dtype (weights or Gram matrix too large for it); "
            "pass compute_dtype=torch.float64"
        )
    history = [max(value, 0.0) for value in history]
    return {"objective": history, "relative_error": history[-1] / reference if reference > 0 else 0.0}


def _round_to_grid(
    weight: torch.Tensor, hessian: torch.Tensor, h_diag: torch.Tensor, bits: int, group_size: int, symmetric: bool,
    scale_search: bool, shrink: float, stored_group: int | None, compute_dtype: torch.dtype, ridge_value: float,
    share: RowShare | None = None,
) -> QuantizedWeight:  # fmt: skip
    """Round-to-nearest on the start's grid, with the objective and relative error of a solve
    (on ``H + ridge_value * I``, as a solve's; ``h_diag`` has the ridge already).

    Rows are independent in the grid, the rounding and the objective.  The objective's
    products with ``H`` take :data:`~.spans.SUM_BLOCK_ROWS` output rows at a time (each one
    streams the whole of ``H``: much narrower blocks make a wide layer's solve wait on
    memory), and inside a block the grid and the rounding take blocks of
    :data:`ROUNDING_BLOCK_BYTES`, writing their errors over the block's own copy of the
    weight once its reference product is taken.  So two tables of a block's rows are all
    that sits beside the caller's weight and ``hessian``: in a memory-bounded run
    (round-to-nearest is the cheap setting for big models) the widest layer's solve can
    be the run's peak.  Grid and codes are those of the solver's own rounding start, element for
    element.
    """
    out_features, in_features = weight.shape
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=weight.device)
    h = hessian.to(device=weight.device, dtype=compute_dtype)
    rounding_rows = rows_fitting(ROUNDING_BLOCK_BYTES, in_features * compute_dtype.itemsize, minimum=16) // 16 * 16
    scales, zero_points = [], []
    objective = reference = 0.0
    for rows in spans(out_features, SUM_BLOCK_ROWS):
        block = weight[rows].to(compute_dtype, copy=True)  # the block's weight, then its rounding errors
        reference += _ridged_objective(block, h, ridge_value)
        block_codes = codes[rows]
        for part in spans(block.shape[0], rounding_rows):
            grid = _initial_grid(block[part], h_diag, bits, group_size, symmetric, scale_search, shrink)
            scale, zero = grid.per_column()
            part_codes, values = round_to_nearest(block[part], scale, zero, grid.max_code)
            block_codes[part] = part_codes
            block[part].sub_(values)
            scales.append(grid.scale.float())
            zero_points.append(grid.zero_point.float())
        objective += _ridged_objective(block, h, ridge_value)
    objective, reference = _totals([objective, reference], share)
    return QuantizedWeight(
        codes=codes,
        scale=torch.cat(scales),
        zero_point=torch.cat(zero_points),
        bits=bits,
        group_size=stored_group,
        dtype=weight.dtype,
        stats=_objective_stats([objective], reference),
    )


def _ridged_objective(rows: torch.Tensor, hessian: torch.Tensor, ridge_value: float) -> float:
    """``sum_k rows_k (H + ridge_value I) rows_k^T`` over the rows ``rows`` (errors or weights)."""
    total = float(matmul(rows, hessian).mul_(rows).sum(1).double().sum())
    return total + ridge_value * float(rows.double().pow(2).sum()) if ridge_value else total


def _in_original_order(values: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Per-column values given in the problem's column order, back in the weight's."""
    restored = torch.empty_like(values)
    restored[perm] = values
    return restored


def _initial_grid(
    w: torch.Tensor, h_diag: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_search: bool, shrink: float
) -> Grid:
    factor: torch.Tensor | float = shrink
    if scale_search:
        factor = search_shrink(w, h_diag, bits, group_size, symmetric, SHRINK_CANDIDATES, MIN_SHRINK) * shrink
    return minmax_grid(w, bits, group_size, symmetric, factor)


@dataclass(frozen=True)
class _Columns:
    """The layer's Gram matrix in sweep order, which every slice of rows shares."""

    hessian: torch.Tensor
    perm: torch.Tensor
    group_of_column: torch.Tensor
    groups: list[int]  # group_of_column as a list, for the passes' per-column lookups

    @classmethod
    def build(
        cls, h: torch.Tensor, dtype: torch.dtype, device: torch.device, group_size: int, order: str,
        overwrite: bool = False, ridge: float = 0.0,
    ) -> _Columns:  # fmt: skip
        """The sweep order of a layer's columns and its Gram matrix ``h`` (any float dtype
        and device) in it, symmetrized as ``(h + h^T) / 2`` in ``dtype`` on ``device``,
        inside ``h`` itself with ``overwrite`` where its dtype, device and layout allow,
        with ``ridge`` added to the diagonal."""
        if order == "act_order":
            diag = torch.diagonal(h).to(device=device, dtype=dtype)  # that of (h + h^T) / 2, exactly
            perm = torch.argsort(diag, descending=True, stable=True)
        else:
            perm = torch.arange(h.shape[0], device=device)
        group_of_column = perm // group_size
        if overwrite and h.dtype == dtype and h.device == torch.device(device) and h.is_contiguous():
            h_perm = _symmetric_permuted_in_place(h, perm)
        else:
            h_perm = _symmetric_permuted(h, perm, dtype, device)
        if ridge:
            h_perm.diagonal().add_(ridge)
        return cls(hessian=h_perm, perm=perm, group_of_column=group_of_column, groups=group_of_column.tolist())

    def conditional_energy(self, plan: ErrorFeedbackPlan) -> torch.Tensor:
        """Per column (sweep order), the weight ``d_j`` of a rounding move in
        the error-feedback objective ``sum_j d_j * move_j**2``: ``1 / U_jj**2``."""
        if plan.perm is None:
            return plan.move_weight
        return _in_original_order(plan.move_weight, plan.perm)


@dataclass
class _Problem:
    """Solver state, transposed (``in x out``) and with columns in sweep order.

    Transposing makes each weight column a contiguous row for the per-column
    updates; permuting once up front (act-order) saves re-gathering every sweep.
    ``residual_t = H (W - Wq)^T`` is kept exact, so the objective
    ``sum(residual_t * (W - Wq)^T)`` never needs a GEMM of its own; a group-wise
    refit with nothing after it drops it (``None``) and leaves the objective in
    ``objective_without_residual``.
    """

    weight_t: torch.Tensor
    columns: _Columns  # H in sweep order and the column order, shared with the layer's other slices
    grid: Grid
    weight_h_t: torch.Tensor | None = None  # H W^T, from :meth:`begin` on
    codes_t: torch.Tensor | None = None
    dequant_t: torch.Tensor | None = None
    residual_t: torch.Tensor | None = None
    greedy_order_t: torch.Tensor | None = None
    objective_without_residual: float | None = None  # set when a refit drops the residual

    @classmethod
    def build(cls, w: torch.Tensor, columns: _Columns, grid: Grid) -> _Problem:
        """The problem of the weight rows ``w`` (in the compute dtype) on the grid of those rows."""
        # Gathering along the rows' contiguous axis, then transposing, is about twice as fast
        # as gathering rows of the strided transpose.
        weight_t = w.index_select(1, columns.perm).T.contiguous()
        return cls(weight_t=weight_t, columns=columns, grid=grid)

    @property
    def scale_t(self) -> torch.Tensor:
        """The grid's scales as an ``in x out`` per-column table, made when asked for:
        group-wise it is weight-sized, and kept for the whole solve two such tables
        would sit beside the solve's peak for the few steps that read them."""
        return column_table(self.grid.scale, self.columns.group_of_column)

    @property
    def zero_t(self) -> torch.Tensor:
        """The grid's zero points as an ``in x out`` per-column table (see :attr:`scale_t`)."""
        return column_table(self.grid.zero_point, self.columns.group_of_column)

    def start(
        self,
        init: str,
        damp: float,
        block_size: int,
        alternatives: list[Grid] = (),
        plan: ErrorFeedbackPlan | None = None,
    ) -> torch.Tensor | None:
        """Put every coordinate on the grid: returns the codes (``uint8``, ``in x out``,
        sweep order), ``None`` for ``"fp"`` (each coordinate stays at its full-precision value).

        With ``alternatives``, this grid and every alternative are started in one
        stacked pass and each row keeps the grid whose start has the lowest
        objective (:attr:`grid` becomes the kept one).  ``plan``: the error-feedback
        plan of this problem's Hessian, if already made.
        """
        if init == "fp":
            return None
        grids = [self.grid, *alternatives]
        codes_t, row_objective = self._start_on(grids, init, damp, block_size, plan)
        if alternatives:
            codes_t = self._keep_best_rows(grids, codes_t, row_objective)
        return codes_t.to(torch.uint8)

    def begin(self, codes_t: torch.Tensor | None, consume_weight_h: bool = False) -> tuple[float, list[float]]:
        """Take up started codes (:meth:`start`'s, on this problem's grid; ``None``: the fp start):
        returns the reference ``||X W^T||^2`` and the objective history so far.

        ``consume_weight_h``: form the residual inside ``H W^T``'s storage (for
        callers that need ``H W^T`` no more: no scale refits).
        """
        self.weight_h_t = matmul(self.columns.hessian, self.weight_t)
        reference = self.reference()
        if codes_t is None:
            self.codes_t, self.dequant_t = None, self.weight_t.clone()
        else:
            self.codes_t = codes_t.to(self.weight_t.dtype, memory_format=torch.contiguous_format)
            self.dequant_t = self.column_grid.dequantize(self.codes_t, out=torch.empty_like(self.codes_t))
        if consume_weight_h:
            residual_t = add_matmul_(self.weight_h_t, self.columns.hessian, self.dequant_t, alpha=-1.0)
            self.residual_t, self.weight_h_t = residual_t, None
        else:
            self.residual_t = add_matmul_(self.weight_h_t.clone(), self.columns.hessian, self.dequant_t, alpha=-1.0)
        return reference, [self.objective()]

    def _start_on(self, grids: list[Grid], init: str, damp: float, block_size: int, plan: ErrorFeedbackPlan | None = None):
        """Codes and per-row objectives of the start on each grid, side by side
        (``in x (len(grids) * out)``): one pass for all grids saves a pass's per-column
        overhead, and the error-feedback start gets its row objectives without a GEMM."""
        if init == "rtn":
            scale_t = column_table(torch.cat([grid.scale for grid in grids]), self.columns.group_of_column)
            zero_t = column_table(torch.cat([grid.zero_point for grid in grids]), self.columns.group_of_column)
            weight_t = self.weight_t if len(grids) == 1 else self.weight_t.repeat(1, len(grids))
            codes_t, dequant_t = round_to_nearest(weight_t, scale_t, zero_t, self.grid.max_code)
            row_objective = None
            if len(grids) > 1:
                error_t = weight_t - dequant_t
                row_objective = (matmul(self.columns.hessian, error_t) * error_t).sum(0)
            return codes_t, row_objective
        plan = plan or plan_error_feedback(self.columns.hessian, damp)
        column_grid = ColumnGrid.of(grids, self.columns.groups)
        return error_feedback_start(self.weight_t, column_grid, self.grid.max_code, plan, block_size)

    def _keep_best_rows(self, grids: list[Grid], codes_t, row_objective):
        """Per output row, the start on whichever grid (block of the stacked arrays)
        has the lowest objective (the first one on ties); updates the grid."""
        out_features = self.weight_t.shape[1]
        best = row_objective.view(len(grids), out_features).argmin(0)  # (out,)
        rows = torch.arange(out_features, device=best.device)
        self.grid = Grid(
            scale=torch.stack([grid.scale for grid in grids])[best, rows],
            zero_point=torch.stack([grid.zero_point for grid in grids])[best, rows],
            bits=self.grid.bits,
            group_size=self.grid.group_size,
        )
        picked = best * out_features + rows  # column of each row's pick in the stacked tables
        return codes_t.index_select(1, picked)

    def objective(self) -> float:
        """``sum(R * (W - Wq)^T)``: each output row summed in the compute dtype, the row
        totals in float64 (three times cheaper than an all-float64 sum, which converts
        every element), the products formed a block of rows at a time: the objective
        comes right after the start, at the solve's peak."""
        if self.residual_t is None:  # the last refit kept no residual, only the objective
            return self.objective_without_residual
        return float(self.row_objectives().double().sum())

    def row_objectives(self) -> torch.Tensor:
        """Each output row's ``sum(R * (W - Wq)^T)``, in the compute dtype."""
        return row_totals_in_blocks(
            self.weight_t.shape[1],
            lambda rows: torch.sub(self.weight_t[:, rows], self.dequant_t[:, rows]).mul_(self.residual_t[:, rows]),
        )

    def reference(self) -> float:
        """``||X W^T||^2 = sum(H W^T * W^T)``, the denominator of the relative error."""
        totals = row_totals_in_blocks(self.weight_t.shape[1], lambda rows: self.weight_h_t[:, rows] * self.weight_t[:, rows])
        return float(totals.double().sum())

    def sweep(self, order: str, block_size: int) -> None:
        if self.codes_t is None:  # the full-precision start, as fractional codes
            self.codes_t = self.dequant_t / self.scale_t + self.zero_t
        diag = torch.diagonal(self.columns.hessian)
        if order == "greedy":
            diag_safe = torch.where(diag > 0, diag, torch.ones_like(diag))
            rowwise_order_sweep(
                self.residual_t, self.dequant_t, self.codes_t, self.columns.hessian, diag_safe,
                self.scale_t, self.zero_t, self.grid.max_code, self._greedy_order(), self._greedy_block(block_size),
            )
        else:
            inv_diag = torch.where(diag > 0, 1.0 / diag, torch.zeros_like(diag)).tolist()
            coordinate_sweep(
                self.residual_t, self.dequant_t, self.codes_t, self.columns.hessian, inv_diag,
                self.column_grid, self.grid.max_code, block_size,
            )

    def _greedy_order(self) -> torch.Tensor:
        """Per-row visiting order by decreasing ``|w_kj| * ||x_j||``, computed once
        from the full-precision weights, as the reference code does."""
        if self.greedy_order_t is None:
            importance = self.weight_t.abs() * torch.diagonal(self.columns.hessian).clamp_min(0).sqrt().unsqueeze(1)
            self.greedy_order_t = torch.argsort(importance, dim=0, descending=True, stable=True)
        return self.greedy_order_t

    def _greedy_block(self, block_size: int) -> int:
        """Steps per block, bounded so the gathered ``block x block x out`` sub-Gram
        matrices stay within ``GREEDY_BLOCK_BYTES``."""
        n_cols, out_features = self.weight_t.shape
        fitting = int(math.sqrt(GREEDY_BLOCK_BYTES / (out_features * self.weight_t.element_size())))
        return max(1, min(block_size, fitting, n_cols))

    def refit_scales(self, keep_residual: bool = True) -> None:
        """Closed-form scale refit.

        Per-channel, each row's new scale is that row's exact optimum for its codes,
        so the objective cannot rise.  Group-wise, a group whose solution is not a
        valid scale keeps its old one, which can make the joint row solution worse:
        :func:`refit_scales` detects such rows from the residual and keeps all their
        old scales.  Without ``keep_residual`` (nothing sweeps after this refit) the
        group-wise refit skips the new residual, and the objective comes from each
        row's exact change instead.
        """
        rows_before = None
        if not (self.per_channel or keep_residual):
            # the objective without a residual starts from each row's objective now,
            # taken before the refit so that the values go before its passes
            rows_before = self.row_objectives()
        self.dequant_t = None  # the refit does not read it
        if self.per_channel:
            # Per-channel: H (Q - z)^T = (H W^T - R) / scale comes from the exact
            # residual, so the refit needs no GEMM; it is made in the residual's
            # storage, which the refit replaces anyway.
            residual_t, self.residual_t = self.residual_t, None
            projected_t = residual_t.neg_().add_(self.weight_h_t).div_(self.grid.scale.T)
            del residual_t
            refit = refit_scales(
                self.weight_t, self.columns.hessian, self.codes_t, self.grid.zero_point, self.grid.scale,
                self.columns.group_of_column, projected_t,
            )  # fmt: skip
            dequant_h_t = refit.dequant_h_t
        else:
            # H Wq^T is formed below from the new values themselves (the refit would
            # make its own weight-sized copy of them for it).
            refit = refit_scales(
                self.weight_t, self.columns.hessian, self.codes_t, self.grid.zero_point, self.grid.scale,
                self.columns.group_of_column, weight_h_t=self.weight_h_t, residual_t=self.residual_t, with_product=False,
            )  # fmt: skip
            dequant_h_t = None
            if not keep_residual:
                rows_after = rows_before + refit.objective_change
                self.objective_without_residual = float(rows_after.double().sum())
        self.grid = Grid(scale=refit.scale, zero_point=self.grid.zero_point, bits=self.grid.bits, group_size=self.grid.group_size)
        # each old table goes before its successor is made
        self.dequant_t = self.residual_t = None
        self.dequant_t = self.column_grid.dequantize(self.codes_t, out=torch.empty_like(self.codes_t))
        if dequant_h_t is None and keep_residual:
            dequant_h_t = matmul(self.columns.hessian, self.dequant_t)
        if dequant_h_t is not None:
            self.residual_t = torch.sub(self.weight_h_t, dequant_h_t, out=dequant_h_t)

    def step_pairs(self, candidates: int) -> torch.Tensor:
        """One pair-move pass over the current codes (never raises the objective); returns
        the rows its round limit stopped while still moving (bool per row)."""
        return pair_move_pass(
            self.residual_t, self.dequant_t, self.codes_t, self.columns.hessian, self.column_grid, self.grid.max_code,
            candidates,
        ).capped

    def resolve_blocks(self, damp: float, block_size: int) -> torch.Tensor:
        """One block re-solve pass over the current codes (never raises the objective);
        returns the rows that took new codes (bool per row)."""
        return block_resolve_pass(
            self.residual_t, self.dequant_t, self.codes_t, self.columns.hessian, self.column_grid,
            self.grid.max_code, damp, block_size,
        )

    @property
    def row_count(self) -> int:
        """The output rows this problem solves."""
        return self.weight_t.shape[1]

    def rows_apart(self, rows: torch.Tensor) -> _Problem:
        """The problem of some output rows (indices) alone, in tables of their own, for a
        sweep and pair pass; :meth:`take_rows` writes them back.  Without ``H W^T``: only the
        scale refit reads it, and then every row sweeps in place."""
        part = _Problem(
            weight_t=self.weight_t.index_select(1, rows),
            columns=self.columns,
            grid=Grid(self.grid.scale[rows], self.grid.zero_point[rows], self.grid.bits, self.grid.group_size),
        )
        part.codes_t, part.dequant_t, part.residual_t = (
            table.index_select(1, rows) for table in (self.codes_t, self.dequant_t, self.residual_t)
        )
        if self.greedy_order_t is not None:
            part.greedy_order_t = self.greedy_order_t.index_select(1, rows)
        return part

    def take_rows(self, rows: torch.Tensor, part: _Problem) -> None:
        """Write back the codes, values and residual of the rows :meth:`rows_apart` took out (the grid is unchanged)."""
        for table, own in ((self.codes_t, part.codes_t), (self.dequant_t, part.dequant_t), (self.residual_t, part.residual_t)):
            table.index_copy_(1, rows, own)

    @property
    def column_grid(self) -> ColumnGrid:
        """The grid as the column-by-column passes read it (one row per group)."""
        return ColumnGrid.of([self.grid], self.columns.groups)

    @property
    def per_channel(self) -> bool:
        """One scale per output row: the passes can then work in code units."""
        return self.grid.scale.shape[1] == 1

    def codes_in_original_order(self) -> torch.Tensor:
        """``uint8`` codes in the weight's ``(out, in)`` layout (cast first: a quarter of the copies' size)."""
        return self.codes_t.to(torch.uint8)[torch.argsort(self.columns.perm)].T.contiguous()


def _symmetric_permuted(h: torch.Tensor, perm: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(h + h^T) / 2`` in ``dtype`` on ``device``, rows and columns in ``perm`` order.

    The permuted copy is gathered in row blocks (:data:`HESSIAN_BLOCK_BYTES`), each row
    gather contiguous, then symmetrized tile by tile in place: the result is the solve's
    one new ``in x in`` matrix (the caller still holds ``h``; a whole-matrix cast,
    transpose sum and gather would each have left a full-size temporary beside it), and
    no step gathers ``h``'s columns across its rows.  Entry for entry it is the cast, then
    the sum, then the halving of the whole-matrix route, so the values are the same.
    """
    n = h.shape[0]
    result = torch.empty(n, n, dtype=dtype, device=device)
    source_perm = perm.to(h.device)
    temporaries_per_entry = 2 * h.element_size()  # a block's rows, then those rows' columns in order
    for span in spans(n, rows_fitting(HESSIAN_BLOCK_BYTES, n * temporaries_per_entry)):
        result[span] = h.index_select(0, source_perm[span]).index_select(1, source_perm)
    _symmetrize_in_place(result)
    return result


def _symmetric_permuted_in_place(h: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """:func:`_symmetric_permuted` inside ``h``'s own storage (``h`` square, contiguous,
    already in the compute dtype and on the compute device; its values are lost).

    A row gather cannot be done in place in blocks (a block would overwrite rows not
    yet read), but a column gather can, one row block at a time.  So: gather the
    columns (``H P^T``), transpose in place (``P H^T``), gather the columns again
    (``P H^T P^T``, the transpose of the wanted ``P H P^T``), and symmetrize tile by
    tile, which undoes that transpose.  Only moves values, then the same cast-free
    sum and halving as the whole-matrix route: the same values.
    """
    n = h.shape[0]
    row_spans = spans(n, rows_fitting(HESSIAN_BLOCK_BYTES, n * h.element_size()))
    if not bool(torch.equal(perm, torch.arange(n, device=perm.device))):
        for step in range(2):
            for span in row_spans:
                h[span] = h[span].index_select(1, perm)
            if step == 0:
                _transpose_in_place(h)
    _symmetrize_in_place(h)
    return h


def _tiles(n: int, element_size: int) -> list[tuple[slice, slice]]:
    """Upper-triangle tile pairs ``(I, J)``, ``I <= J``, of an ``n x n`` matrix, each tile
    a square of :data:`HESSIAN_BLOCK_BYTES` at most."""
    side = max(1, int(math.sqrt(HESSIAN_BLOCK_BYTES / element_size)))
    sides = spans(n, side)
    return [(sides[i], sides[j]) for i in range(len(sides)) for j in range(i, len(sides))]


def _transpose_in_place(h: torch.Tensor) -> None:
    for rows, cols in _tiles(h.shape[0], h.element_size()):
        if rows == cols:
            h[rows, cols] = h[rows, cols].T.clone()
        else:
            upper = h[rows, cols].clone()
            h[rows, cols] = h[cols, rows].T
            h[cols, rows] = upper.T


def _symmetrize_in_place(h: torch.Tensor) -> None:
    """``h = (h + h^T) / 2`` tile pair by tile pair."""
    for rows, cols in _tiles(h.shape[0], h.element_size()):
        mean = torch.add(h[rows, cols], h[cols, rows].T).mul_(0.5)
        h[rows, cols] = mean
        if rows != cols:
            h[cols, rows] = mean.T


def _validate_arguments(
    weight, hessian, bits, iterations, order, init, shrink, damp, tol, block_size, compute_dtype, finite=None
) -> None:
    """Refuse bad arguments with one line; ``finite``: whether the weight is finite (every share's, for a row share)."""
    check_bits(bits)
    if not isinstance(weight, torch.Tensor) or not isinstance(hessian, torch.Tensor):
        raise ValueError("weight and hessian must be torch tensors")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features) as in nn.Linear, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point() or not hessian.is_floating_point():
        raise ValueError(f"weight and hessian must be floating point, got {weight.dtype} and {hessian.dtype}")
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be a square (in, in) matrix X^T X, got shape {tuple(hessian.shape)}")
    if hessian.shape[0] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: weight is {tuple(weight.shape)} (out, in) but hessian is {tuple(hessian.shape)}; "
            f"the hessian must be ({weight.shape[1]}, {weight.shape[1]}) built from the layer's inputs"
        )
    if weight.numel() == 0:
        raise ValueError("weight is empty")
    if not (finite or all_finite)(weight):
        raise ValueError("weight contains NaN or inf; quantize a checkpoint with finite weights")
    if not all_finite(hessian):
        raise ValueError("hessian contains NaN or inf; check the calibration activations (e.g. fp16 overflow)")
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if init not in START_POINTS:
        raise ValueError(f"init must be one of {START_POINTS}, got {init!r}")
    if not 0.0 < shrink <= 1.0:
        raise ValueError(f"shrink must be in (0, 1], got {shrink!r}")
    check_damp(damp)
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"tol must be a non-negative number, got {tol!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
