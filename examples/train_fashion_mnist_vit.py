"""Train the small ViT that hf_comq ships as its download-free demo model.

The demo, the tests and the benchmarks need a checkpoint whose weights come
from real training on real data (random weights make quantization error look
meaningless), yet small enough to live in the repository and to quantize in
seconds on a CPU.  This script trains such a model on Fashion-MNIST from the
original idx files (Debian's ``dataset-fashion-mnist`` package installs them
under ``/usr/share/datasets/fashion-mnist``) and writes it, together with a
matching image processor, to ``hf_comq/assets/vit-fashion-mnist/``.

Design choices:

* ``num_channels=3`` with ``do_convert_rgb=True`` in the processor, so the
  model accepts any PIL image (grayscale ``L`` as stored in the dataset, but
  also RGB) through the ordinary ``AutoImageProcessor`` path.
* ``hidden_size=128`` and ``intermediate_size=512`` are multiples of 64, so
  every ``nn.Linear`` can be quantized with group sizes 32 and 64.
* 7x7 patches (16 tokens + CLS) keep training within minutes on two CPU cores.

Run (about 19 minutes on one CPU thread, the default, which is how the shipped
model was trained; see its ``training_summary.json``)::

    python examples/train_fashion_mnist_vit.py

Training is seeded; bit-identical weights additionally need the same torch
build and thread count (``--threads``), because CPU kernels reduce in a
thread-dependent order.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from hf_comq.assets import DEMO_MODEL_DIR, FASHION_MNIST_CLASSES

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUTPUT = DEMO_MODEL_DIR

# Per-pixel statistics of the Fashion-MNIST training images (scaled to [0, 1]).
# The processor and the training loop must normalize identically, so both take
# them from here.
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


def read_idx(path: Path) -> np.ndarray:
    """Read an idx1 (labels) or idx3 (images) file, gzipped or not, as uint8.

    The format is a big-endian magic number, the dimension sizes, then raw
    unsigned bytes; parsing it directly avoids any download helper.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic == IDX_IMAGES_MAGIC:
        count, rows, cols = (int.from_bytes(data[i : i + 4], "big") for i in (4, 8, 12))
        shape: tuple[int, ...] = (count, rows, cols)
        offset = 16
    elif magic == IDX_LABELS_MAGIC:
        shape = (int.from_bytes(data[4:8], "big"),)
        offset = 8
    else:
        raise ValueError(f"{path}: not an idx1/idx3 uint8 file (magic {magic})")
    array = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if array.size != math.prod(shape):
        raise ValueError(f"{path}: expected {math.prod(shape)} values, found {array.size}")
    return array.reshape(shape)


def _find(data_dir: Path, stem: str) -> Path:
    """Locate ``stem`` in ``data_dir`` whether or not it is gzipped."""
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"{stem}[.gz] not found in {data_dir}; install Debian's dataset-fashion-mnist "
        "package or pass --data-dir"
    )


def load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images[N, 28, 28] uint8, labels[N] uint8)`` for ``train`` or ``test``."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(_find(data_dir, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(data_dir, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def to_pixel_values(images: torch.Tensor, num_channels: int = 3) -> torch.Tensor:
    """Map uint8 ``[N, H, W]`` images to the model's normalized ``[N, C, H, W]`` input.

    This is exactly what the saved image processor computes from a grayscale
    PIL image (rescale by 1/255, normalize, replicate to RGB); the asset tests
    check that equivalence.
    """
    x = images.float().div_(255.0).sub_(PIXEL_MEAN).div_(PIXEL_STD)
    return x.unsqueeze(1).expand(-1, num_channels, -1, -1)


