"""The on-disk format of COMQ models: compressed-tensors ``pack-quantized`` checkpoints.

A COMQ checkpoint is an ordinary compressed-tensors checkpoint, the format plain
transformers and vLLM read for integer weight-only quantization (codes, scales, zero
points); nothing COMQ-specific is needed to load it.  This module is the one place that
knows the format's ``quantization_config``:

* :func:`quantization_config_dict` writes it for a COMQ result (the scheme is declared
  with compressed-tensors' own pydantic models, so it is valid by construction), plus
  two keys of our own: ``"comq"``, the provenance (solver settings, calibration,
  hf_comq version; absent for another tool's checkpoint saved again), and ``"dequantize": true``, a loading option of transformers'
  compressed-tensors integration.  Without it, transformers 5.2x with compressed-tensors
  0.18-0.20 cannot build its compressed modules for packed zero points ("weight_zero_point
  size mismatch") nor for ``Conv1D`` layers; with it, COMQ checkpoints load exactly,
  as dense weights dequantized while loading (so plain transformers behaves the same for
  every grid), except where :func:`runtime_support` says otherwise.  vLLM ignores both keys.
* :func:`read_packed_scheme` reads one back -- any producer's, as long as it is
  integer, weight-only and packed -- and names what is wrong otherwise.
* :func:`check_checkpoint_files` and :func:`verify_quantized_model` make loading fail
  with the layer's name instead of running on uninitialised memory.

Per quantized layer the tensors are those of :class:`hf_comq.nn.COMQLinear`.  Layers are
selected the compressed-tensors way: every module of the scheme's target class
(``Linear``, or ``Conv1D`` for GPT-2 style models) that the ``ignore`` list does not
name; a mixture of experts' quantized experts are such layers too, one per expert and
projection (``experts.<e>.gate_proj``, ..., see :mod:`hf_comq.nn.experts`), the layout
transformers merges into its batched experts while loading.  ``Conv1D`` weights are
stored transposed, ``(in, out)``, and plain transformers dequantizes a checkpoint tensor
straight into that parameter, so their scheme is
compressed-tensors' ``block`` strategy with blocks one output channel wide: a block
``[rows, 1]`` per group of ``rows`` inputs, or, per channel, ``rows`` at least the
largest input size.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors import safe_open
from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .compat import saved_state_dict_names, was_loaded
from .nn.quant_linear import PACKED_TENSORS, COMQLinear, get_linear_weight, group_count, is_linear_like, linear_shape
from .settings import CONV1D, LINEAR

logger = logging.getLogger(__name__)

COMPRESSED_TENSORS = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
PROVENANCE_KEY = "comq"
MIN_COMPRESSED_TENSORS = "0.18"  # dense cross-word packing of 3/5/6/7-bit codes (no version marker before)
SUPPORTED_COMPRESSED_TENSORS = f">={MIN_COMPRESSED_TENSORS},<0.21"
"""The compressed-tensors releases hf_comq's checkpoints are tested with (pyproject.toml pins the same range)."""
MIN_TRANSFORMERS_FOR_CONV1D = "5.23"
"""Earliest transformers whose compressed-tensors loader reads ``Conv1D`` (GPT-2) layers: 5.17-5.22
leave their weights random, listing the packed tensors as unexpected in the load report."""
PACKED_SUFFIXES = tuple(f".{name}" for name in PACKED_TENSORS)


class CheckpointError(ValueError):
    """A checkpoint does not match the model or its ``quantization_config``."""


@dataclass
class PackedScheme:
    """What a pack-quantized checkpoint declares: the grid, the layer class it targets, the layers it skips."""

    bits: int
    group_size: int | None
    symmetric: bool
    layer_type: str = LINEAR  # "Linear" or "Conv1D"
    conv1d_rows: int | None = None  # block height of a per-channel Conv1D scheme
    ignore: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def quantizes(self, name: str, module: nn.Module, ignoring: bool = True) -> bool:
        """compressed-tensors' own rule: the module is of the target class and not ignored
        (``ignoring=False``: of the target class, whatever the ignore list says)."""
        from compressed_tensors.utils.match import is_match

        return is_match(name, module, [self.layer_type], self.ignore if ignoring else [])


def is_packed_checkpoint(config: Mapping[str, Any] | None) -> bool:
    """True when a ``config.json`` dict declares compressed-tensors ``pack-quantized`` weights."""
    stored = (config or {}).get("quantization_config")
    return isinstance(stored, Mapping) and stored.get("quant_method") == COMPRESSED_TENSORS and stored.get("format") == PACK_QUANTIZED


