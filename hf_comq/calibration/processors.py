"""Processors between raw calibration values and model inputs: which one, and how images and texts go through it.

Calibration and evaluation feed a model the way its own pipeline would: images
through its image processor (converted to the channel count it was trained on),
texts through its tokenizer (padded, with padding masked out of the Hessians).  The
processor is the one configured, else the checkpoint's own, so a quantized and a
full-precision model see identical inputs.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from .sources import TOKEN_COLUMNS, is_blank

logger = logging.get_logger(__name__)

__all__ = [
    "encode_images",
    "encode_texts",
    "filter_inputs",
    "image_channels",
    "is_image_path",
    "load_processor",
    "model_input_names",
    "open_image_file",
    "padded_token_batch",
    "padding_id",
    "required_input_names",
    "resolve_processor",
    "text_length_limit",
]

Batch = dict[str, torch.Tensor]


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

    images = [open_image_file(image) if is_image_path(image) else image for image in images]
    images = [to_eight_bits(image) if isinstance(image, Image.Image) else image for image in images]
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


def to_eight_bits(image: Any) -> Any:
    """A 16-bit image (mode ``I;16``: 16-bit PNG or TIFF scans) on the 0-255 scale every other mode is on,
    by its container's range (65535 -> 255), the same for every image, as a viewer shows it; PIL's
    ``convert`` clips values above 255 instead, which turns a 16-bit picture nearly all white.  A
    32-bit ``I`` image is scaled so only where it holds values above 255 (its range is not known);
    other modes are returned as they are."""
    from PIL import Image

    if not image.mode.startswith("I"):
        return image
    values = np.asarray(image).astype(np.float64)
    if image.mode == "I" and float(values.max(initial=0.0)) <= 255:
        return image
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")


def is_image_path(value: Any) -> bool:
    """Whether ``value`` names an image file (a string that is not a URL or inline data)."""
    return isinstance(value, str) and not value.startswith(("http://", "https://", "data:"))


def open_image_file(path: str) -> Any:
    """The image at ``path``, read from the working folder when relative (as transformers reads it);
    a missing or unreadable file in one line naming the file and that folder, where the image
    processor would try the name as inline base64 data and fail on that."""
    from PIL import Image, UnidentifiedImageError

    where = f" (relative paths are read from the working folder, {os.getcwd()})" if not os.path.isabs(path) else ""
    try:
        image = Image.open(os.path.expanduser(path))
        image.load()
    except FileNotFoundError:
        raise ValueError(f"image file {path!r} not found{where}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image file {path!r} cannot be read as an image: {error}") from None
    return image


def encode_texts(processor: Any, texts: list[str], max_length: int, vocabulary: int | None = None) -> Batch | None:
    """Tokenize one batch as each text is tokenized alone, padded on the right (padding masked out);
    empty strings are dropped (they carry no tokens), ``None`` if nothing is left.

    The batch is padded here, not by the tokenizer: a tokenizer saved with
    ``padding_side="left"`` would start a short text at position ``k`` instead of 0, which
    changes its activations in a model with learned positions (GPT-2), and a tokenizer
    without a pad token (GPT-2, LLaMA) would need one set on it, a change that would be
    saved with the checkpoint.  Padded positions are masked, so the pad id only has to be
    a valid token id: the tokenizer's pad token where the model's embedding (``vocabulary``
    rows) holds it, else 0 (a pad token added to a tokenizer without resizing the embedding).
    A text that already starts with the tokenizer's BOS token (a chat template's output)
    gets no second one, as ``apply_chat_template`` tokenizes it.
    """
    texts = [text for text in texts if not is_blank(text)]
    if not texts:
        return None
    tokenizer = getattr(processor, "tokenizer", processor)
    bos = getattr(tokenizer, "bos_token", None)
    templated = [isinstance(bos, str) and bool(bos) and text.startswith(bos) for text in texts]
    rows: list[dict[str, list[int]]] = [{} for _ in texts]
    for skip_specials in (False, True):
        picked = [index for index, flag in enumerate(templated) if flag == skip_specials]
        if not picked:
            continue
        try:
            with backend_settings_kept(tokenizer):
                encoded = processor(
                    text=[texts[index] for index in picked], add_special_tokens=not skip_specials,
                    truncation=True, max_length=max_length,
                )  # fmt: skip
        except Exception as error:
            raise ValueError(f"{type(processor).__name__} could not tokenize the texts: {error}") from error
        for position, index in enumerate(picked):
            rows[index] = {name: list(encoded[name][position]) for name in TOKEN_COLUMNS if name in encoded}
    columns = {name: [row[name] for row in rows] for name in TOKEN_COLUMNS if name in rows[0]}
    return padded_token_batch(columns, max_length, padding_id(tokenizer, vocabulary))


@contextmanager
def backend_settings_kept(tokenizer: Any) -> Iterator[None]:
    """Put a fast tokenizer's truncation and padding back as they were after a call: the call's
    ``truncation=True, max_length=...`` stays set in its Rust backend, and a saved tokenizer.json
    would then cut every input at calibration's length for whatever reads it with ``tokenizers``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        yield
        return
    truncation, padding = backend.truncation, backend.padding
    try:
        yield
    finally:
        if truncation is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(**truncation)
        if padding is None:
            backend.no_padding()
        else:
            backend.enable_padding(**padding)


def vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (``None`` when it has no token embedding, e.g. a ViT)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get_embeddings() if callable(get_embeddings) else None
    except NotImplementedError:
        return None
    return embeddings.num_embeddings if isinstance(embeddings, nn.Embedding) else None


def padding_id(holder: Any, vocabulary: int | None = None) -> int:
    """The id that pads a batch: ``holder``'s ``pad_token_id`` (a tokenizer's or a model config's) where
    it is a token id the embedding holds, else 0.

    Padded positions are masked out of attention and of the Gram sums, so any id the
    embedding holds will do; converted checkpoints carry ``pad_token_id=-1``, pad-less
    tokenizers none.
    """
    value = getattr(holder, "pad_token_id", None)
    valid = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value if valid and (vocabulary is None or value < vocabulary) else 0


def padded_token_batch(columns: Mapping[str, list[Any]], max_length: int, pad_id: int) -> Batch | None:
    """Rows of token ids (and their masks) as one right-padded batch of tensors; ``None`` if no row has a token."""
    rows = {name: [_as_list(row) for row in columns[name]] for name in TOKEN_COLUMNS if name in columns}
    ids = rows[TOKEN_COLUMNS[0]]
    if any(not isinstance(token, int) for row in ids for token in row):
        raise ValueError("column 'input_ids' must hold lists of integer token ids, one list per sample")
    for name, values in rows.items():
        for row, tokens in zip(values, ids):
            if len(row) != len(tokens):
                raise ValueError(
                    f"column {name!r} must hold one entry per token of input_ids; a row of {len(tokens)} tokens has "
                    f"{len(row)}"
                )
    if "attention_mask" in rows:  # left padding (a left-padding tokenizer's rows) goes: every row starts at 0
        starts = [next((index for index, kept in enumerate(mask) if kept), len(mask)) for mask in rows["attention_mask"]]
        rows = {name: [row[start:] for row, start in zip(values, starts)] for name, values in rows.items()}
        ids = rows[TOKEN_COLUMNS[0]]
    if not any(ids):
        return None
    rows.setdefault("attention_mask", [[1] * len(row) for row in ids])
    width = min(max_length, max(len(row) for row in ids))
    pads = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}
    return {name: torch.tensor([row[:width] + [pads[name]] * (width - len(row[:width])) for row in values])
            for name, values in rows.items()}  # fmt: skip


def right_aligned(batch: Batch) -> Batch:
    """A ready batch whose ``attention_mask`` pads rows on the left, with its padding moved to the right.

    A text model without ``position_ids`` numbers a row's tokens from its first column, so a
    left-padded row's tokens would run at shifted positions (absolute position tables, as
    GPT-2's, then see other activations than at inference, where ``generate`` derives the
    positions from the mask).  Rolling each row left by its padding changes nothing else:
    the padded positions stay masked.  A batch with ``position_ids`` is taken as it is; only
    the token columns move (an encoder-decoder's decoder inputs have their own positions).
    """
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2 or "position_ids" in batch or not bool((mask[:, 0] == 0).any()):
        return batch
    leading = (mask.cumsum(1) == 0).sum(1)  # masked columns before each row's first token
    aligned = dict(batch)
    for name, tensor in batch.items():
        if name in TOKEN_COLUMNS and tensor.shape == mask.shape:
            aligned[name] = torch.stack([torch.roll(row, -int(shift)) for row, shift in zip(tensor, leading)])
    return aligned


def _as_list(row: Any) -> list[Any]:
    """A row of a tokenized column as a list of numbers, whatever format the dataset gives (list, tensor, array)."""
    return row.tolist() if hasattr(row, "tolist") else list(row)


POSITION_LIMITS = ("max_position_embeddings", "max_decoder_position_embeddings", "n_positions", "n_ctx")
"""Config attributes that bound a text model's sequence length (absent where positions are relative, as T5's)."""


