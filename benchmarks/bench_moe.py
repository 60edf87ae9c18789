"""Mixture-of-experts quantization on a trained model: COMQ against round to nearest and GPTQ.

No pretrained MoE can be had offline, so this trains one: a small Qwen3-MoE (4 layers,
8 experts per layer, 2 routed per token, SmolLM2's tokenizer) on the calibration pool of
``real_data``'s English text, a few minutes on a CPU.  It is weakly trained, but its
experts are specialised by training, not random.  Then each method quantizes the
attention and every expert's layers through hf_comq's own calibration pipeline (the
experts split per expert, each on the tokens routed to it), and held-out fidelity to the
full-precision model (per-token KL divergence; the weakly trained model's perplexity
barely moves at 4 or 3 bits) and perplexity are reported:

* RTN: round to nearest on the min-max grid (``ROUND_TO_NEAREST_MODEL``);
* GPTQ act-order on llm-compressor's min-max grid, and on its ``memoryless_mse`` grid
  (its MSE clipping observer), each as the layer solver of the same pipeline;
* COMQ's default, and COMQ on the plain min-max grid (``scale_search=False``: no clipping
  search, the grid GPTQ min-max uses); ``ridge="auto"``, and the default without its
  pair moves (``pair_moves=0``; ``pair_moves=32``, the default's value, is also a row,
  from the runs where it was opt-in).

    $B benchmarks/bench_moe.py                        # W4/W3, per channel and group 64, calibration seeds 0-2
    $B benchmarks/bench_moe.py --settings 4:channel --seeds 0
    $B benchmarks/bench_moe.py --experts 32 --only experts --calibration 8 --routing routed all

``--experts N`` trains (and caches) a model with N experts per layer (still 2 per token),
``--only experts`` keeps attention in full precision so that the KL measures the experts'
quantization alone (``--only attention`` the reverse), and ``--routing`` runs each method
with the experts calibrated on the
tokens routed to them (``routed``, the default) and/or on every token
(``all``: ``COMQConfig(calibrate_all_experts=True)``, llm-compressor's default).

Needs llm-compressor for the GPTQ rows and the converted SmolLM2 folder for its
tokenizer (the bench venv and ``benchmarks/models/convert_smollm2_gguf.py``, see
benchmarks/README.md).  The trained model is kept under ``--work`` and reused.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gptq_baseline import PEER_CALIBRATION, gptq_dequantized, observer_grid  # noqa: E402
from benchmarks.real_data import calibration_chunks, held_out_chunks, text_split  # noqa: E402
from hf_comq import COMQConfig, QuantizedWeight  # noqa: E402
from hf_comq.calibration import quantize_model  # noqa: E402
from hf_comq.solver import ROUND_TO_NEAREST_MODEL, comq_quantize, layer_objective  # noqa: E402

SHAPE = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, tie_word_embeddings=True,
    max_position_embeddings=512,
)  # fmt: skip
LENGTH = 128
KEPT = {"experts": ["q_proj", "k_proj", "v_proj", "o_proj"], "attention": ["experts"]}
"""What ``--only`` keeps in full precision (``modules_to_not_convert``): the attention layers, or the experts."""


def gptq_solver(observer: str):
    """GPTQ act-order on llm-compressor's ``observer`` grid, as a layer solver of ``quantize_model``."""

    def solve(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int | None = None, **_) -> QuantizedWeight:
        w = weight.float()
        scale, zero = observer_grid(w, hessian, 0, bits, group_size, observer)
        dequant = gptq_dequantized(w, hessian, scale, zero, bits, act_order=True)
        columns = group_size or w.shape[1]
        codes = torch.round(dequant / scale.repeat_interleave(columns, 1)) + zero.repeat_interleave(columns, 1)
        baseline = max(layer_objective(w, torch.zeros_like(w), hessian), 1e-30)
        return QuantizedWeight(
            codes=codes.clamp(0, (1 << bits) - 1).to(torch.uint8), scale=scale, zero_point=zero, bits=bits,
            group_size=group_size, dtype=weight.dtype, stats={"relative_error": layer_objective(w, dequant, hessian) / baseline},
        )  # fmt: skip

    return solve