def quantization_config_dict(scheme: PackedScheme) -> dict[str, Any]:
    """``config.json["quantization_config"]`` for a COMQ result, in compressed-tensors' schema."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from packaging.version import Version

    if Version(compressed_tensors.__version__).release < Version(MIN_COMPRESSED_TENSORS).release:
        raise RuntimeError(
            f"compressed-tensors {compressed_tensors.__version__} is installed, but COMQ checkpoints use the layout of "
            f'{MIN_COMPRESSED_TENSORS} and later; pip install "compressed-tensors>={MIN_COMPRESSED_TENSORS}"'
        )

    arguments: dict[str, Any] = {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric}
    if scheme.layer_type == CONV1D:
        arguments.update(strategy="block", block_structure=[scheme.group_size or scheme.conv1d_rows, 1])
    elif scheme.group_size is None:
        arguments.update(strategy="channel")
    else:
        arguments.update(strategy="group", group_size=scheme.group_size)
    group = QuantizationScheme(targets=[scheme.layer_type], weights=QuantizationArgs(**arguments), format=PACK_QUANTIZED)
    config = QuantizationConfig(
        config_groups={"group_0": group},
        format=PACK_QUANTIZED,
        quantization_status="compressed",
        ignore=sorted(scheme.ignore),
    ).model_dump(mode="json")
    config["version"] = compressed_tensors.__version__
    config["dequantize"] = True
    if scheme.provenance:  # another producer's checkpoint, loaded and saved again, gets no COMQ record
        config[PROVENANCE_KEY] = dict(scheme.provenance)
    return config


UNSUPPORTED_SECTIONS = {
    "transform_config": "rotations applied to layer inputs and weights at run time, as QuIP and SpinQuant write",
    "sparsity_config": "a sparse weight layout",
    "kv_cache_scheme": "a quantized attention cache",
}
"""compressed-tensors ``quantization_config`` sections that change what a checkpoint's tensors mean
beyond its one weight scheme: loading without applying them would give wrong outputs, and a save
would drop them.  A ``sparsity_config`` whose ``format`` is :data:`DENSE_LAYOUT` changes nothing."""
DENSE_LAYOUT = "dense"  # llm-compressor records its sparsity statistics so when the weights stay dense


def read_packed_scheme(stored: Mapping[str, Any]) -> PackedScheme:
    """Parse a compressed-tensors ``quantization_config``; :class:`CheckpointError` if hf_comq cannot hold it."""
    if stored.get("quant_method") not in (COMPRESSED_TENSORS, "comq") or stored.get("format") != PACK_QUANTIZED:
        raise CheckpointError(
            f"not a compressed-tensors {PACK_QUANTIZED!r} checkpoint: quantization_config has "
            f"quant_method={stored.get('quant_method')!r}, format={stored.get('format')!r}"
        )
    groups = stored.get("config_groups") or {}
    if len(groups) != 1:
        raise CheckpointError(
            f"the checkpoint declares {len(groups)} quantization schemes; hf_comq loads checkpoints with exactly one"
        )
    group = next(iter(groups.values()))
    weights = group.get("weights") or {}
    targets = list(group.get("targets") or [])
    if group.get("input_activations") or group.get("output_activations"):
        raise CheckpointError("the checkpoint quantizes activations; hf_comq loads weight-only checkpoints")
    for key, what in UNSUPPORTED_SECTIONS.items():
        section = stored.get(key)
        dense = key == "sparsity_config" and isinstance(section, Mapping) and section.get("format") == DENSE_LAYOUT
        if section and not dense:
            raise CheckpointError(
                f"the checkpoint's quantization_config has a {key} ({what}), which hf_comq does not apply: "
                "load it with a runtime that applies it, such as vLLM"
            )
    if weights.get("type") != "int":
        raise CheckpointError(
            f"the checkpoint quantizes weights to {weights.get('type')!r} values; hf_comq loads integer weights"
        )
    if targets not in ([LINEAR], [CONV1D]):
        raise CheckpointError(
            f"the checkpoint's scheme targets {targets}; hf_comq loads schemes that target every layer of one "
            f"class, ['{LINEAR}'] or ['{CONV1D}'] (layers left out go in the ignore list): load it dense with "
            "plain transformers"
        )
    if _stores_order_indices(weights.get("actorder")):
        raise CheckpointError(
            f"the checkpoint stores activation-order indices (actorder={weights.get('actorder')!r}, weight_g_idx); "
            "hf_comq loads checkpoints without them: load it dense with plain transformers"
        )
    bits, strategy = weights.get("num_bits"), weights.get("strategy")
    scheme = PackedScheme(
        bits=bits,
        group_size=None,
        symmetric=bool(weights.get("symmetric")),
        layer_type=targets[0],
        ignore=list(stored.get("ignore") or []),
        provenance=dict(stored.get(PROVENANCE_KEY) or {}),
    )
    if scheme.layer_type == LINEAR and strategy in ("channel", "group"):
        scheme.group_size = weights.get("group_size") if strategy == "group" else None
    elif scheme.layer_type == CONV1D and strategy == "block":
        rows, width = (weights.get("block_structure") or [None, None])[:2]
        if width != 1 or not isinstance(rows, int):
            raise CheckpointError(f"Conv1D blocks must be one output channel wide, got {weights.get('block_structure')}")
        scheme.conv1d_rows = rows  # a group size or a per-channel height; resolved per layer when loading
    else:
        raise CheckpointError(
            f"strategy {strategy!r} for {scheme.layer_type} layers is not supported by hf_comq (it loads per-channel "
            "and group scales): load it dense with plain transformers"
        )
    return scheme


def _stores_order_indices(actorder: str | None) -> bool:
    """Whether a scheme's activation ordering keeps a ``weight_g_idx`` per layer.

    compressed-tensors' ``"weight"`` ordering (``"static"`` is its alias) quantizes in
    activation order but stores the weight in its own column order, so its layers are
    read like unordered ones; only ``"group"`` (alias ``"dynamic"``) stores indices.
    """
    if actorder is None:
        return False
    from compressed_tensors.quantization import ActivationOrdering

    try:
        ordering = ActivationOrdering(actorder)
    except ValueError:  # an ordering this compressed-tensors does not know: its layout cannot be told
        return True
    return ActivationOrdering.get_aliases().get(ordering.value, ordering.value) != ActivationOrdering.WEIGHT.value


def layer_group_size(scheme: PackedScheme, in_features: int) -> int | None:
    """The group size of one layer: a ``Conv1D`` block at least as tall as the layer is one group per channel."""
    if scheme.layer_type == CONV1D:
        return None if scheme.conv1d_rows >= in_features else scheme.conv1d_rows
    return scheme.group_size


# ---------------------------------------------------------------------------- checks on load
def verify_quantized_model(
    model: nn.Module, scheme: PackedScheme, expected: list[str] | None = None, check_loaded: bool = False
) -> None:
    """Raise :class:`CheckpointError` unless every packed layer holds real, consistent tensors.

    Catches what transformers only logs: packed tensors missing from the checkpoint (left
    on ``meta`` or uninitialised) and tensors of the wrong shape or dtype.  ``expected``
    lists the layer names that must be :class:`COMQLinear`.  ``check_loaded`` (right after
    ``from_pretrained`` only) also requires the mark transformers puts on every tensor it
    loaded, which is how a tensor allocated but never filled is told apart.
    """
    layers = {name: module for name, module in model.named_modules() if isinstance(module, COMQLinear)}
    if expected is not None:
        missing_layers = [name for name in expected if name not in layers]
        if missing_layers:
            raise CheckpointError(f"layers {missing_layers} were not converted to COMQLinear")
    if not layers:
        raise CheckpointError("the model has no packed (COMQLinear) layer; it was not loaded as a quantized model")
    for name, layer in layers.items():
        _verify_layer(name, layer, scheme, check_loaded)


def _verify_layer(name: str, layer: COMQLinear, scheme: PackedScheme, check_loaded: bool) -> None:
    from accelerate.utils import has_offloaded_params  # lazy: only checking a loaded model needs accelerate

    # An empty shell built from the scheme is the source of truth for shapes and dtypes.
    shell = COMQLinear(
        layer.in_features,
        layer.out_features,
        bits=scheme.bits,
        group_size=layer_group_size(scheme, layer.in_features),
        symmetric=scheme.symmetric,
        device="meta",
        transposed_source=layer.transposed_source,
    )
    hooked = has_offloaded_params(layer)  # accelerate keeps its weights elsewhere: checked as loaded
    for buffer_name in PACKED_TENSORS:
        tensor, reference = getattr(layer, buffer_name), getattr(shell, buffer_name)
        if reference is None:
            continue
        key = f"{name}.{buffer_name}"
        if tensor is None or (not hooked and (tensor.device.type == "meta" or (check_loaded and not was_loaded(tensor)))):
            raise CheckpointError(
                f"{key} is missing from the checkpoint (left uninitialised by from_pretrained); the checkpoint "
                "is incomplete or its quantization_config lists different layers than it holds"
            )
        if tuple(tensor.shape) != tuple(reference.shape) or tensor.dtype != reference.dtype:
            raise CheckpointError(
                f"{key} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, expected {tuple(reference.shape)} "
                f"{reference.dtype} for bits={scheme.bits}, group_size={layer.group_size}, "
                f"symmetric={scheme.symmetric}; the checkpoint does not match its quantization_config"
            )
    if not hooked:
        _verify_values(name, layer)


def _verify_values(name: str, layer: COMQLinear) -> None:
    """The shape record must match the layer and scales must be finite: uninitialised memory rarely is."""
    rows_cols = [layer.in_features, layer.out_features] if layer.transposed_source else [layer.out_features, layer.in_features]
    if layer.weight_shape.tolist() != rows_cols:
        raise CheckpointError(
            f"{name}.weight_shape is {layer.weight_shape.tolist()}, but the layer is {rows_cols}: the checkpoint "
            "belongs to another model or is corrupt"
        )
    if not torch.isfinite(layer.weight_scale).all():
        raise CheckpointError(f"{name}.weight_scale holds NaN/inf: the tensor is missing or corrupt in the checkpoint")


def check_group_size(targets: Mapping[str, nn.Module], group_size: int | None) -> None:
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
            "use a common divisor of the layers' input sizes or group_size=None (hf-comq: --group-size -1), or add "
            "them to modules_to_not_convert (hf-comq: --modules-to-not-convert)"
        )


def layer_type_of(targets: Mapping[str, nn.Module]) -> str:
    """``"Linear"`` or ``"Conv1D"``: one scheme per checkpoint, so the quantized layers must be of one class."""
    kinds = {LINEAR if isinstance(module, nn.Linear) else CONV1D for module in targets.values()}
    if len(kinds) > 1:
        conv = sorted(name for name, module in targets.items() if not isinstance(module, nn.Linear))
        raise ValueError(
            f"this model would quantize both nn.Linear and transformers Conv1D layers (e.g. {conv[:3]}); a "
            "compressed-tensors checkpoint that plain transformers can load holds one kind: add the layers of "
            "one kind to modules_to_not_convert (hf-comq: --modules-to-not-convert)"
        )
    return kinds.pop() if kinds else LINEAR


def full_precision_layers(model: nn.Module) -> list[str]:
    """Names of the linear-like layers that stayed in full precision: the checkpoint's ``ignore`` list."""
    return sorted(name for name, module in model.named_modules() if name and is_linear_like(module))


