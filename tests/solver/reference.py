"""Slow, obviously-correct reference implementations the fast solver is checked against.

They follow the COMQ reference code's formulation literally: the residual
``U_k = X (w_k - wq_k)^T`` on the calibration inputs X themselves, one coordinate at
a time, no Gram matrix, no blocking.
"""

from __future__ import annotations

from typing import Any, NamedTuple

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


class RoundedLayer(NamedTuple):
    """A float64 layer, its Gram matrix and its weight rounded to nearest on a 3-bit min-max grid."""

    weight: torch.Tensor
    inputs: torch.Tensor
    hessian: torch.Tensor
    grid: Any
    scale: torch.Tensor  # per column, out x in
    zero: torch.Tensor  # per column, out x in
    codes: torch.Tensor  # out x in

    @property
    def offsets(self) -> torch.Tensor:
        return self.codes - self.zero

    @property
    def values(self) -> torch.Tensor:
        return self.offsets * self.scale


def rounded_layer(out_features: int, in_features: int, tokens: int, seed: int, group_size: int | None) -> RoundedLayer:
    """:func:`make_layer` in float64, rounded to nearest (room for every pass to improve it)."""
    from hf_comq.solver.grid import minmax_grid

    weight, inputs = make_layer(out_features, in_features, tokens, seed=seed)
    weight, inputs = weight.double(), inputs.double()
    grid = minmax_grid(weight, 3, group_size or in_features)
    scale, zero = grid.per_column()
    codes = torch.clamp(torch.round(weight / scale) + zero, 0, grid.max_code)
    return RoundedLayer(weight, inputs, inputs.T @ inputs, grid, scale, zero, codes)


def block_resolve_reference(
    weight: torch.Tensor,
    values: torch.Tensor,
    inputs: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    max_code: int,
    damp: float,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block re-solve written out on X (float64): for each block of consecutive
    columns, the block's optimum with every other column fixed is solved from the
    normal equations, rounded by :func:`error_feedback_reference` on the block's own
    Gram matrix, and each row keeps the result only if ``||X (w - wq)^T||^2`` drops.
    Returns the codes and values (out x in)."""
    x = inputs.double()
    w, wq = weight.double(), values.double().clone()
    s, z = scale.double(), zero.double()
    codes = torch.clamp(torch.round(wq / s) + z, 0, max_code)
    for b0 in range(0, w.shape[1], block_size):
        block = slice(b0, min(b0 + block_size, w.shape[1]))
        x_b = x[:, block]
        gram = x_b.T @ x_b
        damped = gram + damp * torch.diagonal(gram).mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        for k in range(w.shape[0]):
            # Least squares for the block given the rest: X_B t = X_B wq_B + X (w - wq).
            error = x @ (w[k] - wq[k])
            target = wq[k, block] + torch.linalg.solve(damped, x_b.T @ error)
            new_codes = error_feedback_reference(
                target.unsqueeze(0), gram, s[k : k + 1, block], z[k : k + 1, block], max_code, damp
            )[0].double()
            candidate = wq[k].clone()
            candidate[block] = s[k, block] * (new_codes - z[k, block])
            if float((x @ (w[k] - candidate)).square().sum()) < float(error.square().sum()):
                wq[k], codes[k, block] = candidate, new_codes
    return codes, wq


def ledoit_wolf_ridge(rows: torch.Tensor) -> float:
    """Ledoit-Wolf (2004) shrinkage of ``rows``' second-moment matrix, from the tokens one by one
    in float64 (the spread of each token's ``x x^T`` around the mean, against the mean's distance
    from ``mu * I``), as the solver's relative ridge ``delta / (1 - delta)``."""
    rows = rows.double()
    n, p = rows.shape
    moment = rows.T @ rows / n
    mu = moment.diagonal().mean()
    d2 = ((moment - mu * torch.eye(p, dtype=rows.dtype)) ** 2).sum()
    b2 = sum(((row[:, None] * row[None, :] - moment) ** 2).sum() for row in rows) / n**2
    delta = float(min(b2, d2) / d2)
    return delta / (1.0 - delta)
