"""``COMQConfig``: the ``quantization_config`` for COMQ in ``from_pretrained``.

Two kinds of fields live here:

* **format** fields (``bits``, ``group_size``, ``symmetric``, ``modules_to_not_convert``)
  decide what a checkpoint contains; they are written to ``config.json`` and are
  what loading a pre-quantized checkpoint relies on.
* **calibration** fields (solver settings, ``dataset``, ``processor``, ...) only matter
  while quantizing.  ``dataset`` and ``processor`` may be large in-memory objects: the
  after-weight-loading hook receives no kwargs, so they must travel on the config,
  but they must never be deep-copied (``from_pretrained`` copies the config twice) nor
  serialized (``save_pretrained`` JSON-encodes ``to_dict()``).  ``to_dict`` therefore
  keeps them only when they are plain strings (a dataset name/path, a processor
  path) and otherwise writes ``None`` plus a one-line ``calibration_description``.
  A string naming a local file or folder is written as its last path component:
  the full path means nothing on another machine and would publish the user's
  directory layout with ``push_to_hub``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from .solver import ORDERS, SOLVER_DEFAULTS, START_POINTS

logger = logging.getLogger(__name__)

QUANT_METHOD = "comq"
MIN_BITS, MAX_BITS = 2, 8
FORMAT_FIELDS = ("bits", "group_size", "symmetric")
_SHARED_FIELDS = ("dataset", "processor")


class COMQConfig(QuantizationConfigMixin):
    """Settings for COMQ post-training quantization during ``from_pretrained``.

    Args:
        bits: code width, 2 to 8.
        group_size: input columns sharing one scale/zero point; ``None`` (or -1) for one
            per output channel, as in the COMQ paper.  Must divide every quantized
            layer's ``in_features``.
        symmetric: zero point fixed at mid-range instead of an asymmetric min-max grid.
        iterations, order, init, scale_refit, scale_search, shrink, damp: passed to
            :func:`hf_comq.comq_quantize` (see its docstring).
        dataset: calibration data: a ``datasets`` (Iterable)Dataset, a dataset name or
            local path, a list of PIL images or strings, a tensor, or a list of dicts
            of model inputs.
        processor: image processor / tokenizer / processor object, or a path; ``None``
            uses the checkpoint's own.
        dataset_split, dataset_column: which split and column of a named dataset.
        num_samples: calibration samples (seeded shuffle with ``seed``).
        batch_size: samples per forward pass while calibrating.
        max_length: text truncation length.
        seed: seed of the calibration sample shuffle.
        modules_to_not_convert: module names kept in full precision (matching rule in
            :mod:`hf_comq.modules`); ``None`` = the task head (see
            :func:`hf_comq.modules.default_modules_to_not_convert`).  After
            quantization this holds the resolved list, so a reload converts exactly the
            layers that were quantized.
        block_name: dotted name of the ``nn.ModuleList`` of blocks to calibrate
            sequentially, overriding automatic discovery.
        sequential: calibrate each block on the outputs of the already quantized
            prefix (``True``) or every layer on full-precision inputs (``False``, the
            reference code's mode).
        calibration_description: short text describing the calibration data, set by
            calibration and written to ``config.json`` / the model card.
    """

    def __init__(
        self,
        bits: int = SOLVER_DEFAULTS["bits"],
        group_size: int | None = None,
        symmetric: bool = SOLVER_DEFAULTS["symmetric"],
        iterations: int = SOLVER_DEFAULTS["iterations"],
        order: str = SOLVER_DEFAULTS["order"],
        init: str = SOLVER_DEFAULTS["init"],
        scale_refit: bool = SOLVER_DEFAULTS["scale_refit"],
        scale_search: bool = SOLVER_DEFAULTS["scale_search"],
        shrink: float = SOLVER_DEFAULTS["shrink"],
        damp: float | None = SOLVER_DEFAULTS["damp"],
        dataset: Any = None,
        processor: Any = None,
        dataset_split: str = "train",
        dataset_column: str | None = None,
        num_samples: int = 128,
        batch_size: int = 8,
        max_length: int = 512,
        seed: int = 0,
        modules_to_not_convert: list[str] | None = None,
        block_name: str | None = None,
        sequential: bool = True,
        calibration_description: str | None = None,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ):
        if quant_method != QUANT_METHOD:
            raise ValueError(
                f"quant_method: COMQConfig only describes {QUANT_METHOD!r} checkpoints, got {quant_method!r}; "
                "load other methods with their own config class"
            )
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = None if group_size == -1 else group_size
        self.symmetric = symmetric
        self.iterations = iterations
        self.order = order
        self.init = init
        self.scale_refit = scale_refit
        self.scale_search = scale_search
        self.shrink = shrink
        self.damp = damp
        self.dataset = dataset
        self.processor = processor
        self.dataset_split = dataset_split
        self.dataset_column = dataset_column
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed
        self.modules_to_not_convert = (
            list(modules_to_not_convert) if isinstance(modules_to_not_convert, tuple) else modules_to_not_convert
        )
        self.block_name = block_name
        self.sequential = sequential
        self.calibration_description = calibration_description
        if kwargs:
            logger.warning(
                "COMQConfig ignores unknown keys %s; known keys are %s", sorted(kwargs), sorted(self._field_names())
            )
        self.post_init()

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
            _check_float("damp", self.damp, "use a small non-negative damping such as 0.01, or None", lower_inclusive=True)
        self._check_dataset()
        if self.processor is not None and isinstance(self.processor, str) and not self.processor.strip():
            raise ValueError("processor: got an empty string; pass a processor object, a path, or None")
        _check_str("dataset_split", self.dataset_split, optional=False)
        _check_str("dataset_column", self.dataset_column, optional=True)
        _check_int("num_samples", self.num_samples, 1, None, "use e.g. 128 calibration samples")
        _check_int("batch_size", self.batch_size, 1, None, "use e.g. 8")
        _check_int("max_length", self.max_length, 1, None, "use e.g. 512 tokens")
        _check_int("seed", self.seed, 0, None, "use a non-negative integer")
        self._check_modules_to_not_convert()
        _check_str("block_name", self.block_name, optional=True)
        _check_bool("sequential", self.sequential)
        _check_str("calibration_description", self.calibration_description, optional=True, allow_empty=True)

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

    def _check_modules_to_not_convert(self) -> None:
        names = self.modules_to_not_convert
        if names is None:
            return
        if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
            raise ValueError(
                "modules_to_not_convert: expected a list of module names such as ['classifier'], "
                f"got {names!r}; use None for the default (the task head)"
            )

    # ------------------------------------------------------------------ serialization
    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        return (
            "quant_method", "bits", "group_size", "symmetric", "iterations", "order", "init", "scale_refit",
            "scale_search", "shrink", "damp", "dataset", "processor", "dataset_split", "dataset_column",
            "num_samples", "batch_size", "max_length", "seed", "modules_to_not_convert", "block_name",
            "sequential", "calibration_description",
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field; in-memory dataset/processor objects become ``None``.

        Their description goes to ``calibration_description`` (unless calibration set
        one), so the saved config still says what the model was calibrated on.
        """
        result = {}
        for name in self._field_names():
            value = getattr(self, name)
            if name in _SHARED_FIELDS:
                value = portable_reference(value) if isinstance(value, (str, os.PathLike)) else None
            result[name] = copy.deepcopy(value)
        if result["calibration_description"] is None:
            result["calibration_description"] = self.describe_calibration()
        return result

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __iter__(self):
        """``dict(config)`` without deep-copying the dataset (the mixin copies ``__dict__``)."""
        yield from self.to_dict().items()

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
            setattr(clone, name, value if name in _SHARED_FIELDS else copy.deepcopy(value, memo))
        return clone

    def format_mismatches(self, other: COMQConfig) -> dict[str, tuple[Any, Any]]:
        """Format fields (``bits``, ``group_size``, ``symmetric``) that differ: ``{field: (self, other)}``."""
        return {
            name: (getattr(self, name), getattr(other, name))
            for name in FORMAT_FIELDS
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


def _check_float(name: str, value: Any, fix: str, upper: float | None = None, lower_inclusive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    ok = ok and (value >= 0 if lower_inclusive else value > 0) and (upper is None or value <= upper)
    if not ok:
        bounds = ">= 0" if lower_inclusive else f"in (0, {upper}]" if upper is not None else "> 0"
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
