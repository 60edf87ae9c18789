"""Cutting a long axis into spans whose temporaries fit a byte budget.

Several passes (Gram-matrix accumulation, the solver's H, the objective, the scale
refit and search, packing) work on a few rows at a time so that no layer-sized
temporary exists; they size their spans here, each with its own budget.
"""

from __future__ import annotations


def rows_fitting(budget_bytes: int, bytes_per_row: int, minimum: int = 1) -> int:
    """How many rows of ``bytes_per_row`` fit in ``budget_bytes``, never fewer than ``minimum``."""
    return max(minimum, budget_bytes // max(bytes_per_row, 1))


def spans(count: int, step: int) -> list[slice]:
    """Consecutive slices of ``step`` indices (the last one shorter) covering ``range(count)``."""
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]
