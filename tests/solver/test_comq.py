"""The COMQ solver against slow references, its monotonicity, quality and edge cases."""

import pytest
import torch

from hf_comq import HessianAccumulator, comq_quantize, layer_objective
from hf_comq.solver import REFERENCE_CODE, ROUND_TO_NEAREST
from hf_comq.solver import comq as comq_module
from hf_comq.solver import pair_moves as pair_moves_module
from hf_comq.solver.options import default_damp
from hf_comq.solver.grid import minmax_grid
from tests.solver.reference import (
    error_feedback_reference,
    greedy_orders,
    make_layer,
    residual_form_comq,
)

FAITHFUL = dict(init="fp", scale_refit=False, scale_search=False, pair_moves=0, compute_dtype=torch.float64, tol=0.0)


def _per_column_grid(weight, bits, group_size=None, symmetric=False):
    grid = minmax_grid(weight, bits, group_size or weight.shape[1], symmetric)
    return grid.per_column() + (grid.max_code,)


def _rtn_objective(weight, hessian, bits, group_size=None, symmetric=False):
    q = comq_quantize(
        weight, hessian, bits=bits, group_size=group_size, symmetric=symmetric,
        init="rtn", iterations=0, scale_refit=False, scale_search=False,
    )
    return layer_objective(weight, q.dequantize(), hessian)


@pytest.mark.parametrize("order", ["greedy", "sequential", "act_order"])
@pytest.mark.parametrize("sweeps", [1, 2])
def test_gram_form_matches_residual_form_on_x(small_layer, order, sweeps):
    weight, inputs = small_layer
    hessian = inputs.T @ inputs
    scale, zero, max_code = _per_column_grid(weight, 3)
    if order == "greedy":
        orders = greedy_orders(weight, inputs)
    elif order == "act_order":
        orders = torch.argsort(torch.diagonal(hessian), descending=True, stable=True).repeat(weight.shape[0], 1)
    else:
        orders = torch.arange(weight.shape[1]).repeat(weight.shape[0], 1)
    ref_codes, _ = residual_form_comq(weight, inputs, scale, zero, max_code, orders, sweeps)

    result = comq_quantize(weight, hessian, bits=3, order=order, iterations=sweeps, **FAITHFUL)
    assert torch.equal(result.codes.long(), ref_codes.long())


@pytest.mark.parametrize("order", ["greedy", "sequential"])  # per-row and shared-order sweeps
def test_gram_form_matches_residual_form_with_dead_inputs_and_groups(order):
    weight, inputs = make_layer(5, 16, 40, seed=3)
    inputs[:, [4, 11]] = 0.0
    hessian = inputs.T @ inputs
    scale, zero, max_code = _per_column_grid(weight, 2, group_size=8)
    if order == "greedy":
        orders = greedy_orders(weight, inputs)
    else:
        orders = torch.arange(weight.shape[1]).repeat(weight.shape[0], 1)
    ref_codes, _ = residual_form_comq(weight, inputs, scale, zero, max_code, orders, 2)
    result = comq_quantize(weight, hessian, bits=2, group_size=8, order=order, iterations=2, **FAITHFUL)
    assert torch.equal(result.codes.long(), ref_codes.long())


@pytest.mark.parametrize("group_size", [None, 32])
def test_blocked_sweeps_match_unblocked(group_size, medium_layer):
    weight, _, hessian = medium_layer
    common = dict(bits=4, group_size=group_size, order="act_order", iterations=2, **FAITHFUL)
    blocked = comq_quantize(weight, hessian, block_size=32, **common)
    unblocked = comq_quantize(weight, hessian, block_size=1, **common)
    assert torch.equal(blocked.codes, unblocked.codes)


def test_greedy_blocking_does_not_change_codes(medium_layer):
    weight, _, hessian = medium_layer
    common = dict(bits=3, order="greedy", iterations=1, **FAITHFUL)
    assert torch.equal(
        comq_quantize(weight, hessian, block_size=16, **common).codes,
        comq_quantize(weight, hessian, block_size=128, **common).codes,
    )


@pytest.mark.parametrize("group_size", [None, 32])  # code-unit and weight-unit passes
def test_error_feedback_start_matches_unblocked_gptq_rounding(group_size, medium_layer):
    weight, _, hessian = medium_layer
    scale, zero, max_code = _per_column_grid(weight, 4, group_size)
    expected = error_feedback_reference(weight, hessian, scale, zero, max_code, damp=0.01)
    result = comq_quantize(
        weight, hessian, bits=4, group_size=group_size, init="error_feedback", iterations=0, scale_refit=False,
        scale_search=False, damp=0.01, compute_dtype=torch.float64,
    )
    assert torch.equal(result.codes.long(), expected.long())


@pytest.mark.parametrize("bits, expected", [(2, 0.01), (3, 0.01), (4, 0.003), (8, 0.003)])
def test_damping_defaults_by_bit_width(bits, expected, medium_layer):
    weight, _, hessian = medium_layer
    assert default_damp(bits) == expected
    automatic = comq_quantize(weight, hessian, bits=bits, iterations=0)
    explicit = comq_quantize(weight, hessian, bits=bits, iterations=0, damp=expected)
    assert torch.equal(automatic.codes, explicit.codes)


