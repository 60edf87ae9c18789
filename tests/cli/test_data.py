"""What ``hf-comq`` says about a ``--dataset`` it cannot use, before loading the model."""

from __future__ import annotations


import pytest

from tests.cli.helpers import error_line, run_cli


def test_missing_dataset_path(capsys, tmp_path, vit_dir) -> None:
    missing = tmp_path / "nope.parquet"
    code, _, err = run_cli(capsys, "quantize", vit_dir, "--dataset", missing, "--output", tmp_path / "out")
    assert code == 1
    assert error_line(err) == f"hf-comq: error: dataset path {missing} does not exist"


@pytest.mark.parametrize("command", ["quantize", "evaluate"])
def test_unknown_dataset_column(capsys, tmp_path, vit_dir, image_data, command) -> None:
    argv = [command, vit_dir, "--dataset", image_data, "--column", "photo"]
    argv += ["--output", tmp_path / "out"] if command == "quantize" else []
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    line = error_line(err)
    assert "dataset column 'photo' does not exist; available columns: ['image', 'label']" in line
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()