# ---------------------------------------------------------------------------- checkpoint pre-check
_SAFETENSORS_DTYPES = {torch.int32: "I32", torch.float32: "F32", torch.int8: "I8", torch.int64: "I64"}


def checkpoint_layer_names(model: nn.Module, checkpoint_files: Iterable[str]) -> Callable[[str], str | None]:
    """Model layer name -> the layer's name in the checkpoint (``None``: a layer it does not hold).

    transformers loads a task model's checkpoint into the bare model (``AutoModel`` on a
    classifier) by dropping the base-model prefix (``bert.``), and a bare model's checkpoint
    into a task model by adding it, the new head left to initialise.  The ignore list and
    the packed tensors carry the checkpoint's names, so layers are matched under those.
    """
    if type(model).__name__ in _saved_classes(model):  # the checkpoint's own class: its names, legacy layouts included
        return lambda name: name
    prefix = getattr(model, "base_model_prefix", "") or ""
    keys = _checkpoint_keys(checkpoint_files)
    if not prefix or not keys:
        return lambda name: name
    model_has_prefix = isinstance(getattr(model, prefix, None), nn.Module)
    checkpoint_has_prefix = any(key.startswith(f"{prefix}.") for key in keys)
    if model_has_prefix and not checkpoint_has_prefix:  # a bare model's checkpoint in a task model
        return lambda name: name[len(prefix) + 1:] if name.startswith(f"{prefix}.") else None
    if checkpoint_has_prefix and not model_has_prefix:  # a task model's checkpoint in the bare model
        return lambda name: f"{prefix}.{name}"
    return lambda name: name


