"""Hessian hooks: the token mask is named per forward pass, never left over from another one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_comq.calibration.hooks import HessianRecorder


def test_only_real_tokens_enter_the_gram_matrix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with HessianRecorder(model, ["0"], torch.device("cpu")) as recorder:
        with recorder.tokens(mask):
            model(x)
        with recorder.tokens(None):  # every token real
            model(x[:1])
    real = torch.cat([x[mask], x[0]]).double()
    torch.testing.assert_close(recorder.accumulators["0"].result(), real.T @ real)
    assert recorder.accumulators["0"].num_tokens == 8 + 5


def test_a_forward_pass_outside_a_token_scope_is_an_error():
    model = nn.Sequential(nn.Linear(4, 3))
    with HessianRecorder(model, ["0"], torch.device("cpu")) as recorder:
        with recorder.tokens(None):
            model(torch.randn(1, 4))
        with pytest.raises(RuntimeError, match="outside HessianRecorder.tokens"):
            model(torch.randn(1, 4))
    model(torch.randn(1, 4))  # hooks are gone after the recorder closes


def test_layers_reading_one_tensor_share_one_accumulator():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            return self.q(x) + self.k(x)

    model = TwoHeads()
    with HessianRecorder(model, ["q", "k"], torch.device("cpu")) as recorder:
        for _ in range(2):
            with recorder.tokens(None):
                model(torch.randn(3, 4))
    assert recorder.accumulators["q"] is recorder.accumulators["k"]
    assert recorder.distinct() == [recorder.accumulators["q"]] and recorder.accumulators["q"].num_tokens == 6