@pytest.mark.parametrize(
    "settings",
    [
        dict(init="fp", order="greedy", scale_refit=False, scale_search=False),
        dict(init="rtn", order="sequential", scale_refit=True, scale_search=True),
        dict(init="error_feedback", order="act_order", scale_refit=True, scale_search=True),
        dict(init="error_feedback", order="act_order", group_size=32, scale_refit=True),
        dict(init="rtn", order="act_order", symmetric=True, scale_refit=True),
    ],
)
def test_objective_never_increases_across_steps(medium_layer, settings):
    weight, _, hessian = medium_layer
    result = comq_quantize(weight, hessian, bits=3, iterations=5, tol=0.0, compute_dtype=torch.float64, **settings)
    history = result.stats["objective"]
    steps = history[1:] if settings["init"] == "fp" else history  # the fp start is off-grid (objective 0)
    for before, after in zip(steps, steps[1:]):
        assert after <= before * (1 + 1e-9)
    assert history[-1] == pytest.approx(layer_objective(weight, result.dequantize(), hessian), rel=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("variant", [dict(), dict(group_size=32), dict(symmetric=True)])
def test_default_beats_round_to_nearest(bits, seed, variant):
    weight, inputs = make_layer(48, 64, 256, seed=seed)
    hessian = inputs.T @ inputs
    result = comq_quantize(weight, hessian, bits=bits, **variant)
    assert layer_objective(weight, result.dequantize(), hessian) < _rtn_objective(weight, hessian, bits, **variant)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_reference_mode_beats_round_to_nearest(bits, medium_layer):
    weight, _, hessian = medium_layer
    result = comq_quantize(weight, hessian, bits=bits, **REFERENCE_CODE)
    assert layer_objective(weight, result.dequantize(), hessian) < _rtn_objective(weight, hessian, bits)


def test_default_beats_reference_mode(medium_layer):
    weight, _, hessian = medium_layer
    faithful = comq_quantize(weight, hessian, bits=3, **REFERENCE_CODE)
    default = comq_quantize(weight, hessian, bits=3)
    assert layer_objective(weight, default.dequantize(), hessian) < layer_objective(weight, faithful.dequantize(), hessian)


def test_quantized_weight_layout_and_dequantize(medium_layer):
    weight, _, hessian = medium_layer
    result = comq_quantize(weight, hessian, bits=3, group_size=32)
    assert result.codes.dtype == torch.uint8 and result.codes.shape == weight.shape
    assert int(result.codes.max()) <= 7
    assert result.scale.shape == (96, 4) and result.zero_point.shape == (96, 4)
    assert torch.equal(result.zero_point, result.zero_point.round())
    assert (result.scale > 0).all()
    expected = result.scale.repeat_interleave(32, 1) * (result.codes.float() - result.zero_point.repeat_interleave(32, 1))
    assert torch.equal(result.dequantize(), expected)
    assert result.stats["relative_error"] == pytest.approx(
        layer_objective(weight, result.dequantize(), hessian) / layer_objective(weight, torch.zeros_like(weight), hessian),
        rel=1e-4,
    )


def test_symmetric_grid_zero_point_is_mid_range(medium_layer):
    weight, _, hessian = medium_layer
    result = comq_quantize(weight, hessian, bits=4, symmetric=True)
    assert torch.all(result.zero_point == 8)


def test_scale_refit_matches_closed_form_per_row(medium_layer):
    weight, _, hessian = medium_layer
    result = comq_quantize(
        weight, hessian, bits=4, init="rtn", iterations=1, scale_refit=True, scale_search=False,
        compute_dtype=torch.float64, tol=0.0,
    )  # fmt: skip
    offsets = (result.codes.double() - result.zero_point.double())
    projected = offsets @ hessian.double()
    optimal = (projected * weight.double()).sum(1) / (projected * offsets).sum(1)
    assert torch.allclose(result.scale.double().squeeze(1), optimal, rtol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_scale_refit_is_on_by_default_at_2_bits_only(bits, medium_layer):
    weight, _, hessian = medium_layer
    default = comq_quantize(weight, hessian, bits=bits, group_size=32)
    explicit = comq_quantize(weight, hessian, bits=bits, group_size=32, scale_refit=bits == 2)
    other = comq_quantize(weight, hessian, bits=bits, group_size=32, scale_refit=bits != 2)
    assert torch.equal(default.codes, explicit.codes) and torch.equal(default.scale, explicit.scale)
    assert not torch.equal(default.scale, other.scale)  # the setting makes a difference here


def test_dead_inputs_get_nearest_rounding_and_no_nans():
    weight, inputs = make_layer(8, 32, 64, seed=4)
    inputs[:, 5:9] = 0.0
    hessian = inputs.T @ inputs
    for init in ("fp", "rtn", "error_feedback"):
        result = comq_quantize(weight, hessian, bits=4, init=init, scale_refit=False, scale_search=False)
        deq = result.dequantize()
        assert torch.isfinite(deq).all()
        grid = minmax_grid(weight, 4, 32)
        rtn = (torch.clamp(torch.round(weight / grid.scale) + grid.zero_point, 0, 15) - grid.zero_point) * grid.scale
        assert torch.allclose(deq[:, 5:9], rtn[:, 5:9])


def test_the_solve_with_dead_inputs_does_not_depend_on_the_scale_of_h():
    """A Gram matrix averaged over tokens (H / N) of small activations is H at another scale:
    the objective only scales with it, so the codes must not change.  Dead inputs were once
    damped by an absolute 1, which dwarfed a small H."""
    weight, inputs = make_layer(32, 64, 500, seed=0)
    inputs[:, :8] = 0.0
    hessian = inputs.T @ inputs
    codes = comq_quantize(weight, hessian, bits=3).codes
    assert torch.equal(comq_quantize(weight, hessian * 1e-10, bits=3).codes, codes)


def test_an_objective_that_overflows_float32_is_refused_with_the_fix():
    """Weights near 1e20 fit float32, their squared errors do not: the sums come out inf or
    NaN, and a relative error of NaN / NaN once read as a perfect 0.0."""
    weight, inputs = make_layer(8, 32, 100, seed=0)
    hessian = inputs.T @ inputs
    with pytest.raises(ValueError, match="overflowed the compute dtype.*compute_dtype=torch.float64"):
        comq_quantize(weight * 1e20, hessian)
    result = comq_quantize(weight * 1e20, hessian, compute_dtype=torch.float64)
    assert 0.0 < result.stats["relative_error"] < 1.0


def test_all_zero_hessian_falls_back_to_round_to_nearest():
    weight = torch.randn(4, 8)
    result = comq_quantize(weight, torch.zeros(8, 8), bits=4)
    assert torch.isfinite(result.dequantize()).all()
    assert result.stats["relative_error"] == 0.0


def test_constant_and_zero_rows_are_exact_on_the_asymmetric_grid():
    weight, inputs = make_layer(4, 16, 64, seed=5)
    weight[0] = 0.0
    weight[1] = 0.37
    weight[2] = -1.5
    hessian = inputs.T @ inputs
    deq = comq_quantize(weight, hessian, bits=2).dequantize()
    assert torch.equal(deq[0], torch.zeros(16))
    assert torch.allclose(deq[1:3], weight[1:3], rtol=1e-5)


def test_constant_and_zero_rows_on_the_symmetric_grid():
    """The symmetric grid cannot hold +absmax exactly (its levels run from -2^(b-1) to
    2^(b-1)-1 steps), so a constant row is only checked to have a lower objective than
    rounding it; a zero row stays exact."""
    weight, inputs = make_layer(4, 16, 64, seed=5)
    weight[0] = 0.0
    weight[1] = 0.37
    hessian = inputs.T @ inputs
    deq = comq_quantize(weight, hessian, bits=2, symmetric=True).dequantize()
    rtn = comq_quantize(weight, hessian, bits=2, symmetric=True, init="rtn", iterations=0, scale_refit=False, scale_search=False)
    assert torch.equal(deq[0], torch.zeros(16))
    assert layer_objective(weight[1:2], deq[1:2], hessian) < layer_objective(weight[1:2], rtn.dequantize()[1:2], hessian)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_weights_are_solved_in_float32(dtype, medium_layer):
    weight, _, hessian = medium_layer
    low = weight.to(dtype)
    result = comq_quantize(low, hessian, bits=4)
    assert result.dequantize().dtype == dtype
    assert result.scale.dtype == torch.float32
    assert torch.equal(result.codes, comq_quantize(low.float(), hessian, bits=4).codes)
    from_low_hessian = comq_quantize(low, hessian.to(dtype), bits=4)
    assert torch.isfinite(from_low_hessian.dequantize().float()).all()


def test_paper_faithful_reference_code_mode_is_reproducible(medium_layer):
    weight, _, hessian = medium_layer
    faithful = REFERENCE_CODE
    assert torch.equal(comq_quantize(weight, hessian, **faithful).codes, comq_quantize(weight, hessian, **faithful).codes)


def test_shrink_narrows_the_initial_grid(medium_layer):
    weight, _, hessian = medium_layer
    wide = comq_quantize(weight, hessian, bits=2, init="rtn", iterations=0, scale_refit=False, scale_search=False)
    narrow = comq_quantize(weight, hessian, bits=2, init="rtn", iterations=0, scale_refit=False, scale_search=False, shrink=0.65)
    assert torch.allclose(narrow.scale, wide.scale * 0.65, rtol=0.05)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=1), "bits must be an integer between 2 and 8"),
        (dict(bits=9), "bits must be an integer between 2 and 8"),
        (dict(group_size=24), "does not divide"),
        (dict(order="random"), "order must be one of"),
        (dict(init="zeros"), "init must be one of"),
        (dict(iterations=-1), "iterations must be"),
        (dict(shrink=1.5), "shrink must be in"),
        (dict(damp=0.0), "damp: expected a number > 0 or None"),  # as COMQConfig: a rank-deficient H needs it
        (dict(damp=float("inf")), "damp: expected a number > 0 or None"),
        (dict(tol=float("nan")), "tol must be a non-negative number"),
        (dict(block_size=1.5), "block_size must be a positive integer"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, message, medium_layer):
    weight, _, hessian = medium_layer
    with pytest.raises(ValueError, match=message):
        comq_quantize(weight, hessian, **kwargs)