def saved_as_another_class(model: nn.Module) -> bool:
    """Whether ``model`` is being loaded from a checkpoint another class saved (``config.architectures``)."""
    saved_as = _saved_classes(model)
    return bool(saved_as) and type(model).__name__ not in saved_as


def _saved_classes(model: nn.Module) -> list[str]:
    """The classes the checkpoint being loaded was saved from: its ``config.json``'s ``architectures``."""
    return list(getattr(getattr(model, "config", None), "architectures", None) or ())


def packed_in_checkpoint(
    model: nn.Module, checkpoint_files: Iterable[str], in_checkpoint: Callable[[str], str | None]
) -> set[str] | None:
    """The linear layers of ``model`` the checkpoint holds packed, found under any name it may use (the
    model's, the one ``save_pretrained`` writes, with or without the base-model prefix); ``None`` where
    the files cannot be read cheaply (not safetensors).

    For a class other than the one that saved the checkpoint, what the checkpoint holds decides:
    its ignore list names the other class's layers, and a layer it does not hold at all (another
    class's new head) is initialised by transformers, so stays in float.  ``in_checkpoint``:
    :func:`checkpoint_layer_names` of the same model and files.
    """
    keys = _checkpoint_keys(checkpoint_files)
    if not keys:
        return None
    packed = {key.rsplit(".", 1)[0] for key in keys if key.endswith(".weight_packed")}
    linears = {name: module for name, module in model.named_modules() if name and is_linear_like(module)}
    weights = {f"{name}.weight": get_linear_weight(module) for name, module in linears.items()}
    saved = {key.removesuffix(".weight"): value.removesuffix(".weight")
             for key, value in saved_state_dict_names(model, weights).items()}  # fmt: skip
    held = set()
    for name in linears:
        candidates = {name, in_checkpoint(name), saved.get(name)}
        candidates |= {in_checkpoint(other) for other in list(candidates) if other}
        if (candidates - {None}) & packed:
            held.add(name)
    return held


