"""Turn ``COMQConfig.dataset`` into batches of model inputs for calibration.

Calibration happens inside ``from_pretrained``, whose post-loading hook receives no
arguments, so everything needed travels on the config: the data (in one of several
forms users already have at hand), the processor, and the sampling options.  The
result is a :class:`CalibrationData`, a *re-iterable* stream of processed batches:
block-sequential calibration walks the data several times (once per group of blocks
whose inputs must be captured) and processed inputs are recomputed on each walk
rather than cached, so the raw data set is never held in memory as a whole.

Accepted ``dataset`` forms:

* ``datasets.Dataset`` / ``IterableDataset`` (or a ``DatasetDict``: ``dataset_split``
  picks the split), with an image column ``image`` / ``img`` / ``pixel_values`` or a
  text column ``text``; ``dataset_column`` overrides the choice;
* a string: a folder written by ``save_to_disk``, a local data file or folder of data
  files (parquet / json / csv / arrow / text), or a Hub name; files and Hub data are
  streamed;
* a list of PIL images or of strings;
* ready model inputs: a tensor (``pixel_values`` if floating point, ``input_ids`` if
  integer), or a dict / list of dicts of tensors (each dict is used as one or more
  batches, never re-padded).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "IMAGE_COLUMNS",
    "TEXT_COLUMNS",
    "CalibrationData",
    "build_calibration_data",
    "encode_images",
    "format_description",
    "image_channels",
    "load_processor",
]

IMAGE_COLUMNS = ("image", "img", "pixel_values")
TEXT_COLUMNS = ("text",)
STREAM_SHUFFLE_BUFFER = 1000
_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}

Batch = dict[str, torch.Tensor]


@dataclass
class CalibrationData:
    """A re-iterable stream of processed calibration batches.

    Iterating calls ``make_batches`` again, so every pass sees the same samples in
    the same order (the subset is chosen once, with the configured seed).
    ``description`` is JSON-safe and is what ends up on the config and model card.
    """

    make_batches: Callable[[], Iterator[Batch]]
    num_samples: int
    description: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Batch]:
        return self.make_batches()


def build_calibration_data(model: nn.Module, config: Any) -> CalibrationData:
    """Build the calibration stream for ``model`` from ``config`` and record its description.

    Sets ``config.calibration_description`` (a small JSON-safe dict) as a side effect
    so the saved ``quantization_config`` says what the model was calibrated on.
    """
    source = getattr(config, "dataset", None)
    if source is None:
        raise ValueError(
            "COMQ needs calibration data: pass COMQConfig(dataset=...) (a datasets.Dataset, a dataset name or "
            "local path, a list of images or strings, or ready model inputs)"
        )
    data = _dispatch(model, config, source)
    config.calibration_description = format_description(data.description)
    return data


def format_description(description: Mapping[str, Any]) -> str:
    """One line such as ``imagenet-1k (split train, column image), 128 samples``."""
    details = [f"{key} {description[key]}" for key in ("split", "column") if description.get(key) is not None]
    text = str(description.get("source", "unknown data"))
    if details:
        text += f" ({', '.join(details)})"
    return f"{text}, {description.get('num_samples', '?')} samples"


# ---------------------------------------------------------------------------
# Dispatch on the form of ``dataset``
# ---------------------------------------------------------------------------


def _dispatch(model: nn.Module, config: Any, source: Any) -> CalibrationData:
    import datasets

    if isinstance(source, torch.Tensor):
        return _from_tensor(model, config, source)
    if isinstance(source, (str, os.PathLike)):
        loaded, origin = _load_dataset_from_string(os.fspath(source), config.dataset_split)
        return _from_hf_dataset(model, config, loaded, origin)
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        split = _pick_split(source, config.dataset_split, "the DatasetDict")
        return _from_hf_dataset(model, config, split, {"source": "datasets.DatasetDict", "split": config.dataset_split})
    if isinstance(source, datasets.Dataset):
        return _from_hf_dataset(model, config, source, {"source": "datasets.Dataset"})
    if isinstance(source, datasets.IterableDataset):
        return _from_hf_dataset(model, config, source, {"source": "datasets.IterableDataset"})
    if isinstance(source, Mapping):
        return _from_input_dicts(model, config, [source])
    if isinstance(source, (list, tuple)):
        return _from_sequence(model, config, source)
    raise ValueError(
        f"unsupported calibration dataset of type {type(source).__name__}: expected a datasets.Dataset or "
        "IterableDataset, a dataset name or path, a list of PIL images or strings, a tensor, or a list of dicts "
        "of tensors"
    )


def _from_sequence(model: nn.Module, config: Any, items: Sequence[Any]) -> CalibrationData:
    from PIL import Image

    if len(items) == 0:
        raise ValueError("the calibration dataset is empty: it has no samples")
    if all(isinstance(item, Image.Image) for item in items):
        kind = "images"
    elif all(isinstance(item, str) for item in items):
        kind = "text"
    elif all(isinstance(item, Mapping) for item in items):
        return _from_input_dicts(model, config, items)
    else:
        kinds = sorted({type(item).__name__ for item in items})
        raise ValueError(
            f"a calibration list must hold only PIL images, only strings, or only dicts of tensors; got {kinds}"
        )
    indices = _choose_indices(len(items), config.num_samples, config.seed)
    encode = _make_encoder(model, config, kind)

    def make_batches() -> Iterator[Batch]:
        for chunk in _chunks(indices, config.batch_size):
            yield from _non_empty(encode([items[i] for i in chunk]))

    description = {"source": f"list of {kind}", "num_samples": len(indices)}
    return CalibrationData(make_batches, len(indices), description)


# ---------------------------------------------------------------------------
# datasets.Dataset / IterableDataset
# ---------------------------------------------------------------------------


def _load_dataset_from_string(source: str, split: str) -> tuple[Any, dict[str, Any]]:
    """Load a dataset named by a string; local data works offline and nothing is cached in memory."""
    import datasets

    from ..assets import demo_dataset_file

    demo_file = demo_dataset_file(source)
    path = demo_file if demo_file is not None else Path(source).expanduser()
    # A local path says nothing to readers of the saved config or model card (and may leak a home folder).
    label = source if demo_file is not None else f"local dataset {path.name!r}" if path.exists() else source
    origin: dict[str, Any] = {"source": label, "split": split}
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"dataset file {source!r} is empty (0 bytes); pass a file with data")
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = _pick_split(loaded, split, f"the dataset saved at {source!r}")
            return loaded, origin
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"cannot tell the format of calibration file {source!r}; supported suffixes: "
                    f"{sorted(_FILE_BUILDERS)}"
                )
            return datasets.load_dataset(builder, data_files={split: str(path)}, split=split, streaming=True), origin
        return datasets.load_dataset(source, split=split, streaming=True), origin
    except ValueError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFoundError, ConnectionError, ...)
        raise ValueError(f"could not load calibration dataset {source!r} (split {split!r}): {error}") from error


def _pick_split(dataset_dict: Mapping[str, Any], split: str, what: str) -> Any:
    if split not in dataset_dict:
        raise ValueError(f"split {split!r} not found in {what}; available splits: {sorted(dataset_dict)}")
    return dataset_dict[split]


def _from_hf_dataset(model: nn.Module, config: Any, dataset: Any, origin: dict[str, Any]) -> CalibrationData:
    import datasets

    column = _pick_column(dataset, config.dataset_column)
    dataset = dataset.select_columns([column])
    kind = "model inputs" if column == "pixel_values" else None
    if isinstance(dataset, datasets.Dataset):
        rows, count = _indexed_rows(dataset, column, config)
    else:
        rows, count = _streamed_rows(dataset, column, config)
    first = _first_value(rows())
    kind = kind or _kind_of_value(first, column)
    encode = _make_encoder(model, config, kind)

    def make_batches() -> Iterator[Batch]:
        for values in rows():
            yield from _non_empty(encode(values))

    description = {**origin, "column": column, "num_samples": count}
    return CalibrationData(make_batches, count, description)


RowChunks = Callable[[], Iterator[list[Any]]]


def _indexed_rows(dataset: Any, column: str, config: Any) -> tuple[RowChunks, int]:
    """Chunks of raw values of a seeded random subset, read row by row from the (memory-mapped) table."""
    indices = _choose_indices(len(dataset), config.num_samples, config.seed)

    def chunks() -> Iterator[list[Any]]:
        for chunk in _chunks(indices, config.batch_size):
            yield dataset[chunk][column]

    return chunks, len(indices)


def _streamed_rows(dataset: Any, column: str, config: Any) -> tuple[RowChunks, int]:
    """Chunks of raw values of a streamed dataset's shuffled subset (read once, decoded per chunk)."""
    values, decode = _take_from_stream(dataset, column, config.num_samples, config.seed)

    def chunks() -> Iterator[list[Any]]:
        for start in range(0, len(values), config.batch_size):
            yield [decode(value) for value in values[start : start + config.batch_size]]

    return chunks, len(values)


