"""Small, dependency-free evaluation helpers for quantized models.

Why this module exists: a quantized checkpoint is only worth shipping if it still
does its job, and "its job" depends on the model: an image classifier is judged
by top-1 accuracy, a causal LM by perplexity, a text encoder by how close its
embeddings stay to the full-precision model's.  ``hf-comq evaluate``, ``hf-comq
demo``, the examples and the benchmarks all need the same numbers computed the
same way, so they live here rather than in each script.

Every function runs under ``torch.inference_mode`` on the model's own device,
batches its inputs, and shows a ``transformers`` progress bar (silence it with
``transformers.utils.logging.disable_progress_bar()``).  Data loading reuses the
calibration's data sources (:mod:`hf_comq.calibration.sources`), so a dataset name or path
means the same thing to ``hf-comq quantize`` and ``hf-comq evaluate``.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from .calibration.processors import (
    encode_images,
    encode_texts,
    image_channels,
    resolve_processor,
    text_length_limit,
    vocabulary_size,
)
from .calibration.sources import dataset_from_list, is_blank, load_dataset_source
from .calibration.sources import pick_column as _pick_calibration_column
from .checkpoint import loaded_weight_files
from .threads import linear_layer_threads

if TYPE_CHECKING:  # importing datasets is slow; only the functions that take a dataset need it
    import datasets

logger = logging.get_logger(__name__)

UNLABELLED = -1  # the class id datasets gives a row without a label (a Hub test split's, often)

__all__ = [
    "checkpoint_size_bytes",
    "class_ids",
    "embedding_cosine",
    "fidelity_of_logits",
    "image_logits",
    "load_eval_dataset",
    "mcnemar_exact_p",
    "perplexity",
    "pick_column",
    "prediction_fidelity",
    "Top1Result",
    "top1",
]


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def load_eval_dataset(source: str | os.PathLike[str], split: str, default_split: str | None = None) -> Any:
    """Load evaluation data the way calibration loads ``COMQConfig(dataset=...)``.

    A ``save_to_disk`` folder, a local data file (parquet, json, csv, arrow, txt)
    or a Hub name; files and Hub data are streamed, so a large test set is never
    held in memory.  Raises ``ValueError`` with a one-line reason when the data
    cannot be loaded (missing file, unknown split, no network...).  A single file has
    no splits: a ``split`` other than ``default_split`` is ignored with a warning.
    """
    dataset, _ = load_dataset_source(source, split, default_split)
    return dataset


def pick_column(dataset: Any, requested: str | None, kind: str = "input", tokens: bool = False) -> str:
    """The column to read: ``requested`` if the dataset has it, else the usual image/text column
    (evaluation reads images, texts and conversations, so a tokenized dataset's ``input_ids`` column
    beside its texts is passed over; ``tokens``: as calibration picks, token ids first).

    Raises ``ValueError`` naming the available columns, so a typo in
    ``--column`` fails before any model is loaded.
    """
    try:
        return _pick_calibration_column(dataset, requested, tokens=tokens)
    except ValueError as error:
        if "column" not in str(error):  # e.g. an empty dataset: the message says it all
            raise
        raise ValueError(f"{kind} {error}") from None


# ---------------------------------------------------------------------------
# Image classification
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Top1Result:
    """Per-image predicted classes and labels (``long`` tensors, dataset order), with the totals.

    Comparing two quantizers image by image (which images only one of them gets
    right) says whether a top-1 difference is more than chance; the totals alone
    cannot.  A streamed dataset has no length, so ``total`` is also how a caller
    learns how many images were scored.
    """

    predictions: torch.Tensor
    labels: torch.Tensor

    @property
    def correct(self) -> int:
        return int((self.predictions == self.labels).sum())

    @property
    def total(self) -> int:
        return len(self.labels)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def top1(
    model: nn.Module,
    dataset: "datasets.Dataset | datasets.IterableDataset",
    processor: Any = None,
    *,
    image_column: str | None = None,
    label_column: str = "label",
    batch_size: int = 64,
) -> Top1Result:
    """Top-1 classification of every image: predictions, labels, ``correct``, ``total``, ``accuracy``.

    Args:
        model: an image classifier (``...ForImageClassification``), quantized or not.
        dataset: a ``datasets`` (Iterable)Dataset with an image column and an
            integer label column.
        processor: image processor (object or path); ``None`` loads the model's own
            one from ``model.name_or_path``, as calibration does, so FP and quantized
            models see identical pixels.
        image_column: column holding the images; ``None`` picks ``image`` / ``img`` /
            ``pixel_values``.
        label_column: column holding the class ids.
        batch_size: images per forward pass.

    When the dataset's ``ClassLabel`` names and the model's ``id2label`` name the
    same classes in a different order, labels are mapped by name (to the model's
    ids): comparing raw ids would report a working model as broken.
    """
    if label_column is None:
        raise ValueError(
            "top1 needs labels: name the class-id column with label_column; to compare a model with another "
            "without labels, use prediction_fidelity(model, reference_model, dataset)"
        )
    logits, labels = image_logits(
        model, dataset, processor, image_column=image_column, label_column=label_column, batch_size=batch_size
    )
    return Top1Result(logits.argmax(dim=-1), labels)


def image_logits(
    model: nn.Module,
    dataset: "datasets.Dataset | datasets.IterableDataset",
    processor: Any = None,
    *,
    image_column: str | None = None,
    label_column: str | None = "label",
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-image class logits (float32, on the CPU) and labels (``None`` with ``label_column=None``).

    One forward pass per image gives everything :func:`top1` and
    :func:`fidelity_of_logits` need, so a comparison of several models against one
    reference runs the reference once.  ``dataset`` may also be a list of PIL images
    where no labels are read (``label_column=None``).  Other arguments as in :func:`top1`.
    """
    dataset = _image_rows(dataset, label_column)
    image_column = pick_column(dataset, image_column, "image")
    if label_column is not None:
        label_column = pick_column(dataset, label_column, "label")
    _check_sizes(batch_size=batch_size)
    processor = _image_processor(model, processor, "top1")
    remap = _label_remap(dataset, label_column, model) if label_column is not None else None
    device, dtype = _device_and_dtype(model)
    channels = image_channels(model, processor)
    rows = dataset.select_columns([image_column] + ([label_column] if label_column is not None else []))

    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with torch.inference_mode(), linear_layer_threads(model), logging.tqdm(
        total=_length(dataset), desc="images", unit="img"
    ) as bar:
        for batch in rows.iter(batch_size=batch_size):
            pixels = encode_images(processor, list(batch[image_column]), channels)["pixel_values"]
            logits.append(_class_logits(model(pixel_values=pixels.to(device=device, dtype=dtype)), model))
            if label_column is not None:
                classes, owner = (logits[-1].shape[-1], "the model's") if remap is None else (len(remap), "the dataset's")
                batch_labels = class_ids(batch[label_column], label_column, classes, check_range=True, owner=owner)
                labels.append(remap[batch_labels] if remap is not None else batch_labels)
            bar.update(len(batch[image_column]))
    if not logits:
        raise ValueError("the evaluation dataset is empty: it has no images")
    return torch.cat(logits), (torch.cat(labels) if label_column is not None else None)


