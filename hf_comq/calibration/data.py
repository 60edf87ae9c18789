"""Turn ``COMQConfig.dataset`` into batches of model inputs for calibration.

Calibration happens inside ``from_pretrained``, whose post-loading hook receives no
arguments, so everything needed travels on the config: the data (in one of several
forms users already have at hand), the processor, and the sampling options.  The
result is a :class:`CalibrationData`, a *re-iterable* stream of processed batches:
block-sequential calibration walks the data several times (once per group of blocks
whose inputs must be captured) and processed inputs are recomputed on each walk
rather than cached, so the raw data set is never held in memory as a whole.  Raw
values are kept apart from their encoding, so a rank of a data-parallel run encodes
only its own share of the batches (:meth:`CalibrationData.shard`).

Data sources (names, files, lists) become ``datasets`` objects in :mod:`.sources`,
which also picks the subset; processors live in :mod:`.processors`.

Accepted ``dataset`` forms:

* ``datasets.Dataset`` / ``IterableDataset`` (or a ``DatasetDict``: ``dataset_split``
  picks the split), with an image column ``image`` / ``img`` / ``pixel_values``, a
  text column ``text``, or tokenized rows (``input_ids``, with ``attention_mask`` /
  ``token_type_ids`` if present: padded per batch, no tokenizer needed);
  ``dataset_column`` overrides the choice;
* a string: a folder written by ``save_to_disk``, a local data file or folder of data
  files (parquet / json / csv / arrow / text), or a Hub name; files and Hub data are
  streamed;
* a list of PIL images (or of ``uint8`` NumPy image arrays) or of strings;
* ready model inputs: a tensor (``pixel_values`` if floating point, ``input_ids`` if
  integer), or a dict / list of dicts of tensors (each dict is used as one or more
  batches, never re-padded).
"""

from __future__ import annotations

import contextvars
import itertools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..tasks import INPUT_OF_KIND, needs_text_and_images, text_and_images_refusal
from .processors import (
    encode_images,
    encode_texts,
    filter_inputs,
    image_channels,
    is_image_path,
    load_processor,
    model_input_names,
    open_image_file,
    padded_token_batch,
    padding_id,
    required_input_names,
    resolve_processor,
    right_aligned,
    text_length_limit,
    vocabulary_size,
)
from .sources import (
    CHAT_COLUMNS,
    IMAGE_COLUMNS,
    TEXT_COLUMNS,
    TOKEN_COLUMNS,
    check_local_sources,
    column_names,
    dataset_from_list,
    dataset_origin,
    is_blank,
    load_dataset_source,
    named_decoding_errors,
    pick_column,
    pick_split,
    seeded_subset,
    warn_too_few,
)

__all__ = [
    "IMAGE_COLUMNS",
    "TEXT_COLUMNS",
    "CalibrationData",
    "build_calibration_data",
    "chat_renderer",
    "column_kind",
    "encode_images",
    "fed_as",
    "format_description",
    "image_channels",
    "load_processor",
]

Batch = dict[str, torch.Tensor]


@dataclass
class CalibrationData:
    """A re-iterable stream of processed calibration batches.

    ``chunks()`` yields the raw content of each batch (values, or indices into ready
    inputs) in a fixed order, ``encode`` turns one into model inputs (``None``: nothing
    usable in it, e.g. only empty texts).  Every pass sees the same samples in the same
    order (the subset is chosen once, with the configured seed).  ``description`` is
    JSON-safe and is what ends up on the config and model card.
    """

    chunks: Callable[[], Iterator[Any]]
    encode: Callable[[Any], Batch | None]
    num_samples: int
    description: dict[str, Any] = field(default_factory=dict)
    max_length: int | None = None  # tokens a text or token row is cut to (None: no cut, e.g. images)
    tokenized: bool = False  # texts tokenized here (not token ids the caller made)
    longest: int | None = None  # ready token inputs, never cut: their longest row, the length calibration used

    def __iter__(self) -> Iterator[Batch]:
        for chunk in self.chunks():
            batch = self.encode(chunk)
            if batch is not None:
                yield batch

    def shard(self, rank: int, size: int) -> "CalibrationData":
        """The batches of rank ``rank`` of ``size``: every ``size``-th from ``rank``, each as one process makes it.

        Sharding whole batches (padding included) keeps the union of the ranks' token
        sets equal to one process's, so summed Gram matrices equal its own.
        """
        if size == 1:
            return self
        chunks = self.chunks
        return replace(self, chunks=lambda: itertools.islice(chunks(), rank, None, size))


