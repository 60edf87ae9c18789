"""Data sources as ``datasets`` objects: what a dataset name, path or list means, and which samples are used.

Calibration (``COMQConfig(dataset=...)``), ``hf-comq quantize`` and ``hf-comq evaluate``
accept the same names, so they resolve them here, to a ``datasets.Dataset`` (indexed,
memory-mapped) or ``IterableDataset`` (streamed): local files and Hub data are
streamed so a large set is never read whole.  The calibration subset is the
library's own seeded shuffle (``Dataset.shuffle(seed).select(range(n))``, or a
shuffle buffer and ``take(n)`` for a stream), so "seed 0, 128 samples" picks the
rows ``datasets`` users expect.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..settings import DATA_FILE_BUILDERS, check_split_name, is_missing_local_path

logger = logging.get_logger(__name__)

__all__ = [
    "DATA_FILE_BUILDERS",
    "CHAT_COLUMNS",
    "IMAGE_COLUMNS",
    "STREAM_SHUFFLE_BUFFER",
    "TEXT_COLUMNS",
    "TOKEN_COLUMNS",
    "check_local_sources",
    "column_names",
    "data_file_builder",
    "dataset_from_list",
    "dataset_name",
    "dataset_origin",
    "is_blank",
    "load_dataset_source",
    "named_decoding_errors",
    "pick_column",
    "pick_split",
    "seeded_subset",
    "warn_too_few",
]

IMAGE_COLUMNS = ("image", "img", "pixel_values")
TEXT_COLUMNS = ("text",)
CHAT_COLUMNS = ("messages",)
"""Columns of chat conversations (lists of ``{"role", "content"}`` messages, the format of TRL's
conversational datasets), rendered with the tokenizer's chat template."""
TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
"""Columns of a tokenized dataset (``dataset.map(tokenizer)``), read as ready model inputs;
``input_ids`` is the one :func:`pick_column` looks for, after images and before text (a mapped
dataset keeps its text column unless told otherwise: the tokens are what the user prepared)."""
STREAM_SHUFFLE_BUFFER = 1000


def data_file_builder(path: str | os.PathLike[str]) -> str | None:
    """The ``datasets`` builder for a data file, by suffix (``None``: not a data file we read)."""
    return DATA_FILE_BUILDERS.get(Path(path).suffix.lower())


def check_local_sources(dataset: Any, processor: Any) -> None:
    """Fail with one line where the calibration ``dataset`` or ``processor`` is written as a local
    path and nothing is there (:func:`~hf_comq.settings.is_missing_local_path`): checked before
    any weight loads, where loading would try the name as a Hub id and fail on that instead.
    Not when a config is built: a config read back from a checkpoint names another machine's data."""
    if isinstance(dataset, (str, os.PathLike)) and is_missing_local_path(dataset):
        if any(character in os.fspath(dataset) for character in "*?["):
            raise ValueError(
                f"calibration dataset: {os.fspath(dataset)} is a pattern, and hf_comq takes no globs; pass the "
                "folder that holds the files (its data files are read as one dataset) or one file"
            )
        raise ValueError(
            f"calibration dataset: no file or folder at {os.fspath(dataset)}; check the path (a Hub dataset is "
            "named owner/name)"
        )
    if isinstance(processor, (str, os.PathLike)) and is_missing_local_path(processor):
        raise ValueError(
            f"calibration processor: no folder at {os.fspath(processor)}; pass the folder that holds the tokenizer "
            "or image processor (a Hub id is written owner/name), or the object itself"
        )


