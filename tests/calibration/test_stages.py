"""True-sequential stages inside a block: how they are found, cut short, and run quantized."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from hf_comq.calibration.blocks import find_block_groups
from hf_comq.calibration.stages import QuantizedStandIns, StageStop, layer_stages
from hf_comq.modules import find_quantizable_linears, unfuse_batched_experts
from hf_comq.nn import COMQLinear
from hf_comq.solver import comq_quantize

from tests.tiny import model_inputs, tiny_model

EXPECTED_STAGES = {
    "vit": [["attention.q_proj", "attention.k_proj", "attention.v_proj"], ["attention.o_proj"], ["mlp.fc1"], ["mlp.fc2"]],
    "bert": [
        ["attention.self.query", "attention.self.key", "attention.self.value"],
        ["attention.output.dense"],
        ["intermediate.dense"],
        ["output.dense"],
    ],
    "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    "llama": [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ],
}


class _Branches(nn.Module):
    """``a`` and ``b`` read the input, ``c`` reads their sum, ``d`` reads the input again after
    ``c`` has run, and ``never`` does not run: ``d`` depends on nothing, ``c`` on ``a`` and ``b``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c, self.d, self.never = (nn.Linear(4, 4) for _ in range(5))

    def forward(self, x):
        hidden = self.c(torch.relu(self.a(x) + self.b(x)))
        return hidden + self.d(x)


def _first_block_call(model: nn.Module) -> tuple[str, nn.Module, tuple, dict]:
    """The first block of ``model``, and its inputs on a forward pass of a couple of samples."""
    name = find_block_groups(model)[0].block_names[0]
    block = model.get_submodule(name)
    seen = {}

    def keep(module, args, kwargs):
        seen["call"] = (args, kwargs)
        raise StopIteration

    handle = block.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**model_inputs(model))
    except StopIteration:
        pass
    finally:
        handle.remove()
    return name, block, *seen["call"]


@pytest.mark.parametrize("kind", sorted(EXPECTED_STAGES))
def test_stages_follow_each_blocks_data_flow(kind):
    model = tiny_model(kind)
    block_name, block, args, kwargs = _first_block_call(model)
    names = [name for name in find_quantizable_linears(model) if name.startswith(f"{block_name}.")]
    reference = block(*args, **kwargs)
    with torch.no_grad():
        stages = layer_stages(model, names, lambda: block(*args, **kwargs))
    assert [[name[len(block_name) + 1 :] for name in stage] for stage in stages] == EXPECTED_STAGES[kind]
    again = block(*args, **kwargs)  # the hooks are gone and the block computes as before
    torch.testing.assert_close(again[0] if isinstance(again, tuple) else again,
                               reference[0] if isinstance(reference, tuple) else reference)


def test_the_experts_of_a_mixture_share_their_stages():
    """Each expert's gate/up read the tokens routed to it, its down their product: all
    experts' gate/up in one stage after the attention, all their downs in the next."""
    model = tiny_model("qwen3_moe")
    unfuse_batched_experts(model)
    block_name, block, args, kwargs = _first_block_call(model)
    names = [name for name in find_quantizable_linears(model) if name.startswith(f"{block_name}.")]
    with torch.no_grad():
        stages = layer_stages(model, names, lambda: block(*args, **kwargs))
    experts = sorted({name.split(".experts.")[1].split(".")[0] for name in names if ".experts." in name})
    assert len(experts) == 4
    assert [sorted(name[len(block_name) + 1 :] for name in stage) for stage in stages] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        sorted(f"mlp.experts.{e}.{p}" for e in experts for p in ("gate_proj", "up_proj")),
        sorted(f"mlp.experts.{e}.down_proj" for e in experts),
    ]


def test_independent_layers_share_a_stage_and_a_layer_that_never_ran_joins_the_last():
    block = _Branches()
    x = torch.randn(3, 4)
    stages = layer_stages(block, ["a", "b", "c", "d", "never"], lambda: block(x))
    assert stages == [["a", "b", "d"], ["c", "never"]]


class _InPlace(nn.Module):
    """Changes its first layer's output in place before the second layer reads it (as some models do)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        hidden = self.first(x)
        hidden.mul_(2.0).relu_()
        return self.second(hidden)


def test_a_model_changing_a_layers_output_in_place_is_staged_all_the_same():
    block = _InPlace()
    x = torch.randn(3, 4)
    expected = block(x)
    assert layer_stages(block, ["first", "second"], lambda: block(x)) == [["first"], ["second"]]
    torch.testing.assert_close(block(x), expected)


def test_a_stage_stop_ends_the_pass_after_the_stages_layers():
    block = _Branches()
    ran: list[str] = []
    for name in ("a", "b", "c", "d"):
        getattr(block, name).register_forward_hook(lambda module, args, output, name=name: ran.append(name))
    x = torch.randn(3, 4)
    with StageStop(block, ["a", "b"]) as stop:
        assert stop.run(block, (x,), {}) is None
        assert ran == ["a", "b"]
    ran.clear()
    with StageStop(block, ["d", "never"]) as stop:  # `never` never runs: the pass goes to the end
        torch.testing.assert_close(stop.run(block, (x,), {}), block(x))
    assert ran[:4] == ["a", "b", "c", "d"]
    ran.clear()
    block(x)  # no stop is left behind
    assert ran == ["a", "b", "c", "d"]


def test_stand_ins_run_the_solved_layer_quantized_only_inside_active_and_only_on_that_thread():
    block = _Branches()
    x = torch.randn(3, 4)
    weight = block.a.weight.detach()
    qweight = comq_quantize(weight, torch.eye(4), bits=2)
    packed = COMQLinear.from_quantized(block.a, qweight)
    full_precision = block(x)
    with torch.no_grad(), QuantizedStandIns(block, torch.device("cpu"), symmetric=False) as stand_ins:
        stand_ins.add("a", qweight)
        with stand_ins.active():
            quantized = block(x)
            other_thread = {}
            worker = threading.Thread(target=lambda: other_thread.setdefault("out", block(x)))
            worker.start()
            worker.join()
        expected = block.c(torch.relu(packed(x) + block.b(x))) + block.d(x)
        torch.testing.assert_close(quantized, expected)
        torch.testing.assert_close(other_thread["out"], full_precision)
        torch.testing.assert_close(block(x), full_precision)
    assert not torch.allclose(quantized, full_precision)
    with stand_ins.active():  # the hooks went with the context
        torch.testing.assert_close(block(x), full_precision)