_CHECKPOINT_FOLDER: contextvars.ContextVar[str | None] = contextvars.ContextVar("checkpoint_folder", default=None)
"""The folder the weights of the model being calibrated load from, while its data is built
(read where its processor is resolved, several calls down)."""


def build_calibration_data(model: nn.Module, config: Any, checkpoint_folder: str | None = None) -> CalibrationData:
    """Build the calibration stream for ``model`` from ``config`` and record its description.

    Sets ``config.calibration_description`` (a small JSON-safe dict) as a side effect
    so the saved ``quantization_config`` says what the model was calibrated on.
    ``checkpoint_folder``: where the weights load from, the first place to look for the
    model's own processor (:func:`~.processors.resolve_processor`).
    """
    source = getattr(config, "dataset", None)
    check_local_sources(source, getattr(config, "processor", None))
    if source is None:
        raise ValueError(
            "COMQ needs calibration data: pass COMQConfig(dataset=...) (a datasets.Dataset, a dataset name or "
            "local path, a list of images or strings, or ready model inputs)"
        )
    token = _CHECKPOINT_FOLDER.set(checkpoint_folder)
    try:
        with named_decoding_errors(source):
            data = _dispatch(model, config, source)
    finally:
        _CHECKPOINT_FOLDER.reset(token)
    config.calibration_description = format_description(data.description)
    config.calibration_split = data.description.get("split")
    if data.max_length is not None and data.max_length < config.max_length:
        config.max_length = data.max_length  # the record says what was used: the model's positions cut it
    if data.longest is not None:
        config.max_length = data.longest  # ready inputs are used as given, whatever max_length said
    vocabulary = vocabulary_size(model)
    if vocabulary is not None:
        fix = "tokenize with the model's own tokenizer" + (
            " (COMQConfig(processor=...); hf-comq uses the checkpoint's)" if data.tokenized
            else ", AutoTokenizer.from_pretrained(MODEL), or pass the texts themselves"
        )  # fmt: skip
        data = replace(data, encode=_checking_token_ids(data.encode, vocabulary, type(model).__name__, fix))
    next(iter(data), None)  # one batch encoded now: its mistakes (token ids, a column's type) before any weight loads
    return data


def _checking_token_ids(
    encode: Callable[[Any], Batch | None], vocabulary: int, model_name: str, fix: str
) -> Callable[[Any], Batch | None]:
    """``encode`` whose batches fail with one line when a token id is outside the embedding.

    The model would fail inside its embedding with torch's "index out of range in self",
    which names neither the inputs nor the fix; ids from another model's tokenizer, or
    ready ``input_ids`` made for another vocabulary, are the usual cause.  Every batch is
    checked as it is made, so text tokenized batch by batch is covered too.
    """

    def checked(chunk: Any) -> Batch | None:
        batch = encode(chunk)
        ids = None if batch is None else batch.get("input_ids")
        if ids is None or ids.numel() == 0:
            return batch
        lowest, highest = int(ids.min()), int(ids.max())
        if lowest < 0 or highest >= vocabulary:
            bad = highest if highest >= vocabulary else lowest
            raise ValueError(
                f"calibration input_ids hold token id {bad}, but {model_name}'s input embedding has {vocabulary} rows "
                f"(ids 0 to {vocabulary - 1}); {fix}"
            )
        return batch

    return checked


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
        loaded, origin = load_dataset_source(source, config.dataset_split, config.default("dataset_split"))
        return _from_hf_dataset(model, config, loaded, origin)
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        split = pick_split(source, config.dataset_split, "the DatasetDict")
        return _from_hf_dataset(model, config, split, {"source": "datasets.DatasetDict", "split": config.dataset_split})
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return _from_hf_dataset(model, config, source, dataset_origin(source))
    if isinstance(source, Mapping):
        return _from_input_dicts(model, config, [source])
    if isinstance(source, (list, tuple)):
        return _from_sequence(model, config, source)
    raise ValueError(
        f"unsupported calibration dataset of type {type(source).__name__}: expected a datasets.Dataset or "
        "IterableDataset, a dataset name or path, a list of PIL images or strings, a tensor, or a list of dicts "
        "of tensors"
    )


