"""``--dataset`` on the command line: checked before any work (a ``demo:`` name, a local path, a Hub name the
Hub can serve), then opened with one-line errors."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..settings import DATA_FILE_BUILDERS
from .common import CLIError, add_setting_option, check_positive
from .models import check_hub_available


def add_data_arguments(command: argparse.ArgumentParser, role: str, split: str | None = None) -> Any:
    """``--dataset``, ``--split`` and ``--column`` in a group of their own, returned; without ``split``, the latter
    two are the calibration settings ``dataset_split`` / ``dataset_column`` (defaults from
    :class:`~hf_comq.settings.COMQSettings`)."""
    group = command.add_argument_group(f"{role} data")
    group.add_argument(
        "--dataset", required=True, metavar="NAME_OR_PATH",
        help=(
            "Hub dataset name, local data file (parquet/json/csv/arrow/txt) or save_to_disk folder; "
            "'demo:calibration' and 'demo:test' name the shipped Fashion-MNIST subset"
        ),
    )  # fmt: skip
    if split is None:
        add_setting_option(group, "dataset_split", metavar="SPLIT")
        add_setting_option(group, "dataset_column", metavar="COLUMN")
        return group
    group.add_argument("--split", default=split, help=f"dataset split (default: {split})")
    group.add_argument(
        "--column", default=None,
        help="column with the images or texts (default: the first of image/img/pixel_values, text, messages)",
    )  # fmt: skip
    return group


def resolve_dataset(name: str) -> str:
    """Check a ``--dataset`` before any work: a ``demo:`` name, an existing local path, or a Hub name the Hub can serve."""
    from ..assets import demo_dataset_file

    if demo_dataset_file(name) is not None:
        return name
    path = Path(name).expanduser()
    if path.exists():
        _check_not_empty(path, name)
        return str(path)
    if path.is_absolute() or name.startswith(".") or path.suffix.lower() in DATA_FILE_BUILDERS or name.count("/") > 1:
        raise CLIError(f"dataset path {name} does not exist")
    check_hub_available(name, "dataset")
    return name


def _check_not_empty(path: Path, name: str) -> None:
    """Empty data files, found from their size or parquet footer before anything heavy is imported."""
    if not path.is_file():
        return
    if path.stat().st_size == 0:
        raise CLIError(f"dataset file {name!r} is empty (0 bytes); pass a file with data")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as parquet

        try:
            rows = parquet.read_metadata(path).num_rows
        except Exception as error:  # pyarrow raises its own types for files that are not parquet
            raise CLIError(f"dataset file {name!r} is not a readable parquet file: {error}") from None
        if rows == 0:
            raise CLIError(f"dataset file {name!r} has no rows; pass data with at least one sample")


def open_dataset(name: str, split: str, default_split: str | None = None) -> Any:
    """Load ``--dataset`` / ``--split`` (streamed where possible), with one-line errors; empty data is one of them.
    ``default_split``: the command's default, a warning where a single file ignores another ``--split``."""
    from ..evaluation import load_eval_dataset

    dataset = load_eval_dataset(resolve_dataset(name), split, default_split)
    try:
        empty = len(dataset) == 0
    except TypeError:  # streamed: look at one row
        empty = next(iter(dataset.take(1)), None) is None
    if empty:
        raise CLIError(f"--dataset {name} has no rows in split {split!r}; pass data with at least one sample")
    return dataset


def limited(dataset: Any, limit: int | None) -> Any:
    if limit is None:
        return dataset
    check_positive("--limit", limit)
    if hasattr(dataset, "select") and hasattr(dataset, "__len__"):
        return dataset.select(range(min(limit, len(dataset))))
    return dataset.take(limit)


def column_texts(dataset: Any, column: str, render: Callable[[Any], str] | None = None) -> list[str]:
    """The column's texts; ``render``: what turns each value into one (a chat template's, for
    conversations), blank values skipped."""
    from ..calibration.sources import is_blank

    values = [value for row in dataset.select_columns([column]) if not is_blank(value := row[column])]
    if render is not None:
        try:
            return [render(value) for value in values]
        except ValueError as error:  # the template's one line
            raise CLIError(str(error)) from None
    if not all(isinstance(text, str) for text in values):
        raise CLIError(f"column {column!r} does not hold text")
    return values
