"""fp_target_weight: the weight whose plain COMQ objective is the distance to the full-precision outputs."""

import pytest
import torch

from hf_comq.solver import fp_target_weight, target_product, target_product_from_outputs


def _problem(seed: int = 0, tokens: int = 400, width: int = 24, out: int = 10):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=gen, dtype=torch.float64)
    x_fp = x + 0.2 * torch.randn(tokens, width, generator=gen, dtype=torch.float64)
    weight = torch.randn(out, width, generator=gen, dtype=torch.float64)
    return weight, x, x_fp


def test_undamped_it_is_the_least_squares_fit_of_the_full_precision_outputs():
    weight, x, x_fp = _problem()
    moved = fp_target_weight(weight, x.T @ x, weight @ (x_fp - x).T @ x, damp=0.0, strength=1.0)
    expected = torch.linalg.lstsq(x, x_fp @ weight.T).solution.T
    torch.testing.assert_close(moved, expected, rtol=1e-9, atol=1e-9)


def test_the_plain_objective_on_it_differs_from_the_target_objective_by_a_constant():
    """So minimising ``||X W'^T - X Wq^T||^2`` over any codes minimises ``||X_fp W^T - X Wq^T||^2``."""
    weight, x, x_fp = _problem(seed=1)
    moved = fp_target_weight(weight, x.T @ x, weight @ (x_fp - x).T @ x, damp=0.0, strength=1.0)
    gen = torch.Generator().manual_seed(2)
    gaps = []
    for _ in range(3):
        candidate = weight + 0.3 * torch.randn(weight.shape, generator=gen, dtype=torch.float64)
        target = float(((x_fp @ weight.T - x @ candidate.T) ** 2).sum())
        plain = float(((x @ moved.T - x @ candidate.T) ** 2).sum())
        gaps.append(target - plain)
    assert gaps[0] > 0
    assert max(gaps) - min(gaps) < 1e-8 * gaps[0]


def test_no_target_product_leaves_the_weight_as_it_is():
    weight, x, _ = _problem()
    weight = weight.float()
    assert fp_target_weight(weight, (x.T @ x).float(), torch.zeros(10, 24)) is weight


def test_strength_is_the_fraction_of_the_move_made():
    weight, x, x_fp = _problem()
    h, product = x.T @ x, weight @ (x_fp - x).T @ x
    whole = fp_target_weight(weight, h, product, strength=1.0)
    torch.testing.assert_close(fp_target_weight(weight, h, product), weight + 0.25 * (whole - weight))


def test_damping_only_shortens_the_move():
    weight, x, x_fp = _problem(tokens=30)  # few tokens per input: H is poorly conditioned
    h, product = x.T @ x, weight @ (x_fp - x).T @ x
    undamped = (fp_target_weight(weight, h, product, damp=0.0) - weight).norm()
    damped = (fp_target_weight(weight, h, product) - weight).norm()
    assert 0 < damped < undamped


def test_shapes_must_match_the_weight():
    with pytest.raises(ValueError, match=r"target product \(3, 3\) \(2, 4\)"):
        fp_target_weight(torch.ones(2, 4), torch.eye(4), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"Gram matrix \(3, 3\) must be \(4, 4\)"):
        fp_target_weight(torch.ones(2, 4), torch.eye(3), torch.zeros(2, 4))


def test_the_target_product_of_a_shift_is_the_weight_times_it():
    weight, x, x_fp = _problem()
    shift = ((x_fp - x).T @ x).float()
    product = target_product(weight, shift)
    assert product.dtype == torch.float32
    torch.testing.assert_close(product, (weight @ (x_fp - x).T @ x).float())


