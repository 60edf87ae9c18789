"""Layer-solver benchmark: objective and time of every COMQ setting against RTN and GPTQ.

    python benchmarks/bench_solver.py            # full table (about 10 minutes on 2 cores)
    python benchmarks/bench_solver.py --quick    # ViT-B fc1 shape and the real fc1 layers only
    python benchmarks/bench_solver.py --layers real   # only real activations (shipped ViT, MiniLM)
    python benchmarks/bench_solver.py --layers dinov2 smollm2 minilm synthetic --peers strong --threads 1

``--peers strong`` compares against GPTQ at its strongest: act-order with each of
llm-compressor's weight observers (``minmax``, ``memoryless_mse``, ``imatrix_mse``)
and two dampings (its default 0.01 and 0.001), and reports the default against the
best of those per layer ("GPTQ-best"), beside RTN and the reference-code setting.
The real layers of ``dinov2``/``smollm2`` need the converted checkpoints
(benchmarks/models/); layer problems are cached under ``--cache``.

For each layer and bit width it prints the layer objective ``||X(W - Wq)^T||^2``
as a ratio to round-to-nearest on the same asymmetric per-channel min-max grid
(lower is better), the ratio to GPTQ with act-order, and the wall time as a ratio to
one ``W @ H`` GEMM of the same shape measured in the same run.  GPTQ is
llm-compressor's ``quantize_weight`` on the same Hessian and grid.  A timing section
then measures one sweep and the default's full solve on the ViT-B fc1 shape against
the GEMM and against GPTQ, with repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gptq_baseline import GPTQ_PACKAGE, OBSERVERS, gptq_dequantized, observer_grid  # noqa: E402
from benchmarks.layers import (  # noqa: E402
    VIT_SHAPES,
    LayerProblem,
    demo_vit_layers,
    dinov2_layers,
    minilm_layers,
    smollm2_layers,
    synthetic_layer,
)
from hf_comq.kernels import gemm  # noqa: E402
from hf_comq.solver import REFERENCE_CODE, ROUND_TO_NEAREST, comq_quantize, layer_objective  # noqa: E402
from hf_comq.solver import default_damp  # noqa: E402
from hf_comq.solver.comq import MIN_SHRINK, SHRINK_CANDIDATES  # noqa: E402
from hf_comq.solver.grid import minmax_grid, search_shrink  # noqa: E402

FAITHFUL = REFERENCE_CODE
COMQ_SETTINGS: dict[str, dict] = {
    "COMQ reference code (fp start, greedy, 1 sweep)": FAITHFUL,
    "COMQ fp start, greedy, 3 sweeps": dict(FAITHFUL, iterations=3),
    "COMQ fp start, act_order, 1 sweep": dict(FAITHFUL, order="act_order"),
    "COMQ fp start, act_order, 3 sweeps": dict(FAITHFUL, order="act_order", iterations=3),
    "COMQ rtn start, act_order, 3 sweeps": dict(FAITHFUL, init="rtn", order="act_order", iterations=3),
    "COMQ error-feedback start, act_order, 3 sweeps": dict(FAITHFUL, init="error_feedback", order="act_order", iterations=3),
    "COMQ error-feedback start, greedy, 3 sweeps": dict(FAITHFUL, init="error_feedback", iterations=3),
    "  + scale refit": dict(init="error_feedback", order="act_order", iterations=3, scale_refit=True, scale_search=False),
    "  + scale search = hf_comq default": dict(),
    "  default with 8 sweeps": dict(iterations=8),
}


STRONG_COMQ_SETTINGS: dict[str, dict] = {
    "COMQ reference code (fp start, greedy, 1 sweep)": FAITHFUL,
    "hf_comq default, diag(H) clipping search (clip_weights='diagonal')": dict(clip_weights="diagonal"),
    "hf_comq default with start_grids=1": dict(start_grids=1),
    "hf_comq default without block re-solve (block_resolve=False)": dict(block_resolve=False),
    "hf_comq default without pair moves (pair_moves=0)": dict(pair_moves=0),
    "hf_comq default with the scale refit (scale_refit=True)": dict(scale_refit=True),
    "hf_comq default": dict(),
}
GPTQ_DAMPS = (0.01, 0.001)


def evaluate_strong(
    problem: LayerProblem, bits: int, group_size: int | None, skip: tuple[str, ...] = ()
) -> list[tuple[str, float, float]]:
    """RTN, GPTQ act-order with every observer and damping, and the COMQ settings
    (except those named in ``skip``)."""
    w, h = problem.weight, problem.hessian
    rows = []
    rtn, secs = timed(lambda: comq_quantize(w, h, bits=bits, group_size=group_size, **ROUND_TO_NEAREST))
    rows.append(("RTN (min-max grid)", layer_objective(w, rtn.dequantize(), h), secs))
    for observer in OBSERVERS:
        scale, zero = observer_grid(w, h, 1, bits, group_size, observer)  # imatrix normalises by the mean
        for damp in GPTQ_DAMPS:
            deq, secs = timed(lambda: gptq_dequantized(w, h, scale, zero, bits, True, damp=damp))
            rows.append((f"GPTQ act-order, {observer}, damp {damp}", layer_objective(w, deq, h), secs))
    for name, settings in STRONG_COMQ_SETTINGS.items():
        if name in skip:
            continue
        result, secs = timed(lambda: comq_quantize(w, h, bits=bits, group_size=group_size, **settings))
        rows.append((name, layer_objective(w, result.dequantize(), h), secs))
    return rows


def print_strong_table(problem: LayerProblem, bits: int, group_size: int | None, rows, gemm: float) -> dict[str, float]:
    """One layer's table; returns each COMQ setting's objective / GPTQ-best."""
    rtn = rows[0][1]
    best_name, best = min(((n, o) for n, o, _ in rows if n.startswith("GPTQ")), key=lambda item: item[1])
    print(f"\n### {problem.name}, W{bits}, group {group_size or 'channel'}  (one W@H GEMM = {gemm * 1e3:.1f} ms)")
    print(f"GPTQ-best: {best_name}")
    print("| setting | objective / RTN | objective / GPTQ-best | time / GEMM |")
    print("|---|---|---|---|")
    for name, obj, secs in rows:
        print(f"| {name} | {obj / rtn:.3f} | {obj / best:.3f} | {secs / gemm:.1f} |")
    return {name: obj / best for name, obj, _ in rows if name in STRONG_COMQ_SETTINGS}


LAYER_CACHE = Path("/work/cache/layers")
"""Where :func:`load_problems` keeps the captured real layer problems (every solver benchmark reads them there)."""


def add_trial_arguments(parser: argparse.ArgumentParser, group_size: int | None = None) -> None:
    """The layer choice every one-off solver trial takes (``magr_trial.py``, ``regrid_trial.py``)."""
    parser.add_argument("--kinds", nargs="+", default=["dinov2", "smollm2", "minilm"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=group_size)
    parser.add_argument("--only", default="", help="only layers whose name contains this")
    parser.add_argument("--cache", type=Path, default=LAYER_CACHE)


def trial_problems(args: argparse.Namespace) -> list[LayerProblem]:
    """The layers :func:`add_trial_arguments` chose, on one thread (as the solver tables run)."""
    torch.set_num_threads(1)
    return [p for p in load_problems(args.kinds, args.cache) if args.only in p.name]


def load_problems(kinds: list[str], cache: Path) -> list[LayerProblem]:
    """Layer problems of the requested kinds; real ones are captured once and cached."""
    makers = {
        "dinov2": dinov2_layers,
        "smollm2": smollm2_layers,
        "smollm2_held_out": lambda: smollm2_layers(chunks=40, held_out=True),  # the perplexity benchmark's text
        "minilm": minilm_layers,
        "vit": demo_vit_layers,
    }
    problems = []
    for kind in kinds:
        if kind == "synthetic":
            problems += [synthetic_layer(f"synthetic {name}", *shape) for name, shape in VIT_SHAPES.items()]
            continue
        path = cache / f"{kind}.pt"
        if path.is_file():
            problems += [LayerProblem(**item) for item in torch.load(path)]
            continue
        made = makers[kind]()
        cache.mkdir(parents=True, exist_ok=True)
        torch.save([vars(p) for p in made], path)
        problems += made
    return problems


def gemm_seconds(problem: LayerProblem, repeats: int = 7) -> float:
    w, h = problem.weight.float(), problem.hessian.float()
    return min(timed(lambda: w @ h)[1] for _ in range(repeats))


def timed(fn: Callable):
    """``fn()``'s result and its wall seconds (one call: the callers take medians or minima)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def evaluate(problem: LayerProblem, bits: int, include_gptq: bool) -> list[tuple[str, float, float]]:
    """(setting, objective, seconds) for every setting on one layer."""
    w, h = problem.weight, problem.hessian
    grid = minmax_grid(w, bits, w.shape[1])
    rows = []
    rtn, secs = timed(lambda: comq_quantize(w, h, bits=bits, **ROUND_TO_NEAREST))
    rows.append(("RTN (same grid)", layer_objective(w, rtn.dequantize(), h), secs))
    if include_gptq:
        for act_order in (False, True):
            deq, secs = timed(lambda: gptq_dequantized(w, h, grid.scale, grid.zero_point, bits, act_order))
            rows.append((f"GPTQ{' act-order' if act_order else ''} ({GPTQ_PACKAGE})", layer_objective(w, deq, h), secs))
        # hf_comq's default damps its start less at 4+ bits; show what that does for GPTQ itself.
        low_damp = default_damp(bits)
        if low_damp != 0.01:
            deq, secs = timed(lambda: gptq_dequantized(w, h, grid.scale, grid.zero_point, bits, True, damp=low_damp))
            rows.append((f"GPTQ act-order, damp {low_damp}", layer_objective(w, deq, h), secs))
        h_diag = torch.diagonal(h).float().clamp_min(0)
        shrink = search_shrink(w.float(), h_diag, bits, w.shape[1], False, SHRINK_CANDIDATES, MIN_SHRINK)
        searched = minmax_grid(w.float(), bits, w.shape[1], False, shrink)
        deq, secs = timed(lambda: gptq_dequantized(w, h, searched.scale, searched.zero_point, bits, True))
        rows.append(("GPTQ act-order on hf_comq's searched grid", layer_objective(w, deq, h), secs))
    for name, settings in COMQ_SETTINGS.items():
        result, secs = timed(lambda: comq_quantize(w, h, bits=bits, **settings))
        rows.append((name, layer_objective(w, result.dequantize(), h), secs))
    return rows