METHODS = {
    "RTN": (comq_quantize, ROUND_TO_NEAREST_MODEL),
    "GPTQ minmax": (gptq_solver("minmax"), PEER_CALIBRATION),
    "GPTQ mse": (gptq_solver("memoryless_mse"), PEER_CALIBRATION),
    "COMQ default": (comq_quantize, {}),
    "COMQ min-max": (comq_quantize, {"scale_search": False}),
    "COMQ ridge auto": (comq_quantize, {"ridge": "auto"}),
    "COMQ pair moves": (comq_quantize, {"pair_moves": 32}),
    "COMQ without pair moves": (comq_quantize, {"pair_moves": 0}),
}


def model_folder(work: Path, steps: int, experts: int) -> Path:
    """Where the trained model is cached (the 8-expert model keeps its first name)."""
    return work / (f"qwen3-moe-trained-{steps}" if experts == SHAPE["num_experts"] else f"qwen3-moe-{experts}-trained-{steps}")


def trained_model(work: Path, tokenizer, steps: int, experts: int = SHAPE["num_experts"]):
    """The small Qwen3-MoE with ``experts`` experts per layer trained on the calibration pool (cached under ``work``)."""
    import transformers as T

    folder = model_folder(work, steps, experts)
    if (folder / "config.json").exists():
        return T.Qwen3MoeForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(0)
    shape = dict(SHAPE, num_experts=experts)
    config = T.Qwen3MoeConfig(**shape, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0, pad_token_id=None)
    model = T.Qwen3MoeForCausalLM(config)
    pool, _ = text_split()
    ids = tokenizer("\n\n".join(pool), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    chunks = ids[: ids.numel() // LENGTH * LENGTH].reshape(-1, LENGTH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        batch = chunks[torch.randint(0, chunks.shape[0], (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"train step {step}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval().save_pretrained(folder)
    return T.Qwen3MoeForCausalLM.from_pretrained(folder).eval()


@torch.no_grad()
def perplexity(model, chunks: torch.Tensor) -> float:
    losses = [model(input_ids=chunks[i : i + 8], labels=chunks[i : i + 8]).loss.item() for i in range(0, len(chunks), 8)]
    return math.exp(statistics.mean(losses))


@torch.no_grad()
def kl_to_fp(fp, model, chunks: torch.Tensor) -> float:
    """Mean per-token ``KL(FP || quantized)`` of the next-token distributions: fidelity to the
    full-precision model, which moves where a weakly trained model's perplexity barely does."""
    total, count = 0.0, 0
    for i in range(0, len(chunks), 8):
        reference = torch.log_softmax(fp(input_ids=chunks[i : i + 8]).logits.float(), -1)
        quantized = torch.log_softmax(model(input_ids=chunks[i : i + 8]).logits.float(), -1)
        total += float((reference.exp() * (reference - quantized)).sum())
        count += reference.shape[0] * reference.shape[1]
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=Path("/work/cache/models/smollm2-135m"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_moe"))
    parser.add_argument("--steps", type=int, default=200, help="training steps of 16 x 128 tokens (more memorise the text)")
    parser.add_argument("--experts", type=int, default=SHAPE["num_experts"], help="experts per layer (2 routed per token)")
    parser.add_argument("--only", choices=sorted(KEPT), help="quantize only the experts, or only attention")
    parser.add_argument("--routing", nargs="+", default=["routed"], choices=["routed", "all"],
                        help="experts calibrated on their routed tokens, and/or on every token (calibrate_all_experts)")
    parser.add_argument("--settings", nargs="+", default=["4:channel", "3:channel", "4:64", "3:64"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--calibration", type=int, default=64, help="calibration chunks of 128 tokens")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="append one JSON line per row here")
    args = parser.parse_args()
    import transformers as T

    torch.set_num_threads(args.threads)
    tokenizer = T.AutoTokenizer.from_pretrained(args.tokenizer)
    fp = trained_model(args.work, tokenizer, args.steps, args.experts)
    folder = model_folder(args.work, args.steps, args.experts)
    held_out = held_out_chunks(tokenizer, 64, LENGTH)
    fp_ppl = perplexity(fp, held_out)
    experts = sum(p.numel() for n, p in fp.named_parameters() if ".experts." in n)
    print(f"FP held-out perplexity {fp_ppl:.3f}; experts hold {experts / sum(p.numel() for p in fp.parameters()):.0%} "
          f"of the parameters", flush=True)  # fmt: skip
    kept = KEPT[args.only] if args.only else None
    columns = [(method, routing) for routing in args.routing for method in args.methods]
    rows = []
    for setting in args.settings:
        bits, grouping = setting.split(":")
        group_size = None if grouping == "channel" else int(grouping)
        for method, routing in columns:
            solver, settings = METHODS[method]
            values, kls, seconds, unrouted = [], [], [], []
            for seed in args.seeds:
                model = T.Qwen3MoeForCausalLM.from_pretrained(folder).eval()
                data = calibration_chunks(tokenizer, args.calibration, LENGTH, seed)
                config = COMQConfig(bits=int(bits), group_size=group_size, dataset=data, num_samples=len(data),
                                    batch_size=8, seed=seed, modules_to_not_convert=kept,
                                    calibrate_all_experts=routing == "all", **settings)  # fmt: skip
                started = time.perf_counter()
                summary = quantize_model(model, config, solver=solver)
                seconds.append(time.perf_counter() - started)
                values.append(perplexity(model, held_out))
                kls.append(kl_to_fp(fp, model, held_out))
                unrouted.append(len(summary["expert_layers_without_tokens"]))
            row = {
                "bits": int(bits), "group": grouping, "method": method, "routing": routing, "ppl_mean": statistics.mean(values),
                "ppl": values, "fp_ppl": fp_ppl, "kl_mean": statistics.mean(kls), "kl": kls,
                "seconds": statistics.mean(seconds), "layers": summary["layers_quantized"],
                "experts_without_tokens": unrouted, "seeds": args.seeds, "calibration": args.calibration,
                "steps": args.steps, "experts": args.experts, "only": args.only,
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
    quantized = {"experts": "experts only (attention in full precision)", "attention": "attention only (experts in "
                 "full precision)", None: "attention and experts"}[args.only]  # fmt: skip
    print(f"\nSmall Qwen3-MoE, {args.experts} experts per layer, trained {args.steps} steps; {quantized} quantized on "
          f"{args.calibration} x {LENGTH} calibration tokens; held-out KL(FP || quantized) x1e-3 per token, then "
          f"perplexity (FP {fp_ppl:.3f}); mean (range) over calibration seeds {args.seeds}")  # fmt: skip
    names = [method if len(args.routing) == 1 else f"{method} ({routing})" for method, routing in columns]
    print("bits | group | " + " | ".join(f"{n} KL" for n in names) + " | " + " | ".join(f"{n} ppl" for n in names))
    for setting in args.settings:
        bits, grouping = setting.split(":")
        cells = [
            next(r for r in rows if (r["method"], r["routing"]) == column and f"{r['bits']}:{r['group']}" == setting)
            for column in columns
        ]
        kl = [f"{1e3 * c['kl_mean']:.3f} ({1e3 * min(c['kl']):.3f}-{1e3 * max(c['kl']):.3f})" for c in cells]
        ppl = [f"{c['ppl_mean']:.3f}" for c in cells]
        print(f"{bits} | {grouping} | " + " | ".join(kl) + " | " + " | ".join(ppl))

if __name__ == "__main__":
    main()
