"""GPTQ from a maintained package (llm-compressor, pinned in the ``bench`` extra), run on
exactly the same Hessian and the same integer grid as hf_comq, on the CPU."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("LLMCOMPRESSOR_DISABLE_GPTQ_TRITON", "1")

GPTQ_PACKAGE = "llmcompressor==0.14.0.1"


def gptq_dequantized(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    act_order: bool,
    damp: float = 0.01,
) -> torch.Tensor:
    """GPTQ's quantized-dequantized weight on the grid ``scale * (q - zero_point)``.

    ``scale``/``zero_point`` are hf_comq's per-channel ``(out, 1)`` grid with
    unsigned codes; compressed-tensors uses signed codes, hence the zero-point shift.
    """
    try:
        from compressed_tensors.quantization import QuantizationArgs
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    except ImportError as error:  # pragma: no cover - depends on the bench environment
        raise SystemExit(f"GPTQ baseline needs `pip install {GPTQ_PACKAGE}` (see benchmarks/README.md): {error}")

    args = QuantizationArgs(
        num_bits=bits, type="int", symmetric=False, strategy="channel", actorder="static" if act_order else None
    )
    signed_zero = (zero_point - (1 << (bits - 1))).to(torch.int8)
    dequant, _, _ = quantize_weight(
        weight.float().unsqueeze(0).clone(),
        hessian.float().unsqueeze(0).clone(),
        scale.float().unsqueeze(0),
        signed_zero.unsqueeze(0),
        None,
        args,
        percdamp=damp,
    )
    return dequant.squeeze(0)