def print_table(problem: LayerProblem, bits: int, rows, gemm: float) -> None:
    rtn = rows[0][1]
    gptq_ao = next((obj for name, obj, _ in rows if name.startswith("GPTQ act-order (")), None)
    print(f"\n### {problem.name}, W{bits}  (one W@H GEMM = {gemm * 1e3:.1f} ms)")
    print("| setting | objective / RTN | objective / GPTQ act-order | time / GEMM |")
    print("|---|---|---|---|")
    for name, obj, secs in rows:
        vs_gptq = f"{obj / gptq_ao:.3f}" if gptq_ao else "-"
        print(f"| {name} | {obj / rtn:.3f} | {vs_gptq} | {secs / gemm:.1f} |")


CLIPPING_OBSERVERS = ("imatrix_mse", "memoryless_mse")
"""The observers behind GPTQ-best: they search the clipping, as the default's own
search does, so their time belongs to GPTQ's side of the comparison."""


def _gptq_with_observer(w: torch.Tensor, h: torch.Tensor, group_size: int | None, observer: str) -> torch.Tensor:
    """GPTQ act-order as the strongest peer runs it: the observer's grid, then the pass."""
    scale, zero = observer_grid(w, h, 1, 4, group_size, observer)  # imatrix normalises by the mean
    return gptq_dequantized(w, h, scale, zero, 4, True)


