"""On a GPU: the compressed-tensors checkpoint through plain transformers, then through hf_comq's packed layers.

Two modes, run as two processes, because the plain load must not see hf_comq:

* ``--mode plain``: ``sys.modules["hf_comq"] = None``, then
  ``AutoModelForCausalLM.from_pretrained(dir)`` (transformers + compressed-tensors
  dequantize).  Saves float32 logits of a fixed batch of token ids to ``--logits``.
* ``--mode packed``: ``hf_comq.load_quantized(dir)`` keeps the layers packed.
  It checks, in order:
  * the logits equal the plain ones (float32, TF32 off).  Both sides compute the
    dequantized weight ``(q - z) * s`` in float32, so only the matmul's summation
    order may differ: relative error <= 1e-4 over the whole logit tensor;
  * every packed layer against ``F.linear(x, layer.dequantize(float32), bias)``.
    float32 input: relative error <= 1e-5.  bf16 input: <= 2e-2, since bf16 holds
    8 bits of mantissa and the reference is float32;
  * time, ratio to a dense bf16 ``F.linear``: CUDA events, median of 50, at M = 1
    and M = 197.  Printed, not judged.

Assumed interfaces (issue 11/12 work in progress): ``hf_comq.load_quantized(path,
dtype=, device_map=)`` and ``hf_comq.COMQLinear`` with ``dequantize(dtype)``.

Usage:
    python benchmarks/gpu/packed_cuda_check.py --mode plain  --model DIR --logits OUT.pt
    python benchmarks/gpu/packed_cuda_check.py --mode packed --model DIR --logits OUT.pt
Exit status: 0 pass, 1 fail, 2 skipped (checkpoint not in compressed-tensors format).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from int4pack_check import time_ms  # scripts run from this folder: CUDA-event timing, median


def probe_ids(vocab_size: int, device: str) -> torch.Tensor:
    """The same token ids in both processes: a seeded CPU draw."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab_size, (2, 48), generator=generator).to(device)


@torch.inference_mode()
def run_plain(model_dir: Path, logits_path: Path, device: str) -> int:
    sys.modules["hf_comq"] = None  # any import of hf_comq now fails: this is the user without it
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=device).eval()
    logits = model(probe_ids(model.config.vocab_size, device)).logits.float().cpu()
    torch.save(logits, logits_path)
    print(f"plain transformers: {type(model).__name__}, logits {tuple(logits.shape)}, mean |logit| {logits.abs().mean():.4f}")
    return 0


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


@torch.inference_mode()
def check_layers(model: torch.nn.Module, layer_class: type, device: str) -> int:
    """Each packed layer against its dequantized float32 reference; returns the failure count."""
    failures = 0
    generator = torch.Generator(device=device).manual_seed(1)
    print(f"{'layer':<40} {'shape':>11} {'bits':>4} {'fp32 err':>9} {'bf16 err':>9} {'t1 ratio':>8} {'t197 ratio':>10}")
    for name, layer in model.named_modules():
        if not isinstance(layer, layer_class):
            continue
        reference_weight = layer.dequantize(torch.float32)
        bias = None if layer.bias is None else layer.bias.float()
        ratios = []
        errors = []
        for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            x = torch.randn(197, layer.in_features, generator=generator, device=device).to(dtype)
            err = rel_err(layer(x), F.linear(x.float(), reference_weight, bias))
            errors.append(err)
            failures += err > bound
        if device == "cuda":
            dense = reference_weight.to(torch.bfloat16)
            for m in (1, 197):
                x = torch.randn(m, layer.in_features, device=device, dtype=torch.bfloat16)
                ratios.append(time_ms(lambda: layer(x)) / time_ms(lambda: F.linear(x, dense)))
        shape = f"{layer.out_features}x{layer.in_features}"
        timing = " ".join(f"{r:>8.2f}" for r in ratios) if ratios else "       -          -"
        print(f"{name:<40} {shape:>11} {layer.bits:>4} {errors[0]:>9.1e} {errors[1]:>9.1e} {timing}")
    return failures


@torch.inference_mode()
def run_packed(model_dir: Path, logits_path: Path, device: str) -> int:
    import hf_comq

    model = hf_comq.load_quantized(model_dir, dtype=torch.float32, device_map=device).eval()
    packed = [m for m in model.modules() if isinstance(m, hf_comq.COMQLinear)]
    print(f"hf_comq.load_quantized: {type(model).__name__}, {len(packed)} packed layers")
    failures = 0 if packed else 1
    logits = model(probe_ids(model.config.vocab_size, device)).logits.float().cpu()
    plain = torch.load(logits_path)
    err = rel_err(logits, plain)
    ok = err <= 1e-4
    failures += not ok
    print(f"logits vs plain transformers: rel err {err:.2e}, max abs {float((logits - plain).abs().max()):.2e} "
          f"-> {'ok' if ok else 'MISMATCH'}")
    failures += check_layers(model, hf_comq.COMQLinear, device)
    print("PASS" if failures == 0 else f"FAIL ({failures})")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("plain", "packed"), required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--logits", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    method = json.loads((args.model / "config.json").read_text()).get("quantization_config", {}).get("quant_method")
    if method != "compressed-tensors":
        print(f"SKIP: quant_method is {method!r}, not 'compressed-tensors' (hf_comq still writes its old format)")
        return 2
    run = run_plain if args.mode == "plain" else run_packed
    return run(args.model, args.logits, args.device)


if __name__ == "__main__":
    sys.exit(main())
