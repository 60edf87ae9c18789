"""Closed-form refit of the scales for fixed integer codes (the paper's delta update).

With codes fixed, ``Wq = scale * (Q - z)`` is linear in the scales, so the
objective ``sum_k (w_k - wq_k) H (w_k - wq_k)^T`` is a small least-squares problem
per row: ``delta_k = <X q_k, X w_k> / ||X q_k||^2`` for per-channel grids, and a
``groups x groups`` linear system per row for group-wise grids.  The codes stay on
their integer grid, so sweeps and refits alternate without leaving the feasible set
and the objective decreases monotonically.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

CHUNK_BYTES = 16 * 1024 * 1024
MIN_CHUNK_ROWS = 32  # fewer rows make the batched products inefficient


class Refit(NamedTuple):
    """What :func:`refit_scales` found."""

    scale: torch.Tensor  # (out, n_groups)
    dequant_h_t: torch.Tensor | None  # H Wq^T (in x out) for the new scales, unless not asked for
    objective_change: torch.Tensor | None  # per row, given the residual (group-wise only)


def refit_scales(
    weight_t: torch.Tensor,
    hessian: torch.Tensor,
    offsets_t: torch.Tensor,
    scale: torch.Tensor,
    group_of_column: torch.Tensor,
    projected_t: torch.Tensor | None = None,
    weight_h_t: torch.Tensor | None = None,
    residual_t: torch.Tensor | None = None,
    with_product: bool = True,
) -> Refit:
    """Optimal ``(out, n_groups)`` scales for fixed ``offsets_t = (Q - z)^T``.

    Works in any column order: ``group_of_column[j]`` names the group of (possibly
    permuted) column j.  Also returns ``H Wq^T`` (``in x out``), which the caller
    needs for the residual and which falls out of the solve for free.
    A row whose system is singular, or whose optimum has a non-positive scale,
    keeps its current scales.  Group-wise, such a group keeps its old scale while
    the others move, which can raise the row's objective; callers that pass the
    exact residual ``residual_t = H (W - Wq)^T`` of the current scales get such rows
    back unchanged, and each row's objective change.  With that, a caller that
    needs no residual after the refit (the last step of a solve) passes
    ``with_product=False``: the symmetric gram then costs half a GEMM and nothing
    else is layer-sized.  Per-channel callers that already know ``H (Q - z)^T``
    pass it as ``projected_t``, group-wise callers that know ``H W^T`` pass it as
    ``weight_h_t``; each saves a GEMM.
    """
    n_cols, out_features = weight_t.shape
    n_groups = scale.shape[1]
    if n_groups == 1:  # per-channel: a few reductions, no per-group split
        projected = hessian @ offsets_t if projected_t is None else projected_t
        gram = (projected * offsets_t).sum(0).reshape(-1, 1, 1)
        rhs = (projected * weight_t).sum(0).reshape(-1, 1)
        new_scale = _solve_positive(gram, rhs, scale)
        return Refit(new_scale, projected * new_scale.T, None)
    if not with_product and residual_t is None:
        raise ValueError("with_product=False needs residual_t: the objective change is the only result left")
    # Each group's block of columns together: the columns reordered group by group
    # once (a stable sort keeps the solver's order inside a group), and H's column
    # blocks laid out one after the other for a batched product.
    by_group = torch.argsort(group_of_column, stable=True)
    group_size = n_cols // n_groups
    hessian_sorted = hessian.index_select(0, by_group).index_select(1, by_group)
    column_blocks = hessian_sorted.view(n_cols, n_groups, group_size).transpose(0, 1).contiguous()
    weight_h_t = hessian @ weight_t if weight_h_t is None else weight_h_t
    weight_h_sorted = weight_h_t.index_select(0, by_group)
    # Row chunks small enough that the split stays in cache, and one buffer for all
    # of them: a fresh layer-sized tensor per chunk costs more in page faults than
    # the arithmetic on it.
    rows_per_chunk = max(MIN_CHUNK_ROWS, CHUNK_BYTES // (n_cols * n_groups * weight_t.element_size()))
    rows_per_chunk = min(rows_per_chunk, out_features)
    split_buffer = weight_t.new_empty((n_groups, n_cols, rows_per_chunk)) if with_product else None
    new_scale = scale.clone()
    dequant_h_t = torch.empty_like(weight_t) if with_product else None
    change = weight_t.new_zeros(out_features) if residual_t is not None else None
    for r0 in range(0, out_features, rows_per_chunk):
        rows = slice(r0, min(r0 + rows_per_chunk, out_features))
        offsets = offsets_t[:, rows].index_select(0, by_group)
        width = offsets.shape[1]
        blocks = offsets.view(n_groups, group_size, width)
        if with_product:
            # split[h] = H[:, group h] @ offsets[group h]: H (Q - z)^T split by group,
            # one W @ H GEMM in all (each group's scale multiplies only its own columns).
            split = split_buffer[:, :, :width]
            torch.bmm(column_blocks, blocks, out=split)
            gram = _group_gram(split, offsets)
        else:
            gram = _upper_group_gram(hessian_sorted, blocks)
        rhs = (weight_h_sorted[:, rows] * offsets).view(n_groups, group_size, width).sum(1)
        chunk_scale = _solve_positive(gram.permute(2, 0, 1), rhs.T, scale[rows])
        if residual_t is not None:
            gradient = (residual_t[:, rows].index_select(0, by_group) * offsets).view(n_groups, group_size, width).sum(1)
            chunk_change = _objective_change(gram, gradient, (chunk_scale - scale[rows]).T)
            rises = chunk_change > 0
            chunk_scale = torch.where(rises.unsqueeze(1), scale[rows], chunk_scale)
            change[rows] = chunk_change.masked_fill_(rises, 0.0)
        new_scale[rows] = chunk_scale
        if with_product:
            # H Wq^T = sum_h scale_h * split[h]: the split already holds it, no second GEMM.
            dequant_h = torch.mul(split[0], chunk_scale[:, 0])
            for h in range(1, n_groups):
                dequant_h.addcmul_(split[h], chunk_scale[:, h])
            dequant_h_t[:, rows].index_copy_(0, by_group, dequant_h)
    return Refit(new_scale, dequant_h_t, change)


def _objective_change(gram: torch.Tensor, gradient: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Per row, how much the objective changes when the scales move by ``step``
    (``(n_groups, rows)``): ``-2 step . g + step^T gram step``, where
    ``g[g, r] = sum_{j in group g} offsets[j, r] * R[j, r]`` comes from the exact
    residual.  Exact, free of the cancellation that subtracting two objectives
    has, and no layer-sized product."""
    curvature = (gram * step.unsqueeze(0)).sum(1)  # (gram @ step) per row
    return (step * (curvature - 2.0 * gradient)).sum(0)


