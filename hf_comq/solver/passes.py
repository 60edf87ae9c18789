"""Column-by-column rounding passes over a weight matrix, blocked so that almost all
arithmetic happens in dense GEMMs.

Both COMQ coordinate sweeps and the error-feedback start (GPTQ-style nearest-plane
rounding) visit the columns of W in some order and, for every column j, do:

    target  = T[:, j]                      (current best continuous value)
    q       = nearest grid code of target
    d       = new value - base[:, j]       (how far the column moved)
    T[:, c] -= d * M[j, c]                 for every column c visited later

Only the coupling matrix ``M`` differs:

* COMQ sweep on the Gram form: ``T = Wq + R / diag(H)`` with ``R = (W - Wq) H``,
  ``base = Wq`` and ``M[j, c] = H[j, c] / H[c, c]``.  ``T[:, j]`` is exactly the
  closed-form minimiser ``w_kj + R_kj / H_jj`` of the reference code (R taken
  without column j), so this is the COMQ update, only reorganised.
* Error feedback: ``T`` is the progressively corrected weight, ``base = T`` and
  ``M = -U / diag(U)`` with ``U`` the upper Cholesky factor of ``H^-1``.

Updating ``T`` column by column costs ``out x in`` per column (1000x a GEMM on a
ViT-B MLP layer).  As GPTQ does, the pass works on blocks: rank-1 updates stay
inside a small inner block, an inner block's moves are pushed to the rest of its
outer block with one small GEMM, and an outer block's moves to every later column
with one large GEMM.  The result is identical to the column-by-column loop up to
floating point summation order.
"""

from __future__ import annotations

import torch

from .grid import quantize_to_codes


def blocked_rounding_pass(
    targets_t: torch.Tensor,
    coupling: torch.Tensor,
    scale_t: torch.Tensor,
    zero_t: torch.Tensor,
    max_code: int,
    base_t: torch.Tensor | None = None,
    block_size: int = 128,
    inner_block_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round columns in the given (already permuted) order.

    All matrices are *transposed* (``in x out``): one column of the weight is then
    a contiguous row, which makes every per-column operation a fast vector op.
    ``targets_t`` is updated in place for columns not yet visited.  Returns the
    codes and the dequantized values, both ``in x out``.
    """
    n_cols = targets_t.shape[0]
    codes_t = torch.empty_like(targets_t)
    values_t = torch.empty_like(targets_t)
    for b0 in range(0, n_cols, block_size):
        b1 = min(b0 + block_size, n_cols)
        moves = torch.empty((b1 - b0, targets_t.shape[1]), dtype=targets_t.dtype, device=targets_t.device)
        for i0 in range(b0, b1, inner_block_size):
            i1 = min(i0 + inner_block_size, b1)
            for j in range(i0, i1):
                target = targets_t[j]
                code = quantize_to_codes(target, scale_t[j], zero_t[j], max_code)
                value = (code - zero_t[j]) * scale_t[j]
                codes_t[j] = code
                values_t[j] = value
                move = value - (target if base_t is None else base_t[j])
                moves[j - b0] = move
                if j + 1 < i1:
                    targets_t[j + 1 : i1].addcmul_(coupling[j, j + 1 : i1].unsqueeze(1), move.unsqueeze(0), value=-1.0)
            if i1 < b1:
                targets_t[i1:b1].addmm_(coupling[i0:i1, i1:b1].T, moves[i0 - b0 : i1 - b0], alpha=-1.0)
        if b1 < n_cols:
            targets_t[b1:].addmm_(coupling[b0:b1, b1:].T, moves, alpha=-1.0)
    return codes_t, values_t


def rowwise_order_sweep(
    hessian: torch.Tensor,
    hessian_diag_safe: torch.Tensor,
    residual: torch.Tensor,
    dequant: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    max_code: int,
    order: torch.Tensor,
    block_size: int,
) -> None:
    """One COMQ sweep where every row visits its columns in its own order.

    This is the reference code's greedy mode (each row sorted by
    ``|w_kj| * ||x_j||``).  Rows visit different columns at the same step, so the
    shared-order blocking does not apply; instead each block of steps gathers the
    ``block x block`` sub-Gram matrix of every row, runs the updates inside it, and
    propagates the block's moves to the full residual with one GEMM.  Costs about
    ``in / block_size`` GEMMs per sweep.  Updates ``residual``, ``dequant`` and
    ``codes`` (all ``out x in``) in place.
    """
    out_features, n_cols = residual.shape
    for b0 in range(0, n_cols, block_size):
        cols = order[:, b0 : b0 + block_size]
        width = cols.shape[1]
        sub_h = hessian[cols.unsqueeze(2), cols.unsqueeze(1)]  # out x width x width
        res_b = residual.gather(1, cols)
        deq_b = dequant.gather(1, cols)
        scale_b = scale.gather(1, cols)
        zero_b = zero.gather(1, cols)
        diag_b = hessian_diag_safe[cols]
        code_b = torch.empty_like(deq_b)
        moves = torch.empty_like(deq_b)
        for i in range(width):
            target = deq_b[:, i] + res_b[:, i] / diag_b[:, i]
            code = quantize_to_codes(target, scale_b[:, i], zero_b[:, i], max_code)
            value = (code - zero_b[:, i]) * scale_b[:, i]
            move = value - deq_b[:, i]
            code_b[:, i] = code
            deq_b[:, i] = value
            moves[:, i] = move
            if i + 1 < width:
                res_b[:, i + 1 :].addcmul_(sub_h[:, i, i + 1 :], move.unsqueeze(1), value=-1.0)
        dequant.scatter_(1, cols, deq_b)
        codes.scatter_(1, cols, code_b)
        dense_moves = torch.zeros_like(residual).scatter_(1, cols, moves)
        residual.addmm_(dense_moves, hessian, alpha=-1.0)