def _pick_column(dataset: Any, requested: str | None) -> str:
    columns = _column_names(dataset)
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"dataset column {requested!r} does not exist; available columns: {columns}")
        return requested
    for candidate in IMAGE_COLUMNS + TEXT_COLUMNS:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"no calibration column found: expected one of {list(IMAGE_COLUMNS + TEXT_COLUMNS)}; available columns: "
        f"{columns}. Set COMQConfig(dataset_column=...)"
    )


def _column_names(dataset: Any) -> list[str]:
    names = dataset.column_names
    if names is None:  # streaming data without declared features: look at one example
        example = next(iter(dataset), None)
        if example is None:
            raise ValueError("the calibration dataset is empty: it has no samples")
        names = list(example)
    return list(names)


def _take_from_stream(dataset: Any, column: str, requested: int, seed: int) -> tuple[list[Any], Callable[[Any], Any]]:
    """Read the seeded-shuffled subset of a streamed dataset once, keeping images encoded.

    Streams are read a single time: re-streaming (from the Hub, or through datasets'
    shard readers) on every calibration pass would cost far more than keeping
    ``num_samples`` raw values.  Images are kept as their file bytes and decoded per
    batch, so the subset costs about its compressed size in memory.
    """
    import datasets

    decode: Callable[[Any], Any] = lambda value: value
    features = dataset.features
    if features is not None and isinstance(features.get(column), datasets.Image):
        feature = features[column]
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
        decode = feature.decode_example
    stream = dataset.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER).take(requested)
    values = [example[column] for example in stream]
    if not values:
        raise ValueError("the calibration dataset is empty: it has no samples")
    if len(values) < requested:
        _warn_too_few(len(values), requested)
    return values, decode


