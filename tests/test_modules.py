"""Which layers COMQ converts by default: body linears yes, task heads and non-linear modules no."""

import re

import pytest
import transformers as T
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_comq.modules import (
    default_modules_to_not_convert,
    find_quantizable_linears,
    matches,
    modules_kept_in_full_precision,
)

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
    ],
)
def test_defaults_keep_heads_in_full_precision(build, skipped, count):
    model = build()
    assert default_modules_to_not_convert(model) == skipped
    layers = find_quantizable_linears(model)
    assert len(layers) == count
    assert all(isinstance(module, (nn.Linear, Conv1D)) for module in layers.values())
    assert not any(matches(name, head) for name in layers for head in skipped)


def test_gpt2_conv1d_layers_are_found():
    model = T.GPT2Model(T.GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0))
    assert sorted(find_quantizable_linears(model)) == ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"]


def test_a_user_list_extends_the_head_list():
    model = T.ViTForImageClassification(T.ViTConfig(**VIT, num_labels=3))
    assert "classifier" not in find_quantizable_linears(model, [])
    only_second = find_quantizable_linears(model, ["layers.0"])
    assert only_second and all(name.startswith("vit.layers.1.") for name in only_second)
    assert not find_quantizable_linears(model, ["vit"])
    assert modules_kept_in_full_precision(model, ["layers.0", "classifier"]) == ["classifier", "layers.0"]


@pytest.mark.parametrize("entries", [["does.not.exist"], ["layers.0", "layer.1"], ["classifer"]])
def test_entries_that_match_no_module_are_an_error(entries):
    model = T.ViTForImageClassification(T.ViTConfig(**VIT, num_labels=3))
    unmatched = [entry for entry in entries if entry != "layers.0"]
    with pytest.raises(ValueError, match=re.escape(f"modules_to_not_convert: {unmatched} match no module")):
        find_quantizable_linears(model, entries)


def test_matching_respects_component_boundaries_and_wildcards():
    assert matches("vit.layers.1.mlp.fc1", "layers.1")
    assert not matches("vit.layers.11.mlp.fc1", "layers.1")
    assert matches("vit.layers.11.mlp.fc1", "layers.*.mlp")
    assert not matches("model.mlp.gate_proj", "mlp.gate")
    assert matches("model.lm_head", "lm_head")
