"""Column-by-column rounding passes over a weight matrix, blocked so that almost all
arithmetic happens in dense GEMMs.

Both COMQ coordinate sweeps and the error-feedback start (GPTQ-style nearest-plane
rounding) visit the columns of W in some order and, for every column j, round a
target value to the grid and push the change to the columns still to come:

* COMQ sweep (:func:`coordinate_sweep`), Gram form: the state is the residual
  ``R = (W - Wq) H``; the target of column j is ``wq_j + R_j / H_jj``, exactly the
  reference code's closed form ``w_kj + <x_j, U_k> / ||x_j||^2`` with the residual
  ``U`` taken without column j.  Moving ``wq_j`` by ``d`` changes ``R`` by
  ``-d * H[j, :]``.
* Error feedback (:func:`error_feedback_pass`): the state is the progressively
  corrected weight, the target is the state itself, and a rounding error ``d`` on
  column j corrects later columns by ``d * U[j, c] / U[j, j]`` with ``U`` the upper
  Cholesky factor of the damped ``H^-1``.

Updating the state column by column would cost ``out x in`` per column (about
1000x a GEMM on a ViT-B MLP layer).  As GPTQ does, the passes work on blocks:
rank-1 updates stay inside a small inner block, an inner block's moves are pushed to
the rest of its outer block with one small GEMM, and an outer block's moves to the
remaining columns with one large GEMM.  Results equal the column-by-column loop up
to floating point summation order.

All matrices here are *transposed* (``in x out``): one weight column is then one
contiguous row, which makes every per-column operation a fast vector op.
"""

from __future__ import annotations

import torch

from ..kernels.gemm import add_matmul_
from ..kernels.solver_ops import compiled_solver_ops
from ..threads import single_thread, threads_for
from .grid import ColumnGrid


def _round_column(
    target: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    max_code: int,
    code_out: torch.Tensor,
) -> torch.Tensor:
    """Write the nearest grid code of ``target`` into ``code_out``; return its value."""
    torch.div(target, scale, out=code_out)
    code_out.round_().add_(zero).clamp_(0, max_code)
    return (code_out - zero).mul_(scale)


def coordinate_sweep(
    residual_t: torch.Tensor,
    dequant_t: torch.Tensor,
    codes_t: torch.Tensor,
    hessian: torch.Tensor,
    inv_diag: list[float],
    grid: ColumnGrid,
    max_code: int,
    block_size: int = 128,
    inner_block_size: int = 16,
) -> None:
    """One COMQ sweep over all columns in index order, updated in place.

    ``residual_t = H (W - Wq)^T`` stays exact for every column after the sweep (one
    GEMM per outer block touches all columns), so the caller gets the objective for
    free.  ``inv_diag[j]`` is ``1 / H_jj`` (0 for dead inputs, which then keep
    their current value: they do not affect the objective).

    The loop works in code units, ``target = q + R_j / (H_jj * scale)``, which is
    the closed form divided by the scale, and ``dequant_t`` is rebuilt once at the
    end.  With a per-channel grid (every column of a row shares one scale) the block's
    local residual is kept in code units too: the scale then cancels from every
    rank-1 update, which saves the per-column rescaling; only the move pushed to the
    columns outside the block is scaled, once per block.  ``codes_t`` may hold
    fractional codes on entry (the full-precision start, ``w / scale + zero``);
    every visited coordinate leaves on the grid.  Each outer block's columns run in
    the compiled kernel where it applies (:mod:`hf_comq.kernels.solver_ops`, the
    same arithmetic up to fused multiply-adds), else in :func:`_sweep_block`.
    """
    n_cols = residual_t.shape[0]
    per_channel = grid.per_channel
    if per_channel:
        scale_row = grid.scale[0]
        inv_scale_row = scale_row.reciprocal()
        scale_table = inv_scale_table = None
    else:
        scale_table, inv_scale_table = grid.scale, grid.scale.reciprocal()
    ops = compiled_solver_ops([residual_t, codes_t, scale_table, inv_scale_table], hessian)
    if ops is not None:
        inv_diag_t = torch.tensor(inv_diag, dtype=torch.float64)
        group_of = None if per_channel else grid.group_index(residual_t.device)
    elif not per_channel:  # each column's rows of scales and their inverses, as views
        inv_scale_rows = ColumnGrid(inv_scale_table, grid.zero, grid.groups).rows()[0]
        scale_rows = grid.rows()[0]
    # One buffer pair for every block: a fresh block-sized tensor per block costs
    # page faults comparable to the block's vector work.
    local_buffer = torch.empty_like(residual_t[:block_size])
    moves_buffer = torch.empty_like(local_buffer)
    for b0 in range(0, n_cols, block_size):
        b1 = min(b0 + block_size, n_cols)
        with single_thread():  # per-column vector work: a thread pool only adds barrier waits
            local, moves = local_buffer[: b1 - b0], moves_buffer[: b1 - b0]
            if per_channel:
                torch.mul(residual_t[b0:b1], inv_scale_row, out=local)
            else:
                local.copy_(residual_t[b0:b1])
            if ops is not None:
                ops.sweep_block(
                    local, codes_t[b0:b1], moves, hessian[b0:b1, b0:b1], inv_diag_t[b0:b1], inv_scale_table, scale_table,
                    None if group_of is None else group_of[b0:b1], max_code, inner_block_size,
                )  # fmt: skip
            else:
                rows = None if per_channel else (inv_scale_rows[b0:b1], scale_rows[b0:b1])
                _sweep_block(
                    local, moves, codes_t[b0:b1], hessian[b0:b1, b0:b1], inv_diag[b0:b1], rows, max_code,
                    inner_block_size,
                )  # fmt: skip
            if per_channel:
                moves.mul_(scale_row)
        with threads_for(2.0 * moves.numel() * n_cols):
            add_matmul_(residual_t, hessian[b0:b1].T, moves, alpha=-1.0)
    # ``code + (round(target) - code)`` is exact for integer codes; from the
    # fractional full-precision start it can be an ulp off the integer.
    codes_t.round_()
    grid.dequantize(codes_t, out=dequant_t)


