"""COMQHfQuantizer end to end: registration, quantize -> save -> packed reload, bad checkpoints, loading guards.

Loading the same checkpoints in plain transformers (no hf_comq) is tested in tests/test_plain_transformers.py.
"""

import importlib
import json
import shutil
import os
import sys
import types

import pytest
import torch
import transformers as T
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers import AutoQuantizationConfig
from transformers.quantizers import auto as quantizer_auto
from transformers.quantizers.base import HfQuantizer

import hf_comq
from hf_comq import CheckpointError, COMQConfig, COMQHfQuantizer, COMQLinear, QuantizedWeight, replace_module
from hf_comq.checkpoint import verify_quantized_model
from hf_comq.loading import check_quantized_model, load_quantized
from hf_comq.modules import find_quantizable_linears
from hf_comq.nn import get_linear_weight
from hf_comq.solver import ROUND_TO_NEAREST
from tests.tiny import first_output, images, model_inputs, quantize_tiny, tiny_model, word_tokenizer


def run(model: nn.Module) -> torch.Tensor:
    return first_output(model, model_inputs(model))


@pytest.fixture(scope="module")
def fp_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp")
    paths = {}
    for arch in ("vit", "bert", "gpt2", "llama"):
        paths[arch] = str(root / arch)
        tiny_model(arch).save_pretrained(paths[arch])
    return paths


@pytest.fixture(scope="module")
def vit_quantized(fp_checkpoints, tmp_path_factory):
    """A 4-bit, group-16 ViT checkpoint and the in-memory model it was saved from."""
    model = quantize_tiny(fp_checkpoints["vit"], T.ViTForImageClassification, bits=4, group_size=16)
    path = str(tmp_path_factory.mktemp("q") / "vit")
    model.save_pretrained(path)
    return path, model


def copy_checkpoint(source: str, target) -> str:
    target = str(target)
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(source):
        with open(os.path.join(source, name), "rb") as src, open(os.path.join(target, name), "wb") as dst:
            dst.write(src.read())
    return target


# --------------------------------------------------------------------------- registration and contract
def test_registration_is_idempotent_across_imports_and_reloads():
    hf_comq.register()
    hf_comq.register()
    importlib.reload(importlib.import_module("hf_comq.registration")).register()
    importlib.reload(hf_comq)
    assert quantizer_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["comq"] is COMQConfig
    assert quantizer_auto.AUTO_QUANTIZER_MAPPING["comq"] is COMQHfQuantizer
    config = AutoQuantizationConfig.from_dict({"quant_method": "comq", "bits": 3})
    assert isinstance(config, COMQConfig) and config.bits == 3


def test_registration_refuses_to_shadow_another_package(monkeypatch):
    foreign = type("OtherQuantizer", (HfQuantizer,), {"__module__": "other_package.quantizer"})
    monkeypatch.setitem(quantizer_auto.AUTO_QUANTIZER_MAPPING, "comq", foreign)
    with pytest.raises(RuntimeError, match="other_package"):
        hf_comq.register()


def test_quantizer_contract():
    quantizer = COMQHfQuantizer(COMQConfig(), pre_quantized=False)
    assert quantizer.is_serializable() is True
    assert quantizer.is_trainable is True
    assert COMQHfQuantizer.requires_calibration is False



def test_quantizing_under_a_device_map_caps_onednns_caches_before_the_weights_load(monkeypatch):
    """A device map (a memory budget, mostly) keeps oneDNN's caches small; without one, or loading a
    quantized checkpoint, they are left alone; a value the user set stays."""
    from hf_comq.onednn_caches import ONEDNN_CACHE_CAPACITY, ONEDNN_CACHE_VARIABLES

    def capacities() -> dict:
        return {variable: os.environ.get(variable) for variable in ONEDNN_CACHE_VARIABLES}

    for variable in ONEDNN_CACHE_VARIABLES:  # absent here, and absent again after the test
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    COMQHfQuantizer(COMQConfig(), pre_quantized=False).validate_environment(device_map=None)
    COMQHfQuantizer(COMQConfig(), pre_quantized=True).validate_environment(device_map="auto")
    assert capacities() == dict.fromkeys(ONEDNN_CACHE_VARIABLES)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "256")
    COMQHfQuantizer(COMQConfig(), pre_quantized=False).validate_environment(device_map="auto")
    assert capacities() == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(ONEDNN_CACHE_CAPACITY), "LRU_CACHE_CAPACITY": "256"}

# --------------------------------------------------------------------------- packed round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["vit", "bert", "gpt2", "llama"])
def test_save_and_packed_reload_give_identical_outputs(arch, dtype, fp_checkpoints, tmp_path):
    cls = type(tiny_model(arch))
    model = quantize_tiny(fp_checkpoints[arch], cls, bits=4, group_size=16)
    if dtype != torch.float32:
        model = cls.from_pretrained(fp_checkpoints[arch], dtype=dtype, quantization_config=COMQConfig(
            bits=4, group_size=16, dataset=model_inputs(model, 8, 1).popitem()[1], **hf_comq.solver.ROUND_TO_NEAREST))
    before = run(model)
    model.save_pretrained(tmp_path)

    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and "README.md" in files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "compressed-tensors" and stored["config_groups"]["group_0"]["weights"]["num_bits"] == 4

    reloaded = load_quantized(tmp_path, dtype=dtype)
    assert isinstance(reloaded.hf_quantizer, COMQHfQuantizer)
    converted = [module for module in reloaded.modules() if isinstance(module, COMQLinear)]
    assert len(converted) == len([module for module in model.modules() if isinstance(module, COMQLinear)]) > 0
    assert all(layer.weight_scale.dtype == torch.float32 for layer in converted)
    after = run(reloaded)
    assert after.dtype == dtype
    assert torch.equal(before, after)


