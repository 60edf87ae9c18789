"""The solver's compiled loops (``csrc/column_passes.cpp``, ``csrc/pair_moves*``, ``csrc/clip_search*``), where they apply.

:mod:`hf_comq.solver.passes` rounds a weight column by column; per outer block it
hands that inner loop to :func:`compiled_solver_ops`' ops when the tensors are
float32 on CPU, and runs its own torch loop otherwise (GPU, float64, the kernel
disabled with ``HF_COMQ_DISABLE_KERNEL=1`` or not built).  :mod:`hf_comq.solver.pair_moves`
does the same with its whole pass, :func:`hf_comq.solver.grid.search_shrink` with
its error table, and :meth:`hf_comq.solver.grid.ColumnGrid.dequantize` with a group-wise
grid's values.  Both paths run the same float32 arithmetic in the
same order; torch may fuse a multiply-add the kernel rounds twice, so now and then a
code rounds the other way (or a pair move breaks a tie the other way) and the two paths'
checkpoints differ in a few codes, with the same objective to a few parts in a million.
Every process of one machine takes the same path, so a run is reproducible on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .build import kernel_disabled, load_kernel


def compiled_solver_ops(rows: Sequence[torch.Tensor | None], square: torch.Tensor | None = None) -> Any | None:
    """The ``torch.ops.hf_comq_cpu`` namespace if its solver loops can run on these tensors, else ``None``.

    ``rows``: the tables read row by row (state, codes, grid tables; ``None`` entries
    are absent tables), which must be float32 CPU tensors with contiguous rows;
    ``square``: the Hessian or coupling matrix, float32 on CPU in any layout, where the
    op reads one.  The first call in a process may build the extension (see
    :mod:`hf_comq.kernels.build`).
    """
    if kernel_disabled() or torch.compiler.is_compiling():
        return None
    tables = [table for table in rows if table is not None]
    if not all(_on_cpu_in_float32(tensor) for tensor in [*tables, *([] if square is None else [square])]):
        return None
    if not all(table.dim() == 2 and table.stride(1) == 1 for table in tables):
        return None
    return load_kernel()


def _on_cpu_in_float32(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32
