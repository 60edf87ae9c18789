"""Which layers COMQ converts by default: body linears yes, task heads and non-linear modules no."""

import re

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_comq.modules import (
    batched_expert_weights,
    default_modules_to_not_convert,
    expert_layers,
    expert_parameter_share,
    expert_projection_names,
    find_quantizable_linears,
    matches,
    modules_kept_in_full_precision,
    modules_with_weight_buffers,
    unfuse_batched_experts,
)
from hf_comq.nn import UnfusedExperts, computes_linear_map, has_own_forward
from tests.tiny import tiny_model

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)


@pytest.mark.parametrize(
    ("build", "skipped", "count"),
    [
        (lambda: T.ViTForImageClassification(T.ViTConfig(**VIT, num_labels=3)), ["classifier"], 12),
        (lambda: T.ViTModel(T.ViTConfig(**VIT)), ["pooler"], 12),
        (
            lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**VIT, num_labels=3)),
            ["cls_classifier", "distillation_classifier"],
            12,
        ),
        (
            lambda: T.BertForMaskedLM(
                T.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
            ),
            ["cls"],
            12,
        ),
        (
            lambda: T.GPT2LMHeadModel(
                T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
            ),
            ["lm_head"],
            8,
        ),
        (  # a task head named neither classifier nor *_head: what the task class adds around its base model
            lambda: T.XLNetForSequenceClassification(
                T.XLNetConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, d_inner=64, num_labels=3)
            ),
            ["logits_proj", "sequence_summary"],
            4,
        ),
        (  # q_head / k_head / v_head inside its blocks are attention layers of the body, not heads
            lambda: T.FunnelModel(
                T.FunnelConfig(vocab_size=64, d_model=32, n_head=2, d_head=16, d_inner=64, block_sizes=[1, 1],
                               num_decoder_layers=1)  # fmt: skip
            ),
            [],
            18,
        ),
    ],
)
def test_defaults_keep_heads_in_full_precision(build, skipped, count):
    model = build()
    assert default_modules_to_not_convert(model) == skipped
    layers = find_quantizable_linears(model)
    assert len(layers) == count
    assert all(isinstance(module, (nn.Linear, Conv1D)) for module in layers.values())
    assert not any(matches(name, head) for name in layers for head in skipped)


def test_a_shared_experts_gate_stays_in_full_precision():
    """Qwen2-MoE gates its shared expert with an ``nn.Linear(hidden, 1)`` per layer; vLLM builds it as a
    plain layer, and llm-compressor's recipes leave it out: packed, the checkpoint would not serve."""
    model = T.Qwen2MoeForCausalLM(
        T.Qwen2MoeConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4,
            num_experts_per_tok=2,
        )
    )  # fmt: skip
    gates = [f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)]
    assert default_modules_to_not_convert(model) == sorted(["lm_head", *gates])
    layers = find_quantizable_linears(model)
    assert "model.layers.0.mlp.shared_expert.down_proj" in layers and not any(gate in layers for gate in gates)


def test_gpt2_conv1d_layers_are_found():
    model = T.GPT2Model(T.GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0))
    assert sorted(find_quantizable_linears(model)) == ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"]


def test_a_user_list_extends_the_head_list():
    model = T.ViTForImageClassification(T.ViTConfig(**VIT, num_labels=3))
    assert "classifier" not in find_quantizable_linears(model, [])
    only_second = find_quantizable_linears(model, ["vit.layers.0"])
    assert only_second and all(name.startswith("vit.layers.1.") for name in only_second)
    assert not find_quantizable_linears(model, ["vit"])
    assert sorted(find_quantizable_linears(model, ["vit.layers.*.mlp", "q_proj"])) == sorted(
        f"vit.layers.{i}.attention.{name}" for i in range(2) for name in ("k_proj", "v_proj", "o_proj")
    )
    assert modules_kept_in_full_precision(model, ["vit.layers.0", "classifier"]) == ["classifier", "vit.layers.0"]


def test_a_head_keeps_its_own_layers_only():
    """Head entries are module names: a body layer whose name merely ends like a head stays quantized."""
    model = nn.ModuleDict({"body": nn.ModuleDict({"out_projection": nn.Linear(4, 4)}), "projection": nn.Linear(4, 2)})
    assert default_modules_to_not_convert(model) == ["projection"]
    assert list(find_quantizable_linears(model)) == ["body.out_projection"]


@pytest.mark.parametrize("entries", [["does.not.exist"], ["vit.layers.0", "layer.1"], ["classifer"], ["layers.0"]])
def test_entries_that_match_no_module_are_an_error(entries):
    """``layers.0`` names a module (by suffix) but keeps no layer, as in every transformers quantizer: an error."""
    model = T.ViTForImageClassification(T.ViTConfig(**VIT, num_labels=3))
    unmatched = [entry for entry in entries if entry != "vit.layers.0"]
    with pytest.raises(ValueError, match=re.escape(f"modules_to_not_convert: {unmatched} match no module")):
        find_quantizable_linears(model, entries)


def test_entries_match_as_in_transformers_quantizers():
    assert matches("vit.layers.1.mlp.fc1", "vit.layers.1")
    assert not matches("vit.layers.11.mlp.fc1", "vit.layers.1")
    assert matches("vit.layers.11.mlp.fc1", "vit.layers.*.mlp")
    assert not matches("model.mlp.gate_proj", "model.mlp.gate")
    assert matches("model.lm_head", "lm_head")
    assert not matches("vit.layers.1.mlp.fc1", "layers.1")  # neither the start of the name nor its end
    with pytest.raises(ValueError, match=r"'layers\[' is not a valid regular expression"):
        matches("vit.layers.1", "layers[")


