"""Write the small Fashion-MNIST subset that hf_comq ships for calibration and evaluation.

COMQ needs a few hundred real inputs to calibrate on, and the demo, tests and
benchmarks need labelled images to measure accuracy on; both must be present
without a download.  This script reads the original idx files (Debian's
``dataset-fashion-mnist`` package) and writes two parquet files in the layout
that ``datasets`` writes itself, so ``load_dataset("parquet", data_files=...)``
and :func:`hf_comq.assets.demo_dataset` both recover the ``Image`` and
``ClassLabel`` feature types:

* ``calibration.parquet``: ``--num-calibration`` training images drawn at
  random with ``--seed`` (training data, so calibration never sees the
  evaluation images).
* ``test.parquet``: the first ``--per-class`` test images of every class, in
  file order, so accuracy is measured on a balanced, deterministic set.

Run::

    python examples/make_fashion_mnist_subset.py
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from hf_comq.assets import DEMO_DATA_DIR, FASHION_MNIST_CLASSES
from train_fashion_mnist_vit import DEFAULT_DATA_DIR, load_split

FEATURES = datasets.Features(
    {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES))}
)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 ``[H, W]`` array as a grayscale PNG (lossless, about 300 bytes at 28x28)."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def build(images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> datasets.Dataset:
    """Dataset of the rows ``index`` with PNG-encoded images and ClassLabel labels."""
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": png_bytes(images[i]), "path": None} for i in index],
            "label": [int(labels[i]) for i in index],
        },
        features=FEATURES,
    )


def calibration_index(num_train: int, count: int, seed: int) -> np.ndarray:
    """Seeded random choice without replacement, sorted so the file keeps dataset order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_train, size=count, replace=False))


def stratified_head_index(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` examples of each label, in file order."""
    chosen = [np.flatnonzero(labels == label)[:per_class] for label in range(len(FASHION_MNIST_CLASSES))]
    if any(len(c) < per_class for c in chosen):
        raise ValueError(f"some class has fewer than {per_class} examples")
    return np.sort(np.concatenate(chosen))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="folder with the Fashion-MNIST idx files (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=DEMO_DATA_DIR, help="where to write (default: %(default)s)")
    parser.add_argument("--num-calibration", type=int, default=1024)
    parser.add_argument("--per-class", type=int, default=200, help="test images per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train_images, train_labels = load_split(args.data_dir, "train")
    test_images, test_labels = load_split(args.data_dir, "test")
    args.output.mkdir(parents=True, exist_ok=True)

    splits = {
        "calibration": build(train_images, train_labels,
                             calibration_index(len(train_images), args.num_calibration, args.seed)),
        "test": build(test_images, test_labels, stratified_head_index(test_labels, args.per_class)),
    }
    for name, dataset in splits.items():
        path = args.output / f"{name}.parquet"
        dataset.to_parquet(path)
        counts = np.bincount(dataset["label"], minlength=len(FASHION_MNIST_CLASSES))
        print(f"{path}: {len(dataset)} rows, {path.stat().st_size / 1024:.0f} KiB, per class {counts.tolist()}")


if __name__ == "__main__":
    main()
