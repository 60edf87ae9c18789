"""Closed-form refit of the scales for fixed integer codes (the paper's delta update).

With codes fixed, ``Wq = scale * (Q - z)`` is linear in the scales, so the
objective ``sum_k (w_k - wq_k) H (w_k - wq_k)^T`` is a small least-squares problem
per row: ``delta_k = <X q_k, X w_k> / ||X q_k||^2`` for per-channel grids, and a
``groups x groups`` linear system per row for group-wise grids.  The codes stay on
their integer grid, so sweeps and refits alternate without leaving the feasible set
and the objective decreases monotonically.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ..kernels.gemm import matmul
from .grid import column_table
from .spans import row_totals_in_blocks, rows_fitting, spans

CHUNK_BYTES = 4 * 1024 * 1024  # products of one row chunk with one row of H's blocks
MIN_CHUNK_ROWS = 32  # fewer rows make the batched products inefficient
PASS_BYTES = 32 * 1024 * 1024  # H's panels kept whole up to this, else passes of chunks' offsets and grams up to it


class Refit(NamedTuple):
    """What :func:`refit_scales` found."""

    scale: torch.Tensor  # (out, n_groups)
    dequant_h_t: torch.Tensor | None  # H Wq^T (in x out) for the new scales, unless not asked for
    objective_change: torch.Tensor | None  # per row, given the residual (group-wise only)


def refit_scales(
    weight_t: torch.Tensor,
    hessian: torch.Tensor,
    codes_t: torch.Tensor,
    zero_point: torch.Tensor,
    scale: torch.Tensor,
    group_of_column: torch.Tensor,
    projected_t: torch.Tensor | None = None,
    weight_h_t: torch.Tensor | None = None,
    residual_t: torch.Tensor | None = None,
    with_product: bool = True,
) -> Refit:
    """Optimal ``(out, n_groups)`` scales for fixed codes ``codes_t = Q^T`` and zero points.

    Works in any column order: ``group_of_column[j]`` names the group of (possibly
    permuted) column j.  The offsets ``(Q - z)^T`` are formed a chunk of rows at a
    time group-wise: a whole table of them would sit beside the gram's panels.  Also
    returns ``H Wq^T`` (``in x out``), which the caller needs for the residual (free
    per channel, one GEMM group-wise).
    A row whose system is singular, or whose optimum has a non-positive scale,
    keeps its current scales.  Group-wise, such a group keeps its old scale while
    the others move, which can raise the row's objective; callers that pass the
    exact residual ``residual_t = H (W - Wq)^T`` of the current scales get such rows
    back unchanged, and each row's objective change.  With that, a caller that
    needs no residual after the refit (the last step of a solve) passes
    ``with_product=False`` and saves the GEMM of ``H Wq^T``; the group-wise gram
    itself costs half a GEMM.  Per-channel callers that already know ``H (Q - z)^T``
    pass it as ``projected_t`` (which becomes the returned ``H Wq^T``), group-wise
    callers that know ``H W^T`` pass it as ``weight_h_t``; each saves a GEMM.
    """
    n_cols, out_features = weight_t.shape
    n_groups = scale.shape[1]
    if n_groups == 1:  # per-channel: a few reductions, no per-group split
        return _refit_per_channel(weight_t, hessian, codes_t, zero_point, scale, projected_t)
    # Each group's block of columns together: the columns reordered group by group
    # once (a stable sort keeps the solver's order inside a group).
    by_group = torch.argsort(group_of_column, stable=True)
    group_size = n_cols // n_groups
    weight_h_t = matmul(hessian, weight_t) if weight_h_t is None else weight_h_t
    bytes_per_row = (n_cols + n_groups * n_groups) * weight_t.element_size()
    chunk_rows = rows_fitting(CHUNK_BYTES, bytes_per_row, MIN_CHUNK_ROWS)
    # H's panels together are half of H: kept for the whole refit while that fits a
    # pass's budget, else gathered again for each pass of chunks (a wide layer)
    keep_panels = n_cols * n_cols * weight_t.element_size() // 2 <= PASS_BYTES
    panel = _group_panels(hessian, by_group, group_size, keep=keep_panels)
    pass_rows = chunk_rows if keep_panels else _pass_rows(out_features, chunk_rows, bytes_per_row)
    new_scale = scale.clone()
    change = weight_t.new_zeros(out_features) if residual_t is not None else None
    for rows_of_pass in spans(out_features, pass_rows):
        chunks = [slice(rows_of_pass.start + part.start, rows_of_pass.start + part.stop)
                  for part in spans(rows_of_pass.stop - rows_of_pass.start, chunk_rows)]  # fmt: skip
        offsets = [_group_offsets(codes_t[:, rows], zero_point[rows], by_group, n_groups) for rows in chunks]
        grams = _upper_group_grams(panel, offsets)
        for rows, blocks, gram in zip(chunks, offsets, grams):
            width = rows.stop - rows.start
            flat = blocks.view(n_cols, width)
            # gathered a chunk at a time, like the offsets: a whole group-ordered copy of
            # H W^T would be one more weight-sized table beside them
            rhs = (weight_h_t[:, rows].index_select(0, by_group) * flat).view(n_groups, group_size, width).sum(1)
            chunk_scale = _solve_positive(gram.permute(2, 0, 1), rhs.T, scale[rows])
            if residual_t is not None:
                gradient = (residual_t[:, rows].index_select(0, by_group) * flat).view(n_groups, group_size, width).sum(1)
                chunk_change = _objective_change(gram, gradient, (chunk_scale - scale[rows]).T)
                rises = chunk_change > 0
                chunk_scale = torch.where(rises.unsqueeze(1), scale[rows], chunk_scale)
                change[rows] = chunk_change.masked_fill_(rises, 0.0)
            new_scale[rows] = chunk_scale
        del offsets, grams
    del panel
    if not with_product:
        return Refit(new_scale, None, change)
    # One dense GEMM: cheaper than summing H Wq^T from per-group products, whose
    # inner dimension is only the group size.
    zero_t, scale_t = (column_table(table, group_of_column) for table in (zero_point, new_scale))
    return Refit(new_scale, matmul(hessian, (codes_t - zero_t).mul_(scale_t)), change)


def _refit_per_channel(
    weight_t: torch.Tensor,
    hessian: torch.Tensor,
    codes_t: torch.Tensor,
    zero_point: torch.Tensor,
    scale: torch.Tensor,
    projected_t: torch.Tensor | None,
) -> Refit:
    """:func:`refit_scales` of a per-channel grid: each row's scale is one ratio of two sums.

    The offsets ``(Q - z)^T`` and the products summed are formed a block of rows at a
    time beside ``H (Q - z)^T``: whole tables of them would be two more weight-sized
    tables at the peak of a solve.  Each row is summed as in the whole table.
    """
    out_features = weight_t.shape[1]
    projected = matmul(hessian, codes_t - zero_point.T) if projected_t is None else projected_t
    gram = row_totals_in_blocks(
        out_features, lambda rows: torch.sub(codes_t[:, rows], zero_point[rows].T).mul_(projected[:, rows])
    )
    rhs = row_totals_in_blocks(out_features, lambda rows: projected[:, rows] * weight_t[:, rows])
    new_scale = _solve_positive(gram.reshape(-1, 1, 1), rhs.reshape(-1, 1), scale)
    return Refit(new_scale, projected.mul_(new_scale.T), None)  # in place: a weight-sized table less


def _pass_rows(out_features: int, chunk_rows: int, bytes_per_row: int) -> int:
    """Rows of a pass: whole chunks whose offsets and grams wait together while each
    group's panel of H is gathered once for all of them, at most :data:`PASS_BYTES`;
    the chunks are shared evenly among as few passes as that allows, since each pass
    gathers the panels again."""
    chunks = -(-out_features // chunk_rows)
    passes = -(-chunks // rows_fitting(PASS_BYTES, chunk_rows * bytes_per_row))
    return chunk_rows * -(-chunks // passes)


def _group_offsets(codes_t: torch.Tensor, zero_point: torch.Tensor, by_group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``(Q - z)^T`` of some rows (``codes_t``: ``in x rows``, ``zero_point``: ``rows x
    groups``) with the columns group by group, as ``(n_groups, group_size, rows)``."""
    n_cols, width = codes_t.shape
    blocks = codes_t.index_select(0, by_group).view(n_groups, n_cols // n_groups, width)
    return blocks.sub_(zero_point.T.unsqueeze(1))


def _group_panels(
    hessian: torch.Tensor, by_group: torch.Tensor, group_size: int, keep: bool
) -> Callable[[int], torch.Tensor]:
    """Group ``g``'s panel of H: its rows of group ``g`` and its columns of that group and
    the later ones, columns group by group (the row of blocks ``H_gh, h >= g`` that
    :func:`_upper_group_grams` reads).  With ``keep`` every panel is gathered now and
    kept (half of H), else each is gathered when asked for."""

    def gather(group: int) -> torch.Tensor:
        start = group * group_size
        return hessian.index_select(0, by_group[start : start + group_size]).index_select(1, by_group[start:])

    if not keep:
        return gather
    return [gather(group) for group in range(hessian.shape[0] // group_size)].__getitem__


def _objective_change(gram: torch.Tensor, gradient: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Per row, how much the objective changes when the scales move by ``step``
    (``(n_groups, rows)``): ``-2 step . g + step^T gram step``, where
    ``g[g, r] = sum_{j in group g} offsets[j, r] * R[j, r]`` comes from the exact
    residual.  Exact, free of the cancellation that subtracting two objectives
    has, and no layer-sized product."""
    curvature = (gram * step.unsqueeze(0)).sum(1)  # (gram @ step) per row
    return (step * (curvature - 2.0 * gradient)).sum(0)


def _upper_group_grams(panel: Callable[[int], torch.Tensor], blocks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per chunk of rows, ``gram[g, h, r] = blocks[g, :, r] . H_gh blocks[h, :, r]``
    with H's columns ordered group by group, from the chunks' ``blocks`` of
    :func:`_group_offsets` and the ``panel`` of each group (:func:`_group_panels`).

    The gram is symmetric: only the blocks on and right of the diagonal are
    computed, each row of blocks as one batched product of the small ``H_gh``
    (half a ``W @ H`` GEMM in all, and no ``n_groups x in x rows`` intermediate).
    Groups are the outer loop, so each panel serves every chunk while it is at hand."""
    n_groups, size, _ = blocks[0].shape
    grams = [chunk.new_empty((n_groups, n_groups, chunk.shape[2])) for chunk in blocks]
    buffers: dict[int, torch.Tensor] = {}  # one per chunk width for every group: fresh ones cost page faults
    for g in range(n_groups):
        right = n_groups - g
        coupling = panel(g).view(size, right, size).transpose(0, 1)
        for chunk, gram in zip(blocks, grams):
            buffer = buffers.setdefault(chunk.shape[2], torch.empty_like(chunk))
            projected = torch.bmm(coupling, chunk[g:], out=buffer[:right])  # H_gh @ blocks[h] for every h >= g
            gram[g, g:] = projected.mul_(chunk[g]).sum(1)
            gram[g + 1 :, g] = gram[g, g + 1 :]
    return grams


def _solve_positive(gram: torch.Tensor, rhs: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Solve ``gram @ s = rhs`` per row; keep ``fallback`` where that is not a valid scale."""
    diag_max = torch.diagonal(gram, dim1=1, dim2=2).amax(1)
    tiny = torch.finfo(gram.dtype).tiny
    ridge = (1e-9 * diag_max).clamp_min(tiny)
    eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
    solution, info = torch.linalg.solve_ex(gram + ridge[:, None, None] * eye, rhs.unsqueeze(-1))
    solution = solution.squeeze(-1)
    valid = (info == 0).unsqueeze(1) & (diag_max > tiny).unsqueeze(1) & (solution > 0) & torch.isfinite(solution)
    return torch.where(valid, solution, fallback)
