"""``hf_comq.kernels.linear.packed_linear``: compiled kernel and torch fallback against slow references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_comq.kernels import DISABLE_ENV_VAR, dequantize_packed, packed_linear
from hf_comq.kernels.build import load_kernel, missing_toolchain
from hf_comq.kernels.linear import kernel_covers
from hf_comq.packing import pack_codes
from tests.kernels.reference import (
    dequantize_reference,
    fp32_error_bound,
    linear_reference,
    pack_reference,
    random_packed,
)

# (out_features, in_features, groups): per-channel and grouped, in % 32 != 0 and
# in % 8 != 0 (codes straddling words, partial last word), tiny and ViT-sized rows.
SHAPES = [(37, 100, 1), (13, 96, 3), (20, 40, 5), (9, 7, 1), (24, 264, 33), (64, 768, 6), (5, 1, 1)]
ALL_BITS = range(1, 9)


@pytest.fixture(scope="module")
def kernel():
    """The compiled ops; skipped only when no toolchain exists (a failed build with one is a failure)."""
    missing = missing_toolchain()
    if missing is not None:
        pytest.skip(f"compiled kernel not buildable here: {missing}")
    ops = load_kernel()
    assert ops is not None, "a C++ compiler and ninja are present but the kernel did not build (see the log line)"
    return ops


@pytest.fixture
def kernel_enabled(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)


def isas(kernel) -> list[str]:
    return ["scalar", "avx2"] if kernel.isa() == "avx2" else ["scalar"]


def assert_close_to_reference(y, x, weight, bias):
    error = (y.double() - linear_reference(x, weight, bias)).abs()
    bound = fp32_error_bound(x, weight, bias)
    assert bool((error <= bound).all()), f"max error / bound = {float((error / bound).max()):.3g}"


@pytest.mark.parametrize("bits", ALL_BITS)
def test_reference_packer_is_pack_codes_truncated(bits):
    """The test packer agrees with hf_comq.packing's layout, cut to ceil(in * bits / 32) words."""
    codes = torch.randint(0, 1 << bits, (6, 77), generator=torch.Generator().manual_seed(bits))
    expected = pack_codes(codes, bits)[:, : (77 * bits + 31) // 32]
    assert torch.equal(pack_reference(codes, bits), expected)


@pytest.mark.parametrize("disable", ["0", "1"])
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_packed_is_the_expression_bit_for_bit(monkeypatch, disable, bits, shape):
    """Compiled (where it reads the weight) or torch ops: the same bits."""
    monkeypatch.setenv(DISABLE_ENV_VAR, disable)
    out_features, in_features, groups = shape
    codes, packed, scale, zero = random_packed(out_features, in_features, groups, bits, seed=bits)
    weight = dequantize_packed(packed, scale, zero, bits, in_features)
    assert weight.dtype == torch.float32
    assert torch.equal(weight, dequantize_reference(codes, scale, zero))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_fallback_is_bit_exact(monkeypatch, dtype, bits):
    """With the kernel disabled the result is F.linear on the dequantized weight, bit for bit."""
    monkeypatch.setenv(DISABLE_ENV_VAR, "1")
    codes, packed, scale, zero = random_packed(24, 264, 33, bits, seed=bits)
    x = torch.randn(2, 3, 264).to(dtype)
    bias = torch.randn(24).to(dtype)
    expected = F.linear(x, dequantize_reference(codes, scale, zero).to(dtype), bias)
    assert torch.equal(packed_linear(x, packed, scale, zero, bits, bias), expected)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_dequantize_is_bit_exact(kernel, bits, shape):
    out_features, in_features, groups = shape
    if groups > 1 and (in_features // groups) % 8:
        pytest.skip("the kernel requires group_size % 8 == 0 (such layers take the fallback)")
    codes, packed, scale, zero = random_packed(out_features, in_features, groups, bits, seed=bits)
    expected = dequantize_reference(codes, scale, zero)
    for isa in isas(kernel):
        assert torch.equal(kernel.dequantize(packed, scale, zero, bits, in_features, isa), expected), isa


# Token counts per method: the GEMV handles rows in chunks of 4, 2 and 1; the tile
# GEMM in panels of 16 with zero padding; BLAS any count.
METHOD_TOKENS = {"gemv": [1, 2, 3, 4, 5, 7], "tiles": [1, 9, 16, 17, 40], "blas": [1, 20]}


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", list(METHOD_TOKENS))
def test_kernel_matches_float64_reference(kernel, bits, shape, method):
    out_features, in_features, groups = shape
    if groups > 1 and (in_features // groups) % 8:
        pytest.skip("the kernel requires group_size % 8 == 0 (such layers take the fallback)")
    codes, packed, scale, zero = random_packed(out_features, in_features, groups, bits, seed=7 * bits + out_features)
    weight = dequantize_reference(codes, scale, zero)
    generator = torch.Generator().manual_seed(bits)
    bias = torch.randn(out_features, generator=generator)
    for tokens in METHOD_TOKENS[method]:
        x = torch.randn(tokens, in_features, generator=generator)
        for isa in isas(kernel):
            for b in (None, bias):
                y = kernel.packed_linear(x, packed, scale, zero, b, bits, method, isa)
                assert_close_to_reference(y, x, weight, b)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's flags() itself warns
@pytest.mark.parametrize("onednn", [True, False], ids=["oneDNN", "BLAS"])
def test_the_blas_method_multiplies_through_onednn_or_torchs_blas(kernel, onednn):
    """The dequantized tiles go to oneDNN's linear op where torch has it, to torch's BLAS with
    oneDNN turned off (``torch.backends.mkldnn.flags``): the same product to fp32 rounding."""
    codes, packed, scale, zero = random_packed(300, 72, 1, 4, seed=11)
    weight = dequantize_reference(codes, scale, zero)
    generator = torch.Generator().manual_seed(3)
    bias = torch.randn(300, generator=generator)
    x = torch.randn(70, 72, generator=generator)
    with torch.backends.mkldnn.flags(enabled=onednn):
        for b in (None, bias):
            assert_close_to_reference(kernel.packed_linear(x, packed, scale, zero, b, 4, "blas", "auto"), x, weight, b)


@pytest.mark.parametrize("tokens", [1, 8, 9, 63, 64, 1023, 1024])
def test_automatic_method_computes_what_the_method_it_names_does(kernel, tokens):
    """method='auto' is one of the three, picked by token count: the fused GEMV up to 8
    tokens, BLAS from 1024 (from fewer where the CPU's BLAS has wider vectors than the
    tile GEMM), and whichever it names gives the very same output."""
    chosen = kernel.auto_method(tokens)
    if tokens <= 8:
        assert chosen == "gemv"
    elif tokens >= 1024:
        assert chosen == "blas"
    else:
        assert chosen in ("tiles", "blas")
    assert [kernel.auto_method(n) for n in (9, 64, 1023)] == sorted(
        [kernel.auto_method(n) for n in (9, 64, 1023)], key=["tiles", "blas"].index
    ), "once BLAS takes over it keeps every larger count"
    codes, packed, scale, zero = random_packed(40, 96, 3, 4, seed=tokens)
    x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(tokens))
    automatic = kernel.packed_linear(x, packed, scale, zero, None, 4)
    assert torch.equal(automatic, kernel.packed_linear(x, packed, scale, zero, None, 4, chosen))


@pytest.mark.parametrize("out_features", [100, 2500])
def test_kernel_with_two_threads(kernel, out_features):
    """Each thread takes its own rows or tiles; the split must not change the result beyond
    rounding.  2500 x 264 weights are enough for the GEMV to give each thread its own rows."""
    codes, packed, scale, zero = random_packed(out_features, 264, 33, 3, seed=3)
    weight = dequantize_reference(codes, scale, zero)
    bias = torch.randn(out_features)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for method, tokens in (("gemv", 3), ("gemv", 1), ("tiles", 33), ("blas", 20), ("blas", 300)):
            x = torch.randn(tokens, 264)
            assert_close_to_reference(kernel.packed_linear(x, packed, scale, zero, bias, 3, method), x, weight, bias)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("leading", [(), (0,), (1,), (3, 5), (2, 1, 600)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("groups", [1, 2])
def test_packed_linear_any_leading_shape(kernel, kernel_enabled, leading, bits, groups):
    """The public function on the kernel path (the automatic method choice included)."""
    codes, packed, scale, zero = random_packed(48, 128, groups, bits, seed=bits)
    weight = dequantize_reference(codes, scale, zero)
    x = torch.randn(*leading, 128)
    bias = torch.randn(48)
    assert kernel_covers(x, packed, scale, zero, bias)
    y = packed_linear(x, packed, scale, zero, bits, bias)
    assert y.shape == (*leading, 48)
    assert_close_to_reference(y.reshape(-1, 48), x.reshape(-1, 128), weight, bias)


def test_automatic_choice_reaches_blas(kernel, kernel_enabled):
    codes, packed, scale, zero = random_packed(8, 16, 1, 4, seed=0)
    x = torch.randn(1100, 16)
    weight = dequantize_reference(codes, scale, zero)
    assert_close_to_reference(packed_linear(x, packed, scale, zero, 4), x, weight, None)


def test_non_contiguous_inputs(kernel, kernel_enabled):
    codes, packed, scale, zero = random_packed(16, 64, 2, 4, seed=1)
    x = torch.randn(64, 5).t()  # (5, 64), column-major
    wide = torch.zeros(16, packed.shape[1] * 2, dtype=torch.int32)
    wide[:, ::2] = packed
    y = packed_linear(x, wide[:, ::2], scale, zero, 4)
    assert_close_to_reference(y, x, dequantize_reference(codes, scale, zero), None)


def fallback_cases():
    """Inputs the kernel does not cover, with the dtype the output must have."""
    grouped_by_12 = random_packed(10, 36, 3, 4, seed=0)  # group_size 12, not a multiple of 8
    per_channel = random_packed(10, 36, 1, 4, seed=1)
    return {
        "group_size % 8 != 0": (grouped_by_12, torch.randn(3, 36), None),
        "bf16 activations": (per_channel, torch.randn(3, 36).bfloat16(), torch.randn(10).bfloat16()),
        "fp16 activations": (per_channel, torch.randn(3, 36).half(), None),
        "float64 activations": (per_channel, torch.randn(3, 36).double(), None),
    }


@pytest.mark.parametrize("case", list(fallback_cases()))
def test_every_uncovered_input_takes_the_exact_fallback(kernel_enabled, case):
    (codes, packed, scale, zero), x, bias = fallback_cases()[case]
    assert not kernel_covers(x, packed, scale, zero, bias)
    expected = F.linear(x, dequantize_reference(codes, scale, zero).to(x.dtype), bias)
    assert torch.equal(packed_linear(x, packed, scale, zero, 4, bias), expected)


def test_environment_variable_forces_the_fallback(kernel, monkeypatch):
    codes, packed, scale, zero = random_packed(32, 256, 2, 4, seed=5)
    x = torch.randn(4, 256)
    weight = dequantize_reference(codes, scale, zero)
    monkeypatch.setenv(DISABLE_ENV_VAR, "1")
    assert torch.equal(packed_linear(x, packed, scale, zero, 4), F.linear(x, weight))
    monkeypatch.setenv(DISABLE_ENV_VAR, "0")
    assert_close_to_reference(packed_linear(x, packed, scale, zero, 4), x, weight, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (the CUDA path is the torch fallback)")
def test_cuda_takes_the_fallback():
    codes, packed, scale, zero = random_packed(32, 96, 3, 3, seed=2)
    x = torch.randn(5, 96, device="cuda")
    args = (packed.cuda(), scale.cuda(), zero.cuda())
    assert not kernel_covers(x, *args, None)
    expected = F.linear(x, dequantize_reference(codes, scale, zero).cuda())
    assert torch.equal(packed_linear(x, *args, 3), expected)


class TinyPackedModel(nn.Module):
    """A layer norm, a packed linear layer with bias and a GELU: enough graph around the op."""

    def __init__(self, bits: int = 4):
        super().__init__()
        codes, packed, scale, zero = random_packed(24, 64, 2, bits, seed=11)
        self.bits = bits
        self.norm = nn.LayerNorm(64)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bias = nn.Parameter(torch.randn(24))

    def forward(self, x):
        y = packed_linear(self.norm(x), self.weight_packed, self.scale, self.zero, self.bits, self.bias)
        return F.gelu(y)


def test_torch_compile_fullgraph_traces_the_op(kernel_enabled):
    """Dynamo + AOT autograd (fake tensors, functionalization) keep the op as one call in a full graph."""
    torch._dynamo.reset()
    model = TinyPackedModel().eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.inference_mode():
        for shape in [(3, 64), (2, 7, 64)]:
            x = torch.randn(shape)
            assert torch.equal(compiled(x), model(x))


class PackedOnly(nn.Module):
    def __init__(self):
        super().__init__()
        _, packed, scale, zero = random_packed(24, 64, 2, 4, seed=11)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def forward(self, x):
        return packed_linear(x, self.weight_packed, self.scale, self.zero, 4)


def test_torch_compile_with_inductor_equals_eager(kernel_enabled):
    """The default backend; only the op in the graph, so inductor adds no fused arithmetic of its own."""
    torch._dynamo.reset()
    model = PackedOnly()
    compiled = torch.compile(model, fullgraph=True)
    with torch.inference_mode():
        for shape in [(3, 64), (2, 7, 64)]:
            x = torch.randn(shape)
            assert torch.equal(compiled(x), model(x))


def test_inference_mode_and_no_grad_give_the_same_result(kernel_enabled):
    model = TinyPackedModel(bits=3)
    x = torch.randn(5, 64)
    plain = model(x)
    with torch.no_grad():
        no_grad = model(x)
    with torch.inference_mode():
        inference = model(x)
    assert torch.equal(plain, no_grad) and torch.equal(plain, inference)
    assert not inference.requires_grad


def test_gradients_flow_to_activations_and_bias(kernel_enabled):
    codes, packed, scale, zero = random_packed(12, 40, 5, 4, seed=4)
    weight = dequantize_reference(codes, scale, zero)
    x = torch.randn(2, 3, 40, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    grad_out = torch.randn(2, 3, 12)
    packed_linear(x, packed, scale, zero, 4, bias).backward(grad_out)
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_()
    F.linear(x_ref, weight, bias_ref).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bias.grad, bias_ref.grad)


def test_trainable_scale_is_refused_with_one_clear_error():
    _, packed, scale, zero = random_packed(12, 40, 5, 4, seed=4)
    with pytest.raises(NotImplementedError, match="scale"):
        packed_linear(torch.randn(2, 40), packed, scale.requires_grad_(), zero, 4)


def test_opcheck(kernel_enabled):
    """torch.library's own consistency checks: schema, fake tensor, autograd registration."""
    _, packed, scale, zero = random_packed(12, 40, 5, 4, seed=4)
    x = torch.randn(3, 40, requires_grad=True)
    torch.library.opcheck(torch.ops.hf_comq.packed_linear.default, (x, packed, scale, zero, torch.randn(12), 4))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(bits=9), ValueError, "bits"),
        (dict(weight_packed=torch.zeros(12, 6, dtype=torch.int32)), ValueError, "words per row"),
        (dict(weight_packed=torch.zeros(12, 5, dtype=torch.int64)), TypeError, "int32"),
        (dict(scale=torch.ones(12, 5, dtype=torch.bfloat16)), TypeError, "float32"),
        (dict(scale=torch.ones(12, 3), zero=torch.zeros(12, 3, dtype=torch.uint8)), ValueError, "divide"),
        (dict(zero=torch.zeros(12, 5, dtype=torch.int32)), TypeError, "uint8"),
        (dict(bias=torch.zeros(13)), ValueError, "bias"),
        (dict(in_features=39), ValueError, r"x has 40 features .* in_features=39"),  # 39 codes fill 5 words too
    ],
)
def test_bad_input_is_named(change, error, message):
    _, packed, scale, zero = random_packed(12, 40, 5, 4, seed=4)
    arguments = dict(x=torch.randn(2, 40), weight_packed=packed, scale=scale, zero=zero, bits=4, bias=None)
    arguments.update(change)
    with pytest.raises(error, match=message):
        packed_linear(**arguments)