def _upper_group_gram(hessian: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The same gram as :func:`_group_gram` from H (columns ordered group by group)
    and ``blocks = offsets.view(n_groups, group_size, rows)``, computing only the
    blocks on and right of the diagonal: half the products, and no split."""
    n_groups, size, width = blocks.shape
    gram = blocks.new_empty((n_groups, n_groups, width))
    for g in range(n_groups):
        right = n_groups - g
        coupling = hessian[g * size : (g + 1) * size, g * size :].reshape(size, right, size).transpose(0, 1)
        projected = torch.bmm(coupling, blocks[g:])  # H_gh @ blocks[h] for every h >= g
        gram[g, g:] = projected.mul_(blocks[g]).sum(1)
        gram[g + 1 :, g] = gram[g, g + 1 :]
    return gram


def _group_gram(split: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``gram[g, h, r] = sum_{j in group g} offsets[j, r] * split[h, j, r]`` with the
    columns ordered group by group; the gram is symmetric, so only ``g <= h`` is
    summed and mirrored."""
    n_groups, n_cols, width = split.shape
    group_size = n_cols // n_groups
    gram = split.new_empty((n_groups, n_groups, width))
    for h in range(n_groups):
        end = (h + 1) * group_size
        gram[: h + 1, h] = (split[h, :end] * offsets[:end]).view(h + 1, group_size, width).sum(1)
        gram[h, :h] = gram[:h, h]
    return gram


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