def test_a_grayscale_vit_quantizes_saves_reloads_and_evaluates(tmp_path):
    """num_channels=1 (Fashion-MNIST, X-ray...): before, calibration turned every image into RGB and failed."""
    import datasets

    from hf_comq.evaluation import top1
    from tests.tiny import gray_images, image_processor, tiny_vit

    folder = tmp_path / "gray-vit"
    tiny_vit(num_channels=1, num_labels=3).save_pretrained(folder)
    image_processor(channels=1).save_pretrained(folder)
    config = COMQConfig(bits=4, dataset=gray_images(8), num_samples=8)
    model = T.ViTForImageClassification.from_pretrained(folder, quantization_config=config).eval()
    assert sum(isinstance(module, COMQLinear) for module in model.modules()) == 12
    model.save_pretrained(tmp_path / "q")
    image_processor(channels=1).save_pretrained(tmp_path / "q")
    pixels = image_processor(channels=1)(images=gray_images(2, seed=4), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
        for reloaded in (load_quantized(tmp_path / "q"), T.ViTForImageClassification.from_pretrained(tmp_path / "q")):
            assert torch.equal(reloaded(pixel_values=pixels).logits, expected)
    test = datasets.Dataset.from_dict({"image": gray_images(6, seed=5), "label": [0, 1, 2, 0, 1, 2]})
    accuracy = top1(load_quantized(tmp_path / "q"), test).accuracy  # processor read from the checkpoint
    assert accuracy == top1(model, test, image_processor(channels=1)).accuracy


def test_gpt2_conv1d_layers_reload_packed_and_the_head_stays_float(fp_checkpoints, tmp_path):
    quantize_tiny(fp_checkpoints["gpt2"], T.GPT2LMHeadModel).save_pretrained(tmp_path)
    reloaded = load_quantized(tmp_path)
    assert isinstance(reloaded.transformer.h[0].attn.c_attn, COMQLinear)
    assert reloaded.transformer.h[0].attn.c_attn.transposed_source
    assert type(reloaded.lm_head) is nn.Linear


def test_w4_checkpoint_is_an_eighth_of_fp32_plus_scales(fp_checkpoints, tmp_path):
    model = T.ViTForImageClassification.from_pretrained(fp_checkpoints["vit"])
    fp32_bytes = sum(get_linear_weight(module).numel() * 4 for module in find_quantizable_linears(model).values())
    quantized = quantize_tiny(fp_checkpoints["vit"], T.ViTForImageClassification, bits=4)
    quantized.save_pretrained(tmp_path)
    packed = grid = 0
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            size = handle.get_tensor(key).nbytes
            if key.endswith(".weight_packed"):
                packed += size
            elif key.endswith((".weight_scale", ".weight_zero_point", ".weight_shape")):
                grid += size
    assert packed * 8 == fp32_bytes  # codes: exactly 4/32 of the fp32 weights
    layers = [module for module in quantized.modules() if isinstance(module, COMQLinear)]
    rows = sum(layer.out_features for layer in layers)
    zero_words = sum(-(-layer.out_features * 4 // 32) for layer in layers)
    assert grid == rows * 4 + zero_words * 4 + len(layers) * 16  # fp32 scales, packed zero points, shapes


# --------------------------------------------------------------------------- bad checkpoints
def _tamper(path: str, edit) -> None:
    tensors = load_file(os.path.join(path, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _edit_scheme(path: str, edit) -> None:
    config_path = os.path.join(path, "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    edit(config["quantization_config"])
    with open(config_path, "w") as handle:
        json.dump(config, handle)


FC2 = "vit.encoder.layer.1.output.dense"  # legacy (saved) name of vit.layers.1.mlp.fc2


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop(f"{FC2}.weight_packed"), r"missing .*vit\.layers\.1\.mlp\.fc2\.weight_packed"),
        (lambda t: t.pop(f"{FC2}.weight_scale"), r"missing .*vit\.layers\.1\.mlp\.fc2\.weight_scale"),
        (lambda t: t.pop(f"{FC2}.weight_zero_point"), r"missing .*fc2\.weight_zero_point"),
        (
            lambda t: t.update({f"{FC2}.weight_packed": t[f"{FC2}.weight_packed"][:, :4].contiguous()}),
            r"fc2\.weight_packed .*shape \(32, 4\)",
        ),
        (
            lambda t: t.update({f"{FC2}.weight_scale": t[f"{FC2}.weight_scale"][:5].contiguous()}),
            r"fc2\.weight_scale .*shape \(5, 4\)",
        ),
        (
            lambda t: t.update({f"{FC2}.weight_zero_point": t[f"{FC2}.weight_zero_point"].float()}),
            r"fc2\.weight_zero_point .*dtype F32",
        ),
    ],
    ids=["missing-codes", "missing-scales", "missing-zero-points", "short-codes", "short-scales", "float-zeros"],
)
def test_broken_checkpoint_names_the_tensor(vit_quantized, tmp_path, edit, message):
    path = copy_checkpoint(vit_quantized[0], tmp_path / "broken")
    _tamper(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(path)


def test_scheme_with_other_bits_than_the_tensors_is_rejected(vit_quantized, tmp_path):
    path = copy_checkpoint(vit_quantized[0], tmp_path / "bits")
    _edit_scheme(path, lambda config: config["config_groups"]["group_0"]["weights"].update(num_bits=3))
    with pytest.raises(CheckpointError, match=r"q_proj\.weight_packed .*expected \(32, 3\).*bits=3"):
        load_quantized(path)


def test_scheme_claiming_symmetric_with_zero_points_stored_is_rejected(vit_quantized, tmp_path):
    path = copy_checkpoint(vit_quantized[0], tmp_path / "sym")
    _edit_scheme(path, lambda config: config["config_groups"]["group_0"]["weights"].update(symmetric=True))
    with pytest.raises(CheckpointError, match=r"weight_zero_point"):
        load_quantized(path)


def test_a_symmetric_checkpoint_storing_zero_points_of_zero_loads_as_without_them(fp_checkpoints, tmp_path):
    """Some compressed-tensors releases stored a zero point for every scheme, all zero when symmetric:
    plain transformers passes them over, and so does load_quantized; were the ignore list blamed for
    them, the checkpoint would not load."""
    model = quantize_tiny(fp_checkpoints["vit"], T.ViTForImageClassification, bits=4, group_size=16, symmetric=True)
    path = str(tmp_path / "sym")
    model.save_pretrained(path)

    def add_zero_points(tensors):
        for key in [key for key in tensors if key.endswith(".weight_scale")]:
            tensors[key.removesuffix("_scale") + "_zero_point"] = torch.zeros(tensors[key].shape, dtype=torch.int8)

    _tamper(path, add_zero_points)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(path)(pixel_values=pixels).logits, model(pixel_values=pixels).logits)
    _tamper(path, lambda tensors: tensors[next(k for k in tensors if k.endswith("_zero_point"))].fill_(1))
    with pytest.raises(CheckpointError, match=r"symmetric scheme, yet the checkpoint stores nonzero zero points"):
        load_quantized(path)


def test_packed_tensors_for_a_layer_the_scheme_ignores_are_rejected(vit_quantized, tmp_path):
    path = copy_checkpoint(vit_quantized[0], tmp_path / "skip")
    _edit_scheme(path, lambda config: config["ignore"].append("vit.layers.1.mlp.fc2"))
    with pytest.raises(CheckpointError, match=r"keeps in full precision.*output\.dense"):
        load_quantized(path)


def test_float_checkpoint_claiming_pack_quantized_is_rejected(fp_checkpoints, vit_quantized, tmp_path):
    path = copy_checkpoint(fp_checkpoints["vit"], tmp_path / "liar")
    config_path = os.path.join(path, "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    with open(os.path.join(vit_quantized[0], "config.json")) as handle:
        config["quantization_config"] = json.load(handle)["quantization_config"]
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    with pytest.raises(CheckpointError, match="no packed tensors"):
        load_quantized(path)


def test_unfilled_buffers_are_caught_after_loading(vit_quantized):
    path, model = vit_quantized
    loaded = load_quantized(path)
    scheme = loaded.config.quantization_config.packed_scheme()
    verify_quantized_model(loaded, scheme, check_loaded=True)
    layer = loaded.vit.layers[0].mlp.fc1
    layer.weight_packed = torch.zeros_like(layer.weight_packed)  # never loaded
    with pytest.raises(CheckpointError, match=r"vit\.layers\.0\.mlp\.fc1\.weight_packed is missing"):
        verify_quantized_model(loaded, scheme, check_loaded=True)


# --------------------------------------------------------------------------- loading guards
def test_load_quantized_picks_the_architecture_and_verifies(vit_quantized):
    path, model = vit_quantized
    loaded = load_quantized(path)
    assert type(loaded) is T.ViTForImageClassification
    assert torch.equal(run(loaded), run(model))
    check_quantized_model(loaded)


def test_load_quantized_moves_a_checkpoint_between_the_task_model_and_its_bare_model(fp_checkpoints, tmp_path):
    """As transformers does for a dense checkpoint: ``AutoModel`` on a classifier's checkpoint drops the
    ``bert.`` prefix, a task class on a bare model's checkpoint adds it and leaves its new head in float;
    the re-saved checkpoint's ignore list names the new class's layers, so it loads back."""
    classifier = quantize_tiny(fp_checkpoints["bert"], T.BertForSequenceClassification, bits=4)
    classifier.save_pretrained(tmp_path / "classifier")
    bare = load_quantized(tmp_path / "classifier", model_class=T.BertModel)
    inputs = model_inputs(classifier)
    assert torch.equal(bare(**inputs).last_hidden_state, classifier.bert(**inputs).last_hidden_state)
    bare.save_pretrained(tmp_path / "bare")
    assert json.loads((tmp_path / "bare" / "config.json").read_text())["quantization_config"]["ignore"] == ["pooler.dense"]

    task = load_quantized(tmp_path / "bare", model_class=T.BertForSequenceClassification)
    assert type(task.classifier) is nn.Linear and type(task.bert.pooler.dense) is nn.Linear
    assert torch.equal(task.bert(**inputs).last_hidden_state, classifier.bert(**inputs).last_hidden_state)
    task.save_pretrained(tmp_path / "task")
    stored = json.loads((tmp_path / "task" / "config.json").read_text())["quantization_config"]["ignore"]
    assert stored == ["bert.pooler.dense", "classifier"]
    reloaded = load_quantized(tmp_path / "task")
    assert torch.equal(run(reloaded), run(task))


def _compressed_tensors_checkpoint(source: str, target, dtype: torch.dtype) -> None:
    """A W4 group-32 pack-quantized checkpoint made by compressed-tensors' own API (as llm-compressor
    makes one), min-max scales, stored in the model's dtype."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs, QuantizationConfig, QuantizationScheme, QuantizationStatus, apply_quantization_config,
    )  # fmt: skip
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    model = T.LlamaForCausalLM.from_pretrained(source, dtype=dtype)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=16)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"g": scheme}, ignore=["lm_head"], format="pack-quantized"))
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            grouped = module.weight.detach().float().view(module.weight.shape[0], -1, 16)
            scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            module.weight_scale.data.copy_(scale)
            module.weight_zero_point.data.copy_(zero_point)
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(target)
    compressor.update_config(target)


def test_another_producers_checkpoint_with_bfloat16_scales_loads_as_plain_transformers_does(fp_checkpoints, tmp_path):
    """compressed-tensors writes scales in the model's dtype: a bf16 LLM's checkpoint has bf16 scales."""
    _compressed_tensors_checkpoint(fp_checkpoints["llama"], tmp_path / "ct", torch.bfloat16)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as handle:
        assert handle.get_slice("model.layers.0.mlp.up_proj.weight_scale").get_dtype() == "BF16"
    packed = load_quantized(tmp_path / "ct", dtype=torch.float32)
    assert packed.model.layers[0].mlp.up_proj.weight_scale.dtype == torch.float32
    dense = T.LlamaForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    torch.testing.assert_close(run(packed), run(dense), rtol=1e-5, atol=1e-6)


def test_another_producers_checkpoint_saved_again_claims_no_comq_settings(fp_checkpoints, tmp_path):
    """Loaded with load_quantized and saved again, another tool's checkpoint gets neither a ``comq``
    record of settings that never ran nor a card saying COMQ made it; it still loads back packed."""
    _compressed_tensors_checkpoint(fp_checkpoints["llama"], tmp_path / "ct", torch.float32)
    loaded = load_quantized(tmp_path / "ct")
    loaded.save_pretrained(tmp_path / "again")
    stored = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert "comq" not in stored and stored["quant_method"] == "compressed-tensors"
    assert not (tmp_path / "again" / "README.md").exists()
    assert torch.equal(run(load_quantized(tmp_path / "again")), run(loaded))
    quantize_tiny(fp_checkpoints["llama"], T.LlamaForCausalLM).save_pretrained(tmp_path / "comq")
    assert "comq" in json.loads((tmp_path / "comq" / "config.json").read_text())["quantization_config"]
    assert (tmp_path / "comq" / "README.md").exists()


def test_a_checkpoint_saved_in_a_legacy_layout_with_layers_kept_in_float_loads_back(tmp_path):
    """Llava saves its keys in the older layout (``vision_tower.``, ``language_model.model.``) and keeps
    its vision tower in float when calibrated on text; the ignore list names the loaded model's layers."""
    torch.manual_seed(0)
    vision = T.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64)  # fmt: skip
    text = T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, pad_token_id=0)  # fmt: skip
    T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=vision, text_config=text, image_token_id=63)).save_pretrained(
        tmp_path / "fp"
    )
    ids = torch.randint(0, 60, (4, 6))
    config = COMQConfig(bits=8, dataset=[{"input_ids": row[None]} for row in ids], num_samples=4, **ROUND_TO_NEAREST)
    model = T.LlavaForConditionalGeneration.from_pretrained(tmp_path / "fp", quantization_config=config)
    assert not any(isinstance(module, COMQLinear) for module in model.model.vision_tower.modules())
    model.save_pretrained(tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    bare = load_quantized(tmp_path / "q", model_class=T.LlavaModel)  # what AutoModel gives, under legacy names too
    assert torch.equal(bare(input_ids=ids).last_hidden_state, model.model(input_ids=ids).last_hidden_state)


def test_a_model_loaded_from_the_working_folder_records_its_name_and_loads_back(fp_checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(fp_checkpoints["llama"])
    model = quantize_tiny(".", T.LlamaForCausalLM)
    model.save_pretrained(tmp_path / "q")
    stored = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["comq"]
    assert stored["base_model_folder"] == "llama"
    assert torch.equal(run(load_quantized(tmp_path / "q")), run(model))


def test_trainer_asks_for_adapters_on_a_packed_model(fp_checkpoints, tmp_path):
    """Trainer's check said COMQ did not support training and to open a transformers issue; adapters on
    the full-precision modules do train through the packed layers."""
    from transformers.trainer_utils import validate_quantization_for_training

    quantize_tiny(fp_checkpoints["llama"], T.LlamaForCausalLM).save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="Please attach trainable adapters on top of the quantized model"):
        validate_quantization_for_training(load_quantized(tmp_path / "q"))


def test_a_model_loaded_from_the_hub_cache_records_its_hub_id(fp_checkpoints, tmp_path):
    """A ``snapshot_download`` folder is the Hub model, not a local checkpoint named after its commit
    hash (which the card showed as the title, with no ``base_model`` metadata)."""
    snapshot = tmp_path / "hub" / "models--someorg--tiny-llama" / "snapshots" / ("0123456789abcdef" * 2 + "01234567")
    shutil.copytree(fp_checkpoints["llama"], snapshot)
    quantize_tiny(snapshot, T.LlamaForCausalLM, hf_comq_version="0.0.9").save_pretrained(tmp_path / "q")  # as a
    # config read from another checkpoint names its maker: quantizing again records the running version
    stored = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["comq"]
    assert stored["base_model"] == "someorg/tiny-llama" and stored["base_model_folder"] is None
    assert stored["hf_comq_version"] == hf_comq.__version__
    assert "base_model: someorg/tiny-llama" in (tmp_path / "q" / "README.md").read_text()


def test_load_quantized_leaves_the_layers_another_class_adds_in_float(fp_checkpoints, tmp_path):
    """As plain transformers does: a causal LM's checkpoint as a sequence classifier (a new ``score``), a
    classifier's as the bare ViTModel (a new pooler), the full T5's as its encoder (the decoder dropped);
    what the checkpoint holds packed stays packed, the rest is the new class's own, in float."""
    quantize_tiny(fp_checkpoints["llama"], T.LlamaForCausalLM).save_pretrained(tmp_path / "lm")
    classifier = load_quantized(tmp_path / "lm", model_class=T.LlamaForSequenceClassification)
    assert type(classifier.score) is nn.Linear and isinstance(classifier.model.layers[0].mlp.up_proj, COMQLinear)
    dense = T.LlamaForSequenceClassification.from_pretrained(tmp_path / "lm")  # plain transformers, dequantized
    inputs = model_inputs(classifier)
    assert torch.equal(classifier.model(**inputs).last_hidden_state, dense.model(**inputs).last_hidden_state)

    quantize_tiny(fp_checkpoints["vit"], T.ViTForImageClassification).save_pretrained(tmp_path / "vit")
    bare = load_quantized(tmp_path / "vit", model_class=T.ViTModel)
    assert type(bare.pooler.dense) is nn.Linear
    t5 = T.T5ForConditionalGeneration(T.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                                  decoder_start_token_id=0))  # fmt: skip
    t5.save_pretrained(tmp_path / "t5-fp")
    quantize_tiny(tmp_path / "t5-fp", T.T5ForConditionalGeneration).save_pretrained(tmp_path / "t5")
    encoder = load_quantized(tmp_path / "t5", model_class=T.T5EncoderModel)
    assert isinstance(encoder.encoder.block[0].layer[1].DenseReluDense.wi, COMQLinear)
    encoder.save_pretrained(tmp_path / "t5-encoder")  # its ignore list names its own layers: it loads back
    assert torch.equal(run(load_quantized(tmp_path / "t5-encoder")), run(encoder))


