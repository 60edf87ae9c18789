"""Slow, obviously-correct reference implementations the fast solver is checked against.

They follow the COMQ reference code's formulation literally: the residual
``U_k = X (w_k - wq_k)^T`` on the calibration inputs X themselves, one coordinate at
a time, no Gram matrix, no blocking.
"""

from __future__ import annotations

import torch


def residual_form_comq(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    max_code: int,
    row_orders: torch.Tensor,
    sweeps: int,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """COMQ coordinate descent on X (float64). ``scale``/``zero`` are per column
    (out x in); ``row_orders[k]`` lists the columns row k visits.  Starts at the
    full-precision weight (the reference code) unless ``start`` is given."""
    w = weight.double()
    x = inputs.double()
    wq = w.clone() if start is None else start.double().clone()
    codes = torch.zeros_like(w)
    for _ in range(sweeps):
        for k in range(w.shape[0]):
            for j in row_orders[k].tolist():
                x_j = x[:, j]
                norm = float(x_j @ x_j)
                if norm == 0.0:
                    target = float(wq[k, j])
                else:
                    others = x @ (w[k] - wq[k]) - x_j * (w[k, j] - wq[k, j])
                    target = float(w[k, j]) + float(x_j @ others) / norm
                s, z = float(scale[k, j]), float(zero[k, j])
                code = min(max(round(target / s) + z, 0), max_code)
                codes[k, j] = code
                wq[k, j] = s * (code - z)
    return codes, wq


def greedy_orders(weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Each row's columns by decreasing ``|w_kj| * ||x_j||`` (the reference code's order)."""
    importance = weight.abs() * inputs.norm(dim=0).unsqueeze(0)
    return torch.argsort(importance, dim=1, descending=True, stable=True)


def error_feedback_reference(
    weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, max_code: int, damp: float
) -> torch.Tensor:
    """Unblocked GPTQ-style rounding in decreasing diag(H) order; returns codes."""
    perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    h = hessian.double()[perm][:, perm]
    h = h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    upper = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    w = weight.double()[:, perm].clone()
    s, z = scale.double()[:, perm], zero.double()[:, perm]
    codes = torch.zeros_like(w)
    for j in range(w.shape[1]):
        code = torch.clamp(torch.round(w[:, j] / s[:, j]) + z[:, j], 0, max_code)
        codes[:, j] = code
        error = (w[:, j] - s[:, j] * (code - z[:, j])) / upper[j, j]
        w[:, j + 1 :] -= error.unsqueeze(1) * upper[j, j + 1 :].unsqueeze(0)
    return codes[:, torch.argsort(perm)]


def objective(weight: torch.Tensor, dequant: torch.Tensor, inputs: torch.Tensor) -> float:
    return float((inputs.double() @ (weight.double() - dequant.double()).T).square().sum())


def make_layer(out_features: int, in_features: int, tokens: int, seed: int, outliers: int = 2):
    """A layer with correlated, activation-like inputs and a few outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=gen) / in_features**0.5 + torch.eye(in_features)
    inputs = torch.randn(tokens, in_features, generator=gen) @ mixing
    inputs[:, :outliers] *= 8.0
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    return weight, inputs
