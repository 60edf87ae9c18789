"""GPTQ from a maintained package (llm-compressor, pinned in the ``bench`` extra), run on
exactly the same Hessian and the same integer grid as hf_comq, on the CPU."""

from __future__ import annotations

import os

import torch

from hf_comq.solver import QuantizedWeight, layer_objective, minmax_grid

os.environ.setdefault("LLMCOMPRESSOR_DISABLE_GPTQ_TRITON", "1")

GPTQ_PACKAGE = "llmcompressor==0.14.0.1"
PEER_CALIBRATION: dict = {"fp_target": False}
"""``COMQConfig`` settings of a peer run as the layer solver of hf_comq's pipeline: each layer
solved for its own output at every bit width, as GPTQ does elsewhere, never for the weight
aimed at the full-precision outputs that hf_comq's default hands its own solver at 3 bits and
fewer."""
OBSERVERS = ("minmax", "memoryless_mse", "imatrix_mse")
"""llm-compressor's weight observers: plain min-max, the MSE clipping search
(``|w - q(w)|^2.4`` over shrink factors down to 0.8), and the same search weighted by
each input's mean square activation (``imatrix_mse``, shrink down to 0.05)."""


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

    ``scale``/``zero_point`` are hf_comq's ``(out, n_groups)`` grid with unsigned
    codes (``n_groups == 1``: per channel); compressed-tensors uses signed codes,
    hence the zero-point shift.
    """
    try:
        from compressed_tensors.quantization import QuantizationArgs
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    except ImportError as error:  # pragma: no cover - depends on the bench environment
        raise SystemExit(f"GPTQ baseline needs `pip install {GPTQ_PACKAGE}` (see benchmarks/README.md): {error}")

    n_groups = scale.shape[1]
    grouping = dict(strategy="channel") if n_groups == 1 else dict(strategy="group", group_size=weight.shape[1] // n_groups)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, actorder="static" if act_order else None, **grouping)
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


def _quantization_args(bits: int, columns: int, group_size: int | None, act_order: bool, observer: str = "minmax"):
    from compressed_tensors.quantization import QuantizationArgs

    grouping = dict(strategy="channel") if not group_size or group_size == columns else dict(strategy="group", group_size=group_size)
    return QuantizationArgs(
        num_bits=bits, type="int", symmetric=False, actorder="static" if act_order else None, observer=observer, **grouping
    )


def observer_grid(weight: torch.Tensor, hessian: torch.Tensor, tokens: int, bits: int, group_size: int | None, observer: str):
    """``(scale, zero_point)`` of llm-compressor's ``observer`` for this weight, in
    hf_comq's convention (``(out, n_groups)``, unsigned codes).  ``imatrix_mse`` gets its
    importance (mean ``x_j^2`` over the calibration tokens) from ``diag(H) / tokens``,
    which is what its forward hook would have accumulated."""
    from llmcompressor.observers import Observer

    args = _quantization_args(bits, weight.shape[1], group_size, act_order=True, observer=observer)
    obs = Observer.load_from_registry(observer, base_name="weight", args=args)
    if observer == "imatrix_mse":
        obs._imatrix_sum = torch.diagonal(hessian).float().clone()
        obs._imatrix_count = torch.tensor(tokens, dtype=torch.int64)
    obs(weight.float())
    qparams = obs.get_qparams()
    scale = qparams["scale"].float().reshape(weight.shape[0], -1)
    zero = qparams["zero_point"].float().reshape(weight.shape[0], -1) + (1 << (bits - 1))
    return scale, zero


def gptq_layer_solver(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int | None = None, **_: object) -> QuantizedWeight:
    """GPTQ with act-order as a drop-in layer solver for ``hf_comq.calibration.quantize_model``:
    same min-max grid as hf_comq's RTN/GPTQ rows, codes recovered from GPTQ's output."""
    w = weight.float()
    cols_per_group = group_size or w.shape[1]
    grid = minmax_grid(w, bits, cols_per_group)
    dequant = gptq_dequantized(w, hessian, grid.scale, grid.zero_point, bits, act_order=True)
    scale, zero = grid.per_column()
    codes = torch.clamp(torch.round(dequant / scale) + zero, 0, grid.max_code)
    return QuantizedWeight(
        codes=codes.to(torch.uint8), scale=grid.scale, zero_point=grid.zero_point, bits=bits,
        group_size=group_size, dtype=weight.dtype,
        stats={"relative_error": layer_objective(w, dequant, hessian) / max(layer_objective(w, torch.zeros_like(w), hessian), 1e-30)},
    )
