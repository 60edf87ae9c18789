"""``load_quantized``: load a compressed-tensors ``pack-quantized`` checkpoint with its layers kept packed.

A COMQ checkpoint loads anywhere compressed-tensors checkpoints load: plain
``AutoModel...from_pretrained(path)`` (with compressed-tensors installed) gives a model
with exact, dense, dequantized weights.  ``load_quantized`` gives the same outputs from
layers that stay packed in memory (:class:`hf_comq.nn.COMQLinear`, about an eighth of
the fp32 weight bytes at 4 bits), so the quantized model is also smaller when running.

It routes the checkpoint to hf_comq's quantizer by handing ``from_pretrained`` the
checkpoint's own configuration with the ``quantization_config`` tagged for hf_comq
(a public ``from_pretrained`` argument), then verifies every packed layer, because
transformers only logs missing or mismatching tensors.  Any producer's checkpoint
works when it is integer, weight-only and packed (e.g. llm-compressor's GPTQ W4A16).
"""

from __future__ import annotations

import os
from typing import Any

import transformers
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

from .checkpoint import PACKED_SUFFIXES, CheckpointError, is_packed_checkpoint, verify_quantized_model
from .config import QUANT_METHOD, COMQConfig
from .registration import register
from .settings import is_missing_local_path

_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "force_download", "proxies")


def read_quantization_config(path: str | os.PathLike, **hub_kwargs: Any) -> COMQConfig:
    """The :class:`COMQConfig` a checkpoint's ``config.json`` describes; raises unless it is pack-quantized."""
    config_dict, _ = PreTrainedConfig.get_config_dict(str(path), **hub_kwargs)
    if not is_packed_checkpoint(config_dict):
        stored = config_dict.get("quantization_config")
        found = stored.get("quant_method") if isinstance(stored, dict) else None
        raise CheckpointError(
            f"{path} is not a compressed-tensors pack-quantized checkpoint: config.json has "
            + (f"quant_method={found!r}" if found else "no quantization_config")
            + "; quantize it with from_pretrained(..., quantization_config=COMQConfig(...))"
        )
    return COMQConfig.from_dict(config_dict["quantization_config"])