def test_bad_tensors_raise_clear_errors():
    weight = torch.randn(4, 8)
    hessian = torch.eye(8)
    with pytest.raises(ValueError, match="shape mismatch"):
        comq_quantize(weight, torch.eye(6))
    with pytest.raises(ValueError, match="square"):
        comq_quantize(weight, torch.ones(8, 6))
    nan_weight = weight.clone()
    nan_weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight contains NaN or inf"):
        comq_quantize(nan_weight, hessian)
    inf_hessian = hessian.clone()
    inf_hessian[1, 1] = float("inf")
    with pytest.raises(ValueError, match="hessian contains NaN or inf"):
        comq_quantize(weight, inf_hessian)
    with pytest.raises(ValueError, match="2-D"):
        comq_quantize(torch.randn(8), hessian)
    with pytest.raises(ValueError, match="floating point"):
        comq_quantize(torch.ones(4, 8, dtype=torch.int64), hessian)


class TestHessianAccumulator:
    def test_streams_batches_of_any_leading_shape(self):
        x = torch.randn(3, 7, 10)
        acc = HessianAccumulator(10)
        acc.add(x[:2])
        acc.add(x[2])
        flat = x.reshape(-1, 10).double()
        torch.testing.assert_close(acc.result(), flat.T @ flat, rtol=1e-5, atol=1e-5)  # float32 batch products
        assert acc.num_tokens == 21
        assert acc.result().dtype == torch.float64

    def test_float32_accumulation(self):
        acc = HessianAccumulator(4, dtype=torch.float32)
        acc.add(torch.ones(5, 4, dtype=torch.bfloat16))
        assert acc.result().dtype == torch.float32
        assert torch.equal(acc.result(), torch.full((4, 4), 5.0))

    def test_errors(self):
        acc = HessianAccumulator(4)
        with pytest.raises(ValueError, match="no activations"):
            acc.result()
        with pytest.raises(ValueError, match="last dimension 3"):
            acc.add(torch.ones(2, 3))
        with pytest.raises(ValueError, match="NaN or inf"):
            acc.add(torch.tensor([[float("nan"), 0.0, 0.0, 0.0]]))
        with pytest.raises(ValueError, match="float32 or torch.float64"):
            HessianAccumulator(4, dtype=torch.float16)


