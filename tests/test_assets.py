"""Guards for the demo model and data shipped in ``hf_comq/assets``.

The demo, the benchmarks and several tests trust these files; a re-trained
checkpoint, a re-made subset or a transformers upgrade that silently changes
preprocessing must fail here rather than as a puzzling quantization result.
"""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import AutoImageProcessor, ViTForImageClassification

from hf_comq.assets import (
    FASHION_MNIST_CLASSES,
    demo_dataset,
    demo_dataset_path,
    demo_model_path,
)

# The shipped subset (2000 of the 10000 test images) may differ from the full test
# set's accuracy that training recorded by sampling noise, not by more.
SUBSET_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def model() -> ViTForImageClassification:
    return ViTForImageClassification.from_pretrained(demo_model_path()).eval()


@pytest.fixture(scope="module")
def processor():
    return AutoImageProcessor.from_pretrained(demo_model_path())


@pytest.mark.parametrize("split, rows", [("calibration", 1024), ("test", 2000)])
def test_demo_dataset_layout(split: str, rows: int) -> None:
    dataset = demo_dataset(split)
    assert len(dataset) == rows
    assert isinstance(dataset.features["image"], datasets.Image)
    assert dataset.features["label"].names == list(FASHION_MNIST_CLASSES)
    image = dataset[0]["image"]
    assert image.size == (28, 28) and image.mode == "L"


def test_demo_dataset_readable_by_load_dataset() -> None:
    """The parquet files must stay loadable by plain ``datasets``, not only by our helper."""
    dataset = datasets.load_dataset(
        "parquet", data_files=str(demo_dataset_path("calibration")), split="train"
    )
    assert dataset.features["label"].names == list(FASHION_MNIST_CLASSES)


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown demo split"):
        demo_dataset("train")


def test_model_labels_and_group_friendly_shapes(model: ViTForImageClassification) -> None:
    assert [model.config.id2label[i] for i in range(10)] == list(FASHION_MNIST_CLASSES)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    # group_size 32 and 64 must divide every Linear's input dimension
    assert all(m.in_features % 64 == 0 for m in linears)


def test_processor_accepts_grayscale_and_rgb(processor) -> None:
    images = list(demo_dataset("test").select(range(4))["image"])
    gray = processor(images, return_tensors="pt")["pixel_values"]
    rgb = processor([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    assert gray.shape == (4, 3, 28, 28)
    torch.testing.assert_close(gray, rgb)


@torch.no_grad()
def test_fp_top1_on_shipped_test_subset(model: ViTForImageClassification, processor) -> None:
    test = demo_dataset("test")
    correct = 0
    for start in range(0, len(test), 500):
        batch = test[start : start + 500]
        pixel_values = processor(batch["image"], return_tensors="pt")["pixel_values"]
        predictions = model(pixel_values=pixel_values).logits.argmax(-1)
        correct += int((predictions == torch.tensor(batch["label"])).sum())
    accuracy = correct / len(test)
    recorded = json.loads((demo_model_path() / "training_summary.json").read_text())["test_accuracy"]
    assert abs(accuracy - recorded) <= SUBSET_TOLERANCE, f"FP top-1 {accuracy:.4f}, training recorded {recorded:.4f}"
    assert accuracy > 0.5, "a trained 10-class model, not chance (0.1)"
