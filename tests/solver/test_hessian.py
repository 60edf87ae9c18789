"""HessianAccumulator against a plain float64 X^T X."""

import pytest
import torch

from hf_comq.solver import HessianAccumulator


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_accumulated_gram_matches_float64_reference(dtype, input_dtype):
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 300, 48, generator=gen) * 3 + 1).to(input_dtype) for _ in range(4)]
    acc = HessianAccumulator(48, dtype=dtype)
    for batch in batches:
        acc.add(batch)
    rows = torch.cat([b.reshape(-1, 48) for b in batches]).double()
    assert acc.result().dtype == dtype
    assert acc.num_tokens == rows.shape[0]
    torch.testing.assert_close(acc.result().double(), rows.T @ rows, rtol=1e-5, atol=1e-3)


def test_rejects_non_finite_and_wrong_width():
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="NaN or inf"):
        acc.add(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="in_features=4"):
        acc.add(torch.ones(2, 5))
    with pytest.raises(ValueError, match="no activations"):
        acc.result()