def load_quantized(
    path: str | os.PathLike,
    *,
    model_class: type[PreTrainedModel] | None = None,
    quantization_config: COMQConfig | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a pack-quantized checkpoint (local folder or Hub id), layers kept packed, and verify it.

    Args:
        path: folder or repo id written by ``save_pretrained`` / ``push_to_hub``.
        model_class: class to load with; default: the first of ``config.json``'s
            ``architectures`` (falling back to ``AutoModel``).  Another class loads as in
            transformers (a classifier's checkpoint into its bare model, a causal LM's into a
            sequence classifier, T5's into ``T5EncoderModel``): the layers the checkpoint holds
            packed stay packed, the class's own new layers (a head) stay in float, to be
            initialised, and a re-save lists them as such.
        quantization_config: optional; if given, its ``bits`` / ``group_size`` /
            ``symmetric`` must equal the checkpoint's, else ``CheckpointError``.
        **kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ``revision``...).

    Raises:
        CheckpointError: not a pack-quantized checkpoint, config mismatch, or packed tensors
            missing / of the wrong shape / left over.
    """
    register()
    if "config" in kwargs:
        raise TypeError("load_quantized reads the checkpoint's own config; do not pass config=")
    if is_missing_local_path(path):
        raise FileNotFoundError(
            f"no checkpoint folder at {os.fspath(path)}: check the path (a Hub id is written owner/name)"
        )
    hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
    stored = read_quantization_config(path, **hub_kwargs)
    if quantization_config is not None:
        _check_same_format(stored, quantization_config)
    # a remote-code model's config class is its own code: reading it needs the same consent as its model
    trust = {"trust_remote_code": kwargs["trust_remote_code"]} if "trust_remote_code" in kwargs else {}
    config = AutoConfig.from_pretrained(str(path), **hub_kwargs, **trust)
    config.quantization_config = {**config.quantization_config, "quant_method": QUANT_METHOD}
    kwargs = _apply_config_overrides(config, kwargs)
    cls = model_class or _model_class_for(config)
    want_info = kwargs.pop("output_loading_info", False)
    model, info = cls.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    _check_loading_info(info, head_resized=bool(kwargs.get("ignore_mismatched_sizes")))
    check_quantized_model(model)
    return (model, info) if want_info else model


# Loading options of from_pretrained that are also config attributes: from_pretrained handles them itself.
_LOADING_OPTIONS = frozenset({"dtype", "torch_dtype", "attn_implementation", "experts_implementation", "device_map"})


def _apply_config_overrides(config: PreTrainedConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Set the keyword arguments that name config attributes (``use_cache=False``,
    ``output_hidden_states=True``) on ``config``; return the rest for ``from_pretrained``.

    ``from_pretrained`` applies such overrides to the config it loads itself; given
    ``config=``, as here, it would hand them to the model's ``__init__``, which rejects them.
    """
    rest = {}
    for key, value in kwargs.items():
        if key not in _LOADING_OPTIONS and key not in _HUB_KWARGS and hasattr(config, key):
            setattr(config, key, value)
        else:
            rest[key] = value
    return rest


def check_quantized_model(model: PreTrainedModel) -> None:
    """Raise unless ``model`` was loaded with packed layers that all hold real tensors."""
    stored = getattr(model.config, "quantization_config", None)
    if isinstance(stored, dict):
        stored = COMQConfig.from_dict(stored)
    if not isinstance(stored, COMQConfig):
        raise CheckpointError(
            "the model was not loaded with packed layers (its quantization_config is not hf_comq's); "
            "load it with hf_comq.load_quantized(path)"
        )
    verify_quantized_model(model, stored.packed_scheme())


def _check_same_format(stored: COMQConfig, requested: COMQConfig) -> None:
    if not isinstance(requested, COMQConfig):
        raise CheckpointError(
            f"quantization_config: expected a COMQConfig, got {type(requested).__name__}"
        )
    differences = stored.format_mismatches(requested)
    if differences:
        listed = ", ".join(f"{name}: checkpoint {mine!r} vs passed {theirs!r}" for name, (mine, theirs) in differences.items())
        raise CheckpointError(
            f"the COMQConfig passed does not match the checkpoint ({listed}); a quantized checkpoint is "
            "loaded with the settings it was saved with -- pass no quantization_config, or re-quantize the "
            "full-precision model to change them"
        )


def _check_loading_info(info: dict, head_resized: bool = False) -> None:
    """Packed tensors the model did not take (or took with another shape) mean a config/checkpoint mismatch.
    ``head_resized``: ``ignore_mismatched_sizes=True`` asked for full-precision layers of new sizes (a head
    for ``num_labels``), which transformers initialises; packed ones must still fit."""
    unexpected = sorted(key for key in info.get("unexpected_keys", ()) if key.endswith(PACKED_SUFFIXES))
    if unexpected:
        raise CheckpointError(
            f"checkpoint tensors {unexpected[:5]} were not loaded: the layers they belong to are not quantized "
            "in this model (the ignore list in config.json does not match the checkpoint)"
        )
    missing = sorted(key for key in info.get("missing_keys", ()) if key.endswith(PACKED_SUFFIXES))
    if missing:
        raise CheckpointError(f"checkpoint is missing the packed tensors {missing[:5]}")
    mismatched = [str(item) for item in info.get("mismatched_keys", ())]
    if head_resized:
        mismatched = [item for item in mismatched if any(suffix in item for suffix in PACKED_SUFFIXES)]
    if mismatched:
        raise CheckpointError(f"checkpoint tensors have the wrong shape: {mismatched[:5]}")


def _model_class_for(config: PreTrainedConfig) -> type[PreTrainedModel]:
    """The class ``config.json`` names: transformers' own, or for a remote-code model the Auto class its
    ``auto_map`` maps to that architecture (which loads the checkpoint's own code, ``trust_remote_code``
    given); else ``AutoModel`` (the bare model)."""
    auto_map = getattr(config, "auto_map", None) or {}
    for name in config.architectures or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
        for auto_name, target in auto_map.items():
            targets = target if isinstance(target, (list, tuple)) else [target]
            auto = getattr(transformers, auto_name, None)
            if auto_name != "AutoConfig" and auto is not None and any(str(t).split(".")[-1] == name for t in targets):
                return auto
    return transformers.AutoModel
