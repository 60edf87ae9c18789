"""The architectures users bring, beyond the ones the other tests build by hand: each quantizes, saves and reloads.

Tiny models built from each model type's own config class (no downloads), quantized through the
real pipeline (round to nearest at 8 bits: these tests are about finding, running and storing
the layers, not about the solver), saved, and loaded again with :func:`hf_comq.load_quantized`,
which must reproduce the in-memory model bit for bit on the exact path.  Each is also quantized
at 3 bits with the default solver and calibration, which there runs the full-precision stream
beside the quantized one (``fp_target``), and with ``true_sequential``, whose held passes must
give the codes of its passes per stage.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from hf_comq import COMQConfig, COMQLinear, calibration_summary, load_quantized
from hf_comq.kernels import DISABLE_ENV_VAR
from hf_comq.modules import find_quantizable_linears, unfuse_batched_experts
from hf_comq.solver import ROUND_TO_NEAREST

SMALL = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    intermediate_size=64, head_dim=16, pad_token_id=0, bos_token_id=0, eos_token_id=0, max_position_embeddings=64,
)  # fmt: skip
CAUSAL = {
    "mistral": {}, "qwen3": {}, "gemma": {}, "gemma2": {}, "gemma3_text": {}, "phi3": {}, "phi": {}, "granite": {},
    "starcoder2": {}, "olmo2": {}, "stablelm": {}, "cohere": {}, "smollm3": {}, "glm": {}, "exaone4": {},
    "gpt_neox": {}, "opt": dict(ffn_dim=64, word_embed_proj_dim=32), "bloom": dict(n_layer=2, n_head=2),
    "gptj": dict(n_embd=32, n_layer=2, n_head=2, rotary_dim=8), "gpt_bigcode": dict(n_embd=32, n_layer=2, n_head=2),
    "codegen": dict(n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_ctx=64, n_positions=64),
    "mpt": dict(d_model=32, n_heads=2, n_layers=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    ),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=1, head_dim=None),  # FalconLinear: its own forward
    "mamba": dict(state_size=8, expand=2, conv_kernel=4),  # a state-space model: its blocks hold Linear projections
}  # fmt: skip
ENCODERS = {
    "roberta": {}, "xlm-roberta": {}, "deberta-v2": {}, "mpnet": {}, "electra": dict(embedding_size=32),
    "albert": dict(embedding_size=32), "modernbert": dict(global_attn_every_n_layers=1),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "longformer": dict(attention_window=4),
}  # fmt: skip
SEQ2SEQ = {
    "t5": dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0),
    "bart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_start_token_id=0),
    # no prepare_decoder_input_ids_from_labels: calibration shifts the text right itself
    "m2m_100": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                    encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_start_token_id=2, pad_token_id=1),
    "marian": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                   encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_start_token_id=0, decoder_vocab_size=64),
}  # fmt: skip
VISION_SMALL = dict(
    image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
)  # fmt: skip
VISION = {
    "beit": {}, "data2vec-vision": {}, "dinov2_with_registers": {}, "clip_vision_model": {}, "siglip_vision_model": {},
    "ijepa": {}, "yolos": dict(image_size=[32, 32], num_detection_tokens=2),
    "convnext": dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
    "focalnet": dict(embed_dim=16, depths=[1, 1], focal_levels=[2, 2], focal_windows=[3, 3], patch_size=4),
    "levit": dict(hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8],
                  patch_size=16, stride=2),
    "segformer": dict(hidden_sizes=[16, 32], depths=[1, 1], num_encoder_blocks=2, num_attention_heads=[1, 2],
                      sr_ratios=[2, 1], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2]),
}  # fmt: skip
# Layers whose forward never runs on these inputs, which stay in full precision (with a warning): Mamba reads
# dt_proj's weight inside its scan, Longformer's global-attention projections run only for global tokens.
NEVER_RUN = {"mamba": ("mixer.dt_proj",), "longformer": ("_global",)}
CASES = (
    [("causal", name) for name in CAUSAL]
    + [("encoder", name) for name in ENCODERS]
    + [("seq2seq", name) for name in SEQ2SEQ]
    + [("vision", name) for name in VISION]
)
AUTO_CLASS = {
    "causal": T.AutoModelForCausalLM, "encoder": T.AutoModel, "seq2seq": T.AutoModelForSeq2SeqLM, "vision": T.AutoModel,
}  # fmt: skip


def _expected_layers(kind: str, model_type: str) -> list[str]:
    """The layers a quantized model must hold packed: every linear layer found, each expert's included,
    but those that never run (:data:`NEVER_RUN`)."""
    unfused = _build(kind, model_type)
    unfuse_batched_experts(unfused)  # a mixture of experts: each expert's layers are quantized too
    never = NEVER_RUN.get(model_type, ())
    return sorted(name for name in find_quantizable_linears(unfused) if not name.endswith(never))


def _build(kind: str, model_type: str) -> torch.nn.Module:
    if kind == "vision":
        config = T.AutoConfig.for_model(model_type, **{**VISION_SMALL, **VISION[model_type]})
    else:
        settings = {**SMALL, **{**CAUSAL, **ENCODERS, **SEQ2SEQ}[model_type]}
        config = T.AutoConfig.for_model(model_type, **{key: value for key, value in settings.items() if value is not None})
    torch.manual_seed(0)
    return AUTO_CLASS[kind].from_config(config).eval()


def _inputs(kind: str, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "vision":
        return torch.randn(count, 3, 32, 32, generator=generator)
    return torch.randint(1, 64, (count, 12), generator=generator)


def _output(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    if inputs.is_floating_point():
        feed = {"pixel_values": inputs}
    else:
        feed = {"input_ids": inputs}
        if model.config.is_encoder_decoder:
            feed["decoder_input_ids"] = inputs[:, :5]
    with torch.no_grad():
        output = model(**feed)
    if getattr(output, "logits", None) is not None:
        return output.logits
    return output.last_hidden_state if getattr(output, "last_hidden_state", None) is not None else output[0]


@pytest.mark.parametrize(("kind", "model_type"), CASES, ids=[name for _, name in CASES])
def test_architecture_quantizes_saves_and_reloads(kind, model_type, tmp_path, monkeypatch):
    monkeypatch.setenv(DISABLE_ENV_VAR, "1")  # the exact path, so that a reload must match bit for bit
    model = _build(kind, model_type)
    expected = _expected_layers(kind, model_type)
    inputs = _inputs(kind, 2, seed=3)
    reference = _output(model, inputs)
    model.save_pretrained(tmp_path / "fp")
    data = _inputs(kind, 8, seed=1)
    config = COMQConfig(bits=8, dataset=data, num_samples=8, **ROUND_TO_NEAREST)
    quantized = AUTO_CLASS[kind].from_pretrained(tmp_path / "fp", quantization_config=config).eval()
    converted = sorted(name for name, module in quantized.named_modules() if isinstance(module, COMQLinear))
    assert expected and converted == expected
    output = _output(quantized, inputs)
    assert float((output - reference).norm() / reference.norm()) < 0.05
    quantized.save_pretrained(tmp_path / "quantized")
    assert torch.equal(_output(load_quantized(tmp_path / "quantized").eval(), inputs), output)


@pytest.mark.parametrize(("kind", "model_type"), CASES, ids=[name for _, name in CASES])
def test_architecture_quantizes_at_three_bits_aimed_at_full_precision_outputs(kind, model_type, tmp_path):
    """At 3 bits the default runs the full-precision stream beside the quantized one (``fp_target``):
    every architecture's blocks must take both, and every layer must still be quantized."""
    model = _build(kind, model_type)
    expected = _expected_layers(kind, model_type)
    model.save_pretrained(tmp_path / "fp")
    config = COMQConfig(bits=3, dataset=_inputs(kind, 8, seed=1), num_samples=8)
    quantized = AUTO_CLASS[kind].from_pretrained(tmp_path / "fp", quantization_config=config).eval()
    assert calibration_summary(quantized)["fp_target"] is True
    assert sorted(name for name, module in quantized.named_modules() if isinstance(module, COMQLinear)) == expected
    assert torch.isfinite(_output(quantized, _inputs(kind, 2, seed=3))).all()