def load_dataset_source(
    source: str | os.PathLike[str], split: str, default_split: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """``(dataset, origin)`` for a string: a ``save_to_disk`` folder, a data file or folder, a Hub name, ``demo:...``.

    Local data works offline; files and Hub data are streamed.  ``origin`` is a small
    JSON-safe description (``source``, ``split``) for the saved config and model card;
    a local path is reduced to its last component, which says all a reader elsewhere can
    use (and does not leak a home folder).  Raises ``ValueError`` with one line naming
    the problem (empty or unknown file, missing split, no network...).

    In a folder of data files, files named after ``split`` (``calibration.parquet``,
    ``calibration-00000-of-00002.parquet``) are that split, whatever the name: ``datasets``
    itself knows only train/validation/test names there and drops the other files.  A
    single file has no splits; a ``split`` other than the caller's ``default_split`` is
    then ignored with a warning.
    """
    import datasets

    from ..assets import demo_dataset_file

    check_split_name(split)
    source = os.fspath(source)
    demo_file = demo_dataset_file(source)
    path = demo_file if demo_file is not None else Path(source).expanduser()
    label = source if demo_file is not None else f"local dataset {path.name!r}" if path.exists() else source
    # A single file (the shipped demo data too) has no splits: the split name would only be a label.
    origin: dict[str, Any] = {"source": label, "split": None if path.is_file() else split}
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"dataset file {source!r} is empty (0 bytes); pass a file with data")
    if path.is_file() and default_split is not None and split != default_split:
        logger.warning(f"split {split!r} ignored: {source!r} is a single data file, which has no splits; all its rows are read")
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                return pick_split(loaded, split, f"the dataset saved at {source!r}"), origin
            held = dataset_origin(loaded)["split"]  # one dataset: the split it says
            if default_split is not None and split not in (default_split, held):
                logger.warning(f"split {split!r} ignored: {source!r} holds one saved dataset (split {held!r}); all its rows are read")
            return loaded, {**origin, "split": held}
        if path.is_file():
            builder = data_file_builder(path)
            if builder is None:
                raise ValueError(
                    f"cannot tell the format of calibration file {source!r}; supported suffixes: "
                    f"{sorted(DATA_FILE_BUILDERS)}"
                )
            return datasets.load_dataset(builder, data_files={split: str(path)}, split=split, streaming=True), origin
        if path.is_dir():
            return _load_data_folder(path, split), origin
        return datasets.load_dataset(source, split=split, streaming=True), origin
    except ValueError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFoundError, ConnectionError, ...)
        raise ValueError(f"could not load calibration dataset {source!r} (split {split!r}): {error}") from error


def _load_data_folder(folder: Path, split: str) -> Any:
    """A folder of data files, streamed: what ``datasets`` makes of it for the splits its naming rules
    find there (train/validation/test), else ``split``'s own files (:func:`split_files`); a missing
    split names the splits the files give."""
    import datasets

    inferred = _inferred_splits(folder)
    named = None if split in inferred else split_files(folder, split)
    if named is not None:
        builder, files = named
        return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=True)
    names = _split_names(folder)
    try:
        loaded = datasets.load_dataset(str(folder), split=split, streaming=True)
    except ValueError as error:
        if not str(error).startswith("Bad split"):
            raise
        raise ValueError(
            f"split {split!r} not found in folder {folder.name!r}, whose data files give the splits "
            f"{sorted(inferred | names)}; name one of them (a file <split>.parquet / .json / ... is read as that split)"
        ) from None
    if inferred == {split} and split not in names and len(names) > 1:
        logger.warning(
            f"split {split!r} of folder {folder.name!r} reads all its data files as one split (datasets' rule for "
            f"files named after no split), though their names give the splits {sorted(names)}; name one of those "
            "to read only its files"
        )
    return loaded


def _split_names(folder: Path) -> set[str]:
    """The split names the data files' own names give: their stems less shard suffixes, those without
    digits (``part-00000``, ``data_0`` or ``train.1`` are pieces of one split, not names of their own)."""
    stems = {_split_of(file) for file in folder.iterdir() if data_file_builder(file)}
    return {stem for stem in stems if not any(character.isdigit() for character in stem)}


def _inferred_splits(folder: Path) -> set[str]:
    """The splits ``datasets`` finds in a folder by its own file naming rules (``data/train-*``...)."""
    from datasets.data_files import get_data_patterns

    try:
        return {str(name) for name in get_data_patterns(str(folder))}
    except Exception:  # nothing it recognises: the caller lists the files' own names
        return set()


