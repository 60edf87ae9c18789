"""Serve a compressed-tensors checkpoint with vLLM and compare its greedy tokens and logprobs with transformers.

For each prompt the chosen engine generates greedily, ignoring EOS so every row has
the same length.  Then plain transformers (``from_pretrained``, which dequantizes
the checkpoint) runs **one teacher-forced pass** over prompt + the engine's tokens.
That one pass gives:

* **first divergence**: the first position where transformers' argmax differs from
  the engine's token.  Before that point the two greedy runs share a prefix, so this
  is exactly where free-running greedy generation would fork;
* **argmax agreement**: the fraction of positions where the two agree, given the
  same prefix;
* **decisive agreement**: the same fraction restricted to positions where
  transformers' two best logprobs are more than ``--margin`` apart.  Near-ties flip
  under any change of arithmetic, so they say nothing about the weights;
* **|Δ logprob|**: the engine's logprob of its own token minus transformers' logprob
  of the same token, same prefix (max and median).

Engines:
* ``vllm`` (default): ``vllm.LLM(model=dir, dtype=..., enforce_eager=True)``, greedy
  ``SamplingParams(temperature=0, logprobs=k)``;
* ``hf-fp32``: transformers itself in float32.  It measures the noise floor of the
  transformers side at ``--dtype``, and it runs where vLLM is not installed.

Tolerances catch **wrong weights**, not rounding:
* vLLM computes in bf16/fp16 with its own kernels.  Scales are cast to the model dtype,
  weights are dequantized inside the kernel, and split-K changes the summation order.
* transformers dequantizes in float32, casts the weight to ``--dtype``, and uses its
  own matmul.  Greedy tokens therefore flip at near-ties, and logprobs move by some
  hundredths of a nat.
* A layout error (nibble order, zero point, 3-bit packing) moves logprobs by nats and
  puts agreement near chance.
* The defaults (margin 0.5 nat, decisive agreement >= 0.9, median |Δ| <= 0.25,
  max |Δ| <= 3) sit between those two regimes as ``tolerance_probe.py`` measures them;
  see the README.

Exit status: 0 pass, 1 gross mismatch, 2 could not run (e.g. vLLM missing).

Usage:
    python benchmarks/gpu/vllm_vs_transformers.py --model DIR [--dtype bfloat16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

PROMPTS = (
    "The quiet river in the morning",
    "A small model of the city",
    "Careful music and bright signal",
    "The north garden window at evening",
)


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]  # the engine's logprob of each of its own tokens


def describe_checkpoint(model_dir: Path) -> str:
    """One line naming the quantization scheme, so a log says what was compared."""
    config = json.loads((model_dir / "config.json").read_text())
    qc = config.get("quantization_config")
    if not qc:
        return "full precision (no quantization_config)"
    parts = [f"quant_method={qc.get('quant_method')}", f"format={qc.get('format')}"]
    for name, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        parts.append(
            f"{name}: targets={group.get('targets')} bits={w.get('num_bits')} strategy={w.get('strategy')} "
            f"group_size={w.get('group_size')} symmetric={w.get('symmetric')}"
        )
    parts.append(f"ignore={qc.get('ignore')}")
    return "; ".join(parts)


def prompt_ids(model_dir: Path, vocab_size: int, count: int, seed: int) -> list[list[int]]:
    """Tokenize the fixed prompts once; both engines get the same ids (no tokenizer drift)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return [tokenizer(text).input_ids for text in PROMPTS[:count]]
    except Exception as error:  # no tokenizer in the folder: random ids are as good a probe
        print(f"no tokenizer ({type(error).__name__}); using random prompt ids")
        generator = torch.Generator().manual_seed(seed)
        return [torch.randint(3, vocab_size, (12,), generator=generator).tolist() for _ in range(count)]


def generate_vllm(model_dir: Path, prompts: list[list[int]], dtype: str, max_tokens: int, top_k: int) -> list[Generation]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(model_dir),
        dtype=dtype,
        enforce_eager=True,
        skip_tokenizer_init=True,
        gpu_memory_utilization=0.35,
        max_model_len=max(len(p) for p in prompts) + max_tokens + 8,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=top_k, ignore_eos=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    result = []
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [position[token].logprob for position, token in zip(completion.logprobs, tokens)]
        result.append(Generation(prompt, tokens, logprobs))
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return result


