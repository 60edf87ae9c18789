"""The COMQ algorithm core: pure torch, no transformers import."""

from .comq import (
    CLIP_WEIGHTS,
    MAX_START_GRIDS,
    ORDERS,
    REFERENCE_CODE,
    ROUND_TO_NEAREST,
    SOLVER_DEFAULTS,
    QuantizedWeight,
    comq_quantize,
    default_damp,
    layer_objective,
)
from .grid import Grid, minmax_grid
from .hessian import HessianAccumulator
from .start import START_POINTS

__all__ = [
    "CLIP_WEIGHTS",
    "MAX_START_GRIDS",
    "ORDERS",
    "REFERENCE_CODE",
    "ROUND_TO_NEAREST",
    "SOLVER_DEFAULTS",
    "START_POINTS",
    "Grid",
    "HessianAccumulator",
    "QuantizedWeight",
    "comq_quantize",
    "default_damp",
    "layer_objective",
    "minmax_grid",
]