def test_load_quantized_applies_config_overrides_as_from_pretrained_does(vit_quantized):
    loaded = load_quantized(vit_quantized[0], output_hidden_states=True, dtype=torch.float32)
    assert loaded.config.output_hidden_states is True
    assert len(loaded(**model_inputs(loaded)).hidden_states) == loaded.config.num_hidden_layers + 1


def test_load_quantized_rejects_a_mismatching_config(vit_quantized):
    with pytest.raises(CheckpointError, match=r"bits: checkpoint 4 vs passed 3.*group_size: checkpoint 16 vs passed None"):
        load_quantized(vit_quantized[0], quantization_config=COMQConfig(bits=3))
    assert isinstance(load_quantized(vit_quantized[0], quantization_config=COMQConfig(group_size=16)), nn.Module)


def test_from_pretrained_of_a_quantized_checkpoint_with_a_comq_config_fails(vit_quantized):
    """Re-quantizing a quantized checkpoint is refused by transformers itself, not silently ignored."""
    with pytest.raises(ValueError, match="quantized with CompressedTensorsConfig but you are passing a COMQConfig"):
        T.ViTForImageClassification.from_pretrained(vit_quantized[0], quantization_config=COMQConfig(bits=2))


def test_load_quantized_rejects_a_plain_checkpoint(fp_checkpoints):
    with pytest.raises(CheckpointError, match="not a compressed-tensors pack-quantized checkpoint"):
        load_quantized(fp_checkpoints["vit"])


