"""Packed quantized linear layer (``hf_comq.kernels.packed_linear``) against fp32 ``nn.Linear``.

    python benchmarks/bench_kernels.py                  # threads 1 and 2, side by side
    python benchmarks/bench_kernels.py --threads 1 --repeats 41
    python benchmarks/bench_kernels.py --methods        # each compiled method by token count

ViT-B fc1 shape (3072 x 768, fp32 activations, with bias) at 1 token (one decoding
step of a causal LM: a GEMV), 197 tokens (one ViT-B/16 image) and 8 x 197 tokens.
Each repeat times ``nn.Linear`` and every packed variant back to back, in a shuffled
order, and takes the ratio within the repeat; the table shows the median ratio, so
load from other processes on the machine cancels out as far as it can.  Codes are
random: the kernel's cost does not depend on their values.

Targets (issue 12): at most 0.5x at 1 token and 1.0x at 197 tokens for W4 per-channel
and W4 g128; W3 and W2 within 1.2x of W4 (the W3 / W4 and W2 / W4 columns).  The
"fallback" column is the exact torch path (``HF_COMQ_DISABLE_KERNEL=1``, what a packed
layer cost before the kernel) for W4 per-channel.

``--methods`` times each method of the compiled kernel (``gemv``, ``tiles``, ``blas``) on
W4 per-channel weights against ``nn.Linear`` at token counts from 1 to 1024, beside what
``method='auto'`` picks on this CPU: the crossovers it prints are where the automatic
choice should switch (they differ between CPUs whose BLAS runs AVX2 and AVX-512).

The first line after the path is a check of the machine, not of the kernel: an
elementwise torch op on two threads against one.  On an idle machine that is at most
about 1; far above 1, another process holds a core and every two-thread ratio below
mostly measures how long a thread waits to be scheduled.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_comq.kernels import DISABLE_ENV_VAR, active_path, packed_linear  # noqa: E402
from hf_comq.kernels.build import load_kernel  # noqa: E402
from hf_comq.packing import packed_width  # noqa: E402

IN_FEATURES, OUT_FEATURES = 768, 3072
TOKENS = {"1": (1,), "197": (197,), "8x197": (8, 197)}
VARIANTS = {"W4 channel": (4, None), "W4 g128": (4, 128), "W3 channel": (3, None), "W2 channel": (2, None)}
FALLBACK = "fallback W4 channel"
MIN_SAMPLE_SECONDS = 2e-3  # calls per timed sample are batched up to this, so the timer's resolution does not matter


def pack_random(bits: int, group_size: int | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random codes, scales and zero points in the kernel's layout (packed with plain integer arithmetic)."""
    codes = torch.randint(0, 1 << bits, (OUT_FEATURES, IN_FEATURES), generator=generator, dtype=torch.int64)
    positions = torch.arange(IN_FEATURES) * bits
    stream = torch.zeros(OUT_FEATURES, packed_width(IN_FEATURES, bits) * 32 + 32, dtype=torch.int64)
    for bit in range(bits):  # scatter each bit of each code to its stream position
        stream[:, positions + bit] = (codes >> bit) & 1
    bits_by_word = stream[:, : packed_width(IN_FEATURES, bits) * 32].view(OUT_FEATURES, -1, 32)
    words = (bits_by_word << torch.arange(32)).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    groups = 1 if group_size is None else IN_FEATURES // group_size
    return {
        "weight_packed": words,
        "scale": torch.rand(OUT_FEATURES, groups, generator=generator) * 0.02 + 1e-3,
        "zero": torch.randint(0, 1 << bits, (OUT_FEATURES, groups), generator=generator, dtype=torch.uint8),
    }


def calls_per_sample(fn) -> int:
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, int(MIN_SAMPLE_SECONDS / max(once, 1e-7)))


def timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def with_fallback(fn):
    """``fn`` with the compiled kernel disabled for the duration of the call."""

    def call():
        os.environ[DISABLE_ENV_VAR] = "1"
        try:
            return fn()
        finally:
            del os.environ[DISABLE_ENV_VAR]

    return call


def paired_ratios(functions: dict, baseline: str, repeats: int, order: random.Random) -> dict[str, float]:
    """Median over repeats of time(name) / time(baseline), each ratio from two back-to-back timings."""
    names = [name for name in functions if name != baseline]
    ratios: dict[str, list[float]] = {name: [] for name in names}
    calls = {name: calls_per_sample(fn) for name, fn in functions.items()}
    for fn in functions.values():  # warm-up (the first packed call may build or load the kernel)
        fn()
    for _ in range(repeats):
        order.shuffle(names)
        for name in names:  # a fresh baseline time next to each variant, in random order within the pair
            if order.random() < 0.5:
                base = timed(functions[baseline], calls[baseline])
                value = timed(functions[name], calls[name])
            else:
                value = timed(functions[name], calls[name])
                base = timed(functions[baseline], calls[baseline])
            ratios[name].append(value / base)
    return {name: statistics.median(values) for name, values in ratios.items()}


