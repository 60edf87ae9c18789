"""Atomic saves of the output folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_comq.cli.output import check_output, is_comq_checkpoint_folder, save_atomically
from hf_comq.hub import mark_card


def test_failed_save_leaves_nothing_and_keeps_the_previous_checkpoint(tmp_path) -> None:
    def broken(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_atomically(tmp_path / "new", broken)
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.safetensors").write_bytes(b"previous")
    with pytest.raises(OSError, match="disk full"):
        save_atomically(tmp_path / "old", broken)
    assert (tmp_path / "old" / "model.safetensors").read_bytes() == b"previous"
    assert [path.name for path in tmp_path.iterdir()] == ["old"]

    save_atomically(tmp_path / "old", lambda folder: (folder / "model.safetensors").write_bytes(b"fresh"))
    assert (tmp_path / "old" / "model.safetensors").read_bytes() == b"fresh"
    assert [path.name for path in tmp_path.iterdir()] == ["old"]


def test_sigterm_during_a_save_cleans_up_as_an_interrupt_does(tmp_path) -> None:
    """``timeout``, ``docker stop`` and batch schedulers stop a run with SIGTERM: the staging folder of a
    save in progress must go, as after Ctrl-C, not stay beside the output until a later run."""
    import os
    import signal

    from hf_comq.cli.main import Terminated, _terminate_as_interrupt

    def write(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with _terminate_as_interrupt():
            save_atomically(tmp_path / "ckpt", write)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_mount_point_as_output_is_refused_before_any_work(tmp_path, monkeypatch) -> None:
    """A volume mounted as --output cannot be renamed aside: the swap failed with EBUSY after calibration."""
    import os

    from hf_comq.cli.common import CLIError
    from hf_comq.cli.output import check_output

    mounted = tmp_path / "volume"
    mounted.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == mounted)  # a bind mount: see below
    with pytest.raises(CLIError, match=r"is a mount point, .* name a new folder inside it, e.g. --output .*volume/quantized"):
        check_output(mounted, overwrite=False)
    check_output(mounted / "quantized", overwrite=False)


def test_the_kernels_mount_list_names_mount_points_a_device_comparison_misses(monkeypatch) -> None:
    """A bind mount from the same file system has its parent's device: only the mount list knows it."""
    import os

    from hf_comq.cli.output import is_mount_point

    monkeypatch.setattr(os.path, "ismount", lambda path: False)
    assert is_mount_point(Path("/proc"))  # listed in /proc/self/mountinfo on every Linux
    assert not is_mount_point(Path("/proc/self"))


def test_overwrite_takes_every_file_a_checkpoint_save_writes_and_nothing_else(tmp_path) -> None:
    """A tokenizer's named chat templates and vocabulary files are the checkpoint's; notes and a clone's .git are not."""
    import json

    from hf_comq.cli.common import CLIError

    folder = tmp_path / "done"
    (folder / "additional_chat_templates").mkdir(parents=True)
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    config = {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized", "comq": {}}}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json", "source.spm",
                 "target.spm", "vocab.json", "merges.txt", "chat_template.jinja"):  # fmt: skip
        (folder / name).write_text("x")
    (folder / "README.md").write_text(mark_card("---\nlicense: mit\n---\n# A COMQ card\n"))
    assert is_comq_checkpoint_folder(folder)
    check_output(folder, overwrite=True)
    (folder / "results.json").write_text("{}")
    with pytest.raises(CLIError, match=r"holds files besides the checkpoint \(results.json\)"):
        check_output(folder, overwrite=True)


@pytest.mark.parametrize("edit", ["own card", "edited card"])
def test_overwrite_refuses_a_card_hf_comq_did_not_write_or_someone_edited(tmp_path, edit) -> None:
    """A save keeps a README.md of the user's own, and so must --overwrite, which replaces the folder."""
    import json

    from hf_comq.cli.common import CLIError

    folder = tmp_path / "done"
    folder.mkdir()
    config = {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized", "comq": {}}}
    (folder / "config.json").write_text(json.dumps(config))
    card = mark_card("---\nlicense: mit\n---\n# A COMQ card\n")
    (folder / "README.md").write_text("# My notes on this model\n" if edit == "own card" else card + "\nMy results.\n")
    with pytest.raises(CLIError, match=r"\(README.md\) \(README.md is not a model card hf-comq wrote and nobody edited"):
        check_output(folder, overwrite=True)

