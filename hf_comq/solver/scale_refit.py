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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal ``(out, n_groups)`` scales for fixed ``offsets_t = (Q - z)^T``.

    Works in any column order: ``group_of_column[j]`` names the group of (possibly
    permuted) column j.  Returns the new scales and ``H Wq^T`` (``in x out``), which
    the caller needs for the residual and which falls out of the solve for free.
    A row whose system is singular, or whose optimum has a non-positive scale,
    keeps its current scales (the caller also rejects any row whose objective
    would rise).  Per-channel callers that already know ``H (Q - z)^T`` pass it as
    ``projected_t`` and save the GEMM.
    """
    n_cols, out_features = weight_t.shape
    n_groups = scale.shape[1]
    if n_groups == 1:  # per-channel: a few reductions, no per-group split
        projected = hessian @ offsets_t if projected_t is None else projected_t
        gram = (projected * offsets_t).sum(0).reshape(-1, 1, 1)
        rhs = (projected * weight_t).sum(0).reshape(-1, 1)
        new_scale = _solve_positive(gram, rhs, scale)
        return new_scale, projected * new_scale.T
    membership = torch.nn.functional.one_hot(group_of_column, n_groups).to(weight_t.dtype)  # in x G
    rows_per_chunk = max(1, CHUNK_BYTES // (n_cols * n_groups * weight_t.element_size()))
    new_scale = scale.clone()
    dequant_h_t = torch.empty_like(weight_t)
    for r0 in range(0, out_features, rows_per_chunk):
        rows = slice(r0, min(r0 + rows_per_chunk, out_features))
        offsets = offsets_t[:, rows]
        n_rows = offsets.shape[1]
        # projected[j, r, g] = sum_{i in group g} H[j, i] * offsets[i, r]
        split = (offsets.unsqueeze(2) * membership.unsqueeze(1)).reshape(n_cols, n_rows * n_groups)
        projected = (hessian @ split).reshape(n_cols, n_rows, n_groups)
        gram = torch.einsum("jrg,jr,jh->rgh", projected, offsets, membership)
        rhs = torch.einsum("jrg,jr->rg", projected, weight_t[:, rows])
        chunk_scale = _solve_positive(gram, rhs, scale[rows])
        new_scale[rows] = chunk_scale
        dequant_h_t[:, rows] = torch.einsum("rg,jrg->jr", chunk_scale, projected)
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