def shadowing_single_file(checkpoint_files: Iterable[str]) -> str | None:
    """The path of a lone ``model.safetensors`` that has a sharded checkpoint's index beside it
    (loaders take the single file first), else ``None``."""
    files = [Path(file) for file in checkpoint_files]
    if len(files) == 1 and files[0].name == SAFE_WEIGHTS_NAME and (files[0].parent / SAFE_WEIGHTS_INDEX_NAME).is_file():
        return str(files[0])
    return None


def loaded_weight_files(folder: Path) -> list[Path]:
    """The weight files ``from_pretrained`` reads, in its order of preference: ``model.safetensors``, else
    the shards an index names, else every ``*.safetensors`` there (other weights beside them, such as
    Mistral's ``consolidated.safetensors``, are never loaded)."""
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return [folder / SAFE_WEIGHTS_NAME]
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            shards = []
        named = [folder / shard for shard in shards if (folder / shard).is_file()]
        if named:
            return named
    return sorted(folder.glob("*.safetensors"))


def check_checkpoint_files(model: nn.Module, checkpoint_files: Iterable[str], scheme: PackedScheme) -> None:
    """Compare the packed tensors in the safetensors headers with the shells, before loading.

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
        f"{name}.{buffer}": tensor
        for name, module in model.named_modules()
        if isinstance(module, COMQLinear)
        for buffer in PACKED_TENSORS
        if (tensor := getattr(module, buffer)) is not None
    }
    if not header:
        shadowing = shadowing_single_file(checkpoint_files)
        if shadowing is not None:
            raise CheckpointError(
                f"{shadowing} holds no packed tensors, and loaders read it instead of the sharded checkpoint "
                f"beside it ({SAFE_WEIGHTS_INDEX_NAME}): a file left by an earlier save; remove it"
            )
        raise CheckpointError(
            "the checkpoint holds no packed tensors (*.weight_packed) although its config.json declares "
            f"compressed-tensors {PACK_QUANTIZED!r} weights; it was not saved from a quantized model"
        )
    saved_names = saved_state_dict_names(model, expected)
    in_checkpoint = checkpoint_layer_names(model, checkpoint_files)
    found, missing = {}, []
    for key, tensor in expected.items():
        saved = saved_names.get(key)
        candidates = [saved, key, in_checkpoint(key), in_checkpoint(saved) if saved else None]
        match = next((name for name in candidates if name in header), None)
        if match is None:
            missing.append(key)
            continue
        found[match] = key
        _compare_header(key, match, tensor, header[match], scheme)
    if missing and saved_as_another_class(model):
        layers, saved_as = sorted({key.rsplit(".", 1)[0] for key in missing}), _saved_classes(model)[0]
        raise CheckpointError(
            f"{type(model).__name__} has linear layers the checkpoint (saved from {saved_as}) does not hold, "
            f"e.g. {layers[:3]}: load it with {saved_as} (the default), or dense with plain transformers, "
            "which initialises the new layers"
        )
    if missing and len(missing) < len(expected):
        raise CheckpointError(
            f"the checkpoint is missing {len(missing)} packed tensors, e.g. {missing[:5]}; it is incomplete, or its "
            "quantization_config (symmetric, ignore) does not match the layers it holds"
        )
    if missing:
        logger.warning("could not map the checkpoint's packed tensor names to the model; verifying after loading")
        return
    unexpected = sorted(set(header) - set(found))
    if unexpected and saved_as_another_class(model):  # the other class's own layers (T5's decoder for its encoder)
        ours = _checkpoint_names_of_layers(model, in_checkpoint, saved_names)
        unexpected = [key for key in unexpected if key.rsplit(".", 1)[0] in ours]
    if unexpected and scheme.symmetric:
        unexpected = _without_zero_symmetric_zero_points(unexpected, found, checkpoint_files)
    if unexpected:
        raise CheckpointError(
            f"the checkpoint holds packed tensors for layers this model keeps in full precision, e.g. "
            f"{unexpected[:5]}: config.json's ignore list does not match the checkpoint, and those layers would "
            "load with random weights"
        )


SYMMETRIC_ZERO_POINT_KEY = r"\.weight_zero_point$"
"""The checkpoint keys (a pattern, as transformers' ``_keys_to_ignore_on_load_unexpected`` takes them)
of zero points a symmetric layer does not read."""


def _without_zero_symmetric_zero_points(unexpected: list[str], found: Mapping[str, str], checkpoint_files) -> list[str]:
    """``unexpected`` less the zero points a symmetric scheme's packed layers need not store (some
    compressed-tensors releases wrote them, all zero, for every scheme): plain transformers passes
    them over, and so does hf_comq once they are read and found zero.  Nonzero ones contradict the
    scheme: refused."""
    zero_points = [
        key for key in unexpected
        if re.search(SYMMETRIC_ZERO_POINT_KEY, key) and key.removesuffix("_zero_point") + "_packed" in found
    ]  # fmt: skip
    if not zero_points:
        return unexpected
    wanted, nonzero = set(zero_points), []
    for path in _safetensors_files(checkpoint_files) or []:
        with safe_open(path, framework="pt") as handle:
            nonzero += [key for key in handle.keys() if key in wanted and bool(handle.get_tensor(key).any())]
    if nonzero:
        raise CheckpointError(
            f"config.json declares a symmetric scheme, yet the checkpoint stores nonzero zero points for its packed "
            f"layers, e.g. {sorted(nonzero)[:3]}: its config and tensors disagree; load it dense with plain "
            "transformers only if you know which is right"
        )
    logger.info("the checkpoint stores all-zero zero points for its symmetric layers; they are not needed and not read")
    return [key for key in unexpected if key not in wanted]


def quantizes_experts(checkpoint_files: Iterable[str]) -> bool:
    """Whether a checkpoint holds packed mixture-of-experts layers (``...experts.<e>.<layer>.weight_packed``).

    Such a model must be given per-expert layers (:class:`~hf_comq.nn.UnfusedExperts`)
    before loading; a checkpoint whose experts stayed dense loads into the batched
    tensors as usual.  Files other than safetensors cannot be read ahead: ``False``.
    """
    header = _packed_header(checkpoint_files) or {}
    return any(_PER_EXPERT.search(key.removesuffix("_packed")) for key in header if key.endswith(".weight_packed"))


def stores_experts_per_expert(checkpoint_files: Iterable[str], layer_names: Iterable[str]) -> bool:
    """Whether a full-precision checkpoint names its experts one by one, as ``...experts.<e>.<layer>.weight``
    for every one of ``layer_names`` (the model's gate, up and down names, e.g. Mixtral's ``w1``, ``w3``, ``w2``).

    Then a model quantized while loading can take them straight into per-expert layers,
    with no batched tensors merged on the way (under a memory budget transformers builds
    those merges in memory).  ``False`` for other layouts, other layer names (the
    per-expert layers would find no weights) and files other than safetensors.
    """
    files = [str(path) for path in checkpoint_files]
    if not files or not all(path.endswith(".safetensors") and os.path.isfile(path) for path in files):
        return False
    found: set[str] = set()
    for path in files:
        with safe_open(path, framework="pt") as handle:
            found.update(match.group(1) for match in map(_PER_EXPERT.search, handle.keys()) if match)
    return bool(found) and set(layer_names) <= found


_PER_EXPERT = re.compile(r"\.experts\.\d+\.([^.]+)\.weight$")


def _checkpoint_names_of_layers(model: nn.Module, in_checkpoint: Callable[[str], str | None], saved: dict) -> set[str]:
    """Every name a linear layer of ``model`` may carry in a checkpoint (see :func:`packed_in_checkpoint`)."""
    names = set()
    for name, module in model.named_modules():
        if name and is_linear_like(module):
            names |= {name, in_checkpoint(name)}
    names |= {value.rsplit(".", 1)[0] for value in saved.values()}
    return names - {None}


def _safetensors_files(checkpoint_files: Iterable[str]) -> list[str] | None:
    """The checkpoint's files, or ``None`` unless all are safetensors files here, whose headers read cheaply."""
    files = [str(path) for path in checkpoint_files]
    if not files or not all(path.endswith(".safetensors") and os.path.isfile(path) for path in files):
        return None
    return files