def _image_rows(dataset: Any, label_column: str | None) -> Any:
    """A list of images as a one-column dataset (no labels to read in it), any other dataset as it is."""
    if not isinstance(dataset, (list, tuple)):
        return dataset
    if label_column is not None:
        raise ValueError(
            "a list of images has no labels: pass a datasets.Dataset with an image and a label column, e.g. "
            "datasets.Dataset.from_dict({'image': images, 'label': class_ids})"
        )
    if not dataset:
        raise ValueError("the evaluation dataset is empty: it has no images")
    return dataset_from_list(dataset, "image")


def _class_logits(output: Any, model: nn.Module) -> torch.Tensor:
    """The output's class logits (float32, CPU); one line where the model is no classifier."""
    logits = getattr(output, "logits", None)
    if logits is None or logits.dim() != 2:
        raise ValueError(
            f"{type(model).__name__} gives no class logits: top-1 and prediction fidelity need an image classifier "
            "(a ...ForImageClassification model)"
        )
    return logits.float().cpu()


def class_ids(
    values: Sequence[Any] | torch.Tensor, column: str, classes: int, check_range: bool, owner: str = "the model's"
) -> torch.Tensor:
    """A batch's labels as class ids, in one line where they are not integers or (with ``check_range``)
    not among the ``classes`` ids of their ``owner`` (the model's outputs, or the dataset's class
    names where those remap them), which would otherwise fail inside torch or count silently as
    wrong predictions."""
    whole = isinstance(values, torch.Tensor) and not values.dtype.is_floating_point and values.dtype != torch.bool
    if not whole and not all(isinstance(value, numbers.Integral) and not isinstance(value, bool) for value in values):
        kinds = sorted({type(value).__name__ for value in values})
        raise ValueError(
            f"label column {column!r} holds {kinds} values; top-1 needs integer class ids (the model's id2label "
            "keys): name the class-id column with label_column (hf-comq: --label-column)"
        )
    ids = torch.as_tensor(values, dtype=torch.long)
    if check_range and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= classes):
        bad = int(ids.max()) if int(ids.max()) >= classes else int(ids.min())
        if bad == UNLABELLED:
            raise ValueError(
                f"column {column!r} holds label {UNLABELLED}, which datasets uses for a row without a label: this split "
                "is not labelled (test splits of Hub image sets often are not); pick a labelled one (hf-comq: --split)"
            )
        raise ValueError(
            f"label {bad} in column {column!r} is not one of {owner} {classes} classes (0 to {classes - 1}): "
            "the dataset's classes are not the ones the model predicts"
        )
    return ids


