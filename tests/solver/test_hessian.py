"""HessianAccumulator against a plain float64 X^T X."""

import threading
import time

import pytest
import torch

from hf_comq.solver import HessianAccumulator, NonFiniteActivations, TargetProductAccumulator, target_product_from_outputs
from hf_comq.solver.hessian import SHRINKAGE_FLOOR
from tests.solver.reference import ledoit_wolf_ridge


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
    with pytest.raises(ValueError, match="NaN or inf"):  # infinities whose sum is NaN, not inf
        acc.add(torch.tensor([[float("inf"), float("-inf"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="in_features=4"):
        acc.add(torch.ones(2, 5))
    aimed = HessianAccumulator(4, with_target=True)
    with pytest.raises(NonFiniteActivations, match="NaN or inf") as target:
        aimed.add(torch.ones(2, 4), torch.full((2, 4), float("inf")))
    assert target.value.values == "full-precision inputs"
    with pytest.raises(ValueError, match="no activations"):
        acc.result()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("contiguous", [True, False])
def test_triangle_in_row_blocks_gives_the_symmetric_gram_matrix(monkeypatch, dtype, contiguous):
    """Only the upper triangle is summed, a block of rows at a time; the block size
    (chosen to bound memory) moves no entry by more than float32 rounding, and the
    result is exactly symmetric."""
    import hf_comq.solver.hessian as hessian_module

    gen = torch.Generator().manual_seed(1)
    width = 200
    batches = [torch.randn(width, 70, generator=gen).T if not contiguous else torch.randn(70, width, generator=gen)
               for _ in range(3)]  # fmt: skip
    monkeypatch.setattr(hessian_module, "TRIANGLE_BLOCKS", 1)  # one block: the whole square
    whole = HessianAccumulator(width, dtype=dtype)
    for batch in batches:
        whole.add(batch)
    monkeypatch.setattr(hessian_module, "GRAM_BLOCK_BYTES", 1)  # blocks of MIN_BLOCK_ROWS rows: 4 of them
    blocked = HessianAccumulator(width, dtype=dtype)
    for batch in batches:
        blocked.add(batch)
    rows = torch.cat(batches).double()
    for accumulator in (whole, blocked):
        result = accumulator.result()
        assert torch.equal(result, result.T)
        torch.testing.assert_close(result.double(), rows.T @ rows, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(blocked.result(), whole.result(), rtol=1e-6, atol=1e-4)


def test_partial_sums_are_the_upper_triangle_and_end_with_the_hand_over(monkeypatch):
    import hf_comq.solver.hessian as hessian_module

    monkeypatch.setattr(hessian_module, "GRAM_BLOCK_BYTES", 1)  # blocks of MIN_BLOCK_ROWS rows
    gen = torch.Generator().manual_seed(3)
    acc = HessianAccumulator(300)
    batch = torch.randn(40, 300, generator=gen)
    acc.add(batch)
    *parts, norm_fourth = acc.partial_sums()
    assert len(parts) == 5 and sum(part.numel() for part in parts) < 300 * 300 * 2 // 3  # near half the matrix
    torch.testing.assert_close(norm_fourth, (batch.double().square().sum(1) ** 2).sum().reshape(1))
    exact = batch.double().T @ batch.double()
    start = 0
    for part in parts:
        torch.testing.assert_close(part, exact[start : start + part.shape[0], start:], rtol=1e-6, atol=1e-4)
        start += part.shape[0]
    acc.result()
    with pytest.raises(RuntimeError, match="already handed over"):
        acc.partial_sums()


def test_a_narrow_layer_sums_little_more_than_the_triangle():
    """One row block would fit a 576-wide layer's sums, but its product would be the whole
    square; the triangle is cut into several blocks instead."""
    gen = torch.Generator().manual_seed(4)
    acc = HessianAccumulator(576)
    batch = torch.randn(100, 576, generator=gen)
    acc.add(batch)
    parts = acc.partial_sums()[:-1]  # the triangle's blocks, without the sum of ||x||^4
    assert len(parts) >= 8 and sum(part.numel() for part in parts) < 0.6 * 576 * 576
    torch.testing.assert_close(acc.result(), batch.double().T @ batch.double(), rtol=1e-6, atol=1e-4)


def test_result_in_another_dtype_replaces_the_sum():
    gen = torch.Generator().manual_seed(2)
    acc = HessianAccumulator(8)
    acc.add(torch.randn(30, 8, generator=gen))
    exact = acc.result().clone()
    handed = acc.result(torch.float32)
    assert handed.dtype == torch.float32 and acc.result() is handed  # the float64 sum is gone
    assert torch.equal(handed, exact.float())
    with pytest.raises(RuntimeError, match="already handed over"):
        acc.add(torch.randn(3, 8, generator=gen))


def test_partial_sums_of_an_accumulator_that_saw_no_batch_are_zero(monkeypatch):
    """A rank with no calibration batch still all-reduces blocks shaped like everyone else's."""
    import hf_comq.solver.hessian as hessian_module

    monkeypatch.setattr(hessian_module, "GRAM_BLOCK_BYTES", 1)
    idle, busy = HessianAccumulator(200), HessianAccumulator(200)
    busy.add(torch.randn(7, 200))
    idle_parts = idle.partial_sums()
    assert [part.shape for part in idle_parts] == [part.shape for part in busy.partial_sums()]
    assert all(not part.any() for part in idle_parts)


@pytest.mark.parametrize("block_bytes", [None, 1], ids=["one block", "row blocks"])
def test_target_shift_is_the_full_precision_inputs_minus_the_quantized_ones_times_the_quantized_ones(
    monkeypatch, block_bytes
):
    import hf_comq.solver.hessian as hessian_module

    if block_bytes is not None:
        monkeypatch.setattr(hessian_module, "GRAM_BLOCK_BYTES", block_bytes)
    gen = torch.Generator().manual_seed(0)
    quantized = [torch.randn(3, 50, 130, generator=gen) for _ in range(3)]
    full_precision = [x + 0.1 * torch.randn(x.shape, generator=gen) for x in quantized]
    acc = HessianAccumulator(130, with_target=True)
    for x, x_fp in zip(quantized, full_precision):
        acc.add(x, x_fp)
    rows = torch.cat([x.reshape(-1, 130) for x in quantized]).double()
    rows_fp = torch.cat([x.reshape(-1, 130) for x in full_precision]).double()
    # float32 per-batch products, as for the Gram matrix
    torch.testing.assert_close(acc.target_shift(), (rows_fp - rows).T @ rows, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(acc.result(), rows.T @ rows, rtol=1e-5, atol=1e-4)  # the Gram matrix is unchanged


def test_target_inputs_are_required_exactly_when_the_shift_is_summed():
    plain, targeted = HessianAccumulator(4), HessianAccumulator(4, with_target=True)
    with pytest.raises(ValueError, match="takes no target inputs"):
        plain.add(torch.ones(2, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="pass the full-precision inputs"):
        targeted.add(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"target inputs have shape \(3, 4\), expected \(2, 4\)"):
        targeted.add(torch.ones(2, 4), torch.ones(3, 4))
    with pytest.raises(RuntimeError, match="has no target shift"):
        plain.target_shift()
    targeted.add(torch.ones(2, 4), torch.ones(2, 4))
    assert len(targeted.partial_sums()) == 3  # the triangle's block, the shift's and the sum of ||x||^4, summed over ranks alike
    targeted.target_shift()
    with pytest.raises(RuntimeError, match="takes no more batches"):
        targeted.add(torch.ones(2, 4), torch.ones(2, 4))


def test_a_batchs_products_shared_over_threads_give_the_sums_of_one_thread(two_threads, monkeypatch):
    """Two caller threads: a batch's row-block products (the triangle's, the target shift's, a
    target product's) run side by side on both, one torch thread each, into sums that are
    one thread's to the last bit; a 576-wide shift or product is cut into several blocks so
    that there is something to share."""
    import hf_comq.solver.hessian as hessian_module

    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(256, 576, generator=gen) for _ in range(2)]
    targets = [x + 0.05 * torch.randn(x.shape, generator=gen) for x in batches]
    outputs = [torch.randn(256, 192, generator=gen) for _ in range(2)]

    def summed() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gram, product = HessianAccumulator(576, with_target=True), TargetProductAccumulator(192, 576)
        for x, x_fp, y_fp in zip(batches, targets, outputs):
            gram.add(x, x_fp)
            product.add(x, y_fp)
        assert len(gram.partial_sums()) >= 8 + 4 + 1 and len(product.partial_sums()) >= 2 + 1
        return gram.result(), gram.target_shift(), product.result()

    torch.set_num_threads(1)
    alone = summed()
    torch.set_num_threads(2)
    seen: set[tuple[int, int]] = set()
    original = hessian_module._add_product

    def recording(total, left, right):
        seen.add((threading.get_ident(), torch.get_num_threads()))
        time.sleep(0.002)  # long enough that one thread cannot take every piece before the other starts
        original(total, left, right)

    monkeypatch.setattr(hessian_module, "_add_product", recording)
    shared = summed()
    assert len(seen) >= 2 and {threads for _, threads in seen} == {1}
    assert all(torch.equal(a, b) for a, b in zip(alone, shared))
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("block_bytes", [None, 1], ids=["one block", "row blocks"])
def test_target_product_is_the_output_difference_times_the_inputs(monkeypatch, block_bytes):
    """``Y_fp^T X`` summed over batches in float64; less ``W H`` it is ``(Y_fp - Y)^T X``, which is ``W S``
    for a linear layer's outputs."""
    import hf_comq.solver.hessian as hessian_module

    if block_bytes is not None:
        monkeypatch.setattr(hessian_module, "GRAM_BLOCK_BYTES", block_bytes)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 30, generator=gen)
    quantized = [torch.randn(3, 50, 30, generator=gen) for _ in range(3)]
    full_precision = [x + 0.1 * torch.randn(x.shape, generator=gen) for x in quantized]
    acc, gram = TargetProductAccumulator(7, 30), HessianAccumulator(30)
    for x, x_fp in zip(quantized, full_precision):
        acc.add(x, x_fp @ weight.T)
        gram.add(x)
    rows = torch.cat([x.reshape(-1, 30) for x in quantized]).double()
    rows_fp = torch.cat([x.reshape(-1, 30) for x in full_precision]).double()
    assert acc.num_tokens == rows.shape[0]
    product = acc.result()
    assert product.dtype == torch.float64 and acc.result(torch.float32).dtype == torch.float32
    torch.testing.assert_close(product, weight.double() @ rows_fp.T @ rows, rtol=1e-4, atol=1e-3)
    shift_product = target_product_from_outputs(weight, gram.result(), product.clone())
    torch.testing.assert_close(shift_product, weight.double() @ (rows_fp - rows).T @ rows, rtol=1e-4, atol=1e-3)


def test_target_product_refuses_mismatched_tokens_and_batches_after_hand_over():
    acc = TargetProductAccumulator(2, 4)
    with pytest.raises(ValueError, match=r"must end in in_features=4 and out_features=2"):
        acc.add(torch.ones(3, 4), torch.ones(3, 3))
    with pytest.raises(ValueError, match="are not the same tokens"):
        acc.add(torch.ones(3, 4), torch.ones(4, 2))
    # which values were not finite, so that calibration can name them beside the layer
    with pytest.raises(NonFiniteActivations, match="contain NaN or inf") as outputs:
        acc.add(torch.ones(3, 4), torch.full((3, 2), float("inf")))
    with pytest.raises(NonFiniteActivations, match="contain NaN or inf") as inputs:
        acc.add(torch.full((3, 4), float("nan")), torch.ones(3, 2))
    assert (outputs.value.values, inputs.value.values) == ("full-precision outputs", "inputs")
    with pytest.raises(ValueError, match="never ran"):
        acc.result()
    assert [tuple(part.shape) for part in acc.partial_sums()] == [(2, 4), (1, 4)]  # zeros, summed over ranks alike
    acc.add(torch.ones(3, 4), 2 * torch.ones(3, 2))
    torch.testing.assert_close(acc.result(), torch.full((2, 4), 6.0, dtype=torch.float64))
    torch.testing.assert_close(acc.input_sum(), torch.full((1, 4), 3.0, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="takes no more batches"):
        acc.add(torch.ones(3, 4), torch.ones(3, 2))
    with pytest.raises(RuntimeError, match="partial sums are gone"):
        acc.partial_sums()


def test_shrinkage_ridge_is_ledoit_wolf_and_fades_with_more_tokens():
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(24, 24, generator=gen)
    ridges = []
    for tokens in (24, 96, 1536):
        rows = (torch.randn(tokens, 24, generator=gen) @ mixing).double()
        acc = HessianAccumulator(24)
        for batch in rows.float().split(40):
            acc.add(batch)
        ridges.append(acc.shrinkage_ridge())
        assert ridges[-1] == pytest.approx(ledoit_wolf_ridge(rows.float()), rel=1e-5)
    assert ridges[0] > ridges[1] > ridges[2] > 0


def test_shrinkage_ridge_of_one_token_shrinks_all_the_way():
    """One token has no spread to estimate (Ledoit-Wolf's ``b2`` is zero by construction): a mixture's expert
    routed a single token got no ridge at all, fewer tokens than any other layer and the least shrinkage."""
    gen = torch.Generator().manual_seed(0)
    ridges = []
    for tokens in (1, 2, 4):
        acc = HessianAccumulator(16)
        acc.add(torch.randn(tokens, 16, generator=gen))
        ridges.append(acc.shrinkage_ridge())
    assert ridges[0] == pytest.approx(1 / SHRINKAGE_FLOOR) and ridges[0] > ridges[1] > 0 and ridges[2] > 0


def test_shrinkage_ridge_of_summed_partial_sums_is_that_of_all_tokens():
    """Ranks each sum their share; adding their partial sums (an all-reduce) gives the single process's ridge."""
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(200, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    whole, first, second = HessianAccumulator(16), HessianAccumulator(16), HessianAccumulator(16)
    whole.add(rows)
    first.add(rows[:120])
    second.add(rows[120:])
    for mine, theirs in zip(first.partial_sums(), second.partial_sums()):
        mine += theirs
    first.num_tokens += second.num_tokens
    # the same float32 batch products in other groupings: equal up to their rounding
    assert first.shrinkage_ridge() == pytest.approx(whole.shrinkage_ridge(), rel=1e-6)


def test_shrinkage_ridge_of_inputs_that_are_a_multiple_of_the_identity_is_zero():
    acc = HessianAccumulator(3)
    acc.add(torch.eye(3) * 2.0)
    assert acc.shrinkage_ridge() == 0.0


def test_batches_captured_with_autograd_on_are_summed_detached():
    """Activations from a forward hook on a model whose weights require grad carry a graph;
    summing them in place would chain every batch to the sums and keep them all alive."""
    layer = torch.nn.Linear(6, 6)
    gram, product = HessianAccumulator(6, with_target=True), TargetProductAccumulator(6, 6)
    for _ in range(3):
        x = layer(torch.randn(4, 6))
        assert x.requires_grad
        gram.add(x, x * 1.5)
        product.add(x, layer(x))
    assert not gram.result().requires_grad and not gram.target_shift().requires_grad
    assert not product.result().requires_grad and not product.input_sum().requires_grad
