"""Quantized modules: :class:`COMQLinear`, the helpers that install it in a model, and
:class:`UnfusedExperts`, a mixture-of-experts layer's experts as layers COMQLinear can replace."""

from .experts import ExpertMLP, UnfusedExperts, every_token_to_every_expert

from .quant_linear import (
    PACKED_TENSORS,
    COMQLinear,
    computes_linear_map,
    get_linear_weight,
    has_linear_shape,
    has_own_forward,
    is_linear_like,
    linear_shape,
    replace_module,
)

__all__ = [
    "PACKED_TENSORS",
    "COMQLinear",
    "ExpertMLP",
    "UnfusedExperts",
    "computes_linear_map",
    "every_token_to_every_expert",
    "get_linear_weight",
    "has_linear_shape",
    "has_own_forward",
    "is_linear_like",
    "linear_shape",
    "replace_module",
]
