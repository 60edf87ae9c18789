"""COMQHfQuantizer end to end: registration, save -> from_pretrained round trips, bad checkpoints, loading guards."""

import importlib
import json
import os
import sys
import types
import warnings

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
from hf_comq.loading import check_quantized_model, load_quantized
from hf_comq.modules import default_modules_to_not_convert, find_quantizable_linears
from hf_comq.nn import get_linear_weight
from hf_comq.quantizer import verify_quantized_model

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)

ARCHS = {
    "vit": (T.ViTForImageClassification, lambda: T.ViTConfig(**VIT, num_labels=3)),
    "bert": (T.BertModel, lambda: T.BertConfig(vocab_size=99, **TEXT)),
    "gpt2": (
        T.GPT2LMHeadModel,
        lambda: T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0),
    ),
    "llama": (T.LlamaForCausalLM, lambda: T.LlamaConfig(vocab_size=99, num_key_value_heads=1, **TEXT)),
}


def model_inputs(arch: str) -> dict:
    generator = torch.Generator().manual_seed(3)
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}
    return {"input_ids": torch.randint(0, 99, (2, 9), generator=generator)}


def run(model: nn.Module, arch: str) -> torch.Tensor:
    inputs = model_inputs(arch)
    dtype = next(model.parameters()).dtype
    inputs = {key: value.to(dtype) if value.is_floating_point() else value for key, value in inputs.items()}
    with torch.no_grad():
        output = model(**inputs)
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None) -> QuantizedWeight:
    """Round-to-nearest on an asymmetric min-max grid: a valid solver result, built without the solver.

    These tests are about storage and loading, not solution quality, so they skip the
    (slower) COMQ sweeps.
    """
    out_features, in_features = weight.shape
    size = group_size or in_features
    groups = weight.detach().float().reshape(out_features, in_features // size, size)
    low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = ((high - low) / (2**bits - 1)).clamp(min=1e-8)
    zero = torch.round(-low / scale)
    codes = torch.clamp(torch.round(groups / scale[..., None]) + zero[..., None], 0, 2**bits - 1)
    return QuantizedWeight(
        codes=codes.reshape(out_features, in_features).to(torch.uint8),
        scale=scale,
        zero_point=zero,
        bits=bits,
        group_size=group_size,
        dtype=weight.dtype,
    )


def hand_quantize(model: nn.Module, bits: int = 4, group_size: int | None = 16, skip_extra: tuple = ()) -> nn.Module:
    """What calibration does: quantize each target layer in place and record the config."""
    skip = default_modules_to_not_convert(model)
    for name, module in find_quantizable_linears(model, skip).items():
        if name not in skip_extra:
            replace_module(model, name, rtn_quantize(get_linear_weight(module), bits, group_size))
    model.config.quantization_config = COMQConfig(
        bits=bits, group_size=group_size, modules_to_not_convert=skip + list(skip_extra)
    )
    return model


@pytest.fixture(scope="module")
def fp_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp")
    paths = {}
    for arch, (cls, make_config) in ARCHS.items():
        torch.manual_seed(0)
        paths[arch] = str(root / arch)
        cls(make_config()).save_pretrained(paths[arch])
    return paths


@pytest.fixture(scope="module")
def vit_quantized(fp_checkpoints, tmp_path_factory):
    """A 4-bit, group-16 ViT checkpoint and the in-memory model it was saved from."""
    model = hand_quantize(T.ViTForImageClassification.from_pretrained(fp_checkpoints["vit"]))
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
    assert quantizer.is_trainable is False
    assert COMQHfQuantizer.requires_calibration is False


def test_disk_offload_is_rejected_for_calibration():
    quantizer = COMQHfQuantizer(COMQConfig(), pre_quantized=False)
    with pytest.raises(ValueError, match="disk"):
        quantizer.validate_environment(device_map={"vit": "cpu", "classifier": "disk"}, weights_only=True)


# --------------------------------------------------------------------------- pre-quantized round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_and_reload_gives_identical_outputs(arch, dtype, fp_checkpoints, tmp_path):
    cls, _ = ARCHS[arch]
    model = hand_quantize(cls.from_pretrained(fp_checkpoints[arch], dtype=dtype))
    before = run(model, arch)
    model.save_pretrained(tmp_path)

    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "comq" and stored["bits"] == 4 and stored["group_size"] == 16

    reloaded = cls.from_pretrained(tmp_path, dtype=dtype)
    assert isinstance(reloaded.hf_quantizer, COMQHfQuantizer)
    converted = [module for module in reloaded.modules() if isinstance(module, COMQLinear)]
    assert len(converted) == len([module for module in model.modules() if isinstance(module, COMQLinear)]) > 0
    assert all(layer.scales.dtype == torch.float32 for layer in converted)
    after = run(reloaded, arch)
    assert after.dtype == dtype
    assert torch.equal(before, after)


def test_gpt2_conv1d_layers_reload_as_comq_and_head_stays_float(fp_checkpoints, tmp_path):
    model = hand_quantize(T.GPT2LMHeadModel.from_pretrained(fp_checkpoints["gpt2"]))
    model.save_pretrained(tmp_path)
    reloaded = T.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert isinstance(reloaded.transformer.h[0].attn.c_attn, COMQLinear)
    assert reloaded.transformer.h[0].attn.c_attn.transposed_source
    assert type(reloaded.lm_head) is nn.Linear


def test_w4_checkpoint_is_an_eighth_of_fp32_plus_scales(fp_checkpoints, tmp_path):
    model = T.ViTForImageClassification.from_pretrained(fp_checkpoints["vit"])
    fp32_bytes = {name: get_linear_weight(module).numel() * 4 for name, module in find_quantizable_linears(model).items()}
    hand_quantize(model, bits=4, group_size=None).save_pretrained(tmp_path)
    packed = scales = 0
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            size = handle.get_tensor(key).nbytes
            if key.endswith(".qweight"):
                packed += size
            elif key.endswith((".scales", ".qzeros")):
                scales += size
    total_fp32 = sum(fp32_bytes.values())
    assert packed * 8 == total_fp32  # codes: exactly 4/32 of the fp32 weights
    rows = sum(module.out_features for module in model.modules() if isinstance(module, COMQLinear))
    assert scales == rows * 5  # per row: one float32 scale and one uint8 zero point


# --------------------------------------------------------------------------- bad checkpoints
def _tamper(path: str, edit) -> None:
    tensors = load_file(os.path.join(path, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _edit_config(path: str, edit) -> None:
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
        (lambda t: t.pop(f"{FC2}.qweight"), r"missing .*vit\.layers\.1\.mlp\.fc2\.qweight"),
        (lambda t: t.pop(f"{FC2}.scales"), r"missing .*vit\.layers\.1\.mlp\.fc2\.scales"),
        (lambda t: t.update({f"{FC2}.qweight": t[f"{FC2}.qweight"][:, :4].contiguous()}), r"fc2\.qweight .*shape \(32, 4\)"),
        (lambda t: t.update({f"{FC2}.scales": t[f"{FC2}.scales"][:5].contiguous()}), r"fc2\.scales .*shape \(5, 4\)"),
        (lambda t: t.update({f"{FC2}.qzeros": t[f"{FC2}.qzeros"].float()}), r"fc2\.qzeros .*dtype F32"),
    ],
    ids=["missing-codes", "missing-scales", "short-codes", "short-scales", "float-zeros"],
)
def test_broken_checkpoint_names_the_tensor(vit_quantized, tmp_path, edit, message):
    path = copy_checkpoint(vit_quantized[0], tmp_path / "broken")
    _tamper(path, edit)
    with pytest.raises(CheckpointError, match=message):
        T.ViTForImageClassification.from_pretrained(path)


def test_config_with_other_bits_than_the_tensors_is_rejected(vit_quantized, tmp_path):
    path = copy_checkpoint(vit_quantized[0], tmp_path / "bits")
    _edit_config(path, lambda config: config.update(bits=3))
    with pytest.raises(CheckpointError, match=r"q_proj\.qweight .*expected \(32, 3\).*bits=3"):
        T.ViTForImageClassification.from_pretrained(path)


def test_packed_tensors_for_a_layer_kept_in_float_are_rejected(vit_quantized, tmp_path):
    path = copy_checkpoint(vit_quantized[0], tmp_path / "skip")
    _edit_config(path, lambda config: config.update(modules_to_not_convert=["classifier", "layers.1.mlp.fc2"]))
    with pytest.raises(CheckpointError, match=r"keeps in full precision.*output\.dense"):
        T.ViTForImageClassification.from_pretrained(path)


def test_float_checkpoint_claiming_comq_is_rejected(fp_checkpoints, tmp_path):
    path = copy_checkpoint(fp_checkpoints["vit"], tmp_path / "liar")
    config_path = os.path.join(path, "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config["quantization_config"] = COMQConfig().to_dict()
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    with pytest.raises(CheckpointError, match="no COMQ packed tensors"):
        T.ViTForImageClassification.from_pretrained(path)


def test_unfilled_buffers_are_caught_after_loading(vit_quantized):
    path, model = vit_quantized
    loaded = T.ViTForImageClassification.from_pretrained(path)
    verify_quantized_model(loaded, loaded.config.quantization_config, check_loaded=True)
    loaded.vit.layers[0].mlp.fc1.qweight = torch.zeros_like(loaded.vit.layers[0].mlp.fc1.qweight)  # never loaded
    with pytest.raises(CheckpointError, match=r"vit\.layers\.0\.mlp\.fc1\.qweight is missing"):
        verify_quantized_model(loaded, loaded.config.quantization_config, check_loaded=True)


# --------------------------------------------------------------------------- loading guards
def test_load_quantized_picks_the_architecture_and_verifies(vit_quantized):
    path, model = vit_quantized
    loaded = load_quantized(path)
    assert type(loaded) is T.ViTForImageClassification
    assert torch.equal(run(loaded, "vit"), run(model, "vit"))


def test_load_quantized_rejects_a_mismatching_config(vit_quantized):
    with pytest.raises(CheckpointError, match=r"bits: checkpoint 4 vs passed 3.*group_size: checkpoint 16 vs passed None"):
        load_quantized(vit_quantized[0], quantization_config=COMQConfig(bits=3))
    assert isinstance(load_quantized(vit_quantized[0], quantization_config=COMQConfig(group_size=16)), nn.Module)


def test_from_pretrained_with_a_mismatching_config_warns_and_keeps_the_checkpoint_format(vit_quantized):
    path, model = vit_quantized
    with pytest.warns(UserWarning, match="quantization_config` from the model will be used"):
        loaded = T.ViTForImageClassification.from_pretrained(path, quantization_config=COMQConfig(bits=3))
    assert loaded.config.quantization_config.bits == 4
    assert torch.equal(run(loaded, "vit"), run(model, "vit"))


def test_load_quantized_rejects_a_plain_checkpoint(fp_checkpoints):
    with pytest.raises(CheckpointError, match="not a COMQ checkpoint"):
        load_quantized(fp_checkpoints["vit"])


def test_loading_without_the_plugin_is_detected(vit_quantized, monkeypatch):
    """transformers silently builds random Linears when "comq" is unknown; check_quantized_model catches it."""
    path, model = vit_quantized
    monkeypatch.delitem(quantizer_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "comq")
    monkeypatch.delitem(quantizer_auto.AUTO_QUANTIZER_MAPPING, "comq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = T.ViTForImageClassification.from_pretrained(path)
    assert not any(isinstance(module, COMQLinear) for module in plain.modules())
    assert not torch.allclose(run(plain, "vit"), run(model, "vit"))  # the silent failure
    with pytest.raises(CheckpointError, match="loaded without hf_comq"):
        check_quantized_model(plain)


# --------------------------------------------------------------------------- quantize on load
@pytest.fixture
def fake_calibration(monkeypatch):
    """Stand-in for hf_comq.calibration: quantizes every target but one layer, as calibration may skip layers."""
    calls = []

    def quantize_model(model, config):
        calls.append(config)
        for name, module in find_quantizable_linears(model, config.modules_to_not_convert).items():
            if name.endswith("layers.1.mlp.fc2"):
                continue  # "never ran on the calibration data"
            replace_module(model, name, rtn_quantize(get_linear_weight(module), config.bits, config.group_size))
        return {"layers_quantized": 11}

    module = types.ModuleType("hf_comq.calibration")
    module.quantize_model = quantize_model
    monkeypatch.setitem(sys.modules, "hf_comq.calibration", module)
    return calls


def test_quantize_on_load_records_skipped_layers_and_round_trips(fp_checkpoints, fake_calibration, tmp_path):
    config = COMQConfig(bits=3, group_size=32, dataset=torch.zeros(2, 3, 32, 32))
    model = T.ViTForImageClassification.from_pretrained(fp_checkpoints["vit"], quantization_config=config)
    assert len(fake_calibration) == 1
    assert type(model.vit.layers[1].mlp.fc2) is nn.Linear
    assert isinstance(model.vit.layers[0].mlp.fc2, COMQLinear) and model.vit.layers[0].mlp.fc2.bits == 3
    assert model.config.quantization_config.modules_to_not_convert == ["classifier", "vit.layers.1.mlp.fc2"]
    assert config.modules_to_not_convert is None  # the user's object can be reused for another model
    assert model.config.quantization_config.dataset is config.dataset  # shared, not copied
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored["dataset"] is None and "tensor of shape (2, 3, 32, 32)" in stored["calibration_description"]
    reloaded = T.ViTForImageClassification.from_pretrained(tmp_path)
    assert type(reloaded.vit.layers[1].mlp.fc2) is nn.Linear
    assert torch.equal(run(reloaded, "vit"), run(model, "vit"))


def test_model_without_quantizable_layers_fails_before_calibration(fp_checkpoints, fake_calibration):
    config = COMQConfig(modules_to_not_convert=["vit", "classifier"])
    with pytest.raises(ValueError, match="no nn.Linear/Conv1D layer to quantize"):
        T.ViTForImageClassification.from_pretrained(fp_checkpoints["vit"], quantization_config=config)
    assert fake_calibration == []


def test_group_size_that_does_not_divide_fails_before_calibration(fp_checkpoints, fake_calibration):
    with pytest.raises(ValueError, match="group_size=24 does not divide"):
        T.ViTForImageClassification.from_pretrained(fp_checkpoints["vit"], quantization_config=COMQConfig(group_size=24))
    assert fake_calibration == []


# --------------------------------------------------------------------------- dequantize
def test_dequantize_restores_float_layers(fp_checkpoints, tmp_path):
    hand_quantize(T.GPT2LMHeadModel.from_pretrained(fp_checkpoints["gpt2"])).save_pretrained(tmp_path / "q")
    model = T.GPT2LMHeadModel.from_pretrained(tmp_path / "q")
    quantized_logits = run(model, "gpt2")
    model = model.dequantize()
    assert not any(isinstance(module, COMQLinear) for module in model.modules())
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D
    assert not hasattr(model.config, "quantization_config")
    torch.testing.assert_close(run(model, "gpt2"), quantized_logits)
    model.save_pretrained(tmp_path / "float")
    plain = T.GPT2LMHeadModel.from_pretrained(tmp_path / "float")
    torch.testing.assert_close(run(plain, "gpt2"), quantized_logits)
