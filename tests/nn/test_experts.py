"""UnfusedExperts: the batched experts' outputs from per-expert layers, and which layouts it takes."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from hf_comq.nn import ExpertMLP, UnfusedExperts, every_token_to_every_expert
from hf_comq.nn.experts import is_standard_batched_experts
from tests.tiny import tiny_model


def experts_of(kind: str) -> nn.Module:
    model = tiny_model(kind)
    return next(module for name, module in model.named_modules() if name.endswith("experts"))


def routing(tokens: int, experts: int, top_k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=generator)
    return index, weights


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_unfused_experts_compute_what_the_batched_module_computes(kind):
    batched = experts_of(kind)
    unfused = UnfusedExperts.from_batched(batched, ("a", "b", "c"))
    hidden = torch.randn(11, batched.down_proj.shape[1])
    index, weights = routing(11, batched.num_experts, 2)
    with torch.no_grad():
        expected = batched(hidden, index, weights)
        torch.testing.assert_close(unfused(hidden, index, weights), expected, rtol=1e-6, atol=1e-6)
    expert = unfused[1]
    intermediate = batched.down_proj.shape[2]
    assert isinstance(expert, ExpertMLP) and [name for name, _ in expert.named_children()] == ["a", "b", "c", "act_fn"]
    assert torch.equal(expert.a.weight, batched.gate_up_proj[1, :intermediate])
    assert torch.equal(expert.b.weight, batched.gate_up_proj[1, intermediate:])
    assert torch.equal(expert.c.weight, batched.down_proj[1])
    assert expert.a.weight.data_ptr() != batched.gate_up_proj.data_ptr()  # a copy: the batched tensor can go


def test_dropped_routes_are_skipped_and_the_routed_rows_are_known_only_during_the_expert_call():
    unfused = UnfusedExperts.from_batched(experts_of("qwen3_moe"))
    hidden = torch.randn(4, 32)
    index = torch.tensor([[0, 4], [2, 0], [4, 4], [2, 1]])  # 4 == num_experts: a route transformers dropped
    weights = torch.ones(4, 2)
    seen = {}
    for expert in range(4):
        unfused[expert].gate_proj.register_forward_hook(
            lambda module, args, out, expert=expert: seen.__setitem__(expert, unfused.routed_rows()[0].tolist())
        )
    with torch.no_grad():
        output = unfused(hidden, index, weights)
    assert seen == {0: [0, 1], 1: [3], 2: [1, 3]}  # slot-major, as transformers orders them, of 4 tokens
    assert unfused.routed_rows() is None
    assert torch.equal(output[2], torch.zeros(32))  # both routes dropped


def test_every_token_to_every_expert_feeds_each_expert_all_tokens_and_keeps_the_routed_output():
    model = nn.Sequential(UnfusedExperts.from_batched(experts_of("qwen3_moe")))
    unfused = model[0]
    hidden = torch.randn(5, 32)
    index = torch.tensor([[0, 4], [2, 0], [4, 4], [2, 1], [0, 2]])  # expert 3 is never chosen
    weights = torch.rand(5, 2)
    seen = {}
    for expert in range(4):
        unfused[expert].down_proj.register_forward_hook(
            lambda module, args, out, expert=expert: seen.__setitem__(expert, (args[0].shape[0], unfused.routed_rows()))
        )
    with torch.no_grad():
        routed = unfused(hidden, index, weights)
        assert sorted(seen) == [0, 1, 2] and all(rows[1] == 5 for _, rows in seen.values())
        seen.clear()
        with every_token_to_every_expert(model):
            assert unfused.every_token
            every = unfused(hidden, index, weights)
        assert not unfused.every_token
    assert sorted(seen) == [0, 1, 2, 3]  # the unchosen expert runs too
    for count, (rows, tokens) in seen.values():
        assert count == 5 and tokens == 5 and rows.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(every, routed, rtol=1e-6, atol=1e-6)
    assert torch.equal(every[2], torch.zeros(32))  # a token whose routes were all dropped still gets nothing


def test_layouts_it_cannot_reproduce_stay_batched():
    assert is_standard_batched_experts(experts_of("mixtral"))
    assert not is_standard_batched_experts(experts_of("llama4"))  # transposed; every token to every expert
    gpt_oss = experts_of("mixtral")
    gpt_oss.gate_up_proj_bias = nn.Parameter(torch.zeros(4, 128))  # GPT-OSS style biases
    assert not is_standard_batched_experts(gpt_oss)
    with pytest.raises(ValueError, match="standard layout"):
        UnfusedExperts.from_batched(gpt_oss)

    class LooksTheSame(nn.Module):  # the right tensors, but no declared layout: its forward may compute anything
        def __init__(self):
            super().__init__()
            self.num_experts, self.act_fn = 4, nn.SiLU()
            self.gate_up_proj, self.down_proj = nn.Parameter(torch.zeros(4, 128, 32)), nn.Parameter(torch.zeros(4, 32, 64))

    assert not is_standard_batched_experts(LooksTheSame())


def test_an_empty_shell_is_shaped_like_the_experts_on_meta():
    batched = experts_of("mixtral")
    shell = UnfusedExperts.empty_like(batched, ("w1", "w3", "w2"))
    assert len(shell) == 4 and shell[3].w2.weight.shape == (32, 64) and shell[0].w1.weight.is_meta


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_experts_can_be_copied_pickled_and_saved_whole(how):
    unfused = UnfusedExperts.from_batched(experts_of("qwen3_moe"))
    hidden = torch.randn(5, 32)
    index, weights = routing(5, 4, 2)
    if how == "deepcopy":
        copied = copy.deepcopy(unfused)
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(unfused))
    else:
        buffer = io.BytesIO()
        torch.save(unfused, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    seen = []
    copied[int(index[0, 0])].gate_proj.register_forward_hook(lambda *args: seen.append(copied.routed_rows()))
    with torch.no_grad():
        torch.testing.assert_close(copied(hidden, index, weights), unfused(hidden, index, weights), rtol=0, atol=0)
    assert seen and seen[0] is not None and copied.routed_rows() is None  # the copy records its own routing


def test_experts_export_and_compute_what_they_compute_eagerly():
    """torch.export (and torch.compile with fullgraph=True) cannot branch on which experts the router chose."""
    unfused = UnfusedExperts.from_batched(experts_of("qwen3_moe"))
    hidden = torch.randn(5, 32)
    index = torch.tensor([[0, 4], [2, 0], [4, 4], [2, 1], [0, 2]])  # expert 3 unchosen, 4 a dropped route
    weights = torch.rand(5, 2)
    exported = torch.export.export(unfused, (hidden, index, weights)).module()
    other = routing(5, 4, 2, seed=1)
    with torch.no_grad():
        assert torch.equal(exported(hidden, index, weights), unfused(hidden, index, weights))
        assert torch.equal(exported(hidden, *other), unfused(hidden, *other))
