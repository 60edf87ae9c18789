import pytest
import torch

from hf_comq.kernels import DISABLE_ENV_VAR
from hf_comq.kernels.solver_ops import compiled_solver_ops
from hf_comq.solver.grid import ColumnGrid, clipping_errors, minmax_grid, search_shrink
from tests.solver.kernel_paths import both_paths, require_kernel
from tests.solver.reference import rounded_layer


def test_asymmetric_minmax_grid_by_hand():
    weight = torch.tensor([[-1.0, 0.5, 2.0, 0.0], [0.2, 0.4, 0.6, 0.8]])
    grid = minmax_grid(weight, bits=2, group_size=4)
    # row 0: range [-1, 2] -> scale 1, zero 1; row 1: range [0, 0.8] (0 included) -> scale 0.8/3, zero 0
    assert torch.allclose(grid.scale.squeeze(1), torch.tensor([1.0, 0.8 / 3]))
    assert torch.equal(grid.zero_point.squeeze(1), torch.tensor([1.0, 0.0]))
    assert grid.max_code == 3


def test_group_grid_shapes_and_per_column_expansion():
    weight = torch.randn(3, 8)
    grid = minmax_grid(weight, bits=4, group_size=4)
    assert grid.scale.shape == (3, 2)
    scale, zero = grid.per_column()
    assert scale.shape == (3, 8) and torch.equal(scale[:, :4], grid.scale[:, :1].expand(3, 4))


def test_symmetric_grid_covers_absmax():
    weight = torch.tensor([[-3.0, 1.0]])
    grid = minmax_grid(weight, bits=4, group_size=2, symmetric=True)
    assert float(grid.zero_point) == 8.0
    assert float(grid.scale) == pytest.approx(6.0 / 15)


def test_shrink_search_prefers_clipping_a_lone_outlier():
    torch.manual_seed(0)
    weight = torch.randn(4, 64) * 0.1
    weight[:, 0] = 5.0  # one huge outlier per row on a column with almost no input energy
    diag = torch.ones(64)
    diag[0] = 1e-6
    shrink = search_shrink(weight, diag, bits=3, group_size=64, symmetric=False, candidates=20, min_shrink=0.5)
    assert (shrink < 1.0).all()
    uniform = search_shrink(torch.linspace(-1, 1, 64).repeat(2, 1), torch.ones(64), 4, 64, False, 20, 0.5)
    assert (uniform >= 0.9).all()


