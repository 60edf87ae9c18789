"""``COMQHfQuantizer``: the transformers 5 ``HfQuantizer`` for ``quant_method="comq"``.

Two paths through ``from_pretrained``:

* **quantize on load** (``quantization_config=COMQConfig(...)`` on a full-precision
  checkpoint): weights load normally, then the after-weight-loading hook runs COMQ
  calibration (:func:`hf_comq.calibration.quantize_model`), and the resolved list of
  layers kept in full precision is written back to the config so a reload converts
  exactly the same layers.
* **pre-quantized** (``config.json`` carries ``quantization_config`` with
  ``quant_method: "comq"``): before loading, the target layers are swapped for empty
  :class:`COMQLinear` shells on ``meta`` so ``qweight`` / ``scales`` / ``qzeros`` load
  by name; after loading, every shell is checked to have really been filled, because
  transformers only *logs* missing keys and would otherwise run on garbage.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Iterable

import torch
from safetensors import safe_open
from torch import nn
from transformers.quantizers.base import HfQuantizer

from .config import COMQConfig
from .modules import default_modules_to_not_convert, find_quantizable_linears
from .nn.quant_linear import BUFFER_NAMES, COMQLinear, group_count, linear_shape, set_submodule

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A COMQ checkpoint does not match the model or its ``quantization_config``."""


class COMQHfQuantizer(HfQuantizer):
    """Quantize with COMQ while loading, or load a COMQ checkpoint; see the module docstring."""

    requires_calibration = False
    quantization_config: COMQConfig

    def __init__(self, quantization_config: COMQConfig, **kwargs: Any):
        if not isinstance(quantization_config, COMQConfig):
            raise TypeError(f"COMQHfQuantizer needs a COMQConfig, got {type(quantization_config).__name__}")
        # Quantizing records model-specific results on the config (resolved skip list, calibration
        # description).  from_pretrained hands us the user's own object, so work on a copy: reusing
        # one COMQConfig for a second model must not inherit the first model's layer names.
        # The copy shares the dataset and processor (see COMQConfig.__deepcopy__).
        super().__init__(copy.deepcopy(quantization_config), **kwargs)
        self._skip_modules: list[str] = []
        self._converted: list[str] = []

    # ---------------------------------------------------------------- contract
    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        """Reject disk offload for calibration: every block's weights must be readable in memory."""
        if self.pre_quantized or not isinstance(device_map, dict):
            return
        if any(str(device) == "disk" for device in device_map.values()):
            raise ValueError(
                "device_map: COMQ calibration cannot run with disk offload (some modules are mapped to 'disk'); "
                "use a device_map over accelerators and 'cpu' only, e.g. device_map='auto' with enough CPU memory"
            )

    # ---------------------------------------------------------------- hooks
    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        config = self.quantization_config
        skip = config.modules_to_not_convert
        self._skip_modules = list(skip) if skip is not None else default_modules_to_not_convert(model)
        targets = find_quantizable_linears(model, self._skip_modules)
        if not targets:
            raise ValueError(
                f"{type(model).__name__} has no nn.Linear/Conv1D layer to quantize outside "
                f"modules_to_not_convert={self._skip_modules}; COMQ only converts linear layers"
            )
        _check_group_size(targets, config.group_size)
        if self.pre_quantized:
            for name, module in targets.items():
                set_submodule(model, name, COMQLinear.empty_like(module, config.bits, config.group_size))
            self._converted = list(targets)
            check_checkpoint_files(model, kwargs.get("checkpoint_files") or (), config)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            verify_quantized_model(model, self.quantization_config, expected=self._converted, check_loaded=True)
        else:
            from .calibration import quantize_model  # lazy: heavy, and only needed when quantizing

            quantize_model(model, self.quantization_config)
            self._record_conversion(model)
        _attach_model_card(model)
        return model

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """Replace every :class:`COMQLinear` with the float layer it stands for (``model.dequantize()``)."""
        for name, module in list(model.named_modules()):
            if isinstance(module, COMQLinear):
                set_submodule(model, name, module.to_float_module(dtype))
        return model

    # ---------------------------------------------------------------- helpers
    def _record_conversion(self, model: nn.Module) -> None:
        """Write the layers left in full precision into the config, so reloads rebuild the same model."""
        converted = [name for name, module in model.named_modules() if isinstance(module, COMQLinear)]
        if not converted:
            raise RuntimeError("COMQ calibration finished without converting any layer; nothing was quantized")
        leftovers = list(find_quantizable_linears(model, self._skip_modules))
        if leftovers:
            logger.info("COMQ left %d linear layers in full precision: %s", len(leftovers), leftovers)
        self.quantization_config.modules_to_not_convert = self._skip_modules + leftovers
        self._converted = converted


