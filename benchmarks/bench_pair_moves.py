"""What the compiled pair-move pass saves: the same solve with the pass in the kernel and in torch.

For every real layer problem (the ones ``bench_solver.py`` captures and caches), three
solves in one process, one after another: the default without pair moves
(``pair_moves=0``), with ``pair_moves=N`` as the solver runs it (the compiled pass, on
CPU in float32), and the same with the pass forced onto its torch rounds.  Printed per
layer: each objective with pair moves as a ratio to the one without (the two paths
should agree to float rounding), the three solve times, and the time inside the pass on
each path.  (Outputs made before pair moves were the default call the solve without
them "default".)

    python benchmarks/bench_pair_moves.py                       # W4 per channel, one thread
    python benchmarks/bench_pair_moves.py --group-size 64 --threads 2

No GPTQ here, so the main venv does (``bench_solver.py --peers strong`` has the ratios
to GPTQ).  Times are medians over ``--repeats`` rounds of the three solves.

``--builds`` times the compiled pass alone in each of its builds (plain, AVX2 and, on CPUs
that have it, AVX-512), side by side in one process: the tables the default solve hands
its first pass are kept and every build runs from copies of them, in turn, each repeat.

    python benchmarks/bench_pair_moves.py --builds --layers synthetic --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_comq.solver.comq as comq_module  # noqa: E402
import hf_comq.solver.pair_moves as pair_moves_module  # noqa: E402
from benchmarks.bench_solver import LAYER_CACHE, load_problems  # noqa: E402
from hf_comq.kernels import active_path  # noqa: E402
from hf_comq.kernels.build import load_kernel  # noqa: E402
from hf_comq.solver import comq_quantize  # noqa: E402


class PassClock:
    """Wraps the solver's pair-move pass and adds up the seconds spent inside it."""

    def __init__(self, inner: Callable):
        self.inner, self.seconds = inner, 0.0

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


def solve(problem, bits: int, group_size: int | None, candidates: int, torch_pass: bool) -> tuple[float, float, float]:
    """(objective, solve seconds, seconds inside the pass) of one solve."""
    clock = PassClock(pair_moves_module.pair_move_pass)
    if torch_pass:
        path = mock.patch.object(pair_moves_module, "compiled_solver_ops", lambda *_: None)
    else:
        path = contextlib.nullcontext()
    with mock.patch.object(comq_module, "pair_move_pass", clock), path:
        started = time.perf_counter()
        result = comq_quantize(
            problem.weight, problem.hessian, bits=bits, group_size=group_size, pair_moves=candidates
        )
        seconds = time.perf_counter() - started
    return result.stats["objective"][-1], seconds, clock.seconds


def first_pass_tables(problem, bits: int, group_size: int | None, candidates: int) -> tuple:
    """The arguments of the first pair-move pass of the default solve of ``problem``, copied."""
    kept = []

    def keep(*args):
        kept.append([arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in args])
        return pair_moves_module.pair_move_pass(*args)

    with mock.patch.object(comq_module, "pair_move_pass", keep):
        comq_quantize(problem.weight, problem.hessian, bits=bits, group_size=group_size, pair_moves=candidates)
    return tuple(kept[0])