def test_check_quantized_model_rejects_a_dense_load(vit_quantized):
    dense = T.ViTForImageClassification.from_pretrained(vit_quantized[0])  # plain transformers: dequantized
    assert torch.equal(run(dense), run(vit_quantized[1]))
    with pytest.raises(CheckpointError, match="not loaded with packed layers"):
        check_quantized_model(dense)


# --------------------------------------------------------------------------- quantize on load
def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None) -> QuantizedWeight:
    """Round-to-nearest on an asymmetric min-max grid: a valid solver result, built without the solver."""
    out_features, in_features = weight.shape
    size = group_size or in_features
    groups = weight.detach().float().reshape(out_features, in_features // size, size)
    low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = ((high - low) / (2**bits - 1)).clamp(min=1e-8)
    zero = torch.round(-low / scale)
    codes = torch.clamp(torch.round(groups / scale[..., None]) + zero[..., None], 0, 2**bits - 1)
    return QuantizedWeight(
        codes=codes.reshape(out_features, in_features).to(torch.uint8), scale=scale, zero_point=zero, bits=bits,
        group_size=group_size, dtype=weight.dtype,
    )  # fmt: skip


@pytest.fixture
def fake_calibration(monkeypatch):
    """Stand-in for hf_comq.calibration: quantizes every target but one layer, as calibration may skip layers."""
    calls = []

    def quantize_model(model, config, data=None):
        calls.append(config)
        for name, module in find_quantizable_linears(model, config.modules_to_not_convert).items():
            if name.endswith("layers.1.mlp.fc2"):
                continue  # "never ran on the calibration data"
            replace_module(model, name, rtn_quantize(get_linear_weight(module), config.bits, config.group_size))
        return {"layers_quantized": 11, "num_samples": 2}

    module = types.ModuleType("hf_comq.calibration")
    module.quantize_model = quantize_model
    module.build_calibration_data = lambda model, config, checkpoint_folder=None: None
    monkeypatch.setitem(sys.modules, "hf_comq.calibration", module)
    return calls


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"dataset_column": "txt"}, r"dataset column 'txt' does not exist; available columns: \['text'\]"),
        ({"dataset": "dict", "dataset_split": "validation"}, r"split 'validation' not found in the DatasetDict"),
        ({"dataset": (text for text in ["the cat"])}, "dataset: got a generator, which can be read only once"),
        ({"dataset": images(2)}, "the calibration data is images, but LlamaForCausalLM.forward takes no pixel_values"),
    ],
)
def test_data_mistakes_are_one_line_before_the_weights_load(fp_checkpoints, monkeypatch, settings, message):
    """The data is built from the model's class and config while its weights are still to be loaded
    (for a Hub id: downloaded), so a data mistake costs no load."""
    import datasets

    loaded = []
    monkeypatch.setattr(COMQHfQuantizer, "_process_model_after_weight_loading", lambda self, model, **kw: loaded.append(1))
    texts = datasets.Dataset.from_dict({"text": ["the cat sat", "a dog ran"]})
    settings = {"dataset": texts, **settings}
    if settings["dataset"] == "dict":
        settings["dataset"] = datasets.DatasetDict({"train": texts})
    with pytest.raises(ValueError, match=message):
        T.LlamaForCausalLM.from_pretrained(
            fp_checkpoints["llama"], quantization_config=COMQConfig(processor=word_tokenizer(), **settings)
        )
    assert loaded == []


