"""Fixtures of the command-line tests: tiny checkpoints and data files, built once for the package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T

from tests.cli.helpers import save_text_model
from tests.tiny import image_parquet, image_processor, images, sentences, tiny_vit


@pytest.fixture(scope="package")
def vit_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vit")
    tiny_vit(num_labels=3).save_pretrained(folder)
    image_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="package")
def image_data(tmp_path_factory) -> Path:
    return image_parquet(tmp_path_factory.mktemp("data") / "images.parquet", images(12))


@pytest.fixture(scope="package")
def text_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in sentences(12)))
    return path


@pytest.fixture(scope="package")
def gpt2_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return save_text_model(T.GPT2LMHeadModel(config), tmp_path_factory.mktemp("gpt2"), with_pad=False)


@pytest.fixture(scope="package")
def bert_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    # A wide initialisation, so the encoder layers (not only the embeddings) shape the hidden states
    # and quantization error is visible in the embeddings.
    config = T.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        initializer_range=0.3,
    )  # fmt: skip
    return save_text_model(T.BertForSequenceClassification(config), tmp_path_factory.mktemp("bert"))