def measure(threads: int, tokens: tuple[int, ...], repeats: int, seed: int) -> dict[str, float]:
    """Median ratios to nn.Linear for every variant and the fallback, at one thread count."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(IN_FEATURES, OUT_FEATURES)
    x = torch.randn(*tokens, IN_FEATURES, generator=generator)
    functions = {"nn.Linear": lambda: linear(x)}
    for name, (bits, group_size) in VARIANTS.items():
        packed = pack_random(bits, group_size, generator)
        functions[name] = lambda packed=packed, bits=bits: packed_linear(x, bits=bits, bias=linear.bias, **packed)
    functions[FALLBACK] = with_fallback(functions["W4 channel"])
    with torch.inference_mode():
        return paired_ratios(functions, "nn.Linear", repeats, random.Random(seed))


METHOD_TOKENS = (1, 8, 16, 32, 48, 64, 96, 128, 197, 512, 1024)
METHODS = ("gemv", "tiles", "blas")
GEMV_MAX_TIMED_TOKENS = 64  # past this the GEMV is several times slower than BLAS and only costs time here


def measure_methods(threads: int, tokens: int, repeats: int, seed: int) -> dict[str, float]:
    """Median ratio to nn.Linear of each compiled method at one token count (W4 per channel, no bias)."""
    torch.set_num_threads(threads)
    ops = load_kernel()
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False)
    x = torch.randn(tokens, IN_FEATURES, generator=generator)
    packed = pack_random(4, None, generator)
    args = (x, packed["weight_packed"], packed["scale"], packed["zero"], None, 4)
    functions = {"nn.Linear": lambda: linear(x)}
    for method in METHODS:
        if method != "gemv" or tokens <= GEMV_MAX_TIMED_TOKENS:
            functions[method] = lambda method=method: ops.packed_linear(*args, method)
    with torch.inference_mode():
        return paired_ratios(functions, "nn.Linear", repeats, random.Random(seed))


def print_methods(threads_list: list[int], repeats: int, seed: int) -> None:
    ops = load_kernel()
    if ops is None:
        raise SystemExit("--methods needs the compiled kernel, which is not available here (see the path line)")
    print(f"### each compiled method's time / fp32 nn.Linear time, {OUT_FEATURES}x{IN_FEATURES} W4 per channel, "
          f"median of {repeats} paired repeats")
    print("| threads | tokens | " + " | ".join(METHODS) + " | auto picks |")
    print("|---|---|" + "---|" * (len(METHODS) + 1))
    for threads in threads_list:
        for tokens in METHOD_TOKENS:
            ratio = measure_methods(threads, tokens, repeats, seed)
            cells = " | ".join(f"{ratio[m]:.2f}" if m in ratio else "" for m in METHODS)
            print(f"| {threads} | {tokens} | {cells} | {ops.auto_method(tokens)} |", flush=True)


def machine_check(repeats: int, seed: int) -> float:
    """Median time of an elementwise add on 2 threads over the same on 1 thread."""
    a, b = torch.randn(OUT_FEATURES, IN_FEATURES), torch.randn(OUT_FEATURES, IN_FEATURES)

    def on(threads: int):
        def add():
            torch.set_num_threads(threads)
            return torch.add(a, b)

        return add

    return paired_ratios({"1": on(1), "2": on(2)}, "1", repeats, random.Random(seed))["2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", nargs="+", choices=list(TOKENS), default=list(TOKENS))
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", action="store_true", help="time each compiled method by token count instead")
    args = parser.parse_args()
    print(f"path: {active_path()}")
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"machine check: 3072x768 torch.add, 2 threads / 1 thread = {machine_check(args.repeats, args.seed):.2f}")
    if args.methods:
        print_methods(args.threads, args.repeats, args.seed)
        return
    print(
        f"### packed_linear time / fp32 nn.Linear time, {OUT_FEATURES}x{IN_FEATURES}, fp32 activations, "
        f"median of {args.repeats} paired repeats"
    )
    columns = [*VARIANTS, "W3 / W4", "W2 / W4", FALLBACK]
    print("| threads | tokens | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for tokens_name in args.tokens:
        for threads in args.threads:
            ratio = measure(threads, TOKENS[tokens_name], args.repeats, args.seed)
            ratio["W3 / W4"] = ratio["W3 channel"] / ratio["W4 channel"]
            ratio["W2 / W4"] = ratio["W2 channel"] / ratio["W4 channel"]
            cells = " | ".join(f"{ratio[name]:.2f}" for name in columns)
            print(f"| {threads} | {tokens_name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