@pytest.mark.parametrize(
    "arch, settings, message",
    [
        ("llama", {"dataset": torch.randint(60, 200, (4, 8))}, r"token id \d+, but LlamaForCausalLM's input embedding has 64 rows"),
        ("llama", {"dataset": "floats"}, r"column 'input_ids' must hold lists of integer token ids"),
        ("llama", {"dataset": "short mask"}, r"column 'attention_mask' must hold one entry per token of input_ids"),
        ("llama", {"dataset": torch.randint(0, 64, (4, 8)), "block_name": "model.blocks"},
         r"block_name='model.blocks' does not name a submodule of LlamaForCausalLM"),
        ("vit", {"dataset": torch.randn(4, 1, 32, 32)}, r"pixel_values tensor has 1 channels .* takes 3 \(config.num_channels\)"),
    ],
)  # fmt: skip
def test_data_mistakes_in_a_first_batch_are_one_line_before_the_weights_load(fp_checkpoints, monkeypatch, arch, settings,
                                                                             message):  # fmt: skip
    """Mistakes that only encoding a batch shows (or the model's structure): found in the calibration pass
    before, after every weight had loaded."""
    import datasets

    loaded = []
    monkeypatch.setattr(COMQHfQuantizer, "_process_model_after_weight_loading", lambda self, model, **kw: loaded.append(1))
    rows = {"floats": {"input_ids": [[1.0, 2.0], [3.0, 4.0]]}, "short mask": {"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1]]}}
    if isinstance(settings["dataset"], str):
        settings = {**settings, "dataset": datasets.Dataset.from_dict(rows[settings["dataset"]])}
    model_class = T.LlamaForCausalLM if arch == "llama" else T.ViTForImageClassification
    with pytest.raises(ValueError, match=message):
        model_class.from_pretrained(fp_checkpoints[arch], quantization_config=COMQConfig(**settings))
    assert loaded == []


def test_quantize_on_load_records_skipped_layers_and_round_trips(fp_checkpoints, fake_calibration, tmp_path):
    config = COMQConfig(bits=3, group_size=32, dataset=torch.zeros(2, 3, 32, 32))
    model = T.ViTForImageClassification.from_pretrained(fp_checkpoints["vit"], quantization_config=config)
    assert len(fake_calibration) == 1
    assert type(model.vit.layers[1].mlp.fc2) is nn.Linear
    assert isinstance(model.vit.layers[0].mlp.fc2, COMQLinear) and model.vit.layers[0].mlp.fc2.bits == 3
    recorded = model.config.quantization_config
    assert recorded.ignore == ["classifier", "vit.layers.1.mlp.fc2"]
    assert recorded.layer_type == "Linear" and recorded.calibration_samples == 2
    assert config.ignore is None  # the user's object can be reused for another model
    assert recorded.dataset is None and config.dataset is not None  # the model keeps the record, the caller the data
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored["ignore"] == ["classifier", "vit.layers.1.mlp.fc2"]
    calibration = stored["comq"]["calibration"]
    assert calibration["dataset"] is None and "tensor of shape (2, 3, 32, 32)" in calibration["description"]
    for reloaded in (load_quantized(tmp_path), T.ViTForImageClassification.from_pretrained(tmp_path)):
        assert type(reloaded.vit.layers[1].mlp.fc2) is nn.Linear
        assert torch.equal(run(reloaded), run(model))


def test_model_without_quantizable_layers_fails_before_calibration(fp_checkpoints, fake_calibration):
    config = COMQConfig(modules_to_not_convert=["vit", "classifier"])
    with pytest.raises(ValueError, match="no nn.Linear/Conv1D layer to quantize"):
        T.ViTForImageClassification.from_pretrained(fp_checkpoints["vit"], quantization_config=config)
    assert fake_calibration == []


def test_group_size_that_does_not_divide_fails_before_calibration(fp_checkpoints, fake_calibration):
    with pytest.raises(ValueError, match="group_size=24 does not divide"):
        T.ViTForImageClassification.from_pretrained(fp_checkpoints["vit"], quantization_config=COMQConfig(group_size=24))
    assert fake_calibration == []


def test_a_model_mixing_linear_and_conv1d_layers_fails_before_calibration(fake_calibration):
    with pytest.raises(ValueError, match="both nn.Linear and transformers Conv1D"):
        hf_comq.checkpoint.layer_type_of({"a": nn.Linear(4, 4), "b": Conv1D(4, 4)})


# --------------------------------------------------------------------------- dequantize
def test_dequantize_restores_float_layers(fp_checkpoints, tmp_path):
    quantize_tiny(fp_checkpoints["gpt2"], T.GPT2LMHeadModel).save_pretrained(tmp_path / "q")
    model = load_quantized(tmp_path / "q")
    quantized_logits = run(model)
    model = model.dequantize()
    assert not any(isinstance(module, COMQLinear) for module in model.modules())
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D
    assert not hasattr(model.config, "quantization_config")
    torch.testing.assert_close(run(model), quantized_logits)
    model.save_pretrained(tmp_path / "float")
    plain = T.GPT2LMHeadModel.from_pretrained(tmp_path / "float")
    torch.testing.assert_close(run(plain), quantized_logits)


def test_dequantize_after_save_pretrained_keeps_the_loading_dtype(fp_checkpoints, tmp_path):
    # save_pretrained leaves config.dtype as a name, which transformers' dequantize hands on as the dtype
    model = quantize_tiny(fp_checkpoints["gpt2"], T.GPT2LMHeadModel)
    model.save_pretrained(tmp_path / "q")
    quantized_logits = run(model)
    model = model.dequantize()
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.float32
    torch.testing.assert_close(run(model), quantized_logits)


def test_a_model_cast_after_loading_dequantizes_in_its_new_dtype(fp_checkpoints, tmp_path):
    quantize_tiny(fp_checkpoints["llama"], T.LlamaForCausalLM).save_pretrained(tmp_path / "q")
    cast = load_quantized(tmp_path / "q").to(torch.bfloat16).dequantize()  # config.dtype still says float32
    cast_after = load_quantized(tmp_path / "q").dequantize().to(torch.bfloat16)
    assert {parameter.dtype for parameter in cast.parameters()} == {torch.bfloat16}
    assert torch.equal(run(cast), run(cast_after))
    asked = load_quantized(tmp_path / "q").to(torch.bfloat16).dequantize(torch.float16)
    assert asked.model.layers[0].self_attn.q_proj.weight.dtype == torch.float16  # a dtype asked for is kept


# --------------------------------------------------------------------------- properties over random settings
def _random_case(seed: int) -> dict:
    """A seeded draw of architecture, widths, bits, grouping, grid and dtype (hidden and MLP widths share divisors)."""
    import random

    rng = random.Random(seed)
    hidden = rng.choice([16, 32, 48])
    return {
        "arch": rng.choice(["vit", "llama", "gpt2"]),
        "hidden": hidden,
        "intermediate": hidden * rng.choice([1, 2, 3]),
        "bits": rng.randint(2, 8),
        "group_size": rng.choice([None, 8, 16]),
        "symmetric": rng.random() < 0.5,
        "dtype": rng.choice([torch.float32, torch.bfloat16, torch.float16]),
    }


def _build(case: dict) -> nn.Module:
    torch.manual_seed(0)
    hidden, intermediate = case["hidden"], case["intermediate"]
    if case["arch"] == "vit":
        config = T.ViTConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=intermediate, image_size=32, patch_size=8, num_labels=3)  # fmt: skip
        return T.ViTForImageClassification(config)
    if case["arch"] == "gpt2":
        config = T.GPT2Config(vocab_size=64, n_embd=hidden, n_layer=2, n_head=2, n_inner=intermediate,
                              bos_token_id=0, eos_token_id=0)  # fmt: skip
        return T.GPT2LMHeadModel(config)
    config = T.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=0,
                           pad_token_id=None)  # fmt: skip
    return T.LlamaForCausalLM(config)