def _checkpoint_keys(checkpoint_files: Iterable[str]) -> list[str]:
    """Every tensor name in safetensors files (headers only); empty if any file is not safetensors."""
    keys = []
    for path in _safetensors_files(checkpoint_files) or ():
        with safe_open(path, framework="pt") as handle:
            keys.extend(handle.keys())
    return keys


def _packed_header(checkpoint_files: Iterable[str]) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """``{key: (shape, dtype)}`` of the packed tensors in safetensors files; ``None`` if any file is not safetensors."""
    files = _safetensors_files(checkpoint_files)
    if files is None:
        return None
    header = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(PACKED_SUFFIXES):
                    view = handle.get_slice(key)
                    header[key] = (tuple(view.get_shape()), view.get_dtype())
    return header


_FLOAT_SCALE_DTYPES = ("F32", "BF16", "F16")  # compressed-tensors stores scales in the weight's dtype; loaded as float32


def _compare_header(key: str, saved: str, tensor: torch.Tensor, entry: tuple, scheme: PackedScheme) -> None:
    shape, dtype = entry
    want_dtype = _SAFETENSORS_DTYPES[tensor.dtype]
    dtype_fits = dtype in _FLOAT_SCALE_DTYPES if want_dtype == "F32" else dtype == want_dtype
    if tuple(shape) != tuple(tensor.shape) or not dtype_fits:
        alias = "" if saved == key else f" (saved as {saved})"
        raise CheckpointError(
            f"checkpoint tensor {key}{alias} has shape {tuple(shape)} and dtype {dtype}, expected "
            f"{tuple(tensor.shape)} {want_dtype} for bits={scheme.bits}, group_size={scheme.group_size}, "
            f"symmetric={scheme.symmetric}: the checkpoint does not match its quantization_config"
        )