def time_builds(problems, bits: int, group_size: int | None, candidates: int, repeats: int) -> None:
    """Seconds of one pass per build (median over the repeats), the builds taking turns; stops if
    their tables after the pass differ (the builds make the same moves, bit for bit)."""
    ops = load_kernel()
    if ops is None:
        sys.exit(f"--builds needs the compiled kernel: {active_path()}")
    builds = ["scalar", "avx2", "avx512"]
    print("\n| layer | moves | " + " | ".join(f"{build} s" for build in builds) + " | avx2 / scalar | avx512 / avx2 |")
    print("|---|---|" + "---|" * (len(builds) + 2))
    for problem in problems:
        residual, dequant, codes, hessian, grid, max_code, count = first_pass_tables(problem, bits, group_size, candidates)
        seconds: dict[str, list[float]] = {build: [] for build in builds}
        moves, ends = {}, {}
        for _ in range(repeats):
            for build in list(seconds):
                tables = [residual.clone(), dequant.clone(), codes.clone()]
                capped = torch.zeros(residual.shape[1], dtype=torch.bool)
                started = time.perf_counter()
                try:
                    moves[build] = ops.pair_moves(
                        *tables, hessian.contiguous(), grid.scale, grid.group_index("cpu"), capped, max_code, count,
                        pair_moves_module.MAX_ROUNDS, pair_moves_module.MIN_RELATIVE_GAIN, build,
                    )  # fmt: skip
                except RuntimeError as error:  # a build this CPU cannot run
                    if "CPU or build lacks" not in str(error):
                        raise
                    del seconds[build]
                    continue
                seconds[build].append(time.perf_counter() - started)
                ends[build] = [*tables, capped]
        first = ends["scalar"]
        if len(set(moves.values())) != 1 or not all(
            all(torch.equal(a, b) for a, b in zip(first, end)) for end in ends.values()
        ):
            sys.exit(f"{problem.name}: the builds made different moves: {moves} moves")
        median = {build: statistics.median(values) for build, values in seconds.items()}
        cells = [f"{median[build]:.4f}" if build in median else "-" for build in builds]
        wide = f"{median['avx512'] / median['avx2']:.2f}" if "avx512" in median else "-"
        print(f"| {problem.name} | {moves['scalar']} | " + " | ".join(cells)
              + f" | {median['avx2'] / median['scalar']:.2f} | {wide} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", default=["dinov2", "smollm2", "minilm"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--candidates", type=int, default=32, help="pair_moves=N")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=LAYER_CACHE)
    parser.add_argument("--builds", action="store_true", help="time the compiled pass alone, in each of its builds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problems = load_problems(args.layers, args.cache)
    setting = f"W{args.bits} " + (f"group {args.group_size}" if args.group_size else "per channel")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {setting}, pair_moves={args.candidates}")
    print(f"kernel: {active_path()}")
    if args.builds:
        time_builds(problems, args.bits, args.group_size, args.candidates, args.repeats)
        return
    solve(problems[0], args.bits, args.group_size, args.candidates, torch_pass=False)  # loads the compiled ops
    print("\n| layer | objective / without: kernel, torch pass | solve s: without, kernel, torch pass "
          "| pass s: kernel, torch | solve / without: kernel, torch pass |")
    print("|---|---|---|---|---|")
    ratios = {"kernel": [], "torch": []}
    pass_totals = {"kernel": 0.0, "torch": 0.0}
    for problem in problems:
        runs = {"without": [], "kernel": [], "torch": []}
        for _ in range(args.repeats):
            runs["without"].append(solve(problem, args.bits, args.group_size, 0, torch_pass=False))
            runs["kernel"].append(solve(problem, args.bits, args.group_size, args.candidates, torch_pass=False))
            runs["torch"].append(solve(problem, args.bits, args.group_size, args.candidates, torch_pass=True))
        objective = {key: value[0][0] for key, value in runs.items()}
        seconds = {key: statistics.median(run[1] for run in value) for key, value in runs.items()}
        in_pass = {key: statistics.median(run[2] for run in value) for key, value in runs.items()}
        for key in ratios:
            ratios[key].append(seconds[key] / seconds["without"])
            pass_totals[key] += in_pass[key]
        print(f"| {problem.name} | {objective['kernel'] / objective['without']:.5f}, "
              f"{objective['torch'] / objective['without']:.5f} | {seconds['without']:.3f}, {seconds['kernel']:.3f}, "
              f"{seconds['torch']:.3f} | {in_pass['kernel']:.3f}, {in_pass['torch']:.3f} | "
              f"{ratios['kernel'][-1]:.2f}, {ratios['torch'][-1]:.2f} |", flush=True)
    for key, label in (("kernel", "compiled pass"), ("torch", "torch pass")):
        values = ratios[key]
        print(f"solve with pair moves / without, {label}: median {statistics.median(values):.2f} "
              f"({min(values):.2f}-{max(values):.2f})")
    print(f"seconds in the pass, summed over the layers: compiled {pass_totals['kernel']:.3f}, "
          f"torch {pass_totals['torch']:.3f}")


if __name__ == "__main__":
    main()