def _first_value(chunks: Iterator[list[Any]]) -> Any:
    for chunk in chunks:
        if chunk:
            return chunk[0]
    raise ValueError("the calibration dataset is empty: it has no samples")


def _kind_of_value(value: Any, column: str) -> str:
    from PIL import Image

    if isinstance(value, Image.Image) or column in IMAGE_COLUMNS:  # arrays, paths...: the image processor judges
        return "images"
    if isinstance(value, str):
        return "text"
    raise ValueError(
        f"column {column!r} holds {type(value).__name__} values; COMQ calibrates on images (PIL) or text (str)"
    )


# ---------------------------------------------------------------------------
# Ready model inputs
# ---------------------------------------------------------------------------


def _from_tensor(model: nn.Module, config: Any, tensor: torch.Tensor) -> CalibrationData:
    if tensor.dtype.is_floating_point and tensor.dim() == 4:
        key = "pixel_values"
    elif not tensor.dtype.is_floating_point and tensor.dim() in (1, 2):
        key, tensor = "input_ids", tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() == 2 else tensor.unsqueeze(0)
    else:
        raise ValueError(
            f"a calibration tensor must be float pixel_values (batch, channels, height, width) or integer input_ids "
            f"(batch, length); got dtype {tensor.dtype} with shape {tuple(tensor.shape)}"
        )
    if tensor.shape[0] == 0 or tensor.numel() == 0:
        raise ValueError("the calibration dataset is empty: the tensor has no samples")
    indices = _choose_indices(tensor.shape[0], config.num_samples, config.seed)
    keep = _model_input_names(model)
    if keep is not None and key not in keep:
        raise ValueError(
            f"a calibration tensor is passed as {key!r}, which {type(model).__name__}.forward does not accept"
        )

    def make_batches() -> Iterator[Batch]:
        for chunk in _chunks(indices, config.batch_size):
            yield {key: tensor[chunk]}

    description = {"source": f"tensor ({key})", "num_samples": len(indices)}
    return CalibrationData(make_batches, len(indices), description)


def _from_input_dicts(model: nn.Module, config: Any, items: Sequence[Mapping[str, Any]]) -> CalibrationData:
    """Use prepared input dicts as given: each dict is one or more batches, never re-padded."""
    keep = _model_input_names(model)
    batches = [_as_input_batch(item, keep, model) for item in items]
    sizes = [_batch_size(batch) for batch in batches]
    if sum(sizes) == 0:
        raise ValueError("the calibration dataset is empty: the input dicts hold no samples")
    order = _choose_indices(len(batches), len(batches), config.seed)
    available = sum(sizes)
    if config.num_samples > available:
        _warn_too_few(available, config.num_samples)
    plan = _take_samples([(i, sizes[i]) for i in order], config.num_samples)
    count = sum(taken for _, taken in plan)

    def make_batches() -> Iterator[Batch]:
        for index, taken in plan:
            for start in range(0, taken, config.batch_size):
                stop = min(start + config.batch_size, taken)
                yield {name: value[start:stop] for name, value in batches[index].items()}

    description = {"source": "model input dicts", "num_samples": count}
    return CalibrationData(make_batches, count, description)