def fidelity_of_logits(logits: torch.Tensor, reference_logits: torch.Tensor) -> dict[str, float]:
    """``agreement`` (same arg-max) and mean ``kl`` (``KL(reference || model)``, nats) of two logit tables."""
    if logits.shape != reference_logits.shape or logits.shape[0] == 0:
        raise ValueError(f"logit tables of shapes {tuple(logits.shape)} and {tuple(reference_logits.shape)} do not pair")
    ours, theirs = logits.float(), reference_logits.float()
    for name, table in (("the model's", ours), ("the reference model's", theirs)):
        if not bool(torch.isfinite(table).all()):
            raise ValueError(f"{name} logits hold NaN or infinite values: its outputs are broken, no fidelity to measure")
    agreement = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    kl = float(F.kl_div(F.log_softmax(ours, -1), F.log_softmax(theirs, -1), log_target=True, reduction="sum"))
    return {"agreement": agreement, "kl": kl / ours.shape[0]}


def prediction_fidelity(
    model: nn.Module,
    reference_model: nn.Module,
    dataset: "datasets.Dataset | datasets.IterableDataset",
    processor: Any = None,
    *,
    image_column: str | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """How closely ``model`` reproduces ``reference_model``'s predictions on ``dataset``.

    Returns ``agreement`` (fraction of images where both models pick the same class)
    and ``kl`` (mean ``KL(reference || model)`` of the class distributions, in nats).
    ``processor`` as in :func:`top1` (``None``: ``model``'s own).
    Top-1 accuracy only moves when a prediction crosses a decision boundary, so on a
    model with wide margins every quantizer ties with full precision; these two see
    the quantization error before it costs accuracy, and need no labels.
    """
    processor = _image_processor(model, processor, "prediction_fidelity")
    kwargs = {"image_column": image_column, "label_column": None, "batch_size": batch_size}
    ours, _ = image_logits(model, dataset, processor, **kwargs)
    theirs, _ = image_logits(reference_model, dataset, processor, **kwargs)
    return fidelity_of_logits(ours, theirs)


def _image_processor(model: nn.Module, processor: Any, caller: str) -> Any:
    """``processor`` itself, or loaded from its path, or from the model's own checkpoint when ``None``."""
    return resolve_processor(processor, model, "images", caller, "pass processor=... (object or path)")


def _label_remap(dataset: Any, label_column: str, model: nn.Module) -> torch.Tensor | None:
    """``dataset id -> model id`` where the dataset's class names are the model's (all or some of
    them) in other places, else ``None``: the ids are compared as they are.

    A name the model has at the dataset's own id stays there (ImageNet names two classes
    "crane"); one it has once elsewhere is mapped to it.  Names the model lacks (spelled another
    way: ``T - shirt / top``) leave the ids as they are when every name both share sits at the
    same id, and are one line when some do not: compared as raw ids, those classes would be
    scored against others.  A model with generic labels (``LABEL_0``...) names nothing to match.
    """
    features = getattr(dataset, "features", None) or {}
    names = getattr(features.get(label_column), "names", None)
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    if not names or not id2label:
        return None
    model_names = {int(index): str(label) for index, label in id2label.items()}
    if all(re.fullmatch(r"LABEL_\d+", label) for label in model_names.values()):
        return None
    ids_of: dict[str, list[int]] = {}
    for index, label in sorted(model_names.items()):
        ids_of.setdefault(label, []).append(index)
    mapped: list[int | None] = [
        index if model_names.get(index) == name else (ids_of[name][0] if len(ids_of.get(name, ())) == 1 else None)
        for index, name in enumerate(names)
    ]
    moved = [name for index, (name, target) in enumerate(zip(names, mapped)) if target is not None and target != index]
    if not moved:
        return None  # every name the two share is at the same id: the ids are the model's
    unmatched = [name for name, target in zip(names, mapped) if target is None]
    if unmatched:
        raise ValueError(
            f"the dataset's classes {moved[:3]} are the model's under other ids, and {unmatched[:3]} are not (or "
            f"not once) among its class names: name the dataset's classes as the model's id2label does, or store "
            "the labels as plain integers holding the model's class ids"
        )
    logger.info("the dataset names its classes differently from the model's order; mapping labels by name")
    return torch.tensor(mapped, dtype=torch.long)


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: how likely a split at least this uneven of the
    images that exactly one of two classifiers gets right is, if both were equally good.

    Two quantized models of one network disagree on few images; a top-1 difference
    of a handful of them is usually chance, and this says how likely.
    """
    for name, count in (("only_a", only_a), ("only_b", only_b)):
        if not isinstance(count, numbers.Integral) or isinstance(count, bool) or count < 0:
            raise ValueError(f"{name}: expected a count of images (an integer >= 0), got {count!r}")
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    # The binomial tail in log space: exact big-integer coefficients cost time quadratic in the
    # count, seconds at ImageNet's sizes; here each term costs three lgamma calls.
    log_terms = [
        math.lgamma(discordant + 1) - math.lgamma(k + 1) - math.lgamma(discordant - k + 1) - discordant * math.log(2)
        for k in range(min(only_a, only_b) + 1)
    ]
    top = max(log_terms)
    tail = math.exp(top) * math.fsum(math.exp(term - top) for term in log_terms)
    return min(1.0, 2 * tail)


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int = 512,
    batch_size: int = 8,
) -> float:
    """Token-level perplexity of a causal LM over ``texts``: ``exp`` of the mean next-token loss.

    Each text is truncated to ``max_length`` tokens (at most the positions the model
    declares) and scored on its own (no packing across texts); the mean is over all
    predicted tokens, not over batches, so the result does not depend on ``batch_size``
    or on how texts of different lengths fall into batches.  The loss is computed here
    rather than taken from the model, whose ``loss`` averages per batch.  ``tokenizer``: an object or
    a path, as ``top1``'s processor; ``texts``: strings (a dataset's text column, not the dataset).
    """
    _check_sizes(batch_size=batch_size, max_length=max_length)
    max_length = text_length_limit(model, max_length)
    device, _ = _device_and_dtype(model)
    total_loss = 0.0
    total_tokens = 0
    with torch.inference_mode(), linear_layer_threads(model):
        for input_ids, mask in _token_batches(tokenizer, texts, max_length, batch_size, "perplexity", model):
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
            targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).to(logits.device)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total_loss += float(loss)
            total_tokens += int((targets != -100).sum())
    if total_tokens == 0:
        raise ValueError("perplexity needs texts of at least two tokens; every text was empty or a single token")
    return float(torch.exp(torch.tensor(total_loss / total_tokens)))


def embedding_cosine(
    model: nn.Module,
    reference_model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 512,
) -> float:
    """Mean cosine similarity between ``model``'s and ``reference_model``'s text embeddings.

    An embedding is the mean of the last hidden states over real (non-padding)
    tokens, the sentence-transformers pooling most encoders are used with.  For
    a quantized encoder this says directly how much of the full-precision
    geometry survives: 1.0 is identical, and retrieval quality typically holds
    above about 0.99.  Works for base models and task models (the last hidden
    state is requested with ``output_hidden_states``).  ``tokenizer`` and ``texts`` as in
    :func:`perplexity`.
    """
    _check_sizes(batch_size=batch_size, max_length=max_length)
    max_length = text_length_limit(model, max_length)
    device, _ = _device_and_dtype(model)
    reference_device, _ = _device_and_dtype(reference_model)
    cosines: list[torch.Tensor] = []
    with torch.inference_mode(), linear_layer_threads(model, reference_model):
        for input_ids, mask in _token_batches(tokenizer, texts, max_length, batch_size, "embedding cosine", model):
            ours = _mean_pooled(model, input_ids.to(device), mask.to(device))
            theirs = _mean_pooled(reference_model, input_ids.to(reference_device), mask.to(reference_device))
            cosines.append(F.cosine_similarity(ours, theirs.to(ours.device), dim=-1).cpu())
    if not cosines:
        raise ValueError("embedding cosine needs at least one non-empty text")
    return float(torch.cat(cosines).mean())


def _mean_pooled(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    outputs = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:
        hidden = outputs.hidden_states[-1]
    weights = mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _token_batches(
    tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int, description: str, model: nn.Module
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask)`` batches; empty texts are dropped.

    Tokenized as calibration tokenizes texts (:func:`~hf_comq.calibration.processors.encode_texts`):
    each text as if alone, padded on the right with an id ``model``'s embedding holds (masked out:
    a pad token added to a Llama tokenizer without resizing the embedding is past its end),
    not by ``tokenizer.pad``, which refuses tokenizers without a pad token (GPT-2, LLaMA)
    and pads on a left-padding tokenizer's left; and a text written by a chat template
    (it starts with the BOS token) gets no second BOS.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    texts = list(texts)
    strange = sorted({type(text).__name__ for text in texts if text is not None and not isinstance(text, str)})
    if strange:
        raise TypeError(
            f"texts must be strings, got {strange} items; from a dataset pass its text column, e.g. dataset['text']"
        )
    kept = [text for text in texts if not is_blank(text)]
    tokenizer = resolve_processor(tokenizer, None, "text", description, "pass tokenizer=... (object or path)")
    vocabulary = vocabulary_size(model)
    with logging.tqdm(total=len(kept), desc=description, unit="text") as bar:
        for start in range(0, len(kept), batch_size):
            chunk = kept[start : start + batch_size]
            batch = encode_texts(tokenizer, chunk, max_length, vocabulary)
            if batch is not None:
                yield batch["input_ids"], batch["attention_mask"]
            bar.update(len(chunk))


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def checkpoint_size_bytes(directory: str | os.PathLike[str]) -> int:
    """Total size of the ``*.safetensors`` weight files in ``directory`` (sharded checkpoints included).

    Only weight files count: the config, tokenizer and model card are the same
    for the full-precision and the quantized checkpoint, and counting them would
    understate the compression on small models.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    files = loaded_weight_files(folder)
    if not files:
        raise FileNotFoundError(f"no .safetensors weight file in {folder}")
    return sum(path.stat().st_size for path in files)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where inputs must go and which float dtype pixel inputs need.

    ``PreTrainedModel.device`` is the device of the first parameter, which is also
    where accelerate-dispatched models expect their inputs.
    """
    device = getattr(model, "device", None)
    dtype = getattr(model, "dtype", None)
    parameter = next(model.parameters(), None)
    if not isinstance(device, torch.device):
        device = parameter.device if parameter is not None else torch.device("cpu")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = parameter.dtype if parameter is not None and parameter.dtype.is_floating_point else torch.float32
    if device.type == "meta":  # offloaded weights: accelerate hooks move inputs; start on the CPU
        device = torch.device("cpu")
    return device, dtype


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # streamed data has no length; the bar just counts
        return None


def _check_sizes(**sizes: int) -> None:
    """Each of ``sizes`` (``batch_size``, ``max_length``) a positive integer, else one line naming it."""
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
