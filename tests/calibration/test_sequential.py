"""Block-sequential COMQ: what the Hessian hooks see, accuracy, devices/offload, bad input."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import accelerate
import datasets
import transformers as T
import pytest
import torch
from torch import nn

from hf_comq.calibration import calibration_mode, calibration_summary, quantize_model
from hf_comq.calibration.blocks import find_block_groups
from hf_comq.config import COMQConfig
from hf_comq.modules import find_quantizable_linears
from hf_comq.nn import COMQLinear, get_linear_weight
from hf_comq.packing import unpack_codes
from hf_comq.solver import comq_quantize
from hf_comq.threads import thread_priority_is_per_thread

from tests.solver.reference import ledoit_wolf_ridge
from tests.tiny import image_processor, images, sentences, tiny_model, tiny_vit, word_tokenizer

TEXT_MODELS = ("bert", "gpt2", "llama")


def _inputs(kind: str, count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    if kind in TEXT_MODELS:
        encoded = word_tokenizer()(sentences(count, seed), return_tensors="pt", padding=True)
        keys = ("input_ids", "attention_mask", "token_type_ids") if kind == "bert" else ("input_ids", "attention_mask")
        return {key: encoded[key] for key in keys if key in encoded}
    return dict(image_processor()(images=images(count, seed=seed), return_tensors="pt"))


def _config(kind: str, count: int = 8, **kwargs) -> COMQConfig:
    data = sentences(count) if kind in TEXT_MODELS else images(count)
    processor = word_tokenizer() if kind in TEXT_MODELS else image_processor()
    kwargs.setdefault("batch_size", 4)
    return COMQConfig(dataset=data, processor=processor, num_samples=count, **kwargs)


def _first_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _recording_solver_with_weights() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Callable]:
    """A layer solver that records each ``(weight, Gram matrix)`` it is given, then runs COMQ."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(weight, hessian, **kwargs):
        calls.append((weight.clone(), hessian.clone()))
        return comq_quantize(weight, hessian, **kwargs)

    return calls, recording


def _recording_solver() -> tuple[dict[int, torch.Tensor], Callable]:
    """A layer solver that records each layer's Hessian, in order, and then runs COMQ."""
    seen: dict[int, torch.Tensor] = {}

    def recording(weight, hessian, **kwargs):
        seen[len(seen)] = hessian.clone()
        return comq_quantize(weight, hessian, **kwargs)

    return seen, recording