def _as_input_batch(item: Mapping[str, Any], keep: set[str] | None, model: nn.Module) -> Batch:
    batch: Batch = {}
    for name, value in item.items():
        if keep is not None and name not in keep:
            continue
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        batch[name] = tensor
    if not batch:
        raise ValueError(
            f"a calibration input dict has keys {sorted(item)}, none of which {type(model).__name__}.forward accepts"
        )
    if all(t.dim() == 1 for t in batch.values()) or ("pixel_values" in batch and batch["pixel_values"].dim() == 3):
        batch = {name: t.unsqueeze(0) for name, t in batch.items()}
    leading = {t.shape[0] for t in batch.values()}
    if len(leading) != 1:
        raise ValueError(f"the tensors of a calibration input dict disagree on the batch size: {sorted(leading)}")
    return batch


def _batch_size(batch: Batch) -> int:
    return next(iter(batch.values())).shape[0]


def _take_samples(sizes: list[tuple[int, int]], wanted: int) -> list[tuple[int, int]]:
    plan, left = [], wanted
    for index, size in sizes:
        if left <= 0:
            break
        taken = min(size, left)
        if taken > 0:
            plan.append((index, taken))
        left -= taken
    return plan


# ---------------------------------------------------------------------------
# Processors and encoding
# ---------------------------------------------------------------------------


def _make_encoder(model: nn.Module, config: Any, kind: str) -> Callable[[list[Any]], Batch | None]:
    """Return ``encode(raw_values) -> model inputs`` for one batch (``None``: nothing usable in it)."""
    keep = _model_input_names(model)
    if kind == "model inputs":
        return lambda values: _filter_inputs({"pixel_values": torch.stack([torch.as_tensor(v) for v in values])}, keep)
    processor = _resolve_processor(model, config, kind)
    if kind == "images":
        channels = image_channels(model, processor)
        return lambda values: _filter_inputs(encode_images(processor, values, channels), keep)
    _ensure_padding(processor)

    def encode_texts(values: list[str]) -> Batch | None:
        encoded = _encode_texts(processor, values, config.max_length)
        return None if encoded is None else _filter_inputs(encoded, keep)

    return encode_texts


_MODES_BY_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}


def image_channels(model: nn.Module | None, processor: Any) -> int | None:
    """How many channels the model's images have: ``config.num_channels``, else the processor's ``image_mean`` length.

    ``None`` when neither says (the images are then passed as they are).
    """
    channels = getattr(getattr(model, "config", None), "num_channels", None)
    if isinstance(channels, int) and channels > 0:
        return channels
    mean = getattr(processor, "image_mean", None)
    return len(mean) if isinstance(mean, (list, tuple)) and mean else None


def encode_images(processor: Any, images: list[Any], channels: int | None = 3) -> Batch:
    """``processor(images=...)`` after converting PIL images to the model's channel count (:func:`image_channels`).

    Datasets store images in whatever mode they were saved (grayscale PNGs, palette
    images, RGBA); the processor normalises with one mean per channel, so the images
    must have exactly the channels the model was trained on: 1 for grayscale models,
    3 for RGB ones.  Non-PIL inputs (arrays, tensors) are passed through unchanged.
    """
    from PIL import Image

    mode = _MODES_BY_CHANNELS.get(channels) if channels is not None else None
    if mode is not None:
        images = [
            image.convert(mode) if isinstance(image, Image.Image) and image.mode != mode else image for image in images
        ]
    try:
        encoded = processor(images=images, return_tensors="pt")
    except Exception as error:
        raise ValueError(
            f"{type(processor).__name__} rejected the images "
            f"({sorted({type(image).__name__ for image in images})}): {error}"
        ) from error
    return dict(encoded)