def verify_quantized_model(
    model: nn.Module, config: COMQConfig, expected: list[str] | None = None, check_loaded: bool = False
) -> None:
    """Raise :class:`CheckpointError` unless every COMQ layer holds real, consistent tensors.

    Catches what transformers only logs: packed tensors missing from the checkpoint
    (left on ``meta`` or uninitialised), tensors of the wrong shape or dtype, and
    codes/zero points outside the ``bits`` range.  ``expected`` lists the layer names
    that must be :class:`COMQLinear`.  ``check_loaded`` (right after ``from_pretrained``
    only) also requires the mark transformers puts on every tensor it loaded, which
    is how a missing ``qweight`` -- allocated but never filled -- is told apart.
    """
    layers = {name: module for name, module in model.named_modules() if isinstance(module, COMQLinear)}
    if expected is not None:
        missing_layers = [name for name in expected if name not in layers]
        if missing_layers:
            raise CheckpointError(f"layers {missing_layers} were not converted to COMQLinear")
    if not layers:
        raise CheckpointError(
            "the model has no COMQLinear layer although its quantization_config says quant_method='comq': "
            "it was loaded without hf_comq, so its linear weights are random. `import hf_comq` before "
            "from_pretrained, or use hf_comq.load_quantized(path)"
        )
    for name, layer in layers.items():
        _verify_layer(name, layer, config, check_loaded)


def _verify_layer(name: str, layer: COMQLinear, config: COMQConfig, check_loaded: bool) -> None:
    # An empty shell built from the config is the source of truth for shapes and dtypes.
    shell = COMQLinear(
        layer.in_features, layer.out_features, bits=config.bits, group_size=config.group_size, device="meta"
    )
    hooked = _is_offloaded(layer)
    for buffer_name in ("qweight", "scales", "qzeros"):
        tensor = getattr(layer, buffer_name)
        reference = getattr(shell, buffer_name)
        key = f"{name}.{buffer_name}"
        if not hooked and (tensor.device.type == "meta" or (check_loaded and not _was_loaded(tensor))):
            raise CheckpointError(
                f"{key} is missing from the checkpoint (left uninitialised by from_pretrained); the checkpoint "
                "is incomplete or its quantization_config lists different layers than it holds"
            )
        if tuple(tensor.shape) != tuple(reference.shape) or tensor.dtype != reference.dtype:
            raise CheckpointError(
                f"{key} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, expected "
                f"{tuple(reference.shape)} {reference.dtype} for bits={config.bits}, group_size={config.group_size}; "
                "the checkpoint does not match its quantization_config"
            )
    if not hooked:
        _verify_values(name, layer, config.bits)


def _verify_values(name: str, layer: COMQLinear, bits: int) -> None:
    """Zero points must be valid codes and scales finite: uninitialised memory rarely is."""
    max_code = (1 << bits) - 1
    if layer.qzeros.numel() and int(layer.qzeros.max()) > max_code:
        raise CheckpointError(
            f"{name}.qzeros holds values above {max_code}, impossible at bits={bits}: the tensor is missing "
            "from the checkpoint or the checkpoint was written with more bits than its config says"
        )
    if not torch.isfinite(layer.scales).all():
        raise CheckpointError(f"{name}.scales holds NaN/inf: the tensor is missing or corrupt in the checkpoint")


def _attach_model_card(model: nn.Module) -> None:
    """Let ``save_pretrained`` / ``push_to_hub`` write the COMQ model card (see :mod:`hf_comq.hub`)."""
    try:
        from .hub import attach_model_card_hook
    except ImportError:  # the card is a convenience; loading must not depend on it
        logger.debug("hf_comq.hub unavailable: no model card hook")
        return
    attach_model_card_hook(model)


def _was_loaded(tensor: torch.Tensor) -> bool:
    """transformers marks each tensor it filled from the checkpoint with ``_is_hf_initialized``."""
    return bool(getattr(tensor, "_is_hf_initialized", False))


def _is_offloaded(module: nn.Module) -> bool:
    """accelerate CPU/disk offload keeps tensors on meta with the data in a hook's weights map."""
    hook = getattr(module, "_hf_hook", None)
    return hook is not None and getattr(hook, "offload", False)


