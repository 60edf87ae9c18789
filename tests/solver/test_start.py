"""The start's damped factorisations, against their definitions: ``L L^T = H + D`` and ``U^T U = (H + D)^-1``."""

import pytest
import torch

from hf_comq.solver.start import FACTORISATION_FAILED, damped_cholesky, damped_inverse_cholesky


def _gram(width: int = 40, tokens: int = 200, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.T @ x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_factor_reproduces_the_damped_matrix(dtype):
    hessian = _gram(dtype=dtype)
    original = hessian.clone()
    factor, added = damped_cholesky(hessian, 0.01)
    torch.testing.assert_close(added, torch.full((40,), 0.01, dtype=dtype) * hessian.diagonal().mean())
    torch.testing.assert_close(factor @ factor.T, hessian + torch.diag(added))
    assert torch.equal(factor, factor.tril())
    assert torch.equal(hessian, original)  # factorised in a copy of its own


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [40, 300])  # 300: blocks of the triangular inverse, the last one shorter
def test_the_inverse_factor_reproduces_the_inverse_of_the_damped_matrix(dtype, width):
    hessian = _gram(width=width, tokens=2 * width, dtype=dtype)
    original = hessian.clone()
    upper, added = damped_inverse_cholesky(hessian, 0.01)
    expected = torch.linalg.inv((hessian + torch.diag(added)).double())
    tolerance = (1e-5 if dtype == torch.float32 else 1e-12) * float(expected.abs().max())
    torch.testing.assert_close((upper.T @ upper).double(), expected, rtol=0, atol=tolerance)
    assert torch.equal(upper, upper.triu())
    assert torch.equal(hessian, original)


def test_dead_inputs_get_the_damping_alone_and_an_indefinite_matrix_more_damping():
    hessian = _gram(width=6)
    hessian[2, :] = hessian[:, 2] = 0.0  # an input that never fired
    _, added = damped_cholesky(hessian, 0.01)
    live_mean = hessian.diagonal()[hessian.diagonal() > 0].mean()
    assert added[2] == pytest.approx(0.01 * live_mean) and added[0] == pytest.approx(0.01 * live_mean)
    _, scaled = damped_cholesky(hessian * 1e-10, 0.01)  # relative to H: a mean over tokens damps alike
    torch.testing.assert_close(scaled, added * 1e-10)

    indefinite = torch.tensor([[1.0, 1.02], [1.02, 1.0]], dtype=torch.float64)  # eigenvalue -0.02: 1 % is short
    factor, added = damped_cholesky(indefinite, 0.01)
    assert torch.equal(added, torch.full((2,), 0.1, dtype=torch.float64))
    torch.testing.assert_close(factor @ factor.T, indefinite + 0.1 * torch.eye(2, dtype=torch.float64))


def test_a_matrix_no_damping_rescues_fails_with_the_named_reason():
    hopeless = torch.eye(3, dtype=torch.float64)
    hopeless[0, 0] = -1e9
    with pytest.raises(ValueError, match=FACTORISATION_FAILED):
        damped_cholesky(hopeless, 0.01)
    with pytest.raises(ValueError, match=FACTORISATION_FAILED):
        damped_inverse_cholesky(hopeless, 0.01)


@pytest.mark.parametrize("width", [40, 600])  # 600: several saved panels, the last one shorter
@pytest.mark.parametrize("indefinite", [False, True])
def test_a_plan_made_in_the_hessians_storage_is_the_same_and_gives_the_hessian_back_exactly(width, indefinite):
    """The error-feedback plan may borrow H's storage for its factor while the start runs:
    the same plan to the bit, made without an in x in copy, and H rebuilt to the bit."""
    from hf_comq.solver.start import plan_error_feedback

    hessian = _gram(width=width, tokens=2 * width, dtype=torch.float32)
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    hessian = hessian[order][:, order].contiguous()  # act-order: the plan keeps the columns as they are
    if indefinite:  # lowest eigenvalue -3 % of the mean diagonal: damping by 1 % fails, 10 % is tried on H rebuilt
        lowest, mean = float(torch.linalg.eigvalsh(hessian.double())[0]), float(hessian.diagonal().mean())
        hessian.diagonal().sub_((lowest + 0.03 * mean) / 1.03)  # the same shift for every input: still act-order
    original = hessian.clone()
    plain = plan_error_feedback(hessian, 0.01)
    lent = plan_error_feedback(hessian, 0.01, lend_storage=True)
    assert plain.perm is None and lent.perm is None
    assert lent.coupling.data_ptr() == hessian.data_ptr()  # no in x in matrix of its own
    assert torch.equal(lent.coupling, plain.coupling) and torch.equal(lent.added_diagonal, plain.added_diagonal)
    assert torch.equal(lent.move_weight, plain.move_weight)
    assert indefinite == bool((plain.added_diagonal > 0.01 * original.diagonal().mean() * 1.01).all())
    lent.give_back()
    assert torch.equal(hessian, original)
