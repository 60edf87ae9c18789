"""The mistakes a user can make at each public entry point, and the one clear line each gets.

One place to read what hf_comq says when it is used wrongly, and to check that it says
so *before* any expensive work: no calibration step (no activation reaches a Hessian),
no model loaded where the mistake does not need one.  Entry points:

* ``COMQConfig(...)``;
* ``from_pretrained(..., quantization_config=COMQConfig(...))`` (quantize on load);
* ``save_pretrained`` / ``push_to_hub`` / ``torch.save`` of a quantized model;
* ``hf_comq.load_quantized``;
* ``hf-comq quantize`` / ``evaluate`` / ``demo`` / ``--help``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
import transformers as T

from hf_comq import COMQConfig, CheckpointError, load_quantized
from hf_comq.cli import main
from hf_comq.cli.output import recover_interrupted_save, save_atomically
from hf_comq.solver import HessianAccumulator
from tests.tiny import image_parquet, image_processor, images, quantize_tiny, sentences, tiny_vit, word_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vit") / "tiny-vit"
    tiny_vit(num_labels=3).save_pretrained(folder)
    image_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def quantized_dir(vit_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("quantized") / "tiny-vit-w4"
    quantize_tiny(vit_dir, T.ViTForImageClassification).save_pretrained(folder)
    image_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bert") / "tiny-bert"
    config = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    T.BertModel(config).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    return image_parquet(tmp_path_factory.mktemp("data") / "images.parquet", images(6))


@pytest.fixture
def calibration_steps(monkeypatch) -> list[int]:
    """Counts activation batches reaching a Hessian: calibration has started once this is non-empty."""
    steps: list[int] = []
    original = HessianAccumulator.add

    def add(self, activations, target=None):
        steps.append(1)
        return original(self, activations, target)

    monkeypatch.setattr(HessianAccumulator, "add", add)
    return steps


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text.strip(), text
    return text


# ---------------------------------------------------------------------------------------------- COMQConfig
@pytest.mark.parametrize(
    "settings, error, message",
    [
        ({"bitz": 4}, TypeError, "unexpected keyword argument 'bitz'"),
        ({"bits": 1}, ValueError, r"bits: expected an integer in \[2, 8\], got 1; use 4"),
        ({"bits": "4"}, ValueError, "bits: expected an integer"),
        ({"group_size": 0}, ValueError, "group_size: expected an integer >= 1"),
        ({"damp": 0.0}, ValueError, r"damp: expected a number > 0 or None, got 0.0"),
        ({"shrink": 1.5}, ValueError, r"shrink: expected a number in \(0, 1.0\]"),
        ({"order": "random"}, ValueError, r"order: expected one of \['greedy', 'sequential', 'act_order'\]"),
        ({"init": "zeros"}, ValueError, "init: expected one of"),
        ({"num_samples": 0}, ValueError, "num_samples: expected an integer >= 1"),
        ({"dataset": ""}, ValueError, "dataset: got an empty string"),
        ({"dataset": []}, ValueError, "dataset: the list is empty"),
        ({"dataset": 3}, ValueError, "dataset: unsupported type int"),
        ({"dataset": (text for text in ["a b"])}, ValueError, r"dataset: got a generator, which can be read only once; pass a list"),
        ({"dataset": {"a b", "c d"}}, ValueError, r"dataset: a set has no order, .*; pass a list"),
        ({"processor": 5}, ValueError, r"processor: got int; pass a tokenizer or image processor"),
        ({"dataset_split": "train[:64]"}, ValueError, r"dataset_split: split 'train\[:64\]': hf_comq reads whole splits"),
        ({"modules_to_not_convert": "classifier"}, ValueError, "modules_to_not_convert: expected a list of module names"),
        ({"symmetric": "yes"}, ValueError, "symmetric: expected True or False,"),
        ({"scale_refit": "yes"}, ValueError, r"scale_refit: expected True, False or None \(the default for the bit width\)"),
        ({"quant_method": "gptq"}, ValueError, "COMQConfig only describes 'comq'"),
    ],
)
def test_comq_config(settings, error, message) -> None:
    with pytest.raises(error, match=message) as raised:
        COMQConfig(**settings)
    one_line(raised.value)


# ---------------------------------------------------------------------------------------------- quantize on load
def _quantize(path: Path, **settings):
    settings.setdefault("dataset", images(4))
    settings.setdefault("processor", image_processor())
    return T.ViTForImageClassification.from_pretrained(path, quantization_config=COMQConfig(**settings))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"dataset": None, "processor": None}, "COMQ needs calibration data: pass COMQConfig"),
        ({"modules_to_not_convert": ["does.not.exist"]}, r"\['does.not.exist'\] match no module"),
        ({"group_size": 24}, "group_size=24 does not divide in_features"),
        ({"block_name": "vit.blocks"}, "block_name='vit.blocks' does not name a submodule"),
        ({"dataset": "demo:validation"}, "unknown demo dataset 'demo:validation'; use one of demo:calibration"),
        ({"dataset": "/no/such/folder/data.parquet"}, "calibration dataset: no file or folder at /no/such/folder"),
        ({"processor": "./no-such-processor"}, "calibration processor: no folder at ./no-such-processor"),
        ({"dataset": sentences(4), "processor": None}, r"the calibration data is text, but ViTForImageClassification"),
        (
            {"dataset": datasets.Dataset.from_dict({"photo": images(2)})},
            r"dataset has no column of a name hf_comq reads .*available columns: \['photo'\]; name the one to read",
        ),
    ],
)
def test_from_pretrained_quantize_path(vit_dir, calibration_steps, settings, message) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        _quantize(vit_dir, **settings)
    one_line(raised.value)
    assert calibration_steps == []


@pytest.mark.parametrize("device_map", ["cuda", "cuda:1", 0, {"vit": "cpu", "classifier": "cuda:0"}])
def test_a_device_map_naming_a_missing_device_is_one_line(vit_dir, calibration_steps, monkeypatch, device_map) -> None:
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)  # as on a CPU-only machine, on any machine
    with pytest.raises(ValueError, match=r"device_map puts weights on ('cuda(:\d)?'|0), but") as raised:
        T.ViTForImageClassification.from_pretrained(
            vit_dir, device_map=device_map, quantization_config=COMQConfig(dataset=images(4), processor=image_processor())
        )
    one_line(raised.value)
    assert "use device_map='cpu'" in str(raised.value)
    assert calibration_steps == []


def test_token_ids_outside_the_vocabulary_are_one_line_before_calibration(bert_dir, calibration_steps) -> None:
    ids = torch.randint(0, 64, (4, 8))
    ids[0, 3] = 70  # e.g. made by another model's tokenizer
    with pytest.raises(ValueError, match=r"token id 70, but BertModel's input embedding has 64 rows") as raised:
        T.BertModel.from_pretrained(bert_dir, quantization_config=COMQConfig(dataset=ids))
    one_line(raised.value)
    assert calibration_steps == []


def test_a_nan_weight_is_found_before_calibration(vit_dir, tmp_path, calibration_steps) -> None:
    model = T.ViTForImageClassification.from_pretrained(vit_dir)
    with torch.no_grad():
        model.vit.layers[1].mlp.fc2.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    image_processor().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="layer 'vit.layers.1.mlp.fc2' has 1 NaN or infinite weight value"):
        _quantize(tmp_path)
    assert calibration_steps == []


def test_an_empty_data_file_is_one_line(vit_dir, tmp_path, calibration_steps) -> None:
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="dataset file '.*empty.parquet' is empty"):
        _quantize(vit_dir, dataset=str(tmp_path / "empty.parquet"))
    assert calibration_steps == []


def test_other_settings_on_a_quantized_checkpoint_are_refused(quantized_dir, calibration_steps) -> None:
    """transformers' own check: a quantized checkpoint is loaded with the settings it was saved with."""
    with pytest.raises(ValueError, match="CompressedTensorsConfig"):
        T.ViTForImageClassification.from_pretrained(quantized_dir, quantization_config=COMQConfig(bits=2))
    assert calibration_steps == []


