"""COMQLinear: exact agreement with QuantizedWeight, Conv1D support, compressed-tensors state dict, shells."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_comq import QuantizedWeight, comq_quantize
from hf_comq.nn import COMQLinear, get_linear_weight, replace_module


def quantize(module: nn.Module, bits: int = 4, group_size: int | None = None, symmetric: bool = False) -> QuantizedWeight:
    weight = get_linear_weight(module).detach()
    inputs = torch.randn(64, weight.shape[1], generator=torch.Generator().manual_seed(1))
    hessian = inputs.T @ inputs
    return comq_quantize(
        weight, hessian, bits=bits, group_size=group_size, symmetric=symmetric, iterations=1, init="rtn",
        scale_search=False,
    )  # fmt: skip


def linear(in_features=64, out_features=24, bias=True, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
def test_forward_matches_solver_dequantize_exactly(bits, group_size, symmetric):
    module = linear()
    qweight = quantize(module, bits, group_size, symmetric)
    layer = COMQLinear.from_quantized(module, qweight, symmetric=symmetric)
    assert torch.equal(layer.dequantize(), qweight.dequantize())
    assert torch.equal(layer.codes(), qweight.codes)
    x = torch.randn(5, 7, 64)
    assert torch.equal(layer(x), F.linear(x, qweight.dequantize(), module.bias))


def test_bf16_forward_dequantizes_to_the_activation_dtype():
    module = linear(dtype=torch.bfloat16)
    qweight = quantize(module, 4, 32)
    layer = COMQLinear.from_quantized(module, qweight)
    assert layer.weight_scale.dtype == torch.float32  # never rounded to the model dtype
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = F.linear(x, qweight.dequantize().to(torch.bfloat16), module.bias)
    assert layer(x).dtype == torch.bfloat16
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [None, 16])
def test_conv1d_is_solved_in_linear_layout_and_stored_in_its_own(group_size, symmetric):
    torch.manual_seed(0)
    conv = Conv1D(24, 64)  # nf=24 outputs, nx=64 inputs, weight (64, 24)
    qweight = quantize(conv, 3, group_size, symmetric)
    assert qweight.codes.shape == (24, 64)
    layer = COMQLinear.from_quantized(conv, qweight, symmetric=symmetric)
    x = torch.randn(2, 5, 64)
    assert torch.equal(layer(x), F.linear(x, qweight.dequantize(), conv.bias))
    assert layer.weight.shape == conv.weight.shape  # source layout (in, out)
    groups = 64 // (group_size or 64)
    assert layer.weight_packed.shape == (64, 3)  # codes of the (in, out) weight packed along out: 24 x 3 bits
    assert layer.weight_scale.shape == (groups, 24)
    assert layer.weight_shape.tolist() == [64, 24]
    if not symmetric:
        assert layer.weight_zero_point.dtype == torch.int8 and layer.weight_zero_point.shape == (groups, 24)


def test_conv1d_rejects_codes_in_conv_layout():
    conv = Conv1D(24, 64)
    wrong = comq_quantize(conv.weight.detach(), torch.eye(24), bits=4, iterations=0, init="rtn", scale_search=False)
    with pytest.raises(ValueError, match="transposed"):
        COMQLinear.from_quantized(conv, wrong)


def test_state_dict_is_the_compressed_tensors_layout_and_reloads_into_a_shell():
    module = linear()
    layer = COMQLinear.from_quantized(module, quantize(module, 4, 16))
    state = layer.state_dict()
    assert {key: value.dtype for key, value in state.items()} == {
        "weight_packed": torch.int32,
        "weight_scale": torch.float32,
        "weight_zero_point": torch.int32,
        "weight_shape": torch.int64,
        "bias": torch.float32,
    }
    assert state["weight_packed"].shape == (24, 64 * 4 // 32)
    assert state["weight_scale"].shape == (24, 4)
    assert state["weight_zero_point"].shape == (3, 4)  # 24 zero points of 4 bits per group, packed along out
    assert state["weight_shape"].tolist() == [24, 64]
    shell = COMQLinear(64, 24, bits=4, group_size=16, device="cpu")
    shell.load_state_dict(state)
    x = torch.randn(4, 64)
    assert torch.equal(shell(x), layer(x))


def test_symmetric_layers_store_no_zero_point_and_refuse_other_zero_points():
    module = linear()
    layer = COMQLinear.from_quantized(module, quantize(module, 4, 16, symmetric=True), symmetric=True)
    assert "weight_zero_point" not in layer.state_dict()
    assert torch.equal(layer.zero_points(), torch.full((24, 4), 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="symmetric"):
        COMQLinear.from_quantized(module, quantize(module, 4, 16), symmetric=True)


def test_empty_shell_on_meta_has_the_checkpoint_shapes():
    shell = COMQLinear.empty_like(nn.Linear(100, 10, bias=False), bits=3, group_size=20)
    assert shell.weight_packed.device.type == "meta"
    assert shell.weight_packed.shape == (10, 10)  # ceil(100 * 3 / 32) words
    assert shell.weight_scale.shape == (10, 5)
    assert shell.weight_zero_point.shape == (1, 5)
    assert shell.bias is None
    with pytest.raises(ValueError, match="does not divide in_features=96"):
        COMQLinear.empty_like(nn.Linear(96, 10), bits=4, group_size=64)


def test_to_float_module_restores_linear_and_conv1d():
    module = linear(bias=False)
    layer = COMQLinear.from_quantized(module, quantize(module))
    restored = layer.to_float_module()
    assert type(restored) is nn.Linear and restored.bias is None
    assert torch.equal(restored.weight, layer.dequantize())

    conv = Conv1D(24, 64)
    conv_layer = COMQLinear.from_quantized(conv, quantize(conv))
    conv_restored = conv_layer.to_float_module()
    assert type(conv_restored) is Conv1D and conv_restored.weight.shape == (64, 24)
    x = torch.randn(3, 64)
    torch.testing.assert_close(conv_restored(x), conv_layer(x))


def test_replace_module_swaps_in_place_and_checks_the_target():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    qweight = quantize(model[2])
    layer = replace_module(model, "2", qweight)
    assert model[2] is layer and isinstance(layer, COMQLinear)
    with pytest.raises(TypeError, match="ReLU"):
        replace_module(model, "1", qweight)
    with pytest.raises(AttributeError, match="7"):
        replace_module(model, "7", qweight)


def test_zero_points_must_be_codes():
    module = linear()
    qweight = quantize(module, bits=4)
    zero = qweight.zero_point
    qweight.zero_point = zero + 0.5
    with pytest.raises(ValueError, match="zero points"):
        COMQLinear.from_quantized(module, qweight)
    qweight.zero_point = torch.full_like(zero, 16.0)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        COMQLinear.from_quantized(module, qweight)


def test_casting_a_model_leaves_the_scales_float32_and_unrounded():
    """``model.to(torch.bfloat16)`` casts the bias with the model; a scale rounded to bf16 would move every
    weight of its group for good, and be saved so."""
    source = linear()
    layer = COMQLinear.from_quantized(source, quantize(source))
    scale = layer.weight_scale.clone()
    model = nn.Sequential(layer).to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16 and layer.weight_scale.dtype == torch.float32
    model.to(torch.float32)
    assert torch.equal(layer.weight_scale, scale) and layer.bias.dtype == torch.float32
    assert list(layer.state_dict())[1:3] == ["weight_packed", "weight_scale"]  # the buffers keep their order


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_a_forward_under_inference_mode_leaves_later_gradients_working(symmetric):
    module = linear()
    layer = COMQLinear.from_quantized(module, quantize(module, symmetric=symmetric), symmetric=symmetric)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        layer(x)
    x.requires_grad_()
    layer(x).sum().backward()
    expected = x.detach().clone().requires_grad_()
    F.linear(expected, layer.dequantize(), layer.bias).sum().backward()
    torch.testing.assert_close(x.grad, expected.grad)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_a_layer_copied_under_inference_mode_still_runs(symmetric):
    """A deep copy made under ``torch.inference_mode`` (an evaluation helper's snapshot) holds
    inference tensors, which have no version counter for the zero-point cache to key on."""
    import copy

    module = linear()
    layer = COMQLinear.from_quantized(module, quantize(module, symmetric=symmetric), symmetric=symmetric)
    with torch.inference_mode():
        snapshot = copy.deepcopy(layer)
    x = torch.randn(3, 64)
    expected = F.linear(x, layer.dequantize(), layer.bias)
    with torch.inference_mode():
        torch.testing.assert_close(snapshot(x), expected)
    torch.testing.assert_close(snapshot(x), expected)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_torch_func_transforms_differentiate_through_a_packed_layer(layout):
    """``torch.func.grad`` and ``vmap`` of it (per-sample gradients) cannot run the op's own autograd
    formula; under them the layer computes with torch ops and gives the dense layer's gradients."""
    module = linear() if layout == "linear" else Conv1D(24, 64)
    layer = COMQLinear.from_quantized(module, quantize(module))
    weight, bias = layer.dequantize(), layer.bias.detach()
    x = torch.randn(5, layer.in_features)
    packed = torch.func.grad(lambda z: layer(z).pow(2).sum())(x)
    dense = torch.func.grad(lambda z: F.linear(z, weight, bias).pow(2).sum())(x)
    torch.testing.assert_close(packed, dense)
    per_sample = torch.func.vmap(torch.func.grad(lambda z: layer(z).pow(2).sum()))(x)
    torch.testing.assert_close(per_sample, dense)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_forward_mode_ad_carries_the_tangent_through_a_packed_layer(layout):
    """A dual tensor (``torch.autograd.forward_ad``) needs no grad and runs under no transform: the plain
    inference path took it and dropped its tangent."""
    import torch.autograd.forward_ad as forward_ad

    module = linear() if layout == "linear" else Conv1D(24, 64)
    layer = COMQLinear.from_quantized(module, quantize(module))
    x, tangent = torch.randn(5, layer.in_features), torch.randn(5, layer.in_features)
    with forward_ad.dual_level():
        got = forward_ad.unpack_dual(layer(forward_ad.make_dual(x, tangent))).tangent
    assert got is not None
    torch.testing.assert_close(got, tangent @ layer.dequantize().T)


@pytest.mark.parametrize("features", [47, 41, 40, 49])
@pytest.mark.parametrize("path", ["fp32", "autograd", "bf16", "fp64"])
def test_an_input_of_the_wrong_width_is_refused(features, path):
    """47 or 41 features of 4 bits fill the same 6 packed words as 48: only the layer's own width tells them apart."""
    module = linear(in_features=48)
    layer = COMQLinear.from_quantized(module, quantize(module))
    x = torch.randn(3, features, dtype={"bf16": torch.bfloat16, "fp64": torch.float64}.get(path, torch.float32))
    x.requires_grad_(path == "autograd")
    with pytest.raises(ValueError, match=f"x has {features} features .* in_features=48"):
        layer(x)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_an_integer_input_is_refused_as_nn_linear_refuses_it(layout):
    """The weight was cast to the input's dtype: token ids in gave a tensor of truncated garbage out."""
    module = linear() if layout == "linear" else Conv1D(24, 64)
    layer = COMQLinear.from_quantized(module, quantize(module))
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        layer(torch.randint(0, 9, (3, 64)))


def test_the_weight_dtype_follows_casts_as_a_dense_layer_does():
    """transformers' T5 casts its feed-forward input to ``wo.weight.dtype``: after ``model.to(torch.bfloat16)``
    a packed ``wo`` must say bf16, as a dense one does, and ``dequantize()`` must give bf16 layers."""
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5DenseActDense

    torch.manual_seed(0)
    dense = T5DenseActDense(T5Config(d_model=32, d_ff=64, dropout_rate=0.0)).eval()
    packed = T5DenseActDense(T5Config(d_model=32, d_ff=64, dropout_rate=0.0)).eval()
    packed.wi, packed.wo = (COMQLinear.from_quantized(layer, quantize(layer)) for layer in (dense.wi, dense.wo))
    dense.wi, dense.wo = packed.wi.to_float_module(), packed.wo.to_float_module()
    for module in (dense, packed):
        module.to(torch.bfloat16)
    assert packed.wo.weight.dtype == packed.wo.dequantize().dtype == torch.bfloat16
    assert packed.wo.to_float_module().weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(packed(x), dense(x))
    packed.to(torch.float16).to("cpu")
    assert packed.wo.weight.dtype == torch.float16  # a move alone keeps it
    packed.float()
    assert packed.wo.weight.dtype == torch.float32


def test_reading_the_weight_for_its_dtype_does_not_dequantize(monkeypatch):
    """transformers' T5 reads ``wo.weight`` three times per feed-forward call, for ``isinstance`` and ``dtype``."""
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5DenseActDense

    feed_forward = T5DenseActDense(T5Config(d_model=32, d_ff=64, dropout_rate=0.0)).eval()
    dense_output = feed_forward(torch.ones(1, 32))
    feed_forward.wo = COMQLinear.from_quantized(feed_forward.wo, quantize(feed_forward.wo))
    calls = []
    dequantize = COMQLinear.dequantize
    monkeypatch.setattr(COMQLinear, "dequantize", lambda self, *args: calls.append(self) or dequantize(self, *args))
    with torch.no_grad():
        output = feed_forward(torch.ones(1, 32))
    assert calls == [] and output.shape == dense_output.shape


@pytest.mark.parametrize("source", ["linear", "conv1d"])
def test_the_weight_reads_as_the_dense_weight_of_the_source_layer(source):
    module = linear() if source == "linear" else Conv1D(24, 64)
    layer = COMQLinear.from_quantized(module, quantize(module))
    expected = layer.dequantize() if source == "linear" else layer.dequantize().t()
    weight = layer.weight
    assert isinstance(weight, torch.Tensor) and weight.shape == module.weight.shape and weight.dtype == torch.float32
    assert torch.equal(weight, expected) and torch.equal(weight.t(), expected.t())
    torch.testing.assert_close(F.linear(torch.ones(2, weight.shape[1]), weight), torch.ones(2, weight.shape[1]) @ expected.t())
    assert torch.equal(copy.deepcopy(layer.weight), expected) and repr(layer.weight) == repr(expected)
    buffer = io.BytesIO()
    torch.save(layer.weight, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), expected)
    assert layer.weight.numpy().shape == tuple(expected.shape) and layer.weight.tolist() == expected.tolist()
    nn.init.normal_(weight)  # as _init_weights does while loading: a fresh copy, the layer keeps its codes
    assert not torch.equal(weight, expected) and torch.equal(layer.weight, expected)


