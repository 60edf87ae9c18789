"""Inference kernels for packed quantized layers.

:func:`packed_linear` is the forward of a compressed-tensors ``pack-quantized`` linear
layer.  On CPU with fp32 activations it runs a compiled C++ kernel (built on first use,
cached by torch); everywhere else, or with ``HF_COMQ_DISABLE_KERNEL=1``, an exact torch
fallback.  :func:`active_path` says which one is in use and why.
"""

from .build import DISABLE_ENV_VAR, active_path
from .linear import dequantize_packed, packed_linear

__all__ = ["DISABLE_ENV_VAR", "active_path", "dequantize_packed", "packed_linear"]