def _layer_inputs(model: nn.Module, names: list[str], inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each named layer's inputs on one forward pass of ``model`` (unpadded tokens only, float64)."""
    seen = {}
    mask = inputs.get("attention_mask")

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().double()
            seen[name] = x[mask.bool()] if mask is not None else x.reshape(-1, x.shape[-1])

        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return seen


def _fp_hessians(model: nn.Module, names: list[str], inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference Gram matrices of the full-precision model's layer inputs (unpadded tokens only)."""
    return {name: x.T @ x for name, x in _layer_inputs(model, names, inputs).items()}


# ---------------------------------------------------------------- every architecture


class _Projection(nn.Module):
    def __init__(self, in_features: int):
        super().__init__()
        self.fc = nn.Linear(in_features, 4)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(features))


class _PerScaleProjections(nn.Module):
    """A segmentation head's or a depth neck's shape: a ModuleList of one projection per feature map."""

    main_input_name = "pixel_values"

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.projections = nn.ModuleList([_Projection(8), _Projection(16)])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.stem(pixel_values)
        return self.projections[0](features) + self.projections[1](torch.cat([features, features], -1))


def test_a_list_of_per_scale_modules_found_as_blocks_is_calibrated_layer_by_layer(caplog):
    """Found as blocks, but each member takes its own input: run back to back they failed on a shape
    mismatch (or would have fed each the wrong input); their layers are calibrated one by one."""
    torch.manual_seed(0)
    model = _PerScaleProjections().eval()
    assert [group.name for group in find_block_groups(model)] == ["projections"]
    pixels = torch.randn(16, 1, 5, 8)
    with torch.no_grad():
        reference = model(pixels)
    with caplog.at_level(logging.INFO, logger="hf_comq"):
        summary = quantize_model(model, COMQConfig(bits=8, dataset=pixels, num_samples=16))
    assert "projections is not a list of blocks run back to back" in caplog.text
    assert isinstance(model.projections[1].fc, COMQLinear) and summary["layers_skipped"] == {}
    with torch.no_grad():
        assert _relative(model(pixels), reference) < 0.02


def test_a_process_a_launcher_started_without_joining_its_group_is_warned(monkeypatch, caplog):
    """Under torchrun, from_pretrained without join_launcher_group() calibrated on everything in every
    process, silently, each writing the same files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.WARNING):
        quantize_model(tiny_model("llama"), _config("llama", count=2, bits=8))
    assert "one of 2 a launcher started (WORLD_SIZE), but no torch.distributed group" in caplog.text
    assert "join_launcher_group()" in caplog.text


def test_an_encoder_decoder_without_its_own_decoder_input_maker_runs_its_decoder_on_the_text_shifted_right():
    """M2M100 (like the bare T5Model) has no prepare_decoder_input_ids_from_labels and stopped inside its
    forward; its decoder now sees the calibration text shifted right by decoder_start_token_id."""
    torch.manual_seed(0)
    config = T.M2M100Config(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                            pad_token_id=1, decoder_start_token_id=2, eos_token_id=2, bos_token_id=0)  # fmt: skip
    model = T.M2M100ForConditionalGeneration(config).eval()
    ids = torch.randint(3, 64, (4, 9))
    summary = quantize_model(model, COMQConfig(bits=8, dataset=[{"input_ids": row[None]} for row in ids], num_samples=4))
    assert summary["layers_skipped"] == {}
    assert isinstance(model.model.decoder.layers[0].fc1, COMQLinear)


def test_an_encoder_decoder_given_no_text_for_its_decoder_is_told_to_pass_decoder_input_ids():
    config = T.WhisperConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                             decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                             max_source_positions=16, max_target_positions=16, decoder_start_token_id=1, pad_token_id=0)  # fmt: skip
    model = T.WhisperForConditionalGeneration(config).eval()
    features = [{"input_features": torch.randn(1, 8, 32)} for _ in range(2)]
    with pytest.raises(ValueError, match="no text to run its decoder on: pass dicts that also hold decoder_input_ids"):
        quantize_model(model, COMQConfig(bits=8, dataset=features, num_samples=2))
    transcribed = [{**row, "labels": torch.tensor([[5, 6, 7]])} for row in features]  # a processed ASR dataset's rows
    assert quantize_model(model, COMQConfig(bits=8, dataset=transcribed, num_samples=2))["layers_skipped"] == {}
    bare = T.WhisperModel(config).eval()  # its forward takes no labels: the line offers what it takes
    with pytest.raises(ValueError, match=r"pass dicts that also hold decoder_input_ids \(e.g."):
        quantize_model(bare, COMQConfig(bits=8, dataset=features, num_samples=2))


@pytest.mark.parametrize("kind", ["vit", "vit_model", "deit", "dinov2", "swin", "bert", "gpt2", "llama"])
def test_quantizes_every_architecture_close_to_full_precision_at_8_bits(kind):
    model = tiny_model(kind)
    expected = sorted(find_quantizable_linears(model))
    inputs = _inputs(kind, 8, seed=1)
    reference = _first_output(model, inputs)
    summary = quantize_model(model, _config(kind, bits=8))
    converted = sorted(name for name, module in model.named_modules() if isinstance(module, COMQLinear))
    assert converted == expected
    assert summary["layers_quantized"] == len(expected) and summary["layers_skipped"] == {}
    assert _relative(_first_output(model, inputs), reference) < 0.02
    assert 0 < summary["mean_relative_error"] < 1e-3
    assert calibration_summary(model) == summary
    calibration_summary(model)["layers_quantized"] = -1  # a copy: the model's record is left as written
    assert calibration_summary(model)["layers_quantized"] == len(expected)
    assert calibration_summary(tiny_model(kind)) == {}  # a model quantize_model never saw
    with pytest.raises(TypeError, match="calibration_summary takes the quantized model .* got str; a saved checkpoint"):
        calibration_summary("path/to/checkpoint")
    json.dumps(summary)  # JSON-safe, so it can go on the config or a model card


@pytest.mark.parametrize("true_sequential", [False, True])
def test_summary_says_how_much_of_the_time_went_to_solving_layers(true_sequential):
    """``solve_time_s`` counts the wall time of the layer solves (here each made slower by a known
    pause), block by block or stage by stage in a held pass, and is part of ``time_s``."""
    pause = 0.02
    solved = []

    def slow_solver(weight, hessian, **kwargs):
        time.sleep(pause)
        solved.append(weight.shape)
        return comq_quantize(weight, hessian, **kwargs)

    model = tiny_model("llama")
    config = _config("llama", bits=4, fp_target=true_sequential, true_sequential=true_sequential)
    summary = quantize_model(model, config, solver=slow_solver)
    assert len(solved) == summary["layers_quantized"] > 0
    assert len(solved) * pause <= summary["solve_time_s"] < summary["time_s"]


def test_swin_layers_between_stages_are_quantized_too():
    model = tiny_model("swin")
    summary = quantize_model(model, _config("swin", bits=8))
    assert "swin.encoder.layers.0.downsample.reduction" in summary["layers"]
    assert isinstance(model.swin.encoder.layers[0].downsample.reduction, COMQLinear)
    # 8 images, 8x8 patches at stage 0; patch merging leaves 4x4 tokens
    assert summary["layers"]["swin.encoder.layers.0.blocks.0.mlp.fc1"]["num_tokens"] == 8 * 64
    assert summary["layers"]["swin.encoder.layers.1.blocks.0.mlp.fc1"]["num_tokens"] == 8 * 16


def test_model_without_blocks_is_quantized_in_one_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(40, 6)

    class Wrapper(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, pixel_values):
            return self.body(pixel_values)

    wrapper = Wrapper(model)
    summary = quantize_model(wrapper, COMQConfig(bits=8, dataset=[{"pixel_values": x}], batch_size=16, num_samples=40))
    assert summary["num_blocks"] == 0
    assert sorted(summary["layers"]) == ["body.0", "body.2"]
    assert all(stats["num_tokens"] == 40 for stats in summary["layers"].values())


# ---------------------------------------------------------------- what the Hessian hooks see


def test_hessian_hooks_see_exactly_the_image_tokens():
    model = tiny_vit()
    summary = quantize_model(model, _config("vit", count=6, bits=8, batch_size=4))
    tokens = 6 * (16 + 1)  # 4x4 patches plus the CLS token per image
    assert {stats["num_tokens"] for stats in summary["layers"].values()} == {tokens}


@pytest.mark.parametrize("kind", TEXT_MODELS)
def test_hessian_hooks_skip_padding_tokens(kind):
    model = tiny_model(kind)
    summary = quantize_model(model, _config(kind, count=7, bits=8, batch_size=3))
    real_tokens = sum(len(text.split()) for text in sentences(7))
    assert {stats["num_tokens"] for stats in summary["layers"].values()} == {real_tokens}


def test_non_sequential_hessians_come_from_the_full_precision_model():
    model = tiny_vit()
    names = list(find_quantizable_linears(model))
    reference = _fp_hessians(model, names, _inputs("vit", 8))
    seen, solver = _recording_solver()
    quantize_model(model, _config("vit", bits=3, sequential=False), solver=solver)
    assert len(seen) == len(names)
    for index, name in enumerate(names):
        # float32 per-batch products summed in float64 (HessianAccumulator), handed over in float32
        torch.testing.assert_close(seen[index], reference[name].float(), rtol=1e-4, atol=1e-5)


def test_ridge_auto_gives_each_layer_the_ledoit_wolf_ridge_of_its_own_inputs():
    """ridge="auto": every layer is solved with the shrinkage Ledoit and Wolf's formula gives for the
    tokens it saw (here the full-precision model's, non-sequential), computed from the tokens one by one."""
    model = tiny_vit()
    names = list(find_quantizable_linears(model))
    inputs = _layer_inputs(model, names, _inputs("vit", 8))
    ridges: list[float] = []

    def recording(weight, hessian, **kwargs):
        ridges.append(kwargs["ridge"])
        return comq_quantize(weight, hessian, **kwargs)

    quantize_model(model, _config("vit", bits=3, sequential=False, ridge="auto"), solver=recording)
    assert len(ridges) == len(names)
    for name, ridge in zip(names, ridges):
        assert isinstance(ridge, float) and ridge > 0, name
        assert ridge == pytest.approx(ledoit_wolf_ridge(inputs[name]), rel=1e-4), name


def test_sequential_hessians_come_from_the_quantized_prefix():
    model = tiny_vit()
    names = list(find_quantizable_linears(model))
    reference = _fp_hessians(model, names, _inputs("vit", 8))
    seen, solver = _recording_solver()
    # in one pass per block (stage by stage, block 0's later layers would see its quantized earlier ones)
    quantize_model(model, _config("vit", bits=3, sequential=True, true_sequential=False), solver=solver)
    first_block = [i for i, name in enumerate(names) if name.startswith("vit.layers.0.")]
    second_block = [i for i, name in enumerate(names) if name.startswith("vit.layers.1.")]
    for index in first_block:  # block 0 sees the (unquantized) embeddings either way
        torch.testing.assert_close(seen[index], reference[names[index]].float(), rtol=1e-4, atol=1e-5)
    for index in second_block:  # block 1 sees block 0's quantized outputs
        assert not torch.allclose(seen[index], reference[names[index]].float(), rtol=1e-4, atol=1e-6)


def test_the_gram_pass_ends_at_the_blocks_last_layers_input_with_the_same_codes(monkeypatch):
    """Block-sequential calibration sums a block's Gram matrices in one pass and makes the next block's
    inputs in another, with the quantized layers: nothing reads the first pass's outputs, so it ends
    at ``down_proj``'s input once one pass ran to the end.  Under accelerate's hooks every pass runs to
    the end; the codes are the same."""
    batches = 4

    def quantized(offload: bool) -> tuple[nn.Module, int]:
        model = tiny_model("llama")
        if offload:
            accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        calls = []
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *args: calls.append(1))
        quantize_model(model, _config("llama", bits=4, batch_size=2, fp_target=False))
        return model, len(calls)

    (in_memory, in_memory_calls), (offloaded, offloaded_calls) = quantized(False), quantized(True)
    # the capture's first batch (it runs every block), then the Gram pass: its first batch to the end
    assert in_memory_calls == 1 + 1
    assert offloaded_calls == 1 + batches
    assert _assert_same_codes(offloaded, in_memory) == 14


@pytest.mark.parametrize("model_class", ["T5EncoderModel", "T5ForConditionalGeneration"])
def test_t5_blocks_get_the_position_bias_the_model_hands_them(model_class):
    """T5's first block computes the relative position bias and the model passes it to the others (and the decoder
    runs on the calibration text shifted right): every layer's Gram matrix must be the full-precision model's."""
    import transformers as T

    config = T.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=3, num_heads=2, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = getattr(T, model_class)(config).eval()
    ids = torch.randint(1, 64, (8, 12))
    inputs = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=ids)
    names = list(find_quantizable_linears(model))
    reference = _fp_hessians(model, names, inputs)
    seen, solver = _recording_solver()
    quantize_model(model, COMQConfig(bits=4, dataset=ids, batch_size=4, sequential=False), solver=solver)
    assert len(seen) == len(names) == (18 if model_class == "T5EncoderModel" else 48)
    for index, name in enumerate(names):
        torch.testing.assert_close(seen[index], reference[name].float(), rtol=1e-4, atol=1e-5)