def _encode_texts(processor: Any, texts: list[str], max_length: int) -> Batch | None:
    """Tokenize one batch; empty strings are dropped (they carry no tokens), ``None`` if nothing is left."""
    texts = [text for text in texts if text.strip()]
    if not texts:
        return None
    try:
        encoded = processor(
            text=texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
    except Exception as error:
        raise ValueError(f"{type(processor).__name__} could not tokenize the calibration texts: {error}") from error
    return dict(encoded)


def _ensure_padding(processor: Any) -> None:
    """Give pad-less tokenizers (GPT-2, LLaMA) a pad token so batches can be padded."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if getattr(tokenizer, "pad_token", "") is not None:
        return
    fallback = getattr(tokenizer, "eos_token", None) or getattr(tokenizer, "unk_token", None)
    if fallback is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no pad, eos or unk token, so calibration batches cannot be padded; "
            "set tokenizer.pad_token or use batch_size=1"
        )
    logger.info("calibration tokenizer has no pad token; padding with %r (masked out of the Hessians)", fallback)
    tokenizer.pad_token = fallback


def _resolve_processor(model: nn.Module, config: Any, kind: str) -> Any:
    """The configured processor (object or path), else the checkpoint's own one."""
    processor = getattr(config, "processor", None)
    if processor is not None and not isinstance(processor, (str, os.PathLike)):
        if not callable(processor):
            raise ValueError(f"COMQConfig.processor must be callable or a path, got {type(processor).__name__}")
        return processor
    location = os.fspath(processor) if processor is not None else getattr(model, "name_or_path", "")
    if not location:
        raise ValueError(
            f"calibration data are raw {kind} but no processor is known: pass COMQConfig(processor=...) "
            "(an image processor or tokenizer, or its path)"
        )
    try:
        return load_processor(location, kind)
    except ValueError as error:
        raise ValueError(f"{error}; pass COMQConfig(processor=...) for calibration") from None


def load_processor(location: str, kind: str) -> Any:
    """The image processor (``kind="images"``) or tokenizer (``"text"``) saved at ``location``.

    Raises ``ValueError`` naming what was tried; callers add the fix that fits them.
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    loaders = (AutoImageProcessor, AutoProcessor) if kind == "images" else (AutoTokenizer, AutoProcessor)
    errors = []
    for loader in loaders:
        try:
            processor = loader.from_pretrained(location)
        except Exception as error:  # try the next auto class
            errors.append(f"{loader.__name__}: {' '.join(str(error).split())[:200]}")
            continue
        if _handles(processor, kind):
            return processor
        errors.append(f"{loader.__name__} found a {type(processor).__name__}, which does not handle {kind}")
    what = "an image processor" if kind == "images" else "a tokenizer"
    raise ValueError(f"could not load {what} from {location!r} ({' | '.join(errors)})")


def _handles(processor: Any, kind: str) -> bool:
    """An AutoProcessor may find the other modality's processor (a ViT folder asked for a tokenizer)."""
    from transformers import PreTrainedTokenizerBase
    from transformers.image_processing_utils import BaseImageProcessor

    if kind == "images":
        return isinstance(processor, BaseImageProcessor) or hasattr(processor, "image_processor")
    return isinstance(processor, PreTrainedTokenizerBase) or hasattr(processor, "tokenizer")


def _model_input_names(model: nn.Module) -> set[str] | None:
    """Named parameters of ``model.forward``; ``None`` when it takes only ``**kwargs``."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names or None


def _filter_inputs(batch: Mapping[str, Any], keep: set[str] | None) -> Batch:
    """Drop processor outputs the model does not take (e.g. ``token_type_ids`` for LLaMA)."""
    tensors = {name: value for name, value in batch.items() if isinstance(value, torch.Tensor)}
    if keep is None:
        return tensors
    filtered = {name: value for name, value in tensors.items() if name in keep}
    if not filtered:
        raise ValueError(f"the processor produced {sorted(tensors)}, none of which the model's forward accepts")
    return filtered


# ---------------------------------------------------------------------------
# Sampling helpers
# ---------------------------------------------------------------------------


def _choose_indices(total: int, requested: int, seed: int) -> list[int]:
    """A seeded random subset of ``requested`` of ``total`` indices (all of them if fewer exist)."""
    if total == 0:
        raise ValueError("the calibration dataset is empty: it has no samples")
    if requested > total:
        _warn_too_few(total, requested)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[: min(requested, total)].tolist()


def _warn_too_few(available: int, requested: int) -> None:
    logger.warning(
        "COMQ calibration: num_samples=%d but the dataset has only %d samples; calibrating on all %d",
        requested,
        available,
        available,
    )


def _non_empty(batch: Batch | None) -> Iterator[Batch]:
    if batch is not None:
        yield batch


def _chunks(indices: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]

