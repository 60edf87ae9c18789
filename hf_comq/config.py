"""``COMQConfig``: the ``quantization_config`` for COMQ in ``from_pretrained``.

Every field is declared once, in the dataclass below; its metadata says what kind of
setting it is, and that drives validation, serialization and the model card:

* ``format``: what the checkpoint contains (``bits``, ``group_size``, ``symmetric``);
* ``solver``: how each layer is solved (passed to :func:`hf_comq.comq_quantize`);
* ``calibration``: what the layers are calibrated on.  ``dataset`` and ``processor``
  may be large in-memory objects: the after-weight-loading hook receives no kwargs,
  so they travel on the config, but they are never deep-copied (``from_pretrained``
  copies the config twice) nor serialized -- only a string reference (a dataset name,
  a local path shrunk to its last component) and a one-line description are written;
* ``selection``: which layers are quantized and in which order they are calibrated;
* ``recorded``: set by quantization (or read back from a checkpoint), not by users.

Serialized (``to_dict``, hence ``config.json``), a COMQConfig *is* a compressed-tensors
``pack-quantized`` ``quantization_config`` (:mod:`hf_comq.checkpoint`), so plain
transformers and vLLM load COMQ checkpoints; the COMQ settings ride along under the
``"comq"`` key (provenance) and :meth:`COMQConfig.from_dict` reads either form back.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import CONV1D, LINEAR, PROVENANCE_KEY, PackedScheme, quantization_config_dict, read_packed_scheme
from .solver import CLIP_WEIGHTS, MAX_START_GRIDS, ORDERS, SOLVER_DEFAULTS, START_POINTS

logger = logging.getLogger(__name__)

QUANT_METHOD = "comq"
MIN_BITS, MAX_BITS = 2, 8
FORMAT, SOLVER, CALIBRATION, SELECTION, RECORDED = "format", "solver", "calibration", "selection", "recorded"
_LIVE_OBJECTS = ("dataset", "processor")  # may hold data or models: shared on copy, written as a reference only


def _setting(default: Any, kind: str, help: str) -> Any:
    return field(default=default, metadata={"kind": kind, "help": help})


@dataclass(repr=False, eq=False)
class COMQConfig(QuantizationConfigMixin):
    """Settings for COMQ post-training quantization during ``from_pretrained``.

    See each field's ``help`` (``COMQConfig.help(name)``) and the README's field table;
    solver fields are documented in :func:`hf_comq.comq_quantize`.
    """

    bits: int = _setting(SOLVER_DEFAULTS["bits"], FORMAT, "code width, 2 to 8")
    group_size: int | None = _setting(
        None, FORMAT, "input columns sharing one scale/zero point; None (or -1) = one per output channel"
    )
    symmetric: bool = _setting(SOLVER_DEFAULTS["symmetric"], FORMAT, "zero point fixed at mid-range")
    iterations: int = _setting(SOLVER_DEFAULTS["iterations"], SOLVER, "maximum coordinate sweeps per layer")
    order: str = _setting(SOLVER_DEFAULTS["order"], SOLVER, f"column order of a sweep, one of {list(ORDERS)}")
    init: str = _setting(SOLVER_DEFAULTS["init"], SOLVER, f"start point, one of {list(START_POINTS)}")
    scale_refit: bool = _setting(SOLVER_DEFAULTS["scale_refit"], SOLVER, "closed-form scale refit after every sweep")
    scale_search: bool = _setting(SOLVER_DEFAULTS["scale_search"], SOLVER, "searched clipping of each row's range")
    shrink: float = _setting(SOLVER_DEFAULTS["shrink"], SOLVER, "fixed factor on the initial range")
    damp: float | None = _setting(SOLVER_DEFAULTS["damp"], SOLVER, "relative damping of the error-feedback start")
    clip_weights: str = _setting(
        SOLVER_DEFAULTS["clip_weights"], SOLVER, f"how the clipping search weighs inputs, one of {list(CLIP_WEIGHTS)}"
    )
    start_grids: int = _setting(
        SOLVER_DEFAULTS["start_grids"], SOLVER, f"clipping grids the start tries side by side, 1 to {MAX_START_GRIDS}"
    )
    dataset: Any = _setting(None, CALIBRATION, "calibration data: a datasets object, a name or path, or samples")
    processor: Any = _setting(None, CALIBRATION, "image processor / tokenizer (object or path); None = the model's")
    dataset_split: str = _setting("train", CALIBRATION, "split of a named dataset")
    dataset_column: str | None = _setting(None, CALIBRATION, "column of a named dataset (default: image or text)")
    num_samples: int = _setting(128, CALIBRATION, "calibration samples (seeded shuffle)")
    batch_size: int = _setting(8, CALIBRATION, "samples per calibration forward pass")
    max_length: int = _setting(512, CALIBRATION, "text truncation length in tokens")
    seed: int = _setting(0, CALIBRATION, "seed of the calibration sample choice")
    modules_to_not_convert: list[str] | None = _setting(
        None, SELECTION, "module names kept in full precision besides the task head (which always is)"
    )
    block_name: str | None = _setting(None, SELECTION, "dotted name of the block list, overriding discovery")
    sequential: bool = _setting(True, SELECTION, "calibrate each block on the quantized prefix's outputs")
    calibration_description: str | None = _setting(None, RECORDED, "what the model was calibrated on")
    calibration_samples: int | None = _setting(None, RECORDED, "calibration samples actually used")
    ignore: list[str] | None = _setting(None, RECORDED, "exact names of the linear layers kept in full precision")
    layer_type: str | None = _setting(None, RECORDED, "class of the quantized layers: Linear or Conv1D")
    conv1d_rows: int | None = _setting(None, RECORDED, "Conv1D scheme: block height of a per-channel grid")
    base_model: str | None = _setting(None, RECORDED, "Hub id of the checkpoint that was quantized")
    base_model_folder: str | None = _setting(None, RECORDED, "folder name of a local checkpoint that was quantized")
    quant_method: str = QUANT_METHOD

    def __post_init__(self) -> None:
        if self.quant_method != QUANT_METHOD:
            raise ValueError(
                f"quant_method: COMQConfig only describes {QUANT_METHOD!r}, got {self.quant_method!r}; "
                "load other methods with their own config class"
            )
        if self.group_size == -1:
            self.group_size = None
        for name in ("modules_to_not_convert", "ignore"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        self.post_init()
        from .registration import register  # a config is about to reach from_pretrained, however it was imported

        register()

    # ------------------------------------------------------------------ field table
    @classmethod
    def field_names(cls, kind: str | None = None) -> tuple[str, ...]:
        """The settings' names, in declaration order, optionally only those of one ``kind``."""
        return tuple(f.name for f in fields(cls) if "kind" in f.metadata and kind in (None, f.metadata["kind"]))

    @classmethod
    def default(cls, name: str) -> Any:
        """A field's default value (the one place defaults are written)."""
        spec = next(f for f in fields(cls) if f.name == name)
        return None if spec.default is MISSING else spec.default

    @classmethod
    def help(cls, name: str) -> str:
        return next(f for f in fields(cls) if f.name == name).metadata["help"]

    # ------------------------------------------------------------------ validation
    def post_init(self) -> None:
        """Validate every field; each error names the field and how to fix it."""
        _check_int("bits", self.bits, MIN_BITS, MAX_BITS, "use 4 (near-lossless), 3 or 2 (smaller), up to 8")
        if self.group_size is not None:
            _check_int("group_size", self.group_size, 1, None, "use e.g. 32, 64 or 128, or None for per-channel scales")
        _check_bool("symmetric", self.symmetric)
        _check_int("iterations", self.iterations, 0, None, "use 1 to 3 coordinate sweeps")
        _check_choice("order", self.order, ORDERS)
        _check_choice("init", self.init, START_POINTS)
        _check_bool("scale_refit", self.scale_refit)
        _check_bool("scale_search", self.scale_search)
        _check_float("shrink", self.shrink, "use a factor in (0, 1], e.g. 1.0 at 4 bits, 0.65 at 2 bits", upper=1.0)
        if self.damp is not None:
            _check_float("damp", self.damp, "use a small positive damping such as 0.01, or None for the default")
        _check_choice("clip_weights", self.clip_weights, CLIP_WEIGHTS)
        _check_int("start_grids", self.start_grids, 1, MAX_START_GRIDS, "use 3 (the default), or 1 for a faster start")
        self._check_dataset()
        if self.processor is not None and isinstance(self.processor, str) and not self.processor.strip():
            raise ValueError("processor: got an empty string; pass a processor object, a path, or None")
        _check_str("dataset_split", self.dataset_split, optional=False)
        _check_str("dataset_column", self.dataset_column, optional=True)
        _check_int("num_samples", self.num_samples, 1, None, "use e.g. 128 calibration samples")
        _check_int("batch_size", self.batch_size, 1, None, "use e.g. 8")
        _check_int("max_length", self.max_length, 1, None, "use e.g. 512 tokens")
        _check_int("seed", self.seed, 0, None, "use a non-negative integer")
        _check_names("modules_to_not_convert", self.modules_to_not_convert, "e.g. ['layers.0'] or ['layers.*.mlp']")
        _check_str("block_name", self.block_name, optional=True)
        _check_bool("sequential", self.sequential)
        _check_str("calibration_description", self.calibration_description, optional=True, allow_empty=True)
        if self.calibration_samples is not None:
            _check_int("calibration_samples", self.calibration_samples, 0, None, "leave it to calibration")
        _check_names("ignore", self.ignore, "exact module names; leave it to quantization")
        if self.layer_type is not None:
            _check_choice("layer_type", self.layer_type, (LINEAR, CONV1D))
        if self.conv1d_rows is not None:
            _check_int("conv1d_rows", self.conv1d_rows, 1, None, "leave it to quantization")
        _check_str("base_model", self.base_model, optional=True)
        _check_str("base_model_folder", self.base_model_folder, optional=True)

    def _check_dataset(self) -> None:
        data = self.dataset
        if data is None:
            return
        if isinstance(data, str):
            if not data.strip():
                raise ValueError("dataset: got an empty string; pass a dataset name or path, data, or None")
            return
        if isinstance(data, (list, tuple)) and len(data) == 0:
            raise ValueError("dataset: the list is empty; pass at least one calibration sample")
        if isinstance(data, (bytes, int, float, bool)) or not (
            isinstance(data, torch.Tensor) or hasattr(data, "__iter__")
        ):
            raise ValueError(
                f"dataset: unsupported type {type(data).__name__}; pass a datasets.Dataset/IterableDataset, "
                "a dataset name or local path, a list of PIL images or strings, a tensor, or a list of dicts"
            )

    # ------------------------------------------------------------------ serialization
    def packed_scheme(self) -> PackedScheme:
        """The checkpoint scheme these settings produce (layout fields are known once quantization ran)."""
        return PackedScheme(
            bits=self.bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
            layer_type=self.layer_type or LINEAR,
            conv1d_rows=self.conv1d_rows,
            ignore=list(self.ignore or []),
            provenance=self.provenance(),
        )

    def provenance(self) -> dict[str, Any]:
        """The COMQ settings behind a checkpoint, grouped by kind, JSON-safe (``config.json["..."]["comq"]``)."""
        from . import __version__

        record: dict[str, Any] = {
            "hf_comq_version": __version__,
            "base_model": self.base_model,
            "base_model_folder": self.base_model_folder,
        }
        for kind in (SOLVER, CALIBRATION, SELECTION):
            record[kind] = {name: self._serialized(name) for name in self.field_names(kind)}
        record[CALIBRATION]["description"] = self.describe_calibration()
        record[CALIBRATION]["samples_used"] = self.calibration_samples
        return record

    def _serialized(self, name: str) -> Any:
        value = getattr(self, name)
        if name in _LIVE_OBJECTS:
            return portable_reference(value) if isinstance(value, (str, os.PathLike)) else None
        return copy.deepcopy(value)

    def to_dict(self) -> dict[str, Any]:
        """The compressed-tensors ``quantization_config`` (JSON-safe), COMQ settings under ``"comq"``."""
        return quantization_config_dict(self.packed_scheme())

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __iter__(self):
        """``dict(config)`` without deep-copying the dataset (the mixin copies ``__dict__``)."""
        yield from self.to_dict().items()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Read a compressed-tensors ``quantization_config`` (what ``to_dict`` writes) or plain field values.

        Unknown keys (e.g. from a newer hf_comq) are dropped with a warning rather than
        failing a load; ``COMQConfig(...)`` itself rejects them.
        """
        values = cls._values_from(config_dict)
        known = set(cls.field_names())
        unknown = sorted(set(values) - known - {"quant_method"})
        if unknown:
            logger.warning("COMQConfig ignores unknown keys %s; known keys are %s", unknown, sorted(known))
        config = cls(**{name: value for name, value in values.items() if name in known})
        unused = {}
        for key, value in kwargs.items():
            if key in known:
                setattr(config, key, value)
            else:
                unused[key] = value
        config.post_init()
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def _values_from(cls, config_dict: dict[str, Any]) -> dict[str, Any]:
        if "config_groups" not in config_dict:
            return dict(config_dict)
        scheme = read_packed_scheme(config_dict)
        values: dict[str, Any] = {}
        for key, value in scheme.provenance.items():
            if isinstance(value, dict):
                values.update(value)
            elif key in cls.field_names():
                values[key] = value
        values["calibration_description"] = values.pop("description", None)
        values["calibration_samples"] = values.pop("samples_used", None)
        values.update(
            bits=scheme.bits,
            group_size=scheme.group_size,
            symmetric=scheme.symmetric,
            ignore=scheme.ignore,
            layer_type=scheme.layer_type,
            conv1d_rows=scheme.conv1d_rows,
        )
        return values

    def describe_calibration(self) -> str | None:
        """One line naming the calibration data and processor, or ``None`` when there is none."""
        if self.calibration_description is not None:
            return self.calibration_description
        if self.dataset is None:
            return None
        text = f"dataset: {describe_object(self.dataset)}"
        if self.processor is not None:
            text += f"; processor: {describe_object(self.processor)}"
        return text

    def __deepcopy__(self, memo: dict) -> COMQConfig:
        """Copy the settings but share ``dataset`` and ``processor`` by reference.

        ``from_pretrained`` deep-copies the config; copying a dataset would cost memory
        and time, and a streaming dataset or tokenizer may not be copyable at all.
        """
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            setattr(clone, name, value if name in _LIVE_OBJECTS else copy.deepcopy(value, memo))
        return clone

    def format_mismatches(self, other: COMQConfig) -> dict[str, tuple[Any, Any]]:
        """Format fields (``bits``, ``group_size``, ``symmetric``) that differ: ``{field: (self, other)}``."""
        return {
            name: (getattr(self, name), getattr(other, name))
            for name in self.field_names(FORMAT)
            if getattr(self, name) != getattr(other, name)
        }


def portable_reference(value: str | os.PathLike) -> str:
    """A dataset or processor reference fit for a published ``config.json``: Hub names
    stay as they are, local paths shrink to their last component (their name)."""
    text = os.fspath(value)
    path = Path(text).expanduser()
    if path.is_absolute() or path.exists():
        return path.name or text
    return text


def describe_object(value: Any) -> str:
    """Short, JSON-safe description of a dataset or processor (never its contents)."""
    if isinstance(value, (str, os.PathLike)):
        return portable_reference(value)
    kind = type(value).__name__
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        first = type(value[0]).__name__ if value else "nothing"
        return f"{kind} of {len(value)} {first} items"
    name = getattr(value, "name_or_path", None) or getattr(getattr(value, "info", None), "dataset_name", None)
    size = _safe_len(value)
    parts = [kind]
    if name:
        parts.append(repr(str(name)))
    if size is not None:
        parts.append(f"{size} rows")
    return " ".join(parts)


def _safe_len(value: Any) -> int | None:
    try:
        return len(value)
    except TypeError:
        return None


def _check_int(name: str, value: Any, low: int | None, high: int | None, fix: str) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an integer {bounds}, got {value!r}; {fix}")


def _check_float(name: str, value: Any, fix: str, upper: float | None = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    ok = ok and value > 0 and (upper is None or value <= upper)
    if not ok:
        bounds = f"in (0, {upper}]" if upper is not None else "> 0"
        raise ValueError(f"{name}: expected a number {bounds}, got {value!r}; {fix}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def _check_str(name: str, value: Any, optional: bool, allow_empty: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        hint = "a non-empty string or None" if optional else "a non-empty string"
        raise ValueError(f"{name}: expected {hint}, got {value!r}")


def _check_names(name: str, value: Any, fix: str) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"{name}: expected a list of module names, got {value!r}; use {fix}")