def test_layers_of_another_type_get_their_own_attention_mask():
    """Qwen2 with a sliding-window middle layer: it must be calibrated with the sliding-window mask."""
    import transformers as T

    torch.manual_seed(0)
    config = T.Qwen2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, use_sliding_window=True, sliding_window=3, bos_token_id=0, eos_token_id=0,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
    )
    model = T.Qwen2ForCausalLM(config).eval()
    ids = torch.randint(0, 64, (4, 12))
    names = list(find_quantizable_linears(model))
    reference = _fp_hessians(model, names, {"input_ids": ids})
    seen, solver = _recording_solver()
    quantize_model(model, COMQConfig(bits=4, dataset=ids, sequential=False), solver=solver)
    for index, name in enumerate(names):
        # float32 per-batch products summed in float64 (HessianAccumulator), handed over in float32
        torch.testing.assert_close(seen[index], reference[name].float(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- accuracy


def _round_to_nearest(model: nn.Module, bits: int) -> None:
    """Per-channel asymmetric min-max round-to-nearest on the same layers (the baseline COMQ must beat)."""
    with torch.no_grad():
        for module in find_quantizable_linears(model).values():
            weight = module.weight
            low, high = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
            step = (high - low) / (2**bits - 1)
            zero = torch.round(-low / step)
            weight.copy_((torch.clamp(torch.round(weight / step) + zero, 0, 2**bits - 1) - zero) * step)


@pytest.mark.parametrize("mode", [True, False], ids=["sequential", "fp-inputs"])
@pytest.mark.parametrize("bits", [2, 4])
def test_comq_beats_round_to_nearest_on_held_out_images(mode, bits):
    torch.manual_seed(0)
    calibration, held_out = torch.randn(32, 3, 32, 32), torch.randn(16, 3, 32, 32)
    reference = tiny_vit()(pixel_values=held_out).logits.detach()
    rtn = tiny_vit()
    _round_to_nearest(rtn, bits)
    rtn_error = _relative(_first_output(rtn, {"pixel_values": held_out}), reference)
    model = tiny_vit()
    summary = quantize_model(model, COMQConfig(bits=bits, dataset=calibration, num_samples=32, sequential=mode))
    comq_error = _relative(_first_output(model, {"pixel_values": held_out}), reference)
    assert comq_error < 0.8 * rtn_error
    assert summary["sequential"] is mode and summary["bits"] == bits
    assert all(0 < stats["relative_error"] < 1 for stats in summary["layers"].values())


def test_group_wise_quantization_is_passed_to_the_solver():
    model = tiny_vit()
    summary = quantize_model(model, _config("vit", bits=4, group_size=16))
    assert model.vit.layers[0].mlp.fc2.group_size == 16
    assert model.vit.layers[0].mlp.fc2.weight_scale.shape == (32, 4)
    assert summary["group_size"] == 16


def test_gpt2_conv1d_layers_are_quantized_in_linear_layout():
    model = tiny_model("gpt2")
    original = get_linear_weight(model.transformer.h[0].mlp.c_fc).detach().clone()
    quantize_model(model, _config("gpt2", bits=8))
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, COMQLinear)
    assert layer.dequantize().shape == original.shape == (128, 32)
    assert _relative(layer.dequantize(), original) < 0.01


# ---------------------------------------------------------------- accelerate placement


@pytest.mark.parametrize("mode", [True, False], ids=["sequential", "fp-inputs"])
def test_cpu_offloaded_model_matches_the_in_memory_result(mode):
    pixels = torch.randn(8, 3, 32, 32)
    plain = tiny_vit()
    quantize_model(plain, COMQConfig(bits=4, dataset=pixels, num_samples=8, sequential=mode))
    offloaded = tiny_vit()
    accelerate.cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.vit.layers[0].mlp.fc1.weight.device.type == "meta"
    quantize_model(offloaded, COMQConfig(bits=4, dataset=pixels, num_samples=8, sequential=mode))
    layer = offloaded.vit.layers[0].mlp.fc1
    assert isinstance(layer, COMQLinear)
    assert layer.weight_packed.device.type == "meta" and layer._hf_hook.offload  # still offloaded after conversion
    with accelerate.utils.align_module_device(layer):
        assert torch.equal(layer.weight_packed, plain.vit.layers[0].mlp.fc1.weight_packed)
    inputs = {"pixel_values": pixels}
    torch.testing.assert_close(_first_output(offloaded, inputs), _first_output(plain, inputs), rtol=0, atol=0)


def test_model_dispatched_with_hooks_matches_the_in_memory_result():
    pixels = torch.randn(8, 3, 32, 32)
    plain = tiny_vit()
    quantize_model(plain, COMQConfig(bits=4, dataset=pixels, num_samples=8))
    dispatched = tiny_vit()
    device_map = {"vit.embeddings": "cpu", "vit.layers.0": "cpu", "vit.layers.1": "cpu", "vit.layernorm": "cpu",
                  "classifier": "cpu"}
    accelerate.dispatch_model(dispatched, device_map=device_map, force_hooks=True)
    assert hasattr(dispatched.vit.layers[1], "_hf_hook")
    quantize_model(dispatched, COMQConfig(bits=4, dataset=pixels, num_samples=8))
    assert torch.equal(dispatched.vit.layers[1].mlp.fc2.weight_packed, plain.vit.layers[1].mlp.fc2.weight_packed)
    inputs = {"pixel_values": pixels}
    torch.testing.assert_close(_first_output(dispatched, inputs), _first_output(plain, inputs), rtol=0, atol=0)


@pytest.mark.parametrize(
    "mode",
    [dict(sequential=True), dict(sequential=False), dict(fp_target=True), dict(fp_target=True, true_sequential=False)],
    ids=["sequential", "fp-inputs", "fp-target-staged", "fp-target-one-pass"],
)
def test_disk_offloaded_model_matches_the_in_memory_result(tmp_path, mode):
    from hf_comq.calibration.placement import offloads_to_disk

    pixels = torch.randn(8, 3, 32, 32)
    plain = tiny_vit()
    quantize_model(plain, COMQConfig(bits=4, dataset=pixels, num_samples=8, **mode))
    offloaded = tiny_vit()
    accelerate.disk_offload(offloaded, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    quantize_model(offloaded, COMQConfig(bits=4, dataset=pixels, num_samples=8, **mode))
    converted = {name: m for name, m in plain.named_modules() if isinstance(m, COMQLinear)}
    assert len(converted) == 12
    for name, expected in converted.items():
        layer = offloaded.get_submodule(name)
        assert isinstance(layer, COMQLinear) and offloads_to_disk(layer)  # written to disk, not kept in memory
        assert layer.weight_packed.device.type == "meta"
        with accelerate.utils.align_module_device(layer):
            assert torch.equal(layer.weight_packed, expected.weight_packed)
            assert torch.equal(layer.weight_scale, expected.weight_scale)
    inputs = {"pixel_values": pixels}
    torch.testing.assert_close(_first_output(offloaded, inputs), _first_output(plain, inputs), rtol=0, atol=0)


# ---------------------------------------------------------------- bad input


def test_model_with_no_quantizable_layers():
    model = tiny_vit()
    config = COMQConfig(bits=4, dataset=torch.randn(4, 3, 32, 32), modules_to_not_convert=["vit", "classifier"])
    with pytest.raises(ValueError, match="no quantizable layers"):
        quantize_model(model, config)


@pytest.mark.parametrize("layer", ["vit.layers.0.attention.q_proj", "vit.layers.1.mlp.fc2"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_broken_weight_is_named_before_any_calibration(monkeypatch, layer, bad):
    """Before: NaN in an early layer read as bad calibration data, in a late one it surfaced after the earlier blocks."""
    model = tiny_vit()
    with torch.no_grad():
        get_linear_weight(model.get_submodule(layer))[3, 5] = bad
    started = []
    monkeypatch.setattr("hf_comq.calibration.sequential.build_calibration_data", lambda *args: started.append(1))
    with pytest.raises(ValueError, match=rf"layer '{layer}' has 1 NaN or infinite weight value"):
        quantize_model(model, COMQConfig(bits=4, dataset=torch.randn(4, 3, 32, 32)))
    assert started == []


def test_dataset_without_tokens_is_too_small():
    model = tiny_model("llama")
    config = COMQConfig(bits=4, dataset=["", "   "], processor=word_tokenizer())
    with pytest.raises(ValueError, match="has no data: every value of column 'text' is blank or empty"):  # before any forward
        quantize_model(model, config)
    streamed = datasets.Dataset.from_dict({"text": ["", "   "]}).to_iterable_dataset()
    with pytest.raises(ValueError, match="empty"):
        quantize_model(model, COMQConfig(bits=4, dataset=streamed, processor=word_tokenizer()))


def test_few_tokens_warn_about_rank_deficient_hessians(caplog):
    with caplog.at_level(logging.WARNING):
        quantize_model(tiny_vit(), COMQConfig(bits=8, dataset=torch.randn(1, 3, 32, 32)))
    assert "only 17 tokens for hidden size 32" in caplog.text


def test_a_mixture_of_experts_model_has_each_expert_quantized_on_the_tokens_routed_to_it(caplog):
    model = tiny_model("mixtral")
    inputs = {"input_ids": torch.randint(1, 64, (2, 9))}
    reference = _first_output(model, inputs)
    calls, solver = _recording_solver_with_weights()
    with caplog.at_level(logging.WARNING):
        config = COMQConfig(bits=8, dataset=torch.randint(1, 64, (8, 12)), seed=0)
        summary = quantize_model(model, config, solver=solver)
    assert "asymmetric grid" in caplog.text and "symmetric=True" in caplog.text  # plain transformers will not load it
    assert summary["layers_quantized"] == 8 + 2 * 4 * 3  # q/k/v/o, and w1/w3/w2 of 4 experts, in both blocks
    assert summary["expert_parameters_in_full_precision"] == 0 and summary["expert_layers_without_tokens"] == []
    expert = model.model.layers[1].mlp.experts[2]
    assert all(isinstance(layer, COMQLinear) for layer in expert.projections())
    routed = summary["layers"]["model.layers.1.mlp.experts.2.w1"]["num_tokens"]
    assert 0 < routed < 8 * 12 * 2  # its share of the 2 routes per token, not every token
    assert summary["layers"]["model.layers.1.mlp.experts.2.w3"]["num_tokens"] == routed
    assert {tuple(weight.shape) for weight, _ in calls} >= {(64, 32), (32, 64)}  # gate/up (64 x 32), down (32 x 64)
    assert _relative(_first_output(model, inputs), reference) < 0.02


def test_an_expert_no_token_is_routed_to_is_rounded_on_the_identity(caplog):
    model = tiny_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts

    def never_route_to_expert_3(module, args):
        hidden, index, weights = args
        return hidden, torch.where(index == 3, torch.full_like(index, 4), index), weights  # 4: a dropped route

    from hf_comq.modules import unfuse_batched_experts

    unfuse_batched_experts(model)
    model.model.layers[0].mlp.experts.register_forward_pre_hook(never_route_to_expert_3)
    calls, solver = _recording_solver_with_weights()
    with caplog.at_level(logging.WARNING):
        config = COMQConfig(bits=4, dataset=torch.randint(1, 64, (8, 12)), seed=0)
        summary = quantize_model(model, config, solver=solver)
    unrouted = [f"model.layers.0.mlp.experts.3.{name}" for name in ("down_proj", "gate_proj", "up_proj")]
    assert summary["expert_layers_without_tokens"] == unrouted
    assert all(summary["layers"][name]["num_tokens"] == 0 for name in unrouted)
    assert "no calibration token to 3 expert layer(s)" in caplog.text and "calibrate_all_experts=True" in caplog.text
    gate = experts.gate_up_proj[3, :32]
    assert [torch.equal(hessian, torch.eye(32)) for weight, hessian in calls if torch.equal(weight, gate)] == [True]
    assert isinstance(model.model.layers[0].mlp.experts[3].gate_proj, COMQLinear)
    assert experts.gate_up_proj.shape[0] == 4  # the batched original is untouched, just replaced


def test_an_expert_that_saw_only_padding_is_rounded_once_for_its_gate_and_up():
    """Called on padding only, the expert's gate and up were found sharing one Gram matrix, which holds no token."""
    from hf_comq.modules import unfuse_batched_experts

    model = tiny_model("qwen3_moe")
    unfuse_batched_experts(model)
    masks = []
    model.register_forward_pre_hook(lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)

    def only_padding_to_expert_3(module, args):
        hidden, index, weights = args
        real = masks[-1].reshape(-1, 1).bool() if masks[-1] is not None else torch.ones_like(index, dtype=torch.bool)
        return hidden, torch.where((index == 3) & real, torch.full_like(index, 4), index), weights

    model.model.layers[0].mlp.experts.register_forward_pre_hook(only_padding_to_expert_3)
    calls, solver = _recording_solver_with_weights()
    summary = quantize_model(model, _config("llama", 8, batch_size=8), solver=solver)  # one batch: one mask
    assert summary["expert_layers_without_tokens"] == [
        f"model.layers.0.mlp.experts.3.{name}" for name in ("down_proj", "gate_proj", "up_proj")
    ]
    gate = model.model.layers[0].mlp.experts[3]
    assert isinstance(gate.gate_proj, COMQLinear) and isinstance(gate.up_proj, COMQLinear)
    assert sum(torch.equal(hessian, torch.eye(32)) for _, hessian in calls) >= 2  # gate/up (one matrix), and down


def test_calibrate_all_experts_solves_every_expert_on_every_real_token(caplog):
    from hf_comq.modules import unfuse_batched_experts
    from hf_comq.nn import UnfusedExperts

    model = tiny_model("qwen3_moe")
    unfuse_batched_experts(model)

    def never_route_to_expert_3(module, args):
        hidden, index, weights = args
        return hidden, torch.where(index == 3, torch.full_like(index, 4), index), weights

    model.model.layers[0].mlp.experts.register_forward_pre_hook(never_route_to_expert_3)
    reference_inputs = {"input_ids": torch.randint(1, 64, (2, 9))}
    reference = _first_output(model, reference_inputs)
    gates = [expert.gate_proj.weight.detach().clone() for expert in model.model.layers[1].mlp.experts]
    calls, solver = _recording_solver_with_weights()
    with caplog.at_level(logging.WARNING):
        summary = quantize_model(model, _config("llama", 8, batch_size=8, bits=8, calibrate_all_experts=True), solver=solver)
    assert summary["expert_layers_without_tokens"] == [] and "no calibration token" not in caplog.text
    layers = summary["layers"]
    real_tokens = layers["model.layers.0.self_attn.q_proj"]["num_tokens"]  # the padded batch's real tokens
    expert_layers = [name for name in layers if ".experts." in name]
    assert len(expert_layers) == 2 * 4 * 3 and {layers[name]["num_tokens"] for name in expert_layers} == {real_tokens}
    # Every expert of a layer now reads the same tokens, the unchosen expert 3 included: one Gram matrix.
    grams = [next(hessian for weight, hessian in calls if torch.equal(weight, gate)) for gate in gates]
    assert all(torch.allclose(gram, grams[0], rtol=1e-5, atol=1e-5) for gram in grams[1:])
    assert not any(module.every_token for module in model.modules() if isinstance(module, UnfusedExperts))
    assert _relative(_first_output(model, reference_inputs), reference) < 0.02  # outputs stay the routed ones


def test_calibrate_all_experts_on_a_model_without_quantized_experts_says_it_does_nothing(caplog):
    with caplog.at_level(logging.WARNING):
        quantize_model(tiny_model("llama"), _config("llama", 4, bits=8, calibrate_all_experts=True))
    assert "calibrate_all_experts=True has no effect on LlamaForCausalLM" in caplog.text


def test_experts_modules_to_not_convert_keeps_stay_batched_and_in_full_precision(caplog):
    model = tiny_model("mixtral")
    kept = model.model.layers[1].mlp.experts
    before = kept.gate_up_proj.clone()
    data = torch.randint(1, 64, (8, 12))
    config = COMQConfig(bits=4, dataset=data, seed=0, modules_to_not_convert=["model.layers.1.mlp.experts"])
    with caplog.at_level(logging.WARNING):
        summary = quantize_model(model, config)
    assert model.model.layers[1].mlp.experts is kept and torch.equal(kept.gate_up_proj, before)
    assert "keeps 4 mixture-of-experts weight tensors" in caplog.text  # all of them: packed and dense would mix
    assert "model.layers.0.mlp.experts.gate_up_proj" in caplog.text
    assert summary["expert_parameters_in_full_precision"] == 2 * (kept.gate_up_proj.numel() + kept.down_proj.numel())
    assert summary["layers_quantized"] == 8


@pytest.mark.parametrize(
    ("settings", "aimed", "staged"),
    [
        (dict(bits=5), False, False),
        (dict(bits=4), True, True),
        (dict(bits=3), True, True),
        (dict(bits=2), True, True),
        (dict(bits=4, sequential=False), False, False),
        (dict(bits=4, fp_target=False), False, False),
        (dict(bits=5, fp_target=True), True, True),
        (dict(bits=4, true_sequential=False), True, False),
        (dict(bits=5, true_sequential=True), False, True),
    ],
)
def test_aiming_at_four_bits_and_fewer_and_stages_wherever_aimed_by_default(settings, aimed, staged):
    """fp_target=None aims in block-sequential calibration at 4 bits and fewer; true_sequential=None
    solves in stages wherever layers are aimed; either given explicitly is kept."""
    summary = quantize_model(tiny_model("llama"), COMQConfig(dataset=torch.randint(1, 64, (4, 12)), seed=0, **settings))
    assert summary["fp_target"] is aimed and summary["true_sequential"] is staged
    assert calibration_mode(summary).endswith("aimed at full-precision outputs") is aimed
    assert calibration_mode(summary).startswith("true-sequential") is staged


def test_fp_target_aims_the_dense_layers_and_leaves_the_experts_their_own_objective():
    model = tiny_model("qwen3_moe")
    summary = quantize_model(model, COMQConfig(bits=4, dataset=torch.randint(1, 64, (8, 12)), seed=0, fp_target=True))
    assert summary["fp_target"] and summary["layers_quantized"] == 8 + 2 * 4 * 3


def test_a_linear_subclass_whose_forward_is_not_its_linear_map_stays_in_full_precision():
    """Llama 4's router returns the experts' scores beside its logits; a COMQLinear in its place would not."""
    model = tiny_model("llama4")
    inputs = {"input_ids": torch.randint(1, 64, (2, 9))}
    reference = _first_output(model, inputs)
    summary = quantize_model(model, COMQConfig(bits=8, dataset=torch.randint(1, 64, (8, 12)), seed=0))
    routers = [name for name, module in model.named_modules() if type(module).__name__ == "Llama4Router"]
    assert routers == ["model.layers.0.feed_forward.router", "model.layers.1.feed_forward.router"]
    assert not any(name.startswith(tuple(routers)) for name in summary["layers"])
    assert "model.layers.0.feed_forward.shared_expert.down_proj" in summary["layers"]
    assert _relative(_first_output(model, inputs), reference) < 0.05


def test_group_size_that_does_not_divide_names_the_layer():
    with pytest.raises(ValueError, match="vit.layers.0"):
        quantize_model(tiny_vit(), COMQConfig(bits=4, group_size=24, dataset=torch.randn(4, 3, 32, 32)))


def test_a_forward_taking_use_cache_only_through_kwargs_calibrates_without_a_kv_cache():
    """LlamaForQuestionAnswering (like many task heads and multimodal models) passes use_cache on
    through **kwargs: calibration turns the cache off in the config, and puts it back afterwards."""
    llama = tiny_model("llama")
    model = T.LlamaForQuestionAnswering(llama.config)
    model.transformer.load_state_dict(llama.model.state_dict())
    caches = []

    def record(module, args, kwargs):
        caches.append(kwargs.get("past_key_values"))

    for layer in model.transformer.layers:
        layer.register_forward_pre_hook(record, with_kwargs=True)
    summary = quantize_model(model, _config("llama", count=6, bits=4, batch_size=3))
    assert summary["layers_quantized"] == 14 and caches and all(cache is None for cache in caches)
    assert model.config.use_cache is True


def test_model_stays_in_training_mode_if_it_was():
    model = tiny_vit().train()
    quantize_model(model, COMQConfig(bits=8, dataset=torch.randn(4, 3, 32, 32)))
    assert model.training


def test_bf16_model_takes_float32_processor_outputs():
    model = tiny_model("swin").to(torch.bfloat16)
    summary = quantize_model(model, _config("swin", count=4, bits=8))
    assert summary["layers_quantized"] == 25
    assert model.swin.encoder.layers[1].blocks[1].mlp.fc2.dequantize().dtype == torch.bfloat16


def test_streamed_dataset_is_read_once_and_replayed_for_every_pass():
    import datasets

    reads = []

    def rows():
        for image in images(6):
            reads.append(1)
            yield {"image": image}

    stream = datasets.IterableDataset.from_generator(rows, features=datasets.Features({"image": datasets.Image()}))
    model = tiny_model("swin")  # two block groups plus a layer between them: several calibration passes
    config = COMQConfig(bits=8, dataset=stream, processor=image_processor(), num_samples=5, batch_size=2)
    summary = quantize_model(model, config)
    assert len(reads) == 6
    assert summary["layers"]["swin.encoder.layers.1.blocks.1.attention.q_proj"]["num_tokens"] == 5 * 16
    # the split datasets gives generated data, as the object says
    assert config.calibration_description == "datasets.IterableDataset (split train, column image), 5 samples"
    assert "IterableDataset" in config.to_json_string()


def test_layers_reading_the_same_input_share_one_hessian(monkeypatch):
    """q/k/v read one tensor: X^T X is computed once for the three of them, and each
    still gets exactly the full-precision Hessian (checked in the tests above)."""
    from hf_comq.solver import HessianAccumulator

    calls: list[int] = []
    real_add = HessianAccumulator.add
    monkeypatch.setattr(
        HessianAccumulator, "add", lambda self, x, *target: (calls.append(x.shape[-1]), real_add(self, x, *target))[1]
    )
    model = tiny_vit()
    seen, solver = _recording_solver()
    quantize_model(model, _config("vit", bits=4, sequential=False), solver=solver)
    blocks, batches = 2, 2  # 8 samples in batches of 4
    per_block = 4  # shared q/k/v input, o_proj, fc1, fc2 (instead of 6 separate products)
    assert len(calls) == blocks * batches * per_block
    assert len(seen) == blocks * 6
    torch.testing.assert_close(seen[0], seen[1])
    torch.testing.assert_close(seen[0], seen[2])


def test_solver_gets_float32_gram_matrices_and_may_overwrite_the_last_readers_one():
    """The float64 sums are handed over in float32 (and freed); only the last of the
    layers sharing a Gram matrix (q/k/v) lets the solver use it as work space."""
    model = tiny_vit()
    calls: list[tuple[torch.dtype, bool]] = []

    def recording(weight, hessian, **kwargs):
        calls.append((hessian.dtype, kwargs.get("overwrite_hessian", False)))
        return comq_quantize(weight, hessian, **kwargs)

    quantize_model(model, _config("vit", bits=4), solver=recording)
    per_block = [False, False, True, True, True, True]  # query, key, value, attention output, fc1, fc2
    assert calls == [(torch.float32, flag) for flag in per_block * 2]


def _thread_recording_solver() -> tuple[list[tuple[int, int]], Callable]:
    """A layer solver that records the Python thread and torch thread count of each solve."""
    seen: list[tuple[int, int]] = []

    def recording(weight, hessian, **kwargs):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return comq_quantize(weight, hessian, **kwargs)

    return seen, recording


def _assert_same_codes(model: nn.Module, reference: nn.Module) -> int:
    """Every quantized layer of ``model`` holds ``reference``'s codes and scales; returns how many were compared."""
    compared = 0
    for name, layer in reference.named_modules():
        if isinstance(layer, COMQLinear):
            with accelerate.utils.align_module_device(model.get_submodule(name), torch.device("cpu")):
                assert torch.equal(model.get_submodule(name).weight_packed, layer.weight_packed), name
                assert torch.equal(model.get_submodule(name).weight_scale, layer.weight_scale), name
            compared += 1
    return compared


def test_a_blocks_solves_run_side_by_side_on_the_callers_threads_with_the_same_codes(two_threads):
    """Two threads: the block's Gram matrices (q/k/v's, the attention output's, fc1's,
    fc2's) are solved on two workers of one torch thread each, and every layer gets the
    codes of a one-thread run."""
    pixels = torch.randn(8, 3, 32, 32)
    alone = tiny_vit()
    torch.set_num_threads(1)
    quantize_model(alone, COMQConfig(bits=4, dataset=pixels, num_samples=8, fp_target=False))
    torch.set_num_threads(2)
    side_by_side = tiny_vit()
    seen, recording = _thread_recording_solver()
    quantize_model(side_by_side, COMQConfig(bits=4, dataset=pixels, num_samples=8, fp_target=False), solver=recording)
    assert len(seen) == 12 and {count for _, count in seen} == {1}
    # Each block starts its own workers, whose thread ids may or may not be reused: more than one, never this one.
    assert len({ident for ident, _ in seen}) >= 2 and threading.get_ident() not in {ident for ident, _ in seen}
    assert torch.get_num_threads() == 2
    for name, layer in alone.named_modules():
        if isinstance(layer, COMQLinear):
            assert torch.equal(side_by_side.get_submodule(name).weight_packed, layer.weight_packed)
            assert torch.equal(side_by_side.get_submodule(name).weight_scale, layer.weight_scale)


def _block_forward_threads(model, blocks: nn.ModuleList | None = None) -> list[tuple[int, int, bool]]:
    """Record the Python thread, torch thread count and grad mode of every forward pass of
    ``blocks`` (by default the tiny ViT's).

    A forward pass on a worker thread waits for one on another worker before it goes on, so
    the record shows two workers exactly when passes really run side by side: the tiny
    model's batches take so little time that, on a busy machine, one worker could otherwise
    take every batch before the other starts.  Passes that never overlap time out (a broken
    barrier fails the run) rather than hang.  The next block's full-precision pass run ahead
    (on a thread of its own, one batch at a time) waits for none.
    """
    seen: list[tuple[int, int, bool]] = []
    caller = threading.get_ident()
    partner = threading.Barrier(2, timeout=30)

    def record(module, args) -> None:
        seen.append((threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled()))
        if threading.get_ident() != caller and threading.current_thread().name != "hf_comq_ahead":
            partner.wait()

    for block in model.vit.layers if blocks is None else blocks:
        block.register_forward_pre_hook(record)
    return seen


def test_a_small_blocks_batches_run_side_by_side_with_the_same_codes(two_threads):
    """Two threads and four batches: each block's forward passes run on two workers of
    one torch thread each, and the Gram sums, hence every layer's codes, are a one-thread run's."""
    pixels = torch.randn(8, 3, 32, 32)
    config = dict(bits=4, dataset=pixels, num_samples=8, batch_size=2, fp_target=False)
    torch.set_num_threads(1)
    alone = tiny_vit()
    quantize_model(alone, COMQConfig(**config))
    torch.set_num_threads(2)
    side_by_side = tiny_vit()
    seen = _block_forward_threads(side_by_side)
    quantize_model(side_by_side, COMQConfig(**config))
    here = threading.get_ident()  # the capture pass (stopped at block 0) runs here
    assert {count for _, count, _ in seen} == {1} and len({ident for ident, _, _ in seen if ident != here}) >= 2
    assert not any(grad for _, _, grad in seen)  # no autograd graph holding every activation of the run
    for name, layer in alone.named_modules():
        if isinstance(layer, COMQLinear):
            assert torch.equal(side_by_side.get_submodule(name).weight_packed, layer.weight_packed)
            assert torch.equal(side_by_side.get_submodule(name).weight_scale, layer.weight_scale)


def _llama_on_one_and_two_threads(
    before: Callable[[nn.Module], None] = lambda model: None, **config
) -> tuple[nn.Module, nn.Module, list]:
    """A tiny Llama quantized on one torch thread and another on two, with the threads
    (:func:`_block_forward_threads`) of the second's block forward passes; ``before`` is
    called on the second model before it is quantized (to add hooks)."""
    torch.set_num_threads(1)
    alone = tiny_model("llama")
    quantize_model(alone, _config("llama", **config))
    torch.set_num_threads(2)
    side_by_side = tiny_model("llama")
    seen = _block_forward_threads(side_by_side, side_by_side.model.layers)
    before(side_by_side)
    quantize_model(side_by_side, _config("llama", **config))
    return alone, side_by_side, seen


def test_fp_target_runs_a_small_blocks_batches_side_by_side_with_the_same_codes(two_threads):
    """With targets each worker runs a batch's full-precision pass and then its quantized
    one; both are summed in batch order (padded texts: the masks of both passes count),
    so every layer's codes are a one-thread run's."""
    alone, side_by_side, seen = _llama_on_one_and_two_threads(bits=3, fp_target=True, true_sequential=False, batch_size=2)
    here = threading.get_ident()
    # only the capture pass: stopped at block 0 for each of the 4 batches, after the first batch ran both blocks
    # (to check that block 1 takes block 0's inputs besides the hidden state)
    assert [ident for ident, _, _ in seen].count(here) == 5
    workers = {ident for ident, _, _ in seen if ident != here}
    assert len(workers) >= 2 and {count for ident, count, _ in seen if ident in workers} == {1}
    assert not any(grad for _, _, grad in seen)
    assert _assert_same_codes(side_by_side, alone) == len(find_quantizable_linears(tiny_model("llama")))


def test_fp_target_counts_the_target_shift_when_it_decides_what_runs_side_by_side(two_threads, monkeypatch):
    """A targeted pass adds the target shift's full ``in x in`` product to each Gram sum:
    with the pool's threshold between the plain and the targeted bound, the blocks'
    plain passes run side by side and the targeted one (block 1's) one batch at a time."""
    tokens = []
    probe = tiny_model("llama")
    for block in probe.model.layers:
        block.register_forward_pre_hook(
            lambda module, args, kwargs: tokens.append((args or (kwargs["hidden_states"],))[0].shape[:-1].numel()),
            with_kwargs=True,
        )
    config = dict(bits=3, fp_target=True, true_sequential=False, batch_size=2)
    quantize_model(probe, _config("llama", **config))
    block = tiny_model("llama").model.layers[0]
    largest = max(max(tokens) * m.in_features * max(m.in_features, m.out_features) for m in block.modules() if isinstance(m, nn.Linear))
    monkeypatch.setattr("hf_comq.threads.MIN_PARALLEL_FLOPS", 2.5 * largest)  # plain bound 2x, targeted 3x
    model = tiny_model("llama")
    seen = _block_forward_threads(model, model.model.layers)
    import hf_comq.calibration.sequential as sequential

    decided: list[tuple[bool, int]] = []  # (targeted, workers) of each block's forward passes
    original = sequential._Calibrator._forward_workers

    def recording(self, block, captured, targeted=False):
        decided.append((targeted, original(self, block, captured, targeted)))
        return decided[-1][1]

    monkeypatch.setattr(sequential._Calibrator, "_forward_workers", recording)
    quantize_model(model, _config("llama", **config))
    here = threading.get_ident()
    # Four batches: the capture pass (stopped at block 0, the first batch after block 1 too), then block 1's
    # full-precision and quantized passes.
    assert [ident for ident, _, _ in seen].count(here) == 4 + 1 + 2 * 4
    # the plain passes still side by side (which worker threads then take the jobs is up to the machine's load)
    assert {workers for targeted, workers in decided if not targeted} == {2}
    assert {workers for targeted, workers in decided if targeted} == {1}


def test_large_layers_keep_the_callers_threads_one_solve_and_one_batch_at_a_time(two_threads, monkeypatch):
    """A solve or forward pass whose own GEMMs get the caller's threads (large layers) keeps them, as before."""
    monkeypatch.setattr("hf_comq.threads.MIN_PARALLEL_FLOPS", 1.0)  # every layer counts as large
    seen, recording = _thread_recording_solver()
    model = tiny_vit()
    forwards = _block_forward_threads(model)
    config = COMQConfig(bits=4, dataset=torch.randn(8, 3, 32, 32), num_samples=8, batch_size=2, fp_target=False)
    quantize_model(model, config, solver=recording)
    assert len(seen) == 12 and {ident for ident, _ in seen} == {threading.get_ident()}
    assert forwards and {ident for ident, _, _ in forwards} == {threading.get_ident()}  # the batches one at a time too


def test_an_offloaded_model_solves_and_runs_one_layer_and_one_batch_at_a_time(two_threads):
    """Under offload one solve's work space is what the memory budget leaves room for
    (and accelerate's hooks move a block's weights for one batch's forward pass at a time)."""
    offloaded = tiny_vit()
    forwards = _block_forward_threads(offloaded)
    accelerate.cpu_offload(offloaded, execution_device=torch.device("cpu"))
    seen, recording = _thread_recording_solver()
    config = COMQConfig(bits=4, dataset=torch.randn(8, 3, 32, 32), num_samples=8, batch_size=2)
    quantize_model(offloaded, config, solver=recording)
    assert len(seen) == 12 and {ident for ident, _ in seen} == {threading.get_ident()}
    assert forwards and {ident for ident, _, _ in forwards} == {threading.get_ident()}


# ---------------------------------------------------------------- fp_target


def test_fp_target_solves_each_layer_for_the_full_precision_models_outputs():
    """Block 1's layers are handed ``W + W S H^-1`` (H and S from the quantized block 0's
    outputs and the full-precision ones, computed here by hand); block 0's see the
    full-precision inputs already and get their weight unchanged.  fc2, narrower out
    than in, gets ``W S`` from its outputs, the others from the target shift."""
    import copy

    from hf_comq.solver import fp_target_weight

    model = tiny_vit()
    full_precision = copy.deepcopy(model)
    names = list(find_quantizable_linears(model))
    handed: dict[str, torch.Tensor] = {}
    order = iter(names)

    def recording(weight, hessian, **kwargs):
        handed[next(order)] = weight.clone()
        return comq_quantize(weight, hessian, **kwargs)

    inputs = _inputs("vit", 8)
    summary = quantize_model(model, _config("vit", bits=3, fp_target=True, true_sequential=False), solver=recording)
    assert summary["fp_target"] is True
    hybrid = copy.deepcopy(full_precision)  # quantized block 0, block 1 still in full precision: what calibration saw
    hybrid.vit.layers[0] = model.vit.layers[0]
    block_1 = [name for name in names if name.startswith("vit.layers.1.")]
    shapes = {name: get_linear_weight(full_precision.get_submodule(name)).shape for name in block_1}
    assert [name.rsplit(".", 1)[1] for name in block_1 if shapes[name][0] < shapes[name][1]] == ["fc2"]
    quantized_inputs = _layer_inputs(hybrid, block_1, inputs)
    fp_inputs = _layer_inputs(full_precision, block_1, inputs)
    for name in block_1:
        x, x_fp = quantized_inputs[name], fp_inputs[name]
        weight = get_linear_weight(full_precision.get_submodule(name)).double()
        expected = fp_target_weight(weight, x.T @ x, weight @ (x_fp - x).T @ x)
        assert not torch.allclose(expected, weight, rtol=1e-3, atol=1e-4)  # the target does move it
        torch.testing.assert_close(handed[name].double(), expected, rtol=1e-3, atol=1e-5)
    for name in names:
        if name.startswith("vit.layers.0."):
            assert torch.equal(handed[name], get_linear_weight(full_precision.get_submodule(name)))



# ---------------------------------------------------------------- true_sequential

LLAMA_STAGES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def _solved_before(name: str, names: list[str]) -> list[str]:
    """With ``true_sequential``, the layers of a tiny Llama solved before ``name``: every layer of the blocks
    before its block, and those of its block's earlier stages."""
    block = name.rsplit(".", 2)[0]
    stage = next(index for index, stage in enumerate(LLAMA_STAGES) if name.rsplit(".", 1)[1] in stage)
    earlier = {layer for stage_layers in LLAMA_STAGES[:stage] for layer in stage_layers}
    return [
        other for other in names
        if not other.startswith(f"{block}.") and other < name or other.startswith(f"{block}.") and other.rsplit(".", 1)[1] in earlier
    ]


def _hybrid(full_precision: nn.Module, quantized: nn.Module, names: list[str]) -> nn.Module:
    """The full-precision model with ``names`` swapped for the quantized model's layers."""
    import copy

    hybrid = copy.deepcopy(full_precision)
    for name in names:
        hybrid.set_submodule(name, quantized.get_submodule(name))
    return hybrid


@pytest.mark.parametrize("fp_target", [False, True], ids=["plain", "fp-target"])
def test_true_sequential_solves_each_stage_on_the_stages_quantized_before_it(fp_target):
    """Each layer's Gram matrix comes from inputs made by the quantized layers of the blocks
    before it and of its own block's earlier stages (q/k/v, o, gate/up, down); with
    ``fp_target`` its weight is aimed at the full-precision model's inputs of that layer,
    in the first block too once a stage came before it."""
    import copy

    from hf_comq.solver import fp_target_weight

    model = tiny_model("llama")
    full_precision = copy.deepcopy(model)
    names = sorted(find_quantizable_linears(model))
    by_weight = {name: get_linear_weight(full_precision.get_submodule(name)) for name in names}
    handed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def recording(weight, hessian, **kwargs):
        name = min(names, key=lambda other: float((by_weight[other] - weight).abs().max()) if by_weight[other].shape == weight.shape else float("inf"))
        handed[name] = (weight.clone(), hessian.clone())
        return comq_quantize(weight, hessian, **kwargs)

    summary = quantize_model(model, _config("llama", bits=3, true_sequential=True, fp_target=fp_target), solver=recording)
    assert summary["true_sequential"] is True and sorted(handed) == names
    inputs = _inputs("llama", 8)
    fp_inputs = _layer_inputs(full_precision, names, inputs)
    moved = 0
    for name in names:
        x = _layer_inputs(_hybrid(full_precision, model, _solved_before(name, names)), [name], inputs)[name]
        weight, hessian = handed[name]
        torch.testing.assert_close(hessian.double(), x.T @ x, rtol=1e-4, atol=1e-5)
        fp_weight = by_weight[name].double()
        if fp_target and _solved_before(name, names):
            expected = fp_target_weight(fp_weight, x.T @ x, fp_weight @ (fp_inputs[name] - x).T @ x)
            torch.testing.assert_close(weight.double(), expected, rtol=1e-3, atol=1e-5)
            moved += not torch.allclose(expected, fp_weight, rtol=1e-3, atol=1e-4)
        else:
            assert torch.equal(weight, by_weight[name])
    assert moved == (len(names) - 3 if fp_target else 0)  # all but block 0's q/k/v


def test_true_sequential_runs_a_small_blocks_batches_side_by_side_with_the_same_codes(two_threads):
    """Stage passes run side by side and are cut short after each stage's layers; the stand-ins
    serve the quantized stream only, so the codes are a one-thread run's."""
    alone, side_by_side, seen = _llama_on_one_and_two_threads(bits=3, fp_target=True, true_sequential=True, batch_size=2)
    assert len({ident for ident, _, _ in seen if ident != threading.get_ident()}) >= 2
    assert _assert_same_codes(side_by_side, alone) == len(find_quantizable_linears(tiny_model("llama")))


def test_a_held_pass_on_two_threads_computes_one_batch_more_at_once_with_a_one_thread_runs_codes(two_threads):
    """A held pass's slots change hands at every stage of every batch; one slot more than the
    threads keeps the cores busy through the hand-offs.  Here a norm between two stages takes a
    while: three of the four batches are inside it at once, and the codes are a one-thread run's."""
    lock = threading.Lock()
    inside: dict[nn.Module, int] = {}
    most = [0]

    def enter(module: nn.Module, args: tuple) -> None:
        with lock:
            inside[module] = inside.get(module, 0) + 1
            most[0] = max(most[0], inside[module])
        time.sleep(0.05)  # holding its slot, as a pass computing would

    def leave(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        with lock:
            inside[module] -= 1

    def slow_norms(model: nn.Module) -> None:
        for layer in model.model.layers:
            layer.post_attention_layernorm.register_forward_pre_hook(enter)
            layer.post_attention_layernorm.register_forward_hook(leave)

    alone, model, _ = _llama_on_one_and_two_threads(slow_norms, bits=3, fp_target=True, true_sequential=True, batch_size=2)
    assert most[0] == 3
    assert _assert_same_codes(model, alone) == len(find_quantizable_linears(tiny_model("llama")))


def test_true_sequential_solves_the_readers_of_one_gram_matrix_side_by_side(two_threads):
    """A stage of q/k/v has one Gram matrix for three solves: with two threads they run on two
    workers (each on its own copy of the matrix), with the codes of one thread."""
    seen, recording = _thread_recording_solver()
    model = tiny_model("llama")
    quantize_model(model, _config("llama", bits=3, true_sequential=True, batch_size=2), solver=recording)
    assert len(seen) == 14 and len({ident for ident, _ in seen}) >= 2 and {count for _, count in seen} == {1}
    torch.set_num_threads(1)
    alone = tiny_model("llama")
    quantize_model(alone, _config("llama", bits=3, true_sequential=True, batch_size=2))
    assert _assert_same_codes(model, alone) == 14


def _three_block_llama() -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=None,
    )  # fmt: skip
    return T.LlamaForCausalLM(config).eval()


def test_true_sequential_with_fp_target_runs_the_full_precision_stream_once_per_block():
    """In a middle block one full-precision pass keeps every stage's targets and the next block's;
    the quantized stream then runs once, held at each stage.  Under accelerate's hooks every
    targeted stage runs both streams to the end instead (the down_proj stage its quantized
    stream twice), with the same codes."""
    config = dict(bits=3, true_sequential=True, fp_target=True, batch_size=2)
    batches = 4

    def quantized(offload: bool) -> tuple[nn.Module, int]:
        model = _three_block_llama()
        if offload:
            accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        calls = []
        model.model.layers[1].mlp.down_proj.register_forward_hook(lambda *args: calls.append(1))
        quantize_model(model, _config("llama", **config))
        return model, len(calls)

    (in_memory, in_memory_calls), (offloaded, offloaded_calls) = quantized(False), quantized(True)
    assert _assert_same_codes(offloaded, in_memory) == 21
    # the capture's first batch (it runs every block), the full-precision pass, the held quantized pass;
    # the stages (and that each reads one input) were found on block 0
    assert in_memory_calls == 1 + batches + batches
    # offloaded: both streams of each of the four stages, to the end, and in the last the quantized one once more
    # (down_proj sums its target product apart from its Gram matrix)
    assert offloaded_calls == 1 + (4 * 2 + 1) * batches


def test_under_hooks_float32_sums_take_no_second_pass_for_the_down_projection():
    """The down_proj stage sums its target product apart from its Gram matrix only where handing the
    product over to the solver's float32 halves it; float32 sums would pay a pass for nothing."""
    model = _three_block_llama()
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    calls = []
    model.model.layers[1].mlp.down_proj.register_forward_hook(lambda *args: calls.append(1))
    quantize_model(model, _config("llama", bits=3, true_sequential=True, fp_target=True, batch_size=2, sum_dtype="float32"))
    assert len(calls) == 1 + 4 * 2 * 4  # the capture's first batch, then both streams of each stage for 4 batches


@pytest.mark.skipif(not thread_priority_is_per_thread(), reason="a thread's priority is its process's here")
def test_the_next_blocks_full_precision_pass_runs_ahead_while_a_block_is_solved_with_the_same_codes(
    two_threads, monkeypatch
):
    """With targets on two threads, the next block's full-precision pass starts on a thread of the
    lowest priority while a block's held pass runs (the block's first solve here waits until one of
    its batches ran there); whatever share runs ahead, each batch runs on one torch thread as the
    block's own pass would run it, so every code is that of a run without the pass ahead."""
    import hf_comq.calibration.sequential as sequential

    config = _config("llama", bits=3, true_sequential=True, fp_target=True, batch_size=2)
    ran_ahead = threading.Event()
    seen: list[tuple[str, int]] = []

    def note_block_one(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        if threading.current_thread().name == "hf_comq_ahead":
            ran_ahead.set()

    def waiting(weight, hessian, **kwargs):
        assert ran_ahead.wait(timeout=60)  # an idle core: the pass ahead runs
        return comq_quantize(weight, hessian, **kwargs)

    model = _three_block_llama()
    model.model.layers[1].register_forward_pre_hook(note_block_one, with_kwargs=True)
    quantize_model(model, config, solver=waiting)
    with monkeypatch.context() as patch:
        patch.setattr(sequential, "thread_priority_is_per_thread", lambda: False)
        plain = _three_block_llama()
        quantize_model(plain, config)
    assert ("hf_comq_ahead", 1) in seen
    assert _assert_same_codes(model, plain) == 21
    assert not [thread for thread in threading.enumerate() if thread.name == "hf_comq_ahead"]


def test_the_next_blocks_pass_waits_for_its_block_where_it_would_not_fit_beside_the_held_pass(
    two_threads, monkeypatch
) -> None:
    """Room for the held pass but not for the pass ahead beside it: the next block's full-precision
    pass runs when its block comes, on the side-by-side workers, none on a thread ahead."""
    import hf_comq.calibration.sequential as sequential

    monkeypatch.setattr(sequential._Calibrator, "_held_passes_fit", lambda self, block, captured, passes=1: passes == 1)
    names: list[str] = []
    model = _three_block_llama()
    model.model.layers[1].register_forward_pre_hook(lambda *args: names.append(threading.current_thread().name))
    quantize_model(model, _config("llama", bits=3, true_sequential=True, fp_target=True, batch_size=2))
    assert names and "hf_comq_ahead" not in names


def test_a_block_failing_while_the_next_blocks_pass_runs_ahead_leaves_no_thread_behind(two_threads) -> None:
    """The pass ahead is stopped after its current batch and its hooks leave the next block's layers."""
    model = _three_block_llama()
    solves = []

    def failing(weight, hessian, **kwargs):
        solves.append(1)
        if len(solves) == 4:  # block 0's o_proj: block 1's pass is ahead by then
            raise ValueError("solver failed")
        return comq_quantize(weight, hessian, **kwargs)

    config = _config("llama", bits=3, true_sequential=True, fp_target=True, batch_size=2)
    with pytest.raises(ValueError, match="solver failed"):
        quantize_model(model, config, solver=failing)
    assert not [thread for thread in threading.enumerate() if thread.name == "hf_comq_ahead"]
    layers = [module for module in model.model.layers[1].modules() if isinstance(module, nn.Linear)]
    assert layers and not any(module._forward_hooks or module._forward_pre_hooks for module in layers)


@pytest.mark.parametrize("fp_target", [False, True], ids=["plain", "fp-target"])
def test_true_sequential_runs_each_batch_through_a_block_once_with_the_codes_of_a_pass_per_stage(fp_target, monkeypatch):
    """In memory every batch runs a block once, held at each stage until it is solved: block 0's
    full-precision ``down_proj`` runs in the capture's first batch, stage discovery, the check that
    each stage reads one input, and once per batch.  Where the held passes would not fit in the free
    memory, each stage's passes stop once its layers are reached (after the first, which runs to the
    end) and one more pass makes the next block's inputs; under accelerate's hooks every pass runs to
    the end (and, with targets, once more in the down_proj stage, which sums its target product apart).  The
    sums, hence the codes, are the same all three ways, with targets too."""
    import hf_comq.calibration.sequential as sequential

    config = dict(bits=3, true_sequential=True, batch_size=2, fp_target=fp_target)
    batches = 4

    def quantized(offload: bool = False, free_memory: int | None = None) -> tuple[nn.Module, int]:
        model = tiny_model("llama")
        if offload:
            accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        calls = []
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *args: calls.append(1))
        with monkeypatch.context() as patch:
            if free_memory is not None:
                patch.setattr(sequential, "free_memory", lambda device: free_memory)
            quantize_model(model, _config("llama", **config))
        return model, len(calls)

    held, held_calls = quantized()
    staged, staged_calls = quantized(free_memory=0)
    offloaded, offloaded_calls = quantized(offload=True)
    targets = batches if fp_target else 0  # the full-precision pass keeping the targets (in memory)
    assert held_calls == 1 + 1 + 1 + targets + batches
    # passes per stage: each stage's first pass runs to the end (it arms the stop), the others stop at the
    # input of the stage's last layer (down_proj's in the last stage)
    assert staged_calls == 1 + 1 + targets + 3 + 1
    # offloaded, both streams of each targeted stage run to the end (block 0's first stage is not aimed), and the
    # last stage, whose down_proj sums its target product apart from its Gram matrix, runs the quantized one twice
    assert offloaded_calls == 1 + 1 + (8 if fp_target else 4) * batches
    assert _assert_same_codes(staged, held) == _assert_same_codes(offloaded, held) == 14


def test_sum_dtype_float32_sums_every_calibration_sum_in_float32_for_nearly_the_same_codes(monkeypatch):
    """``sum_dtype="float32"`` halves the Gram and target sums; summed over a few batches they
    round apart from float64's by float32's precision, so nearly every code of the first block is
    the same.  Later blocks see inputs made by the codes before them, so one code that lands on
    the other side of a near tie in the first block moves some codes of every later one; that is
    the block-sequential pipeline's, not the sums', and is not counted here."""
    import hf_comq.calibration.hooks as hooks

    made: list[torch.dtype] = []
    for name in ("HessianAccumulator", "TargetProductAccumulator"):
        original = getattr(hooks, name)

        def recording(*args, _original=original, **kwargs):
            accumulator = _original(*args, **kwargs)
            made.append(accumulator.dtype)
            return accumulator

        monkeypatch.setattr(hooks, name, recording)
    config = dict(bits=3, fp_target=True, batch_size=2)
    in_float64, in_float32 = _three_block_llama(), _three_block_llama()
    quantize_model(in_float64, _config("llama", **config))
    assert made and set(made) == {torch.float64}
    made.clear()
    quantize_model(in_float32, _config("llama", sum_dtype="float32", **config))
    assert made and set(made) == {torch.float32}
    same = total = 0
    for name, layer in in_float64.model.layers[0].named_modules():
        if isinstance(layer, COMQLinear):
            codes = unpack_codes(layer.weight_packed, 3, layer.in_features)
            other = unpack_codes(in_float32.model.layers[0].get_submodule(name).weight_packed, 3, layer.in_features)
            same += int((codes == other).sum())
            total += codes.numel()
    assert total and same / total >= 0.99


@pytest.mark.parametrize("settings", [{}, {"true_sequential": True, "fp_target": True}], ids=["default", "aimed"])
def test_calibration_passes_run_their_linear_layers_through_onednn(monkeypatch, settings):
    """Every forward pass of the calibration (plain, held stage by stage, full-precision targets)
    runs the block's linear layers through hf_comq.kernels.gemm.linear, on whichever thread runs it."""
    from hf_comq.kernels import gemm

    if not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN float32 product")
    monkeypatch.setattr(gemm, "onednn_preferred", lambda: True)  # also on CPUs without AVX-512
    seen = []
    real = gemm.linear

    def spy(x, weight, bias=None):
        seen.append(tuple(weight.shape))
        return real(x, weight, bias)

    monkeypatch.setattr(gemm, "linear", spy)
    model = tiny_model("llama")
    shapes = {tuple(module.weight.shape) for module in model.modules() if isinstance(module, nn.Linear)}
    quantize_model(model, _config("llama", bits=4, **settings))
    assert shapes <= set(seen)
