"""``hf-comq quantize``: a loadable checkpoint, the output-folder rules, the Hub push, refusals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import hf_comq
from tests.cli.helpers import REPO_ROOT, error_line, run_cli, save_text_model
from tests.hub_server import FakeHub
from tests.ranks import launch_ranks
from tests.tiny import image_processor, images, tiny_model, word_tokenizer


def test_quantize_tiny_vit_writes_a_loadable_checkpoint(capsys, tmp_path, vit_dir, image_data) -> None:
    output = tmp_path / "vit-w4"
    code, out, err = run_cli(
        capsys, "quantize", vit_dir, "--bits", 4, "--dataset", image_data, "--num-samples", 8, "--output", output
    )
    assert code == 0, err
    assert re.search(r"layers quantized\s+\d+, mean relative squared error", out), out
    assert re.search(rf"saved to\s+{re.escape(str(output))}$", out, flags=re.MULTILINE), out
    assert re.search(r"calibration mode\s+true-sequential, aimed at full-precision outputs$", out, flags=re.MULTILINE), out
    timed = re.search(r"time\s+([\d.]+) s \(loading and calibration; ([\d.]+) s of it solving layers\)$", out, flags=re.MULTILINE)
    assert timed and float(timed.group(2)) <= float(timed.group(1)), out
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


def test_quantize_with_fp_target_aims_a_causal_lm_at_full_precision_outputs(capsys, tmp_path, gpt2_dir, text_data) -> None:
    """Aimed layers are solved stage by stage unless --no-true-sequential says otherwise."""
    for flags, mode, staged, stored_staged in (
        ([], "true-sequential", "yes (the default where layers are aimed at the full-precision outputs)", None),
        (["--true-sequential"], "true-sequential", "yes", True),
        (["--no-true-sequential"], "block-sequential", "no", False),
    ):
        output = tmp_path / f"gpt2-w4-fp-target{'-'.join(['', *flags])}"
        code, out, err = run_cli(
            capsys, "quantize", gpt2_dir, "--dataset", text_data, "--num-samples", 8, "--fp-target", *flags,
            "--output", output,
        )  # fmt: skip
        assert code == 0, err
        assert re.search(rf"calibration mode\s+{mode}, aimed at full-precision outputs$", out, flags=re.MULTILINE), out
        stored = json.loads((output / "config.json").read_text())["quantization_config"]["comq"]
        assert stored["selection"]["fp_target"] is True and stored["selection"]["sequential"] is True
        assert stored["selection"]["true_sequential"] is stored_staged
        card = (output / "README.md").read_text()
        assert "| Layers aimed at the full-precision outputs | yes |" in card
        assert f"| Block layers solved stage by stage | {staged} |" in card


def test_quantize_at_three_bits_aims_by_default_and_no_fp_target_keeps_each_layers_own_output(
    capsys, tmp_path, gpt2_dir, text_data
) -> None:
    for flags, mode, stored_value in (
        ([], "true-sequential, aimed at full-precision outputs", None),
        (["--no-fp-target"], "block-sequential", False),
    ):
        output = tmp_path / f"gpt2-w3{'-'.join(['', *flags])}"
        code, out, err = run_cli(
            capsys, "quantize", gpt2_dir, "--dataset", text_data, "--num-samples", 8, "--bits", 3, *flags,
            "--output", output,
        )  # fmt: skip
        assert code == 0, err
        assert re.search(rf"calibration mode\s+{mode}$", out, flags=re.MULTILINE), out
        stored = json.loads((output / "config.json").read_text())["quantization_config"]["comq"]
        assert stored["selection"]["fp_target"] is stored_value


def test_quantize_solver_options_reach_the_solver_settings(capsys, tmp_path, gpt2_dir, text_data) -> None:
    output = tmp_path / "gpt2-w4-no-pairs"
    code, out, err = run_cli(
        capsys, "quantize", gpt2_dir, "--dataset", text_data, "--num-samples", 8, "--pair-moves", 0, "--scale-refit",
        "--output", output,
    )  # fmt: skip
    assert code == 0, err
    stored = json.loads((output / "config.json").read_text())["quantization_config"]["comq"]
    assert stored["solver"]["pair_moves"] == 0 and stored["solver"]["scale_refit"] is True
    card = (output / "README.md").read_text()
    assert "| Pair-move candidates per row | off |" in card and "| Scale refit | yes |" in card
    saved, base = (T.AutoTokenizer.from_pretrained(folder) for folder in (output, gpt2_dir))
    assert base.pad_token is None and saved.special_tokens_map == base.special_tokens_map  # calibration pads its own way


def test_quantize_calibrate_all_experts_solves_every_expert_on_every_token(capsys, tmp_path, text_data) -> None:
    model_dir = save_text_model(tiny_model("qwen3_moe"), tmp_path / "moe", with_pad=False)
    output = tmp_path / "moe-w8"
    code, out, err = run_cli(
        capsys, "quantize", model_dir, "--bits", 8, "--dataset", text_data, "--num-samples", 8,
        "--calibrate-all-experts", "--symmetric", "--output", output,
    )  # fmt: skip
    assert code == 0, err
    stored = json.loads((output / "config.json").read_text())["quantization_config"]
    assert stored["comq"]["calibration"]["calibrate_all_experts"] is True
    assert stored["config_groups"]["group_0"]["weights"]["symmetric"] is True  # what plain transformers needs
    assert "asymmetric grid" not in err
    card = (output / "README.md").read_text()
    assert "| Mixture-of-experts weights | quantized, each expert's layers on every calibration token |" in card
    assert "| Symmetric grid | yes |" in card and ".from_pretrained(" in card
    quantized = hf_comq.load_quantized(output)
    assert type(quantized.model.layers[0].mlp.experts[3].down_proj).__name__ == "COMQLinear"


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
    # the baseline rounds each layer's own weight: not aimed at the full-precision outputs, the default at 4 bits and fewer
    assert stored["comq"]["selection"]["fp_target"] is False
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint", "out"]
    # nor a checkpoint's folder that holds the user's own files beside it (notes, a clone's .git)
    (checkpoint / "notes.txt").write_text("mine")
    (checkpoint / ".git").mkdir()
    code, _, err = run_cli(capsys, *argv, "--overwrite", "--rtn")
    assert code == 1 and "holds files besides the checkpoint (.git, notes.txt); move them out" in error_line(err)
    assert (checkpoint / "notes.txt").read_text() == "mine" and (checkpoint / ".git").is_dir()


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


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_a_checkpoint_without_its_tokenizer_is_named_before_its_weights_load(
    capsys, tmp_path, text_data, monkeypatch, kind
):
    """Without tokenizer files, transformers builds BERT and GPT-2 an empty tokenizer (special tokens
    only): BERT was calibrated on unknown tokens and saved with it, GPT-2 failed after loading."""
    model_dir = tmp_path / "bare"
    tiny_model(kind).save_pretrained(model_dir)  # weights and config, no tokenizer
    loaded = []
    for auto in (T.AutoModelForCausalLM, T.AutoModelForSequenceClassification, T.AutoModel):
        monkeypatch.setattr(auto, "from_pretrained", lambda *a, **k: loaded.append(a))
    code, _, err = run_cli(capsys, "quantize", model_dir, "--dataset", text_data, "--output", tmp_path / "out")
    assert code == 1 and not loaded
    assert error_line(err) == (
        f"hf-comq: error: {model_dir} has no tokenizer; save the original model's one next to the weights: "
        f"AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained({str(model_dir)!r})"
    )
    assert not (tmp_path / "out").exists()


def test_tokenized_data_needs_no_tokenizer(capsys, tmp_path):
    import datasets

    model_dir, data_dir = tmp_path / "bare", tmp_path / "tokens"
    tiny_model("llama").save_pretrained(model_dir)
    datasets.Dataset.from_dict({"input_ids": [[1, 5, 7], [2, 9], [3, 4, 6, 8]] * 2}).save_to_disk(data_dir)
    code, out, err = run_cli(capsys, "quantize", model_dir, "--dataset", data_dir, "--output", tmp_path / "out")
    assert code == 0, err
    assert "has no processor or tokenizer to save with the checkpoint" in err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["comq"]["calibration"][
        "samples_used"
    ] == 6


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


# ---------------------------------------------------------------- under torchrun


def _quantize_on_two_ranks(vit_dir, image_data, output, *extra):
    argv = [sys.executable, "-m", "hf_comq", "quantize", str(vit_dir), "--dataset", str(image_data),
            "--num-samples", "8", "--output", str(output), *map(str, extra)]  # fmt: skip
    return launch_ranks(argv)


@pytest.mark.parametrize("batch_size", [2, 8], ids=["4-batches", "rank-1-gets-no-batch"])
def test_quantize_under_torchrun_splits_calibration_and_rank_0_saves(
    capsys, tmp_path, vit_dir, image_data, batch_size
) -> None:
    """Two ranks write the checkpoint one process writes on the same samples, once, with no staging left over.

    With one batch for two ranks, rank 1 never sees q/k/v share their input and must take that from rank 0.
    """
    ranks = _quantize_on_two_ranks(vit_dir, image_data, tmp_path / "two-ranks", "--batch-size", batch_size)
    for rank, done in enumerate(ranks):
        assert done.returncode == 0, f"rank {rank}: {done.stderr[-3000:]}"
    assert "saved to" in ranks[0].stdout and ranks[1].stdout == ""  # the summary is printed once
    assert "rank 1 of 2: calibrating on its share of the samples" in ranks[1].stderr
    argv = ["quantize", vit_dir, "--dataset", image_data, "--num-samples", 8, "--batch-size", batch_size]
    code, _, err = run_cli(capsys, *argv, "--output", tmp_path / "one-process")
    assert code == 0, err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one-process", "two-ranks"]
    two, one = (load_file(tmp_path / name / "model.safetensors") for name in ("two-ranks", "one-process"))
    assert two.keys() == one.keys() and any(name.endswith("weight_packed") for name in two)
    for name in two:  # the same batches, the Gram matrices summed in another order: the same codes
        assert torch.equal(two[name], one[name]), name


def test_a_check_failing_on_rank_0_stops_every_rank_with_one_line(tmp_path, vit_dir, image_data) -> None:
    output = tmp_path / "taken"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    ranks = _quantize_on_two_ranks(vit_dir, image_data, output)
    assert [done.returncode for done in ranks] == [1, 1]
    assert "already exists and is not empty" in error_line(ranks[0].stderr)
    assert error_line(ranks[1].stderr).startswith("hf-comq: error: rank 0 of 2 failed: output folder")
    assert (output / "keep.txt").read_text() == "mine" and [path.name for path in output.iterdir()] == ["keep.txt"]


def test_quantize_help_lists_the_data_options_under_calibration_data(capsys) -> None:
    code, text, _ = run_cli(capsys, "quantize", "--help")
    assert code == 0
    data = text[text.index("calibration data:"):text.index("output:")]
    for option in ("--dataset", "--split", "--column", "--num-samples", "--batch-size", "--max-length", "--seed"):
        assert f"  {option} " in data, option


def test_a_float16_model_that_overflows_is_named_and_quantizes_with_dtype_float32(capsys, tmp_path, text_data) -> None:
    """A float16 checkpoint finite in float32 only: the line names the layer it reached and --dtype float32,
    which then quantizes it (the CLI had no way to choose the dtype the model loads in).  Aimed at the
    full-precision outputs (the default), the first values to overflow are block 0's down_proj outputs in the
    full-precision stream; aimed at its own output, block 1's inputs."""
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = T.LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e5)
        model.model.layers[0].mlp.up_proj.weight.mul_(1e3)
    source = save_text_model(model.to(torch.float16), tmp_path / "fp16")
    for flags, values in (([], "full-precision outputs of 'model.layers.0.mlp.down_proj'"),
                          (["--no-fp-target"], "inputs of 'model.layers.1.")):  # fmt: skip
        code, _, err = run_cli(
            capsys, "quantize", source, "--dataset", text_data, "--num-samples", 4, *flags, "--output", tmp_path / "a"
        )  # fmt: skip
        assert code != 0
        line = error_line(err)
        assert f"calibration {values}" in line and "overflows in float16" in line and "--dtype float32" in line, line
        assert not (tmp_path / "a").exists()
    code, _, err = run_cli(
        capsys, "quantize", source, "--dataset", text_data, "--num-samples", 4, "--dtype", "float32",
        "--output", tmp_path / "b",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "float32"


def test_modules_to_not_convert_from_the_command_line(capsys, tmp_path, text_data) -> None:
    """Mamba's dt_proj never runs on the data (it stays in full precision), yet its width refused every common
    group size; keeping it out was possible from Python only."""
    torch.manual_seed(0)
    mamba = T.MambaForCausalLM(T.MambaConfig(vocab_size=64, hidden_size=64, state_size=4, num_hidden_layers=1, expand=2,
                                             conv_kernel=2))  # fmt: skip
    mamba.save_pretrained(tmp_path / "mamba")
    word_tokenizer().save_pretrained(tmp_path / "mamba")
    argv = ["quantize", tmp_path / "mamba", "--dataset", text_data, "--num-samples", 4, "--group-size", 16, "--rtn"]
    code, _, err = run_cli(capsys, *argv, "--output", tmp_path / "refused")
    assert code == 1 and "add them to modules_to_not_convert (hf-comq: --modules-to-not-convert)" in error_line(err)
    code, _, err = run_cli(capsys, *argv, "--modules-to-not-convert", "dt_proj", "--output", tmp_path / "q")
    assert code == 0, err
    stored = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert stored["comq"]["selection"]["modules_to_not_convert"] == ["dt_proj"]
    assert "backbone.layers.0.mixer.dt_proj" in stored["ignore"]