def test_demo_data_by_name_from_python(calibration_steps) -> None:
    """``dataset="demo:calibration"`` works in Python as on the command line (one resolver for both)."""
    from hf_comq.assets import demo_model_path

    model = T.ViTForImageClassification.from_pretrained(
        demo_model_path(), quantization_config=COMQConfig(dataset="demo:calibration", num_samples=4, bits=8)
    )
    assert model.config.quantization_config.calibration_description.startswith("demo:calibration (column image)")  # no split: one file
    assert calibration_steps


# ---------------------------------------------------------------------------------------------- save / push / pickle
def test_push_to_hub_with_an_invalid_repo_id_fails_before_saving(quantized_dir, monkeypatch) -> None:
    model = load_quantized(quantized_dir)
    saves: list[str] = []
    monkeypatch.setattr(T.ViTForImageClassification, "save_pretrained", lambda *args, **kwargs: saves.append("x"))
    with pytest.raises(ValueError, match="Repo id must"):
        model.push_to_hub("not a repo id!")
    assert saves == []


def test_a_really_quantized_model_survives_torch_save_and_pickle(vit_dir, tmp_path) -> None:
    """The card hooks are plain objects, so a quantized model pickles and still saves with its card."""
    model = quantize_tiny(vit_dir, T.ViTForImageClassification)
    pixels = torch.randn(2, 3, 32, 32)
    torch.save(model, tmp_path / "model.pt")
    for restored in (torch.load(tmp_path / "model.pt", weights_only=False), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            assert torch.equal(restored(pixel_values=pixels).logits, model(pixel_values=pixels).logits)
        restored.save_pretrained(tmp_path / "saved")
        assert (tmp_path / "saved" / "README.md").is_file()
        torch.testing.assert_close(
            load_quantized(tmp_path / "saved")(pixel_values=pixels).logits, model(pixel_values=pixels).logits
        )


# ---------------------------------------------------------------------------------------------- load_quantized
def test_load_quantized(vit_dir, quantized_dir, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="is not a compressed-tensors pack-quantized checkpoint: config.json has no"):
        load_quantized(vit_dir)
    with pytest.raises(CheckpointError, match="bits: checkpoint 4 vs passed 2"):
        load_quantized(quantized_dir, quantization_config=COMQConfig(bits=2))
    with pytest.raises(TypeError, match="do not pass config="):
        load_quantized(quantized_dir, config=T.ViTConfig())
    for missing in (tmp_path / "no-such-folder", f"{tmp_path}/no-such-folder", "./no-such-folder"):
        with pytest.raises(FileNotFoundError, match=r"no checkpoint folder at .*no-such-folder: check the path"):
            load_quantized(missing)  # not tried as a Hub id: no connection error, no repo-id rules



def test_a_stale_single_file_beside_a_sharded_checkpoint_is_named(vit_dir, quantized_dir, tmp_path) -> None:
    """A model.safetensors of another save beside an index (left by an older hf_comq, or by transformers
    for a full-precision model): loaders read it first, so the load failed on it with no word of why."""
    folder = tmp_path / "sharded"
    shutil.copytree(quantized_dir, folder)
    model = load_quantized(quantized_dir)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="20KB")
    shutil.copy(vit_dir / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors holds no packed tensors, and loaders read it instead of "
                                              r"the sharded checkpoint beside it .*: a file left by an earlier save; remove it"):  # fmt: skip
        load_quantized(folder)

