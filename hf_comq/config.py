"""``COMQConfig``: the ``quantization_config`` for COMQ in ``from_pretrained``.

The settings themselves (names, defaults, kinds, validation) are declared once, in
:class:`hf_comq.settings.COMQSettings`; this class adds what transformers needs.
``dataset`` and ``processor`` may be large in-memory objects: ``from_pretrained``
deep-copies the config twice, so copies share them, and they are never serialized,
only a string reference (a dataset name, a local path shrunk to its last component)
and a one-line description are written.  Once a model is quantized, its own copy keeps
just those (the caller's config keeps its objects): the data is not held alive by the model.

Serialized (``to_dict``, hence ``config.json``), a COMQConfig *is* a compressed-tensors
``pack-quantized`` ``quantization_config`` (:mod:`hf_comq.checkpoint`), so plain
transformers and vLLM load COMQ checkpoints; the COMQ settings ride along under the
``"comq"`` key (provenance) and :meth:`COMQConfig.from_dict` reads either form back.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import PROVENANCE_KEY, PackedScheme, quantization_config_dict, read_packed_scheme
from .settings import CALIBRATION, FORMAT, LINEAR, SELECTION, SOLVER, COMQSettings
from .solver.options import per_channel_as_none

logger = logging.getLogger(__name__)

QUANT_METHOD = "comq"
LIVE_OBJECTS = ("dataset", "processor")  # may hold data or models: shared on copy, written as a reference only


@dataclass(repr=False, eq=False)
class COMQConfig(COMQSettings, QuantizationConfigMixin):
    """Settings for COMQ post-training quantization during ``from_pretrained``.

    See each field's ``help`` (``COMQConfig.help(name)``) and the README's field table;
    solver fields are documented in :func:`hf_comq.comq_quantize`.
    """

    quant_method: str = QUANT_METHOD

    def __post_init__(self) -> None:
        super().__post_init__()
        from .registration import register  # a config is about to reach from_pretrained, however it was imported

        register()

    def post_init(self) -> None:
        """:meth:`COMQSettings.post_init` and ``quant_method``, so that ``update(quant_method=...)`` is checked too."""
        if self.quant_method != QUANT_METHOD:
            raise ValueError(
                f"quant_method: COMQConfig only describes {QUANT_METHOD!r}, got {self.quant_method!r}; "
                "load other methods with their own config class"
            )
        super().post_init()

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """transformers' ``update`` (set the known settings, return the other keys), checked as a
        whole: a bad value raises the field's one-line error and leaves this config unchanged."""
        trial = copy.deepcopy(self)
        unused = QuantizationConfigMixin.update(trial, **kwargs)
        trial.post_init()
        self.__dict__.update(trial.__dict__)
        return unused

    # ------------------------------------------------------------------ serialization
    def packed_scheme(self) -> PackedScheme:
        """The checkpoint scheme these settings produce (layout fields are known once quantization ran)."""
        return PackedScheme(
            bits=self.bits,
            group_size=per_channel_as_none(self.group_size),  # -1 assigned after construction
            symmetric=self.symmetric,
            layer_type=self.layer_type or LINEAR,
            conv1d_rows=self.conv1d_rows,
            ignore=list(self.ignore or []),
            provenance={} if self.other_producer else self.provenance(),
        )

    def provenance(self) -> dict[str, Any]:
        """The COMQ settings behind a checkpoint, grouped by kind, JSON-safe (``config.json["..."]["comq"]``)."""
        from . import __version__

        record: dict[str, Any] = {
            "hf_comq_version": self.hf_comq_version or __version__,  # a loaded checkpoint keeps its maker's
            "base_model": self.base_model,
            "base_model_folder": self.base_model_folder,
        }
        for kind in (SOLVER, CALIBRATION, SELECTION):
            record[kind] = {name: self.serialized(name) for name in self.field_names(kind)}
        if self.calibration_description is not None:  # calibration ran: the split it read, not the setting
            record[CALIBRATION]["dataset_split"] = self.calibration_split
        record[CALIBRATION]["description"] = self.describe_calibration()
        record[CALIBRATION]["samples_used"] = self.calibration_samples
        if self.expert_layers_rounded:
            record[CALIBRATION]["expert_layers_rounded"] = self.expert_layers_rounded
        return record

    def serialized(self, name: str) -> Any:
        """The JSON-safe value written for setting ``name``: in-memory data and processors become a reference or ``None``."""
        value = getattr(self, name)
        if name in LIVE_OBJECTS:
            if isinstance(value, (str, os.PathLike)):
                return portable_reference(value)
            from .calibration.sources import dataset_name  # lazy: a datasets object means calibration is loaded

            return dataset_name(value)
        return copy.deepcopy(value)

    def to_dict(self) -> dict[str, Any]:
        """The compressed-tensors ``quantization_config`` (JSON-safe), COMQ settings under ``"comq"``."""
        return quantization_config_dict(self.packed_scheme())

    def to_diff_dict(self) -> dict[str, Any]:
        """The entries of :meth:`to_dict` that differ from a default ``COMQConfig()``'s, nested dicts diffed per key."""
        return _dict_difference(self.to_dict(), type(self)().to_dict())

    def to_json_string(self, use_diff: bool = True) -> str:
        """JSON of :meth:`to_diff_dict` (``use_diff=True``, as transformers' configs) or of the full :meth:`to_dict`."""
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __iter__(self):
        """``dict(config)`` is :meth:`to_dict`: the compressed-tensors form ``config.json`` holds,
        which describes a quantized checkpoint.  To give ``from_pretrained`` settings as a dict,
        write ``{"quant_method": "comq", "bits": 4, ...}`` (or pass the config object itself).

        (The mixin's version deep-copies ``__dict__``, dataset included.)
        """
        yield from self.to_dict().items()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Read a compressed-tensors ``quantization_config`` (what ``to_dict`` writes) or plain field values.

        Unknown keys of a checkpoint's record (e.g. from a newer hf_comq) are dropped with a
        warning rather than failing a load; in plain settings (a dict given to ``from_pretrained``)
        they are a typo and refused, as ``COMQConfig(...)`` itself refuses them.
        """
        values = cls._values_from(config_dict)
        known = set(cls.field_names())
        unknown = sorted(set(values) - known - {"quant_method"})
        if unknown and "config_groups" not in config_dict and PROVENANCE_KEY not in config_dict:
            # settings the user wrote (a dict in from_pretrained), not a checkpoint's record: a typo, as in COMQConfig()
            close = {name: difflib.get_close_matches(name, sorted(known), n=1) for name in unknown}
            hints = ", ".join(f"{name!r}" + (f" (did you mean {match[0]!r}?)" if match else "")
                              for name, match in close.items())  # fmt: skip
            raise ValueError(f"quantization_config: unknown COMQ settings {hints}; see COMQConfig's fields")
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
        diff_keys = "config_groups" in config_dict or PROVENANCE_KEY in config_dict
        if diff_keys and "format" not in config_dict and config_dict.get("quant_method") in (None, QUANT_METHOD):
            # What to_diff_dict / to_json_string() / repr() write (a "quant_method" added or not, as
            # from_pretrained needs one): the entries that differ from a default config's.
            config_dict = _dict_with_difference(cls().to_dict(), config_dict)
        if "config_groups" not in config_dict:
            return dict(config_dict)
        scheme = read_packed_scheme(config_dict)
        values: dict[str, Any] = {}
        for key, value in scheme.provenance.items():
            if isinstance(value, dict):
                values.update(value)
            elif key in cls.field_names():
                values[key] = value
        if PROVENANCE_KEY not in config_dict:
            values["other_producer"] = True
        values["calibration_description"] = values.pop("description", None)
        values["calibration_samples"] = values.pop("samples_used", None)
        values["calibration_split"] = values.get("dataset_split")
        if values.get("dataset_split") is None:  # data without splits: the setting keeps its default
            values.pop("dataset_split", None)
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

        ``from_pretrained`` deep-copies the config, and so does ``PreTrainedConfig.to_dict``
        (its ``__dict__``, where the loaded model keeps this config) on every save; copying
        a dataset would cost memory and time, and a streaming dataset or tokenizer may not
        be copyable at all.  The live objects are therefore the one thing copies share.
        """
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            setattr(clone, name, value if name in LIVE_OBJECTS else copy.deepcopy(value, memo))
        return clone

    def format_mismatches(self, other: COMQConfig) -> dict[str, tuple[Any, Any]]:
        """Format fields (``bits``, ``group_size``, ``symmetric``) that differ: ``{field: (self, other)}``."""
        return {
            name: (getattr(self, name), getattr(other, name))
            for name in self.field_names(FORMAT)
            if getattr(self, name) != getattr(other, name)
        }



def _dict_difference(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    difference = {}
    for key, value in values.items():
        default = defaults.get(key, _MISSING)
        if isinstance(value, dict) and isinstance(default, dict):
            nested = _dict_difference(value, default)
            if nested:
                difference[key] = nested
        elif key not in defaults or value != default:
            difference[key] = value
    return difference


_MISSING = object()


def _dict_with_difference(defaults: dict[str, Any], difference: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` with ``difference`` (as :func:`_dict_difference` gives it) applied: the inverse of that diff."""
    merged = dict(defaults)
    for key, value in difference.items():
        default = defaults.get(key, _MISSING)
        nested = isinstance(value, dict) and isinstance(default, dict)
        merged[key] = _dict_with_difference(default, value) if nested else value
    return merged


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
    from .calibration.sources import dataset_name

    name = getattr(value, "name_or_path", None) or dataset_name(value)
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
