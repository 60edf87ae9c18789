"""Atomic saves of the output folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_comq.cli.output import save_atomically


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