def test_every_requested_sweep_runs_from_the_full_precision_start(medium_layer):
    weight, _, hessian = medium_layer
    result = comq_quantize(
        weight, hessian, bits=4, init="fp", order="act_order", iterations=3, scale_refit=False, scale_search=False,
        pair_moves=0,
    )
    history = result.stats["objective"]
    assert len(history) == 4 and history[3] < history[2] < history[1]


def test_sweeping_stops_once_the_relative_decrease_is_below_tol(medium_layer):
    weight, _, hessian = medium_layer
    result = comq_quantize(
        weight, hessian, bits=4, init="rtn", iterations=50, scale_refit=False, scale_search=False, tol=1e-2,
        pair_moves=0,
    )  # fmt: skip
    history = result.stats["objective"]
    assert len(history) < 51
    assert history[-2] - history[-1] <= 1e-2 * history[-2]


def test_after_a_pair_pass_only_rows_changed_since_sweep_again(monkeypatch, medium_layer):
    """A pair pass leaves its rows where no single step helps: a round-to-nearest start has
    no block re-solve after it, so no row is left for a second sweep and the solve stops
    after one, however many it may run and however small ``tol``.  With the round limit
    cut so that rows are left moving, those sweep again, on their own, and the solve ends
    where sweeping every row again ends, up to the noise the pass's gain threshold leaves."""
    weight, _, hessian = medium_layer
    settings = dict(bits=3, init="rtn", iterations=6, tol=0.0, compute_dtype=torch.float32)
    settled = comq_quantize(weight, hessian, **settings)
    assert len(settled.stats["objective"]) == 2

    monkeypatch.setattr(pair_moves_module, "MAX_ROUNDS", 4)
    apart = comq_quantize(weight, hessian, **settings)
    history = apart.stats["objective"]
    assert len(history) > 2 and history[-1] < history[1]
    assert history[-1] == pytest.approx(layer_objective(weight, apart.dequantize(), hessian), rel=1e-5)
    for share in (1.0, 0.0):  # the unsettled rows always gathered apart; every row always swept in place
        monkeypatch.setattr(comq_module, "MOST_ROWS_SWEPT_APART", share)
        other = comq_quantize(weight, hessian, **settings)
        assert history[-1] == pytest.approx(other.stats["objective"][-1], rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_each_row_starts_from_the_better_of_the_searched_and_plain_grid(bits, medium_layer):
    """With ``clip_weights="diagonal"`` the clipping search's diag(H) proxy can pick a
    grid that starts worse than min-max for some rows; the start must be no worse than
    either grid, row by row."""
    weight, _, hessian = medium_layer
    start = dict(bits=bits, iterations=0, scale_refit=False, compute_dtype=torch.float64, clip_weights="diagonal")
    merged = comq_quantize(weight, hessian, scale_search=True, **start)
    plain = comq_quantize(weight, hessian, scale_search=False, **start)

    def rows(q):
        error = (weight - q.dequantize()).double()
        return ((error @ hessian.double()) * error).sum(1)

    assert torch.all(rows(merged) <= rows(plain) * (1 + 1e-9))
    assert merged.stats["objective"][0] <= plain.stats["objective"][0]


def test_conditional_energy_is_the_schur_complement_on_later_inputs(medium_layer):
    """``d_j`` of the error-feedback objective is the energy of input j that the
    inputs rounded after it (act-order, damped H) cannot explain."""
    from hf_comq.solver.comq import _Columns
    from hf_comq.solver.start import plan_error_feedback

    weight, _, hessian = medium_layer
    h = hessian.double()
    problem = _Columns.build(h, torch.float64, h.device, weight.shape[1], "sequential")
    damp = 0.01
    energy = problem.conditional_energy(plan_error_feedback(problem.hessian, damp))

    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    damped = h[perm][:, perm] + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    n = h.shape[0]
    expected = torch.empty(n, dtype=h.dtype)
    for k in range(n):
        later = damped[k, k + 1 :]
        schur = damped[k, k] - (later @ torch.linalg.solve(damped[k + 1 :, k + 1 :], later) if k + 1 < n else 0.0)
        expected[perm[k]] = schur
    torch.testing.assert_close(energy, expected, rtol=1e-8, atol=0.0)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(("group_size", "start_grids"), [(None, 1), (None, 3), (None, 4), (32, 3)])
def test_conditional_clip_search_start_matches_reference(bits, group_size, start_grids, medium_layer):
    """The default start: the clipping searched with the conditional energies (then
    the diag(H)-searched one, the first 5 % tighter and looser, up to ``start_grids``),
    each started by unblocked error feedback, every row keeping the lowest objective
    (checked against the slow reference)."""
    from hf_comq.solver.comq import MIN_SHRINK, SHRINK_CANDIDATES
    from hf_comq.solver.grid import search_shrink

    weight, _, hessian = medium_layer
    h, w = hessian.double(), weight.double()
    damp = default_damp(bits)
    cols = group_size or w.shape[1]
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    damped = h[perm][:, perm] + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    upper = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    conditional = torch.empty_like(torch.diagonal(h))
    conditional[perm] = torch.diagonal(upper).square().reciprocal()

    def searched(col_weight):
        return search_shrink(w, col_weight, bits, cols, False, SHRINK_CANDIDATES, MIN_SHRINK)

    factors = [searched(conditional), searched(torch.diagonal(h)), searched(conditional) * 0.95,
               (searched(conditional) * 1.05).clamp(max=1.0)][:start_grids]
    best_rows = None
    for factor in factors:
        grid = minmax_grid(w, bits, cols, shrink=factor)
        scale, zero = grid.per_column()
        codes = error_feedback_reference(w, h, scale, zero, grid.max_code, damp)
        error = w - (codes - zero) * scale
        rows = ((error @ h) * error).sum(1)
        best_rows = rows if best_rows is None else torch.minimum(best_rows, rows)

    start = comq_quantize(
        weight, hessian, bits=bits, group_size=group_size, iterations=0, scale_refit=False,
        compute_dtype=torch.float64, start_grids=start_grids,
    )
    assert start.stats["objective"][0] == pytest.approx(float(best_rows.sum()), rel=1e-9)


def test_clip_weights_and_start_grids_are_validated(medium_layer):
    weight, _, hessian = medium_layer
    with pytest.raises(ValueError, match="clip_weights must be one of"):
        comq_quantize(weight, hessian, clip_weights="hessian")
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="start_grids must be an integer from 1 to 4"):
            comq_quantize(weight, hessian, start_grids=bad)


