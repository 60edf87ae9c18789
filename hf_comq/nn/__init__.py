"""Quantized modules: :class:`COMQLinear` and the helpers that install it in a model."""

from .quant_linear import (
    BUFFER_NAMES,
    COMQLinear,
    get_linear_weight,
    is_linear_like,
    linear_shape,
    replace_module,
    set_submodule,
)

__all__ = [
    "BUFFER_NAMES",
    "COMQLinear",
    "get_linear_weight",
    "is_linear_like",
    "linear_shape",
    "replace_module",
    "set_submodule",
]
