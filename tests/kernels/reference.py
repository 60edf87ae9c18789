"""Slow, obviously-correct references for the packed-layer kernels.

The packer builds each row's bit stream as one Python integer, code ``i`` shifted to
bit ``i * bits``, and cuts it into 32-bit words: the compressed-tensors
``pack-quantized`` layout read straight off its definition.
"""

from __future__ import annotations

import math

import torch


def pack_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``int32 (out, ceil(in * bits / 32))`` words of unsigned codes ``(out, in)``."""
    out_features, in_features = codes.shape
    width = math.ceil(in_features * bits / 32)
    rows = []
    for row in codes.tolist():
        stream = sum(code << (i * bits) for i, code in enumerate(row))
        words = [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(width)]
        rows.append([word - (1 << 32) if word >= 1 << 31 else word for word in words])
    return torch.tensor(rows, dtype=torch.int32).reshape(out_features, width)


def dequantize_reference(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """fp32 ``float(u - zero) * scale``, the group of column ``i`` being ``i // (in // G)``."""
    in_features = codes.shape[1]
    group_of_column = torch.arange(in_features) // (in_features // scale.shape[1])
    centred = codes.to(torch.int32) - zero.to(torch.int32)[:, group_of_column]
    return centred.to(torch.float32) * scale[:, group_of_column]


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` in float64 (the fp32 weights are exact in float64)."""
    y = x.double() @ weight.double().T
    return y if bias is None else y + bias.double()


def fp32_error_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Per-output bound on the error of any fp32 evaluation of ``x @ W.T + b``.

    The classic worst case for a length-K dot product in any summation order is
    ``gamma_K * sum_i |x_i| |w_i|`` with ``gamma_K = K u / (1 - K u)``, ``u = 2**-24``
    (Higham, Accuracy and Stability of Numerical Algorithms, 3.1).  K + 4 adds one
    rounding each for the bias, for the weight's own rounding to fp32 (the reference
    uses the rounded weight, a kernel may not), and for a kernel that multiplies by
    the scale once per group instead of once per weight.  It is a worst case over
    summation orders, not a fitted tolerance; a wrong code moves an output by about
    ``|x_i| * scale``, far above it for the sizes tested here.
    """
    terms = x.double().abs() @ weight.double().abs().T
    if bias is not None:
        terms = terms + bias.double().abs()
    unit = 2.0**-24
    k = x.shape[-1] + 4
    return terms * (k * unit / (1 - k * unit)) + 1e-30


def random_packed(
    out_features: int, in_features: int, groups: int, bits: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, weight_packed, scale, zero) with random codes, scales and zero points."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=generator)
    scale = torch.rand(out_features, groups, generator=generator) * 0.1 + 1e-3
    zero = torch.randint(0, 1 << bits, (out_features, groups), generator=generator).to(torch.uint8)
    return codes, pack_reference(codes, bits), scale, zero