def test_linear_subclasses_are_checked_by_running_them():
    class Router(nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            return logits.softmax(-1), logits

    class Grouped(nn.Linear):  # two groups of half the inputs each, as a grouped projection
        def forward(self, x):
            halves = x.chunk(2, -1)
            return torch.cat([F.linear(halves[0], self.weight[:2, :2]), F.linear(halves[1], self.weight[2:, 2:])], -1)

    class SameMapAnotherWay(nn.Linear):  # Falcon's FalconLinear
        def forward(self, x):
            return x @ self.weight.T + self.bias

    class KeepsForward(nn.Linear):
        pass

    layers = [nn.Linear(4, 4), Router(4, 2), Grouped(4, 4, bias=False), SameMapAnotherWay(4, 4), KeepsForward(4, 4)]
    assert [has_own_forward(layer) for layer in layers] == [False, True, True, True, False]
    assert [computes_linear_map(layer) for layer in layers] == [True, False, False, True, True]
    assert sorted(find_quantizable_linears(nn.Sequential(*layers))) == ["0", "1", "2", "3", "4"]  # checked when calibrating


def test_batched_expert_weights_are_found_by_the_transformers_convention():
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_experts = 3
            self.gate_up_proj = nn.Parameter(torch.zeros(3, 8, 4))
            self.down_proj = nn.Parameter(torch.zeros(3, 4, 4))
            self.other = nn.Parameter(torch.zeros(2, 4, 4))  # does not lead with the experts

    model = nn.ModuleDict({"experts": Experts(), "position": nn.Embedding(3, 4)})
    model.register_parameter("cls_token", nn.Parameter(torch.zeros(1, 1, 4)))  # 3-D, but no experts
    assert batched_expert_weights(model) == {"experts.gate_up_proj": 96, "experts.down_proj": 48}


def test_expert_layers_take_the_checkpoint_names_of_the_models_weight_mapping():
    assert expert_projection_names(tiny_model("mixtral")) == ("w1", "w3", "w2")
    assert expert_projection_names(tiny_model("qwen3_moe")) == ("gate_proj", "up_proj", "down_proj")


def test_unfusing_replaces_every_batched_experts_module_or_none():
    model = tiny_model("mixtral")
    assert unfuse_batched_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert isinstance(model.model.layers[1].mlp.experts, UnfusedExperts) and not batched_expert_weights(model)
    assert sorted(expert_layers(model))[:3] == [f"model.layers.0.mlp.experts.0.{name}" for name in ("w1", "w2", "w3")]
    assert len(expert_layers(model)) == 2 * 4 * 3
    assert expert_layers(model)["model.layers.1.mlp.experts.3.w2"] is model.model.layers[1].mlp.experts
    kept = tiny_model("mixtral")  # a checkpoint mixing packed and dense experts would load nowhere: none are unfused
    assert unfuse_batched_experts(kept, ["model.layers.1.mlp.experts"]) == []
    assert len(batched_expert_weights(kept)) == 4
    offloaded = tiny_model("mixtral")
    offloaded.model.layers[0].mlp.experts.to("meta")  # as accelerate leaves offloaded weights: not to be split here
    assert unfuse_batched_experts(offloaded) == [] and unfuse_batched_experts(offloaded, empty=True)
    installed = []
    assert unfuse_batched_experts(tiny_model("mixtral"), install=lambda model, name, build: installed.append(name))
    assert installed == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def test_a_modules_to_not_convert_entry_may_name_batched_experts():
    model = tiny_model("qwen3_moe")
    kept = find_quantizable_linears(model, ["model.layers.*.mlp.experts"])  # an entry naming no nn.Linear: no error
    assert not any("experts" in name for name in kept)
    # A suffix of the experts module, as transformers reads an entry for the model as loaded.
    assert not any("experts" in name for name in find_quantizable_linears(model, ["experts"]))
    assert unfuse_batched_experts(model, ["experts"]) == [] and len(batched_expert_weights(model)) == 2 * 2


def test_buffers_named_weight_are_found():
    """DETR's backbone freezes its batch norms as buffers: plain transformers' compressed-tensors loader
    fails on such a checkpoint, and the model card must say so."""
    config = T.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, d_model=32, encoder_layers=1,
                          decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, num_queries=5, backbone_config=T.ResNetConfig(
                              embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage2"]))  # fmt: skip
    found = modules_with_weight_buffers(T.DetrForObjectDetection(config))
    assert found and all("backbone" in name for name in found)
    assert modules_with_weight_buffers(tiny_model("llama")) == []


def test_the_expert_share_counts_packed_layers_as_the_weights_they_replaced(tmp_path):
    """The card's "kept in full precision (N% of the parameters)" was counted on the quantized model,
    whose packed layers hold buffers: the share grew with every other layer quantized."""
    from tests.tiny import quantize_tiny

    model = tiny_model("mixtral")
    before = expert_parameter_share(model)
    model.save_pretrained(tmp_path)
    quantized = quantize_tiny(tmp_path, type(model), modules_to_not_convert=["experts"])
    assert 0 < before < 1 and expert_parameter_share(quantized) == pytest.approx(before)
