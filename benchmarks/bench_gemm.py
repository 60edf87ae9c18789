"""oneDNN's float32 products (hf_comq.kernels.gemm's path) against torch's own (MKL), shape by shape.

The oneDNN column takes that path on any CPU (the library itself takes it only where the CPU
has AVX-512, ``gemm.onednn_preferred``); the header says which one the solver uses here.

The shapes are those of a ViT-B fc1 solve (3072 x 768) and of a Gram-matrix sum: the
reference and residual products, a sweep's and the error-feedback start's pushes of a
block's moves into the later columns (added in place), and one calibration batch's Gram
sum, whole and one block of its upper triangle (whose right operand is a slice of the batch);
then one linear layer of a calibration pass.  Each
pair is timed back to back, ``--repeats`` times; the ratio is the median of the per-repeat
ratios (below 1: oneDNN's product is faster).

    python benchmarks/bench_gemm.py --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from collections.abc import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_comq.kernels import gemm  # noqa: E402


def cases() -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """(name, torch's product, the solver's product) on fresh random operands."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(768, 768, generator=gen)
    w_t = torch.randn(768, 3072, generator=gen)
    residual = torch.randn(768, 3072, generator=gen)
    moves = torch.randn(128, 3072, generator=gen)
    state = torch.randn(640, 9216, generator=gen)
    coupling = torch.randn(128, 768, generator=gen)
    start_moves = torch.randn(128, 9216, generator=gen)
    tokens = torch.randn(2048, 768, generator=gen)
    gram = torch.zeros(768, 768)
    block = torch.zeros(256, 512)
    batch = torch.randn(256, 576, generator=gen)
    up_proj = torch.randn(1536, 576, generator=gen)
    return [
        ("H @ W^T, 768 x 768 @ 768 x 3072 (reference, residual)", lambda: h @ w_t, lambda: gemm.matmul(h, w_t)),
        (
            "sweep push, R -= H[:, B] @ moves, 768 x 128 @ 128 x 3072",
            lambda: residual.addmm_(h[128:256].T, moves, alpha=-1.0),
            lambda: gemm.add_matmul_(residual, h[128:256].T, moves, alpha=-1.0),
        ),
        (
            "start push, 3 grids, state -= C^T @ moves, 640 x 128 @ 128 x 9216",
            lambda: state.addmm_(coupling[:, 128:].T, start_moves, alpha=-1.0),
            lambda: gemm.add_matmul_(state, coupling[:, 128:].T, start_moves, alpha=-1.0),
        ),
        (
            "Gram sum, G += X^T X, 768 x 2048 @ 2048 x 768",
            lambda: gram.addmm_(tokens.T, tokens),
            lambda: gemm.add_matmul_(gram, tokens.T, tokens),
        ),
        (
            "Gram sum, one block of its upper triangle, G[256:512, 256:] += X[:, 256:512]^T X[:, 256:] (a sliced right operand)",
            lambda: block.addmm_(tokens[:, 256:512].T, tokens[:, 256:]),
            lambda: gemm.add_matmul_(block, tokens[:, 256:512].T, tokens[:, 256:]),
        ),
        (
            "calibration pass's linear layer, 256 tokens, 576 -> 1536 (SmolLM2's up projection)",
            lambda: torch.nn.functional.linear(batch, up_proj),
            lambda: gemm.linear(batch, up_proj),
        ),
    ]


def seconds(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"oneDNN product available: {gemm.onednn_available()}, the solver's products through oneDNN: "
        f"{gemm.products_through_onednn()}"
    )
    gemm.onednn_preferred = lambda: True  # time oneDNN's path here whatever the CPU
    print("| product | threads | torch (ms) | oneDNN through hf_comq.kernels.gemm (ms) | ratio (range) |")
    print("|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, plain, ours in cases():
            plain(), ours()  # warm-up: oneDNN builds its kernel for a shape on first use
            pairs = [(seconds(plain), seconds(ours)) for _ in range(args.repeats)]
            ratios = sorted(b / a for a, b in pairs)
            print(
                f"| {name} | {threads} | {statistics.median(a for a, _ in pairs) * 1e3:.2f} "
                f"| {statistics.median(b for _, b in pairs) * 1e3:.2f} "
                f"| {statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}) |"
            )


if __name__ == "__main__":
    main()
