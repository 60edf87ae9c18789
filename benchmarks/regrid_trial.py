"""Does choosing each group's grid on the full objective, after the solve, lower it?  (issue 13's
"clipping search on the full-H objective rather than its diagonal")

The default picks every (row, group)'s clipping before the solve, by a proxy of the
objective (each input's conditional energy, then a per-row choice among a few grids by
the exact objective of the start).  This trial asks what is left once the solve is
done: for one group of one row, with every other column fixed, the group's own problem

    minimise over the group's values V:  (T - V) H_gg (T - V)^T,   T = Vq + (H_gg + D)^-1 R_g

(``R = (W - Wq) H``, the solve's residual) is rounded again by error feedback on each of
several grids (scale times 0.9, 0.95, 1, 1.05, 1.1, and the zero point moved by one
step either way), and the row keeps the grid and codes whose exact change of the layer
objective is the lowest, if below zero.  Groups are visited in turn, the residual kept
exact; then one coordinate sweep polishes; the pass and the sweep run twice.

Rows printed per layer: the default's objective as a ratio to GPTQ-best (as in
``bench_solver.py --peers strong``), and what the regrid pass, the sweep after it and
the second round leave, as ratios to the default's objective; plus the pass's time
against the default solve's (this script's torch float64 loops, not a tuned pass).

    $B benchmarks/regrid_trial.py                         # W4 group 64, real layers
    $B benchmarks/regrid_trial.py --kinds synthetic --group-size 128

Needs llm-compressor (the bench venv, see benchmarks/README.md) and the real layer
problems that ``bench_solver.py`` captures and caches.  One thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_solver import add_trial_arguments, trial_problems  # noqa: E402
from benchmarks.magr_trial import gptq_best  # noqa: E402
from hf_comq.solver import comq_quantize, layer_objective  # noqa: E402

CANDIDATES = [(1.0, 0), (0.9, 0), (0.95, 0), (1.05, 0), (1.1, 0), (1.0, 1), (1.0, -1)]
"""(scale factor, zero-point step) of each grid a group is rounded on again."""
DAMP = 0.003  # the default start's damping at 4 bits, relative to the mean of diag(H_gg)


class Layer:
    """A solved layer in float64, original column order, with its exact residual."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, codes, scale, zero, group_size: int, bits: int):
        self.weight = weight.double()
        self.hessian = (hessian.double() + hessian.double().T) / 2
        self.codes, self.scale, self.zero = codes.double(), scale.double(), zero.double()
        self.group_size, self.max_code = group_size, (1 << bits) - 1
        self.values = self._expand(self.scale) * (self.codes - self._expand(self.zero))
        self.residual = (self.weight - self.values) @ self.hessian

    def _expand(self, table: torch.Tensor) -> torch.Tensor:
        return table.repeat_interleave(self.group_size, dim=1)

    def objective(self) -> float:
        error = self.weight - self.values
        return float(((error @ self.hessian) * error).sum())

    def regrid(self) -> None:
        """One pass over the groups (module docstring)."""
        for g in range(self.scale.shape[1]):
            self._regrid_group(g)

    def _regrid_group(self, g: int) -> None:
        cols = slice(g * self.group_size, (g + 1) * self.group_size)
        h_gg = self.hessian[cols, cols]
        damped = h_gg + DAMP * h_gg.diagonal().mean() * torch.eye(self.group_size, dtype=h_gg.dtype)
        order = torch.argsort(h_gg.diagonal(), descending=True)
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped[order][:, order])), upper=True)
        values, residual = self.values[:, cols], self.residual[:, cols]
        target = values + torch.linalg.solve(damped, residual.T).T
        best_change = torch.zeros(values.shape[0], dtype=values.dtype)
        best = (self.codes[:, cols].clone(), self.scale[:, g].clone(), self.zero[:, g].clone())
        for factor, step in CANDIDATES:
            scale = self.scale[:, g] * factor
            zero = (self.zero[:, g] + step).clamp(0, self.max_code)
            codes = torch.empty_like(target)
            codes[:, order] = _error_feedback(target[:, order], scale, zero, self.max_code, upper)
            delta = scale[:, None] * (codes - zero[:, None]) - values
            change = ((delta @ h_gg) * delta).sum(1) - 2 * (delta * residual).sum(1)
            better = change < best_change
            best_change = torch.where(better, change, best_change)
            best[0][better], best[1][better], best[2][better] = codes[better], scale[better], zero[better]
        moved = best_change < 0
        if not bool(moved.any()):
            return
        codes, scale, zero = best
        delta = (scale[:, None] * (codes - zero[:, None]) - values) * moved[:, None]
        self.residual -= delta @ self.hessian[cols, :]
        self.values[:, cols] += delta
        self.codes[:, cols], self.scale[:, g], self.zero[:, g] = codes, scale, zero

    def sweep(self) -> None:
        """One coordinate sweep in act-order (each coordinate's closed-form round-and-clip)."""
        scale, zero = self._expand(self.scale), self._expand(self.zero)
        for j in torch.argsort(self.hessian.diagonal(), descending=True).tolist():
            h_jj = self.hessian[j, j]
            if h_jj <= 0:
                continue
            optimum = self.values[:, j] + self.residual[:, j] / h_jj
            codes = (optimum / scale[:, j]).round_().add_(zero[:, j]).clamp_(0, self.max_code)
            delta = scale[:, j] * (codes - zero[:, j]) - self.values[:, j]
            if bool(delta.any()):
                self.residual -= delta[:, None] * self.hessian[j][None, :]
                self.values[:, j] += delta
                self.codes[:, j] = codes


