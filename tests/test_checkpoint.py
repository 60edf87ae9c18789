"""The compressed-tensors scheme hf_comq writes and reads, and what it refuses to read."""

import copy

import pytest
from compressed_tensors.quantization import QuantizationConfig
from transformers.utils.quantization_config import CompressedTensorsConfig

from hf_comq.checkpoint import (
    MIN_TRANSFORMERS_FOR_CONV1D,
    SUPPORTED_COMPRESSED_TENSORS,
    CheckpointError,
    PackedScheme,
    quantization_config_dict,
    read_packed_scheme,
    runtime_support,
)

PLAIN = f"transformers + `compressed-tensors{SUPPORTED_COMPRESSED_TENSORS}`, no hf_comq"

SCHEMES = [
    PackedScheme(bits=4, group_size=None, symmetric=False, ignore=["lm_head"]),
    PackedScheme(bits=3, group_size=64, symmetric=True),
    PackedScheme(bits=2, group_size=None, symmetric=False, layer_type="Conv1D", conv1d_rows=3072),
    PackedScheme(bits=8, group_size=32, symmetric=False, layer_type="Conv1D", conv1d_rows=32),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda scheme: f"{scheme.layer_type}-w{scheme.bits}")
def test_written_schemes_are_valid_compressed_tensors_and_read_back(scheme):
    written = quantization_config_dict(scheme)
    QuantizationConfig.model_validate(written)  # the library's own schema accepts it
    loaded = CompressedTensorsConfig.from_dict(copy.deepcopy(written))  # and so does transformers
    assert loaded.dequantize is True and loaded.quantization_config.format == "pack-quantized"
    assert written["version"] and "comq" not in written  # no provenance, no record (another tool's checkpoint)
    back = read_packed_scheme(written)
    assert (back.bits, back.group_size, back.symmetric, back.layer_type) == (
        scheme.bits, scheme.group_size if scheme.layer_type == "Linear" else None, scheme.symmetric, scheme.layer_type,
    )  # fmt: skip
    assert back.ignore == sorted(scheme.ignore)


def test_conv1d_blocks_are_one_output_channel_wide():
    weights = quantization_config_dict(SCHEMES[2])["config_groups"]["group_0"]["weights"]
    assert weights["strategy"] == "block" and weights["block_structure"] == [3072, 1]


def _with_weights(**changes) -> dict:
    written = quantization_config_dict(SCHEMES[0])
    written["config_groups"]["group_0"]["weights"].update(changes)
    return written


def _with_targets(targets: list[str]) -> dict:
    written = quantization_config_dict(SCHEMES[0])
    written["config_groups"]["group_0"]["targets"] = targets
    return written


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        ({"quant_method": "gptq", "bits": 4}, "not a compressed-tensors 'pack-quantized' checkpoint"),
        ({**quantization_config_dict(SCHEMES[0]), "format": "naive-quantized"}, "not a compressed-tensors"),
        (_with_weights(type="float"), "integer weights"),
        (_with_weights(strategy="tensor"), "strategy 'tensor'.*load it dense with plain transformers"),
        (_with_weights(actorder="group"), "activation-order"),
        (_with_weights(actorder="dynamic"), "activation-order indices .*load it dense with plain transformers"),
        (_with_weights(actorder="sideways"), "activation-order"),
        (
            {**quantization_config_dict(SCHEMES[0]), "config_groups": {}},
            "declares 0 quantization schemes",
        ),
        (
            _with_targets([r"re:.*self_attn\.(q|k|v)_proj$"]),
            r"scheme targets \['re:.*'\]; hf_comq loads schemes that target every layer of one class",
        ),
    ],
    ids=[
        "other-method", "other-format", "float", "tensor-strategy", "actorder", "actorder-alias", "actorder-unknown",
        "no-scheme", "regex-targets",
    ],  # fmt: skip
)
def test_checkpoints_hf_comq_cannot_hold_are_named(stored, message):
    with pytest.raises(CheckpointError, match=message):
        read_packed_scheme(stored)


@pytest.mark.parametrize("actorder", [None, "static", "weight"])
def test_activation_ordering_without_indices_reads_like_none(actorder):
    """compressed-tensors' "weight" ordering (llm-compressor's GPTQModifier(actorder="weight"); "static" is
    its alias) stores the weight in its own column order, as without any ordering."""
    assert read_packed_scheme(_with_weights(actorder=actorder)) == read_packed_scheme(_with_weights(actorder=None))