# ---------------------------------------------------------------------------------------------- CLI
def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_error(capsys, *argv: object) -> str:
    """Run a command that must fail with one ``hf-comq: error:`` line and nothing on stdout."""
    code, out, err = run_cli(capsys, *argv)
    assert code == 1, (out, err)
    assert "Traceback" not in err and out == ""
    lines = [line for line in err.splitlines() if line.startswith("hf-comq: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a command loads weights: the mistake must be caught from config.json alone."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(T.PreTrainedModel, "from_pretrained", classmethod(refuse))


@pytest.fixture
def hub_unreachable(monkeypatch):
    """A Hub endpoint nothing listens on: the CLI must say so at once instead of retrying."""
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)


def test_quantize_output_checks(capsys, tmp_path, monkeypatch, vit_dir, image_data, no_model_loading) -> None:
    base = ["quantize", vit_dir, "--dataset", image_data]
    monkeypatch.chdir(tmp_path)
    assert "--output . is the current folder" in cli_error(capsys, *base, "--output", ".", "--overwrite")
    assert "--output .. is the current folder or one above it" in cli_error(capsys, *base, "--output", "..")
    assert "would replace the model being quantized" in cli_error(capsys, *base, "--output", vit_dir, "--overwrite")
    (tmp_path / "file.txt").write_text("x")
    assert "--output file.txt is a file" in cli_error(capsys, *base, "--output", "file.txt")
    line = cli_error(capsys, *base, "--output", tmp_path / "file.txt" / "out")
    assert "cannot write the output folder" in line and "is not writable" in line
    line = cli_error(capsys, *base, "--output", "out", "--push-to-hub", "me/my model")
    assert "--push-to-hub 'me/my model' is not a valid Hub repository id" in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_quantize_into_a_read_only_folder(capsys, tmp_path, vit_dir, image_data, no_model_loading) -> None:
    (tmp_path / "locked").mkdir(mode=0o555)
    line = cli_error(capsys, "quantize", vit_dir, "--dataset", image_data, "--output", tmp_path / "locked" / "out")
    assert "cannot write the output folder" in line


def test_quantize_names_that_would_need_an_unreachable_hub(capsys, tmp_path, image_data, hub_unreachable) -> None:
    line = cli_error(capsys, "quantize", "x", "--dataset", image_data, "--output", tmp_path / "out")
    assert line.startswith("hf-comq: error: model 'x' is not a local path, and the Hugging Face Hub is unavailable")
    assert "a single word is taken as a Hub id" in line
    line = cli_error(capsys, "evaluate", tmp_path, "--dataset", "beans")
    assert "is not a model checkpoint folder" in line
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    line = cli_error(capsys, "quantize", tmp_path, "--dataset", "someone/images", "--output", tmp_path / "out")
    assert "dataset 'someone/images' is not a local path, and the Hugging Face Hub is unavailable" in line


def test_quantize_with_the_hub_switched_off(capsys, tmp_path, monkeypatch, vit_dir) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    line = cli_error(capsys, "quantize", "someone/model", "--dataset", "x", "--output", tmp_path / "out")
    assert "model 'someone/model' is not a local path, and the Hugging Face Hub is unavailable (HF_HUB_OFFLINE" in line
    line = cli_error(capsys, "quantize", vit_dir, "--dataset", "beans", "--output", tmp_path / "out")
    assert "dataset 'beans' is not a local path" in line


def test_rtn_refuses_the_flags_of_steps_it_does_not_run(capsys, tmp_path, vit_dir, image_data, no_model_loading) -> None:
    base = ["quantize", vit_dir, "--dataset", image_data, "--output", tmp_path / "out", "--rtn"]
    line = cli_error(capsys, *base, "--scale-refit", "--pair-moves", 8)
    assert "--rtn rounds each weight with no COMQ sweep, so --scale-refit/--no-scale-refit and --pair-moves" in line
    assert "--pair-moves would do nothing" in cli_error(capsys, *base, "--pair-moves", 0)


def test_evaluate_names_labels_that_are_not_the_models_class_ids(capsys, tmp_path, vit_dir, no_model_loading) -> None:
    ten_classes = image_parquet(tmp_path / "ten.parquet", images(12), num_classes=10)  # the model has 3
    line = cli_error(capsys, "evaluate", vit_dir, "--dataset", ten_classes)
    assert "label 9 in column 'label' is not one of the model's 3 classes (0 to 2)" in line
    named = tmp_path / "named.parquet"
    datasets.Dataset.from_dict({"image": images(2), "label": ["cat", "dog"]}).to_parquet(named)
    line = cli_error(capsys, "evaluate", vit_dir, "--dataset", named)
    assert "label column 'label' holds ['str'] values; top-1 needs integer class ids" in line
    assert line.endswith("name the class-id column with label_column (hf-comq: --label-column)")


def test_evaluate_refuses_a_length_that_is_not_positive(capsys, quantized_dir, image_data, no_model_loading) -> None:
    for value in (0, -5):
        line = cli_error(capsys, "evaluate", quantized_dir, "--dataset", image_data, "--max-length", value)
        assert "--max-length must be a positive integer" in line


def test_chat_messages_are_named_with_their_fix_before_any_work(
    capsys, tmp_path, vit_dir, bert_dir, no_model_loading
) -> None:
    """A ``messages`` column is read without --column; a tokenizer without a chat template, or a model
    that takes no text, is named before the weights load."""
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    line = cli_error(capsys, "quantize", bert_dir, "--dataset", chats, "--output", tmp_path / "out")
    assert "the calibration data is chat conversations, but" in line and "has no chat template" in line
    line = cli_error(capsys, "quantize", vit_dir, "--dataset", chats, "--output", tmp_path / "out")
    assert line.endswith("--dataset column 'messages' holds chat, but ViTForImageClassification takes images")


def test_a_push_that_cannot_happen_is_named_before_any_work(
    capsys, tmp_path, monkeypatch, vit_dir, image_data, no_model_loading
) -> None:
    base = ["quantize", vit_dir, "--dataset", image_data, "--output", tmp_path / "out"]
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    line = cli_error(capsys, *base, "--push-to-hub", "me/tiny")
    assert "--push-to-hub needs the Hugging Face Hub, which is unavailable (HF_HUB_OFFLINE is set)" in line
    assert "pass --push-to-hub too" in cli_error(capsys, *base, "--private")
    assert not (tmp_path / "out").exists()


def test_an_offload_folder_goes_to_from_pretrained_with_the_device_map(
    capsys, tmp_path, monkeypatch, vit_dir, image_data, no_model_loading
) -> None:
    base = ["quantize", vit_dir, "--dataset", image_data, "--output", tmp_path / "out", "--offload-folder", tmp_path / "off"]
    assert "pass --device-map too" in cli_error(capsys, *base)
    inside = ["quantize", vit_dir, "--dataset", image_data, "--output", tmp_path / "out", "--device-map", "auto"]
    assert "overlaps --output" in cli_error(capsys, *inside, "--offload-folder", tmp_path / "out" / "off")
    assert "overlaps the model's folder" in cli_error(capsys, *inside, "--offload-folder", vit_dir)
    seen = {}

    def record(cls, *args, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(T.PreTrainedModel, "from_pretrained", classmethod(record))
    code, _, err = run_cli(capsys, *base, "--device-map", "auto")
    assert code == 1 and "hf-comq: error: stop here" in err
    assert (seen["device_map"], seen["offload_folder"]) == ("auto", str(tmp_path / "off"))


def test_a_push_to_an_unreachable_hub_is_named_before_any_work(
    capsys, tmp_path, vit_dir, image_data, hub_unreachable, no_model_loading
) -> None:
    argv = ["quantize", vit_dir, "--dataset", image_data, "--output", tmp_path / "out", "--push-to-hub", "me/x"]
    line = cli_error(capsys, *argv)
    assert "--push-to-hub needs the Hugging Face Hub, which is unavailable" in line


def test_a_push_without_a_token_is_named_before_any_work(capsys, tmp_path, monkeypatch, vit_dir, image_data) -> None:
    import hf_comq.cli.quantize as quantize_command

    monkeypatch.setattr(quantize_command, "hub_unavailable", lambda: None)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    argv = ["quantize", vit_dir, "--dataset", image_data, "--output", tmp_path / "out", "--push-to-hub", "me/x"]
    line = cli_error(capsys, *argv)
    assert line == "hf-comq: error: --push-to-hub needs a Hub token: run `hf auth login` or set HF_TOKEN"


def test_empty_data_is_one_line(capsys, tmp_path, vit_dir, calibration_steps) -> None:
    image_parquet(tmp_path / "rows.parquet", [])
    (tmp_path / "bytes.parquet").write_bytes(b"")
    for command in (["quantize", "--output", tmp_path / "out"], ["evaluate"]):
        line = cli_error(capsys, command[0], vit_dir, "--dataset", tmp_path / "rows.parquet", *command[1:])
        assert "rows.parquet' has no rows; pass data with at least one sample" in line
        line = cli_error(capsys, command[0], vit_dir, "--dataset", tmp_path / "bytes.parquet", *command[1:])
        assert "bytes.parquet' is empty (0 bytes)" in line
    assert calibration_steps == []


def test_evaluate_mistakes(capsys, tmp_path, vit_dir, bert_dir, quantized_dir, image_data, no_model_loading) -> None:
    line = cli_error(capsys, "evaluate", quantized_dir, "--dataset", image_data, "--reference", bert_dir)
    assert f"--reference {bert_dir} is a 'bert' model and {quantized_dir} a 'vit' model" in line
    assert "pass the full-precision original" in line
    other = tmp_path / "other-vit"
    tiny_vit(num_labels=5).save_pretrained(other)
    line = cli_error(capsys, "evaluate", quantized_dir, "--dataset", image_data, "--reference", other)
    assert "--reference other-vit (ViTForImageClassification) is not the same kind of model as tiny-vit-w4" in line
    assert "num_labels 5 vs 3" in line
    line = cli_error(capsys, "evaluate", bert_dir, "--dataset", image_data)
    assert "needs --reference FP_MODEL" in line
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "a few words", "label": 0}) + "\n")
    line = cli_error(capsys, "evaluate", vit_dir, "--dataset", texts)
    assert line.endswith("column 'text' holds text, but tiny-vit (ViTForImageClassification) takes images; "
                         "pass images (name the column with --column)")  # fmt: skip
    line = cli_error(capsys, "evaluate", bert_dir, "--dataset", image_data, "--reference", bert_dir)
    assert "column 'image' holds images, but tiny-bert (BertModel) takes text" in line