def _image_from_array(array: np.ndarray) -> Any:
    """A PIL image of a ``uint8`` array laid out as image files are (``height x width``, or
    ``height x width x channels`` with 1, 3 or 4 channels), the form NumPy image datasets use.

    Other layouts (``channels x height x width``, float pixels) would need a guess at their
    range or axis order: the caller converts those, in one line it can see.
    """
    from PIL import Image

    shape = tuple(array.shape)
    channels_last = len(shape) == 3 and shape[2] in (1, 3, 4)
    if array.dtype != np.uint8 or not (len(shape) == 2 or channels_last):
        raise ValueError(
            f"a calibration image array must be uint8, height x width or height x width x 1/3/4 channels; got "
            f"{array.dtype} {shape}: convert each with PIL.Image.fromarray (e.g. from (array * 255).astype('uint8') "
            "moved to channels last), or pass ready pixel_values as a tensor"
        )
    return Image.fromarray(array[:, :, 0] if channels_last and shape[2] == 1 else array)


def _from_sequence(model: nn.Module, config: Any, items: Sequence[Any]) -> CalibrationData:
    """A list of images, texts or chat conversations is a one-column ``datasets.Dataset``; a list of dicts is ready inputs."""
    from PIL import Image

    if len(items) == 0:
        raise ValueError("the calibration dataset is empty: it has no samples")
    if all(isinstance(item, Image.Image) for item in items):
        items, kind, column = _images_to_calibrate_on(items, config), "images", "image"
    elif all(isinstance(item, np.ndarray) for item in items):
        _check_reads_images_or_text(model)
        items = [_image_from_array(item) for item in _images_to_calibrate_on(items, config)]
        kind, column = "images", "image"
    elif all(isinstance(item, str) for item in items):
        kind, column = "text", "text"
    elif all(_is_conversation(item) for item in items):
        kind, column = "chat conversations", CHAT_COLUMNS[0]
    elif all(isinstance(item, Mapping) for item in items):
        return _from_input_dicts(model, config, items)
    else:
        kinds = sorted({type(item).__name__ for item in items})
        raise ValueError(
            f"a calibration list must hold only PIL images (or uint8 image arrays), only strings, only chat "
            f"conversations (lists of {{'role', 'content'}} messages) or only dicts of tensors; got {kinds}"
        )
    if config.dataset_column is not None:
        raise ValueError(
            f"dataset_column={config.dataset_column!r} names a column of a dataset, but the calibration data is a "
            f"list of {kind}, which has none; drop dataset_column"
        )
    origin = {"source": f"list of {kind}", "column": None}
    return _from_hf_dataset(model, config, dataset_from_list(items, column), origin)


# ---------------------------------------------------------------------------
# datasets.Dataset / IterableDataset
# ---------------------------------------------------------------------------


def _check_reads_images_or_text(model: nn.Module) -> None:
    """One line for an audio (or other) model given data that hf_comq would have to turn into its
    inputs: it does so for images and text only, and its column and image-array messages would
    send the user on a wrong track."""
    main = getattr(model, "main_input_name", None)
    if main in (None, *INPUT_OF_KIND.values()):
        return
    raise ValueError(
        f"{type(model).__name__} takes {main}, and hf_comq turns only images and text into model inputs: pass ready "
        "inputs, a list of dicts of the tensors its processor makes (e.g. dict(feature_extractor(waveform, "
        "sampling_rate=16000, return_tensors='pt')))"
    )


