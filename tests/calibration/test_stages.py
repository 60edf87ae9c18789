"""True-sequential stages inside a block: how they are found, cut short, and run quantized."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from hf_comq.calibration.blocks import find_block_groups
from hf_comq.calibration.stages import PausedPass, QuantizedStandIns, StageStop, layer_stages, stages_in_call_order
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


def test_a_stage_stop_ends_passes_at_the_input_of_the_stages_last_layer_once_a_whole_pass_called_each_once():
    block = _Branches()
    ran: list[str] = []
    reached: list[str] = []
    for name in ("a", "b", "c", "d"):
        layer = getattr(block, name)
        layer.register_forward_pre_hook(lambda module, args, name=name: reached.append(name))  # made first, runs first
        layer.register_forward_hook(lambda module, args, output, name=name: ran.append(name))
    x = torch.randn(3, 4)
    with StageStop(block, ["a", "b"]) as stop:
        torch.testing.assert_close(stop.run(block, (x,), {}), block(x))  # the first pass runs to the end
        ran.clear(), reached.clear()
        assert stop.run(block, (x,), {}) is None
        assert reached == ["a", "b"] and ran == ["a"]
    ran.clear()
    with StageStop(block, ["d", "never"]) as stop:  # `never` never runs: every pass goes to the end
        for _ in range(2):
            torch.testing.assert_close(stop.run(block, (x,), {}), block(x))
    assert ran[:4] == ["a", "b", "c", "d"]
    ran.clear()
    block(x)  # no stop is left behind
    assert ran == ["a", "b", "c", "d"]


def test_a_stage_stop_never_ends_a_pass_where_a_layer_runs_twice():
    """Ending at the first call of each layer would lose ``a``'s second input."""
    block = _Twice()
    calls: list[str] = []
    block.a.register_forward_pre_hook(lambda module, args: calls.append("a"))
    x = torch.randn(3, 4)
    with StageStop(block, ["a"]) as stop:
        for _ in range(3):
            torch.testing.assert_close(stop.run(block, (x,), {}), block(x))
    assert len(calls) == 2 * 3 + 2 * 3


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


