import pytest
import torch

from hf_comq.solver.grid import minmax_grid, search_shrink


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
