"""Whole-model inference: a W4 COMQ checkpoint loaded with packed layers against the full-precision model.

    python benchmarks/bench_inference.py                    # ViT-B/16 classifier and a SmolLM2-135M-shaped Llama
    python benchmarks/bench_inference.py --threads 1 2 --quick

For each model the script builds a full-precision checkpoint from its config (random
weights: speed and memory do not depend on the values), quantizes it at 4 bits per
channel through the real pipeline (round to nearest, which gives the same packed layout
as COMQ at a fraction of the time), and then, in fresh processes:

* **speed**, FP and quantized interleaved in one process per thread count, median of the
  repeats: images/s at batch 1 and 32 for the ViT, greedy-generation tokens/s at batch 1
  for the causal LM (a 16-token prompt, 64 new tokens, KV cache on);
* **memory**: resident memory added by loading each model and running one forward (RSS
  after minus RSS before, one process per model), and the bytes of the quantized layers'
  tensors against the fp32 bytes of the weights they replace.

The quantized model is loaded with :func:`hf_comq.load_quantized` (layers kept packed); the
packed-layer kernel in use is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {
    "vit-b16": {
        "kind": "image",
        "class": "ViTForImageClassification",
        "config": dict(
            model_type="vit", image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
            num_attention_heads=12, intermediate_size=3072, num_labels=1000,
        ),
        "label": "ViT-B/16 classifier (86 M parameters, 224 px, 197 tokens)",
    },
    "smollm2-135m": {
        "kind": "text",
        "class": "LlamaForCausalLM",
        "config": dict(
            model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
            bos_token_id=0, eos_token_id=0,
        ),
        "label": "SmolLM2-135M-shaped Llama (30 layers, hidden 576, tied embeddings)",
    },
}  # fmt: skip
PROMPT_TOKENS, NEW_TOKENS = 16, 64


def build_checkpoints(workdir: Path, names: list[str]) -> dict[str, dict[str, str]]:
    """FP and W4 checkpoints of each model under ``workdir`` (reused when present)."""
    import torch
    import transformers

    import hf_comq
    from hf_comq.solver import ROUND_TO_NEAREST

    paths = {}
    for name in names:
        spec = MODELS[name]
        fp, w4 = workdir / f"{name}-fp32", workdir / f"{name}-w4"
        cls = getattr(transformers, spec["class"])
        if not (fp / "config.json").is_file():
            config = transformers.AutoConfig.for_model(**spec["config"])
            torch.manual_seed(0)
            cls(config).save_pretrained(fp)
        if not (w4 / "config.json").is_file():
            generator = torch.Generator().manual_seed(1)
            data = (
                torch.randn(4, 3, 224, 224, generator=generator)
                if spec["kind"] == "image"
                else torch.randint(0, spec["config"]["vocab_size"], (4, 64), generator=generator)
            )
            config = hf_comq.COMQConfig(bits=4, dataset=data, num_samples=4, **ROUND_TO_NEAREST)
            cls.from_pretrained(fp, quantization_config=config).save_pretrained(w4)
        paths[name] = {"fp32": str(fp), "w4": str(w4)}
    return paths


# ---------------------------------------------------------------------------------------------- child processes
def _load(path: str, variant: str):
    import transformers

    import hf_comq

    if variant == "w4":
        return hf_comq.load_quantized(path).eval()
    config = transformers.AutoConfig.from_pretrained(path)
    return getattr(transformers, config.architectures[0]).from_pretrained(path).eval()


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child_memory(path: str, variant: str, kind: str) -> dict:
    """Resident memory added by loading one model and running it once, and the bytes of its quantized layers.

    The forward pass matters: safetensors maps the checkpoint file, so a loaded model's
    weights only become resident once something reads them.
    """
    import gc

    import torch
    import transformers  # noqa: F401  (imported before the baseline so the baseline includes the libraries)

    import hf_comq

    gc.collect()
    before = _rss_bytes()
    model = _load(path, variant)
    with torch.inference_mode():
        if kind == "image":
            model(pixel_values=torch.zeros(1, 3, 224, 224))
        else:
            model(input_ids=torch.ones(1, 4, dtype=torch.long))
    gc.collect()
    after = _rss_bytes()
    packed = replaced = 0
    for module in model.modules():
        if isinstance(module, hf_comq.COMQLinear):
            packed += sum(tensor.nbytes for name, tensor in module.named_buffers())
            replaced += module.in_features * module.out_features * 4
    return {"rss_added": after - before, "packed_bytes": packed, "replaced_fp32_bytes": replaced}


def child_speed(paths: dict[str, str], kind: str, threads: int, repeats: int, quick: bool) -> dict:
    """FP and W4 timed back to back (interleaved), medians of the repeats."""
    import torch

    from hf_comq.kernels import active_path

    torch.set_num_threads(threads)
    models = {variant: _load(path, variant) for variant, path in paths.items()}
    generator = torch.Generator().manual_seed(0)
    results: dict[str, dict[str, float]] = {variant: {} for variant in models}
    with torch.inference_mode():
        if kind == "image":
            for batch in (1,) if quick else (1, 32):
                pixels = torch.randn(batch, 3, 224, 224, generator=generator)
                times = _interleaved(models, lambda model: model(pixel_values=pixels), repeats if batch == 1 else 3)
                for variant, seconds in times.items():
                    results[variant][f"images/s, batch {batch}"] = batch / seconds
        else:
            prompt = torch.randint(1, 1000, (1, PROMPT_TOKENS), generator=generator)
            new = 16 if quick else NEW_TOKENS

            def generate(model):
                model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True)

            times = _interleaved(models, generate, max(3, repeats // 3))
            for variant, seconds in times.items():
                results[variant]["tokens/s, greedy, batch 1"] = new / seconds
    return {"results": results, "kernel": active_path()}


def _interleaved(models: dict, run, repeats: int) -> dict[str, float]:
    for model in models.values():
        run(model)  # warm-up (and the kernel's first build, if any)
    seconds: dict[str, list[float]] = {variant: [] for variant in models}
    for _ in range(repeats):
        for variant, model in models.items():
            start = time.perf_counter()
            run(model)
            seconds[variant].append(time.perf_counter() - start)
    return {variant: statistics.median(values) for variant, values in seconds.items()}


def _child(task: dict) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(task.get("threads", 1))}
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(task)], capture_output=True, text=True, env=environment
    )
    if result.returncode != 0:
        raise RuntimeError(f"child {task} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="batch 1 only and 16 new tokens")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hf_comq_bench_inference")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task = json.loads(args.child)
        if task["what"] == "memory":
            print(json.dumps(child_memory(task["path"], task["variant"], task["kind"])))
        else:
            print(json.dumps(child_speed(task["paths"], task["kind"], task["threads"], task["repeats"], task["quick"])))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = build_checkpoints(args.workdir, args.models)
    for name in args.models:
        spec = MODELS[name]
        print(f"### {spec['label']}: W4 per-channel COMQ checkpoint (hf_comq.load_quantized) vs FP32")
        memory = {
            variant: _child({"what": "memory", "path": path, "variant": variant, "kind": spec["kind"]})
            for variant, path in paths[name].items()
        }
        w4 = memory["w4"]
        print(
            f"resident memory added by loading: FP32 {memory['fp32']['rss_added'] / 1e6:.0f} MB, "
            f"W4 {w4['rss_added'] / 1e6:.0f} MB ({w4['rss_added'] / memory['fp32']['rss_added']:.2f}x); "
            f"quantized layers: {w4['packed_bytes'] / 1e6:.1f} MB of packed tensors for "
            f"{w4['replaced_fp32_bytes'] / 1e6:.1f} MB of fp32 weights ({w4['packed_bytes'] / w4['replaced_fp32_bytes']:.3f}x)"
        )
        print("| torch threads | measure | FP32 | W4 | W4 / FP32 |")
        print("|---|---|---|---|---|")
        kernel = None
        for threads in args.threads:
            task = {"what": "speed", "paths": paths[name], "kind": spec["kind"], "threads": threads,
                    "repeats": args.repeats, "quick": args.quick}  # fmt: skip
            outcome = _child(task)
            kernel = outcome["kernel"]
            fp, q = outcome["results"]["fp32"], outcome["results"]["w4"]
            for measure in fp:
                print(f"| {threads} | {measure} | {fp[measure]:.2f} | {q[measure]:.2f} | {q[measure] / fp[measure]:.2f} |")
        print(f"packed-layer kernel: {kernel}\n", flush=True)


if __name__ == "__main__":
    main()
