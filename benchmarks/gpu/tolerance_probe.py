"""Where ``vllm_vs_transformers.py``'s tolerances come from: its metrics under rounding versus under wrong weights.

It takes a full-precision causal LM folder (e.g. ``tiny_checkpoint.py``'s ``base``).
The reference is transformers' own float32 greedy run.  It is scored, with the
comparator's metrics, against:

* the same weights in bf16 (the **rounding** regime);
* the weights damaged the way a checkpoint bug would damage them, in float32:
  * ``nibble-order``: input columns reversed within each block of 8, i.e. the codes
    of one int32 word read in the wrong order;
  * ``zero-point``: every weight shifted by one step of a 4-bit min-max grid, i.e.
    a zero point off by one;
  * ``noise-5%``: Gaussian noise of 5 % of the weight std, milder than any layout
    error.

Runs on the CPU in under a minute for the tiny model.

Usage:
    python benchmarks/gpu/tolerance_probe.py --model DIR [--margin 0.5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_vs_transformers as comparator  # noqa: E402  (sibling script, not a package)

DAMAGES = ("nibble-order", "zero-point", "noise-5%")


def damage(weight: torch.Tensor, kind: str, generator: torch.Generator) -> None:
    """Apply one simulated checkpoint bug to an (out, in) weight, in place."""
    if kind == "nibble-order":
        order = torch.arange(weight.shape[1]).view(-1, 8).flip(-1).flatten()
        weight.copy_(weight[:, order])
    elif kind == "zero-point":
        weight.sub_((weight.amax(1, keepdim=True) - weight.amin(1, keepdim=True)) / 15)
    else:
        weight.add_(0.05 * weight.std() * torch.randn(weight.shape, generator=generator))


def damaged_copy(model_dir: Path, kind: str, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            damage(module.weight.data, kind, generator)
    model.save_pretrained(out)
    return out


def summary(rows: list[dict]) -> str:
    decisive = sum(r["decisive"] for r in rows)
    rate = sum(r["decisive_agree"] for r in rows) / decisive if decisive else float("nan")
    return (
        f"decisive agree {rate:.3f} ({decisive} pos)  TF agree {statistics.mean(r['agree'] for r in rows):.3f}  "
        f"median|Δlp| {statistics.median(r['median_dlp'] for r in rows):.3f}  max|Δlp| {max(r['max_dlp'] for r in rows):.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--margin", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    prompts = comparator.prompt_ids(args.model, vocab, len(comparator.PROMPTS), seed=0)
    reference = comparator.generate_hf_fp32(args.model, prompts, args.max_tokens, device)
    print(f"reference: transformers float32 greedy, {args.max_tokens} tokens x {len(prompts)} prompts, margin {args.margin}")
    print(f"{'rounding (bf16)':>22}: {summary(comparator.compare(args.model, reference, 'bfloat16', device, args.margin))}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in DAMAGES:
            folder = damaged_copy(args.model, kind, Path(tmp) / kind)
            rows = comparator.compare(folder, reference, "float32", device, args.margin)
            print(f"{kind + ' (fp32)':>22}: {summary(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
