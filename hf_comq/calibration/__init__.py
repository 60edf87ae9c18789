"""Calibration for COMQ during ``from_pretrained``, one module per concept.

* :mod:`.sources`: dataset names, paths and lists as ``datasets`` objects; the seeded subset.
* :mod:`.processors`: which processor, and images/texts through it.
* :mod:`.data`: ``COMQConfig.dataset`` as a re-iterable stream of model-input batches.
* :mod:`.blocks`: the model's repeated blocks, in forward order.
* :mod:`.hooks`: block-input capture and Gram-matrix (Hessian) hooks.
* :mod:`.placement`: devices, accelerate dispatch, CPU and disk offload.
* :mod:`.distributed`: what the ranks of a ``torch.distributed`` run agree on and exchange.
* :mod:`.sequential`: the block-sequential driver, :func:`quantize_model` (called by the
  quantizer's post-loading hook).
"""

from .blocks import BlockGroup, find_block_groups
from .data import CalibrationData, build_calibration_data, format_description
from .distributed import CalibrationGroupError, is_saving_rank, join_launcher_group, leave_launcher_group
from .sequential import calibration_mode, calibration_summary, quantize_model

__all__ = [
    "BlockGroup",
    "CalibrationData",
    "CalibrationGroupError",
    "build_calibration_data",
    "calibration_mode",
    "calibration_summary",
    "find_block_groups",
    "format_description",
    "is_saving_rank",
    "join_launcher_group",
    "leave_launcher_group",
    "quantize_model",
]
