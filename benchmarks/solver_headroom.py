"""How much lower can the W4 layer objective go than the default's, at any cost?

Issue 13 asks for a default at most 0.9x GPTQ-best's objective (the best of GPTQ
act-order over llm-compressor's observers and two dampings).  At 3 and 2 bits the
default is below that; at 4 bits on real layers it is 0.91-0.96x.  This benchmark
asks whether the solver's own knobs, spent without regard to cost, get there:

* each knob alone (more sweeps, a fourth start grid, other start dampings, other
  block sizes, tighter clipping), one full solve each;
* the best of all of them **per output row** (rows are independent, so a solver that
  ran every one of them and kept each row's lowest objective would reach exactly
  this), at the sum of their costs.

    $B benchmarks/solver_headroom.py                         # W4, per channel and group 64
    $B benchmarks/solver_headroom.py --only "block 10" --group-sizes 64

Needs llm-compressor for the GPTQ rows (the bench venv, see benchmarks/README.md)
and the cached real layer problems that ``bench_solver.py`` captures.  Times are
one-thread wall seconds, as a ratio to the fastest GPTQ run of the same layer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_solver import LAYER_CACHE, STRONG_COMQ_SETTINGS, evaluate_strong, load_problems, timed  # noqa: E402
from hf_comq.solver import comq_quantize  # noqa: E402

VARIANTS: dict[str, dict] = {
    "4 sweeps": dict(iterations=4),
    "4 start grids": dict(start_grids=4),
    "start damp 0.001": dict(damp=0.001),
    "start damp 0.01": dict(damp=0.01),
    "blocks of 64": dict(block_size=64),
    "blocks of 256": dict(block_size=256),
    "clipping x0.985": dict(shrink=0.985),
    "clipping x0.97": dict(shrink=0.97),
    "clipping x0.95": dict(shrink=0.95),
    "clipping x0.9": dict(shrink=0.9),
}


def row_objectives(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Each output row's ``(w - wq) H (w - wq)^T`` in float64 (they sum to the layer objective)."""
    error = weight.double() - dequantized.double()
    return ((error @ hessian.double()) * error).sum(1)


def headroom(problem, bits: int, group_size: int | None) -> dict:
    """GPTQ-best, the default, every variant, and the per-row best of them all."""
    # The default runs below (its rows are needed, not just its total), so no COMQ setting runs here.
    peers = [row for row in evaluate_strong(problem, bits, group_size, tuple(STRONG_COMQ_SETTINGS)) if row[0].startswith("GPTQ")]
    gptq_best = min(objective for _, objective, _ in peers)
    gptq_seconds = min(secs for _, _, secs in peers)
    w, h = problem.weight, problem.hessian
    default, seconds = timed(lambda: comq_quantize(w, h, bits=bits, group_size=group_size))
    best_rows = row_objectives(w, default.dequantize(), h)
    default_objective = float(best_rows.sum())
    total_seconds = seconds
    single = {}
    for name, settings in VARIANTS.items():
        result, secs = timed(lambda: comq_quantize(w, h, bits=bits, group_size=group_size, **settings))
        rows = row_objectives(w, result.dequantize(), h)
        single[name] = float(rows.sum())
        best_rows = torch.minimum(best_rows, rows)
        total_seconds += secs
    best_single = min(single, key=single.get)
    return dict(
        default=default_objective / gptq_best,
        best_single_name=best_single,
        best_single=single[best_single] / gptq_best,
        per_row_best=float(best_rows.sum()) / gptq_best,
        default_cost=seconds / gptq_seconds,
        all_cost=total_seconds / gptq_seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", default=["dinov2", "smollm2", "minilm"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-sizes", nargs="+", default=["channel", "64"], help="'channel' or an integer")
    parser.add_argument("--only", default=None, help="only layers whose name contains this text")
    parser.add_argument("--cache", type=Path, default=LAYER_CACHE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    problems = [p for p in load_problems(args.layers, args.cache) if args.only is None or args.only in p.name]
    print(f"torch {torch.__version__}, 1 thread, W{args.bits}; objectives as ratios to GPTQ-best (lower is better)")
    print(f"variants: {', '.join(VARIANTS)}")
    for group in args.group_sizes:
        group_size = None if group == "channel" else int(group)
        print(f"\n### W{args.bits}, group {group}")
        print("| layer | default | best single variant | per-row best of default + all variants | "
              "default time / GPTQ | all solves' time / GPTQ |")
        print("|---|---|---|---|---|---|")
        worst = {"default": 0.0, "per_row_best": 0.0}
        for problem in problems:
            found = headroom(problem, args.bits, group_size)
            worst = {key: max(value, found[key]) for key, value in worst.items()}
            print(f"| {problem.name} | {found['default']:.3f} | {found['best_single']:.3f} ({found['best_single_name']}) | "
                  f"{found['per_row_best']:.3f} | {found['default_cost']:.1f} | {found['all_cost']:.1f} |", flush=True)
        print(f"worst layer: default {worst['default']:.3f}, per-row best of all {worst['per_row_best']:.3f} (target 0.9)")


if __name__ == "__main__":
    main()