def test_evaluate_a_folder_saved_without_its_processor(
    capsys, tmp_path, quantized_dir, image_data, no_model_loading
) -> None:
    """The README's Python save used to leave the processor out; evaluate then named an option it does not have."""
    folder = tmp_path / "no-processor"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((quantized_dir / name).read_bytes())
    line = cli_error(capsys, "evaluate", folder, "--dataset", image_data)
    assert f"{folder} has no image processor; save the original model's one next to the weights" in line
    assert "AutoImageProcessor.from_pretrained(ORIGINAL).save_pretrained(" in line and "COMQConfig" not in line


def test_demo_mistakes(capsys, tmp_path, calibration_steps) -> None:
    assert "bits: expected an integer in [2, 8], got 9" in cli_error(capsys, "demo", "--bits", 9, "--output", tmp_path)
    assert "--num-samples must be a positive integer" in cli_error(capsys, "demo", "--num-samples", 0)
    (tmp_path / "vit-fashion-mnist-comq-w4").mkdir()
    (tmp_path / "vit-fashion-mnist-comq-w4" / "notes.txt").write_text("mine")
    line = cli_error(capsys, "demo", "--bits", 4, "--output", tmp_path)
    assert "already exists and is not empty; choose another --output or pass --overwrite" in line
    assert "--overwrite only replaces a checkpoint hf-comq wrote" in cli_error(
        capsys, "demo", "--bits", 4, "--output", tmp_path, "--overwrite"
    )
    assert (tmp_path / "vit-fashion-mnist-comq-w4" / "notes.txt").read_text() == "mine"
    # -1 is per channel: the default folder, so the same refusal
    line = cli_error(capsys, "demo", "--bits", 4, "--group-size", -1, "--output", tmp_path)
    assert "vit-fashion-mnist-comq-w4 already exists" in line
    assert calibration_steps == []