@torch.inference_mode()
def generate_hf_fp32(model_dir: Path, prompts: list[list[int]], max_tokens: int, device: str) -> list[Generation]:
    """Greedy decoding by hand (no ``generate``): EOS never stops it, like vLLM's ``ignore_eos``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=device).eval()
    result = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        tokens, logprobs = [], []
        for _ in range(max_tokens):
            logp = model(ids).logits[0, -1].float().log_softmax(-1)
            token = int(logp.argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
            ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
        result.append(Generation(prompt, tokens, logprobs))
    del model
    gc.collect()
    return result


@torch.inference_mode()
def compare(model_dir: Path, generations: list[Generation], dtype: str, device: str, margin: float) -> list[dict]:
    """One teacher-forced transformers pass per prompt; the metrics of the module docstring."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), device_map=device).eval()
    rows = []
    for gen in generations:
        ids = torch.tensor([gen.prompt + gen.tokens], device=device)
        logp = model(ids).logits[0].float().log_softmax(-1)
        # position p predicts token p + 1: keep the predictions of the generated tokens
        logp = logp[len(gen.prompt) - 1 : len(gen.prompt) - 1 + len(gen.tokens)]
        engine_tokens = torch.tensor(gen.tokens, device=device)
        top2 = logp.topk(2, dim=-1)
        agree = top2.indices[:, 0] == engine_tokens
        decisive = (top2.values[:, 0] - top2.values[:, 1]) > margin
        hf_lp = logp.gather(1, engine_tokens[:, None])[:, 0]
        delta = (torch.tensor(gen.logprobs, device=device) - hf_lp).abs().tolist()
        mismatch = (~agree).nonzero()
        rows.append(
            {
                "tokens": len(gen.tokens),
                "first_divergence": int(mismatch[0, 0]) if len(mismatch) else None,
                "agree": float(agree.float().mean()),
                "decisive_agree": int((agree & decisive).sum()),
                "decisive": int(decisive.sum()),
                "max_dlp": max(delta),
                "median_dlp": statistics.median(delta),
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'prompt':>6} {'tokens':>6} {'greedy match':>12} {'1st diverg.':>11} {'TF agree':>8} "
          f"{'decisive':>9} {'max|Δlp|':>9} {'med|Δlp|':>9}")
    for i, row in enumerate(rows):
        first = row["first_divergence"]
        match = (first if first is not None else row["tokens"]) / row["tokens"]
        print(f"{i:>6} {row['tokens']:>6} {match:>12.2f} {str(first if first is not None else '-'):>11} "
              f"{row['agree']:>8.2f} {row['decisive_agree']:>4}/{row['decisive']:<4} {row['max_dlp']:>9.4f} "
              f"{row['median_dlp']:>9.4f}")


def verdict(rows: list[dict], min_decisive: float, max_median: float, max_abs: float) -> list[str]:
    """The failed criteria, each as one line; empty when the engines agree."""
    decisive = sum(r["decisive"] for r in rows)
    decisive_rate = sum(r["decisive_agree"] for r in rows) / decisive if decisive else 1.0
    median = statistics.median(r["median_dlp"] for r in rows)
    worst = max(r["max_dlp"] for r in rows)
    problems = []
    if decisive_rate < min_decisive:
        problems.append(f"decisive argmax agreement {decisive_rate:.3f} < {min_decisive}")
    if median > max_median:
        problems.append(f"median |Δ logprob| {median:.4f} > {max_median}")
    if worst > max_abs:
        problems.append(f"max |Δ logprob| {worst:.4f} > {max_abs}")
    print(f"overall: decisive agreement {decisive_rate:.3f} over {decisive} positions, "
          f"median of per-prompt median |Δ| {median:.4f}, max |Δ| {worst:.4f}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder (config.json + safetensors)")
    parser.add_argument("--engine", choices=("vllm", "hf-fp32"), default="vllm")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--logprobs", type=int, default=5)
    parser.add_argument("--margin", type=float, default=0.5, help="nats: top-2 gap that makes a position decisive")
    parser.add_argument("--min-decisive", type=float, default=0.9)
    parser.add_argument("--max-median-dlp", type=float, default=0.25)
    parser.add_argument("--max-dlp", type=float, default=3.0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available() and args.engine == "vllm":
        print("SKIP: vLLM needs a CUDA GPU")
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for package in ("compressed_tensors", "vllm"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    print("versions:", versions)
    if args.engine == "vllm" and versions["vllm"] is None:
        print("SKIP: vllm is not importable")
        return 2
    print("checkpoint:", describe_checkpoint(args.model))
    config = json.loads((args.model / "config.json").read_text())
    method = (config.get("quantization_config") or {}).get("quant_method", "compressed-tensors")
    if method != "compressed-tensors":
        print(f"SKIP: quant_method {method!r}: plain transformers would load random weights")
        return 2
    vocab = config["vocab_size"]
    prompts = prompt_ids(args.model, vocab, args.prompts, seed=0)
    if args.engine == "vllm":
        generations = generate_vllm(args.model, prompts, args.dtype, args.max_tokens, args.logprobs)
    else:
        generations = generate_hf_fp32(args.model, prompts, args.max_tokens, device)
    rows = compare(args.model, generations, args.dtype, device, args.margin)
    print(f"engine={args.engine} vs transformers {args.dtype} (teacher-forced on the engine's tokens)")
    print_table(rows)
    problems = verdict(rows, args.min_decisive, args.max_median_dlp, args.max_dlp)
    if args.json:
        args.json.write_text(json.dumps({"versions": versions, "engine": args.engine, "rows": rows}, indent=1))
    for problem in problems:
        print("FAIL:", problem)
    print("PASS" if not problems else "GROSS MISMATCH")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