class _Attention(nn.Module):
    """``q``, ``k`` and ``v`` read one input (registered in another order than they are called),
    ``o`` their sum, and ``down`` (narrower out than in) the widened result."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.v, self.k, self.q = (nn.Linear(4, 4) for _ in range(3))
        self.o, self.down = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        mixed = self.q(x) + self.k(x) + self.v(x)
        return self.down(torch.relu(self.o(mixed)))


ATTENTION_STAGES = [["v", "k", "q"], ["o"], ["down"]]


class _TwoInputs(nn.Module):
    """``a`` reads the input and ``b`` another tensor, in one stage (a cross-attention's query beside its key)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + self.b(x * 2.0)


class _Twice(nn.Module):
    """``a`` runs twice in one pass (a shared layer)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(torch.relu(self.a(x)))


def test_stages_in_call_order_apply_where_each_stage_reads_one_input_once():
    x = torch.randn(3, 4)
    block = _Attention()
    assert stages_in_call_order(block, ATTENTION_STAGES, lambda: block(x)) == [["q", "k", "v"], ["o"], ["down"]]
    two = _TwoInputs()
    assert stages_in_call_order(two, layer_stages(two, ["a", "b"], lambda: two(x)), lambda: two(x)) is None
    twice = _Twice()
    assert stages_in_call_order(twice, [["a"]], lambda: twice(x)) is None
    branches = _Branches()  # `never` does not run
    assert stages_in_call_order(branches, [["a", "b", "d"], ["c", "never"]], lambda: branches(x)) is None
    assert stages_in_call_order(branches, [["a", "b", "d"], ["c"]], lambda: branches(x)) == [["a", "b", "d"], ["c"]]


def _solved(block: nn.Module, names: list[str]) -> dict:
    return {name: comq_quantize(getattr(block, name).weight.detach(), torch.eye(getattr(block, name).in_features), bits=2) for name in names}


def test_a_paused_pass_holds_every_batch_at_each_stage_until_the_stage_runs_quantized():
    """Each batch waits at a stage's first layer with that layer's input until the stage is
    released; the layers it solved then run quantized, so the pass ends with the quantized block's
    output, and the block is left as it was."""
    block = _Attention()
    stages = [["q", "k", "v"], ["o"], ["down"]]
    xs = [torch.randn(2, 4) for _ in range(3)]
    solutions = _solved(block, ["q", "k", "v", "o", "down"])
    packed = {name: COMQLinear.from_quantized(getattr(block, name), qweight) for name, qweight in solutions.items()}
    full_precision = [block(x) for x in xs]
    stand_ins = QuantizedStandIns(block, torch.device("cpu"), symmetric=False)

    def run(x):
        with stand_ins.active():
            return block(x)

    def mixed(x):
        return packed["q"](x) + packed["k"](x) + packed["v"](x)

    jobs = [lambda x=x: run(x) for x in xs]
    with torch.no_grad(), PausedPass(block, stages, jobs, 2) as paused, stand_ins:
        for index, stage in enumerate(stages):
            held = list(paused.arrivals(index))
            assert [batch for batch, _ in held] == [0, 1, 2]
            for batch, hidden in held:
                x = xs[batch]
                if index == 0:
                    assert torch.equal(hidden, x)
                elif index == 1:
                    torch.testing.assert_close(hidden, mixed(x))
                else:
                    expected = torch.relu(packed["o"](mixed(x)))
                    torch.testing.assert_close(hidden, expected)
            for name in stage:
                stand_ins.add(name, solutions[name])
            paused.release(index)
        results = paused.outputs()
    for x, result in zip(xs, results):
        torch.testing.assert_close(result, packed["down"](torch.relu(packed["o"](mixed(x)))))
    assert all("forward" not in getattr(block, name).__dict__ for name in solutions)
    torch.testing.assert_close(block(xs[0]), full_precision[0])


def test_a_paused_pass_hands_over_each_batch_as_it_arrives_not_once_all_have():
    """The caller sums a stage batch by batch while later batches still run: here batch 2 starts
    only once the caller has batch 1, which would never happen if the stage waited for all three."""
    block = _Attention()
    xs = [torch.randn(2, 4) for _ in range(3)]
    may_start = threading.Event()

    def run(index: int) -> torch.Tensor:
        if index == 2:
            assert may_start.wait(timeout=30), "batch 2 was never let start"
        return block(xs[index])

    stages = [["q", "k", "v"], ["o"], ["down"]]
    jobs = [lambda index=index: run(index) for index in range(3)]
    with torch.no_grad(), PausedPass(block, stages, jobs, 3) as paused:
        seen = []
        for batch, hidden in paused.arrivals(0):
            with paused.caller_turn():
                seen.append(batch)
                assert torch.equal(hidden, xs[batch])
            if batch == 1:
                may_start.set()
        assert seen == [0, 1, 2]
        paused.release(0)
        for index in (1, 2):
            assert [batch for batch, _ in paused.arrivals(index)] == [0, 1, 2]
            paused.release(index)
        results = paused.outputs()
    for x, result in zip(xs, results):
        torch.testing.assert_close(result, block(x))


def test_a_held_batch_sleeps_until_its_stage_is_released_whatever_arrives_meanwhile(monkeypatch):
    """Each arrival wakes the caller alone: a batch held at a stage is not woken by the batches
    arriving after it (with many batches, such wake-ups took the interpreter lock from the passes
    that compute), only by the stage's release."""
    block = _Attention()
    xs = [torch.randn(2, 4) for _ in range(12)]
    released = threading.Event()
    early_wakeups = []

    class CountingCondition(threading.Condition):
        def wait(self, timeout=None):
            woken = super().wait(timeout)
            if threading.current_thread().name.startswith("hf_comq-") and not released.is_set():
                early_wakeups.append(threading.current_thread().name)
            return woken

    stages = [["q", "k", "v"], ["o"], ["down"]]
    jobs = [lambda x=x: block(x) for x in xs]
    with monkeypatch.context() as patch:
        patch.setattr(threading, "Condition", CountingCondition)  # the pass's own conditions only
        paused = PausedPass(block, stages, jobs, 1)
    with torch.no_grad(), paused:
        assert [batch for batch, _ in paused.arrivals(0)] == list(range(len(xs)))
        released.set()
        paused.release(0)
        for index in (1, 2):
            list(paused.arrivals(index))
            paused.release(index)
        results = paused.outputs()
    assert early_wakeups == []
    for x, result in zip(xs, results):
        torch.testing.assert_close(result, block(x))


def test_a_failing_batch_ends_a_paused_pass_with_its_error_and_leaves_the_block_whole():
    block = _Attention()
    x = torch.randn(2, 4)

    def failing():
        raise ValueError("batch 1 is broken")

    jobs = [lambda: block(x), failing, lambda: block(x)]
    with pytest.raises(ValueError, match="batch 1 is broken"):
        stages = [["q", "k", "v"], ["o"], ["down"]]
        with torch.no_grad(), PausedPass(block, stages, jobs, 1) as paused:
            list(paused.arrivals(0))
    assert all("forward" not in module.__dict__ for module in block.children())
    block(x)  # nothing holds the pass any more


def test_a_paused_pass_left_early_lets_its_held_batches_go():
    """The caller failing between stages (a solve's error) must not leave batches waiting forever."""
    block = _Attention()
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="solve failed"):
        stages = [["q", "k", "v"], ["o"], ["down"]]
        with torch.no_grad(), PausedPass(block, stages, [lambda: block(x)] * 2, 2) as paused:
            assert [batch for batch, _ in paused.arrivals(0)] == [0, 1]
            raise RuntimeError("solve failed")
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("hf_comq-")]
