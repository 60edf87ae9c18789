"""Helpers of the command-line tests: run ``main`` in-process, read its one error line, save tiny text models."""

from __future__ import annotations

from pathlib import Path

import torch

from hf_comq.cli import main
from tests.tiny import word_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]


def save_text_model(model: torch.nn.Module, folder: Path, with_pad: bool = True) -> Path:
    model.save_pretrained(folder)
    word_tokenizer(with_pad=with_pad).save_pretrained(folder)
    return folder


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    """The single ``hf-comq: error:`` line; fails if there is none, several, or a traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hf-comq: error:")]
    assert len(lines) == 1, err
    return lines[0]