def split_files(folder: Path, split: str) -> tuple[str, list[str]] | None:
    """``(builder, files)`` of the data files in ``folder`` named after ``split`` (``<split>.<suffix>``,
    or shards ``<split>-00000-of-00002.<suffix>``), ``None`` if there are none; files of two formats are one line."""
    files = sorted(
        candidate for candidate in folder.iterdir()
        if candidate.is_file() and data_file_builder(candidate) is not None and _split_of(candidate) == split
    )  # fmt: skip
    if not files:
        return None
    builders = {data_file_builder(file) for file in files}
    if len(builders) > 1:
        raise ValueError(
            f"split {split!r} of folder {folder.name!r} has files of {len(builders)} formats "
            f"({', '.join(file.name for file in files)}); keep one format per split"
        )
    return builders.pop(), [str(file) for file in files]


def _split_of(file: Path) -> str:
    """The split a data file's name gives: its stem, less a shard suffix (``-00000-of-00002``)."""
    return re.sub(r"-\d+-of-\d+$", "", file.stem)


GENERIC_BUILDERS = frozenset(DATA_FILE_BUILDERS.values()) | {"generator", "pandas", "imagefolder", "audiofolder"}
"""``datasets`` builders that name a file format or a Python source, not the data: not a dataset's name."""


def dataset_name(dataset: Any) -> str | None:
    """The name a ``datasets`` object carries (a Hub dataset's or a data folder's, from ``load_dataset``);
    ``None`` for other objects and where it names only a format (``"json"``, ``"generator"``)."""
    name = getattr(getattr(dataset, "info", None), "dataset_name", None)
    return str(name) if name and str(name) not in GENERIC_BUILDERS else None


def dataset_origin(dataset: Any) -> dict[str, Any]:
    """What a ``datasets`` object says of itself for the record: its class, its name (:func:`dataset_name`)
    and the split it holds (``None`` where it does not say, e.g. ``from_dict``)."""
    name, split = dataset_name(dataset), getattr(dataset, "split", None)
    source = f"datasets.{type(dataset).__name__}" + (f" {name!r}" if name else "")
    return {"source": source, "split": str(split) if split is not None else None}


@contextmanager
def named_decoding_errors(source: Any) -> Iterator[None]:
    """Reading ``source`` (a data file, streamed lazily), a file that is not UTF-8 fails in one line naming
    it and the fix, not with Python's bare ``UnicodeDecodeError`` (a ``ValueError``, so it would pass as one)."""
    try:
        yield
    except UnicodeDecodeError as error:
        where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the calibration dataset"
        raise ValueError(
            f"{where} is not UTF-8 text ({error.reason}); re-encode it as UTF-8 (e.g. with iconv -t utf-8)"
        ) from None


def pick_split(dataset_dict: Mapping[str, Any], split: str, what: str) -> Any:
    """``dataset_dict[split]``, or one line listing the splits there are."""
    check_split_name(split)
    if split not in dataset_dict:
        raise ValueError(f"split {split!r} not found in {what}; available splits: {sorted(dataset_dict)}")
    return dataset_dict[split]


def pick_column(dataset: Any, requested: str | None, tokens: bool = True) -> str:
    """``requested`` if the dataset has it, else the first usual image or text column (or, with
    ``tokens``, token-id column: calibration reads those, evaluation does not).

    Raises ``ValueError`` listing the available columns, so a typo fails before any
    model is loaded.
    """
    columns = column_names(dataset)
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"dataset column {requested!r} does not exist; available columns: {columns}")
        return requested
    token_columns = TOKEN_COLUMNS[:1] if tokens else ()  # tokens the user made win over text
    readable = IMAGE_COLUMNS + token_columns + TEXT_COLUMNS + CHAT_COLUMNS
    for candidate in readable:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"dataset has no column of a name hf_comq reads ({list(readable)}); available columns: "
        f"{columns}; name the one to read with COMQConfig(dataset_column=...) (hf-comq: --column)"
    )


