"""``packed_linear``: ``F.linear`` with a compressed-tensors ``pack-quantized`` weight.

Inputs, in ``nn.Linear`` ``(out, in)`` layout:

* ``weight_packed`` -- ``int32 (out, ceil(in * bits / 32))``.  Each row is one
  little-endian bit stream: code ``i`` sits at stream bits ``[i * bits, (i + 1) * bits)``,
  least significant bit first, word ``k`` holds stream bits ``[32k, 32k + 32)``; codes
  may straddle words.  Codes are unsigned, in ``[0, 2**bits - 1]``.
* ``scale`` -- ``float32 (out, G)`` and ``zero`` -- ``uint8 (out, G)``, unsigned zero
  points in ``[0, 2**bits - 1]`` (symmetric grids pass ``2**(bits - 1)``).  ``G == 1``
  is per-channel, otherwise groups of ``in // G`` consecutive inputs.

The weight is ``W[o, i] = float(u[o, i] - zero[o, g]) * scale[o, g]``, ``g = i // (in // G)``:
an integer subtraction, then one fp32 multiply, the expression other loaders of the
format use, so dequantized weights stay bit-comparable with theirs.

Two paths, chosen per call:

* the compiled CPU kernel (:mod:`hf_comq.kernels.build`) for fp32 activations on CPU
  with per-channel scales or groups of a multiple of 8 inputs.  Up to 8 tokens a fused
  GEMV decodes the codes in registers and never stores the weight; it sums
  ``x * float(u - zero)`` over a group and multiplies by the scale once (the
  distributive law).  From 9 tokens, tiles of the weight are dequantized with the
  expression above and multiplied by an AVX2 micro-kernel, or by a library GEMM (oneDNN's
  linear op on CPUs with AVX-512, which it uses there, where torch has it and oneDNN is on;
  else torch's BLAS): from 1024 tokens, from 64 on CPUs with AVX-512 (where the library
  multiplies with vectors twice the micro-kernel's width), and always on CPUs without AVX2.  ``torch.ops.hf_comq_cpu.auto_method(tokens)``
  names the choice.  The output is ``F.linear``'s up to fp32 rounding: the
  tests hold it to the worst-case error bound of an fp32 dot product summed in any
  order (``tests/kernels/reference.py``).
* the fallback for everything else (bf16/fp16 activations, CUDA, other group sizes, no
  compiler, ``HF_COMQ_DISABLE_KERNEL=1``): :func:`dequantize_packed`, a cast to
  ``x.dtype``, then ``F.linear`` -- bit-identical to ``F.linear`` on the dequantized weight.

The op is registered as ``torch.ops.hf_comq.packed_linear`` with a fake implementation,
so ``torch.compile`` (also ``fullgraph=True``) keeps it as one opaque call.  Gradients
flow to ``x`` and ``bias`` (through the dequantized weight); the quantized weight itself
is not trainable through this op.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .. import packing
from .build import kernel_disabled, load_kernel

SUPPORTED_BITS = range(1, 9)


def dequantize_packed(
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    in_features: int,
) -> torch.Tensor:
    """The fp32 weight ``(out, in)``: ``float(u - zero) * scale`` per group, exactly.

    Runs the compiled dequantization where it reads the weight (same bits, without
    unpacking through a chain of torch ops), else :func:`dequantize_with_torch`.
    """
    compiled = not torch.compiler.is_compiling() and not kernel_disabled()
    if compiled and kernel_reads(weight_packed, scale, zero, in_features):
        ops = load_kernel()
        if ops is not None:
            return ops.dequantize(weight_packed.contiguous(), scale.contiguous(), zero.contiguous(), bits, in_features)
    return dequantize_with_torch(weight_packed, scale, zero, bits, in_features)


def dequantize_with_torch(
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    in_features: int,
) -> torch.Tensor:
    """:func:`dequantize_packed` in torch ops only: any device, traceable, no compiled code.

    Scales and zero points broadcast over each group's columns instead of being
    repeated to ``(out, in)``.
    """
    out_features, groups = scale.shape
    codes = packing.unpack_codes(weight_packed, bits, in_features).to(torch.int32).view(out_features, groups, -1)
    weight = (codes - zero.to(torch.int32).unsqueeze(-1)).to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)
    return weight.view(out_features, in_features)


def packed_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
    *,
    in_features: int | None = None,
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for the packed weight ``W`` (see the module docstring).

    ``in_features`` is the weight's input width; ``None`` takes ``x.shape[-1]``.  Pass it
    where it is known (:class:`~hf_comq.nn.COMQLinear` does): a row of ``ceil(in * bits / 32)``
    words holds codes for several widths (41 to 48 at 4 bits), so the packed shapes alone
    cannot tell an input one feature short.  The width and the group size
    ``in_features // scale.shape[1]`` are checked against the packed shapes here, with one
    line naming the mismatch, before any kernel runs.
    """
    check_packed_inputs(x, weight_packed, scale, zero, bits, bias, in_features)
    if under_function_transforms() or carries_a_tangent(x):
        # torch.func (grad, jacrev, vmap of grad) cannot run the op's autograd formula, which
        # custom_op writes as an autograd.Function without a vmap rule, and the op has no forward-mode
        # formula for a dual tensor's tangent: plain torch ops have both.
        weight = dequantize_with_torch(weight_packed, scale, zero, bits, x.shape[-1]).to(x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    if torch.compiler.is_compiling() or needs_autograd(x, scale, bias):
        return torch.ops.hf_comq.packed_linear(x, weight_packed, scale, zero, bias, bits)
    # Plain eager inference: the same function the op runs, without the custom-op
    # dispatch, which costs more than the whole 1-token kernel on small layers.
    return run_packed_linear(x, weight_packed, scale, zero, bias, bits)


def under_function_transforms() -> bool:
    """Whether a ``torch.func`` transform (grad, jacrev, vmap, ...) is running (torch has no public
    spelling of this; without one, the answer is no and the op runs as before)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def carries_a_tangent(x: torch.Tensor) -> bool:
    """Whether ``x`` is a forward-mode AD dual tensor (``torch.autograd.forward_ad``) whose tangent the
    output must carry on."""
    return torch.autograd.forward_ad.unpack_dual(x).tangent is not None


def needs_autograd(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or scale.requires_grad or (bias is not None and bias.requires_grad)
    )


def check_float_input(x: torch.Tensor) -> None:
    """Refuse an integer input as ``nn.Linear`` does: the weight cast to its dtype would be truncated
    to integers and the layer would answer with garbage."""
    if not x.is_floating_point():
        raise TypeError(f"packed_linear: x must be a floating-point tensor, got {x.dtype} (token ids go to an embedding)")


def check_packed_inputs(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None,
    in_features: int | None = None,
) -> None:
    """Reject inconsistent shapes and dtypes early: a wrong layout would otherwise come out as a wrong answer.

    Without ``in_features`` (the weight's width) an input a few features short of it can pass:
    see :func:`packed_linear`.
    """
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"packed_linear: bits must be an integer in 1..8, got {bits!r}")
    check_float_input(x)
    if x.dim() == 0:
        raise ValueError("packed_linear: x must have at least one dimension (the input features)")
    if in_features is not None and x.shape[-1] != in_features:
        raise ValueError(
            f"packed_linear: x has {x.shape[-1]} features (shape {tuple(x.shape)}) but the weight takes "
            f"in_features={in_features}"
        )
    in_features = x.shape[-1]
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
        raise TypeError(
            f"packed_linear: weight_packed must be a 2-D int32 tensor, got {weight_packed.dtype} "
            f"{tuple(weight_packed.shape)}"
        )
    out_features, width = weight_packed.shape
    if width != packing.packed_width(in_features, bits):
        raise ValueError(
            f"packed_linear: weight_packed has {width} words per row, but x has {in_features} features and "
            f"{in_features} codes of {bits} bits take {packing.packed_width(in_features, bits)} (ceil(in * bits / 32))"
        )
    if scale.dtype != torch.float32 or scale.dim() != 2 or scale.shape[0] != out_features:
        raise TypeError(
            f"packed_linear: scale must be float32 (out_features={out_features}, groups), got {scale.dtype} "
            f"{tuple(scale.shape)}; convert it once with scale.float()"
        )
    groups = scale.shape[1]
    if groups < 1 or in_features % groups:
        raise ValueError(f"packed_linear: {groups} scale groups do not divide in_features={in_features}")
    if zero.dtype != torch.uint8 or zero.shape != scale.shape:
        raise TypeError(
            f"packed_linear: zero must be uint8 shaped like scale {tuple(scale.shape)}, got {zero.dtype} "
            f"{tuple(zero.shape)}; convert it once with zero.to(torch.uint8)"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        raise ValueError(f"packed_linear: bias must have shape ({out_features},), got {tuple(bias.shape)}")


def kernel_reads(weight_packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int) -> bool:
    """Whether the compiled code decodes this weight: CPU tensors of the documented dtypes, a
    little-endian host, per-channel scales or groups of a multiple of 8 inputs."""
    cpu = torch.device("cpu")
    if sys.byteorder != "little" or weight_packed.device != cpu or scale.device != cpu or zero.device != cpu:
        return False
    if weight_packed.dtype != torch.int32 or scale.dtype != torch.float32 or zero.dtype != torch.uint8:
        return False
    groups = scale.shape[1]
    return groups == 1 or (in_features // groups) % 8 == 0


def kernel_covers(
    x: torch.Tensor, weight_packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None
) -> bool:
    """Whether the fused kernel computes this call: fp32 activations (and bias) on CPU, a weight it reads."""
    if x.dtype != torch.float32 or x.device != torch.device("cpu"):
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.device != x.device):
        return False
    return kernel_reads(weight_packed, scale, zero, x.shape[-1])


def run_packed_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
) -> torch.Tensor:
    """The fused kernel where it covers the call and has built, else the exact path: the fp32 weight of
    :func:`dequantize_packed`, cast to ``x.dtype``, then ``F.linear``."""
    if not kernel_disabled() and kernel_covers(x, weight_packed, scale, zero, bias):
        ops = load_kernel()
        if ops is not None:
            in_features, out_features = x.shape[-1], weight_packed.shape[0]
            y = ops.packed_linear(
                x.reshape(-1, in_features).contiguous(),
                weight_packed.contiguous(),
                scale.contiguous(),
                zero.contiguous(),
                None if bias is None else bias.contiguous(),
                bits,
            )
            return y.view(*x.shape[:-1], out_features)
    weight = dequantize_packed(weight_packed, scale, zero, bits, x.shape[-1]).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


# The op *is* run_packed_linear: custom_op reads the typed signature from it, so the
# schema and the eager path cannot drift apart.
packed_linear_op = torch.library.custom_op("hf_comq::packed_linear", mutates_args=())(run_packed_linear)


@packed_linear_op.register_fake
def _(x, weight_packed, scale, zero, bias, bits):
    return x.new_empty((*x.shape[:-1], weight_packed.shape[0]))


def refuse_trainable_scale(scale: torch.Tensor) -> None:
    """Packed weights do not train (README, Limitations): one line, called where autograd records the
    layer (this op's setup, ``COMQLinear``'s ``Conv1D`` path), so both layouts refuse alike."""
    if scale.requires_grad:
        raise NotImplementedError(
            "packed layers do not train their quantized weight, but its scale requires grad: "
            "call weight_scale.requires_grad_(False), or load the checkpoint dense with plain transformers to fine-tune"
        )


def _setup_context(ctx, inputs, output):
    x, weight_packed, scale, zero, bias, bits = inputs
    refuse_trainable_scale(scale)
    ctx.save_for_backward(weight_packed, scale, zero)
    ctx.bits = bits
    ctx.in_features = x.shape[-1]
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    weight_packed, scale, zero = ctx.saved_tensors
    # Torch ops only: AOT autograd may trace this backward with fake tensors.
    weight = dequantize_with_torch(weight_packed, scale, zero, ctx.bits, ctx.in_features).to(grad.dtype)
    grad_x = (grad @ weight).to(ctx.x_dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, grad_bias, None


packed_linear_op.register_autograd(_backward, setup_context=_setup_context)
