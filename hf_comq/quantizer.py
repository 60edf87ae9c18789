"""``COMQHfQuantizer``: the transformers 5 ``HfQuantizer`` for ``quant_method="comq"``.

Two paths through ``from_pretrained``:

* **quantize on load** (``quantization_config=COMQConfig(...)`` on a full-precision
  checkpoint): weights load normally, then the after-weight-loading hook runs COMQ
  calibration (:func:`hf_comq.calibration.quantize_model`) and records on the config
  what the checkpoint needs: the layers kept in full precision (compressed-tensors'
  ``ignore`` list) and the class of the quantized layers.  ``save_pretrained`` then
  writes a compressed-tensors ``pack-quantized`` checkpoint (:mod:`hf_comq.checkpoint`).
* **packed load** (:func:`hf_comq.load_quantized` routes a compressed-tensors
  checkpoint here): before loading, the layers the checkpoint quantizes are swapped for
  empty :class:`COMQLinear` shells on ``meta`` so ``weight_packed`` / ``weight_scale``
  / ... load by name and stay packed in memory (a mixture of experts whose checkpoint
  holds packed experts first gets per-expert layers, :class:`~hf_comq.nn.UnfusedExperts`,
  as when it was quantized); after loading, every shell is checked to have really been
  filled, because transformers only *logs* missing keys.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from .checkpoint import (
    SYMMETRIC_ZERO_POINT_KEY,
    check_checkpoint_files,
    check_group_size,
    checkpoint_layer_names,
    full_precision_layers,
    layer_group_size,
    layer_type_of,
    packed_in_checkpoint,
    quantizes_experts,
    saved_as_another_class,
    stores_experts_per_expert,
    verify_quantized_model,
)
from .config import LIVE_OBJECTS, COMQConfig
from .modules import (
    batched_expert_weights,
    expert_projection_names,
    find_quantizable_linears,
    merges_batched_experts,
    modules_kept_in_full_precision,
    unfuse_batched_experts,
)
from .nn.quant_linear import COMQLinear, is_linear_like, linear_shape
from .onednn_caches import cap_onednn_caches

logger = logging.getLogger(__name__)


class COMQHfQuantizer(HfQuantizer):
    """Quantize with COMQ while loading, or load a packed checkpoint; see the module docstring."""

    requires_calibration = False
    quantization_config: COMQConfig

    def __init__(self, quantization_config: COMQConfig, **kwargs: Any):
        if not isinstance(quantization_config, COMQConfig):
            raise TypeError(f"COMQHfQuantizer needs a COMQConfig, got {type(quantization_config).__name__}")
        # Quantizing records model-specific results on the config (ignore list, calibration
        # description).  from_pretrained hands us the user's own object, so work on a copy: reusing
        # one COMQConfig for a second model must not inherit the first model's layer names.
        # The copy shares the dataset and processor (see COMQConfig.__deepcopy__).
        super().__init__(copy.deepcopy(quantization_config), **kwargs)
        self.quantization_config.post_init()  # settings changed since construction are checked before any load
        self._converted: list[str] = []
        self._unfused_experts: list[str] = []  # experts modules given per-expert layers before loading
        self._calibration_data: Any = None  # built before the weights load, used after

    # ---------------------------------------------------------------- contract
    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        """Before any weight loads: a ``device_map`` naming a device this torch cannot use, or
        calibration data or a processor at a local path where nothing is, fails here with one
        line, not deep inside the load or after it.  Quantizing under a device map (a memory
        budget, mostly) keeps oneDNN's caches small (:mod:`.onednn_caches`), set here because
        nothing in the load has run oneDNN yet."""
        from .calibration.placement import check_device_map  # lazy: the calibration package is heavy
        from .calibration.sources import check_local_sources

        check_device_map(device_map)
        if not self.pre_quantized:
            if device_map is not None:
                cap_onednn_caches()
            check_local_sources(self.quantization_config.dataset, self.quantization_config.processor)

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters on a packed model's full-precision modules train (the packed layers' backward
        passes the gradient through exactly; their codes and scales never train, and PEFT does not
        wrap them).  transformers' ``Trainer`` then asks for adapters instead of refusing COMQ."""
        return True

    # ---------------------------------------------------------------- hooks
    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            self._install_shells(model, kwargs.get("checkpoint_files") or ())
        else:
            config = self.quantization_config
            files = kwargs.get("checkpoint_files") or ()
            if batched_expert_weights(model) and stores_experts_per_expert(files, expert_projection_names(model)):
                self._unfused_experts = unfuse_batched_experts(model, config.modules_to_not_convert, empty=True)
            targets = find_quantizable_linears(model, config.modules_to_not_convert)
            if not targets:
                kept = modules_kept_in_full_precision(model, config.modules_to_not_convert)
                raise ValueError(
                    f"{type(model).__name__} has no nn.Linear/Conv1D layer to quantize outside {kept} "
                    "(the task head and modules_to_not_convert); COMQ only converts linear layers"
                )
            layer_type_of(targets)
            check_group_size(targets, config.group_size)
            if config.block_name is not None:
                from .calibration.blocks import find_block_groups

                find_block_groups(model, config.block_name)  # a block_name naming no block list, before the load
            folder = os.path.dirname(os.fspath(files[0])) if files else None  # a subfolder's, a revision's snapshot
            self._calibration_data = _calibration_data(model, config, folder)
        return model

    def update_weight_conversions(self, weight_conversions: list, model: nn.Module | None = None) -> list:
        """Leave out the merges of per-expert checkpoint weights into batched experts the model no longer has.

        Experts given per-expert layers before loading (:class:`~hf_comq.nn.UnfusedExperts`)
        take the checkpoint's per-expert tensors by name; the model's own merge would
        collect them into ``experts.gate_up_proj`` / ``experts.down_proj``, which it no
        longer has.  transformers 5.17 calls this without ``model``.
        """
        if model is None:
            conversions = super().update_weight_conversions(weight_conversions)
        else:
            conversions = super().update_weight_conversions(weight_conversions, model)
        if not self._unfused_experts:
            return conversions
        return [conversion for conversion in conversions if not merges_batched_experts(conversion)]

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            scheme = self.quantization_config.packed_scheme()
            verify_quantized_model(model, scheme, expected=self._converted, check_loaded=True)
        else:
            from .calibration import quantize_model  # lazy: heavy, and only needed when quantizing

            data, self._calibration_data = self._calibration_data, None
            summary = quantize_model(model, self.quantization_config, data=data)
            self._record_conversion(model, summary)
        _attach_model_card(model)
        return model

    def dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """``model.dequantize(dtype)``; without a dtype each layer keeps the one it has now.

        transformers fills a missing dtype in with ``model.config.dtype``, the dtype the model
        was loaded in, which a later ``model.to(torch.bfloat16)`` does not update: float32
        layers in a bf16 model.  A packed layer's dtype follows casts (:meth:`COMQLinear._apply`),
        as the model's other layers do.
        """
        model = self._dequantize(model, dtype)
        self.remove_quantization_config(model)
        return model

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """Replace every :class:`COMQLinear` with the float layer it stands for (``model.dequantize()``)."""
        from .calibration.placement import swap_layer  # lazy: the calibration package is heavy

        if isinstance(dtype, str):  # a dtype by name ("bfloat16"), as config.dtype holds it after save_pretrained
            dtype = getattr(torch, dtype)
        for name, module in list(model.named_modules()):
            if isinstance(module, COMQLinear):
                swap_layer(model, name, lambda layer: layer.to_float_module(dtype))
        return model

    # ---------------------------------------------------------------- helpers
    def _install_shells(self, model: nn.Module, checkpoint_files: Any) -> None:
        """Swap every layer the checkpoint quantizes for an empty packed shell, then pre-check the files."""
        scheme = self.quantization_config.packed_scheme()
        if quantizes_experts(checkpoint_files):
            self._unfused_experts = unfuse_batched_experts(model, empty=True)
        in_checkpoint = checkpoint_layer_names(model, checkpoint_files)
        another_class = saved_as_another_class(model)
        held = packed_in_checkpoint(model, checkpoint_files, in_checkpoint) if another_class else None
        targets = {
            name: module
            for name, module in model.named_modules()
            if name and is_linear_like(module) and (
                name in held and scheme.quantizes(name, module, ignoring=False) if held is not None
                else (saved := in_checkpoint(name)) is not None and scheme.quantizes(saved, module)
            )
        }  # fmt: skip
        if not targets:
            raise ValueError(
                f"the checkpoint's quantization_config quantizes no layer of {type(model).__name__} "
                f"(targets {scheme.layer_type}, ignore {scheme.ignore[:5]}); it belongs to another model"
            )
        for name, module in targets.items():
            group_size = layer_group_size(scheme, linear_shape(module)[1])
            model.set_submodule(name, COMQLinear.empty_like(module, scheme.bits, group_size, scheme.symmetric))
        self._converted = list(targets)
        if another_class:  # its ignore list must name this model's layers, new heads included
            self.quantization_config.ignore = full_precision_layers(model)
        check_checkpoint_files(model, checkpoint_files, scheme)
        if scheme.symmetric:  # zero points some writers store anyway: checked to be zero above, not read
            ignored = set(model._keys_to_ignore_on_load_unexpected or ())
            model._keys_to_ignore_on_load_unexpected = ignored | {SYMMETRIC_ZERO_POINT_KEY}

    def _record_conversion(self, model: nn.Module, summary: dict[str, Any]) -> None:
        """Write what the checkpoint needs into the config: the full-precision layers and the layer class."""
        converted = {name: module for name, module in model.named_modules() if isinstance(module, COMQLinear)}
        if not converted:
            raise RuntimeError("COMQ calibration finished without converting any layer; nothing was quantized")
        config = self.quantization_config
        # Quantized by this version, from this model: a config read from a checkpoint named its maker and base.
        config.hf_comq_version, config.other_producer = None, False
        config.base_model = config.base_model_folder = None
        config.ignore = full_precision_layers(model)
        if config.ignore:
            logger.info("COMQ kept %d linear layers in full precision: %s", len(config.ignore), config.ignore)
        transposed = [layer.transposed_source for layer in converted.values()]
        config.layer_type = "Conv1D" if all(transposed) else "Linear"
        config.conv1d_rows = max(layer.in_features for layer in converted.values()) if all(transposed) else None
        config.calibration_samples = summary.get("num_samples")
        config.expert_layers_rounded = len(summary.get("expert_layers_without_tokens") or ()) or None
        from .hub import cached_snapshot_repo_id

        name = str(getattr(model, "name_or_path", "") or "")
        hub_id = cached_snapshot_repo_id(name) if name else None  # a Hub download cache's folder is that model
        if os.path.isdir(name) and hub_id is None:  # a local folder: its name only
            config.base_model_folder = Path(os.path.abspath(name)).name or None  # "." names the working folder
        elif name:
            config.base_model = hub_id or name
        config.calibration_description = config.describe_calibration()
        # From here on the config holds what a checkpoint records of the data and processor, not the objects:
        # the model would otherwise keep the caller's calibration data alive (and in any pickle of it).
        for name in LIVE_OBJECTS:
            setattr(config, name, config.serialized(name))
        self._converted = list(converted)


def _calibration_data(model: nn.Module, config: COMQConfig, checkpoint_folder: str | None = None) -> Any:
    """The calibration data, built while the model's weights are still to be loaded: it needs the
    model's class and config only, so every data mistake (a column, a split, a tokenizer, data of
    a kind the model cannot take) is one line before a load that may take minutes.  Built on the
    CPU: transformers creates the model under a ``meta`` device scope."""
    from .calibration import build_calibration_data  # lazy: the calibration package is heavy

    with torch.device("cpu"):
        return build_calibration_data(model, config, checkpoint_folder)


def _attach_model_card(model: nn.Module) -> None:
    """Let ``save_pretrained`` / ``push_to_hub`` write the COMQ model card (see :mod:`hf_comq.hub`)."""
    try:
        from .hub import attach_model_card_hook
    except ImportError:  # the card is a convenience; loading must not depend on it
        logger.debug("hf_comq.hub unavailable: no model card hook")
        return
    attach_model_card_hook(model)