def text_length_limit(model: nn.Module | None, max_length: int) -> int:
    """``max_length``, cut to the positions the model declares (a warning where a length other than
    the default is cut, a log line otherwise: a 77-position text tower is cut on every run).

    Longer inputs fail inside a learned position table (GPT-2: an IndexError deep in the
    forward) or run past the positions a rotary model was trained on, where its
    activations are not the ones it will be used on.  A table whose first rows belong to
    padding (RoBERTa's positions start after ``padding_idx``) holds that many fewer.
    """
    from ..settings import COMQSettings

    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    declared = [getattr(text_config, name, None) for name in POSITION_LIMITS]
    limits = [value for value in declared if isinstance(value, int) and not isinstance(value, bool) and value > 0]
    limits += [
        module.num_embeddings - module.padding_idx - 1
        for name, module in (model.named_modules() if isinstance(model, nn.Module) else ())
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding) and module.padding_idx is not None
    ]
    if not limits or max_length <= min(limits):
        return max_length
    limit = min(limits)
    log = logger.warning if max_length != COMQSettings.default("max_length") else logger.info
    log(
        "max_length=%d is longer than the %d positions %s declares; texts are cut to %d tokens "
        "(max_length, hf-comq: --max-length)", max_length, limit, type(model).__name__, limit,
    )  # fmt: skip
    return limit


def resolve_processor(
    processor: Any, model: nn.Module | None, kind: str, who: str, fix: str, checkpoint_folder: str | None = None
) -> Any:
    """``processor`` itself, loaded from its path, or the model's own when ``None``: the one saved in
    ``checkpoint_folder`` (the folder the weights load from: a ``subfolder=``'s, or the snapshot of the
    ``revision=`` asked for), else the one at ``model.name_or_path``.

    ``kind`` is ``"images"`` or ``"text"``; error messages start with ``who`` (what needs
    the processor) and end with ``fix``, what the caller's user should pass.
    """
    if processor is not None and not isinstance(processor, (str, os.PathLike)):
        if not callable(processor):
            raise ValueError(f"the processor must be callable or a path, got {type(processor).__name__}; {fix}")
        return processor
    if processor is not None:
        locations = [os.fspath(processor)]
    else:
        name = getattr(model, "name_or_path", "") or ""
        locations = [place for place in (checkpoint_folder, name) if place]
        locations = list(dict.fromkeys(os.path.normpath(place) if os.path.isdir(place) else place for place in locations))
    if not locations:
        what = "an image processor" if kind == "images" else "a tokenizer"
        raise ValueError(f"{who} needs {what} and none is known: {fix}")
    for location in locations[:-1]:
        try:
            return load_processor(location, kind)
        except ValueError:  # not saved beside the weights (a Hub snapshot holds what was downloaded): the next
            continue
    try:
        return load_processor(locations[-1], kind)
    except ValueError as error:
        raise ValueError(f"{error}; {fix}") from None


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
        if not _handles(processor, kind):
            errors.append(f"{loader.__name__} found a {type(processor).__name__}, which does not handle {kind}")
        elif kind == "text" and _has_no_vocabulary(getattr(processor, "tokenizer", processor)):
            errors.append(
                f"{loader.__name__} made a {type(processor).__name__} with no vocabulary beyond its special tokens "
                "(no tokenizer files there: transformers builds an empty one)"
            )
        else:
            return processor
    what = "an image processor" if kind == "images" else "a tokenizer"
    raise ValueError(f"could not load {what} from {location!r} ({' | '.join(errors)})")


def _has_no_vocabulary(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` knows no token but its special ones: every text would calibrate as unknown tokens."""
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    try:
        return len(tokenizer) <= len(special)
    except TypeError:  # a tokenizer-like object without a length: not ours to judge
        return False


def _handles(processor: Any, kind: str) -> bool:
    """An AutoProcessor may find the other modality's processor (a ViT folder asked for a tokenizer)."""
    from transformers import PreTrainedTokenizerBase
    from transformers.image_processing_utils import BaseImageProcessor

    if kind == "images":
        return isinstance(processor, BaseImageProcessor) or hasattr(processor, "image_processor")
    return isinstance(processor, PreTrainedTokenizerBase) or hasattr(processor, "tokenizer")


def model_input_names(model: nn.Module) -> set[str] | None:
    """Named parameters of ``model.forward``; ``None`` when it takes only ``**kwargs``."""
    names = {parameter.name for parameter in _named_forward_parameters(model)}
    return names or None


def required_input_names(model: nn.Module) -> set[str]:
    """The named parameters of ``model.forward`` without a default: inputs every call must give."""
    return {parameter.name for parameter in _named_forward_parameters(model) if parameter.default is parameter.empty}


def _named_forward_parameters(model: nn.Module) -> list[inspect.Parameter]:
    """``model.forward``'s parameters that can be passed by name (none where it has no signature)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def filter_inputs(batch: Mapping[str, Any], keep: set[str] | None) -> Batch:
    """Drop processor outputs the model does not take (e.g. ``token_type_ids`` for LLaMA)."""
    tensors = {name: value for name, value in batch.items() if isinstance(value, torch.Tensor)}
    if keep is None:
        return tensors
    filtered = {name: value for name, value in tensors.items() if name in keep}
    if not filtered:
        raise ValueError(f"the processor produced {sorted(tensors)}, none of which the model's forward accepts")
    return filtered
