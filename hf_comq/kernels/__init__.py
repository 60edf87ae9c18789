"""Compiled CPU kernels: the forward of packed quantized layers, and the solver's loops.

:func:`packed_linear` is the forward of a compressed-tensors ``pack-quantized`` linear
layer.  On CPU with fp32 activations it runs a compiled C++ kernel (built on first use,
cached by torch); everywhere else, or with ``HF_COMQ_DISABLE_KERNEL=1``, an exact torch
fallback.  The same extension runs the column-by-column loops of the solver's rounding
passes, its pair-move pass and its clipping search's error table
(:func:`compiled_solver_ops`), the same arithmetic as their torch code.  The solver's
dense products go through :mod:`.gemm`: oneDNN's float32 GEMM on CPU where torch ships it.
:func:`active_path` says which path is in use and why; :func:`build_ahead` takes a first
build's pause (announced in one log line) before a caller's progress bar rather than inside it.
"""

from .build import DISABLE_ENV_VAR, active_path, build_ahead
from .linear import check_float_input, dequantize_packed, packed_linear, refuse_trainable_scale
from .solver_ops import compiled_solver_ops

__all__ = [
    "DISABLE_ENV_VAR",
    "active_path",
    "build_ahead",
    "check_float_input",
    "compiled_solver_ops",
    "dequantize_packed",
    "packed_linear",
    "refuse_trainable_scale",
]
