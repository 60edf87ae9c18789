"""Closed-form refit of the scales for fixed integer codes (the paper's delta update).

With codes fixed, ``Wq = scale * (Q - z)`` is linear in the scales, so the
objective ``sum_k (w_k - wq_k) H (w_k - wq_k)^T`` is a small least-squares problem
per row: ``delta_k = <X q_k, X w_k> / ||X q_k||^2`` for per-channel grids, and a
``groups x groups`` linear system per row for group-wise grids.  The codes stay on
their integer grid, so sweeps and refits alternate without ever leaving the
feasible set and the objective decreases monotonically.
"""

from __future__ import annotations

import torch

ROW_CHUNK_BYTES = 256 * 1024 * 1024


def refit_scales(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal scales for fixed ``offsets = Q - z``; returns ``(scale, Wq @ H)``.

    A row (or group) whose system is singular or whose optimum is not positive
    keeps its current scale.  ``Wq @ H`` is returned because the caller needs it for
    the residual and it falls out of the refit for free.
    """
    out_features, in_features = weight.shape
    n_groups = in_features // group_size
    if n_groups == 1:
        projected = offsets @ hessian
        numerator = (projected * weight).sum(1)
        denominator = (projected * offsets).sum(1)
        fitted = numerator / denominator.clamp_min(torch.finfo(weight.dtype).tiny)
        keep = (denominator <= 0) | ~(fitted > 0) | ~torch.isfinite(fitted)
        new_scale = torch.where(keep, scale[:, 0], fitted).unsqueeze(1)
        return new_scale, projected * new_scale
    return _refit_group_scales(weight, hessian, offsets, scale, group_size)


def _refit_group_scales(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint refit of every group of a row: solve ``A s = b`` per row, in row chunks
    so that the ``rows x groups x in`` intermediate stays bounded."""
    out_features, in_features = weight.shape
    n_groups = in_features // group_size
    rows_per_chunk = max(1, ROW_CHUNK_BYTES // (n_groups * in_features * weight.element_size()))
    hessian_g = hessian.reshape(n_groups, group_size, in_features)
    new_scale = scale.clone()
    dequant_h = torch.empty_like(weight)
    for r0 in range(0, out_features, rows_per_chunk):
        rows = slice(r0, min(r0 + rows_per_chunk, out_features))
        off = offsets[rows]
        n_rows = off.shape[0]
        projected = torch.einsum("rgi,gij->rgj", off.reshape(n_rows, n_groups, group_size), hessian_g)
        gram = (projected.reshape(n_rows, n_groups, n_groups, group_size) * off.reshape(n_rows, 1, n_groups, group_size)).sum(-1)
        rhs = (projected * weight[rows].unsqueeze(1)).sum(-1)
        ridge = 1e-9 * torch.diagonal(gram, dim1=1, dim2=2).abs().amax(1).clamp_min(torch.finfo(weight.dtype).tiny)
        gram = gram + torch.diag_embed(ridge.unsqueeze(1).expand(-1, n_groups))
        solution, info = torch.linalg.solve_ex(gram, rhs.unsqueeze(-1))
        solution = solution.squeeze(-1)
        valid = (info == 0).unsqueeze(1) & (solution > 0) & torch.isfinite(solution)
        chunk_scale = torch.where(valid, solution, scale[rows])
        new_scale[rows] = chunk_scale
        dequant_h[rows] = torch.einsum("rg,rgj->rj", chunk_scale, projected)
    return new_scale, dequant_h
