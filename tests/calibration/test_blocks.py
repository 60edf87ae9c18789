"""Block discovery: which ModuleLists are calibrated block by block, in which order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_comq.calibration import find_block_groups

from tests.tiny import tiny_models

EXPECTED = {
    "vit": [("vit.layers", 2)],
    "vit_model": [("layers", 2)],
    "deit": [("deit.layers", 2)],
    "dinov2": [("encoder.layer", 2)],
    "swin": [("swin.encoder.layers.0.blocks", 2), ("swin.encoder.layers.1.blocks", 2)],
    "bert": [("bert.encoder.layer", 2)],
    "gpt2": [("transformer.h", 2)],
    "llama": [("model.layers", 2)],
}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return tiny_models()


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_discovers_the_blocks_of_each_architecture(models, kind):
    groups = find_block_groups(models[kind])
    assert [(group.name, len(group)) for group in groups] == EXPECTED[kind]
    for group in groups:
        assert group.block_names == tuple(f"{group.name}.{index}" for index in range(len(group)))
        for block in group.block_names:
            assert isinstance(models[kind].get_submodule(block), nn.Module)


def test_swin_groups_follow_forward_order(models):
    """Stage 0's blocks must come before stage 1's: each group's inputs depend on the previous stage."""
    model = models["swin"]
    order = []
    handles = [
        model.get_submodule(group.block_names[0]).register_forward_pre_hook(
            lambda module, args, name=group.name: order.append(name)
        )
        for group in find_block_groups(model)
    ]
    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 32, 32))
    for handle in handles:
        handle.remove()
    assert order == [group.name for group in find_block_groups(model)]


def test_block_name_override_selects_that_list(models):
    groups = find_block_groups(models["llama"], block_name="model.layers")
    assert [(g.name, g.block_names) for g in groups] == [("model.layers", ("model.layers.0", "model.layers.1"))]


def test_block_name_of_a_container_of_lists_uses_its_leaf_lists(models):
    groups = find_block_groups(models["swin"], block_name="swin.encoder.layers")
    assert [g.name for g in groups] == ["swin.encoder.layers.0.blocks", "swin.encoder.layers.1.blocks"]


@pytest.mark.parametrize("name", ["model.nope", "model.norm", "lm_head"])
def test_block_name_must_be_a_module_list(models, name):
    with pytest.raises(ValueError, match="block_name"):
        find_block_groups(models["llama"], block_name=name)


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)


class _Generic(nn.Module):
    """A list of plain Linears (not blocks), a list without Linears, and the real block list."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(4, 4) for _ in range(5)])
        self.norms = nn.ModuleList([nn.LayerNorm(4) for _ in range(6)])
        self.trunk = nn.Sequential(nn.Identity(), nn.ModuleList([_Block(4) for _ in range(3)]))


def test_generic_discovery_ignores_lists_of_leaves_and_lists_without_linears():
    groups = find_block_groups(_Generic())
    assert [(g.name, g.block_names) for g in groups] == [("trunk.1", ("trunk.1.0", "trunk.1.1", "trunk.1.2"))]


def test_model_without_blocks_has_no_groups():
    assert find_block_groups(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))) == []


def test_t5_blocks_are_the_stacks_blocks_not_their_sublayers():
    """Each T5 block keeps its self-attention, cross-attention and feed-forward parts in a list of its own."""
    import transformers as T

    config = T.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0)
    groups = find_block_groups(T.T5ForConditionalGeneration(config))
    assert [(g.name, g.block_names) for g in groups] == [
        ("encoder.block", ("encoder.block.0", "encoder.block.1")),
        ("decoder.block", ("decoder.block.0", "decoder.block.1")),
    ]
