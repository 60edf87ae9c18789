"""hf_comq: COMQ post-training quantization for Hugging Face Transformers.

Importing this package registers ``quant_method="comq"`` with transformers, so
``from_pretrained(..., quantization_config=COMQConfig(...))`` quantizes and COMQ
checkpoints load.  Without the import transformers silently loads random weights
for the quantized layers: prefer :func:`load_quantized`, which cannot.
"""

from .solver import HessianAccumulator, QuantizedWeight, comq_quantize, layer_objective
from .config import COMQConfig
from .nn import COMQLinear, replace_module
from .quantizer import CheckpointError, COMQHfQuantizer
from .registration import register
from .loading import check_quantized_model, load_quantized

register()

__version__ = "0.1.0"

__all__ = [
    "COMQConfig",
    "COMQHfQuantizer",
    "COMQLinear",
    "CheckpointError",
    "HessianAccumulator",
    "QuantizedWeight",
    "check_quantized_model",
    "comq_quantize",
    "layer_objective",
    "load_quantized",
    "register",
    "replace_module",
    "__version__",
]
