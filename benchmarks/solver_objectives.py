"""The default solve's exact objective on every cached real layer and the timing layer, for comparing two trees.

A solver change meant to save time without moving the result is checked here: run the
script from each tree (``PYTHONPATH`` picks the tree), each writing ``--json``, then
``--compare`` the two files, which prints the largest relative objective difference and
the per-setting time ratios.  Objectives are printed to nine digits (``bench_solver.py``'s
ratios to RTN keep three).

    PYTHONPATH=/path/to/before python benchmarks/solver_objectives.py --json before.json
    PYTHONPATH=. python benchmarks/solver_objectives.py --json after.json
    python benchmarks/solver_objectives.py --compare before.json after.json

Started side by side, one process per core, the time ratios are paired; the objectives
do not depend on how the runs were placed.  No GPTQ here: the main venv does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from layers import synthetic_layer  # noqa: E402


def measure(cache: Path, bits: list[int], group_sizes: list[int | None], repeats: int) -> list[dict]:
    """One row per (grid, layer, bits): the default's final objective and its fastest solve."""
    from bench_solver import load_problems

    from hf_comq import comq_quantize

    problems = load_problems(["dinov2", "smollm2", "minilm"], cache)
    problems.append(synthetic_layer("ViT-B fc1 3072x768", 3072, 768))
    rows = []
    for group_size in group_sizes:
        for problem in problems:
            for width in bits:
                seconds = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    result = comq_quantize(problem.weight, problem.hessian, bits=width, group_size=group_size)
                    seconds.append(time.perf_counter() - started)
                row = dict(layer=problem.name, bits=width, group_size=group_size,
                           objective=result.stats["objective"][-1], steps=len(result.stats["objective"]),
                           seconds=min(seconds))  # fmt: skip
                print(f"| {problem.name} | W{width} | {group_size or 'channel'} | {row['objective']:.9g} | "
                      f"{row['steps'] - 1} | {row['seconds']:.4f} |", flush=True)  # fmt: skip
                rows.append(row)
    return rows


def compare(before_path: Path, after_path: Path) -> None:
    """Largest relative objective difference and the time ratios, after / before, per grid."""
    before, after = (json.loads(path.read_text()) for path in (before_path, after_path))
    key = lambda row: (row["layer"], row["bits"], row["group_size"])  # noqa: E731
    before_rows = {key(row): row for row in before}
    for group_size in sorted({row["group_size"] or 0 for row in after}):
        pairs = [(before_rows[key(row)], row) for row in after if (row["group_size"] or 0) == group_size]
        apart = max(abs(new["objective"] / old["objective"] - 1.0) for old, new in pairs)
        ratios = [new["seconds"] / old["seconds"] for old, new in pairs]
        print(f"group {group_size or 'channel'}: {len(pairs)} settings, largest relative objective difference "
              f"{apart:.1e}; time after / before median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--group-sizes", nargs="+", default=["channel", "64"], help="'channel' or a group size")
    parser.add_argument("--repeats", type=int, default=2, help="solves per setting; the fastest is kept")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("/work/cache/layers"), help="bench_solver.py's layer cache")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"), help="compare two --json files")
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    torch.set_num_threads(args.threads)
    import hf_comq

    print(f"hf_comq from {Path(hf_comq.__file__).parent}")  # which tree PYTHONPATH picked
    group_sizes = [None if size == "channel" else int(size) for size in args.group_sizes]
    print(f"torch threads: {torch.get_num_threads()}")
    print("| layer | bits | grid | objective | sweeps | seconds |\n|---|---|---|---|---|---|")
    rows = measure(args.cache, args.bits, group_sizes, args.repeats)
    if args.json:
        args.json.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
