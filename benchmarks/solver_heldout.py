"""Does the layer-objective lead hold on activations the solver never saw?

Every solver minimises ``||X(W - Wq)^T||^2`` on the calibration set's Gram matrix
``H``, an estimate from a few thousand tokens.  This script solves each projection of
SmolLM2-135M's decoder layers 7 and 22 on ``H`` from a 32 x 256-token calibration draw
(the perplexity benchmark's draw, seed 0) and scores the result twice: on that ``H``
and on one from 40 x 256 held-out tokens (the perplexity benchmark's evaluation text).
Rows: hf_comq's default with ``ridge`` 0, 0.01, 0.03 and 0.1, and with the scale refit,
each as a ratio to the better of GPTQ act-order with llm-compressor's ``imatrix_mse`` and
``memoryless_mse`` observers (chosen per layer on the calibration ``H``, damping 0.01,
solved on the same ``H``); geometric mean over the 14 layers, and the worst layer.

    $B benchmarks/solver_heldout.py                      # W3/W4, group 64 and per channel
    $B benchmarks/solver_heldout.py --variants default "scale_refit=True"

Needs llm-compressor (the bench venv, see benchmarks/README.md) and the converted
SmolLM2 checkpoint; the two sets of Gram matrices are cached under ``--cache``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_solver import LAYER_CACHE, load_problems  # noqa: E402
from benchmarks.gptq_baseline import gptq_dequantized, observer_grid  # noqa: E402
from hf_comq.solver import comq_quantize, layer_objective  # noqa: E402

VARIANTS: dict[str, dict] = {
    "default": {},
    "ridge=0.01": dict(ridge=0.01),
    "ridge=0.03": dict(ridge=0.03),
    "ridge=0.1": dict(ridge=0.1),
    "scale_refit=True": dict(scale_refit=True),
}
PEER_OBSERVERS = ("imatrix_mse", "memoryless_mse")


def gptq_best(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """GPTQ act-order's dequantized weight with whichever observer fits ``hessian`` better."""
    candidates = []
    for observer in PEER_OBSERVERS:
        scale, zero = observer_grid(weight, hessian, 1, bits, group_size, observer)
        candidates.append(gptq_dequantized(weight, hessian, scale, zero, bits, True, damp=0.01))
    return min(candidates, key=lambda dequantized: layer_objective(weight, dequantized, hessian))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["3:64", "4:64", "3:channel", "4:channel"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--cache", type=Path, default=LAYER_CACHE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    calibration, held_out = (load_problems([kind], args.cache) for kind in ("smollm2", "smollm2_held_out"))
    print(f"torch {torch.__version__}, 1 thread; objective of hf_comq's default / GPTQ-best, both solved on the calibration H")
    print("| setting | solver | on the calibration H (geo. mean) | worst layer | on the held-out H (geo. mean) | worst layer |")
    print("|---|---|---|---|---|---|")
    for setting in args.settings:
        bits_text, group_text = setting.split(":")
        bits, group_size = int(bits_text), None if group_text == "channel" else int(group_text)
        ratios: dict[str, list[tuple[float, float]]] = {name: [] for name in args.variants}
        for fitted, unseen in zip(calibration, held_out):
            weight, fitted_h, unseen_h = fitted.weight, fitted.hessian, unseen.hessian
            peer = gptq_best(weight, fitted_h, bits, group_size)
            for name in args.variants:
                ours = comq_quantize(weight, fitted_h, bits=bits, group_size=group_size, **VARIANTS[name]).dequantize()
                ratios[name].append((
                    layer_objective(weight, ours, fitted_h) / layer_objective(weight, peer, fitted_h),
                    layer_objective(weight, ours, unseen_h) / layer_objective(weight, peer, unseen_h),
                ))
        for name, pairs in ratios.items():
            on_fitted, on_unseen = [p[0] for p in pairs], [p[1] for p in pairs]
            print(f"| W{bits} {group_text} | {name} | {statistics.geometric_mean(on_fitted):.3f} | {max(on_fitted):.3f} | "
                  f"{statistics.geometric_mean(on_unseen):.3f} | {max(on_unseen):.3f} |", flush=True)


if __name__ == "__main__":
    main()
