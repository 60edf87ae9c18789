"""Every COMQ setting, declared once: name, default, kind and help.

:class:`COMQSettings` is the field table behind :class:`hf_comq.COMQConfig` (which adds
what transformers needs: serialization, registration).  It imports neither torch nor
transformers, so ``hf-comq`` builds its options (types, defaults, help) from it before
paying for those imports.  Each field's metadata says what kind of setting it is:

* ``format``: what the checkpoint contains (``bits``, ``group_size``, ``symmetric``);
* ``solver``: how each layer is solved (passed to :func:`hf_comq.comq_quantize`);
* ``calibration``: what the layers are calibrated on.  ``dataset`` and ``processor``
  may be large in-memory objects: they travel on the config (the after-weight-loading
  hook receives no kwargs) but are never serialized, only referenced and described;
* ``selection``: which layers are quantized and in which order they are calibrated;
* ``recorded``: set by quantization (or read back from a checkpoint), not by users.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .assets import DEMO_PREFIX, DEMO_SPLITS
from .solver.options import (
    CLIP_WEIGHTS,
    DEFAULTS,
    MAX_BITS,
    MAX_BITS_AIMED_BY_DEFAULT,
    MAX_START_GRIDS,
    MIN_BITS,
    ORDERS,
    RIDGE_FROM_DATA,
    START_POINTS,
    SUM_DTYPES,
    check_damp,
    check_flag,
    check_pair_moves,
    check_ridge,
    per_channel_as_none,
)

FORMAT, SOLVER, CALIBRATION, SELECTION, RECORDED = "format", "solver", "calibration", "selection", "recorded"
LINEAR, CONV1D = "Linear", "Conv1D"  # the layer classes a checkpoint's scheme can target


def is_missing_local_path(name: str | os.PathLike) -> bool:
    """Whether ``name`` is written as a local path (``./x``, ``~/x``, ``/x``, ``a/b/c``, a ``PathLike``)
    and nothing is there: such a name is a mistyped path, and trying it as a Hub id would end in a
    connection error or in the Hub's naming rules instead of saying so."""
    text = os.fspath(name)
    as_path = not isinstance(name, str) or text.startswith((".", "~", os.sep)) or text.count("/") > 1
    return as_path and not os.path.exists(os.path.expanduser(text))


def setting(default: Any, kind: str, help: str) -> Any:
    """A field of the table: its default, its kind (see the module docstring) and one line of help."""
    return field(default=default, metadata={"kind": kind, "help": help})


