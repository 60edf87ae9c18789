"""The pair-move pass against brute force on X, and its place in the solver."""

import itertools

import pytest
import torch

from hf_comq import COMQConfig, comq_quantize, layer_objective
from hf_comq.kernels import DISABLE_ENV_VAR, compiled_solver_ops
from hf_comq.solver.grid import ColumnGrid, Grid
from hf_comq.solver import pair_moves as pair_moves_module
from hf_comq.solver.pair_moves import MAX_ROUNDS, MIN_RELATIVE_GAIN, pair_move_pass
from tests.solver.kernel_paths import assert_same_solution, both_paths, require_kernel
from tests.solver.reference import rounded_layer


def _run_pass(
    layer, candidates: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The pass from the layer's rounded start, on the solver's transposed tables in ``dtype``;
    returns codes and values (out x in, float64), residual_t and the moves made."""
    residual_t, values_t, codes_t, hessian, grid = _pass_tables(layer, dtype)
    outcome = pair_move_pass(residual_t, values_t, codes_t, hessian, grid, layer.grid.max_code, candidates)
    assert not outcome.capped.any()  # these small layers settle well within the round limit
    return codes_t.T.double(), values_t.T.double(), residual_t, outcome.moves


def _pass_tables(layer, dtype: torch.dtype) -> list:
    """The pass's arguments for the layer's rounded start: residual, values, codes (all
    ``in x out``), H and the grid (one row of scales per group), in ``dtype``."""
    weight, hessian, start = layer.weight.to(dtype), layer.hessian.to(dtype), layer.values.to(dtype)
    residual_t = hessian @ (weight - start).T
    codes_t, values_t = layer.codes.to(dtype).T.contiguous(), start.T.contiguous()
    groups = [column // layer.grid.group_size for column in range(weight.shape[1])]
    grid = ColumnGrid(layer.grid.scale.to(dtype).T.contiguous(), layer.grid.zero_point.to(dtype).T.contiguous(), groups)
    return [residual_t, values_t, codes_t, hessian, grid]


def _rows_of(grid: ColumnGrid, rows: slice) -> ColumnGrid:
    """The grid of some output rows only (copies)."""
    return ColumnGrid(grid.scale[:, rows].clone(), grid.zero[:, rows].clone(), grid.groups)


def _row_objective_on_x(inputs: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float(((inputs @ (w - wq)) ** 2).sum())


def _best_move_on_x(inputs, w, codes, scale, zero, max_code) -> float:
    """The largest decrease of one row's ``||X (w - wq)||^2`` that any one code step
    or any two code steps (each +-1, staying on the grid) reach, by trying them all."""
    def objective(c):
        return _row_objective_on_x(inputs, w, scale * (c - zero))

    now = objective(codes)
    best = 0.0
    n = codes.numel()
    steps = [(j, d) for j in range(n) for d in (-1.0, 1.0) if 0 <= codes[j] + d <= max_code]
    for (j, d) in steps:
        trial = codes.clone()
        trial[j] += d
        best = max(best, now - objective(trial))
    for (j, d), (k, e) in itertools.combinations(steps, 2):
        if j == k:
            continue
        trial = codes.clone()
        trial[j] += d
        trial[k] += e
        best = max(best, now - objective(trial))
    return best


def _assert_no_step_helps_on_x(layer, codes: torch.Tensor, values: torch.Tensor, tolerance: float) -> None:
    """Codes on the grid, no row's ``||X (w - wq)||^2`` above its start's, and no single
    or pair step left that lowers it by more than ``tolerance`` of it (brute force on X)."""
    assert bool(((codes >= 0) & (codes <= layer.grid.max_code)).all())
    for row in range(codes.shape[0]):
        after = _row_objective_on_x(layer.inputs, layer.weight[row], values[row])
        assert after <= _row_objective_on_x(layer.inputs, layer.weight[row], layer.values[row])
        left = _best_move_on_x(
            layer.inputs, layer.weight[row], codes[row], layer.scale[row], layer.zero[row], layer.grid.max_code
        )
        assert left <= tolerance * after


@pytest.mark.parametrize("group_size", [None, 4])
def test_with_every_candidate_no_single_or_pair_step_helps_any_row_on_x(group_size):
    layer = rounded_layer(6, 12, 64, seed=5, group_size=group_size)
    codes, values, residual_t, moves = _run_pass(layer, candidates=12)

    assert moves > 0
    torch.testing.assert_close(values, layer.scale * (codes - layer.zero))  # on the grid it reports
    torch.testing.assert_close(residual_t, layer.hessian @ (layer.weight - values).T)  # stays exact
    _assert_no_step_helps_on_x(layer, codes, values, tolerance=1e-9)


@pytest.mark.parametrize("group_size", [None, 4])
def test_the_compiled_pass_leaves_no_single_or_pair_step_that_helps_on_x(monkeypatch, group_size):
    """The kernel's pass (float32 tables on CPU) against the same brute force.  In float32
    a move must gain more than the residual's rounding, so what a row may have left is
    bounded at 1e-4 of its objective rather than the float64 pass's 1e-9."""
    require_kernel()
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    assert compiled_solver_ops([torch.zeros(12, 6)], torch.zeros(12, 12)) is not None  # float32 tables take the kernel
    layer = rounded_layer(6, 12, 64, seed=5, group_size=group_size)
    codes, values, residual_t, moves = _run_pass(layer, candidates=12, dtype=torch.float32)

    assert moves > 0
    torch.testing.assert_close(values, layer.scale * (codes - layer.zero), rtol=1e-6, atol=1e-6)
    expected = layer.hessian.float() @ (layer.weight.float() - values.float()).T
    torch.testing.assert_close(residual_t, expected, rtol=1e-4, atol=1e-4)
    _assert_no_step_helps_on_x(layer, codes, values, tolerance=1e-4)


def test_the_compiled_pass_moves_every_row_as_it_would_alone(monkeypatch):
    """Rows are independent: on two threads, with rows gathered in tiles (37 rows: two
    full tiles of 16 and a partial one), each row ends exactly where the pass on that
    row alone leaves it."""
    require_kernel()
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    layer = rounded_layer(37, 24, 96, seed=3, group_size=8)
    residual_t, values_t, codes_t, hessian, grid = whole = _pass_tables(layer, torch.float32)
    max_code = layer.grid.max_code
    tables = (residual_t, values_t, codes_t)
    alone = [[table[:, row : row + 1].clone() for table in tables] for row in range(37)]
    monkeypatch.setattr("hf_comq.threads.MIN_PARALLEL_ROW_ENTRIES", 1)  # 37 rows share the two threads
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        moves = pair_move_pass(*whole, max_code, 12).moves
    finally:
        torch.set_num_threads(threads)

    moves_alone = 0
    for row, (residual, values, codes) in enumerate(alone):
        moves_alone += pair_move_pass(
            residual, values, codes, hessian, _rows_of(grid, slice(row, row + 1)), max_code, 12
        ).moves
        for table, own in ((residual_t, residual), (values_t, values), (codes_t, codes)):
            assert torch.equal(table[:, row : row + 1], own)
    assert moves == moves_alone > 37


@pytest.mark.parametrize("compiled", [True, False])
def test_the_rows_the_round_limit_stops_are_the_ones_left_to_move(monkeypatch, compiled):
    """A row reported as capped moved in every allowed round; every other row is settled:
    a second pass with rounds to spare moves capped rows only."""
    if compiled:
        require_kernel()
        monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(DISABLE_ENV_VAR, "1")
    layer = rounded_layer(37, 48, 256, seed=6, group_size=16)
    residual_t, values_t, codes_t, hessian, grid = tables = _pass_tables(layer, torch.float32)
    monkeypatch.setattr(pair_moves_module, "MAX_ROUNDS", 8)  # about half the rows need more
    first = pair_move_pass(*tables, layer.grid.max_code, 12)
    assert first.capped.dtype == torch.bool and first.capped.shape == (37,)
    assert 0 < int(first.capped.sum()) < 37

    monkeypatch.setattr(pair_moves_module, "MAX_ROUNDS", MAX_ROUNDS)
    before = codes_t.clone()
    second = pair_move_pass(*tables, layer.grid.max_code, 12)
    moved = (codes_t != before).any(0)
    assert moved.any() and not moved[~first.capped].any()
    assert not second.capped.any()


def _assert_every_build_moves_alike(tables: list, grid, max_code: int, candidates: int) -> None:
    """The compiled pass's vector builds (AVX2, and AVX-512 where the CPU has it) and its
    plain build from the same tables (residual, values, codes, H): the same moves and the
    same tables after, bit for bit."""
    require_kernel()
    ops = compiled_solver_ops(tables[:3] + [grid.scale], tables[3])
    rows = tables[0].shape[1]
    ends = {}
    for isa in ("scalar", "avx2", "avx512"):
        run_tables = [table.clone() for table in tables]
        residual_t, values_t, codes_t, hessian = run_tables
        capped = torch.zeros(rows, dtype=torch.bool)
        try:
            moves = ops.pair_moves(residual_t, values_t, codes_t, hessian, grid.scale, grid.group_index("cpu"), capped,
                                   max_code, candidates, MAX_ROUNDS, MIN_RELATIVE_GAIN, isa)  # fmt: skip
        except RuntimeError as error:  # the kernel's own rule: no such build, or a CPU without its instructions
            if "CPU or build lacks" not in str(error):
                raise
            continue
        ends[isa] = (moves, [*run_tables, capped])
    if len(ends) == 1:
        pytest.skip("this CPU or build has no vector pass: only the plain build runs here")
    moves, plain_tables = ends.pop("scalar")
    assert moves > rows
    for vector_moves, vector_tables in ends.values():
        assert vector_moves == moves
        for table, vector_table in zip(plain_tables, vector_tables):
            assert torch.equal(table, vector_table)


@pytest.mark.parametrize(
    ("width", "candidates", "group_size"),
    [(96, 12, None), (96, 12, 16), (100, 32, None), (100, 32, 20), (203, 40, None), (300, 100, None)],
)
def test_the_vector_and_the_plain_builds_of_the_compiled_pass_make_the_same_moves(
    monkeypatch, width, candidates, group_size
):
    """Every build rounds every product and sum on its own, in wider or narrower registers,
    and picks, ranks and pairs the candidates by the same rules (the vector builds eight or
    sixteen at a time, masking what lies past a row's end, its candidates' end or a short
    list's end: widths and candidate counts that are not multiples of eight or sixteen; a
    short list too long to rank by counting at 100 candidates of 300): the same moves, bit
    for bit, whichever the CPU runs."""
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    layer = rounded_layer(37, width, 256, seed=5, group_size=group_size)
    *tables, grid = _pass_tables(layer, torch.float32)
    _assert_every_build_moves_alike(tables, grid, layer.grid.max_code, candidates)


@pytest.mark.parametrize(("width", "candidates"), [(100, 32), (203, 12)])
def test_every_build_breaks_ties_between_equal_costs_alike(monkeypatch, width, candidates):
    """Small-integer inputs, unit scales and weights half a step off the grid make every
    single step's cost a small integer, so most candidates tie with others: which of
    them a row keeps, and in what order it scans their pairs, decides its moves.  The
    vector builds rank a short list by counting and the plain one by sorted insertion;
    all put the lower column first on equal costs."""
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    generator = torch.Generator().manual_seed(11)
    rows, max_code = 29, 7
    inputs = torch.randint(-1, 2, (3 * width, width), generator=generator).float()
    hessian = inputs.T @ inputs
    codes_t = torch.randint(1, max_code, (width, rows), generator=generator).float()
    zero = torch.full((1, rows), 4.0)
    values_t = codes_t - zero
    weight_t = values_t + 0.5 * torch.randint(-1, 2, (width, rows), generator=generator).float()
    residual_t = hessian @ (weight_t - values_t)
    grid = ColumnGrid(torch.ones(1, rows), zero, [0] * width)
    tied = torch.unique(residual_t, return_counts=True)[1]
    assert int(tied.max()) > 10  # the costs tie indeed
    _assert_every_build_moves_alike([residual_t, values_t, codes_t, hessian], grid, max_code, candidates)


def test_the_compiled_pass_refuses_a_group_index_outside_its_scale_table_and_a_wrong_capped_table(monkeypatch):
    require_kernel()
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    *tables, grid = _pass_tables(rounded_layer(5, 16, 64, seed=1, group_size=8), torch.float32)
    ops = compiled_solver_ops(tables[:3] + [grid.scale], tables[3])
    for group_of, message in ((torch.full((16,), 2), "out of range"), (torch.zeros(15, dtype=torch.long), "per column")):
        with pytest.raises(RuntimeError, match=message):
            ops.pair_moves(*tables, grid.scale, group_of, torch.zeros(5, dtype=torch.bool), 7, 4, MAX_ROUNDS,
                           MIN_RELATIVE_GAIN)
    for capped in (torch.zeros(4, dtype=torch.bool), torch.zeros(5, dtype=torch.uint8)):  # a row short; not bool
        with pytest.raises(RuntimeError, match="capped must be"):
            ops.pair_moves(*tables, grid.scale, grid.group_index("cpu"), capped, 7, 4, MAX_ROUNDS, MIN_RELATIVE_GAIN)


@pytest.mark.parametrize("group_size", [None, 32])
def test_a_solve_with_pair_moves_is_the_same_with_and_without_the_kernel(monkeypatch, medium_layer, group_size):
    require_kernel()
    weight, _, hessian = medium_layer
    settings = dict(bits=3, group_size=group_size, pair_moves=16)
    compiled, in_torch = both_paths(monkeypatch, lambda: comq_quantize(weight, hessian, **settings))
    objectives = [layer_objective(weight, result.dequantize(), hessian) for result in (compiled, in_torch)]
    assert_same_solution(compiled.codes, in_torch.codes, *objectives)


def test_a_pair_move_reaches_the_optimum_where_single_steps_are_stuck():
    # Two nearly identical inputs: the output sees w_0 + w_1 strongly and w_0 - w_1
    # weakly.  The errors (0.6, -0.6) (in grid steps) cancel in the sum; stepping
    # either code alone spoils the sum, stepping both (+1, -1) shrinks the weak part.
    torch.manual_seed(0)
    base = torch.randn(256, 1, dtype=torch.float64)
    inputs = torch.cat([base, base + 0.05 * torch.randn_like(base), torch.randn_like(base)], 1)
    hessian = inputs.T @ inputs
    weight = torch.tensor([[0.6, -0.6, 0.0]], dtype=torch.float64)
    grid = Grid(scale=torch.ones(1, 1, dtype=torch.float64), zero_point=torch.full((1, 1), 4.0, dtype=torch.float64),
                bits=3, group_size=3)

    def objective(codes: torch.Tensor) -> float:
        return layer_objective(weight, codes - 4.0, hessian)

    codes = torch.full((1, 3), 4.0, dtype=torch.float64)
    for j, d in itertools.product(range(3), (-1.0, 1.0)):
        single = codes.clone()
        single[0, j] += d
        assert objective(single) > objective(codes)  # a sweep would stop here
    optimum = min(objective(torch.tensor([c], dtype=torch.float64)) for c in itertools.product(range(8), repeat=3))
    assert objective(codes) > optimum

    values = codes - 4.0
    residual_t = hessian @ (weight - values).T
    codes_t, values_t = codes.T.contiguous(), values.T.contiguous()
    column_grid = ColumnGrid.of([grid], [0, 0, 0])
    outcome = pair_move_pass(residual_t, values_t, codes_t, hessian, column_grid, grid.max_code, 3)

    assert outcome.moves == 1 and not outcome.capped.any()
    assert torch.equal(codes_t.T, torch.tensor([[5.0, 3.0, 4.0]], dtype=torch.float64))
    assert objective(codes_t.T) == pytest.approx(optimum)


@pytest.mark.parametrize("group_size", [None, 32])
def test_pair_moves_never_raise_the_solvers_objective(group_size, medium_layer):
    weight, _, hessian = medium_layer
    for bits in (2, 4):
        common = dict(bits=bits, group_size=group_size, compute_dtype=torch.float64)
        without = comq_quantize(weight, hessian, pair_moves=0, **common)
        with_pass = comq_quantize(weight, hessian, pair_moves=16, **common)
        assert with_pass.stats["objective"][0] == without.stats["objective"][0]  # same start
        assert with_pass.stats["objective"][-1] < without.stats["objective"][-1]
        assert with_pass.stats["objective"][-1] == pytest.approx(
            layer_objective(weight, with_pass.dequantize(), hessian), rel=1e-6
        )


@pytest.mark.parametrize("bad", [-1, 1.5, True, "32"])
def test_pair_moves_is_validated_in_the_solver_and_the_config(bad, small_layer):
    weight, inputs = small_layer
    hessian = inputs.T @ inputs
    with pytest.raises(ValueError, match="pair_moves"):
        comq_quantize(weight, hessian, pair_moves=bad)
    with pytest.raises(ValueError, match="pair_moves"):
        COMQConfig(pair_moves=bad)
