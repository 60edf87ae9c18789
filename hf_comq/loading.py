"""``load_quantized``: load a COMQ checkpoint and refuse to hand back a broken model.

Why this exists: transformers has no plugin discovery.  Calling
``AutoModel.from_pretrained(path)`` on a COMQ checkpoint *without* ``import hf_comq``
only logs "Unknown quantization type", loads the plain architecture, reports the
packed tensors as unexpected and initialises every quantized ``nn.Linear`` with
random weights -- no exception.  ``load_quantized`` imports and registers the
plugin itself, checks that the folder really is a COMQ checkpoint, and verifies the
loaded model (:func:`hf_comq.quantizer.verify_quantized_model`).  For a model that
was loaded some other way, :func:`check_quantized_model` runs the same checks.
"""

from __future__ import annotations

import os
from typing import Any

import transformers
from transformers import PreTrainedConfig, PreTrainedModel

from .config import QUANT_METHOD, COMQConfig
from .nn.quant_linear import BUFFER_NAMES
from .quantizer import CheckpointError, verify_quantized_model
from .registration import register

_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "force_download", "proxies")


def read_quantization_config(path: str | os.PathLike, **hub_kwargs: Any) -> COMQConfig:
    """The :class:`COMQConfig` stored in ``path``'s ``config.json``; raises if it is not a COMQ checkpoint."""
    config_dict, _ = PreTrainedConfig.get_config_dict(str(path), **hub_kwargs)
    stored = config_dict.get("quantization_config")
    if not isinstance(stored, dict) or stored.get("quant_method") != QUANT_METHOD:
        found = stored.get("quant_method") if isinstance(stored, dict) else None
        raise CheckpointError(
            f"{path} is not a COMQ checkpoint: config.json has "
            + (f"quant_method={found!r}" if found else "no quantization_config")
            + "; load it with from_pretrained (with quantization_config=COMQConfig(...) to quantize it)"
        )
    return COMQConfig.from_dict(stored)


def load_quantized(
    path: str | os.PathLike,
    *,
    model_class: type[PreTrainedModel] | None = None,
    quantization_config: COMQConfig | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a COMQ checkpoint (local folder or Hub id) and verify every quantized layer.

    Args:
        path: folder or repo id written by ``save_pretrained`` / ``push_to_hub``.
        model_class: class to load with; default: the first of ``config.json``'s
            ``architectures`` (falling back to ``AutoModel``).
        quantization_config: optional; if given, its ``bits`` / ``group_size`` /
            ``symmetric`` must equal the checkpoint's, else ``CheckpointError`` (plain
            ``from_pretrained`` would silently use the checkpoint's and only warn).
        **kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ``revision``...).

    Raises:
        CheckpointError: not a COMQ checkpoint, config mismatch, or packed tensors
            missing / of the wrong shape / left over.
    """
    register()
    hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
    stored = read_quantization_config(path, **hub_kwargs)
    if quantization_config is not None:
        _check_same_format(stored, quantization_config)
    cls = model_class or _model_class_for(path, hub_kwargs)
    want_info = kwargs.pop("output_loading_info", False)
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    _check_loading_info(info)
    check_quantized_model(model)
    return (model, info) if want_info else model


def check_quantized_model(model: PreTrainedModel) -> None:
    """Raise unless ``model`` is a correctly loaded COMQ model.

    Use after loading a COMQ checkpoint by other means: it catches the silent case
    where ``hf_comq`` was not imported and the linear layers are random.
    """
    stored = getattr(model.config, "quantization_config", None)
    if isinstance(stored, dict):
        if stored.get("quant_method") != QUANT_METHOD:
            raise CheckpointError("the model's quantization_config is not a COMQ config")
        stored = COMQConfig.from_dict(stored)
    if not isinstance(stored, COMQConfig):
        raise CheckpointError("the model has no COMQ quantization_config; it is not a COMQ model")
    verify_quantized_model(model, stored)


def _check_same_format(stored: COMQConfig, requested: COMQConfig) -> None:
    if not isinstance(requested, COMQConfig):
        raise CheckpointError(
            f"quantization_config: expected a COMQConfig for a COMQ checkpoint, got {type(requested).__name__}"
        )
    differences = stored.format_mismatches(requested)
    if differences:
        listed = ", ".join(f"{name}: checkpoint {mine!r} vs passed {theirs!r}" for name, (mine, theirs) in differences.items())
        raise CheckpointError(
            f"the COMQConfig passed does not match the checkpoint ({listed}); a pre-quantized checkpoint is "
            "loaded with the settings it was saved with -- pass no quantization_config, or re-quantize the "
            "full-precision model to change them"
        )


def _check_loading_info(info: dict) -> None:
    """Packed tensors the model did not take (or took with another shape) mean a config/checkpoint mismatch."""
    packed = tuple(f".{name}" for name in BUFFER_NAMES)
    unexpected = sorted(key for key in info.get("unexpected_keys", ()) if key.endswith(packed))
    if unexpected:
        raise CheckpointError(
            f"checkpoint tensors {unexpected[:5]} were not loaded: the layers they belong to are not quantized "
            "in this model (modules_to_not_convert in config.json does not match the checkpoint)"
        )
    missing = sorted(key for key in info.get("missing_keys", ()) if key.endswith(packed))
    if missing:
        raise CheckpointError(f"checkpoint is missing the packed tensors {missing[:5]}")
    mismatched = [str(item) for item in info.get("mismatched_keys", ())]
    if mismatched:
        raise CheckpointError(f"checkpoint tensors have the wrong shape: {mismatched[:5]}")


def _model_class_for(path: str | os.PathLike, hub_kwargs: dict) -> type[PreTrainedModel]:
    config_dict, _ = PreTrainedConfig.get_config_dict(str(path), **hub_kwargs)
    for name in config_dict.get("architectures") or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return transformers.AutoModel
