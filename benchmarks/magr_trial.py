"""Does MagR preprocessing help COMQ, or GPTQ, on real layers?  (issue 13's "directions to try")

MagR (A. Zhang et al., NeurIPS 2024, by COMQ's authors) changes each output row ``w``
of a layer before quantizing it, by proximal gradient descent on

    1/2 (w' - w) Hn (w' - w)^T + alpha * ||w'||_inf        (per group: sum of the groups' max norms)

with ``Hn = H / lambda_max(H)`` and step 1, so ``X w'^T`` stays close to ``X w^T`` while
the row's largest magnitude, and with it the quantization grid's step, shrinks.  The
quantizer then works on ``w'`` as if it were the weight; this script scores every
result against the *original* weight, ``||X (W - Wq)^T||^2``, the objective every other
solver table uses.

Rows printed per layer, as ratios to GPTQ-best (the best of llm-compressor's GPTQ
act-order over its observers and two dampings, as in ``bench_solver.py --peers strong``):
the default on ``W``; for each ``alpha``, the default on ``W'``, GPTQ-best on ``W'`` (the
MagR paper's recipe) and the share of the default's objective that the move to ``W'``
alone costs; and round to nearest on ``W'`` against round to nearest on ``W`` (MagR's
intended effect: a smaller grid step with little output change).

    $B benchmarks/magr_trial.py                                     # W4 per channel, real layers
    $B benchmarks/magr_trial.py --group-size 64 --alphas 1e-5 3e-5 1e-4
    $B benchmarks/magr_trial.py --kinds dinov2 --bits 3 --only "block 10"

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

from benchmarks.bench_solver import GPTQ_DAMPS, add_trial_arguments, trial_problems  # noqa: E402
from benchmarks.gptq_baseline import OBSERVERS, gptq_dequantized, observer_grid  # noqa: E402
from benchmarks.layers import LayerProblem  # noqa: E402
from hf_comq.solver import ROUND_TO_NEAREST, comq_quantize, layer_objective  # noqa: E402


def prox_max_norm(v: torch.Tensor, step: float) -> torch.Tensor:
    """Each row's proximal point of ``step * ||.||_inf``: the row clipped at the level
    ``tau`` where the clipped-off mass ``sum(max(|v| - tau, 0))`` equals ``step`` (the
    Moreau complement of projecting onto the l1 ball of radius ``step``); rows whose l1
    norm is at most ``step`` go to zero."""
    magnitude = v.abs()
    sorted_desc = magnitude.sort(dim=1, descending=True).values
    count = torch.arange(1, v.shape[1] + 1, dtype=v.dtype, device=v.device)
    # With the k largest entries clipped, the level that removes exactly `step`.
    levels = (sorted_desc.cumsum(1) - step) / count
    # The right k is the largest whose k-th entry still lies above its level.
    last = ((sorted_desc > levels) * torch.arange(v.shape[1], device=v.device)).amax(1, keepdim=True)
    tau = levels.gather(1, last).clamp_min(0.0)
    return torch.sign(v) * torch.minimum(magnitude, tau)


def magr_weight(
    weight: torch.Tensor, hessian: torch.Tensor, alpha: float, iterations: int, group_size: int | None
) -> torch.Tensor:
    """MagR's preprocessed weight (float64 iterations, float32 result)."""
    w = weight.double()
    h = hessian.double()
    h = h / torch.linalg.eigvalsh(h).max()  # step 1 is then a safe gradient step
    out_features, in_features = w.shape
    group = in_features if group_size is None else group_size
    current = w.clone()
    for _ in range(iterations):
        moved = current - (current - w) @ h
        current = prox_max_norm(moved.reshape(-1, group), alpha).reshape(out_features, in_features)
    return current.float()


def gptq_best(
    weight: torch.Tensor, hessian: torch.Tensor, target: torch.Tensor, bits: int, group_size: int | None
) -> float:
    """The lowest objective (against ``target``) of GPTQ act-order run on ``weight``."""
    best = float("inf")
    for observer in OBSERVERS:
        scale, zero = observer_grid(weight, hessian, 1, bits, group_size, observer)
        for damp in GPTQ_DAMPS:
            dequantized = gptq_dequantized(weight, hessian, scale, zero, bits, True, damp=damp)
            best = min(best, layer_objective(target, dequantized, hessian))
    return best


def solved(
    weight: torch.Tensor, hessian: torch.Tensor, target: torch.Tensor, bits: int, group_size: int | None, **settings
) -> float:
    """The objective (against ``target``) of ``comq_quantize`` run on ``weight``."""
    result = comq_quantize(weight, hessian, bits=bits, group_size=group_size, **settings)
    return layer_objective(target, result.dequantize(), hessian)


def trial(problem: LayerProblem, bits: int, group_size: int | None, alphas: list[float], iterations: int) -> dict:
    """One layer's row: every ratio the module docstring lists."""
    w, h = problem.weight.float(), problem.hessian
    best = gptq_best(w, h, w, bits, group_size)
    default = solved(w, h, w, bits, group_size)
    rtn = solved(w, h, w, bits, group_size, **ROUND_TO_NEAREST)
    row = {"default": default / best, "alphas": {}}
    for alpha in alphas:
        started = time.perf_counter()
        moved = magr_weight(w, h, alpha, iterations, group_size)
        seconds = time.perf_counter() - started
        row["alphas"][alpha] = {
            "default": solved(moved, h, w, bits, group_size) / best,
            "gptq": gptq_best(moved, h, w, bits, group_size) / best,
            "shift": layer_objective(w, moved, h) / default,
            "rtn": solved(moved, h, w, bits, group_size, **ROUND_TO_NEAREST) / rtn,
            "seconds": seconds,
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trial_arguments(parser)
    parser.add_argument("--alphas", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4, 1e-3])
    parser.add_argument("--iterations", type=int, default=200, help="MagR's proximal steps (the paper: 150-200)")
    args = parser.parse_args()
    problems = trial_problems(args)
    print(f"torch {torch.__version__}, 1 thread, W{args.bits}, group {args.group_size or 'channel'}, "
          f"{args.iterations} MagR steps; objectives against the original weight, as ratios to GPTQ-best")  # fmt: skip
    header = ["layer", "default"]
    for alpha in args.alphas:
        header += [f"a={alpha:g}: MagR + default", "MagR + GPTQ-best", "shift / default", "MagR RTN / RTN", "MagR s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    for problem in problems:
        row = trial(problem, args.bits, args.group_size, args.alphas, args.iterations)
        rows.append(row)
        cells = [problem.name, f"{row['default']:.3f}"]
        for alpha in args.alphas:
            r = row["alphas"][alpha]
            ratios = (r["default"], r["gptq"], r["shift"], r["rtn"])
            cells += [*(f"{value:.3f}" for value in ratios), f"{r['seconds']:.1f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    print("\nmedian over layers / worst layer:")
    print(f"  default: {statistics.median(r['default'] for r in rows):.3f} / {max(r['default'] for r in rows):.3f}")
    for alpha in args.alphas:
        for key, label in (("default", "MagR + default"), ("gptq", "MagR + GPTQ-best"), ("rtn", "MagR RTN / RTN")):
            values = [r["alphas"][alpha][key] for r in rows]
            print(f"  a={alpha:g} {label}: {statistics.median(values):.3f} / {max(values):.3f}")


if __name__ == "__main__":
    main()