def _from_hf_dataset(model: nn.Module, config: Any, dataset: Any, origin: dict[str, Any]) -> CalibrationData:
    if TOKEN_COLUMNS[0] not in column_names(dataset):
        _check_reads_images_or_text(model)
    column = pick_column(dataset, config.dataset_column)
    if column == TOKEN_COLUMNS[0]:
        return _from_token_rows(model, config, dataset, origin)
    values, decode = _subset_values(dataset.select_columns([column]), column, config)
    kind = "model inputs" if column == "pixel_values" else _kind_of_value(decode(values[0]), column)
    text = kind in ("text", "chat")
    max_length = text_length_limit(model, config.max_length) if text else None
    encode_values = _make_encoder(model, config, kind, max_length)

    def encode(rows: slice) -> Batch | None:  # rows are read here, so a rank reads only its own
        return encode_values([decode(value) for value in values[rows]])

    description = {"column": column, **origin, "num_samples": len(values)}
    return CalibrationData(
        lambda: _batch_slices(len(values), config.batch_size), encode, len(values), description,
        max_length=max_length, tokenized=text,
    )  # fmt: skip


def _batch_slices(count: int, size: int) -> Iterator[slice]:
    """The rows of each batch of ``size`` among ``count`` samples, in order."""
    for start in range(0, count, size):
        yield slice(start, start + size)


def _from_token_rows(model: nn.Module, config: Any, dataset: Any, origin: dict[str, Any]) -> CalibrationData:
    """A tokenized dataset's rows as ready inputs: each batch's rows cut to ``max_length`` and
    padded on the right, padding masked out (of attention and of the Gram sums), so no
    tokenizer is needed."""
    present = [name for name in TOKEN_COLUMNS if name in column_names(dataset)]
    keep = model_input_names(model)
    _check_model_takes(model, keep, "text")
    rows = _subset_rows(dataset.select_columns(present), TOKEN_COLUMNS[0], config)
    indexed = not isinstance(rows, list)

    def read(part: slice) -> Mapping[str, list[Any]]:
        """A batch's rows as columns: an indexed dataset's slice is one already."""
        return rows[part] if indexed else {name: [row[name] for row in rows[part]] for name in present}

    pad_id = padding_id(getattr(model, "config", None), vocabulary_size(model))
    max_length = text_length_limit(model, config.max_length)

    def encode(part: slice) -> Batch | None:
        batch = padded_token_batch(read(part), max_length, pad_id)
        return None if batch is None else filter_inputs(batch, keep)

    description = {"column": TOKEN_COLUMNS[0], **origin, "num_samples": len(rows)}
    return CalibrationData(
        lambda: _batch_slices(len(rows), config.batch_size), encode, len(rows), description, max_length=max_length
    )