def test_conv1d_checkpoints_name_the_transformers_release_that_loads_them():
    conv1d = dict(runtime_support(SCHEMES[2], "GPT2LMHeadModel"))[PLAIN]
    assert f"transformers {MIN_TRANSFORMERS_FOR_CONV1D} or later" in conv1d and "random" in conv1d
    assert MIN_TRANSFORMERS_FOR_CONV1D not in dict(runtime_support(SCHEMES[0], "LlamaForCausalLM"))[PLAIN]


def test_activation_quantization_is_refused():
    written = quantization_config_dict(SCHEMES[0])
    written["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    with pytest.raises(CheckpointError, match="weight-only"):
        read_packed_scheme(written)


@pytest.mark.parametrize(
    ("section", "value"),
    [
        ("transform_config", {"config_groups": {"u": {"type": "hadamard", "apply": [{"targets": ["Linear"]}]}}}),
        ("sparsity_config", {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}),
        ("kv_cache_scheme", {"num_bits": 8, "type": "float"}),
    ],
)
def test_sections_that_change_what_the_tensors_mean_are_refused(section, value):
    """Rotations applied at run time (llm-compressor's QuIP and SpinQuant), sparse layouts and a quantized
    cache: loaded without them the outputs are wrong, with no error; an empty section is no such thing."""
    written = quantization_config_dict(SCHEMES[0])
    assert read_packed_scheme({**written, section: None if section == "kv_cache_scheme" else {}}) is not None
    if section == "sparsity_config":  # llm-compressor records the share of zero weights of any model so
        assert read_packed_scheme({**written, section: {"format": "dense", "global_sparsity": 0.14}}) is not None
    with pytest.raises(CheckpointError, match=f"has a {section} .* which hf_comq does not apply"):
        read_packed_scheme({**written, section: value})


def test_runtime_support_names_every_runtime_and_what_is_unverified():
    linear = dict(runtime_support(SCHEMES[0], "LlamaForCausalLM"))
    assert "dense" in linear[PLAIN]
    assert "packed" in linear["`hf_comq.load_quantized`"]
    assert "Marlin" in linear["vLLM"] and "not run" in linear["vLLM"]
    assert "Humming" in dict(runtime_support(SCHEMES[1], "LlamaForCausalLM"))["vLLM"]
    assert "not served" in dict(runtime_support(SCHEMES[2], "GPT2LMHeadModel"))["vLLM"]
    assert "not served" in dict(runtime_support(SCHEMES[0], "ViTForImageClassification"))["vLLM"]
    token_classifier = dict(runtime_support(SCHEMES[0], "BertForTokenClassification"))["vLLM"]
    assert token_classifier.startswith("not checked") and "image" not in token_classifier
    moe = dict(runtime_support(SCHEMES[0], "MixtralForCausalLM", batched_experts=True))
    assert "does not load" in moe[PLAIN]
    llama4 = dict(runtime_support(SCHEMES[0], "Llama4ForCausalLM", batched_experts=True))  # loads, experts random
    assert llama4[PLAIN].startswith("does not load it correctly: it loads without an error, but with the experts' weights random")
    asymmetric_experts = dict(runtime_support(SCHEMES[0], "MixtralForCausalLM", quantized_experts=True))
    assert "drops the zero points" in asymmetric_experts[PLAIN]
    assert "Marlin" in asymmetric_experts["vLLM"] and "not run" in asymmetric_experts["vLLM"]  # W4 per channel
    symmetric_experts = dict(runtime_support(SCHEMES[1], "MixtralForCausalLM", quantized_experts=True))
    assert "loads it exactly" in symmetric_experts[PLAIN]
    assert "Humming" in symmetric_experts["vLLM"]  # W3: no Marlin or Triton kernel for 3-bit experts
    dinov2 = dict(runtime_support(SCHEMES[0], "Dinov2Model"))
    assert "does not load" in dinov2[PLAIN]
    detr = dict(runtime_support(SCHEMES[0], "DetrForObjectDetection", weight_buffers=True))
    assert "does not load it: its compressed-tensors loader dequantizes every `weight`" in detr[
        PLAIN
    ]