def test_the_target_product_from_full_precision_outputs_takes_off_the_layers_own_outputs():
    """``Y_fp^T X - W H - b s`` is ``(Y_fp - Y)^T X`` for ``Y = X W^T + b``: the bias cancels."""
    weight, x, x_fp = _problem()
    bias = torch.randn(weight.shape[0], dtype=torch.float64)
    outputs_fp = x_fp @ weight.T + bias
    expected = (outputs_fp - (x @ weight.T + bias)).T @ x
    summed = outputs_fp.T @ x
    got = target_product_from_outputs(weight, x.T @ x, summed, bias, x.sum(dim=0, keepdim=True))
    assert got.data_ptr() == summed.data_ptr()  # in the summed product's storage
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, target_product(weight, (x_fp - x).T @ x))
    with pytest.raises(ValueError, match="needs the sum of its inputs"):
        target_product_from_outputs(weight, x.T @ x, outputs_fp.T @ x, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_it_is_the_damped_solve_and_leaves_its_inputs_as_they_were(dtype):
    weight, x, x_fp = _problem(seed=3)
    weight, h, product = weight.to(dtype), (x.T @ x).to(dtype), (weight @ (x_fp - x).T @ x).to(dtype)
    inputs = [tensor.clone() for tensor in (weight, h, product)]
    moved = fp_target_weight(weight, h, product, damp=0.01, strength=0.5)
    damped = h.double() + torch.eye(24, dtype=torch.float64) * 0.01 * h.double().diagonal().mean()
    expected = weight.double() + 0.5 * torch.linalg.solve(damped, product.double().T).T
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(moved.double(), expected, rtol=tolerance, atol=tolerance)
    assert moved.dtype == dtype
    assert all(torch.equal(now, before) for now, before in zip((weight, h, product), inputs))


def test_working_in_the_products_storage_changes_no_value():
    weight, x, x_fp = _problem(seed=4)
    weight, h = weight.float(), (x.T @ x).float()
    product = (weight.double() @ (x_fp - x).T @ x).float()
    kept = fp_target_weight(weight, h, product)
    assert torch.equal(fp_target_weight(weight, h, product.clone(), overwrite_product=True), kept)
    bf16 = weight.bfloat16()  # a bfloat16 model's weight: aimed in float32, returned in its own dtype
    aimed = fp_target_weight(bf16, h, product.clone(), overwrite_product=True)
    assert aimed.dtype == torch.bfloat16
    assert torch.equal(aimed, fp_target_weight(bf16, h, product))


@pytest.mark.parametrize("indefinite", [False, True])
def test_lending_the_gram_matrix_changes_no_value_and_gives_it_back_exactly(indefinite, monkeypatch):
    """With ``lend_hessian`` the factor is made in H's own storage (no in x in matrix of its
    own beside H, a wide layer's peak): the same aimed weight, and H rebuilt to the bit,
    also when the first damping fails and H must be rebuilt before a stronger one."""
    import hf_comq.solver.target as target

    weight, x, x_fp = _problem(seed=5, tokens=300, width=300, out=12)
    weight, h = weight.float(), (x.T @ x).float()
    product = (weight.double() @ (x_fp - x).T @ x).float()
    if indefinite:  # lowest eigenvalue -3 % of the mean diagonal: damping by 1 % fails, 10 % is tried on H rebuilt
        lowest, mean = float(torch.linalg.eigvalsh(h.double())[0]), float(h.diagonal().mean())
        h.diagonal().sub_((lowest + 0.03 * mean) / 1.03)
    original = h.clone()
    kept = fp_target_weight(weight, h, product)
    factors, factorise = [], target.damped_cholesky

    def recording(*args, **kwargs):
        factor, added = factorise(*args, **kwargs)
        factors.append((factor.data_ptr(), float(added.max())))
        return factor, added

    monkeypatch.setattr(target, "damped_cholesky", recording)
    lent = fp_target_weight(weight, h, product.clone(), overwrite_product=True, lend_hessian=True)
    assert torch.equal(lent, kept)
    assert torch.equal(h, original)
    assert factors[0][0] == h.data_ptr()
    assert indefinite == (factors[0][1] > 0.01 * float(original.diagonal().mean()) * 1.01)