def _sweep_block(
    local: torch.Tensor,
    moves: torch.Tensor,
    codes_t: torch.Tensor,
    hessian_block: torch.Tensor,
    inv_diag: list[float],
    group_rows: tuple[list[torch.Tensor], list[torch.Tensor]] | None,
    max_code: int,
    inner_block_size: int,
) -> None:
    """One outer block of :func:`coordinate_sweep` in torch: each column rounded, its move
    pushed to the block's later columns (rank-1 updates inside an inner block, one small
    GEMM past it).  ``group_rows``: each column's rows of inverse scales and of scales
    with a group-wise grid; ``None`` for a per-channel grid, whose moves stay in code units."""
    n_cols = local.shape[0]
    # Row views made once (``unbind``): indexing a tensor per column costs more
    # Python-side time than the arithmetic on it.
    codes, h_rows = codes_t.unbind(0), hessian_block.unbind(0)
    local_rows, move_rows = local.unbind(0), moves.unbind(0)
    per_channel = group_rows is None
    if not per_channel:
        inv_scales, scales = group_rows
    for i0 in range(0, n_cols, inner_block_size):
        i1 = min(i0 + inner_block_size, n_cols)
        for j in range(i0, i1):
            code, move = codes[j], move_rows[j]
            if per_channel:
                torch.add(code, local_rows[j], alpha=inv_diag[j], out=move)
            else:
                torch.addcmul(code, local_rows[j], inv_scales[j], value=inv_diag[j], out=move)
            move.round_().clamp_(0, max_code).sub_(code)  # the move, in code units
            code.add_(move)
            if not per_channel:
                move.mul_(scales[j])
            if j + 1 < i1:
                local[j + 1 : i1].addr_(h_rows[j][j + 1 : i1], move, alpha=-1.0)
        if i1 < n_cols:
            local[i1:].addmm_(hessian_block[i0:i1, i1:].T, moves[i0:i1], alpha=-1.0)


