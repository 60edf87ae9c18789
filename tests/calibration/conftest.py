"""Fixtures of the calibration tests."""

from __future__ import annotations

import pytest
import transformers as T

from tests.tiny import word_tokenizer


@pytest.fixture
def tokenizer() -> T.PreTrainedTokenizerFast:
    return word_tokenizer()