# ---------------------------------------------------------------------------- who can run a checkpoint
VLLM_READ = "vLLM 0.33 source, read but not run by hf_comq"
VLLM_MOE_READ = "vLLM 0.34 source, read but not run by hf_comq"


CONVERTER_CLASH_CLASSES = ("Dinov2",)
"""Model classes (name prefixes, Dinov2 with registers included) whose compressed-tensors checkpoints
transformers 5.2x cannot load: it merges the packed tensor names into the model's own SwiGLU weight
converter, which then refuses them (tests/test_plain_transformers.py)."""


PER_EXPERT_CLASSES = ("Llama4",)
"""Mixture-of-experts classes (name prefixes) for which transformers expects per-expert layers in a
compressed-tensors checkpoint: with the experts batched (in full precision) it loads without an error,
the experts' weights left random (tests/test_plain_transformers.py)."""

DOES_NOT_LOAD = "does not load it"
"""How a :func:`runtime_support` row starts where the runtime cannot load the checkpoint."""


def zero_points_plain_loading_fails_on(scheme: PackedScheme, layers: Mapping[str, tuple[int, int]]) -> list[str]:
    """The layers (``name -> (out_features, in_features)``) whose zero points compressed-tensors
    (0.18 to 0.20) cannot unpack, so that plain transformers fails to load the checkpoint.

    At 4 bits that library unpacks packed zero points through a transposed byte view, which
    it refuses when they fill one ``int32`` row (8 output rows or fewer) over several groups
    (``self.stride(-1) must be 1 to view Int as Byte``); only asymmetric group-wise ``Linear``
    schemes pack zero points that way.  ``hf_comq.load_quantized`` reads them.
    """
    if scheme.layer_type != LINEAR or scheme.symmetric or scheme.bits != 4 or scheme.group_size is None:
        return []
    return [
        name
        for name, (out_features, in_features) in layers.items()
        if out_features * scheme.bits <= 32 and group_count(in_features, scheme.group_size) > 1
    ]


