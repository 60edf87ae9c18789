"""Closed-form refit of the scales for fixed integer codes (the paper's delta update).

With codes fixed, ``Wq = scale * (Q - z)`` is linear in the scales, so the
objective ``sum_k (w_k - wq_k) H (w_k - wq_k)^T`` is a small least-squares problem
per row: ``delta_k = <X q_k, X w_k> / ||X q_k||^2`` for per-channel grids, and a
``groups x groups`` linear system per row for group-wise grids.  The codes stay on
their integer grid, so sweeps and refits alternate without leaving the feasible set
and the objective decreases monotonically.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 256 * 1024 * 1024


def refit_scales(
    weight_t: torch.Tensor,
    hessian: torch.Tensor,
    offsets_t: torch.Tensor,
    scale: torch.Tensor,
    group_of_column: torch.Tensor,
    projected_t: torch.Tensor | None = None,
    weight_h_t: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal ``(out, n_groups)`` scales for fixed ``offsets_t = (Q - z)^T``.

    Works in any column order: ``group_of_column[j]`` names the group of (possibly
    permuted) column j.  Returns the new scales and ``H Wq^T`` (``in x out``), which
    the caller needs for the residual and which falls out of the solve for free.
    A row whose system is singular, or whose optimum has a non-positive scale,
    keeps its current scales (the caller also rejects any row whose objective
    would rise).  Per-channel callers that already know ``H (Q - z)^T`` pass it as
    ``projected_t``, group-wise callers that know ``H W^T`` pass it as ``weight_h_t``;
    each saves a GEMM.
    """
    n_cols, out_features = weight_t.shape
    n_groups = scale.shape[1]
    if n_groups == 1:  # per-channel: a few reductions, no per-group split
        projected = hessian @ offsets_t if projected_t is None else projected_t
        gram = (projected * offsets_t).sum(0).reshape(-1, 1, 1)
        rhs = (projected * weight_t).sum(0).reshape(-1, 1)
        new_scale = _solve_positive(gram, rhs, scale)
        return new_scale, projected * new_scale.T
    # A group's scale multiplies only its own columns, so ``H (Q - z)^T`` split by
    # group is one GEMM per group on that group's columns: one W @ H GEMM in all (a
    # dense product with a zero-padded per-group split would cost n_groups of them).
    columns = [torch.nonzero(group_of_column == g).squeeze(1) for g in range(n_groups)]
    h_columns = [hessian.index_select(1, cols) for cols in columns]
    weight_h_t = hessian @ weight_t if weight_h_t is None else weight_h_t
    rows_per_chunk = max(1, CHUNK_BYTES // (n_cols * n_groups * weight_t.element_size()))
    new_scale = scale.clone()
    dequant_h_t = torch.empty_like(weight_t)
    for r0 in range(0, out_features, rows_per_chunk):
        rows = slice(r0, min(r0 + rows_per_chunk, out_features))
        offsets = offsets_t[:, rows]
        # gram[r, g, h] = sum_{j in group h} offsets[j, r] * (H[:, group g] @ offsets[group g])[j, r]
        split = offsets.new_empty((n_groups, n_cols, offsets.shape[1]))
        for g, (h_g, cols) in enumerate(zip(h_columns, columns)):
            torch.matmul(h_g, offsets.index_select(0, cols), out=split[g])
        split.mul_(offsets)
        gram = offsets.new_zeros((n_groups, n_groups, offsets.shape[1])).index_add_(1, group_of_column, split)
        # rhs[r, g] = sum_{j in group g} offsets[j, r] * (H W^T)[j, r]
        per_column = weight_h_t[:, rows] * offsets
        rhs = offsets.new_zeros((n_groups, offsets.shape[1])).index_add_(0, group_of_column, per_column)
        chunk_scale = _solve_positive(gram.permute(2, 0, 1), rhs.T, scale[rows])
        new_scale[rows] = chunk_scale
        dequant_h_t[:, rows] = hessian @ (offsets * chunk_scale.T[group_of_column])
    return new_scale, dequant_h_t


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
