"""Placement: a model offloaded to disk by ``from_pretrained`` quantizes into the in-memory checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as T
from safetensors.torch import load_file

from hf_comq import COMQConfig
from hf_comq.calibration.placement import offloads_to_disk
from hf_comq.nn import COMQLinear

from tests.tiny import sentences, tiny_model, word_tokenizer


def _config() -> COMQConfig:
    return COMQConfig(dataset=sentences(8), processor=word_tokenizer(), num_samples=8, batch_size=4, group_size=16)


def _saved(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors, json.loads((folder / "config.json").read_text())["quantization_config"]


def test_disk_offloaded_from_pretrained_saves_the_in_memory_checkpoint(tmp_path):
    checkpoint = tmp_path / "llama"
    tiny_model("llama").save_pretrained(checkpoint)
    in_memory = T.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=_config())
    in_memory.save_pretrained(tmp_path / "memory")

    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    offloaded = T.AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=_config(), device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    layer = offloaded.model.layers[1].mlp.down_proj
    assert isinstance(layer, COMQLinear) and offloads_to_disk(layer) and layer.weight_packed.device.type == "meta"
    assert not offloads_to_disk(offloaded.model.layers[0].mlp.down_proj)
    offloaded.save_pretrained(tmp_path / "disk")

    (expected, expected_config), (got, got_config) = _saved(tmp_path / "memory"), _saved(tmp_path / "disk")
    assert sorted(got) == sorted(expected)
    assert "model.layers.1.mlp.down_proj.weight_packed" in got
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert got_config == expected_config
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids=ids).logits, in_memory(input_ids=ids).logits, rtol=0, atol=0)