def test_a_demo_group_size_the_model_refuses_is_named_before_the_evaluation(capsys, tmp_path, monkeypatch) -> None:
    import hf_comq.evaluation

    evaluated = []
    monkeypatch.setattr(hf_comq.evaluation, "image_logits", lambda *args, **kwargs: evaluated.append(1))
    code, out, err = run_cli(capsys, "demo", "--bits", 4, "--group-size", 7, "--output", tmp_path)
    line = next(line for line in err.splitlines() if line.startswith("hf-comq: error:"))
    assert code == 1 and "--group-size 7 does not divide the input size of every layer of the demo ViT" in line
    assert "or -1 for one scale per output channel" in line and "hf-comq demo:" not in out  # before its header
    assert evaluated == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--threads", "0"], "--threads must be a positive integer, got 0"),
        (["evaluate", "MODEL", "--dataset", "DATA", "--limit", "0"], "--limit must be a positive integer, got 0"),
        (["evaluate", "MODEL", "--dataset", "DATA", "--batch-size", "-1"], "--batch-size must be a positive integer"),
        (["demo", "--eval-limit", "0"], "--eval-limit must be a positive integer"),
        (["quantize", "MODEL", "--dataset", "DATA", "--output", "OUT", "--bits", "9"], r"bits: expected an integer in \[2, 8\]"),
        (["quantize", "MODEL", "--dataset", "DATA", "--output", "OUT", "--num-samples", "0"], r"error: --num-samples: expected"),
        (["quantize", "MODEL", "--dataset", "DATA", "--output", "OUT", "--batch-size", "0"], r"error: --batch-size: expected"),
        (["quantize", "MODEL", "--dataset", "DATA", "--output", "OUT", "--max-length", "0"], r"error: --max-length: expected"),
        (["quantize", "MODEL", "--dataset", "DATA", "--output", "OUT", "--seed", "-1"], r"error: --seed: expected an integer >= 0"),
        (["quantize", "MODEL", "--dataset", "DATA", "--output", "OUT", "--pair-moves", "-1"], r"error: --pair-moves: expected a non"),
    ],
)
def test_cli_numbers_out_of_range(capsys, vit_dir, image_data, tmp_path, calibration_steps, argv, message) -> None:
    names = {"MODEL": str(vit_dir), "DATA": str(image_data), "OUT": str(tmp_path / "out")}
    assert re.search(message, cli_error(capsys, *[names.get(arg, arg) for arg in argv]))
    assert calibration_steps == []