def augment(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flips and translations of up to ``max_shift`` pixels.

    A ViT this small over-fits Fashion-MNIST within a few epochs; these two
    label-preserving transforms are cheap on uint8 batches and buy about a
    point of test accuracy.
    """
    n, h, w = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None], images.flip(-1), images)
    padded = F.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols]


def build_config(args: argparse.Namespace) -> ViTConfig:
    """The shipped architecture; sizes chosen so group-wise quantization fits every Linear."""
    return ViTConfig(
        image_size=28,
        patch_size=args.patch_size,
        num_channels=3,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(FASHION_MNIST_CLASSES),
        id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
        label2id={name: i for i, name in enumerate(FASHION_MNIST_CLASSES)},
    )


def build_processor() -> ViTImageProcessorPil:
    """Processor matching :func:`to_pixel_values`; accepts grayscale or RGB PIL images.

    The PIL backend is used because it needs no torchvision; both backends read
    the same saved config.
    """
    return ViTImageProcessorPil(
        do_convert_rgb=True,
        do_resize=True,
        size={"height": 28, "width": 28},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[PIXEL_MEAN] * 3,
        image_std=[PIXEL_STD] * 3,
    )


@torch.no_grad()
def evaluate(model: ViTForImageClassification, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on uint8 images."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(pixel_values=to_pixel_values(images[start : start + batch_size])).logits
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / len(images)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up then cosine decay to zero: the usual recipe for training ViTs from scratch."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_output_folder(output: Path) -> None:
    """Make ``output`` and try a file in it before any training: a folder that cannot be written
    would otherwise be found after the whole run, with the trained weights lost."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise SystemExit(f"train_fashion_mnist_vit.py: error: --output {output} cannot be written ({error})") from None


def train(args: argparse.Namespace) -> dict[str, float]:
    """Train, evaluate, save; return the summary that is also written to disk."""
    check_output_folder(args.output)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)

    train_images_np, train_labels_np = load_split(args.data_dir, "train")
    test_images_np, test_labels_np = load_split(args.data_dir, "test")
    train_images = torch.from_numpy(train_images_np.copy())
    train_labels = torch.from_numpy(train_labels_np.astype(np.int64))
    test_images = torch.from_numpy(test_images_np.copy())
    test_labels = torch.from_numpy(test_labels_np.astype(np.int64))

    config = build_config(args)
    model = ViTForImageClassification(config)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        # Weight decay on matrices only: decaying norms, biases and embeddings hurts small ViTs.
        (decay if param.ndim >= 2 and "embeddings" not in name else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.999),
    )

    steps_per_epoch = math.ceil(len(train_images) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup = min(total_steps // 10, 2 * steps_per_epoch)
    step = 0
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        running_loss = 0.0
        running_correct = 0
        for start in range(0, len(order), args.batch_size):
            index = order[start : start + args.batch_size]
            batch = augment(train_images[index], generator)
            targets = train_labels[index]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup, args.lr)
            logits = model(pixel_values=to_pixel_values(batch)).logits
            loss = F.cross_entropy(logits, targets, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            running_loss += float(loss.detach()) * len(index)
            running_correct += int((logits.argmax(-1) == targets).sum())
            if step % 100 == 0:
                print(f"  step {step}/{total_steps}  loss {float(loss.detach()):.4f}  "
                      f"[{time.perf_counter() - started:.0f}s]", flush=True)
        test_acc = evaluate(model, test_images, test_labels)
        print(
            f"epoch {epoch + 1}/{args.epochs}  loss {running_loss / len(order):.4f}  "
            f"train acc (augmented) {running_correct / len(order):.4f}  test acc {test_acc:.4f}  "
            f"[{time.perf_counter() - started:.0f}s]",
            flush=True,
        )

    summary = {
        "train_accuracy": evaluate(model, train_images, train_labels),
        "test_accuracy": evaluate(model, test_images, test_labels),
        "epochs": args.epochs,
        "seed": args.seed,
        "threads": args.threads,
        "train_seconds": round(time.perf_counter() - started, 1),
        # Everything else that decides the weights, so that a checkpoint says how to retrain it.
        "recipe": {
            key: getattr(args, key)
            for key in ("patch_size", "hidden_size", "layers", "heads", "batch_size", "lr", "weight_decay", "label_smoothing")
        },
    }
    print(f"final train acc {summary['train_accuracy']:.4f}  test acc {summary['test_accuracy']:.4f}")

    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output, safe_serialization=True)
    build_processor().save_pretrained(args.output)
    (args.output / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved to {args.output}")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="folder with the Fashion-MNIST idx files (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to save (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--patch-size", type=int, default=7)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the shipped model: 1)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