def _subset_values(dataset: Any, column: str, config: Any) -> tuple[Any, Callable[[Any], Any]]:
    """The raw values of the seeded subset, read once, and how to decode one of them.

    Images are kept as their encoded file bytes and decoded per batch, so the subset
    costs about its compressed size in memory; an indexed dataset keeps its rows on
    disk (memory-mapped) and reads a batch's rows when they are needed.  Streams are
    read a single time: re-streaming (from the Hub, or through datasets' shard readers)
    on every calibration pass would cost far more than keeping ``num_samples`` values.
    """
    import datasets

    decode: Callable[[Any], Any] = lambda value: value
    feature = (dataset.features or {}).get(column)
    if isinstance(feature, datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
        decode = _image_decoder(feature, column)
    rows = _subset_rows(dataset, column, config)
    values = [row[column] for row in rows] if isinstance(rows, list) else _LazyColumn(rows, column)
    return values, decode


def _image_decoder(feature: Any, column: str) -> Callable[[Any], Any]:
    """``feature.decode_example`` whose failure on a broken file (PIL's bare "cannot identify image
    file <BytesIO ...>", mid-calibration) is one line naming the column, the file where known, and the fix."""

    def decode(value: Any) -> Any:
        try:
            return feature.decode_example(value)
        except Exception as error:
            path = value.get("path") if isinstance(value, Mapping) else None
            where = f" ({path})" if path else ""
            raise ValueError(
                f"a calibration image of column {column!r}{where} cannot be read ({type(error).__name__}); "
                "remove or repair it in the dataset"
            ) from None

    return decode


def _subset_rows(dataset: Any, column: str, config: Any) -> Any:
    """The seeded subset (blank ``column`` values passed over): an indexed ``Dataset`` as it is,
    a stream read once into a list of rows, with the too-few warning; never empty."""
    import datasets

    subset = seeded_subset(dataset, config.num_samples, config.seed, column)
    if isinstance(subset, datasets.Dataset):
        rows: Any = subset
    else:
        rows = list(subset)
        if 0 < len(rows) < config.num_samples:
            warn_too_few(len(rows), config.num_samples)
    if len(rows) == 0:
        raise ValueError("the calibration dataset is empty: it has no samples")
    return rows


class _LazyColumn(Sequence):
    """One column of an indexed dataset, read by slices (only a batch's rows are in memory at a time)."""

    def __init__(self, dataset: Any, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        return self.dataset[index][self.column]


def column_kind(dataset: Any, column: str, rows: int = 64) -> str | None:
    """``"images"`` or ``"text"``: what ``column`` holds, judged from its first value that is not blank
    among its first ``rows`` (``None`` if all are); raises the one line :func:`build_calibration_data`
    would, for a caller that checks data before loading a model."""
    for example in itertools.islice(iter(dataset.select_columns([column])), rows):  # no other column decoded
        value = example[column]
        if not is_blank(value):
            return _kind_of_value(value, column)
    return None


def _kind_of_value(value: Any, column: str) -> str:
    from PIL import Image

    if isinstance(value, Image.Image) or column in IMAGE_COLUMNS:  # arrays, paths...: the image processor judges
        if is_image_path(value):
            open_image_file(value)  # a missing file named now, not as the processor's failed base64 decoding
        return "images"
    if isinstance(value, str):
        return "text"
    if _is_conversation(value):
        return "chat"
    raise ValueError(
        f"column {column!r} holds {type(value).__name__} values; hf_comq reads images (PIL), text (str) or chat "
        "conversations (lists of {'role', 'content'} messages): name such a column (dataset_column, hf-comq: --column)"
    )


def fed_as(kind: str) -> str:
    """The kind of input a kind of data is fed to the model as: chat conversations as text, others as themselves."""
    return "text" if kind == "chat" else kind


def _is_conversation(value: Any) -> bool:
    """Whether ``value`` is one chat conversation: a list of messages with a role and a content."""
    return (
        isinstance(value, (list, tuple)) and bool(value)
        and all(isinstance(message, Mapping) and "role" in message and "content" in message for message in value)
    )  # fmt: skip


def chat_renderer(processor: Any, purpose: str = "calibration") -> Callable[[Any], str]:
    """``conversation -> text`` through the tokenizer's chat template, as the chat model sees its
    input (the text is then tokenized without a second BOS, see :func:`encode_texts`).
    ``purpose`` names the data in error messages (``"calibration"``, ``"evaluation"``)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the {purpose} data is chat conversations, but {type(tokenizer).__name__} has no chat template to "
            "write them as text; give the tokenizer one (tokenizer.chat_template, saved in tokenizer_config.json "
            "where hf-comq reads the checkpoint's), or write each conversation into a text column yourself"
        )
    def render(conversation: Any) -> str:
        try:
            return tokenizer.apply_chat_template(list(conversation), tokenize=False)
        except Exception as error:  # the template's own exception (jinja's TemplateError, a TypeError)
            raise ValueError(
                f"{type(tokenizer).__name__}'s chat template could not write a {purpose} conversation "
                f"({type(error).__name__}: {error}); give conversations the roles and content form the template "
                "takes, or write each into a text column yourself"
            ) from None

    return render


def _make_encoder(
    model: nn.Module, config: Any, kind: str, max_length: int | None
) -> Callable[[list[Any]], Batch | None]:
    """Return ``encode(raw_values) -> model inputs`` for one batch (``None``: nothing usable in it);
    ``max_length``: the tokens a text is cut to."""
    keep = model_input_names(model)
    if kind == "model inputs":
        return lambda values: filter_inputs({"pixel_values": torch.stack([torch.as_tensor(v) for v in values])}, keep)
    chat, kind = kind == "chat", fed_as(kind)
    _check_model_takes(model, keep, kind)
    processor = resolve_processor(
        getattr(config, "processor", None), model, kind, "calibration",
        "pass COMQConfig(processor=...) (an image processor or tokenizer, or its path)", _CHECKPOINT_FOLDER.get(),
    )  # fmt: skip
    if kind == "images":
        channels = image_channels(model, processor)
        return lambda values: filter_inputs(encode_images(processor, values, channels), keep)
    render = chat_renderer(processor) if chat else None
    vocabulary = vocabulary_size(model)

    def encode(values: list[Any]) -> Batch | None:
        texts = values if render is None else [render(value) for value in values]
        encoded = encode_texts(processor, texts, max_length, vocabulary)
        return None if encoded is None else filter_inputs(encoded, keep)

    return encode


def _check_model_takes(model: nn.Module, keep: set[str] | None, kind: str) -> None:
    """One line where the data's kind is one the model's forward cannot take (text for a ViT,
    images for a language model), before looking for a processor that cannot exist: the
    lookup's own failure would blame the checkpoint folder instead of the data."""
    name = type(model).__name__
    if needs_text_and_images(name):
        raise ValueError(text_and_images_refusal(name, ", or pass ready inputs: dicts of input_ids and pixel_values"))
    needed = INPUT_OF_KIND[kind]
    others = sorted(set(INPUT_OF_KIND.values()) & required_input_names(model) - {needed})
    if others:  # e.g. Blip-2, whose forward needs pixel_values beside the text
        raise ValueError(
            f"the calibration data is {kind}, but {name}.forward needs {', '.join(others)} as well; pass ready "
            f"inputs: dicts of {needed} and {', '.join(others)}"
        )
    if keep is None or needed in keep:
        return
    taken = [other for other, name in INPUT_OF_KIND.items() if name in keep]
    if taken:
        items = {"images": "PIL images", "text": "strings"}[taken[0]]
        fix = f"pass {taken[0]} (a list of {items}, or a dataset column of them)"
    else:  # e.g. an audio model: neither images nor text
        fix = "pass ready model inputs (a list of dicts of tensors that its forward takes)"
    raise ValueError(f"the calibration data is {kind}, but {name}.forward takes no {needed}; {fix}")


# ---------------------------------------------------------------------------
# Ready model inputs (not a data source: sampled by index, never re-encoded)
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
    channels = image_channels(model, None) if key == "pixel_values" else None
    if channels is not None and tensor.shape[1] != channels:
        raise ValueError(
            f"the calibration pixel_values tensor has {tensor.shape[1]} channels (shape {tuple(tensor.shape)}), but "
            f"{type(model).__name__} takes {channels} (config.num_channels); pass (batch, {channels}, height, width)"
        )
    indices = _choose_indices(tensor.shape[0], config.num_samples, config.seed)
    keep = model_input_names(model)
    if keep is not None and key not in keep:
        raise ValueError(
            f"a calibration tensor is passed as {key!r}, which {type(model).__name__}.forward does not accept"
        )

    def chunks() -> Iterator[list[int]]:
        for start in range(0, len(indices), config.batch_size):
            yield indices[start : start + config.batch_size]

    description = {"source": f"tensor ({key})", "num_samples": len(indices)}
    longest = tensor.shape[-1] if key == "input_ids" else None
    return CalibrationData(chunks, lambda chunk: {key: tensor[chunk]}, len(indices), description, longest=longest)


def _from_input_dicts(model: nn.Module, config: Any, items: Sequence[Mapping[str, Any]]) -> CalibrationData:
    """Use prepared input dicts as given: each dict is one or more batches, never re-padded."""
    keep = model_input_names(model)
    batches = [_as_input_batch(item, keep, model) for item in items]
    sizes = [_batch_size(batch) for batch in batches]
    if sum(sizes) == 0:
        raise ValueError("the calibration dataset is empty: the input dicts hold no samples")
    order = _choose_indices(len(batches), len(batches), config.seed)
    available = sum(sizes)
    if config.num_samples > available:
        warn_too_few(available, config.num_samples)
    plan = _take_samples([(i, sizes[i]) for i in order], config.num_samples)
    count = sum(taken for _, taken in plan)

    def chunks() -> Iterator[tuple[int, int, int]]:
        for index, taken in plan:
            for start in range(0, taken, config.batch_size):
                yield index, start, min(start + config.batch_size, taken)

    def encode(chunk: tuple[int, int, int]) -> Batch:
        index, start, stop = chunk
        return {name: value[start:stop] for name, value in batches[index].items()}

    description = {"source": "model input dicts", "num_samples": count}
    lengths = [batches[index]["input_ids"].shape[-1] for index, _ in plan if "input_ids" in batches[index]]
    return CalibrationData(chunks, encode, count, description, longest=max(lengths) if lengths else None)


def _as_input_batch(item: Mapping[str, Any], keep: set[str] | None, model: nn.Module) -> Batch:
    batch: Batch = {}
    for name, value in item.items():
        if keep is not None and name not in keep:
            continue
        batch[name] = value if isinstance(value, torch.Tensor) else _input_tensor(name, value)
    if not batch:
        raw = sorted(set(item) & set(IMAGE_COLUMNS + TEXT_COLUMNS + CHAT_COLUMNS))
        fix = (
            f"; {raw[0]!r} is raw data, which goes in as a list (dataset=[...]) or a datasets.Dataset column"
            if raw else ""
        )
        raise ValueError(
            f"a calibration input dict has keys {sorted(item)}, none of which {type(model).__name__}.forward "
            f"accepts{fix}"
        )
    if all(t.dim() == 1 for t in batch.values()) or ("pixel_values" in batch and batch["pixel_values"].dim() == 3):
        batch = {name: t.unsqueeze(0) for name, t in batch.items()}
    leading = {t.shape[0] for t in batch.values()}
    if len(leading) != 1:
        raise ValueError(f"the tensors of a calibration input dict disagree on the batch size: {sorted(leading)}")
    return right_aligned(batch)


def _input_tensor(name: str, value: Any) -> torch.Tensor:
    """One entry of an input dict as a tensor; rows of different lengths (``tokenizer(texts)`` without
    padding) are named with the two ways hf_comq takes them."""
    try:
        return torch.as_tensor(value)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"calibration input {name!r} is not a tensor and cannot become one ({error}): an input dict is used "
            "as it is, never padded; pass token rows as datasets.Dataset.from_dict(dict(encoding)) (padded per "
            "batch), the texts themselves, or tokenizer(texts, padding=True, return_tensors='pt')"
        ) from None


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


def _images_to_calibrate_on(items: Sequence[Any], config: Any) -> list[Any]:
    """The images of a list that the seeded subset of all of them takes (:func:`~.sources.seeded_subset`
    on a column of their positions: the same rows), the others left out before any is stored: a
    ``datasets.Dataset`` stores every image as an image file, which would cost time and memory with
    the list's length rather than with ``num_samples``."""
    if len(items) <= config.num_samples:
        return list(items)
    positions = seeded_subset(dataset_from_list(range(len(items)), "position"), config.num_samples, config.seed)
    return [items[position] for position in positions["position"]]


def _choose_indices(total: int, requested: int, seed: int) -> list[int]:
    """A seeded random subset of ``requested`` of ``total`` indices (all of them if fewer exist)."""
    if total == 0:
        raise ValueError("the calibration dataset is empty: it has no samples")
    if requested > total:
        warn_too_few(total, requested)
    generator = torch.Generator().manual_seed(seed % 2**64)  # torch takes 64-bit seeds; datasets' shuffle any
    return torch.randperm(total, generator=generator)[: min(requested, total)].tolist()
