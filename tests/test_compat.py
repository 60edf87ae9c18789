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
