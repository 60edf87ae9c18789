"""Hessian hooks: the token mask is named per forward pass, never left over from another one."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from hf_comq.calibration.hooks import HessianRecorder
from hf_comq.solver import target_product_from_outputs


def test_only_real_tokens_enter_the_gram_matrix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with HessianRecorder(model, ["0"], torch.device("cpu")) as recorder:
        with recorder.tokens(mask):
            model(x)
        with recorder.tokens(None):  # every token real
            model(x[:1])
    real = torch.cat([x[mask], x[0]]).double()
    # each batch's product is float32 (HessianAccumulator), so float32 rounding, which differs between BLAS builds
    torch.testing.assert_close(recorder.accumulators["0"].result(), real.T @ real, rtol=1e-5, atol=1e-6)
    assert recorder.accumulators["0"].num_tokens == 8 + 5


@pytest.mark.parametrize(
    ("dtype", "advice"),
    [(torch.float16, "the model overflows in float16; load it in float32"), (torch.float32, "check the calibration data")],
)
def test_non_finite_inputs_name_the_layer_and_what_to_do(dtype, advice):
    """An fp16 model that overflows inside calibration: the line names the layer it reached, and float32."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)).to(dtype)
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    with HessianRecorder(model, ["0", "1"], torch.device("cpu")) as recorder:
        with recorder.tokens(None), pytest.raises(ValueError, match=rf"inputs of '1' hold NaN or inf.*{advice}"):
            model(torch.ones(2, 4, dtype=dtype))


def test_a_forward_pass_outside_a_token_scope_is_an_error():
    model = nn.Sequential(nn.Linear(4, 3))
    with HessianRecorder(model, ["0"], torch.device("cpu")) as recorder:
        with recorder.tokens(None):
            model(torch.randn(1, 4))
        with pytest.raises(RuntimeError, match="outside HessianRecorder.tokens"):
            model(torch.randn(1, 4))
    model(torch.randn(1, 4))  # hooks are gone after the recorder closes


def test_a_replay_only_recorder_ignores_the_layers_own_calls_and_sums_what_is_replayed():
    """Passes may reach its layers while it sums (a held pass's later batches): only replay feeds it."""
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(5, 4)
    with HessianRecorder(model, ["0"], torch.device("cpu"), replay_only=True) as recorder:
        model(torch.randn(2, 4))  # outside any token scope, and not an error: nothing listens
        recorder.replay([("0", x, None, None)], None)
        model(torch.randn(2, 4))
    assert recorder.accumulators["0"].num_tokens == 5
    torch.testing.assert_close(recorder.accumulators["0"].result(), x.double().T @ x.double(), rtol=1e-5, atol=1e-6)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        return self.q(x) + self.k(x)


def test_layers_reading_one_tensor_share_one_accumulator():
    model = TwoHeads()
    with HessianRecorder(model, ["q", "k"], torch.device("cpu")) as recorder:
        for _ in range(2):
            with recorder.tokens(None):
                model(torch.randn(3, 4))
    assert recorder.accumulators["q"] is recorder.accumulators["k"]
    assert recorder.distinct() == [recorder.accumulators["q"]] and recorder.accumulators["q"].num_tokens == 6
    assert recorder.shared_inputs() == {"k": "q"}


