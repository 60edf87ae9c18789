"""The COMQ algorithm core: pure torch, no transformers import.

The plain settings (:mod:`.options`: choices, ranges, defaults) import without torch;
the other names are imported on first access, so describing the settings (the
``hf-comq`` argument parser does) costs no torch import.
"""

from __future__ import annotations

import importlib
from typing import Any

from .options import (
    CLIP_WEIGHTS,
    MAX_START_GRIDS,
    ORDERS,
    REFERENCE_CODE,
    RIDGE_FROM_DATA,
    ROUND_TO_NEAREST,
    ROUND_TO_NEAREST_MODEL,
    START_POINTS,
    SUM_DTYPES,
)

_EXPORTS = {
    "SOLVER_DEFAULTS": ".comq",
    "QuantizedWeight": ".comq",
    "can_share_rows": ".comq",
    "comq_quantize": ".comq",
    "joined_shares": ".comq",
    "shared_rows": ".comq",
    "RowShare": ".shares",
    "layer_objective": ".comq",
    "widest_threaded_gemm": ".comq",
    "default_damp": ".options",
    "aims_at_full_precision": ".options",
    "aims_at_full_precision_by_default": ".options",
    "solves_in_stages_by_default": ".options",
    "Grid": ".grid",
    "minmax_grid": ".grid",
    "HessianAccumulator": ".hessian",
    "NonFiniteActivations": ".hessian",
    "TargetProductAccumulator": ".hessian",
    "fp_target_weight": ".target",
    "target_product": ".target",
    "target_product_from_outputs": ".target",
}

__all__ = sorted(
    [
        *_EXPORTS, "CLIP_WEIGHTS", "MAX_START_GRIDS", "ORDERS", "REFERENCE_CODE", "RIDGE_FROM_DATA", "ROUND_TO_NEAREST",
        "ROUND_TO_NEAREST_MODEL", "START_POINTS", "SUM_DTYPES",
    ]
)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