@dataclass(repr=False, eq=False)
class COMQSettings:
    """The COMQ settings and their validation; see each field's ``help`` (``COMQSettings.help(name)``)."""

    bits: int = setting(DEFAULTS["bits"], FORMAT, f"code width, {MIN_BITS} to {MAX_BITS}")
    group_size: int | None = setting(
        None, FORMAT, "input columns sharing one scale/zero point; -1 (None in Python) = one per output channel"
    )
    symmetric: bool = setting(DEFAULTS["symmetric"], FORMAT, "zero point fixed at mid-range")
    iterations: int = setting(DEFAULTS["iterations"], SOLVER, "maximum coordinate sweeps per layer")
    order: str = setting(DEFAULTS["order"], SOLVER, f"column order of a sweep, one of {list(ORDERS)}")
    init: str = setting(DEFAULTS["init"], SOLVER, f"start point, one of {list(START_POINTS)}")
    scale_refit: bool | None = setting(
        DEFAULTS["scale_refit"], SOLVER, "closed-form scale refit after every sweep (default: at 2 bits only)"
    )
    scale_search: bool = setting(DEFAULTS["scale_search"], SOLVER, "searched clipping of each row's range")
    shrink: float = setting(DEFAULTS["shrink"], SOLVER, "fixed factor on the initial range")
    damp: float | None = setting(DEFAULTS["damp"], SOLVER, "relative damping of the error-feedback start")
    clip_weights: str = setting(
        DEFAULTS["clip_weights"], SOLVER, f"how the clipping search weighs inputs, one of {list(CLIP_WEIGHTS)}"
    )
    start_grids: int = setting(
        DEFAULTS["start_grids"], SOLVER, f"clipping grids the start tries side by side, 1 to {MAX_START_GRIDS}"
    )
    block_resolve: bool = setting(
        DEFAULTS["block_resolve"], SOLVER, "re-solve each column block towards its joint optimum after the first sweep"
    )
    pair_moves: int = setting(
        DEFAULTS["pair_moves"], SOLVER, "after every sweep, step two codes together where no single step helps, "
        "searching pairs among each row's this many cheapest single steps; 0 = off"
    )
    ridge: float | str = setting(
        DEFAULTS["ridge"], SOLVER, "Tikhonov term: solve on H + ridge * mean(diag H) * I (guards against fitting the "
        f"calibration set); {RIDGE_FROM_DATA!r}: each layer's Ledoit-Wolf amount, from its calibration tokens"
    )
    dataset: Any = setting(None, CALIBRATION, "calibration data: a datasets object, a name or path, or samples")
    processor: Any = setting(None, CALIBRATION, "image processor / tokenizer (object or path); None = the model's")
    dataset_split: str = setting("train", CALIBRATION, "split of a named dataset")
    dataset_column: str | None = setting(None, CALIBRATION, "column of a named dataset (default: the first of image/img/pixel_values, input_ids, text, messages)")
    num_samples: int = setting(128, CALIBRATION, "calibration samples (seeded shuffle)")
    batch_size: int = setting(8, CALIBRATION, "samples per calibration forward pass")
    max_length: int = setting(512, CALIBRATION, "text truncation length in tokens")
    seed: int = setting(0, CALIBRATION, "seed of the calibration sample choice")
    calibrate_all_experts: bool = setting(
        False, CALIBRATION, "mixture of experts: solve each expert on every calibration token, not only those routed to it"
    )
    sum_dtype: str = setting(
        SUM_DTYPES[0], CALIBRATION, f"dtype of the calibration sums (Gram matrices, fp_target's targets), one of "
        f"{list(SUM_DTYPES)}: float32 halves a block's largest buffers, and ranks then agree to float32 rounding "
        "rather than bit for bit"
    )
    modules_to_not_convert: list[str] | None = setting(
        None, SELECTION, "module names kept in full precision besides the task head (which always is), matched as in "
        "transformers' quantizers: the start of a name, a regex from the start, or a suffix"
    )
    block_name: str | None = setting(None, SELECTION, "dotted name of the block list, overriding discovery")
    sequential: bool = setting(True, SELECTION, "calibrate each block on the quantized prefix's outputs")
    fp_target: bool | None = setting(
        None, SELECTION, "aim each layer at the full-precision model's outputs, not its own on the quantized inputs "
        f"(default: at {MAX_BITS_AIMED_BY_DEFAULT} bits and fewer, with sequential)"
    )
    true_sequential: bool | None = setting(
        None, SELECTION, "solve each block's layers in stages (q/k/v, then o, then gate/up, then down), each on "
        "inputs made by the quantized layers of the stages before it (default: wherever layers are aimed at the "
        "full-precision outputs, fp_target)"
    )
    calibration_description: str | None = setting(None, RECORDED, "what the model was calibrated on")
    calibration_samples: int | None = setting(None, RECORDED, "calibration samples actually used")
    calibration_split: str | None = setting(
        None, RECORDED, "split the calibration data was read from (None: data without splits, such as one file)"
    )
    expert_layers_rounded: int | None = setting(
        None, RECORDED, "expert layers no calibration token reached, rounded to nearest instead"
    )
    ignore: list[str] | None = setting(None, RECORDED, "exact names of the linear layers kept in full precision")
    layer_type: str | None = setting(None, RECORDED, "class of the quantized layers: Linear or Conv1D")
    conv1d_rows: int | None = setting(None, RECORDED, "Conv1D scheme: block height of a per-channel grid")
    base_model: str | None = setting(None, RECORDED, "Hub id of the checkpoint that was quantized")
    base_model_folder: str | None = setting(None, RECORDED, "folder name of a local checkpoint that was quantized")
    hf_comq_version: str | None = setting(
        None, RECORDED, "hf_comq version that quantized the checkpoint (None: the running one, once it quantizes)"
    )
    other_producer: bool = setting(
        False, RECORDED, "the checkpoint was made by another tool (its quantization_config has no comq record): "
        "saved again without one and without a COMQ model card"
    )

    def __post_init__(self) -> None:
        self.post_init()

    def __eq__(self, other: object) -> bool:
        """Equal settings: every field equal, the live ``dataset`` / ``processor`` the same object
        (or the same name).  (The transformers mixin's dataclass equality compares ``quant_method`` only.)"""
        if type(other) is not type(self):
            return NotImplemented
        return all(
            _same_setting(getattr(self, name), getattr(other, name), live=name in ("dataset", "processor"))
            for name in self.field_names()
        )

    __hash__ = None  # mutable settings, as a dataclass with equality

    # ------------------------------------------------------------------ field table
    @classmethod
    def field_names(cls, kind: str | None = None) -> tuple[str, ...]:
        """The settings' names, in declaration order, optionally only those of one ``kind``."""
        return tuple(f.name for f in fields(cls) if "kind" in f.metadata and kind in (None, f.metadata["kind"]))

    @classmethod
    def default(cls, name: str) -> Any:
        """A field's default value (the one place defaults are written)."""
        spec = cls._field(name)
        return None if spec.default is MISSING else spec.default

    @classmethod
    def help(cls, name: str) -> str:
        """A field's one line of help."""
        return cls._field(name).metadata["help"]

    @classmethod
    def _field(cls, name: str) -> Any:
        spec = next((f for f in fields(cls) if f.name == name and "kind" in f.metadata), None)
        if spec is None:
            raise ValueError(f"{name!r} is not a COMQ setting; the settings are {', '.join(cls.field_names())}")
        return spec

    # ------------------------------------------------------------------ validation
    def post_init(self) -> None:
        """Normalise and validate every field; each error names the field and how to fix it.

        Runs at construction and again when a quantizer takes the config, so settings
        changed afterwards (``config.update(...)``, attribute assignment) are checked
        before any weight loads.  NumPy scalars become Python ones (a JSON-safe config).
        """
        for name in self.field_names():
            if name not in ("dataset", "processor"):
                setattr(self, name, _plain_scalar(getattr(self, name)))
        self.group_size = per_channel_as_none(self.group_size)
        for name in ("modules_to_not_convert", "ignore"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        for name in ("base_model", "base_model_folder"):  # earlier versions wrote "" for a model loaded from "."
            if getattr(self, name) == "":
                setattr(self, name, None)
        _check_int("bits", self.bits, MIN_BITS, MAX_BITS, f"use 4 (near-lossless), 3 or 2 (smaller), up to {MAX_BITS}")
        if self.group_size is not None:
            _check_int("group_size", self.group_size, 1, None, "use e.g. 32, 64 or 128, or None (hf-comq: -1) for per-channel scales")
        check_flag("symmetric", self.symmetric)
        _check_int("iterations", self.iterations, 0, None, "use 1 to 3 coordinate sweeps")
        _check_choice("order", self.order, ORDERS)
        _check_choice("init", self.init, START_POINTS)
        check_flag("scale_refit", self.scale_refit, optional=True)
        check_flag("scale_search", self.scale_search)
        check_flag("block_resolve", self.block_resolve)
        _check_float("shrink", self.shrink, "use a factor in (0, 1], e.g. 1.0 at 4 bits, 0.65 at 2 bits", upper=1.0)
        check_damp(self.damp)
        _check_choice("clip_weights", self.clip_weights, CLIP_WEIGHTS)
        _check_int("start_grids", self.start_grids, 1, MAX_START_GRIDS, "use 3 (the default), or 1 for a faster start")
        check_pair_moves(self.pair_moves)
        check_ridge(self.ridge, from_data_allowed=True)
        self._check_dataset()
        if self.processor is not None and isinstance(self.processor, str) and not self.processor.strip():
            raise ValueError("processor: got an empty string; pass a processor object, a path, or None")
        if self.processor is not None and not isinstance(self.processor, (str, os.PathLike)) and not callable(self.processor):
            raise ValueError(
                f"processor: got {type(self.processor).__name__}; pass a tokenizer or image processor (object or path), "
                "or None for the model's own"
            )
        _check_str("dataset_split", self.dataset_split, optional=False)
        try:
            check_split_name(self.dataset_split)
        except ValueError as error:
            raise ValueError(f"dataset_split: {error}") from None
        _check_str("dataset_column", self.dataset_column, optional=True)
        _check_int("num_samples", self.num_samples, 1, None, "use e.g. 128 calibration samples")
        _check_int("batch_size", self.batch_size, 1, None, "use e.g. 8")
        _check_int("max_length", self.max_length, 1, None, "use e.g. 512 tokens")
        _check_int("seed", self.seed, 0, None, "use a non-negative integer")
        check_flag("calibrate_all_experts", self.calibrate_all_experts)
        _check_choice("sum_dtype", self.sum_dtype, SUM_DTYPES)
        _check_names("modules_to_not_convert", self.modules_to_not_convert, "e.g. ['vit.layers.0'] or ['q_proj']")
        _check_str("block_name", self.block_name, optional=True)
        check_flag("sequential", self.sequential)
        check_flag("fp_target", self.fp_target, optional=True)
        if self.fp_target and not self.sequential:
            raise ValueError(
                "fp_target: needs sequential=True (with full-precision inputs every layer already sees the "
                "full-precision model's inputs); drop fp_target or set sequential=True"
            )
        check_flag("true_sequential", self.true_sequential, optional=True)
        if self.true_sequential and not self.sequential:
            raise ValueError(
                "true_sequential: needs sequential=True (with full-precision inputs no layer sees another's "
                "quantization); drop true_sequential or set sequential=True"
            )
        _check_str("calibration_description", self.calibration_description, optional=True, allow_empty=True)
        _check_str("calibration_split", self.calibration_split, optional=True)
        for name in ("calibration_samples", "expert_layers_rounded"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0, None, "leave it to calibration")
        _check_names("ignore", self.ignore, "exact module names; leave it to quantization")
        if self.layer_type is not None:
            _check_choice("layer_type", self.layer_type, (LINEAR, CONV1D))
        if self.conv1d_rows is not None:
            _check_int("conv1d_rows", self.conv1d_rows, 1, None, "leave it to quantization")
        _check_str("base_model", self.base_model, optional=True)
        _check_str("base_model_folder", self.base_model_folder, optional=True)
        _check_str("hf_comq_version", self.hf_comq_version, optional=True)

    def _check_dataset(self) -> None:
        data = self.dataset
        if data is None:
            return
        if isinstance(data, os.PathLike):
            return
        if isinstance(data, str):
            if not data.strip():
                raise ValueError("dataset: got an empty string; pass a dataset name or path, data, or None")
            if data.startswith(DEMO_PREFIX) and data[len(DEMO_PREFIX):] not in DEMO_SPLITS:
                choices = ", ".join(DEMO_PREFIX + split for split in DEMO_SPLITS)
                raise ValueError(f"dataset: unknown demo dataset {data!r}; use one of {choices}")
            return
        if isinstance(data, (list, tuple)) and len(data) == 0:
            raise ValueError("dataset: the list is empty; pass at least one calibration sample")
        if isinstance(data, (set, frozenset)):
            raise ValueError(
                "dataset: a set has no order, so the seeded choice of samples would change from run to run; "
                "pass a list (e.g. sorted(...))"
            )
        if isinstance(data, Iterator):
            raise ValueError(
                f"dataset: got a {type(data).__name__}, which can be read only once; pass a list (list(...)), "
                "a datasets.Dataset or an IterableDataset (datasets.IterableDataset.from_generator)"
            )
        if isinstance(data, (bytes, int, float, bool)) or not hasattr(data, "__iter__"):  # tensors iterate too
            raise ValueError(
                f"dataset: unsupported type {type(data).__name__}; pass a datasets.Dataset/IterableDataset, "
                "a dataset name or local path, a list of PIL images or strings, a tensor, or a list of dicts"
            )


def check_split_name(split: str) -> None:
    """One line for datasets' split arithmetic (``"train[:512]"``, ``"train+test"``): data files are
    streamed, where datasets takes no slices (a single file would silently be read whole), and the
    rows used are chosen by count and seed, not by position."""
    if "[" in split or "+" in split:
        whole = split.split("[")[0].split("+")[0]
        raise ValueError(
            f"split {split!r}: hf_comq reads whole splits, not slices or sums of them; name one split ({whole!r}) "
            "and set how many of its rows are used: num_samples (hf-comq quantize: --num-samples; evaluate: --limit)"
        )


def _plain_scalar(value: Any) -> Any:
    """NumPy (or other ``numbers``) scalars as Python ``bool`` / ``int`` / ``float``; anything else unchanged."""
    if isinstance(value, (bool, str)) or value is None:
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _same_setting(mine: Any, theirs: Any, live: bool) -> bool:
    """Settings compare by value; data and processors given as objects (tensors, datasets, models,
    lists of samples) by identity, as reading them to compare could cost a pass over the data."""
    if live and not isinstance(mine, (str, os.PathLike)):
        return mine is theirs
    numbers_both = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in (mine, theirs))
    return mine == theirs if numbers_both else type(mine) is type(theirs) and mine == theirs


def _check_int(name: str, value: Any, low: int | None, high: int | None, fix: str) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an integer {bounds}, got {value!r}; {fix}")


def _check_float(name: str, value: Any, fix: str, upper: float | None = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and value > 0 and (upper is None or value <= upper)
    if not ok:
        bounds = f"in (0, {upper}]" if upper is not None else "> 0"
        raise ValueError(f"{name}: expected a number {bounds}, got {value!r}; {fix}")


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


DATA_FILE_BUILDERS: dict[str, str] = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}
"""Data-file suffix -> ``datasets`` builder that reads it; the one list of file kinds we accept."""