def test_calls_kept_on_other_threads_and_replayed_in_order_give_the_same_sums_bit_for_bit():
    """Batches' forward passes may run at once on several threads; their Gram terms are
    replayed in batch order, so the sums (and the q/k sharing) equal one thread's."""
    torch.manual_seed(0)
    model = TwoHeads()
    batches = [torch.randn(2, 5, 4) for _ in range(3)]
    masks = [torch.rand(2, 5) > 0.3, None, torch.rand(2, 5) > 0.3]
    with HessianRecorder(model, ["q", "k"], torch.device("cpu")) as direct:
        for batch, mask in zip(batches, masks):
            with direct.tokens(mask):
                model(batch)
    kept: dict[int, list] = {}

    def forward(index: int) -> None:
        with later.calls_later() as calls:
            model(batches[index])
        kept[index] = calls

    with HessianRecorder(model, ["q", "k"], torch.device("cpu")) as later:
        threads = [threading.Thread(target=forward, args=(index,)) for index in (2, 0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert later.accumulators["q"].num_tokens == 0  # nothing summed before the replay
        for index in range(3):
            later.replay(kept[index], masks[index])
    assert later.accumulators["q"] is later.accumulators["k"]
    assert torch.equal(later.accumulators["q"].result(), direct.accumulators["q"].result())
    assert later.accumulators["q"].num_tokens == direct.accumulators["q"].num_tokens


def test_a_recorder_that_saw_no_batch_takes_the_sharing_another_found():
    """A rank with no calibration batch must reduce the same Gram matrices, in the same order, as the others."""
    model = TwoHeads()
    with HessianRecorder(model, ["q", "k"], torch.device("cpu")) as ran:
        with ran.tokens(None):
            model(torch.randn(3, 4))
    with HessianRecorder(model, ["q", "k"], torch.device("cpu")) as idle:
        pass
    assert len(idle.distinct()) == 2  # nothing ran: it cannot know
    idle.adopt_shared_inputs(ran.shared_inputs())
    assert idle.accumulators["q"] is idle.accumulators["k"] and len(idle.distinct()) == 1
    ran.adopt_shared_inputs({})  # what it found itself stays
    assert ran.accumulators["q"] is ran.accumulators["k"]


@pytest.mark.parametrize("out_features", [5, 3], ids=["shift", "product"])
def test_targets_are_each_layers_full_precision_inputs_of_the_same_batch(out_features):
    """A layer sums the target shift ``(X_fp - X)^T X``; one narrower out than in sums ``Y_fp^T X``
    from its full-precision outputs instead, whose target product ``(Y_fp - Y)^T X`` less ``W H`` is
    the weight times that shift (the bias cancels)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, out_features))
    x, x_fp = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with HessianRecorder(model, ["0"], torch.device("cpu"), with_targets=True) as recorder:
        with recorder.targets(mask):
            model(x_fp)
        with recorder.tokens(mask):
            model(x)
    real, real_fp = x[mask].double(), x_fp[mask].double()
    shift = (real_fp - real).T @ real
    accumulator = recorder.accumulators["0"]
    # float32 batch products, as for the Gram matrix
    torch.testing.assert_close(accumulator.result(), real.T @ real, rtol=1e-5, atol=1e-5)
    if out_features > 4:
        assert recorder.target_products == {}
        torch.testing.assert_close(accumulator.target_shift(), shift, rtol=1e-5, atol=1e-5)
    else:
        assert not accumulator.with_target
        weight = model[0].weight.detach().double()
        summed = recorder.target_products["0"]
        bias = model[0].bias.detach()
        product = target_product_from_outputs(weight, accumulator.result(), summed.result(), bias, summed.input_sum())
        torch.testing.assert_close(product, weight @ shift, rtol=1e-5, atol=1e-5)


class _AddsIntoItsOutput(nn.Module):
    """A narrow layer whose output the model then changes in place (Falcon adds the attention output into the MLP's)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(x)
        y += 10.0
        return y


@pytest.mark.parametrize("later", [False, True], ids=["direct", "replayed"])
def test_a_full_precision_output_kept_for_a_target_product_is_a_copy(later):
    torch.manual_seed(0)
    model = _AddsIntoItsOutput()
    x, x_fp = torch.randn(5, 4), torch.randn(5, 4)
    with torch.no_grad(), HessianRecorder(model, ["down"], torch.device("cpu"), with_targets=True) as recorder:
        if later:
            with recorder.calls_later(full_precision=True) as targets:
                model(x_fp)
            with recorder.calls_later() as calls:
                model(x)
            recorder.replay(calls, None, targets=targets)
        else:
            with recorder.targets(None):
                model(x_fp)
            with recorder.tokens(None):
                model(x)
        summed = recorder.target_products["down"]
        weight, bias = model.down.weight.detach().double(), model.down.bias.detach()
        got = target_product_from_outputs(
            weight, recorder.accumulators["down"].result(), summed.result(), bias, summed.input_sum()
        )
    torch.testing.assert_close(got, weight @ (x_fp - x).double().T @ x.double(), rtol=1e-5, atol=1e-5)


def _layers_reading_one_input(widths: dict[str, int]) -> nn.Module:
    """Layers of the given output widths, each called on the same 4-wide input in the given order."""

    class Readers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleDict({name: nn.Linear(4, width) for name, width in widths.items()})

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [layer(x) for layer in self.layers.values()]

    return Readers()


@pytest.mark.parametrize(
    "widths, shift_readers, products",
    [
        ({"q": 4, "k": 2, "v": 2}, {"q", "k", "v"}, set()),  # k/v read q's shift
        ({"k": 2, "v": 2}, set(), {"k", "v"}),  # one Gram matrix, a product each
        ({"k": 2, "q": 4}, {"q"}, {"k"}),  # q needs a shift k does not sum: its own Gram matrix
    ],
    ids=["shift-first", "narrow-only", "narrow-first"],
)
def test_layers_sharing_an_input_share_its_target_shift_or_sum_their_own_products(widths, shift_readers, products):
    torch.manual_seed(0)
    model = _layers_reading_one_input(widths)
    names = [f"layers.{name}" for name in widths]
    x, x_fp = torch.randn(3, 4), torch.randn(3, 4)
    with HessianRecorder(model, names, torch.device("cpu"), with_targets=True) as recorder:
        for _ in range(2):  # the second batch follows the first one's decisions
            with recorder.targets(None):
                model(x_fp)
            with recorder.tokens(None):
                model(x)
    assert {name.split(".")[1] for name in names if recorder.accumulators[name].with_target} == shift_readers
    assert {name.split(".")[1] for name in recorder.target_products} == products
    assert len(recorder.distinct()) == (2 if widths == {"k": 2, "q": 4} else 1)
    assert len(recorder.sums()) == len(recorder.distinct()) + len(products)
    for name in names:
        weight = model.get_submodule(name).weight.detach().double()
        expected = 2 * weight @ (x_fp - x).double().T @ x.double()
        if name in recorder.target_products:
            summed, bias = recorder.target_products[name], model.get_submodule(name).bias.detach()
            got = target_product_from_outputs(weight, recorder.accumulators[name].result(), summed.result(), bias, summed.input_sum())
        else:
            got = weight @ recorder.accumulators[name].target_shift()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_features", [5, 3], ids=["shift", "product"])
def test_targets_kept_on_other_threads_and_replayed_in_order_give_the_same_shifts_bit_for_bit(out_features):
    """A batch's full-precision pass and quantized pass kept by two calls_later scopes on a
    worker, then replayed in batch order, give the sums and target shifts (or products) of one thread."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, out_features))
    pairs = [(torch.randn(2, 5, 4), torch.randn(2, 5, 4)) for _ in range(3)]
    masks = [torch.rand(2, 5) > 0.3, None, torch.rand(2, 5) > 0.3]
    with HessianRecorder(model, ["0"], torch.device("cpu"), with_targets=True) as direct:
        for (x, x_fp), mask in zip(pairs, masks):
            with direct.targets(mask):
                model(x_fp)
            with direct.tokens(mask):
                model(x)
    kept: dict[int, tuple[list, list]] = {}

    def forward(index: int) -> None:
        x, x_fp = pairs[index]
        with later.calls_later(full_precision=True) as targets:
            model(x_fp)
        with later.calls_later() as calls:
            model(x)
        kept[index] = targets, calls

    with HessianRecorder(model, ["0"], torch.device("cpu"), with_targets=True) as later:
        threads = [threading.Thread(target=forward, args=(index,)) for index in (1, 2, 0)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for index in range(3):
            targets, calls = kept[index]
            later.replay(calls, masks[index], targets=targets)
    assert torch.equal(later.accumulators["0"].result(), direct.accumulators["0"].result())
    if out_features < 4:
        assert torch.equal(later.target_products["0"].result(), direct.target_products["0"].result())
    else:
        assert torch.equal(later.accumulators["0"].target_shift(), direct.accumulators["0"].target_shift())


def test_targets_replayed_on_a_recorder_without_targets_are_refused():
    model = nn.Sequential(nn.Linear(4, 3))
    with HessianRecorder(model, ["0"], torch.device("cpu")) as recorder:
        with recorder.calls_later() as calls:
            model(torch.randn(2, 4))
        with pytest.raises(RuntimeError, match="without with_targets=True"):
            recorder.replay(calls, None, targets=calls)


@pytest.mark.parametrize("out_features", [5, 3], ids=["shift", "product"])
def test_a_layer_without_the_same_tokens_in_both_passes_is_named(out_features):
    model = nn.Sequential(nn.Linear(4, out_features))
    with HessianRecorder(model, ["0"], torch.device("cpu"), with_targets=True) as recorder:
        with recorder.targets(None):
            model(torch.randn(2, 3, 4))
        with recorder.tokens(None), pytest.raises(ValueError, match=r"'0' got \(2, 3\) tokens .* \(2, 5\) in the quantized one .* fp_target=False"):
            model(torch.randn(2, 5, 4))
        with recorder.tokens(None), pytest.raises(RuntimeError, match="not in the batch's full-precision pass"):
            model(torch.randn(2, 3, 4))


def _unfused_moe_layer_inputs(mask: torch.Tensor):
    """A tiny Qwen3-MoE with unfused experts, one padded batch, and each expert's real routed inputs by hand."""
    from hf_comq.modules import unfuse_batched_experts
    from tests.tiny import tiny_model

    model = tiny_model("qwen3_moe")
    unfuse_batched_experts(model)
    experts = model.model.layers[0].mlp.experts
    routed = {}

    def keep(module, args):
        hidden, index = args[0], args[1]
        real = mask.reshape(-1)
        for expert in range(experts.num_experts):
            slot, rows = torch.where(index.T == expert)
            x = hidden[rows][real[rows]]
            gate, up, _ = (layer.weight for layer in experts[expert].projections())  # not the hooked layers
            routed[expert] = (x, experts[expert].act_fn(x @ gate.T) * (x @ up.T))

    experts.register_forward_pre_hook(keep)
    return model, routed


@pytest.mark.parametrize("threaded", [False, True], ids=["in-scope", "replayed"])
def test_an_experts_gram_matrices_hold_only_the_real_tokens_routed_to_it(threaded):
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4], dtype=torch.bool)
    model, routed = _unfused_moe_layer_inputs(mask)
    layers = ("gate_proj", "up_proj", "down_proj")
    names = [f"model.layers.0.mlp.experts.{e}.{layer}" for e in range(4) for layer in layers]
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with HessianRecorder(model, names, torch.device("cpu"), with_targets=True) as recorder, torch.no_grad():
        if threaded:
            with recorder.calls_later() as calls:
                model(input_ids=ids, attention_mask=mask.long())
            recorder.replay(calls, mask, targets=[])
        else:
            with recorder.targets(mask):  # the full-precision pass: experts keep no targets (they route their own way)
                model(input_ids=ids, attention_mask=mask.long())
            with recorder.tokens(mask):
                model(input_ids=ids, attention_mask=mask.long())
    hit = [expert for expert in routed if len(routed[expert][0])]
    assert len(hit) >= 2
    for expert, (x, intermediate) in routed.items():
        gate = recorder.accumulators[f"model.layers.0.mlp.experts.{expert}.gate_proj"]
        assert gate is recorder.accumulators[f"model.layers.0.mlp.experts.{expert}.up_proj"]  # one Gram for both
        assert not gate.with_target and gate.num_tokens == len(x)
        if len(x):
            torch.testing.assert_close(gate.result(), (x.T @ x).double(), rtol=1e-5, atol=1e-6)
            down = recorder.accumulators[f"model.layers.0.mlp.experts.{expert}.down_proj"].result()
            torch.testing.assert_close(down, (intermediate.T @ intermediate).double(), rtol=1e-5, atol=1e-6)


def test_experts_handed_other_tokens_than_the_batch_keep_all_their_rows():
    """A MoE block that hands its experts some other set of tokens (not the batch's, one for one) cannot be
    masked: every routed row counts rather than the wrong ones."""
    from hf_comq.nn import UnfusedExperts
    from tests.nn.test_experts import experts_of

    experts = UnfusedExperts.from_batched(experts_of("qwen3_moe"))
    model = nn.ModuleDict({"experts": experts})
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    hidden, index = torch.randn(4, 32), torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]])
    with HessianRecorder(model, ["experts.0.gate_proj"], torch.device("cpu")) as recorder, torch.no_grad():
        with recorder.tokens(mask):
            experts(hidden, index, torch.ones(4, 2))
    assert recorder.accumulators["experts.0.gate_proj"].num_tokens == 4