def _quantize_case(case: dict, folder) -> nn.Module:
    model = _build(case)
    if case["group_size"] is not None and case["hidden"] % case["group_size"]:
        case["group_size"] = None
    model.save_pretrained(folder)
    calibration = model_inputs(model, count=8, seed=1).popitem()[1]
    config = COMQConfig(bits=case["bits"], group_size=case["group_size"], symmetric=case["symmetric"],
                        dataset=calibration, num_samples=8, batch_size=4)  # fmt: skip
    return type(model).from_pretrained(folder, dtype=case["dtype"], quantization_config=config).eval()


@pytest.mark.parametrize("seed", range(10))
def test_random_settings_save_and_reload_to_identical_outputs(seed, tmp_path):
    case = _random_case(seed)
    model = _quantize_case(case, tmp_path / "fp")
    expected = run(model)
    model.save_pretrained(tmp_path / "q")
    packed = load_quantized(tmp_path / "q", dtype=case["dtype"])
    assert torch.equal(run(packed), expected), case
    dense = type(model).from_pretrained(tmp_path / "q", dtype=case["dtype"])  # compressed-tensors, no hf_comq code
    # Same dequantized weights; in float32 only the summation order differs (the packed layer's
    # kernel vs the dense GEMM), bit-exactness against the exact path is tested in
    # tests/test_plain_transformers.py.
    fp32 = case["dtype"] == torch.float32
    torch.testing.assert_close(run(dense), expected, rtol=1e-5 if fp32 else 0, atol=1e-6 if fp32 else 1e-2)


