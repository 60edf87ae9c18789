"""Tests for the ``hf-comq`` command line, run in-process through ``main([...])``.

Tiny models are saved from configs to temporary folders; ``demo`` runs on the
real shipped assets with fewer calibration and test images.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import transformers as T

import hf_comq
from hf_comq.assets import demo_model_path
from hf_comq.cli import main
from hf_comq.cli.output import save_atomically
from hf_comq.evaluation import checkpoint_size_bytes
from tests.tiny import gray_images, image_processor, images, sentences, tiny_vit, word_tokenizer
from tests.hub_server import FakeHub

REPO_ROOT = Path(__file__).resolve().parents[1]



# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vit")
    tiny_vit(num_labels=3).save_pretrained(folder)
    image_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "images.parquet"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    pictures = images(12)
    labels = [i % 3 for i in range(12)]
    datasets.Dataset.from_dict({"image": pictures, "label": labels}, features=features).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in sentences(12)))
    return path


def save_text_model(model: torch.nn.Module, folder: Path, with_pad: bool = True) -> Path:
    model.save_pretrained(folder)
    word_tokenizer(with_pad=with_pad).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return save_text_model(T.GPT2LMHeadModel(config), tmp_path_factory.mktemp("gpt2"), with_pad=False)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    # A wide initialisation, so the encoder layers (not only the embeddings) shape the hidden states
    # and quantization error is visible in the embeddings.
    config = T.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        initializer_range=0.3,
    )  # fmt: skip
    return save_text_model(T.BertForSequenceClassification(config), tmp_path_factory.mktemp("bert"))


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


# ---------------------------------------------------------------------------- quantize + evaluate


def test_quantize_tiny_vit_writes_a_loadable_checkpoint(capsys, tmp_path, vit_dir, image_data) -> None:
    output = tmp_path / "vit-w4"
    code, out, err = run_cli(
        capsys, "quantize", vit_dir, "--bits", 4, "--dataset", image_data, "--num-samples", 8, "--output", output
    )
    assert code == 0, err
    assert re.search(r"layers quantized\s+\d+, mean relative error", out), out
    assert re.search(rf"saved to\s+{re.escape(str(output))}$", out, flags=re.MULTILINE), out
    assert re.search(r"checkpoint\s+[\d.]+ MB \(0\.\d\dx of [\d.]+ MB full precision\)", out), out
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {
        path.name for path in output.iterdir()
    }
    assert [path.name for path in tmp_path.iterdir()] == ["vit-w4"]  # no staging folder left behind
    stored = json.loads((output / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "compressed-tensors" and stored["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    calibration = stored["comq"]["calibration"]
    assert "images.parquet" in calibration["description"]
    assert calibration["dataset"] == "images.parquet"  # by name: the local path is not published
    assert 'from_pretrained("vit-w4")' in (output / "README.md").read_text()

    quantized = hf_comq.load_quantized(output)
    kinds = {type(module).__name__ for module in quantized.modules()}
    assert "COMQLinear" in kinds and type(quantized.classifier) is torch.nn.Linear  # head stays full precision
    fp = T.ViTForImageClassification.from_pretrained(vit_dir).eval()
    pixels = image_processor()(images=images(4, seed=5), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert torch.allclose(quantized(pixel_values=pixels).logits, fp(pixel_values=pixels).logits, atol=0.2)

    # evaluate: top-1 of the quantized model and of its full-precision reference on the same images
    code, out, err = run_cli(capsys, "evaluate", output, "--dataset", image_data, "--reference", vit_dir)
    assert code == 0, err
    accuracy = re.search(r"top-1 accuracy of vit-w4: (\d\.\d{4}) on 12 images", out)
    reference = re.search(r"top-1 accuracy of the reference: (\d\.\d{4}) \(difference ([+-]\d+\.\d\d) points\)", out)
    assert accuracy and reference, out
    difference = 100 * (float(accuracy.group(1)) - float(reference.group(1)))
    assert float(reference.group(2)) == pytest.approx(difference, abs=0.01)


def test_quantize_refuses_a_non_empty_output_unless_overwrite(capsys, tmp_path, vit_dir, image_data) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    argv = ["quantize", vit_dir, "--dataset", image_data, "--num-samples", 4, "--output", output]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    assert "already exists and is not empty" in error_line(err)
    # --overwrite never empties a folder hf-comq did not write
    code, _, err = run_cli(capsys, *argv, "--overwrite")
    assert code == 1
    assert "--overwrite only replaces a checkpoint hf-comq wrote" in error_line(err) and "(keep.txt)" in err
    assert (output / "keep.txt").read_text() == "mine"

    checkpoint = tmp_path / "checkpoint"
    argv[-1] = checkpoint
    assert run_cli(capsys, *argv, "--rtn")[0] == 0
    code, _, err = run_cli(capsys, *argv, "--overwrite", "--rtn", "--bits", 3)
    assert code == 0, err
    stored = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert stored["comq"]["solver"]["init"] == "rtn" and stored["config_groups"]["group_0"]["weights"]["num_bits"] == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint", "out"]


def test_quantize_and_evaluate_a_grayscale_vit(capsys, tmp_path) -> None:
    """A one-channel model on one-channel images, through the CLI (before: every image was made RGB and rejected)."""
    model_dir = tmp_path / "gray-vit"
    tiny_vit(num_channels=1, num_labels=3).save_pretrained(model_dir)
    image_processor(channels=1).save_pretrained(model_dir)
    data = tmp_path / "gray.parquet"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    datasets.Dataset.from_dict({"image": gray_images(12), "label": [i % 3 for i in range(12)]}, features=features).to_parquet(data)
    output = tmp_path / "gray-w4"
    code, _, err = run_cli(capsys, "quantize", model_dir, "--dataset", data, "--num-samples", 8, "--output", output)
    assert code == 0, err
    code, out, err = run_cli(capsys, "evaluate", output, "--dataset", data, "--reference", model_dir)
    assert code == 0, err
    assert re.search(r"top-1 accuracy of gray-w4: \d\.\d{4} on 12 images", out), out


def test_quantize_and_evaluate_a_causal_lm(capsys, tmp_path, gpt2_dir, text_data) -> None:
    output = tmp_path / "gpt2-w8"
    code, out, err = run_cli(
        capsys, "quantize", gpt2_dir, "--bits", 8, "--dataset", text_data, "--num-samples", 8, "--output", output
    )
    assert code == 0, err
    assert "(GPT2LMHeadModel, causal LM)" in out
    assert (output / "tokenizer.json").is_file()
    code, out, err = run_cli(capsys, "evaluate", output, "--dataset", text_data, "--reference", gpt2_dir, "--limit", 6)
    assert code == 0, err
    quantized = re.search(r"perplexity of gpt2-w8: ([\d.]+) on 6 texts", out)
    reference = re.search(r"perplexity of the reference \S+: ([\d.]+) \(([\d.]+)x\)", out)
    assert quantized and reference, out
    # 8-bit weights barely change a model: perplexities within 2 %
    assert float(quantized.group(1)) == pytest.approx(float(reference.group(1)), rel=0.02)


def test_quantize_and_evaluate_a_text_encoder(capsys, tmp_path, bert_dir, text_data) -> None:
    output = tmp_path / "bert-w4"
    code, _, err = run_cli(
        capsys, "quantize", bert_dir, "--dataset", text_data, "--num-samples", 8, "--group-size", 16, "--output", output
    )
    assert code == 0, err
    weights = json.loads((output / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["group_size"] == 16
    code, out, err = run_cli(capsys, "evaluate", output, "--dataset", text_data, "--reference", bert_dir)
    assert code == 0, err
    match = re.search(r"embedding cosine of bert-w4 to \S+: ([\d.]+) on 12 texts", out)
    assert match, out
    assert 0.9 < float(match.group(1)) < 0.9999

    code, _, err = run_cli(capsys, "evaluate", output, "--dataset", text_data)
    assert code == 1
    assert "needs --reference FP_MODEL" in error_line(err)


def test_quantize_pushes_to_the_hub(tmp_path, vit_dir, image_data) -> None:
    """``--push-to-hub`` uploads weights, processor and COMQ card (child process: huggingface_hub reads
    ``HF_ENDPOINT`` at import time)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    output = tmp_path / "pushed"
    argv = ["quantize", vit_dir, "--dataset", image_data, "--num-samples", 4, "--output", output]
    with FakeHub(max_lifetime_s=120) as hub:
        env.update(
            HF_ENDPOINT=hub.url, HF_TOKEN=hub.token, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
            OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        )  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "hf_comq", *map(str, argv), "--push-to-hub", "user/tiny-vit-comq"],
            env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        files = hub.files("user/tiny-vit-comq")
    assert "pushed to" in result.stdout and "user/tiny-vit-comq" in result.stdout
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    assert files["model.safetensors"] == (output / "model.safetensors").read_bytes()
    card = files["README.md"].decode("utf-8")
    assert "comq" in card and 'ViTForImageClassification.from_pretrained("user/tiny-vit-comq")' in card
    assert [commit.title for commit in hub._repo("user/tiny-vit-comq").commits][1:] == ["Upload COMQ-quantized model"]