def error_feedback_pass(
    state_t: torch.Tensor,
    coupling: torch.Tensor,
    move_weight: torch.Tensor,
    max_code: int,
    grid: ColumnGrid | None = None,
    block_size: int = 128,
    inner_block_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round columns in index order, feeding each rounding error forward.

    ``state_t`` (the weight, transposed) is consumed: later rows are corrected in
    place.  ``coupling[j, c]`` is how much of column j's move is subtracted from
    column c > j.  Returns the codes (``in x out``: ``state_t`` itself, each of
    its rows overwritten by its column's codes once rounded; a separate code table
    would be a fresh state-sized allocation, paid for in page faults) and, per output row,
    ``sum_j move_weight[j] * move_j**2`` in the state's units: with
    ``move_weight = 1 / U_jj**2`` that is the row's objective under the damped H,
    for the price of one matrix-vector product per block (GPTQ's "losses").

    Without ``grid`` the state is in code units, ``w / scale + zero``:
    valid when every column of a row shares one scale (per-channel grids), since
    the scale then cancels from the feedback, and rounding a column and taking its
    move is round, clip, subtract: three vector ops instead of seven (plus the
    copy into the state).  With it,
    the state is in weight units and each column is rounded on its own grid
    (group-wise scales).  Each outer block's columns run in the compiled kernel where
    it applies (:mod:`hf_comq.kernels.solver_ops`), else in :func:`_feedback_block`.
    """
    n_cols = state_t.shape[0]
    row_loss = torch.zeros(state_t.shape[1], dtype=state_t.dtype, device=state_t.device)
    scale_table, zero_table = (None, None) if grid is None else (grid.scale, grid.zero)
    ops = compiled_solver_ops([state_t, scale_table, zero_table], coupling)
    group_of = grid.group_index(state_t.device) if ops is not None and grid is not None else None
    moves_buffer = torch.empty_like(state_t[:block_size])  # reused: fresh blocks cost page faults
    for b0 in range(0, n_cols, block_size):
        b1 = min(b0 + block_size, n_cols)
        moves = moves_buffer[: b1 - b0]
        with single_thread():  # per-column vector work: a thread pool only adds barrier waits
            if ops is not None:
                ops.feedback_block(
                    state_t[b0:b1], moves, coupling[b0:b1, b0:b1], scale_table, zero_table,
                    None if group_of is None else group_of[b0:b1], max_code, inner_block_size,
                )  # fmt: skip
            else:
                block_grid = None if grid is None else grid.columns(b0, b1)
                _feedback_block(state_t[b0:b1], moves, coupling[b0:b1, b0:b1], block_grid, max_code, inner_block_size)
        if b1 < n_cols:
            with threads_for(2.0 * moves.numel() * (n_cols - b1)):
                add_matmul_(state_t[b1:], coupling[b0:b1, b1:].T, moves, alpha=-1.0)
        row_loss.addmv_(moves.square_().T, move_weight[b0:b1])
    return state_t, row_loss


def _feedback_block(
    state_t: torch.Tensor,
    moves: torch.Tensor,
    coupling_block: torch.Tensor,
    grid: ColumnGrid | None,
    max_code: int,
    inner_block_size: int,
) -> None:
    """One outer block of :func:`error_feedback_pass` in torch: each column rounded (its row
    of ``state_t`` overwritten by its codes), its move pushed to the block's later columns."""
    n_cols = state_t.shape[0]
    states, coupling_rows, move_rows = state_t.unbind(0), coupling_block.unbind(0), moves.unbind(0)
    code = torch.empty_like(state_t[0])
    if grid is not None:
        scales, zeros = grid.rows()
    for i0 in range(0, n_cols, inner_block_size):
        i1 = min(i0 + inner_block_size, n_cols)
        for j in range(i0, i1):
            state, move = states[j], move_rows[j]
            if grid is not None:
                torch.div(state, scales[j], out=code).round_().add_(zeros[j]).clamp_(0, max_code)
                torch.sub(code, zeros[j], out=move).mul_(scales[j]).sub_(state)
            else:
                torch.round(state, out=code).clamp_(0, max_code)
                torch.sub(code, state, out=move)
            state.copy_(code)  # column j is final: its row now holds the codes
            if j + 1 < i1:
                state_t[j + 1 : i1].addr_(coupling_rows[j][j + 1 : i1], move, alpha=-1.0)
        if i1 < n_cols:
            state_t[i1:].addmm_(coupling_block[i0:i1, i1:].T, moves[i0:i1], alpha=-1.0)


def rowwise_order_sweep(
    residual_t: torch.Tensor,
    dequant_t: torch.Tensor,
    codes_t: torch.Tensor,
    hessian: torch.Tensor,
    diag_safe: torch.Tensor,
    scale_t: torch.Tensor,
    zero_t: torch.Tensor,
    max_code: int,
    order_t: torch.Tensor,
    block_size: int,
) -> None:
    """One COMQ sweep where every row visits the columns in its own order.

    This is the reference code's greedy mode (``order_t[i, k]`` is the i-th column
    row k visits).  Rows visit different columns at the same step, so each block of
    steps gathers every row's ``block x block`` sub-Gram matrix, runs the updates
    inside it, and pushes the block's moves to the full residual with one dense
    GEMM: about ``in / block_size`` GEMMs per sweep.  Dead inputs must have
    ``diag_safe == 1`` (their residual is 0, so they keep their value).
    """
    n_cols = residual_t.shape[0]
    for b0 in range(0, n_cols, block_size):
        cols = order_t[b0 : b0 + block_size]
        width = cols.shape[0]
        sub_h = hessian[cols.unsqueeze(1), cols.unsqueeze(0)]  # width x width x out
        local = residual_t.gather(0, cols)
        deq = dequant_t.gather(0, cols)
        scale = scale_t.gather(0, cols)
        zero = zero_t.gather(0, cols)
        diag = diag_safe[cols]
        codes = torch.empty_like(deq)
        moves = torch.empty_like(deq)
        with single_thread():  # per-column vector work: a thread pool only adds barrier waits
            for i in range(width):
                target = deq[i] + local[i] / diag[i]
                value = _round_column(target, scale[i], zero[i], max_code, codes[i])
                torch.sub(value, deq[i], out=moves[i])
                deq[i] = value
                if i + 1 < width:
                    local[i + 1 :].addcmul_(sub_h[i, i + 1 :], moves[i].unsqueeze(0), value=-1.0)
        dequant_t.scatter_(0, cols, deq)
        codes_t.scatter_(0, cols, codes)
        with threads_for(2.0 * residual_t.numel() * n_cols):
            add_matmul_(residual_t, hessian, torch.zeros_like(residual_t).scatter_(0, cols, moves), alpha=-1.0)