TORCH_PRODUCTS = "torch.backends.mkldnn.enabled = False"


@contextlib.contextmanager
def torch_products():
    """The solver's dense products through ``torch.mm`` (MKL on CPU) instead of oneDNN, for a
    side-by-side row: what the solve costs on the product torch itself picks.  torch's own
    switch for oneDNN, which :mod:`hf_comq.kernels.gemm` follows."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def timing_section(include_gptq: bool, repeats: int, group_size: int | None = None) -> None:
    """One sweep and the default's full solve on the ViT-B fc1 shape, with repeats.

    Each repeat times the GEMM, the sweep, the solve and GPTQ back to back, and the
    ratios are taken per repeat before the median: on a shared machine the load
    drifts between repeats, and a pair timed seconds apart sees the same load.
    """
    problem = synthetic_layer("ViT-B fc1 3072x768", 3072, 768)
    w, h = problem.weight, problem.hessian.float()
    grid = minmax_grid(w, 4, group_size or 768)
    # One sweep is timed as the difference of two solves from the same start, one with a
    # single plain sweep and one with none (its own per-repeat ratio, like the others).
    start_only = dict(bits=4, group_size=group_size, iterations=0, scale_refit=False, block_resolve=False)
    one_sweep = dict(start_only, iterations=1, tol=0.0)
    comq_quantize(w, h, bits=4, group_size=group_size)  # warm-up: first calls pay one-off allocation costs
    times: dict[str, list[float]] = {
        "gemm": [], "onednn_gemm": [], "sweep": [], "default": [], "torch_products": [], "no_block": [], "gptq": []
    }  # fmt: skip
    times.update({observer: [] for observer in CLIPPING_OBSERVERS})
    for _ in range(repeats):
        times["gemm"].append(timed(lambda: w @ h)[1])
        start_seconds = timed(lambda: comq_quantize(w, h, **start_only))[1]
        times["sweep"].append(timed(lambda: comq_quantize(w, h, **one_sweep))[1] - start_seconds)
        times["default"].append(timed(lambda: comq_quantize(w, h, bits=4, group_size=group_size))[1])
        times["onednn_gemm"].append(timed(lambda: gemm.matmul(w, h))[1])
        with torch_products():
            times["torch_products"].append(timed(lambda: comq_quantize(w, h, bits=4, group_size=group_size))[1])
        times["no_block"].append(timed(lambda: comq_quantize(w, h, bits=4, group_size=group_size, block_resolve=False))[1])
        if include_gptq:
            times["gptq"].append(timed(lambda: gptq_dequantized(w, h, grid.scale, grid.zero_point, 4, True))[1])
            for observer in CLIPPING_OBSERVERS:
                times[observer].append(timed(lambda o=observer: _gptq_with_observer(w, h, group_size, o))[1])

    def ratio(name: str, base: str) -> str:
        per_repeat = sorted(a / b for a, b in zip(times[name], times[base]))
        return f"{statistics.median(per_repeat):.2f} (range {per_repeat[0]:.2f}-{per_repeat[-1]:.2f})"

    print(f"\n### Timing, ViT-B fc1 3072x768, W4, group {group_size or 'channel'}, {repeats} paired repeats (torch threads: {torch.get_num_threads()})")
    print("Seconds are medians; ratios are medians of per-repeat ratios, with their range.")
    print("| measurement | seconds | ratio |")
    print("|---|---|---|")
    print(f"| one W@H GEMM | {statistics.median(times['gemm']):.4f} | 1.0 |")
    print(f"| one W@H GEMM through the solver's products (hf_comq.kernels.gemm) | {statistics.median(times['onednn_gemm']):.4f} "
          f"| {ratio('onednn_gemm', 'gemm')} x GEMM |")
    print(f"| one act_order sweep (solve with one sweep minus solve with none) | {statistics.median(times['sweep']):.4f} | {ratio('sweep', 'gemm')} x GEMM |")
    print(f"| default full solve | {statistics.median(times['default']):.4f} | {ratio('default', 'gemm')} x GEMM |")
    print(f"| default full solve, every product through torch's own (`{TORCH_PRODUCTS}`) "
          f"| {statistics.median(times['torch_products']):.4f} | {ratio('torch_products', 'gemm')} x GEMM |")
    print(f"| default without block re-solve | {statistics.median(times['no_block']):.4f} | {ratio('no_block', 'gemm')} x GEMM |")
    if include_gptq:
        print(f"| GPTQ act-order quantize_weight | {statistics.median(times['gptq']):.4f} | {ratio('gptq', 'gemm')} x GEMM |")
        print(f"| default full solve / GPTQ | | {ratio('default', 'gptq')} |")
        print(f"| default full solve with torch's own products / GPTQ | | {ratio('torch_products', 'gptq')} |")
        print(f"| default without block re-solve / GPTQ | | {ratio('no_block', 'gptq')} |")
        for observer in CLIPPING_OBSERVERS:
            print(f"| GPTQ act-order with the `{observer}` observer (observer + quantize_weight) "
                  f"| {statistics.median(times[observer]):.4f} | {ratio(observer, 'gemm')} x GEMM |")
            print(f"| default full solve / GPTQ with `{observer}` | | {ratio('default', observer)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the ViT-B fc1 shape and MiniLM fc1")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--no-gptq", action="store_true", help=f"skip the GPTQ rows (needs {GPTQ_PACKAGE})")
    parser.add_argument(
        "--layers", nargs="+", default=["all"],
        choices=["all", "synthetic", "real", "dinov2", "smollm2", "minilm", "vit"],
        help="synthetic ViT-shaped layers, real activations (real = shipped ViT + MiniLM; dinov2, smollm2), or all",
    )
    parser.add_argument("--peers", choices=["classic", "strong"], default="classic",
                        help="strong: GPTQ act-order with every llm-compressor observer and two dampings")
    parser.add_argument("--group-size", type=int, default=None, help="group size for --peers strong (default per channel)")
    parser.add_argument("--only", default=None, help="only layers whose name contains this text")
    parser.add_argument("--cache", type=Path, default=LAYER_CACHE, help="cache of captured layer problems")
    parser.add_argument("--repeats", type=int, default=5, help="repeats in the timing section")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--timing-only", action="store_true", help="only the timing section")
    parser.add_argument("--skip", nargs="+", default=[], choices=list(STRONG_COMQ_SETTINGS), metavar="SETTING",
                        help="--peers strong: leave out these COMQ settings (e.g. the slow reference-code row)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    include_gptq = not args.no_gptq
    # First calls pay one-off set-up (llm-compressor's; loading hf_comq's compiled solver
    # loops, which would land on whichever COMQ row runs first); keep it out of the table.
    warm = synthetic_layer("warm-up", 8, 16, tokens=64)
    comq_quantize(warm.weight, warm.hessian, bits=4, pair_moves=4)
    if include_gptq:
        g = minmax_grid(warm.weight, 4, 16)
        gptq_dequantized(warm.weight, warm.hessian, g.scale, g.zero_point, 4, True)

    if args.timing_only:
        timing_section(include_gptq, args.repeats, args.group_size)
        return
    if args.peers == "strong":
        kinds = ["synthetic", "vit", "minilm", "dinov2", "smollm2"] if "all" in args.layers else args.layers
        problems = [p for p in load_problems(kinds, args.cache) if not args.only or args.only in p.name]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; objective ratios are lower-is-better")
        ratios = []
        for problem in problems:
            gemm = gemm_seconds(problem)
            for bits in args.bits:
                rows = evaluate_strong(problem, bits, args.group_size, tuple(args.skip))
                ratios.append((print_strong_table(problem, bits, args.group_size, rows, gemm), problem.name, bits))
                sys.stdout.flush()
        worst = max((by_setting["hf_comq default"], name, bits) for by_setting, name, bits in ratios)
        print(f"\nworst hf_comq default / GPTQ-best over {len(ratios)} layer-bit pairs: {worst[0]:.3f} ({worst[1]}, W{worst[2]})")
        for setting in [name for name in STRONG_COMQ_SETTINGS if name not in args.skip]:
            values = [by_setting[setting] for by_setting, _, _ in ratios]
            print(f"{setting} / GPTQ-best: median {statistics.median(values):.3f}, worst {max(values):.3f}")
        return
    layers = args.layers[0]
    problems = []
    if layers in ("all", "synthetic"):
        shapes = {k: v for k, v in VIT_SHAPES.items() if not args.quick or "ViT-B fc1" in k}
        problems += [synthetic_layer(f"synthetic {name}", *shape) for name, shape in shapes.items()]
    if layers in ("all", "real"):
        real = demo_vit_layers() + minilm_layers()
        problems += [p for p in real if not args.quick or "fc1" in p.name]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; objective ratios are lower-is-better")
    for problem in problems:
        gemm = gemm_seconds(problem)
        for bits in args.bits:
            print_table(problem, bits, evaluate(problem, bits, include_gptq), gemm)
            sys.stdout.flush()
    timing_section(include_gptq, args.repeats)


if __name__ == "__main__":
    main()
