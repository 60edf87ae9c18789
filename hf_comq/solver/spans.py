"""Cutting a long axis into spans whose temporaries fit a byte budget.

Several passes (Gram-matrix accumulation, the solver's H, the objective, the scale
refit and search, packing) work on a few rows at a time so that no layer-sized
temporary exists; they size their spans here, each with its own budget.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SUM_BLOCK_ROWS = 256
"""Output rows per block where the per-row sums of an ``in x out`` table are taken a block
of rows at a time: a multiple of every SIMD width, so that each row is summed exactly as
in the whole table (a block of another width can round some rows' sums apart)."""


def rows_fitting(budget_bytes: int, bytes_per_row: int, minimum: int = 1) -> int:
    """How many rows of ``bytes_per_row`` fit in ``budget_bytes``, never fewer than ``minimum``."""
    return max(minimum, budget_bytes // max(bytes_per_row, 1))


def spans(count: int, step: int) -> list[slice]:
    """Consecutive slices of ``step`` indices (the last one shorter) covering ``range(count)``."""
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def row_totals_in_blocks(out_features: int, products: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """Column sums (one per output row) of the ``in x out`` table that ``products(rows)``
    forms :data:`SUM_BLOCK_ROWS` output rows at a time: no weight-sized temporary, and
    each row summed in the table's dtype in the same order as in the whole table."""
    return torch.cat([products(rows).sum(0) for rows in spans(out_features, SUM_BLOCK_ROWS)])
