"""Real data available offline for the benchmarks, split so that calibration and
evaluation never share an item.

* Images: Fashion-MNIST from Debian's ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), read with the loader of
  ``examples/train_fashion_mnist_vit.py``.  Calibration images come from the train
  split, evaluation images from the test split.
* English text: the paragraphs of Python's own documentation topics
  (``pydoc_data``), **deduplicated** (the topics repeat whole paragraphs; the earlier
  positional split left 28-34 held-out paragraphs inside each calibration set) and
  split once, by a fixed shuffle, into a held-out part and a calibration pool.
  Calibration draws come from the pool only, so no draw can touch the held-out text.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLIT_SEED = 1234  # fixes which paragraphs are held out; calibration seeds only draw from the rest
HELD_OUT_FRACTION = 0.3


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images[N, 28, 28] uint8, labels[N])`` of ``train`` or ``test``."""
    sys.path.insert(0, str(ROOT / "examples"))
    from train_fashion_mnist_vit import load_split

    return load_split(FASHION_MNIST_DIR, split)  # names the Debian package if missing


def as_pil(images: np.ndarray) -> list:
    """Grayscale PIL images; the model's image processor resizes them and converts them to RGB."""
    from PIL import Image

    return [Image.fromarray(image, mode="L") for image in images]


def seeded_subset(count: int, total: int, seed: int) -> np.ndarray:
    """``count`` distinct indices of ``range(total)``, a function of ``seed`` only."""
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


def english_paragraphs() -> list[str]:
    """Distinct English paragraphs (> 80 characters, no code prompts) of ``pydoc_data``,
    whitespace-normalised, in first-seen order."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for text in topics.values():
        for paragraph in text.split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if len(paragraph) > 80 and not paragraph.startswith((">>>", "...")):
                seen.setdefault(paragraph, None)
    return list(seen)


def text_split() -> tuple[list[str], list[str]]:
    """``(calibration_pool, held_out)``: disjoint sets of distinct paragraphs."""
    paragraphs = english_paragraphs()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(paragraphs))
    cut = int(len(paragraphs) * HELD_OUT_FRACTION)
    held_out = [paragraphs[i] for i in order[:cut]]
    pool = [paragraphs[i] for i in order[cut:]]
    assert not set(held_out) & set(pool)
    return pool, held_out


def token_chunks(tokenizer, paragraphs: list[str], count: int, length: int) -> torch.Tensor:
    """``(count, length)`` token ids: the paragraphs joined by blank lines, tokenized
    once and cut into consecutive chunks (no padding, every position is real text)."""
    ids = tokenizer("\n\n".join(paragraphs), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < count * length:
        raise SystemExit(f"only {ids.numel()} tokens of text for {count} x {length}; ask for fewer")
    return ids[: count * length].reshape(count, length)


def calibration_chunks(tokenizer, count: int, length: int, seed: int) -> torch.Tensor:
    """Calibration token chunks: the pool's paragraphs in a seeded order, then chunked."""
    pool, _ = text_split()
    order = np.random.default_rng(seed).permutation(len(pool))
    return token_chunks(tokenizer, [pool[i] for i in order], count, length)


def held_out_chunks(tokenizer, count: int, length: int) -> torch.Tensor:
    """Evaluation token chunks from the held-out paragraphs (the same for every seed)."""
    _, held_out = text_split()
    return token_chunks(tokenizer, held_out, count, length)