def test_the_weight_serves_what_reads_memory_without_an_op(tmp_path):
    """share_memory_ crashed the process, safetensors found no storage and nn.Parameter refused the type:
    each now works on the dense values, as on the plain tensor ``weight`` was before."""
    from safetensors.torch import load_file, save_file

    layer = COMQLinear.from_quantized(linear(), quantize(linear()))
    expected = layer.dequantize()
    shared = layer.weight
    assert shared.share_memory_() is shared and shared.is_shared() and torch.equal(shared, expected)
    save_file({"w": layer.weight}, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["w"], expected)
    copy_of_layer = nn.Linear(64, 24)
    copy_of_layer.weight = nn.Parameter(layer.weight)  # model surgery: a float layer with the packed one's values
    x = torch.randn(3, 64)
    copy_of_layer(x).sum().backward()
    assert torch.equal(copy_of_layer.weight, expected) and copy_of_layer.weight.grad.shape == expected.shape
    torch.optim.SGD(copy_of_layer.parameters(), lr=0.5).step()
    assert not torch.equal(copy_of_layer.weight, expected) and torch.equal(layer.weight, expected)


@pytest.mark.parametrize("source", ["linear", "conv1d"])
def test_a_trainable_scale_is_refused_in_both_layouts(source):
    module = linear() if source == "linear" else Conv1D(24, 64)
    layer = COMQLinear.from_quantized(module, quantize(module))
    layer.weight_scale.requires_grad_()
    x = torch.randn(3, 64)
    with pytest.raises(NotImplementedError, match=r"weight_scale.requires_grad_\(False\)"):
        layer(x)
    with torch.no_grad():
        assert layer(x).shape == (3, 24)  # nothing to train: it runs
