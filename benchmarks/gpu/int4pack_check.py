"""Check on a CUDA GPU the recipe that routes an hf_comq 4-bit layer to ``torch.ops.aten._weight_int4pack_mm``.

The recipe comes from reading ``aten/src/ATen/native/cuda/int4mm.cu`` (FACTS.md, Q6):

* the codes are unsigned 4-bit ``q`` in ``nn.Linear`` layout ``(N, K)``.  Two share a
  byte, even k in the high nibble, and ``_convert_weight_to_int4pack(bytes, inner_k_tiles)``
  tiles them;
* ``qScaleAndZeros`` is bf16 ``(K / g, N, 2)`` holding ``[scale, scale * (8 - z)]``.  The
  kernel computes ``(q - 8) * scale + zero = (q - z) * scale`` in bf16;
* per-channel scales use the largest of 256/128/64/32 that divides K, with the
  scale and zero repeated: the same weight, exactly;
* activations must be bf16; the output is bf16.

For each case this prints the relative error against the float32 reference
``x @ ((q - z) * s).T``, next to the error of the natural bf16 baseline
``F.linear(x_bf16, W.bfloat16())``.  A case passes when the int4 error is at most
3x the baseline's plus 1e-3.  That is rounding-sized; a wrong layout gives errors
of order 1.

The same cases are then run with the nibbles swapped: they **must fail**, else the
check cannot tell a right layout from a wrong one.  Last come timings, ratio to the
bf16 dense ``F.linear``: CUDA events, median of 50, at M = 1 and M = 197.

Usage:  python benchmarks/gpu/int4pack_check.py          (exit 0 pass, 1 fail, 2 no CUDA)
"""

from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F

KERNEL_GROUPS = (256, 128, 64, 32)


def kernel_group(in_features: int, group_size: int | None) -> int:
    """The group the kernel runs with; per-channel maps to the largest supported divisor of K."""
    if group_size is not None:
        return group_size
    return next(g for g in KERNEL_GROUPS if in_features % g == 0)


def inner_k_tiles(in_features: int) -> int:
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


def to_int4pack(codes: torch.Tensor, swap_nibbles: bool = False) -> torch.Tensor:
    """``(N, K)`` uint8 codes in [0, 15] -> the kernel's tiled int32 layout."""
    hi, lo = (codes[:, 1::2], codes[:, 0::2]) if swap_nibbles else (codes[:, 0::2], codes[:, 1::2])
    packed = ((hi << 4) | lo).to(torch.uint8).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles(codes.shape[1]))


def scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, in_features: int, group: int) -> torch.Tensor:
    """Per-group ``(N, G)`` float32 scale and integer zero -> bf16 ``(K / group, N, 2)``."""
    repeat = (in_features // group) // scale.shape[1]
    scale = scale.repeat_interleave(repeat, dim=1)
    zero = zero.float().repeat_interleave(repeat, dim=1)
    return torch.stack([scale, scale * (8.0 - zero)], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    groups = scale.shape[1]
    w = (codes.float().view(n, groups, -1) - zero.float().unsqueeze(-1)) * scale.unsqueeze(-1)
    return w.view(n, k)


def random_layer(n: int, k: int, group_size: int | None, symmetric: bool, generator: torch.Generator):
    groups = 1 if group_size is None else k // group_size
    codes = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8, device="cuda")
    scale = (torch.rand(n, groups, generator=generator, device="cuda") + 0.5) * 0.01
    if symmetric:
        zero = torch.full((n, groups), 8, dtype=torch.uint8, device="cuda")
    else:
        zero = torch.randint(0, 16, (n, groups), generator=generator, dtype=torch.uint8, device="cuda")
    return codes, scale, zero


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def check_case(n, k, group_size, symmetric, m, generator, swap=False) -> tuple[float, float]:
    codes, scale, zero = random_layer(n, k, group_size, symmetric, generator)
    x = torch.randn(m, k, generator=generator, device="cuda").to(torch.bfloat16)
    w = dequantize(codes, scale, zero)
    ref = x.float() @ w.t()
    baseline = F.linear(x, w.to(torch.bfloat16))
    group = kernel_group(k, group_size)
    y = torch.ops.aten._weight_int4pack_mm(x, to_int4pack(codes, swap), group, scales_and_zeros(scale, zero, k, group))
    return rel_err(y, ref), rel_err(baseline, ref)


def time_ms(fn, repeats: int = 50) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
    generator = torch.Generator(device="cuda").manual_seed(0)
    n, k = 3072, 768
    failures = 0
    print(f"{'N x K':>10} {'group':>6} {'grid':>5} {'M':>4} {'int4pack err':>12} {'bf16 dense err':>14} {'ok':>3}")
    for group_size in (None, 32, 64, 128, 256):
        for symmetric in (False, True):
            for m in (1, 197):
                err, base = check_case(n, k, group_size, symmetric, m, generator)
                ok = err <= 3 * base + 1e-3
                failures += not ok
                print(f"{f'{n}x{k}':>10} {str(group_size or 'chan'):>6} {'sym' if symmetric else 'asym':>5} {m:>4} "
                      f"{err:>12.2e} {base:>14.2e} {'yes' if ok else 'NO':>3}")
    swapped, _ = check_case(n, k, 128, False, 197, generator, swap=True)
    discriminates = swapped > 0.1
    failures += not discriminates
    print(f"swapped nibbles (must be large): rel err {swapped:.2e} -> {'detected' if discriminates else 'NOT DETECTED'}")
    try:
        x16 = torch.randn(4, k, device="cuda", dtype=torch.float16)
        codes, scale, zero = random_layer(n, k, 128, False, generator)
        torch.ops.aten._weight_int4pack_mm(x16, to_int4pack(codes), 128, scales_and_zeros(scale, zero, k, 128))
        print("float16 activations: accepted")
    except RuntimeError as error:
        print(f"float16 activations: rejected ({str(error).splitlines()[0][:80]})")
    codes, scale, zero = random_layer(n, k, 128, False, generator)
    w4, sz = to_int4pack(codes), scales_and_zeros(scale, zero, k, 128)
    dense = dequantize(codes, scale, zero).to(torch.bfloat16)
    for m in (1, 197):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        t4 = time_ms(lambda: torch.ops.aten._weight_int4pack_mm(x, w4, 128, sz))
        td = time_ms(lambda: F.linear(x, dense))
        print(f"time M={m:>3}: int4pack {t4 * 1e3:.1f} us, bf16 dense {td * 1e3:.1f} us, ratio {t4 / td:.2f}")
    print("PASS" if failures == 0 else f"FAIL ({failures} cases)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