@pytest.mark.parametrize("seed", [0, 3])
def test_the_same_settings_and_seed_give_a_byte_identical_checkpoint(seed, tmp_path):
    case = _random_case(seed)
    for run_name in ("first", "second"):  # same folder names: the card and config.json name them
        _quantize_case(dict(case), tmp_path / run_name / "fp").save_pretrained(tmp_path / run_name / "q")
    first, second = sorted((tmp_path / "first" / "q").iterdir()), sorted((tmp_path / "second" / "q").iterdir())
    assert [path.name for path in first] == [path.name for path in second]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_a_mixture_of_experts_loads_its_experts_straight_into_per_expert_layers(tmp_path, monkeypatch):
    """The checkpoint names experts one by one: they load into per-expert layers, never merged into batched
    tensors (which transformers builds in memory, budget or not), and quantize as the loaded model would."""
    from hf_comq.calibration import quantize_model
    from hf_comq.checkpoint import stores_experts_per_expert
    from hf_comq.nn import UnfusedExperts

    tiny_model("mixtral").save_pretrained(tmp_path / "mixtral")
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    assert stores_experts_per_expert([tmp_path / "mixtral" / "model.safetensors"], ("w1", "w3", "w2"))
    assert not stores_experts_per_expert([tmp_path / "mixtral" / "model.safetensors"], ("gate_proj", "up_proj", "w2"))
    assert not stores_experts_per_expert([tmp_path / "llama" / "model.safetensors"], ("w1", "w3", "w2"))
    merged = []
    original = UnfusedExperts.from_batched
    monkeypatch.setattr(UnfusedExperts, "from_batched", lambda *args: merged.append(1) or original(*args))
    data = torch.randint(1, 64, (8, 12))
    config = COMQConfig(bits=4, dataset=data, seed=0)
    loaded = T.MixtralForCausalLM.from_pretrained(tmp_path / "mixtral", quantization_config=config)
    assert not merged and isinstance(loaded.model.layers[0].mlp.experts, UnfusedExperts)
    in_memory = tiny_model("mixtral")
    quantize_model(in_memory, COMQConfig(bits=4, dataset=data, seed=0))
    assert merged  # a model already in memory has its batched experts split
    expected = in_memory.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name