def column_names(dataset: Any) -> list[str]:
    """A dataset's columns; a stream without declared features is asked for one example."""
    names = dataset.column_names
    if names is None:
        example = next(iter(dataset), None)
        if example is None:
            raise ValueError("the calibration dataset is empty: it has no samples")
        names = list(example)
    return list(names)


def dataset_from_list(items: Sequence[Any], column: str) -> Any:
    """A ``datasets.Dataset`` with one column holding ``items`` (PIL images are stored as image files)."""
    import datasets

    return datasets.Dataset.from_dict({column: list(items)})


def seeded_subset(dataset: Any, count: int, seed: int, column: str | None = None) -> Any:
    """The first ``count`` rows after ``datasets``' seeded shuffle (all rows, with a warning, if fewer exist),
    passing over rows whose ``column`` is blank (:func:`is_blank`) or missing (an image column's ``None``).

    A blank text has no tokens to calibrate on, yet taken into the subset it would count as
    a sample (text corpora such as wikitext are about a third blank lines).  Where no row is
    blank the subset is the same as without the check.  An indexed ``Dataset`` gets an index
    mapping kept in memory (nothing is written to the cache folder), and only a column of
    texts or token lists is read for the check; an ``IterableDataset`` a shuffle buffer of
    :data:`STREAM_SHUFFLE_BUFFER` rows, read lazily, blank ones filtered as they pass.
    """
    import datasets

    if isinstance(dataset, datasets.Dataset):
        total = len(dataset)
        if total == 0:
            raise ValueError("the calibration dataset is empty: it has no samples")
        shuffled = dataset.shuffle(seed=seed, keep_in_memory=True)
        if column is None or not (_may_be_blank(dataset.features.get(column)) or _has_nulls(dataset, column)):
            if count > total:
                warn_too_few(total, count)
            return shuffled.select(range(min(count, total)), keep_in_memory=True)
        rows = _rows_with_data(shuffled, column, count)
        if not rows:
            raise ValueError(f"the calibration dataset has no data: every value of column {column!r} is blank or empty")
        if len(rows) < count:
            warn_too_few(len(rows), count, "non-blank values")
        return shuffled.select(rows, keep_in_memory=True)
    stream = dataset.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER)
    if column is not None:
        stream = stream.filter(lambda example: not is_blank(example[column]))
    return stream.take(count)


def is_blank(value: Any) -> bool:
    """Whether ``value`` has nothing to calibrate on: a missing value (a null row), a text without a
    character to tokenize, or an empty list of token ids."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, (list, tuple)) and len(value) == 0


def _may_be_blank(feature: Any) -> bool:
    """Whether a column of this feature can hold blank values worth passing over (texts, token lists)."""
    import datasets

    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string")
    return type(feature).__name__ in ("List", "LargeList", "Sequence")


def _has_nulls(dataset: Any, column: str) -> bool:
    """Whether ``column`` holds missing values (an image column's ``None``), read from the Arrow
    table's null count: nothing is decoded."""
    return column in dataset.data.column_names and dataset.data.column(column).null_count > 0


def _rows_with_data(shuffled: Any, column: str, count: int) -> list[int]:
    """The first ``count`` rows of ``shuffled`` whose ``column`` is not blank, read a chunk of rows at a time
    as Arrow values (an image is its stored bytes, not decoded)."""
    rows: list[int] = []
    start, total = 0, len(shuffled)
    raw = shuffled.select_columns([column]).with_format("arrow")
    while len(rows) < count and start < total:
        stop = min(total, start + 2 * max(count - len(rows), 64))
        values = raw[start:stop][column].to_pylist()
        rows += [row for row, value in zip(range(start, stop), values) if not is_blank(value)]
        start = stop
    return rows[:count]


def warn_too_few(available: int, requested: int, what: str = "samples") -> None:
    """Say that calibration uses fewer samples than asked for (the data has no more)."""
    logger.warning(
        "COMQ calibration: num_samples=%d but the dataset has only %d %s; calibrating on all %d",
        requested,
        available,
        what,
        available,
    )