@pytest.mark.parametrize("start_grids", [2, 3, 4])
def test_more_start_grids_never_start_higher(start_grids, medium_layer):
    """Each grid added to the stacked start is one more option per row."""
    weight, _, hessian = medium_layer
    start = dict(bits=3, iterations=0, scale_refit=False, compute_dtype=torch.float64)
    fewer = comq_quantize(weight, hessian, start_grids=start_grids - 1, **start)
    more = comq_quantize(weight, hessian, start_grids=start_grids, **start)
    assert more.stats["objective"][0] <= fewer.stats["objective"][0] * (1 + 1e-12)


@pytest.mark.parametrize("scale_refit", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_group_wise_default_reports_the_objective_of_what_it_returns(bits, scale_refit, medium_layer):
    # With the refit, the last one keeps no residual; the reported objective comes from
    # each row's exact change, in float32 as the solver runs by default.
    weight, _, hessian = medium_layer
    result = comq_quantize(weight, hessian, bits=bits, group_size=32, scale_refit=scale_refit)
    assert result.stats["objective"][-1] == pytest.approx(layer_objective(weight, result.dequantize(), hessian), rel=1e-4)


def test_solver_hessian_built_in_row_blocks_equals_the_whole_matrix_route(monkeypatch, medium_layer):
    """The solver's symmetrized, act-ordered H is built block by block (bounded
    temporaries); entry for entry it is the whole-matrix cast, sum and gather."""
    import hf_comq.solver.comq as comq_module
    from hf_comq.solver.comq import _symmetric_permuted

    _, _, hessian = medium_layer
    skewed = hessian.double() + 1e-3 * torch.randn(hessian.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    perm = torch.randperm(hessian.shape[0], generator=torch.Generator().manual_seed(1))
    cast = skewed.float()
    expected = (0.5 * (cast + cast.T))[perm][:, perm]
    monkeypatch.setattr(comq_module, "HESSIAN_BLOCK_BYTES", 1)  # one row per block
    assert torch.equal(_symmetric_permuted(skewed, perm, torch.float32, torch.device("cpu")), expected)


@pytest.mark.parametrize("settings", [{}, dict(init="rtn", iterations=0, scale_refit=False, scale_search=False)])
def test_codes_do_not_depend_on_the_hessian_block_size(monkeypatch, medium_layer, settings):
    import hf_comq.solver.comq as comq_module

    weight, _, hessian = medium_layer
    whole = comq_quantize(weight, hessian.double(), bits=3, **settings)
    monkeypatch.setattr(comq_module, "HESSIAN_BLOCK_BYTES", 1)
    blocked = comq_quantize(weight, hessian.double(), bits=3, **settings)
    assert torch.equal(blocked.codes, whole.codes) and torch.equal(blocked.scale, whole.scale)
    assert blocked.stats["objective"] == whole.stats["objective"]


@pytest.mark.parametrize("order", ["act_order", "sequential"])
def test_hessian_built_in_its_own_storage_equals_the_copy(monkeypatch, medium_layer, order):
    """overwrite_hessian: the same working matrix (moved and averaged in place, in tiles
    and row blocks), so the same codes; the caller's matrix is used up."""
    import hf_comq.solver.comq as comq_module
    from hf_comq.solver.comq import _symmetric_permuted, _symmetric_permuted_in_place

    weight, _, hessian = medium_layer
    skewed = hessian + 1e-3 * torch.randn(hessian.shape, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(comq_module, "HESSIAN_BLOCK_BYTES", 4096)  # 32 x 32 tiles, 8-row blocks
    for perm in (torch.randperm(hessian.shape[0], generator=torch.Generator().manual_seed(1)), torch.arange(hessian.shape[0])):
        expected = _symmetric_permuted(skewed, perm, torch.float32, torch.device("cpu"))
        assert torch.equal(_symmetric_permuted_in_place(skewed.clone(), perm), expected)
    kept = comq_quantize(weight, skewed, bits=3, order=order)
    used = skewed.clone()
    overwritten = comq_quantize(weight, used, bits=3, order=order, overwrite_hessian=True)
    assert torch.equal(overwritten.codes, kept.codes) and torch.equal(overwritten.scale, kept.scale)
    assert overwritten.stats["objective"] == kept.stats["objective"]
    assert not torch.equal(used, skewed)


@pytest.mark.parametrize("group_size, symmetric", [(None, False), (32, True)])
@pytest.mark.parametrize("row_blocks", ["one", "several"])
def test_plain_rounding_is_the_nearest_level_and_reports_the_layer_objective(
    group_size, symmetric, row_blocks, medium_layer, monkeypatch
):
    """Plain rounding works a block of rows at a time (the smallest blocks: 16 rows, six of them)."""
    import hf_comq.solver.comq as comq_module

    if row_blocks == "several":
        monkeypatch.setattr(comq_module, "ROUNDING_BLOCK_BYTES", 1)
    weight, _, hessian = medium_layer
    scale, zero, max_code = _per_column_grid(weight, 3, group_size, symmetric)
    expected = torch.clamp(torch.round(weight / scale) + zero, 0, max_code)

    result = comq_quantize(weight, hessian, bits=3, group_size=group_size, symmetric=symmetric, **ROUND_TO_NEAREST)

    assert torch.equal(result.codes.float(), expected)
    objective = layer_objective(weight, result.dequantize(), hessian)
    assert result.stats["objective"] == [pytest.approx(objective, rel=1e-5)]
    assert result.stats["relative_error"] == pytest.approx(objective / layer_objective(weight, 0 * weight, hessian), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_search", [False, True])
def test_plain_rounding_in_row_blocks_gives_the_codes_and_grid_of_one_block(dtype, scale_search, medium_layer, monkeypatch):
    """Rows are read a block at a time from the weight in its own dtype, each block searching
    its own clipping: the codes, grid and objective are those of the whole layer at once."""
    import hf_comq.solver.comq as comq_module

    weight, _, hessian = medium_layer
    weight = weight.to(dtype)
    settings = dict(init="fp", iterations=0, scale_refit=False, scale_search=scale_search, bits=3, group_size=32)
    whole = comq_quantize(weight, hessian, **settings)
    monkeypatch.setattr(comq_module, "ROUNDING_BLOCK_BYTES", 1)
    blocked = comq_quantize(weight, hessian, **settings)
    assert torch.equal(blocked.codes, whole.codes)
    assert torch.equal(blocked.scale, whole.scale) and torch.equal(blocked.zero_point, whole.zero_point)
    assert blocked.dtype == whole.dtype == dtype
    assert blocked.stats["objective"] == [pytest.approx(whole.stats["objective"][0], rel=1e-5)]


def _ridged(hessian: torch.Tensor, ridge: float) -> torch.Tensor:
    damped = hessian.clone()
    damped.diagonal().add_(ridge * torch.diagonal(hessian).mean())
    return damped


@pytest.mark.parametrize(
    ("group_size", "settings"),
    [(None, {}), (32, {}), (None, ROUND_TO_NEAREST), (None, dict(init="fp", iterations=0))],
    ids=["default", "default g32", "round to nearest", "fp start only"],
)
def test_ridge_solves_the_ridged_objective(group_size, settings, medium_layer):
    """``ridge=r`` is the solver run on ``H + r * mean(diag H) * I``, and what it reports is that
    objective: plain rounding too, so that its stats and a solve's compare."""
    weight, _, hessian = medium_layer
    hessian = hessian.double()
    ridged = comq_quantize(
        weight, hessian, bits=3, group_size=group_size, ridge=0.05, compute_dtype=torch.float64, **settings
    )
    by_hand = comq_quantize(
        weight, _ridged(hessian, 0.05), bits=3, group_size=group_size, compute_dtype=torch.float64, **settings
    )
    assert torch.equal(ridged.codes, by_hand.codes)
    torch.testing.assert_close(ridged.scale, by_hand.scale)
    on_ridged = layer_objective(weight, ridged.dequantize(), _ridged(hessian, 0.05))
    assert ridged.stats["objective"][-1] == pytest.approx(on_ridged, rel=1e-6)  # dequantize() is float32


def test_a_ridge_ends_lower_on_held_out_inputs_when_calibration_is_short():
    """With fewer calibration tokens than twice the inputs, ``H`` is a noisy estimate and
    the plain solve fits its noise; on inputs it never saw, the ridged solve does better."""
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        mixing = torch.randn(128, 128, generator=gen) / 128**0.5 + torch.eye(128)
        calibration, held_out = (torch.randn(n, 128, generator=gen) @ mixing for n in (192, 8192))
        weight = torch.randn(64, 128, generator=gen) * 0.05
        fitted, unseen = calibration.T @ calibration, held_out.T @ held_out
        plain = comq_quantize(weight, fitted, bits=4).dequantize()
        ridged = comq_quantize(weight, fitted, bits=4, ridge=0.1).dequantize()
        assert layer_objective(weight, ridged, unseen) < layer_objective(weight, plain, unseen)
        assert layer_objective(weight, ridged, fitted) > layer_objective(weight, plain, fitted)  # the price


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_ridge_is_validated(bad, medium_layer):
    weight, _, hessian = medium_layer
    with pytest.raises(ValueError, match="ridge: expected a non-negative number"):
        comq_quantize(weight, hessian, ridge=bad)


@pytest.mark.parametrize(
    "group_size, settings",
    [(None, {}), (16, {}), (16, dict(init="rtn")), (None, REFERENCE_CODE)],
)
def test_a_layer_solved_in_row_slices_is_each_slice_solved_on_its_own(medium_layer, monkeypatch, group_size, settings):
    """Rows are independent, so slicing only bounds memory: each slice's codes, grid and
    objective are those of a solve of its rows alone (the same GEMM shapes, to the bit),
    whatever the start (also the reference code's full-precision one and greedy per-row order)."""
    import hf_comq.solver.comq as comq

    weight, _, hessian = medium_layer
    out_features, in_features = weight.shape
    whole = comq_quantize(weight, hessian, bits=3, group_size=group_size, **settings)
    monkeypatch.setattr(comq, "SLICE_TABLE_BYTES", 5 * in_features * 4)  # slices of 5 rows
    assert comq.slice_rows(in_features) == 5 and out_features > 10 and out_features % 5 != 0
    sliced = comq_quantize(weight, hessian, bits=3, group_size=group_size, **settings)
    alone = [comq_quantize(weight[start : start + 5], hessian, bits=3, group_size=group_size, **settings)
             for start in range(0, out_features, 5)]  # fmt: skip
    assert torch.equal(sliced.codes, torch.cat([part.codes for part in alone]))
    assert torch.equal(sliced.scale, torch.cat([part.scale for part in alone]))
    assert torch.equal(sliced.zero_point, torch.cat([part.zero_point for part in alone]))
    objective = layer_objective(weight, sliced.dequantize(), hessian)
    assert objective == pytest.approx(sum(layer_objective(weight[start : start + 5], part.dequantize(), hessian)
                                          for start, part in zip(range(0, out_features, 5), alone)), rel=1e-9)  # fmt: skip
    assert sliced.stats["objective"][-1] == pytest.approx(objective, rel=1e-4)
    assert sliced.stats["relative_error"] == pytest.approx(whole.stats["relative_error"], rel=0.05)
    # the driver's setting: every slice reads the one working H built in the caller's matrix
    in_place = comq_quantize(weight, hessian.clone(), bits=3, group_size=group_size, overwrite_hessian=True, **settings)
    assert torch.equal(in_place.codes, sliced.codes) and torch.equal(in_place.scale, sliced.scale)


def test_slices_hold_a_bounded_table_and_follow_the_shape_alone():
    from hf_comq.solver.comq import SLICE_TABLE_BYTES, slice_rows

    for in_features in (64, 576, 5632, 11008, SLICE_TABLE_BYTES):
        rows = slice_rows(in_features)
        assert rows >= 1
        assert rows == 1 or rows * in_features * 4 <= SLICE_TABLE_BYTES
    assert slice_rows(5632, torch.float64) == slice_rows(5632) // 2
    assert slice_rows(5632, tables=3) == slice_rows(5632) // 3  # the start's stacked grids


def test_every_slice_starts_before_any_sweeps_and_the_start_stacks_a_table_at_most(medium_layer, monkeypatch):
    """The start's in x in factor is gone before the first sweep (the sweeps' and refits'
    tables never sit beside it), and the start, which stacks its grids side by side,
    works on slices that many times narrower than the sweeps' (one table's worth)."""
    import weakref

    import hf_comq.solver.comq as comq

    weight, _, hessian = medium_layer
    out_features, in_features = weight.shape
    monkeypatch.setattr(comq, "SLICE_TABLE_BYTES", 12 * in_features * 4)  # sweeps: 12 rows, start: 4 x 3 grids
    factors, started_columns, swept_columns, factor_alive = [], [], [], []
    plan_error_feedback, error_feedback_start, coordinate_sweep = (
        comq.plan_error_feedback, comq.error_feedback_start, comq.coordinate_sweep
    )

    def planned(*args, **kwargs):
        plan = plan_error_feedback(*args, **kwargs)
        factors.append(weakref.ref(plan.coupling))
        return plan

    def started(weight_t, grid, *args, **kwargs):
        started_columns.append(grid.scale.shape[1])  # every grid's rows side by side
        return error_feedback_start(weight_t, grid, *args, **kwargs)

    def swept(residual_t, *args, **kwargs):
        swept_columns.append(residual_t.shape[1])
        factor_alive.append(factors[0]() is not None)
        return coordinate_sweep(residual_t, *args, **kwargs)

    monkeypatch.setattr(comq, "plan_error_feedback", planned)
    monkeypatch.setattr(comq, "error_feedback_start", started)
    monkeypatch.setattr(comq, "coordinate_sweep", swept)
    sliced = comq_quantize(weight, hessian, bits=4, start_grids=3)
    assert len(factors) == 1 and factor_alive and not any(factor_alive)
    assert started_columns == [12] * (out_features // 4)
    # every slice's first sweep takes all its rows; a later one only those still unsettled
    assert max(swept_columns) == 12 and swept_columns.count(12) >= out_features // 12
    monkeypatch.undo()
    assert torch.equal(sliced.codes, comq_quantize(weight, hessian, bits=4, start_grids=3).codes)


def test_the_widest_threaded_gemm_spans_one_table_of_a_wide_layer():
    from hf_comq.solver.comq import slice_rows, widest_threaded_gemm

    small = widest_threaded_gemm(576, 1536, start_grids=3)
    assert small == 2.0 * 128 * 3 * 576 * 1536  # one slice: every start grid side by side over all rows
    wide = widest_threaded_gemm(2048, 5632, start_grids=3)
    assert 0.9 * 2.0 * 128 * slice_rows(5632) * 5632 <= wide <= 2.0 * 128 * slice_rows(5632) * 5632


@pytest.mark.parametrize("shape", [(5, 1), (36, 1), (1, 1), (7, 3)], ids=lambda shape: f"{shape[0]}x{shape[1]}")
def test_the_narrowest_layers_quantize_with_the_defaults(shape):
    """A layer of one input feature (a time-series model's value embedding) took a stride-dependent
    view of its start's state and failed; it quantizes as any other, no worse than rounding."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator)
    inputs = torch.randn(64, shape[1], generator=generator)
    hessian = inputs.T @ inputs
    quantized = comq_quantize(weight, hessian, bits=4)
    assert quantized.codes.shape == shape
    assert layer_objective(weight, quantized.dequantize(), hessian) <= _rtn_objective(weight, hessian, 4) * (1 + 1e-6)


def test_objectives_of_a_rank_deficient_layer_are_never_below_zero():
    """One calibration token: the objective is near zero, summed in float32 it came out slightly negative."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, generator=generator)
    token = torch.randn(1, 32, generator=generator)
    for bits in (2, 3, 4):
        stats = comq_quantize(weight, token.T @ token, bits=bits).stats
        assert min(stats["objective"]) >= 0.0 and stats["relative_error"] >= 0.0
