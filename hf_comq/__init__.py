"""hf_comq: COMQ post-training quantization for Hugging Face Transformers."""

from .solver import HessianAccumulator, QuantizedWeight, comq_quantize, layer_objective

__version__ = "0.1.0"

__all__ = ["HessianAccumulator", "QuantizedWeight", "comq_quantize", "layer_objective", "__version__"]
