"""Where the default solve's time goes: the solver's phases, timed by wrapping its functions.

One synthetic layer (ViT-B fc1, 3072 x 768, as ``bench_solver.py --timing-only``), solved
``--repeats`` times after a warm-up; each line is the mean time per solve spent inside one
function.  Phases nest (``_sweep_rows`` holds the sweep, the pair pass and the block
re-solve; ``_start_layer`` the grids and the error-feedback start), so the lines do not add
up to the total.

    python benchmarks/solver_phases.py --threads 1 [--group-size 64] [--torch-products]
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_comq.solver.comq as comq_module  # noqa: E402
from hf_comq.kernels import gemm  # noqa: E402
from benchmarks.layers import synthetic_layer  # noqa: E402

PHASES = (
    "_start_layer", "_start_grids", "search_shrink", "plan_error_feedback", "error_feedback_start", "_sweep_rows",
    "coordinate_sweep", "pair_move_pass", "block_resolve_pass", "refit_scales",
)  # fmt: skip
METHODS = ("start", "begin")  # of the solver's per-slice problem: the start, and the reference and residual


def timed_phases(seconds: dict[str, float]) -> None:
    """Wrap the phases in ``comq_module`` (and the problem's methods) to add their seconds to ``seconds``."""

    def clocked(name: str, inner):
        @functools.wraps(inner)
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - started

        return run

    for name in PHASES:
        setattr(comq_module, name, clocked(name, getattr(comq_module, name)))
    problem = comq_module._Problem
    for name in METHODS:
        setattr(problem, name, clocked(f"_Problem.{name}", getattr(problem, name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--torch-products", action="store_true",
        help="the solver's dense products through torch.mm (MKL on CPU) instead of oneDNN (hf_comq.kernels.gemm)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.torch_products:
        torch.backends.mkldnn.enabled = False  # torch's own switch, which hf_comq.kernels.gemm follows
    layer = synthetic_layer("ViT-B fc1 3072x768", 3072, 768)
    weight, hessian = layer.weight, layer.hessian.float()
    seconds: dict[str, float] = collections.defaultdict(float)
    timed_phases(seconds)
    comq_module.comq_quantize(weight, hessian, bits=4, group_size=args.group_size)  # warm-up
    seconds.clear()
    started = time.perf_counter()
    for _ in range(args.repeats):
        comq_module.comq_quantize(weight, hessian, bits=4, group_size=args.group_size)
    total = (time.perf_counter() - started) / args.repeats
    grid = f"group {args.group_size}" if args.group_size else "per channel"
    products = "torch.mm" if args.torch_products else ("oneDNN" if gemm.onednn_available() else "torch.mm (no oneDNN)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), W4 {grid}, {args.repeats} solves, products: {products}")
    print(f"| phase | ms per solve |\n|---|---|\n| whole solve | {total * 1000:.1f} |")
    for name, value in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"| {name} | {value / args.repeats * 1000:.1f} |")


if __name__ == "__main__":
    main()
