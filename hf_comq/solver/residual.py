"""Keeping the residual ``R = H (W - Wq)^T`` exact when only some output rows move.

The residual is an ``in x out`` table: one column per output row.  Moves that touch a
few rows (a re-solved block's better rows, the pair moves' movers) update those
columns alone; the update must not cost a pass over the whole table.
"""

from __future__ import annotations

import torch


def subtract_at_rows(residual_t: torch.Tensor, rows: torch.Tensor, change: torch.Tensor) -> None:
    """``residual_t[:, rows] -= change`` for distinct ``rows``, in place.

    Gathering the columns, subtracting and writing them back gives the same values as
    ``index_add_(1, rows, change, alpha=-1)``, but that scatters one strided column
    at a time and is several times slower on a row-major table.
    """
    residual_t.index_copy_(1, rows, residual_t.index_select(1, rows).sub_(change))
