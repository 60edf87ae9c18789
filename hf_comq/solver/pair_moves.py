"""Pair moves: two codes stepped together where no single step helps.

A sweep stops where no single code can lower the objective.  Two codes whose inputs
are correlated often still can: stepping code ``a`` by ``d_a`` and code ``b`` by ``d_b``
grid steps (values ``v_a = d_a s_a``, ``v_b = d_b s_b``) changes an output row's
objective by

    c_a + c_b + 2 v_a v_b H_ab,     c_j = v_j^2 H_jj - 2 v_j R_j,

where ``c_j`` is the single step's own change and ``R = H (W - Wq)^T`` the solver's
residual.  After a sweep every ``c_j`` is about zero or more, so a pair helps only
where both steps are nearly free (codes close to the midpoint between two grid
points) and the cross term is negative enough.  Scanning every pair costs ``in^2``
per row and step sign; the cheapest single steps are where such pairs live, so each
row scans the pairs among its ``candidates`` cheapest single steps (each with its
cheaper sign) only.

Each round applies, per row, the best single step or pair if it lowers that row's
objective.  Rows are independent: a row with no such move stays as it is, so it
leaves the pass, and later rounds cost only what the rows still moving cost.  On CPU
in float32 the compiled kernel (``hf_comq/kernels/csrc/pair_moves_impl.h``, built for
AVX2 CPUs and for the rest, the same moves either way) runs each row's rounds to the
end on its own, the same moves in the same float32 arithmetic without a round's
gathers and temporaries for every row, tiles of rows spread over the caller's threads
(:func:`~hf_comq.threads.threads_for_rows`: the solver around it runs on one); the torch
rounds below are the path everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.solver_ops import compiled_solver_ops
from ..threads import threads_for_rows
from .grid import ColumnGrid, column_table
from .residual import subtract_at_rows

MAX_ROUNDS = 128
"""Rounds at most (each moves every still-moving row once); real layers settle in a few dozen."""

MIN_RELATIVE_GAIN = 1e-5
"""A move must lower its row's objective by this share of the move's own quadratic
term: float32 residuals carry rounding, and a move that gains less could undo one that
gained less than the rounding (and cycle)."""


@dataclass
class PairMoveOutcome:
    """What a pass did: ``moves`` made (a pair is one move) and, per output row, whether
    :data:`MAX_ROUNDS` stopped it while it was still moving (``capped``, bool).  Every other
    row ended where no single step and no pair of its candidates helps, so a sweep or a
    second pass could only move it by less than :data:`MIN_RELATIVE_GAIN` allows."""

    moves: int
    capped: torch.Tensor


def pair_move_pass(
    residual_t: torch.Tensor,
    dequant_t: torch.Tensor,
    codes_t: torch.Tensor,
    hessian: torch.Tensor,
    grid: ColumnGrid,
    max_code: int,
    candidates: int,
) -> PairMoveOutcome:
    """Apply single and pair moves in place until no row has one (or :data:`MAX_ROUNDS`).

    All tables are ``in x out`` in the solver's column order (``codes_t`` as floats);
    ``grid`` holds the scales once per group, so the compiled pass reads them without a
    weight-sized per-column table.  ``residual_t`` stays exact.  The objective never rises.
    """
    capped = torch.zeros(residual_t.shape[1], dtype=torch.bool, device=residual_t.device)
    ops = compiled_solver_ops([residual_t, dequant_t, codes_t, grid.scale], hessian)
    if ops is not None:
        with threads_for_rows(residual_t.shape[1], residual_t.shape[0]):  # independent rows: tiles share the threads
            moves = int(ops.pair_moves(
                residual_t, dequant_t, codes_t, hessian.contiguous(), grid.scale, grid.group_index(residual_t.device),
                capped, max_code, candidates, MAX_ROUNDS, MIN_RELATIVE_GAIN,
            ))  # fmt: skip
        return PairMoveOutcome(moves, capped)
    n_cols = residual_t.shape[0]
    scale_t = column_table(grid.scale.T, grid.group_index(residual_t.device))
    diag = torch.diagonal(hessian).unsqueeze(1)
    count = min(max(candidates, 1), n_cols)
    active = torch.arange(residual_t.shape[1], device=residual_t.device)
    moves = 0
    for _ in range(MAX_ROUNDS):
        if active.numel() == 0:
            break
        scale = scale_t.index_select(1, active)
        residual, codes = residual_t.index_select(1, active), codes_t.index_select(1, active)
        cost, step = _single_steps(residual, codes, scale, diag, max_code)
        # Row-major from here on (each output row's candidates contiguous): the
        # candidates' Gram entries are gathered a row's block at a time.
        cost, picked = cost.T.topk(count, dim=1, largest=False)  # ascending: column 0 is each row's best single step
        step = step.T.gather(1, picked)
        value = step * scale.T.gather(1, picked)  # the signed value of each candidate step
        change, first, second = _best_moves(cost, value, picked, hessian)
        moving = change < -MIN_RELATIVE_GAIN * _quadratic(value, picked, diag, first, second)
        if not bool(moving.any()):
            active = active[:0]
            break
        rows = active[moving]
        chosen = [(_at(picked, index)[moving], _at(step, index)[moving]) for index in (first, second)]
        single = (second == first)[moving]
        chosen[1] = (chosen[1][0], chosen[1][1].masked_fill(single, 0.0))  # a single step moves one code
        _apply(residual_t, dequant_t, codes_t, hessian, scale_t, rows, chosen)
        moves += int(moving.sum())
        active = rows
    capped[active] = True  # the rows that moved in the last round, if the rounds ran out
    return PairMoveOutcome(moves, capped)


def _at(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[k, index[k]]`` for every row ``k`` (one candidate of each row)."""
    return table.gather(1, index.unsqueeze(1)).squeeze(1)


