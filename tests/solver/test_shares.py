"""One layer solved by several workers, a share of its rows each: the codes and stats of one solve."""

from __future__ import annotations

import threading

import pytest
import torch

from hf_comq import comq_quantize
from hf_comq.solver import REFERENCE_CODE, RowShare, can_share_rows, joined_shares, shared_rows
from hf_comq.solver.shares import SHARE_ALIGN, share_bounds


class SharesOnThreads:
    """The sums of ``count`` shares solved on threads (``total(index)``: share ``index``'s
    :attr:`RowShare.total`), as an all-reduce would make them; a share that never comes to a
    sum fails the others' wait after a minute rather than hang the suite."""

    def __init__(self, count: int):
        self._barrier = threading.Barrier(count, timeout=60)
        self._posted: list[torch.Tensor | None] = [None] * count

    def total(self, index: int):
        def total(values: list[float]) -> list[float]:
            self._posted[index] = torch.tensor(values, dtype=torch.float64)
            self._barrier.wait()
            summed = torch.stack(self._posted).sum(0).tolist()
            self._barrier.wait()  # nobody posts its next values before every share has read these
            return summed

        return total


def solve_in_shares(weight: torch.Tensor, hessian: torch.Tensor, count: int, **settings) -> list:
    """Each worker's result (or the error it raised), the workers on threads, each with its rows of ``weight``."""
    out_features, in_features = weight.shape
    sums = SharesOnThreads(count)
    results: list = [None] * count

    def work(index: int) -> None:
        rows = shared_rows(out_features, in_features, index, count)
        share = RowShare(index, count, out_features, sums.total(index))
        try:
            results[index] = comq_quantize(torch.cat([weight[span] for span in rows]), hessian.clone(), share=share, **settings)
        except ValueError as error:
            results[index] = error

    threads = [threading.Thread(target=work, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _whole(results: list, out_features: int, in_features: int, field: str) -> torch.Tensor:
    count = len(results)
    joined = joined_shares(results, [shared_rows(out_features, in_features, index, count) for index in range(count)])
    return getattr(joined, field)


SETTINGS = [
    dict(bits=4),
    dict(bits=3, group_size=16),
    dict(bits=2),  # the scale refit after every sweep
    dict(bits=4, **REFERENCE_CODE),  # the full-precision start and greedy per-row orders
    dict(bits=4, init="rtn", iterations=0, scale_search=False),  # plain rounding: no sweeps at all
]


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda settings: "-".join(f"{k}={v}" for k, v in settings.items()))
def test_rows_solved_in_shares_take_the_codes_grid_and_stats_of_one_solve(medium_layer, settings, count):
    """Each share stops where the whole layer does (the sweeps' stop and the rows gathered apart
    follow sums over every share), so the codes are one solve's to the bit, and each share
    reports the whole layer's objective history.  The objective, and the scales a refit makes, are
    equal to 1e-6 relative, not to the bit: a row's float32 sums are taken in blocks of the
    share's width rather than the slice's."""
    weight, _, hessian = medium_layer
    out_features, in_features = weight.shape
    one = comq_quantize(weight, hessian.clone(), **settings)
    results = solve_in_shares(weight, hessian, count, **settings)
    assert torch.equal(_whole(results, out_features, in_features, "codes"), one.codes)
    assert torch.equal(_whole(results, out_features, in_features, "zero_point"), one.zero_point)
    # a refit scale (2 bits) is a ratio of per-row sums, rounded as those are
    torch.testing.assert_close(_whole(results, out_features, in_features, "scale"), one.scale, rtol=1e-6, atol=0)
    for result in results:
        assert result.stats["objective"] == pytest.approx(one.stats["objective"], rel=1e-6)
        assert result.stats["relative_error"] == pytest.approx(one.stats["relative_error"], rel=1e-6)


def test_a_layer_of_several_slices_is_shared_slice_by_slice(medium_layer, monkeypatch):
    """Each worker takes its share of every slice, and every slice stops as it does in one solve."""
    import hf_comq.solver.comq as comq

    weight, _, hessian = medium_layer
    out_features, in_features = weight.shape
    monkeypatch.setattr(comq, "SLICE_TABLE_BYTES", 36 * in_features * 4)  # slices of 36, 36 and 24 rows
    assert [(span.start, span.stop) for span in shared_rows(out_features, in_features, 1, 2)] == [(16, 36), (52, 72), (88, 96)]
    assert can_share_rows(out_features, in_features, 2) and not can_share_rows(out_features, in_features, 3)
    one = comq_quantize(weight, hessian.clone(), bits=3)
    results = solve_in_shares(weight, hessian, 2, bits=3)
    assert torch.equal(_whole(results, out_features, in_features, "codes"), one.codes)
    assert results[0].stats["objective"] == pytest.approx(one.stats["objective"], rel=1e-6)


def test_shares_cover_a_slice_in_nearly_equal_aligned_parts():
    for rows in (32, 33, 576, 1000, 5632):
        for count in (2, 3, 4):
            bounds = share_bounds(rows, count)
            assert bounds[0] == 0 and bounds[-1] == rows and bounds == sorted(bounds)
            assert all(bound % SHARE_ALIGN == 0 for bound in bounds[:-1])
            sizes = [b - a for a, b in zip(bounds, bounds[1:])]
            assert max(sizes) - min(sizes) <= 2 * SHARE_ALIGN
    assert can_share_rows(576, 1536, 2) and not can_share_rows(16, 1536, 2) and not can_share_rows(576, 1536, 1)


def test_a_non_finite_weight_in_one_share_stops_every_share_with_the_same_line(medium_layer):
    """No worker may go on to the next sum while another raised: they would wait for it forever."""
    weight, _, hessian = medium_layer
    weight = weight.clone()
    weight[-1, 0] = float("nan")  # the last share's rows only
    errors = solve_in_shares(weight, hessian, 2, bits=4)
    assert all(isinstance(error, ValueError) for error in errors)
    assert {str(error) for error in errors} == {"weight contains NaN or inf; quantize a checkpoint with finite weights"}


def test_a_share_given_other_rows_than_its_own_is_refused(medium_layer):
    weight, _, hessian = medium_layer
    share = RowShare(0, 2, weight.shape[0], total=lambda values: values)
    with pytest.raises(ValueError, match="a row share needs its rows of every slice"):
        comq_quantize(weight, hessian, share=share)

