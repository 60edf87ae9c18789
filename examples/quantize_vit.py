"""Quantize an image classifier with COMQ while loading it, and check what it costs in accuracy.

This is the shortest complete path through hf_comq for a vision model:

1. ``from_pretrained(..., quantization_config=COMQConfig(...))`` loads the
   full-precision weights and quantizes every ``nn.Linear`` (except the
   classifier head) block by block on calibration images;
2. top-1 accuracy of the full-precision and the quantized model on held-out
   test images says whether the quantized model is still fit for use;
3. ``save_pretrained`` writes the packed checkpoint, which
   ``hf_comq.load_quantized`` reads back (checked here, so a broken checkpoint
   is noticed at once rather than by whoever downloads it).

With no arguments it runs on the ViT that ships inside hf_comq (trained on
Fashion-MNIST) and the shipped Fashion-MNIST calibration/test subset, so it
needs no network::

    python examples/quantize_vit.py --bits 4 --output vit-comq-w4
    python examples/quantize_vit.py --bits 3 --group-size 64 --eval-samples 500

Another checkpoint works the same way when its images and labels are given as
a dataset name or path (``--dataset``, with ``--calibration-split`` /
``--test-split``); its label ids must follow the model's ``id2label`` (or name
the same classes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from transformers import AutoImageProcessor, AutoModelForImageClassification

import hf_comq
from hf_comq.assets import demo_dataset, demo_model_path
from hf_comq.cli.common import CLIError
from hf_comq.cli.output import check_output
from hf_comq.evaluation import checkpoint_size_bytes, load_eval_dataset, top1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Quantize an image classifier with COMQ and compare its top-1 accuracy with full precision.",
        epilog="With no MODEL and no --dataset it uses the Fashion-MNIST ViT and data shipped in hf_comq.",
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="checkpoint folder or Hub id of an image classifier (default: the shipped Fashion-MNIST ViT)",
    )
    parser.add_argument("--bits", type=int, default=4, help="weight bit width, 2 to 8 (default: 4)")
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="input columns sharing one scale, e.g. 64 (default: one scale per output channel)",
    )
    parser.add_argument("--num-samples", type=int, default=128, help="calibration images (default: 128)")
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="evaluate on the first N test images only (default: the whole test split)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="dataset name or path with image and label columns (default: the shipped Fashion-MNIST subset)",
    )
    parser.add_argument("--calibration-split", default="calibration", help="split to calibrate on (default: calibration)")
    parser.add_argument("--test-split", default="test", help="split to evaluate on (default: test)")
    parser.add_argument("--output", type=Path, default=Path("vit-comq"), help="folder for the quantized checkpoint")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass when evaluating")
    return parser.parse_args(argv)


def load_split(dataset: str | None, split: str, limit: int | None = None) -> Any:
    """The shipped Fashion-MNIST subset, or ``split`` of ``dataset`` loaded like the CLI loads it.

    Data files and Hub datasets are streamed (an ``IterableDataset``, which has
    no length), so a large test set is never held in memory; ``limit`` keeps
    the first ``limit`` rows either way.
    """
    data = demo_dataset(split) if dataset is None else load_eval_dataset(dataset, split)
    if limit is not None:
        data = data.select(range(min(limit, len(data)))) if hasattr(data, "__len__") else data.take(limit)
    return data


def count(data: Any) -> str:
    """Number of rows for the report, or "streamed" when the dataset cannot tell without reading it all."""
    return str(len(data)) if hasattr(data, "__len__") else "streamed"


def check_early(args: argparse.Namespace, model_path: str) -> None:
    """What can be refused before any data or weight loads, in one line: the sizes, and an output
    folder that is unusable or would replace something (the model itself, a folder of other files)."""
    for flag, value in (("--eval-samples", args.eval_samples), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    try:  # hf-comq quantize's own rule for its --output; a finished checkpoint there may be replaced
        check_output(args.output, overwrite=True, source=model_path)
    except CLIError as error:
        raise ValueError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_path = args.model or str(demo_model_path())
    try:
        check_early(args, model_path)
        calibration = load_split(args.dataset, args.calibration_split)
        test = load_split(args.dataset, args.test_split, args.eval_samples)
        # One processor object for calibration and both evaluations: FP and COMQ must see identical pixels.
        processor = AutoImageProcessor.from_pretrained(model_path)
    except (ValueError, OSError) as error:
        sys.exit(f"quantize_vit.py: error: {' '.join(str(error).split())}")

    try:  # built first: a bad setting is refused in one line before any model loads
        config = hf_comq.COMQConfig(
            bits=args.bits,
            group_size=args.group_size,
            dataset=calibration,
            processor=processor,
            num_samples=args.num_samples,
        )
    except ValueError as error:
        sys.exit(f"quantize_vit.py: error: {error}")
    # Quantized first: a setting that only the model's layers refuse (a --group-size that does not
    # divide them) is refused in one line before any evaluation.
    started = time.perf_counter()
    try:
        model = AutoModelForImageClassification.from_pretrained(model_path, quantization_config=config).eval()
    except ValueError as error:  # hf_comq's one-line refusals, made before any weight loads
        sys.exit(f"quantize_vit.py: error: {error}")
    seconds = time.perf_counter() - started
    fp_model = AutoModelForImageClassification.from_pretrained(model_path).eval()
    fp_accuracy = top1(fp_model, test, processor, batch_size=args.batch_size).accuracy
    summary = hf_comq.calibration_summary(model)
    comq_accuracy = top1(model, test, processor, batch_size=args.batch_size).accuracy

    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    # Reload through the verifying loader: the saved checkpoint, not the in-memory model, is what users get.
    reloaded = hf_comq.load_quantized(args.output).eval()
    reloaded_accuracy = top1(reloaded, test, processor, batch_size=args.batch_size).accuracy

    tag = f"W{args.bits}" + (f"g{args.group_size}" if args.group_size else "")
    print(f"model: {model_path}")
    print(f"test images: {count(test)}, calibration images: {summary['num_samples']}")
    print(
        f"COMQ {tag}: {summary['layers_quantized']} layers in {seconds:.1f} s, "
        f"mean relative layer error {summary['mean_relative_error']:.3g}"
    )
    print(f"FP top-1: {fp_accuracy:.4f}")
    print(f"COMQ {tag} top-1: {comq_accuracy:.4f} ({100 * (comq_accuracy - fp_accuracy):+.2f} points)")
    print(f"reloaded COMQ {tag} top-1: {reloaded_accuracy:.4f}")
    if args.model is None or Path(model_path).is_dir():
        fp_size = checkpoint_size_bytes(model_path)
        size = checkpoint_size_bytes(args.output)
        print(f"checkpoint: {size / 1e6:.2f} MB vs {fp_size / 1e6:.2f} MB full precision ({fp_size / size:.1f}x smaller)")
    print(f"saved to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