def _check_group_size(targets: dict[str, nn.Module], group_size: int | None) -> None:
    """Fail before loading any weight if ``group_size`` does not divide some layer's input size."""
    if group_size is None:
        return
    bad = {}
    for name, module in targets.items():
        in_features = linear_shape(module)[1]
        try:
            group_count(in_features, group_size)
        except ValueError:
            bad[name] = in_features
    if bad:
        sample = dict(list(bad.items())[:5])
        raise ValueError(
            f"group_size={group_size} does not divide in_features of {len(bad)} layers, e.g. {sample}; "
            "use a common divisor of the layers' input sizes, group_size=None, or add them to modules_to_not_convert"
        )


# ---------------------------------------------------------------------------- checkpoint pre-check
_SAFETENSORS_DTYPES = {torch.int32: "I32", torch.float32: "F32", torch.uint8: "U8"}


def check_checkpoint_files(model: nn.Module, checkpoint_files: Iterable[str], config: COMQConfig) -> None:
    """Compare the packed tensors in the safetensors headers with the COMQ shells, before loading.

    transformers only logs missing tensors and raises a message-less error on shape
    mismatches; reading the headers (no data) lets us name the tensor and the cause.
    Checkpoint keys may use legacy names (transformers renames e.g. ViT's modules on
    load and reverts on save), so each tensor is looked up under its model name and
    under the name ``save_pretrained`` would give it.
    """
    header = _packed_header(checkpoint_files)
    if header is None:
        return  # not safetensors: nothing cheap to read, the after-load check still runs
    expected = {
        f"{name}.{buffer}": getattr(module, buffer)
        for name, module in model.named_modules()
        if isinstance(module, COMQLinear)
        for buffer in BUFFER_NAMES
    }
    if not header:
        raise CheckpointError(
            "the checkpoint holds no COMQ packed tensors (*.qweight / *.scales / *.qzeros) although its "
            "config.json says quant_method='comq'; it was not saved from a COMQ-quantized model"
        )
    saved_names = _saved_names(model, expected)
    found, missing = {}, []
    for key, tensor in expected.items():
        candidates = [saved_names.get(key), key]
        match = next((name for name in candidates if name in header), None)
        if match is None:
            missing.append(key)
            continue
        found[match] = key
        _compare_header(key, match, tensor, header[match], config)
    if missing and len(missing) < len(expected):
        raise CheckpointError(
            f"the checkpoint is missing {len(missing)} packed tensors, e.g. {missing[:5]}; it is incomplete "
            "or its quantization_config (modules_to_not_convert) does not match the layers it holds"
        )
    if missing:
        logger.warning("could not map the checkpoint's packed tensor names to the model; verifying after loading")
        return
    unexpected = sorted(set(header) - set(found))
    if unexpected:
        raise CheckpointError(
            f"the checkpoint holds packed tensors for layers this model keeps in full precision, e.g. "
            f"{unexpected[:5]}: config.json's modules_to_not_convert does not match the checkpoint, and those "
            "layers would load with random weights"
        )


def _packed_header(checkpoint_files: Iterable[str]) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """``{key: (shape, dtype)}`` of the packed tensors in safetensors files; ``None`` if any file is not safetensors."""
    files = [str(path) for path in checkpoint_files]
    if not files or not all(path.endswith(".safetensors") and os.path.isfile(path) for path in files):
        return None
    packed = tuple(f".{buffer}" for buffer in BUFFER_NAMES)
    header = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(packed):
                    view = handle.get_slice(key)
                    header[key] = (tuple(view.get_shape()), view.get_dtype())
    return header


def _saved_names(model: nn.Module, expected: dict[str, torch.Tensor]) -> dict[str, str]:
    """Model key -> the key ``save_pretrained`` writes for it (through transformers' own renaming)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(model, dict(expected))
    except Exception as error:  # internal API: degrade to model names rather than fail the load
        logger.debug("could not compute saved tensor names: %s", error)
        return {}
    by_identity = {id(tensor): key for key, tensor in expected.items()}
    return {by_identity[id(tensor)]: saved for saved, tensor in reverted.items() if id(tensor) in by_identity}


def _compare_header(key: str, saved: str, tensor: torch.Tensor, entry: tuple, config: COMQConfig) -> None:
    shape, dtype = entry
    want_dtype = _SAFETENSORS_DTYPES[tensor.dtype]
    if tuple(shape) != tuple(tensor.shape) or dtype != want_dtype:
        alias = "" if saved == key else f" (saved as {saved})"
        raise CheckpointError(
            f"checkpoint tensor {key}{alias} has shape {tuple(shape)} and dtype {dtype}, expected "
            f"{tuple(tensor.shape)} {want_dtype} for bits={config.bits}, group_size={config.group_size}: "
            "the checkpoint does not match its quantization_config"
        )