@pytest.mark.parametrize("group_size", [64, 128])
def test_stacked_search_equals_one_search_per_weighting(group_size):
    """Several column weightings searched together give each one's own result."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 128, generator=gen)
    weightings = torch.rand(3, 128, generator=gen) + 0.1
    stacked = search_shrink(weight, weightings, bits=3, group_size=group_size, symmetric=False, candidates=12, min_shrink=0.3)
    assert stacked.shape == (3, 24, 128 // group_size)
    for k in range(3):
        single = search_shrink(weight, weightings[k], bits=3, group_size=group_size, symmetric=False, candidates=12, min_shrink=0.3)
        torch.testing.assert_close(stacked[k], single)


def _candidate_grids(weight, bits, group_size, candidates=16, min_shrink=0.25):
    """The grids :func:`search_shrink` tries, for calling its error table directly."""
    ratios = torch.linspace(1.0, min_shrink, candidates).tolist()
    return [minmax_grid(weight, bits, group_size, shrink=ratio) for ratio in ratios]


def _errors_by_hand(weight, col_weights, grids):
    """``errors[c, k, r, g]`` entry by entry in float64: the definition, no shortcuts."""
    weight, col_weights = weight.double(), col_weights.double()
    out_features, in_features = weight.shape
    group_size = grids[0].group_size
    errors = torch.zeros(len(grids), col_weights.shape[0], out_features, in_features // group_size, dtype=torch.float64)
    for c, grid in enumerate(grids):
        for r in range(out_features):
            for g in range(in_features // group_size):
                scale, zero = float(grid.scale[r, g]), float(grid.zero_point[r, g])
                columns = slice(g * group_size, (g + 1) * group_size)
                values = weight[r, columns] / scale + zero
                offsets = values.round().clamp(0, grid.max_code) - values
                errors[c, :, r, g] = scale**2 * (col_weights[:, columns] * offsets**2).sum(dim=1)
    return errors


@pytest.mark.parametrize("kernel", ["compiled", "torch"])
@pytest.mark.parametrize(("in_features", "group_size", "weightings"), [(24, 24, 1), (39, 13, 2), (64, 16, 5)])
def test_the_error_table_of_the_clipping_search_against_its_definition(
    monkeypatch, kernel, in_features, group_size, weightings
):
    """Both paths, group sizes that are and are not multiples of eight, more weightings than
    the compiled pass sums at once: each error as its definition gives it, to float32 rounding."""
    if kernel == "compiled":
        require_kernel()
        monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(DISABLE_ENV_VAR, "1")
    gen = torch.Generator().manual_seed(in_features)
    weight = torch.randn(11, in_features, generator=gen)
    col_weights = torch.rand(weightings, in_features, generator=gen) + 0.05
    grids = _candidate_grids(weight, bits=3, group_size=group_size)
    errors = clipping_errors(weight, col_weights, grids)
    assert errors.dtype == torch.float32 and errors.shape == (16, weightings, 11, in_features // group_size)
    torch.testing.assert_close(errors.double(), _errors_by_hand(weight, col_weights, grids), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("group_size", [None, 64])
def test_the_compiled_clipping_search_picks_the_torch_searchs_clipping(monkeypatch, group_size):
    """The compiled pass adds each group's sums in its own order, torch's GEMM in another:
    the errors agree to float32 rounding, and a row picks another clipping only where two
    candidates were within that rounding of each other."""
    require_kernel()
    layer = rounded_layer(256, 192, 512, seed=7, group_size=group_size)
    weight, size = layer.weight.float(), group_size or 192
    weightings = torch.stack([layer.hessian.diagonal().float(), torch.rand(192, generator=torch.Generator().manual_seed(1))])
    grids = _candidate_grids(weight, bits=3, group_size=size)
    compiled, in_torch = both_paths(monkeypatch, lambda: clipping_errors(weight, weightings, grids))
    torch.testing.assert_close(compiled, in_torch, rtol=2e-5, atol=0)
    picked, picked_torch = compiled.argmin(dim=0), in_torch.argmin(dim=0)
    apart = picked != picked_torch
    assert apart.float().mean() <= 0.01
    best_torch = in_torch.min(dim=0).values
    assert (in_torch.gather(0, picked.unsqueeze(0)).squeeze(0)[apart] <= best_torch[apart] * (1 + 2e-5)).all()
    shrink, shrink_torch = both_paths(
        monkeypatch, lambda: search_shrink(weight, weightings, 3, size, False, 16, 0.25)
    )
    assert (shrink != shrink_torch).float().mean() <= 0.01


def test_the_compiled_clipping_search_gives_each_row_the_errors_it_has_alone(monkeypatch):
    """Rows are independent: spread over two threads, each row's errors are, bit for bit,
    those of the search on that row alone."""
    require_kernel()
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    gen = torch.Generator().manual_seed(4)
    weight, weightings = torch.randn(37, 48, generator=gen), torch.rand(2, 48, generator=gen)
    grids = _candidate_grids(weight, bits=3, group_size=16)
    monkeypatch.setattr("hf_comq.threads.MIN_PARALLEL_ROW_ENTRIES", 1)  # 37 rows share the two threads
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        errors = clipping_errors(weight, weightings, grids)
    finally:
        torch.set_num_threads(threads)
    for row in range(37):
        alone = clipping_errors(weight[row : row + 1], weightings, [grid.rows(slice(row, row + 1)) for grid in grids])
        assert torch.equal(errors[:, :, row : row + 1], alone)


def test_the_avx2_and_the_plain_build_of_the_clipping_search_give_the_same_errors(monkeypatch):
    """Both builds add a group's entries into the same eight partial sums and those in one
    order: the same errors, bit for bit, tails past a multiple of eight included."""
    require_kernel()
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(29, 87, generator=gen)
    weightings = torch.rand(6, 87, generator=gen)
    grids = _candidate_grids(weight, bits=2, group_size=29)
    scales = torch.stack([grid.scale for grid in grids])
    zeros = torch.stack([grid.zero_point for grid in grids])
    ops = compiled_solver_ops([weight, weightings])
    tables = {}
    for isa in ("avx2", "scalar"):
        try:
            tables[isa] = ops.clip_errors(weight, weightings, scales, zeros, 3, isa)
        except RuntimeError as error:  # the kernel's own rule: no AVX2 build, or a CPU without AVX2
            if "lacks AVX2" not in str(error):
                raise
            pytest.skip("this CPU or build has no AVX2 pass: only the plain build runs here")
    assert torch.equal(tables["avx2"], tables["scalar"])


def test_the_compiled_clipping_search_refuses_tables_that_do_not_fit(monkeypatch):
    require_kernel()
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    weight, weightings = torch.randn(4, 12), torch.rand(1, 12)
    ops = compiled_solver_ops([weight, weightings])
    scales, zeros = torch.ones(3, 4, 5), torch.zeros(3, 4, 5)
    with pytest.raises(RuntimeError, match="do not split into 5 groups"):
        ops.clip_errors(weight, weightings, scales, zeros, 15)
    with pytest.raises(RuntimeError, match="zeros must be 3 x 4 x 2"):
        ops.clip_errors(weight, weightings, torch.ones(3, 4, 2), torch.zeros(3, 4, 3), 15)


@pytest.mark.parametrize("width", [1, 37, 300])
def test_group_wise_values_are_scale_times_code_minus_zero_on_both_paths(monkeypatch, width):
    """A group-wise grid's values, columns in a shuffled (act-order-like) order: the compiled
    pass and the torch gathers give ``scale * (code - zero)`` of each column's group, bit for bit."""
    require_kernel()
    generator = torch.Generator().manual_seed(width)
    n_columns, n_groups = 48, 6
    groups = (torch.randperm(n_columns, generator=generator) // (n_columns // n_groups)).tolist()
    grid = ColumnGrid(
        scale=torch.rand(n_groups, width, generator=generator) + 0.01,
        zero=torch.randint(0, 16, (n_groups, width), generator=generator).float(),
        groups=groups,
    )
    codes = torch.randint(0, 16, (n_columns, width), generator=generator).float()
    index = torch.tensor(groups)
    expected = (codes - grid.zero[index]) * grid.scale[index]
    compiled, in_torch = both_paths(monkeypatch, lambda: grid.dequantize(codes, out=torch.full_like(codes, float("nan"))))
    assert torch.equal(compiled, expected) and torch.equal(in_torch, expected)


def test_the_compiled_group_wise_values_refuse_a_group_out_of_range():
    require_kernel()
    grid = ColumnGrid(scale=torch.ones(2, 3), zero=torch.zeros(2, 3), groups=[0, 2])
    with pytest.raises(RuntimeError, match="out of range"):
        grid.dequantize(torch.zeros(2, 3), out=torch.empty(2, 3))
