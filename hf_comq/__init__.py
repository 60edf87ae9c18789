"""hf_comq: COMQ post-training quantization for Hugging Face Transformers.

Importing this package registers ``quant_method="comq"`` with transformers, so
``from_pretrained(..., quantization_config=COMQConfig(...))`` quantizes while loading.
The checkpoints it saves are compressed-tensors ``pack-quantized`` checkpoints, which
plain transformers loads without hf_comq; :func:`load_quantized` loads them with the
quantized layers kept packed in memory.
"""

from importlib.metadata import PackageNotFoundError, version

from .solver import HessianAccumulator, QuantizedWeight, comq_quantize, layer_objective
from .config import COMQConfig
from .nn import COMQLinear, replace_module
from .checkpoint import CheckpointError
from .quantizer import COMQHfQuantizer
from .registration import register
from .loading import check_quantized_model, load_quantized

register()

try:
    __version__ = version("hf_comq")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

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