def test_settings_read_from_another_checkpoint_record_this_quantization_not_that_one(fp_checkpoints, tmp_path):
    """A config from ``COMQConfig.from_dict`` of a checkpoint's quantization_config names that checkpoint's
    base model (and, for another tool's checkpoint, no COMQ record): quantizing a local folder with it
    recorded the other base model (card metadata and link too) or saved no COMQ record and no card."""
    model = quantize_tiny(fp_checkpoints["llama"], T.LlamaForCausalLM, base_model="someorg/other-model", other_producer=True)
    model.save_pretrained(tmp_path / "q")
    stored = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["comq"]
    assert stored["base_model"] is None and stored["base_model_folder"] == "llama"
    card = (tmp_path / "q" / "README.md").read_text()
    assert "someorg/other-model" not in card


def test_a_quantized_model_does_not_keep_the_callers_calibration_data_alive(fp_checkpoints):
    """The model's config shared the caller's dataset object (and its processor) for the model's life,
    and a pickle of the model carried the data; the caller's own config keeps its objects."""
    import gc
    import pickle
    import weakref

    from tests.tiny import model_inputs

    probe = T.ViTForImageClassification.from_pretrained(fp_checkpoints["vit"])
    data = model_inputs(probe, count=8, seed=1).popitem()[1]
    config = COMQConfig(dataset=data, num_samples=8, iterations=1)
    model = T.ViTForImageClassification.from_pretrained(fp_checkpoints["vit"], quantization_config=config)
    assert config.dataset is data  # the caller's config is the caller's
    recorded = model.config.quantization_config
    assert recorded.dataset is None and recorded.processor is None and recorded.calibration_description
    held = weakref.ref(data)
    del data, config, probe
    gc.collect()
    assert held() is None
    assert len(pickle.dumps(recorded)) < 100_000


def test_the_models_own_tokenizer_is_the_one_beside_the_weights_it_loads(tmp_path):
    """``subfolder=`` (and a ``revision=``'s snapshot) put the weights in a folder other than ``name_or_path``:
    the tokenizer was looked for in the root, where there was none (or another model's)."""
    from hf_comq import calibration_summary
    from tests.tiny import sentences

    tiny_model("llama").save_pretrained(tmp_path / "inner")
    word_tokenizer().save_pretrained(tmp_path / "inner")
    config = COMQConfig(dataset=sentences(8), num_samples=8, batch_size=4, group_size=16)
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path, subfolder="inner", quantization_config=config)
    assert calibration_summary(model)["num_samples"] == 8


def test_load_quantized_gives_a_new_head_with_ignore_mismatched_sizes(vit_quantized):
    """The transformers way to a head of another size: the full-precision head's mismatch was refused as a
    damaged checkpoint; the packed layers must still fit."""
    model = load_quantized(vit_quantized[0], num_labels=5, ignore_mismatched_sizes=True)
    assert model.classifier.out_features == 5
    assert isinstance(model.vit.layers[0].mlp.fc1, COMQLinear)


def test_a_remote_code_checkpoint_loads_as_the_class_its_auto_map_names():
    """architectures[0] of a remote-code model is not a transformers class: the bare AutoModel was taken
    and a causal LM's head dropped without a word."""
    from transformers import PretrainedConfig

    from hf_comq.loading import _model_class_for

    config = PretrainedConfig(
        architectures=["RcForCausalLM"],
        auto_map={"AutoConfig": "modeling_rc.RcConfig", "AutoModel": "modeling_rc.RcModel",
                  "AutoModelForCausalLM": "modeling_rc.RcForCausalLM"},
    )  # fmt: skip
    assert _model_class_for(config) is T.AutoModelForCausalLM
    assert _model_class_for(PretrainedConfig(architectures=["LlamaForCausalLM"])) is T.LlamaForCausalLM
