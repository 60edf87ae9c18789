"""Build a tiny random Llama checkpoint and quantize it through hf_comq's ``from_pretrained`` path.

The GPU machine has no internet and no model weights, so the checks need a model
made on the spot.  It is random but **peaked** (``initializer_range=0.2``: on
random token ids the median gap between the two best logprobs is about 1 nat), so
greedy tokens depend on the weights, not on rounding noise, and a wrong layout
shows up at once.  Its widths are multiples of 128, so every vLLM kernel
(Machete wants K % 64, N % 128) can take it.
The tokenizer is a small byte-level BPE trained here on the calibration sentences,
because none can be downloaded.

Usage:
    python benchmarks/gpu/tiny_checkpoint.py --out DIR [--bits 4] [--group-size 128] [--symmetric] [--name NAME]

Writes ``DIR/base`` (full precision) once, then ``DIR/<name>`` (quantized) and prints
that path on the last line.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

WORDS = (
    "the a model layer weight quantized river stone light winter number small large green "
    "quick slow north south paper garden music window system value token vector train "
    "city morning evening signal memory energy field simple careful bright quiet"
).split()


def calibration_sentences(count: int = 48, seed: int = 0) -> list[str]:
    """Short pseudo-sentences: enough text to train a tokenizer and calibrate COMQ."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "." for _ in range(count)]


def build_tokenizer(texts: list[str]):
    """A 512-entry byte-level BPE tokenizer trained offline; saved with the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_base(path: Path, texts: list[str]) -> None:
    """Random Llama with vLLM-friendly widths, float32, plus its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def quantize(base: Path, out: Path, bits: int, group_size: int | None, symmetric: bool, texts: list[str], device: str) -> None:
    """The user's path: ``from_pretrained(..., quantization_config=COMQConfig(...))`` then ``save_pretrained``."""
    import hf_comq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = hf_comq.COMQConfig(
        bits=bits, group_size=group_size, symmetric=symmetric, dataset=texts, num_samples=len(texts), max_length=64
    )
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, dtype=torch.float32, device_map=device)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=None, help="omit for per-channel scales")
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", help="folder name under --out; default e.g. w4_g128_asym")
    args = parser.parse_args(argv)

    texts = calibration_sentences()
    base = args.out / "base"
    if not (base / "config.json").exists():
        build_base(base, texts)
    grid = f"g{args.group_size}" if args.group_size else "pc"
    name = args.name or f"w{args.bits}_{grid}_{'sym' if args.symmetric else 'asym'}"
    target = args.out / name
    quantize(base, target, args.bits, args.group_size, args.symmetric, texts, args.device)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
