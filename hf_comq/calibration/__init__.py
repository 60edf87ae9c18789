"""Calibration for COMQ during ``from_pretrained``: data, block discovery, block-sequential quantization.

Entry point: :func:`quantize_model` (called by the quantizer's post-loading hook).
"""

from .blocks import BlockGroup, find_block_groups
from .data import CalibrationData, build_calibration_data, format_description
from .sequential import quantize_model

__all__ = [
    "BlockGroup",
    "CalibrationData",
    "build_calibration_data",
    "find_block_groups",
    "format_description",
    "quantize_model",
]
