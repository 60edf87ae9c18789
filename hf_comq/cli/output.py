"""Output folders and printed tables: checks before any work, atomic saves, recovery after a kill.

A checkpoint folder is written next to ``--output`` under a hidden name and swapped in
when complete (:func:`save_atomically`), so a failure or a kill never leaves a
half-written checkpoint that loads partially; the next run on the same output cleans up
(:func:`recover_interrupted_save`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .common import CLIError


def check_output(output: Path, overwrite: bool, source: str | None = None) -> None:
    """Everything about ``--output`` that can be checked before any work; one clear error otherwise.

    ``source`` is the local folder being quantized, which the output must not replace.
    """
    output = real_output(output)
    for note in recover_interrupted_save(output):
        print(f"note: {note}", file=sys.stderr)
    resolved = output.resolve()
    if output.is_dir() and is_mount_point(output):
        raise CLIError(
            f"--output {output} is a mount point, which cannot be swapped for the finished checkpoint; name a new "
            f"folder inside it, e.g. --output {output / 'quantized'}"
        )
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise CLIError(
            f"--output {output} is the current folder or one above it, which cannot be replaced; "
            "name a new folder, e.g. --output ./quantized"
        )
    if source is not None and Path(source).is_dir():
        original = Path(source).resolve()
        if resolved == original or resolved in original.parents:
            raise CLIError(f"--output {output} would replace the model being quantized ({source}); choose another folder")
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output {output} is a file; pass a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise CLIError(
                f"output folder {output} already exists and is not empty; choose another --output or pass --overwrite"
            )
        if not is_comq_checkpoint_folder(output):
            listed = ", ".join(sorted(entry.name for entry in output.iterdir())[:5])
            raise CLIError(
                f"--overwrite only replaces a checkpoint hf-comq wrote, and {output} holds other files ({listed}); "
                "choose another --output, or empty the folder yourself"
            )
        foreign = sorted(entry.name for entry in output.iterdir() if not _saved_by_a_checkpoint(entry))
        if foreign:
            from ..hub import README_NAME

            card = ""
            if README_NAME in foreign:
                card = (
                    f" ({README_NAME} is not a model card hf-comq wrote and nobody edited: a card of your own, "
                    "an edited one, or one from an hf-comq too old to mark its cards)"
                )
            raise CLIError(
                f"--overwrite replaces the whole folder, and {output} holds files besides the checkpoint "
                f"({', '.join(foreign[:5])}){card}; move them out, or choose another --output"
            )
    _check_writable(output)


def is_mount_point(folder: Path) -> bool:
    """Whether ``folder`` is where a file system is mounted: ``os.path.ismount``, which compares devices,
    or (Linux) a mount point the kernel lists, which also finds a bind mount from the same file system."""
    if os.path.ismount(folder):
        return True
    try:
        lines = Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    target = os.path.realpath(folder)
    unescape = re.compile(r"\\([0-7]{3})")
    points = {unescape.sub(lambda match: chr(int(match[1], 8)), line.split()[4]) for line in lines if len(line.split()) > 4}
    return target in points


def is_comq_checkpoint_folder(folder: Path) -> bool:
    """True for a folder an hf_comq save wrote: its config.json records the COMQ settings."""
    from ..checkpoint import PROVENANCE_KEY, is_packed_checkpoint

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return is_packed_checkpoint(config) and isinstance(config["quantization_config"].get(PROVENANCE_KEY), dict)


_CHECKPOINT_FILE = re.compile(
    r"(config|generation_config|preprocessor_config|processor_config|video_preprocessor_config|audio_tokenizer_config"
    r"|tokenizer_config|special_tokens_map|added_tokens|chat_template|model\.safetensors\.index)\.json"
    r"|model(-\d+-of-\d+)?\.safetensors|tokenizer\.json|chat_template\.jinja"
    r"|\w*vocab\w*\.(json|txt)|merges\w*\.txt|[\w.-]+\.(model|spm|tiktoken|codes)"  # tokenizers' vocabulary files
    r"|(configuration|modeling|tokenization|processing|image_processing)_\w+\.py"  # a custom-code model's own code
)
"""Names of the files a save of a model with its processor or tokenizer writes (transformers' and
hf_comq's): the folder ``--overwrite`` replaces holds nothing else."""
CHAT_TEMPLATES_FOLDER = "additional_chat_templates"  # a tokenizer's named chat templates, one .jinja file each


def _saved_by_a_checkpoint(entry: Path) -> bool:
    """Whether replacing ``entry`` loses nothing a save would not write again: a README.md counts
    only as the card hf_comq wrote, unedited (a card of one's own, or edits, are the user's)."""
    if entry.is_dir() and entry.name == CHAT_TEMPLATES_FOLDER:
        return all(item.is_file() and item.suffix == ".jinja" for item in entry.iterdir())
    from ..hub import README_NAME, is_unedited_card  # here: the CLI imports nothing heavy before its arguments parse

    if entry.is_file() and entry.name == README_NAME:
        return is_unedited_card(entry.read_text(encoding="utf-8", errors="replace"))
    return entry.is_file() and _CHECKPOINT_FILE.fullmatch(entry.name) is not None


def _check_writable(output: Path) -> None:
    """Create and remove a folder where the save will create its staging folder (parents may not exist yet)."""
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        probe = Path(tempfile.mkdtemp(prefix=f".{output.name}.probe-", dir=parent))
        probe.rmdir()
    except OSError as error:
        raise CLIError(f"cannot write the output folder {output}: {parent} is not writable ({error.strerror or error})")


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _sibling(output: Path, kind: str) -> Path:
    """A hidden neighbour of ``output`` named so that :func:`recover_interrupted_save` can tell it is ours."""
    return output.parent / f".{output.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _process_alive(pid: int) -> bool:
    """Whether the process that left a folder may still be writing it.  This process's own id
    means another process before it (a container's entry point is always process 1)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def recover_interrupted_save(output: Path) -> list[str]:
    """Undo what a killed :func:`save_atomically` left next to ``output``; returns one note per action.

    Only hidden folders named by :func:`_sibling` whose process is gone are touched: a
    ``.NAME.old-*`` folder is the previous checkpoint, put back when ``output`` is
    missing (the kill fell between the two renames of the swap) and deleted otherwise;
    a ``.NAME.partial-*`` folder is an unfinished save and is deleted.
    """
    output = Path(output)
    if not output.parent.is_dir():
        return []
    notes = []
    leftovers = sorted(
        (entry for entry in output.parent.iterdir() if entry.is_dir() and (match := _LEFTOVER.match(entry.name))
         and match["name"] == output.name and not _process_alive(int(match["pid"]))),
        key=lambda entry: _LEFTOVER.match(entry.name)["kind"] != "old",  # restore before deleting
    )  # fmt: skip
    for entry in leftovers:
        if _LEFTOVER.match(entry.name)["kind"] == "old" and not output.exists():
            entry.rename(output)
            notes.append(f"restored {output} from a save that was interrupted")
        else:
            if entry.is_symlink():  # an earlier hf_comq swapped a linked --output aside: the link, not its target
                entry.unlink()
            else:
                shutil.rmtree(entry, ignore_errors=True)
            notes.append(f"removed {entry.name}, left by a save that was interrupted")
    return notes


def save_atomically(output: Path, write: Callable[[Path], None], *, overwrite: bool = True) -> None:
    """Run ``write(folder)`` on a hidden folder next to ``output``, then swap it into place.

    A crash or error mid-save leaves ``output`` as it was (absent, or the previous
    checkpoint): a half-written checkpoint that loads partially is worse than none.
    The staging folder sits in the same parent so the renames are atomic.  Replacing
    an existing ``output`` takes two renames (old aside, new in); if the process is
    killed between them, the next save or ``hf-comq`` run on the same output puts the
    old one back (:func:`recover_interrupted_save`).  Folders get the permissions of
    the user's umask, as ``save_pretrained``'s do.
    """
    output = real_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for note in recover_interrupted_save(output):
        print(f"note: {note}", file=sys.stderr)
    staging = _sibling(output, "partial")
    staging.mkdir()
    try:
        write(staging)
        if not output.exists():
            staging.rename(output)
            return
        if any(output.iterdir()) and not overwrite:
            raise CLIError(f"output folder {output} appeared while saving; it was left untouched")
        aside = _sibling(output, "old")
        output.rename(aside)
        try:
            staging.rename(output)
        except BaseException:
            aside.rename(output)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def real_output(output: Path) -> Path:
    """``output`` with a symbolic link in its last part followed: the checkpoint goes where the link
    points (a folder on a larger disk, say), and the link stays; swapping the link itself aside
    would leave its target empty and a real folder in its place."""
    output = Path(output)
    return output.resolve() if output.is_symlink() else output


def save_with_processor(model: Any, processor: Any, folder: Path, model_id: str) -> None:
    """Card, weights and processor into ``folder``; the card names ``model_id`` (the staging folder's name would be wrong)."""
    from ..hub import write_model_card

    model.save_pretrained(folder)
    write_model_card(folder, model, model_id=model_id)  # after the save, whose own card names the staging folder
    if processor is not None:
        processor.save_pretrained(folder)


def megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells (header first) as aligned columns, a dashed line under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    rendered = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    rendered.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(rendered)


def print_fields(rows: Sequence[tuple[str, str]]) -> None:
    """``name  value`` lines, names aligned, indented under a heading printed before."""
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