@pytest.mark.parametrize(("kind", "model_type"), CASES, ids=[name for _, name in CASES])
def test_architecture_true_sequential_gets_the_same_codes_held_or_pass_by_pass(kind, model_type, tmp_path, monkeypatch):
    """``true_sequential`` in memory holds every batch at each stage of a block instead of running the
    block once per stage, wherever the block's stages allow it (not a mixture's experts, nor a block
    whose stage reads two inputs, such as a parallel attention and MLP); where the free memory would
    not hold every batch's pass, it runs pass by pass.  Either way the checkpoint is the same."""
    import hf_comq.calibration.sequential as sequential

    _build(kind, model_type).save_pretrained(tmp_path / "fp")
    config = COMQConfig(bits=3, dataset=_inputs(kind, 8, seed=1), num_samples=8, batch_size=2, true_sequential=True)
    held = AUTO_CLASS[kind].from_pretrained(tmp_path / "fp", quantization_config=config).state_dict()
    monkeypatch.setattr(sequential, "free_memory", lambda device: 0)
    pass_by_pass = AUTO_CLASS[kind].from_pretrained(tmp_path / "fp", quantization_config=config).state_dict()
    assert held.keys() == pass_by_pass.keys()
    assert [name for name, tensor in held.items() if not torch.equal(tensor, pass_by_pass[name])] == []
