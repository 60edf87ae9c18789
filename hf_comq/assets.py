"""Paths to the demo model and data that ship inside the package.

``hf-comq demo``, the tests and the benchmarks must run on a fresh machine
without a network, so the package carries a small ViT trained on
Fashion-MNIST (``examples/train_fashion_mnist_vit.py``) and a calibration and
evaluation subset of that data (``examples/make_fashion_mnist_subset.py``).
These helpers are the one place that knows where those files live.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing datasets is slow; only demo_dataset needs it
    import datasets

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEMO_MODEL_DIR = ASSETS_DIR / "vit-fashion-mnist"
DEMO_DATA_DIR = ASSETS_DIR / "fashion-mnist-subset"

DEMO_SPLITS: tuple[str, ...] = ("calibration", "test")
DEMO_PREFIX = "demo:"

# Fashion-MNIST label names, indexed by the official label id.  Shared by the
# training and subset scripts so the model's id2label and the dataset's
# ClassLabel cannot disagree.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def demo_model_path() -> Path:
    """Folder of the shipped Fashion-MNIST ViT (config, safetensors weights, image processor).

    Pass it to ``ViTForImageClassification.from_pretrained`` or
    ``AutoImageProcessor.from_pretrained`` like any local checkpoint.

    Raises:
        FileNotFoundError: if the package was installed without its data files.
    """
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"demo model missing at {DEMO_MODEL_DIR}; reinstall hf_comq with its package data "
            "or run examples/train_fashion_mnist_vit.py"
        )
    return DEMO_MODEL_DIR


def demo_dataset_path(split: str) -> Path:
    """Parquet file of the shipped Fashion-MNIST subset for ``split`` ("calibration" or "test")."""
    if split not in DEMO_SPLITS:
        raise ValueError(f"unknown demo split {split!r}; expected one of {', '.join(DEMO_SPLITS)}")
    path = DEMO_DATA_DIR / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"demo data missing at {path}; reinstall hf_comq with its package data "
            "or run examples/make_fashion_mnist_subset.py"
        )
    return path


def demo_dataset_file(name: str) -> Path | None:
    """The shipped parquet file that ``name`` stands for when it is ``"demo:calibration"`` or ``"demo:test"``.

    ``None`` for every other name.  Lets ``COMQConfig(dataset="demo:calibration")``,
    ``hf-comq quantize --dataset demo:calibration`` and ``hf-comq evaluate --dataset
    demo:test`` name the shipped data the same way.
    """
    if not name.startswith(DEMO_PREFIX):
        return None
    split = name[len(DEMO_PREFIX) :]
    if split not in DEMO_SPLITS:
        choices = ", ".join(DEMO_PREFIX + known for known in DEMO_SPLITS)
        raise ValueError(f"unknown demo dataset {name!r}; use one of {choices}")
    return demo_dataset_path(split)


def demo_dataset(split: str) -> "datasets.Dataset":
    """The shipped Fashion-MNIST subset as a ``datasets.Dataset``.

    Columns: ``image`` (``datasets.Image``, 28x28 grayscale PNG, decoded to PIL
    on access) and ``label`` (``datasets.ClassLabel`` with the Fashion-MNIST
    names).  ``"calibration"`` holds 1024 seeded random training images for
    quantization; ``"test"`` holds 2000 test images, 200 per class, for
    evaluation.

    The table is read straight from the parquet file into memory rather than
    through ``load_dataset``, so nothing is written to the datasets cache (it
    may be read-only, e.g. in CI); the feature types come from the schema
    metadata that ``datasets`` stored in the file.
    """
    import datasets
    import pyarrow.parquet as pq

    table = pq.read_table(demo_dataset_path(split))
    return datasets.Dataset(datasets.table.InMemoryTable(table), split=datasets.NamedSplit(split))