def _error_feedback(target: torch.Tensor, scale, zero, max_code: int, upper: torch.Tensor) -> torch.Tensor:
    """GPTQ's rounding of ``target`` (rows x columns, in its order) with ``upper`` the upper
    Cholesky factor of the damped inverse, on per-row grids."""
    remaining = target.clone()
    codes = torch.empty_like(target)
    for i in range(target.shape[1]):
        codes[:, i] = (remaining[:, i] / scale).round_().add_(zero).clamp_(0, max_code)
        error = (remaining[:, i] - scale * (codes[:, i] - zero)) / upper[i, i]
        remaining[:, i + 1 :] -= error[:, None] * upper[i, i + 1 :][None, :]
    return codes


def trial(problem, bits: int, group_size: int) -> dict:
    weight, hessian = problem.weight.float(), problem.hessian
    started = time.perf_counter()
    result = comq_quantize(weight, hessian, bits=bits, group_size=group_size)
    default_seconds = time.perf_counter() - started
    default = layer_objective(weight, result.dequantize(), hessian)
    layer = Layer(weight, hessian, result.codes, result.scale, result.zero_point, group_size, bits)
    started = time.perf_counter()
    layer.regrid()
    regrid_seconds = time.perf_counter() - started
    after_pass = layer.objective()
    layer.sweep()
    after_sweep = layer.objective()
    layer.regrid()
    layer.sweep()
    return {
        "default": default / gptq_best(weight, hessian, weight, bits, group_size),
        "pass": after_pass / default,
        "sweep": after_sweep / default,
        "twice": layer.objective() / default,
        "time": regrid_seconds / default_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trial_arguments(parser, group_size=64)
    args = parser.parse_args()
    problems = trial_problems(args)
    print(f"torch {torch.__version__}, 1 thread, W{args.bits}, group {args.group_size}; "
          "default / GPTQ-best, then what the regrid leaves / the default's objective")  # fmt: skip
    print("| layer | default / GPTQ-best | regrid pass | + sweep | both twice | pass time / default solve |")
    print("|---|---|---|---|---|---|")
    rows = []
    for problem in problems:
        row = trial(problem, args.bits, args.group_size)
        rows.append(row)
        print(f"| {problem.name} | {row['default']:.3f} | {row['pass']:.4f} | {row['sweep']:.4f} | "
              f"{row['twice']:.4f} | {row['time']:.1f} |", flush=True)  # fmt: skip
    print("\nmedian / best over layers (of the default's objective):")
    for key in ("pass", "sweep", "twice"):
        values = [r[key] for r in rows]
        print(f"  {key}: {statistics.median(values):.4f} / {min(values):.4f}")
    new = [r["default"] * r["twice"] for r in rows]
    print(f"default / GPTQ-best: median {statistics.median(r['default'] for r in rows):.3f}, worst "
          f"{max(r['default'] for r in rows):.3f}; after both twice: median {statistics.median(new):.3f}, "
          f"worst {max(new):.3f}; at most 0.9: {sum(r['default'] <= 0.9 for r in rows)} -> {sum(v <= 0.9 for v in new)}")  # fmt: skip


if __name__ == "__main__":
    main()