def runtime_support(
    scheme: PackedScheme,
    model_class: str | None = None,
    *,
    batched_experts: bool = False,
    quantized_experts: bool = False,
    weight_buffers: bool = False,
    narrow_zero_points: list[str] | None = None,
) -> list[tuple[str, str]]:
    """``(runtime, what it does with this checkpoint)`` rows for the model card and the README.

    Only what hf_comq's tests run is stated as fact; vLLM is described from its source
    (benchmarks/gpu/FACTS.md) and marked unverified until the checks in benchmarks/gpu/ have run.
    ``batched_experts``: a mixture-of-experts model with batched expert tensors left in
    full precision, which plain transformers' compressed-tensors loader does not load.
    ``quantized_experts``: one whose experts are packed per expert, which it loads only
    on a symmetric grid: its loader of packed experts drops the zero points
    (tests/test_plain_transformers.py).  ``weight_buffers``: a model with buffers named
    ``weight`` (:func:`hf_comq.modules.modules_with_weight_buffers`, e.g. DETR's frozen batch norms),
    which that loader's dequantizing converter takes for packed weights and fails on.
    ``narrow_zero_points``: the layers :func:`zero_points_plain_loading_fails_on` names.
    """
    if batched_experts and model_class and model_class.startswith(PER_EXPERT_CLASSES):
        plain = (
            f"{DOES_NOT_LOAD} correctly: it loads without an error, but with the experts' weights random (wrong "
            "outputs), as it expects per-expert layers in a compressed-tensors checkpoint"
        )
    elif batched_experts:
        plain = f"{DOES_NOT_LOAD}: its compressed-tensors loader breaks the mixture-of-experts weight converters"
    elif quantized_experts and not scheme.symmetric:
        plain = (
            f"{DOES_NOT_LOAD}: its loader of packed mixture-of-experts layers drops the zero points "
            "(quantize with `symmetric=True`, `hf-comq quantize --symmetric`, for a checkpoint it loads)"
        )
    elif narrow_zero_points:
        plain = (
            f"{DOES_NOT_LOAD}: its compressed-tensors fails to unpack the 4-bit zero points of layers with 8 or fewer "
            f"outputs ({', '.join(f'`{name}`' for name in narrow_zero_points[:3])}"
            f"{', ...' if len(narrow_zero_points) > 3 else ''}; quantize with `symmetric=True`, `hf-comq quantize "
            "--symmetric`, for a checkpoint it loads)"
        )
    elif weight_buffers:
        plain = (
            f"{DOES_NOT_LOAD}: its compressed-tensors loader dequantizes every `weight` it reads, buffers "
            "too (frozen batch norms), and fails on them"
        )
    elif model_class and model_class.startswith(CONVERTER_CLASH_CLASSES):
        plain = (
            f"{DOES_NOT_LOAD}: its compressed-tensors loader merges the packed names into the model's weight converter"
        )
    elif scheme.layer_type == CONV1D:
        plain = (
            f"loads it exactly with transformers {MIN_TRANSFORMERS_FOR_CONV1D} or later, as dense weights dequantized "
            f"while loading (earlier 5.x releases leave the `Conv1D` layers' weights random)"
        )
    else:
        plain = "loads it exactly, as dense weights dequantized while loading"
    rows = [
        (f"transformers + `compressed-tensors{SUPPORTED_COMPRESSED_TENSORS}`, no hf_comq", plain),
        ("`hf_comq.load_quantized`", "loads it exactly; the quantized layers stay packed in memory"),
    ]
    if scheme.layer_type == CONV1D:
        vllm = "not served: vLLM has no compressed-tensors scheme for transformers `Conv1D` layers (load error)"
    elif quantized_experts:
        vllm = f"compressed-tensors `WNA16` MoE method, {_vllm_moe_kernel(scheme)}; {VLLM_MOE_READ}"
    elif model_class is not None and model_class.endswith("ForImageClassification"):
        vllm = f"not served: vLLM has no ViT / Dinov2 image-classifier architecture; {VLLM_READ}"
    elif model_class not in (None, "AutoModel") and not model_class.endswith("ForCausalLM"):
        vllm = "not checked: hf_comq's vLLM notes cover causal LMs"
    else:
        fast = scheme.bits in (4, 8) and scheme.group_size in (None, 32, 64, 128)
        kernel = "Marlin (Machete on Hopper)" if fast else "the generic Humming kernel"
        vllm = f"compressed-tensors `WNA16` scheme, {kernel}; {VLLM_READ}"
    rows.append(("vLLM", vllm))
    return rows


def plain_loading_requirements(scheme: PackedScheme) -> str:
    """What to ``pip install`` for plain transformers to load a checkpoint of this scheme (quoted specifiers)."""
    requirements = [f'"{COMPRESSED_TENSORS}{SUPPORTED_COMPRESSED_TENSORS}"']
    if scheme.layer_type == CONV1D:
        requirements.append(f'"transformers>={MIN_TRANSFORMERS_FOR_CONV1D}"')
    return " ".join(requirements)


def _vllm_moe_kernel(scheme: PackedScheme) -> str:
    """Which of vLLM's WNA16 MoE kernels takes these experts (benchmarks/gpu/FACTS.md, Q5b)."""
    marlin_grid = scheme.bits == 4 or (scheme.bits == 8 and scheme.symmetric)
    if marlin_grid and scheme.group_size in (None, 32, 64, 128):
        return "Marlin kernels"
    if scheme.bits == 4:
        return "Triton kernels"
    return "only with its optional Humming kernels (2, 3, 5-7 bits, 8 bits off Marlin's grids)"
