"""``hf-comq demo`` on the shipped model (fewer images), and how it reads a COMQ-vs-RTN difference."""

from __future__ import annotations

import re

import pytest
import torch

import hf_comq
from hf_comq.assets import demo_model_path
from hf_comq.evaluation import checkpoint_size_bytes
from tests.cli.helpers import error_line, run_cli


def test_demo_on_the_shipped_model(capsys, tmp_path, monkeypatch) -> None:
    from hf_comq import kernels

    built_before_timing = []
    build = kernels.build_ahead
    monkeypatch.setattr(kernels, "build_ahead", lambda: built_before_timing.append(True) or build())
    argv = ["demo", "--bits", 4, "--num-samples", 64, "--eval-limit", 500, "--output", tmp_path / "demo", "--threads", 2]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert built_before_timing  # a fresh machine's kernel build was counted as COMQ's quantization time
    assert "evaluation on 500 test images (CPU, 2 threads)" in out  # the count allowed, not the one torch has now
    rows = {
        (match["method"], match["bits"]): match
        for match in re.finditer(
            r"^(?P<method>FP32|COMQ|RTN)\s+(?P<bits>\d+)\s+(?P<top1>\d\.\d{4})\s+(?:[+-]\d+\.\d\d pt\s+)?"
            r"(?P<agreement>\d\.\d{4})\s+(?P<kl>\d+\.\d{3})(?P<rest>.*)$",
            out, flags=re.MULTILINE,
        )
    }  # fmt: skip
    assert set(rows) == {("FP32", "32"), ("COMQ", "4"), ("RTN", "4")}, out
    fp_top1 = float(rows["FP32", "32"]["top1"])
    assert fp_top1 > 0.8
    assert abs(float(rows["COMQ", "4"]["top1"]) - fp_top1) <= 0.05
    assert (float(rows["FP32", "32"]["agreement"]), float(rows["FP32", "32"]["kl"])) == (1.0, 0.0)
    # what COMQ buys shows in the fidelity to FP, not in a top-1 difference of a few images
    assert float(rows["COMQ", "4"]["kl"]) < float(rows["RTN", "4"]["kl"])
    assert float(rows["COMQ", "4"]["agreement"]) >= float(rows["RTN", "4"]["agreement"])
    verdict = re.search(r"^W4: COMQ's KL to FP [\d.]+x lower than RTN's.*McNemar p = [\d.e-]+", out, flags=re.MULTILINE)
    assert verdict, out
    ratio = float(re.search(r"(\d\.\d\d)x", rows["COMQ", "4"]["rest"]).group(1))
    assert ratio < 0.5

    saved = tmp_path / "demo" / f"{demo_model_path().name}-comq-w4"
    assert f"saved {saved}" in out
    assert checkpoint_size_bytes(saved) < 0.5 * checkpoint_size_bytes(demo_model_path())
    card = (saved / "README.md").read_text()
    assert "COMQ" in card and "top-1 agreement with fp32" in card
    hf_comq.load_quantized(saved)

    # a second run does not replace the saved checkpoint unless asked to, and says so before any work
    before = (saved / "model.safetensors").read_bytes()
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and "already exists and is not empty; choose another --output or pass --overwrite" in error_line(err)
    assert "COMQ calibration" not in err and (saved / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "only_comq, only_rtn, expected",
    [
        (3, 0, "within chance (McNemar p = 0.25), not a ranking"),
        (0, 3, "within chance (McNemar p = 0.25), not a ranking"),
        (1, 0, "(1 image only COMQ gets right, 0 only RTN): within chance"),
        (30, 5, "COMQ ahead beyond chance"),
        (5, 30, "RTN ahead beyond chance"),
    ],
)
def test_demo_never_reads_chance_as_a_ranking(only_comq, only_rtn, expected) -> None:
    from hf_comq.cli.demo import DemoRow, demo_verdict

    both = 400
    comq_correct = torch.tensor([True] * both + [True] * only_comq + [False] * only_rtn)
    rtn_correct = torch.tensor([True] * both + [False] * only_comq + [True] * only_rtn)
    total = len(comq_correct)
    comq = DemoRow("COMQ", 4, float(comq_correct.float().mean()), 0.99, 0.001, 1.0, 1)
    rtn = DemoRow("RTN", 4, float(rtn_correct.float().mean()), 0.98, 0.01, 1.0, None)
    line = demo_verdict(4, comq, rtn, comq_correct, rtn_correct)
    assert expected in line
    assert f"{100 * (only_comq - only_rtn) / total:+.2f} pt" in line and "KL to FP 10.0x lower" in line


def test_the_demo_table_shows_a_tiny_kl_divergence_in_significant_digits() -> None:
    """At 8 bits the KL column read 0.000 while the verdict said it was 13.5x lower than RTN's."""
    from hf_comq.cli.demo import DemoRow, format_demo_table

    fields = {name: None for name in DemoRow.__dataclass_fields__}
    rows = [DemoRow(**{**fields, "method": "FP", "top1": 0.9, "agreement": 1.0, "kl": 0.0}),
            DemoRow(**{**fields, "method": "COMQ", "bits": 8, "top1": 0.9, "agreement": 1.0, "kl": 2.3e-7}),
            DemoRow(**{**fields, "method": "RTN", "bits": 4, "top1": 0.88, "agreement": 0.98, "kl": 1.5e-3})]  # fmt: skip
    fp, comq, rtn = format_demo_table(rows).splitlines()[2:]
    assert fp.rstrip().endswith(" 0.000") and comq.rstrip().endswith(" 0.00023") and " 1.500" in rtn



@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--bits", 9], "hf-comq: error: --bits: expected an integer in [2, 8]"),
        (["--group-size", 5], "hf-comq: error: --group-size 5 does not divide the input size of every layer of the demo"),
    ],
)
def test_demo_refusals_name_the_demos_own_options(capsys, tmp_path, option, message) -> None:
    """The demo has no --modules-to-not-convert to offer, and its settings are options, not fields."""
    code, out, err = run_cli(capsys, "demo", *option, "--output", tmp_path / "demo")
    assert code == 1 and error_line(err).startswith(message) and "modules-to-not-convert" not in err
    assert "hf-comq demo:" not in out and not (tmp_path / "demo").exists()
