"""One layer solved by several workers together (data-parallel ranks), each a share of its output rows.

Rows are independent in every step of a solve.  What a slice of rows decides together
is when its sweeps stop (its objective stalls, or no row is left that a sweep could
move) and whether a sweep gathers its few unsettled rows into tables of their own.  A
worker solving a share of each slice takes those decisions from sums over every
worker's share (:attr:`RowShare.total`), so each row goes through the steps it would go
through in one process, and the layer's ``stats`` are the whole layer's.  What can differ
is the rounding inside the products over fewer rows.

Shares start on multiples of :data:`SHARE_ALIGN` rows within a slice: the per-row sums
then take the same SIMD lanes as in the whole slice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

SHARE_ALIGN = 16
"""Rows per alignment step of a share's first row within its slice (a multiple of every SIMD width in float32)."""


@dataclass(frozen=True)
class RowShare:
    """This worker's place among ``count`` workers solving one layer, and how they add up numbers.

    ``total`` sums a list of numbers element by element over the workers, in float64, and returns
    the sums on every worker (an all-reduce); every worker must call it the same number of times,
    in the same order.
    ``out_features``: the whole layer's rows (the solver is handed this worker's only).
    """

    index: int
    count: int
    out_features: int
    total: Callable[[list[float]], list[float]]

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"a row share's index must be in [0, {self.count}), got {self.index}")


def share_bounds(rows: int, count: int) -> list[int]:
    """The ``count + 1`` bounds of ``count`` nearly equal shares of ``rows`` rows, inner ones on
    :data:`SHARE_ALIGN`; a share is empty where there are fewer aligned steps than workers."""
    steps = -(-rows // SHARE_ALIGN)
    return [min(rows, (steps * index // count) * SHARE_ALIGN) for index in range(count)] + [rows]


def part_of(span: slice, index: int, count: int) -> slice:
    """Worker ``index``'s rows of one slice ``span`` of a layer's rows (the layer's indices)."""
    bounds = share_bounds(span.stop - span.start, count)
    return slice(span.start + bounds[index], span.start + bounds[index + 1])
