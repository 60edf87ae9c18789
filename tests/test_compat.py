"""The transformers internals hf_comq relies on (hf_comq/compat.py): each test fails loudly when one changes."""

import torch

from hf_comq.compat import LOADED_MARK, saved_state_dict_names, was_loaded
from tests.tiny import tiny_model


def test_from_pretrained_still_marks_the_tensors_it_loads(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert all(was_loaded(tensor) for tensor in loaded.state_dict(keep_vars=True).values()), LOADED_MARK
    assert not was_loaded(torch.zeros(2))


def test_saved_names_revert_transformers_renames():
    model = tiny_model("vit")
    state = {key: value for key, value in model.state_dict().items() if "layers.0.attention.q_proj" in key}
    names = saved_state_dict_names(model, state)
    assert names == {
        "vit.layers.0.attention.q_proj.weight": "vit.encoder.layer.0.attention.attention.query.weight",
        "vit.layers.0.attention.q_proj.bias": "vit.encoder.layer.0.attention.attention.query.bias",
    }, "transformers changed revert_weight_conversion or ViT's key renames"


def test_auto_mappings_still_list_class_names_by_model_type():
    from hf_comq.compat import auto_mapping
    from hf_comq.tasks import TASKS

    for task in TASKS:
        mapping = auto_mapping(task.mapping)
        assert isinstance(mapping, dict) and mapping, task.mapping
    assert auto_mapping("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES")["vit"] == "ViTForImageClassification"
    assert auto_mapping("MODEL_MAPPING_NAMES")["bert"] == "BertModel"


def test_quantizer_registries_hold_comq_after_registration():
    from hf_comq import register
    from hf_comq.compat import quantizer_registries
    from hf_comq.config import COMQConfig
    from hf_comq.quantizer import COMQHfQuantizer

    register()
    configs, quantizers = quantizer_registries()
    assert configs["comq"] is COMQConfig and quantizers["comq"] is COMQHfQuantizer
    assert "gptq" in configs and "gptq" in quantizers  # the tables transformers itself dispatches on


def test_module_patterns_match_as_transformers_quantizers_do():
    from hf_comq.compat import matches_module_pattern

    assert matches_module_pattern("model.layers.1.mlp", "model.layers.1")  # the start, up to a dot
    assert not matches_module_pattern("model.layers.11.mlp", "model.layers.1")
    assert matches_module_pattern("model.layers.11.mlp", "model.layers.*")  # a regex, same boundary
    assert matches_module_pattern("model.decoder.layers.23.fc1", "fc1")  # a suffix
    assert not matches_module_pattern("model.mlp.gate_proj", "model.mlp.gate")
