"""What every ``hf-comq`` command shares: the error type, exit codes, common options and the thread scope.

Nothing here imports torch or transformers at module import: ``hf-comq --help`` and
argument errors must answer at once.
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, Iterator

from ..settings import COMQSettings

PROG = "hf-comq"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143  # 128 + SIGINT / SIGTERM
_ARGUMENT_TYPES = {"int": int, "int | None": int, "str": str, "str | None": str, "list[str] | None": str}


class CLIError(Exception):
    """A problem the user can fix; reported as one line, without a traceback."""


def launched_processes() -> int:
    """How many processes a launcher (torchrun sets ``WORLD_SIZE``) started for this command; 1 alone
    (an empty ``WORLD_SIZE`` too, as a shell leaves a variable it clears)."""
    value = os.environ.get("WORLD_SIZE", "").strip()
    if not value:
        return 1
    try:
        return int(value)
    except ValueError:
        raise CLIError(
            f"WORLD_SIZE={value!r} is not a number of processes; unset it, or start the ranks with torchrun"
        ) from None


def check_single_process(command: str) -> None:
    """Refuse a command that does not split its work when a launcher started several copies of it.

    Each copy would run the whole command (every rank loading, quantizing and writing
    the same folders), so the user is told at once instead.
    """
    count = launched_processes()
    if count > 1:
        raise CLIError(
            f"hf-comq {command} runs in one process, but a launcher started {count} (WORLD_SIZE={count}); "
            "run it without torchrun (only hf-comq quantize splits its work over ranks)"
        )


def check_positive(option: str, value: int) -> None:
    if value < 1:
        raise CLIError(f"{option} must be a positive integer, got {value}")


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """The heavy part of a command: ``count`` torch threads allowed (default: torch's), restored after.

    Entered after the cheap checks (importing torch takes seconds).  The work runs
    inside :func:`hf_comq.threads.single_thread`: loading, saving and small layers on
    one thread, large GEMMs on the allowed count (see :mod:`hf_comq.threads`);
    ``main`` may run in-process, hence the restore.
    """
    import torch

    from ..threads import single_thread

    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        with single_thread():
            yield
    finally:
        torch.set_num_threads(previous)


def add_command(commands: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A sub-command with the options every command has (``--debug``, ``--threads``)."""
    command = commands.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    command.add_argument("--debug", action="store_true", help="show the full traceback when something fails")
    command.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help=(
            "most CPU threads torch may use (default: torch's default, one per core); hf-comq runs small work on "
            "one thread whatever this says, because a thread pool makes it many times slower on a busy machine, "
            "and gives large layers these threads"
        ),
    )  # fmt: skip
    return command


_FLAGS_OF_SETTINGS = {"dataset_split": "--split", "dataset_column": "--column"}


def setting_flag(name: str) -> str:
    """The option of the :class:`~hf_comq.settings.COMQSettings` field ``name``: ``--name-with-dashes``, or the
    shorter name the data options have (``--split``, ``--column``)."""
    return _FLAGS_OF_SETTINGS.get(name, "--" + name.replace("_", "-"))


def check_settings(values: dict[str, Any]) -> None:
    """The settings' own validation, before any work, in one line naming the option the user typed
    (``--num-samples: ...``) where the field table names the field (``num_samples: ...``)."""
    try:
        COMQSettings(**values)
    except ValueError as error:
        text = str(error)
        name = text.split(":", 1)[0]
        raise CLIError(setting_flag(name) + text[len(name):] if name in values else text) from None


def add_setting_option(group: Any, name: str, metavar: str = "N", **overrides: Any) -> None:
    """:func:`setting_flag` for the :class:`~hf_comq.settings.COMQSettings` field ``name``: its type, default
    and help come from the field table, so the command line never restates a default."""
    spec = next(item for item in fields(COMQSettings) if item.name == name)
    default = COMQSettings.default(name)
    shown = "" if default is None else f" (default: {default})"
    options = {"type": _ARGUMENT_TYPES[str(spec.type)], "default": default, "metavar": metavar}
    options["help"] = f"{COMQSettings.help(name)}{shown}".replace("%", "%%")  # argparse formats help with %
    group.add_argument(setting_flag(name), **{**options, **overrides})


def add_setting_flag(group: Any, name: str, note: str = "") -> None:
    """``--name-with-dashes`` turning on the boolean :class:`~hf_comq.settings.COMQSettings` field ``name``
    (help from the field table, then ``note``).  A field that is off by default gets the flag alone; one whose
    default depends on other settings (``None``) also gets ``--no-name-with-dashes``, and neither flag keeps
    ``None``."""
    default = COMQSettings.default(name)
    if default not in (False, None):
        raise ValueError(f"{name} is on by default; a flag could not turn it off")
    help_text = (COMQSettings.help(name) + (f"; {note}" if note else "")).replace("%", "%%")
    flag = "--" + name.replace("_", "-")
    if default is None:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        group.add_argument(flag, action="store_true", help=help_text)