# ---------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("command", ["quantize", "evaluate"])
def test_missing_model_path(capsys, tmp_path, image_data, command) -> None:
    missing = tmp_path / "no-such-model"
    argv = [command, missing, "--dataset", image_data]
    argv += ["--output", tmp_path / "out"] if command == "quantize" else []
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and out == ""
    assert error_line(err) == f"hf-comq: error: model path {missing} does not exist"
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_folder_without_config_is_not_a_checkpoint(capsys, tmp_path, image_data) -> None:
    code, _, err = run_cli(capsys, "evaluate", tmp_path, "--dataset", image_data)
    assert code == 1
    assert error_line(err) == f"hf-comq: error: {tmp_path} is not a model checkpoint folder: it has no config.json"


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


def test_unknown_label_column(capsys, vit_dir, image_data) -> None:
    code, _, err = run_cli(capsys, "evaluate", vit_dir, "--dataset", image_data, "--label-column", "target")
    assert code == 1
    assert "label dataset column 'target' does not exist" in error_line(err)


@pytest.mark.parametrize(
    "config, expected",
    [
        (
            {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True},
            "unsupported model type 't5' (T5ForConditionalGeneration): encoder-decoder models are not supported",
        ),
        (
            {"model_type": "wav2vec2", "architectures": ["Wav2Vec2ForCTC"]},
            "unsupported model type 'wav2vec2' (Wav2Vec2ForCTC); hf-comq handles image classification",
        ),
        (
            {"model_type": "wav2vec2", "architectures": ["Wav2Vec2Model"]},
            "calibration feeds text or images, and Wav2Vec2Model takes neither",
        ),
    ],
)
def test_unsupported_model_type(capsys, tmp_path, image_data, config, expected) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    argv = ["quantize", tmp_path / "model", "--dataset", image_data, "--output", tmp_path / "out"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    assert expected in error_line(err)
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_quantizing_a_comq_checkpoint_is_refused(capsys, tmp_path, image_data) -> None:
    (tmp_path / "model").mkdir()
    config = {
        "model_type": "vit",
        "architectures": ["ViTForImageClassification"],
        "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized"},
    }
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    argv = ["quantize", tmp_path / "model", "--dataset", image_data, "--output", tmp_path / "out"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    assert "is already quantized" in error_line(err)


def test_library_errors_become_one_line_and_debug_shows_the_traceback(capsys, tmp_path, vit_dir, image_data) -> None:
    argv = ["quantize", vit_dir, "--dataset", image_data, "--group-size", 7, "--output", tmp_path / "out"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    assert "group_size=7 does not divide in_features" in error_line(err)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="group_size=7"):
        main([str(arg) for arg in argv] + ["--debug"])


def test_usage_errors_and_help(capsys) -> None:
    assert main([]) == 2
    assert "usage: hf-comq" in capsys.readouterr().err
    assert main(["quantize", "model"]) == 2  # --dataset and --output are required
    assert "the following arguments are required: --dataset, --output" in capsys.readouterr().err
    assert main(["demo", "--help"]) == 0
    assert "Fashion-MNIST" in capsys.readouterr().out


def test_python_dash_m_help_in_a_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hf_comq", "--help"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: hf-comq")
    for command in ("quantize", "evaluate", "demo"):
        assert command in result.stdout


def test_console_script_points_at_main(capsys) -> None:
    """``pip install`` turns this entry into the ``hf-comq`` executable; its target must resolve and run."""
    import importlib
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    module_name, function_name = project["scripts"]["hf-comq"].split(":")
    entry = getattr(importlib.import_module(module_name), function_name)
    assert entry is main
    assert entry(["quantize", "--help"]) == 0
    assert "--push-to-hub REPO_ID" in capsys.readouterr().out


# ---------------------------------------------------------------------------- atomic save


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


# ---------------------------------------------------------------------------- demo


def test_demo_on_the_shipped_model(capsys, tmp_path) -> None:
    argv = ["demo", "--bits", 4, "--num-samples", 64, "--eval-limit", 500, "--output", tmp_path / "demo"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "evaluation on 500 test images" in out
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
