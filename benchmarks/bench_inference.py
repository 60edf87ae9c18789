"""Inference cost of a quantized layer: ``COMQLinear`` forward against ``nn.Linear``.

    python benchmarks/bench_inference.py             # ViT-B fc1 shape, 1 and 8 images
    python benchmarks/bench_inference.py --threads 2

``COMQLinear`` keeps its weight packed (that is the memory saving) and unpacks and
dequantizes it on every forward with plain torch ops, then runs the same GEMM as
``nn.Linear``.  The extra cost is per forward, not per token, so it shrinks relative
to the GEMM as the batch grows.  Both are timed back to back in each repeat and the
table shows the median of the per-repeat ratios, plus the unpack+dequantize step on
its own.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_comq.nn import COMQLinear  # noqa: E402
from hf_comq.solver import ROUND_TO_NEAREST, comq_quantize  # noqa: E402

TOKENS_PER_IMAGE = 197  # ViT-B/16 at 224 px


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(linear: nn.Linear, bits: int, group_size: int | None, images: int, repeats: int) -> tuple[float, float]:
    """(forward ratio, dequantize ratio) to ``nn.Linear``'s forward, medians over repeats."""
    # The codes' values do not change the cost of unpacking them; RTN keeps setup fast.
    qweight = comq_quantize(linear.weight, torch.eye(linear.in_features), bits=bits, group_size=group_size, **ROUND_TO_NEAREST)
    layer = COMQLinear.from_quantized(linear, qweight)
    x = torch.randn(images, TOKENS_PER_IMAGE, linear.in_features)
    forward, dequantize = [], []
    with torch.inference_mode():
        layer(x), linear(x)  # warm-up
        for _ in range(repeats):
            base = _seconds(lambda: linear(x))
            forward.append(_seconds(lambda: layer(x)) / base)
            dequantize.append(_seconds(layer.dequantize) / base)
    return statistics.median(forward), statistics.median(dequantize)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    linear = nn.Linear(768, 3072)
    print(f"### COMQLinear vs nn.Linear, ViT-B fc1 3072x768, fp32, median of {args.repeats} (torch threads: {args.threads})")
    print("| bits | group | images (x197 tokens) | COMQLinear forward / nn.Linear | of which unpack+dequantize |")
    print("|---|---|---|---|---|")
    for images in (1, 8):
        for group_size in (None, 64):
            for bits in (4, 3, 2):
                forward, dequantize = measure(linear, bits, group_size, images, args.repeats)
                print(f"| {bits} | {group_size or 'channel'} | {images} | {forward:.2f} | {dequantize:.2f} |", flush=True)


if __name__ == "__main__":
    main()
