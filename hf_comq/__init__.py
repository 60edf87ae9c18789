"""hf_comq: COMQ post-training quantization for Hugging Face Transformers.

``from_pretrained(..., quantization_config=COMQConfig(...))`` quantizes while loading:
``quant_method="comq"`` is registered with transformers the first time hf_comq's API
is used (any name below, or a ``COMQConfig`` being built), and right at ``import
hf_comq`` when transformers is already imported.  The checkpoints it saves are
compressed-tensors ``pack-quantized`` checkpoints, which plain transformers loads
without hf_comq; :func:`load_quantized` loads them with the quantized layers kept
packed in memory.

The public names are imported on first access: ``import hf_comq`` alone does not
import torch or transformers, so ``hf-comq --help`` and argument errors answer at
once.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

DISTRIBUTION = "hf_comq"
"""The name pip installs hf_comq under: its metadata gives the version and the home page a model card links."""

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "COMQConfig": ".config",
    "COMQHfQuantizer": ".quantizer",
    "COMQLinear": ".nn",
    "CheckpointError": ".checkpoint",
    "HessianAccumulator": ".solver",
    "QuantizedWeight": ".solver",
    "calibration_summary": ".calibration",
    "check_quantized_model": ".loading",
    "comq_quantize": ".solver",
    "layer_objective": ".solver",
    "load_quantized": ".loading",
    "register": ".registration",
    "replace_module": ".nn",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name on first access, registering ``"comq"`` with transformers on the way."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    importlib.import_module(".registration", __name__).register()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if "transformers" in sys.modules:  # already paid for: register now, as users of `import hf_comq` expect
    importlib.import_module(".registration", __name__).register()