def test_help_and_usage_errors_import_neither_torch_nor_transformers() -> None:
    """``hf-comq --help`` used to take 8-10 s: it imported transformers (and torch) before parsing."""
    script = textwrap.dedent(
        """
        import sys
        from hf_comq.cli import main
        codes = [main(["--help"]), main(["quantize", "--help"]), main(["quantize", "model"]), main(["demo", "--bits", "x"])]
        heavy = sorted(name for name in ("torch", "transformers", "datasets") if name in sys.modules)
        print(codes, heavy)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[0, 0, 2, 2] []", result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------- atomic save
def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_a_killed_save_are_cleaned_and_the_old_checkpoint_restored(tmp_path, capsys) -> None:
    output = tmp_path / "ckpt"
    dead = _dead_pid()
    old = tmp_path / f".ckpt.old-{dead}-0123abcd"  # killed between the two renames: ckpt itself is gone
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"previous")
    partial = tmp_path / f".ckpt.partial-{dead}-89abcdef"
    partial.mkdir()
    unrelated = tmp_path / ".ckpt.partial-notours"
    unrelated.mkdir()
    assert len(recover_interrupted_save(output)) == 2
    assert (output / "model.safetensors").read_bytes() == b"previous"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".ckpt.partial-notours", "ckpt"]
    # a live process's staging folder is left alone
    alive = tmp_path / f".ckpt.partial-{os.getppid()}-00000000"
    alive.mkdir()
    assert recover_interrupted_save(output) == [] and alive.is_dir()
    # one with this process's own id was left by an earlier process (a container's entry point is always
    # process 1): this process has no save in progress while it recovers
    earlier = tmp_path / f".ckpt.partial-{os.getpid()}-11111111"
    earlier.mkdir()
    assert len(recover_interrupted_save(output)) == 1 and not earlier.exists()


def test_a_linked_output_receives_the_checkpoint_where_the_link_points(tmp_path) -> None:
    """Swapping the link itself aside would leave its target empty and a real folder in its place."""
    target = tmp_path / "big-disk" / "ckpt"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"previous")
    link = tmp_path / "ckpt"
    link.symlink_to(target)
    save_atomically(link, lambda folder: (folder / "model.safetensors").write_bytes(b"fresh"))
    assert link.is_symlink() and (target / "model.safetensors").read_bytes() == b"fresh"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["big-disk", "ckpt"]
    assert sorted(path.name for path in target.parent.iterdir()) == ["ckpt"]


def _killed_save_script(output: Path, kill_at: str) -> str:
    return textwrap.dedent(
        f"""
        import os, pathlib, signal
        from hf_comq.cli.output import save_atomically

        renames = []
        original = pathlib.Path.rename

        def rename(self, target):
            renames.append(self)
            result = original(self, target)
            if {kill_at!r} == "between renames" and len(renames) == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        pathlib.Path.rename = rename

        def write(folder):
            (folder / "model.safetensors").write_bytes(b"new")
            if {kill_at!r} == "while writing":
                os.kill(os.getpid(), signal.SIGKILL)

        save_atomically(pathlib.Path({str(output)!r}), write)
        """
    )


@pytest.mark.parametrize("kill_at", ["while writing", "between renames"])
def test_sigkill_during_save_leaves_a_recoverable_state(tmp_path, kill_at) -> None:
    output = tmp_path / "ckpt"
    output.mkdir()
    (output / "model.safetensors").write_bytes(b"previous")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", _killed_save_script(output, kill_at)], env=env, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert len(list(tmp_path.iterdir())) == 2  # the killed run's hidden folder is left behind...
    save_atomically(output, lambda folder: (folder / "model.safetensors").write_bytes(b"fresh"))
    assert (output / "model.safetensors").read_bytes() == b"fresh"
    assert [path.name for path in tmp_path.iterdir()] == ["ckpt"]  # ...and removed by the next save


def test_saved_folders_get_the_umask_permissions(tmp_path) -> None:
    previous = os.umask(0o022)
    try:
        save_atomically(tmp_path / "ckpt", lambda folder: (folder / "a").write_text("x"))
    finally:
        os.umask(previous)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755


def test_comq_demo_is_git_ignored() -> None:
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", "comq-demo/vit-fashion-mnist-comq-w4"], cwd=REPO_ROOT)
    assert result.returncode == 0


def test_readme_documents_every_cli_option_and_the_paper_mode() -> None:
    from hf_comq.cli import build_parser
    from hf_comq.solver import REFERENCE_CODE

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Command line") : readme.index("## Performance")]
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "==SUPPRESS==" or action.choices)
    for name, command in commands.choices.items():
        for action in command._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert f"`{option}" in section or f"[{option}" in section or f" {option} " in section, (name, option)
    assert "COMQConfig(**REFERENCE_CODE, sequential=False)" in readme
    paper = COMQConfig(**REFERENCE_CODE, sequential=False)
    assert (paper.init, paper.order, paper.iterations, paper.scale_refit, paper.scale_search, paper.sequential) == (
        "fp", "greedy", 1, False, False, False,
    )  # fmt: skip
    assert re.search(r"processor\.save_pretrained\(\"vit-comq-w4\"\)", readme)
    assert "hf_comq.assets.demo_model_path()" in readme and '"demo:calibration"' in readme
