"""COMQLinear: exact agreement with QuantizedWeight, Conv1D support, state dict, shells and dequantization."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_comq import QuantizedWeight, comq_quantize
from hf_comq.nn import COMQLinear, get_linear_weight, replace_module


def quantize(module: nn.Module, bits: int = 4, group_size: int | None = None) -> QuantizedWeight:
    weight = get_linear_weight(module).detach()
    inputs = torch.randn(64, weight.shape[1], generator=torch.Generator().manual_seed(1))
    hessian = inputs.T @ inputs
    return comq_quantize(weight, hessian, bits=bits, group_size=group_size, iterations=1, init="rtn", scale_search=False)


def linear(in_features=64, out_features=24, bias=True, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
def test_forward_matches_solver_dequantize_exactly(bits, group_size):
    module = linear()
    qweight = quantize(module, bits, group_size)
    layer = COMQLinear.from_quantized(module, qweight)
    assert torch.equal(layer.dequantize(), qweight.dequantize())
    assert torch.equal(layer.codes(), qweight.codes)
    x = torch.randn(5, 7, 64)
    assert torch.equal(layer(x), F.linear(x, qweight.dequantize(), module.bias))


def test_bf16_forward_dequantizes_to_the_activation_dtype():
    module = linear(dtype=torch.bfloat16)
    qweight = quantize(module, 4, 32)
    layer = COMQLinear.from_quantized(module, qweight)
    assert layer.scales.dtype == torch.float32  # never rounded to the model dtype
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = F.linear(x, qweight.dequantize().to(torch.bfloat16), module.bias)
    assert layer(x).dtype == torch.bfloat16
    assert torch.equal(layer(x), expected)


def test_conv1d_is_quantized_in_linear_layout():
    torch.manual_seed(0)
    conv = Conv1D(24, 64)  # nf=24 outputs, nx=64 inputs, weight (64, 24)
    qweight = quantize(conv)
    assert qweight.codes.shape == (24, 64)
    layer = COMQLinear.from_quantized(conv, qweight)
    x = torch.randn(2, 5, 64)
    assert torch.equal(layer(x), F.linear(x, qweight.dequantize(), conv.bias))
    assert layer.weight.shape == conv.weight.shape  # source layout (in, out)


def test_conv1d_rejects_codes_in_conv_layout():
    conv = Conv1D(24, 64)
    wrong = comq_quantize(conv.weight.detach(), torch.eye(24), bits=4, iterations=0, init="rtn", scale_search=False)
    with pytest.raises(ValueError, match="transposed"):
        COMQLinear.from_quantized(conv, wrong)


def test_state_dict_holds_only_packed_tensors_and_reloads_into_a_shell():
    module = linear()
    layer = COMQLinear.from_quantized(module, quantize(module, 4, 16))
    state = layer.state_dict()
    assert {key: value.dtype for key, value in state.items()} == {
        "qweight": torch.int32,
        "scales": torch.float32,
        "qzeros": torch.uint8,
        "bias": torch.float32,
    }
    assert state["qweight"].shape == (24, 64 * 4 // 32)
    assert state["scales"].shape == state["qzeros"].shape == (24, 4)
    shell = COMQLinear(64, 24, bits=4, group_size=16, device="cpu")
    shell.load_state_dict(state)
    x = torch.randn(4, 64)
    assert torch.equal(shell(x), layer(x))


def test_empty_shell_on_meta_has_the_checkpoint_shapes():
    shell = COMQLinear.empty_like(nn.Linear(96, 10, bias=False), bits=3, group_size=32)
    assert shell.qweight.device.type == "meta"
    assert shell.qweight.shape == (10, 9)
    assert shell.scales.shape == (10, 3)
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
    with pytest.raises(KeyError, match="7"):
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