def _quadratic(
    value: torch.Tensor, picked: torch.Tensor, diag: torch.Tensor, first: torch.Tensor, second: torch.Tensor
) -> torch.Tensor:
    """``v_a^2 H_aa + v_b^2 H_bb`` of each row's chosen move (one term for a single step)."""
    terms = [_at(value, index).square() * diag[_at(picked, index), 0] for index in (first, second)]
    return terms[0] + torch.where(second == first, 0.0, terms[1])


def _single_steps(
    residual: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, diag: torch.Tensor, max_code: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each coordinate's cheaper single step (+1 or -1 code) and its objective change
    (infinite where neither step stays on the grid)."""
    quadratic = scale.square().mul_(diag)
    linear = scale.mul(residual).mul_(2.0)
    up = torch.where(codes < max_code, quadratic - linear, torch.inf)
    down = torch.where(codes > 0, quadratic + linear, torch.inf)
    step = torch.where(up <= down, 1.0, -1.0).to(residual.dtype)
    return torch.minimum(up, down), step


def _best_moves(
    cost: torch.Tensor, value: torch.Tensor, picked: torch.Tensor, hessian: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the lowest change among its best single step and every pair of its
    candidates (tables ``rows x count``): ``(change, first, second)`` with candidate
    indices (``second == first`` for a single step)."""
    rows, count = cost.shape
    # (rows, count, count): H between every two candidates of each row.
    cross = hessian.reshape(-1).take(picked.unsqueeze(2) * hessian.shape[1] + picked.unsqueeze(1))
    pair = cross.mul_(value.unsqueeze(2) * value.unsqueeze(1)).mul_(2.0)
    pair.add_(cost.unsqueeze(2)).add_(cost.unsqueeze(1))
    pair.diagonal(dim1=1, dim2=2).fill_(torch.inf)
    pair_change, flat = pair.view(rows, count * count).min(1)
    single = cost[:, 0]
    use_pair = pair_change < single
    zero = torch.zeros_like(flat)
    first = torch.where(use_pair, flat // count, zero)
    second = torch.where(use_pair, flat % count, zero)
    return torch.where(use_pair, pair_change, single), first, second


def _apply(
    residual_t: torch.Tensor,
    dequant_t: torch.Tensor,
    codes_t: torch.Tensor,
    hessian: torch.Tensor,
    scale_t: torch.Tensor,
    rows: torch.Tensor,
    chosen: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Step each moving row's codes (``chosen``: per step, each row's column and
    step of -1, 0 or +1) and keep the residual exact: ``R[:, k] -= sum H[:, a] v_a``."""
    push = torch.zeros((residual_t.shape[0], rows.numel()), dtype=residual_t.dtype, device=residual_t.device)
    for column, step in chosen:
        value = step * scale_t[column, rows]
        codes_t.index_put_((column, rows), step, accumulate=True)
        dequant_t.index_put_((column, rows), value, accumulate=True)
        push.addcmul_(hessian.index_select(1, column), value.unsqueeze(0))
    subtract_at_rows(residual_t, rows, push)
