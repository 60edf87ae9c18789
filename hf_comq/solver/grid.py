"""Uniform integer quantization grids: per output channel or per (channel, group).

A grid maps an integer code ``q`` in ``[0, 2**bits - 1]`` to the real value
``scale * (q - zero_point)``.  Symmetric grids are the same thing with the zero
point fixed at ``2**(bits-1)``, so every consumer (solver, packing, the quantized
module) handles one representation only.

The scale and zero point are stored per (row, group) with shape ``(out, n_groups)``;
per-channel quantization is simply ``n_groups == 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.solver_ops import compiled_solver_ops
from ..threads import threads_for_rows
from .spans import rows_fitting, spans

SEARCH_CHUNK_ELEMENTS = 1 << 17  # 512 KiB of float32 per buffer


@dataclass
class Grid:
    """Scale and integer zero point for every (row, group) of a weight matrix."""

    scale: torch.Tensor  # (out, n_groups), float32/float64, strictly positive
    zero_point: torch.Tensor  # (out, n_groups), integer values stored as float
    bits: int
    group_size: int  # columns per group; equals in_features for per-channel grids

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    def rows(self, rows: slice) -> "Grid":
        """The grid of a slice of output rows (views of this one's tables)."""
        return Grid(self.scale[rows], self.zero_point[rows], self.bits, self.group_size)

    def per_column(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point expanded to the weight's (out, in) shape.

        The coordinate sweeps index single columns, so expanding once up front
        is far cheaper than looking up the group of every column inside the loop.
        """
        scale = self.scale.repeat_interleave(self.group_size, dim=1)
        zero = self.zero_point.repeat_interleave(self.group_size, dim=1)
        return scale, zero


@dataclass(frozen=True)
class ColumnGrid:
    """A grid as the column-by-column passes see it, for a transposed ``in x width``
    table (``width`` may stack several grids side by side).

    A pass needs, for column j, one row of scales and zero points across the
    table's width.  All columns of a group share that row, so it is stored once per
    group and looked up through ``groups``: a per-column table would be ``in /
    n_groups`` times larger, cost a page-faulting copy to build, and bring every
    column's row in from memory instead of from cache.
    """

    scale: torch.Tensor  # (n_groups, width)
    zero: torch.Tensor  # (n_groups, width), integer values stored as float
    groups: list[int]  # the group of each column, in the passes' column order

    @classmethod
    def of(cls, grids: list[Grid], groups: list[int]) -> "ColumnGrid":
        """The grids stacked side by side along the width (one grid: just its rows)."""
        return cls(
            scale=torch.cat([grid.scale.T for grid in grids], dim=1).contiguous(),
            zero=torch.cat([grid.zero_point.T for grid in grids], dim=1).contiguous(),
            groups=groups,
        )

    @property
    def per_channel(self) -> bool:
        """One scale per output row: the passes can then work in code units."""
        return self.scale.shape[0] == 1

    def rows(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per column, its row of scales and its row of zero points (views)."""
        scale_rows, zero_rows = self.scale.unbind(0), self.zero.unbind(0)
        return [scale_rows[g] for g in self.groups], [zero_rows[g] for g in self.groups]

    def group_index(self, device: torch.device) -> torch.Tensor:
        """Each column's group as an int64 tensor (what a gather or a compiled pass reads)."""
        return torch.tensor(self.groups, dtype=torch.long, device=device)

    def columns(self, start: int, stop: int) -> "ColumnGrid":
        return ColumnGrid(self.scale, self.zero, self.groups[start:stop])

    def permuted(self, perm: torch.Tensor) -> "ColumnGrid":
        return ColumnGrid(self.scale, self.zero, [self.groups[j] for j in perm.tolist()])

    def dequantize(self, codes_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``scale * (codes - zero)`` of an ``in x width`` code table, written into ``out``."""
        if self.per_channel:
            return torch.sub(codes_t, self.zero[0], out=out).mul_(self.scale[0])
        groups = self.group_index(codes_t.device)
        ops = compiled_solver_ops([codes_t, out, self.scale, self.zero])
        if ops is not None:  # one pass, the same roundings
            ops.dequantize_columns(codes_t, self.scale, self.zero, groups, out)
            return out
        # Group by group (a handful of gathers), not column by column: per-column
        # vector ops cost more in dispatch than in arithmetic on small layers.
        for g in range(self.scale.shape[0]):
            columns = torch.nonzero(groups == g).squeeze(1)
            if columns.numel():
                out.index_copy_(0, columns, codes_t.index_select(0, columns).sub_(self.zero[g]).mul_(self.scale[g]))
        return out


def minmax_grid(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    shrink: torch.Tensor | float = 1.0,
) -> Grid:
    """Min-max grid of each (row, group), optionally shrunk towards zero.

    The range always contains 0 (as in GPTQ and the COMQ reference code), so an
    all-zero row is represented exactly.  ``shrink`` scales the range: a float for
    all groups (the reference code's ``scalar``), or an ``(out, n_groups)`` tensor
    as produced by :func:`search_shrink`.
    """
    w_min, w_max = _group_range(weight, group_size)
    return _grid_from_range(w_min, w_max, bits, group_size, symmetric, shrink)


def _group_range(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) minimum and maximum, widened to contain 0."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // group_size, group_size)
    return groups.amin(dim=-1).clamp(max=0.0), groups.amax(dim=-1).clamp(min=0.0)


def _grid_from_range(
    w_min: torch.Tensor, w_max: torch.Tensor, bits: int, group_size: int, symmetric: bool, shrink: torch.Tensor | float
) -> Grid:
    max_code = (1 << bits) - 1
    if symmetric:
        absmax = torch.maximum(-w_min, w_max) * shrink
        absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        scale = 2.0 * absmax / max_code
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        w_min = w_min * shrink
        w_max = w_max * shrink
        dead = (w_max - w_min) <= 0
        w_min = torch.where(dead, -torch.ones_like(w_min), w_min)
        w_max = torch.where(dead, torch.ones_like(w_max), w_max)
        scale = (w_max - w_min) / max_code
        zero = torch.round(-w_min / scale).clamp(0, max_code)
    return Grid(scale=scale, zero_point=zero, bits=bits, group_size=group_size)


def column_table(values: torch.Tensor, group_of_column: torch.Tensor) -> torch.Tensor:
    """``(out, n_groups)`` grid values as an ``in x out`` per-column table, column j holding
    group ``group_of_column[j]``'s row; per-channel grids become a broadcast view instead
    of a copy."""
    if values.shape[1] == 1:
        return values.T.expand(group_of_column.numel(), values.shape[0])
    return values.T.contiguous().index_select(0, group_of_column)


def quantize_to_codes(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, max_code: int) -> torch.Tensor:
    """Nearest grid level of each value, as float-valued integer codes."""
    return torch.div(values, scale).round_().add_(zero).clamp_(0, max_code)  # in place: one temporary, not four


def clipping_errors(weight: torch.Tensor, col_weights: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
    """``errors[c, k, r, g]``: row ``r``'s group ``g`` rounded to the nearest point of ``grids[c]``,
    its squared error weighted column by column by ``col_weights[k]`` (``(k, in)``).

    On CPU in float32 the compiled pass (``hf_comq/kernels/csrc/clip_search_impl.h``) makes
    each group's sums as it rounds it, with no weight-sized temporaries; the same
    arithmetic, its sums added in its own order, so a near-tie between two clippings can
    go the other way than on the torch path below.
    """
    out_features, in_features = weight.shape
    n_groups = in_features // grids[0].group_size
    ops = compiled_solver_ops([weight, col_weights, *(grid.scale for grid in grids)])
    if ops is not None:
        scales = torch.stack([grid.scale for grid in grids])
        zeros = torch.stack([grid.zero_point for grid in grids])
        with threads_for_rows(out_features, in_features):  # independent rows: the pair-move pass's rule
            return ops.clip_errors(weight, col_weights, scales, zeros, grids[0].max_code)
    weights_g = weight.reshape(out_features, n_groups, -1)
    col_weights_g = col_weights.reshape(col_weights.shape[0], n_groups, -1)
    errors = torch.empty((len(grids), col_weights.shape[0], out_features, n_groups), dtype=weight.dtype, device=weight.device)
    # Row chunks small enough to stay in cache while every candidate is tried on them:
    # the search is a dozen elementwise passes per candidate, bound by memory traffic.
    for rows in spans(out_features, rows_fitting(SEARCH_CHUNK_ELEMENTS, in_features)):
        chunk = weights_g[rows]
        scaled, codes = torch.empty_like(chunk), torch.empty_like(chunk)
        for index, grid in enumerate(grids):
            scale = grid.scale[rows]
            # In grid units the rounding error is code - (w / scale + zero); it is
            # scaled back once per (row, group) instead of once per weight.
            torch.div(chunk, scale.unsqueeze(-1), out=scaled).add_(grid.zero_point[rows].unsqueeze(-1))
            offsets = torch.round(scaled, out=codes).clamp_(0, grid.max_code).sub_(scaled).square_()
            torch.mul(_weighted_sums(offsets, col_weights_g), scale.square(), out=errors[index, :, rows])
    return errors


def _weighted_sums(values: torch.Tensor, col_weights: torch.Tensor) -> torch.Tensor:
    """``out[k, r, g] = sum_s values[r, g, s] * col_weights[k, g, s]``: one small GEMM
    when there is a single group (per-channel grids, the common case)."""
    if values.shape[1] == 1:
        return (values.reshape(values.shape[0], -1) @ col_weights.reshape(col_weights.shape[0], -1).T).T.unsqueeze(2)
    return torch.einsum("rgs,kgs->krg", values, col_weights)


def search_shrink(
    weight: torch.Tensor,
    hessian_diag: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    candidates: int,
    min_shrink: float,
) -> torch.Tensor:
    """Per-(row, group) shrink factor of the min-max range minimising the
    diagonal-Hessian-weighted round-to-nearest error.

    ``hessian_diag`` may also be a ``(k, in)`` stack of column weightings: the
    rounding errors are the expensive part and are shared, so ``k`` searches cost
    about one, and the result is ``(k, out, n_groups)``.

    The full objective ``e H e^T`` would cost one GEMM per candidate; weighting by
    ``diag(H)`` (the input energy of each column) is elementwise and picks nearly
    the same clipping, and the coordinate sweeps that follow optimise against the
    full H anyway.  At 2 and 3 bits, clipping outliers is worth far more than the
    sweeps can recover on an over-wide grid.
    """
    stacked = hessian_diag.dim() == 2
    col_weights = hessian_diag.to(weight.dtype).reshape(-1, weight.shape[1]).contiguous()  # a diagonal view is strided
    w_min, w_max = _group_range(weight, group_size)
    ratios = torch.linspace(1.0, min_shrink, candidates).tolist()
    grids = [_grid_from_range(w_min, w_max, bits, group_size, symmetric, ratio) for ratio in ratios]
    errors = clipping_errors(weight, col_weights, grids)
    best = errors.argmin(dim=0)  # the first (widest) candidate wins ties
    factors = torch.tensor(ratios, dtype=weight.dtype, device=weight.device)[best]
    return factors if stacked else factors[0]
