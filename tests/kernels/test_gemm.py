"""The solver's dense products (hf_comq/kernels/gemm.py): torch's product to float32 rounding,
whatever the operands' layouts, on oneDNN where it applies and torch's own elsewhere."""

from __future__ import annotations

import threading

import pytest
import torch

from hf_comq.kernels import gemm


@pytest.fixture(autouse=True)
def onednn_on_any_cpu(monkeypatch):
    """These tests hold oneDNN's path to torch's product, so it runs on CPUs without AVX-512
    too, where the library leaves it to MKL (:func:`gemm.onednn_preferred`)."""
    monkeypatch.setattr(gemm, "onednn_preferred", lambda: True)


def _operand(rows: int, cols: int, layout: str, generator: torch.Generator) -> torch.Tensor:
    """A ``rows x cols`` float32 matrix laid out as the solver's call sites hand them over."""
    if layout == "contiguous":
        return torch.randn(rows, cols, generator=generator)
    if layout == "transposed":  # column-major: the sweep's H[b0:b1].T, the start's coupling rows
        return torch.randn(cols, rows, generator=generator).T
    if layout == "padded":  # rows of a wider matrix: a slice of columns
        return torch.randn(rows + 3, cols + 5, generator=generator)[3:, 5:]
    return torch.randn(2 * rows, 2 * cols, generator=generator)[::2, ::2]  # no unit stride at all


LAYOUTS = ("contiguous", "transposed", "padded", "strided")
SHAPES = [(1, 1, 1), (7, 1, 3), (3, 300, 2), (100, 3, 257), (96, 128, 700)]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.allclose(actual, expected, rtol=1e-5, atol=1e-5 * max(1.0, float(expected.abs().max())))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("left", LAYOUTS)
@pytest.mark.parametrize("right", LAYOUTS)
def test_matmul_is_torchs_product_in_any_layout(shape, left, right):
    m, k, n = shape
    generator = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a, b = _operand(m, k, left, generator), _operand(k, n, right, generator)
    product = gemm.matmul(a, b)
    assert product.shape == (m, n) and product.is_contiguous()
    assert _close(product, a.double().mm(b.double()).float())


@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.25])
@pytest.mark.parametrize("left", LAYOUTS)
@pytest.mark.parametrize("right", LAYOUTS)
def test_add_matmul_adds_in_place_across_bands(monkeypatch, alpha, left, right):
    """Several bands of output rows (a small band budget), a last band shorter than the rest."""
    monkeypatch.setattr(gemm, "BAND_BYTES", 4 * 40 * 4)  # 4 rows of 40 per band, at least MIN_BAND_ROWS
    monkeypatch.setattr(gemm, "MIN_BAND_ROWS", 4)
    generator = torch.Generator().manual_seed(7)
    out = torch.randn(23, 40, generator=generator)
    a, b = _operand(23, 17, left, generator), _operand(17, 40, right, generator)
    expected = out.double().add(a.double().mm(b.double()), alpha=alpha).float()
    storage = out.data_ptr()
    assert gemm.add_matmul_(out, a, b, alpha=alpha) is out and out.data_ptr() == storage
    assert _close(out, expected)


def test_add_matmul_into_a_view_of_later_rows():
    """The start pushes moves into ``state[b1:]``: a view whose rows are contiguous."""
    generator = torch.Generator().manual_seed(3)
    state = torch.randn(300, 64, generator=generator)
    before = state.clone()
    coupling = torch.randn(16, 300, generator=generator)
    moves = torch.randn(16, 64, generator=generator)
    gemm.add_matmul_(state[100:], coupling[:, 100:].T, moves, alpha=-1.0)
    assert torch.equal(state[:100], before[:100])
    assert _close(state[100:], before[100:] - coupling[:, 100:].T @ moves)


def test_empty_operands():
    assert gemm.matmul(torch.ones(3, 0), torch.ones(0, 4)).eq(0).all()
    out = torch.ones(3, 4)
    gemm.add_matmul_(out, torch.ones(3, 0), torch.ones(0, 4))
    assert out.eq(1).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: (torch.randn(5, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)),
        lambda: (torch.randn(5, 4, requires_grad=True), torch.randn(4, 3)),
    ],
    ids=["float64", "autograd"],
)
def test_other_operands_take_torchs_product(monkeypatch, make):
    """float64 and operands that need a gradient never reach oneDNN (it has neither)."""

    def refuse(*args):
        raise AssertionError("oneDNN was called")

    monkeypatch.setattr(gemm, "_onednn_product", refuse)
    a, b = make()
    product = gemm.matmul(a, b)
    assert torch.equal(product, a @ b)
    if a.requires_grad:
        product.sum().backward()
        assert a.grad is not None


def test_float32_on_cpu_goes_through_onednn_where_torch_has_it(monkeypatch):
    if not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN float32 product")
    calls = []
    real = gemm._onednn_product
    monkeypatch.setattr(gemm, "_onednn_product", lambda a, b: calls.append(1) or real(a, b))
    gemm.matmul(torch.randn(8, 4), torch.randn(4, 6))
    assert calls


def test_a_product_that_disagrees_is_never_used(monkeypatch):
    """The first small product decides: a build whose op gives other values runs torch's."""
    monkeypatch.setattr(gemm, "_onednn_product", lambda a, b: torch.zeros(a.shape[0], b.shape[1]))
    gemm.onednn_available.cache_clear()
    try:
        assert not gemm.onednn_available()
        a, b = torch.randn(6, 5), torch.randn(5, 4)
        assert torch.equal(gemm.matmul(a, b), a @ b)
    finally:
        gemm.onednn_available.cache_clear()


def test_a_missing_op_falls_back(monkeypatch):
    def missing(a, b):
        raise AttributeError("no such op")

    monkeypatch.setattr(gemm, "_onednn_product", missing)
    gemm.onednn_available.cache_clear()
    try:
        assert not gemm.onednn_available()
        out = torch.zeros(2, 3)
        a, b = torch.randn(2, 4), torch.randn(4, 3)
        assert torch.equal(gemm.add_matmul_(out, a, b), a @ b)
    finally:
        gemm.onednn_available.cache_clear()


@pytest.mark.parametrize("alpha", [1.0, -1.0])
def test_a_right_operand_that_is_not_contiguous_is_copied_a_slab_at_a_time(monkeypatch, alpha):
    """A Gram sum's right operand is a slice of a batch's columns: the inner dimension is
    summed in slabs, so no copy of it is larger than SLAB_BYTES (MIN_SLAB_ROWS rows at least)."""
    if not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN float32 product")
    monkeypatch.setattr(gemm, "SLAB_BYTES", 10 * 30 * 4)
    monkeypatch.setattr(gemm, "MIN_SLAB_ROWS", 10)
    seen_rows = []
    real = gemm._onednn_product
    monkeypatch.setattr(gemm, "_onednn_product", lambda a, b: seen_rows.append(b.shape[0]) or real(a, b))
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randn(95, 40, generator=generator)  # 95 tokens: ten slabs, the last one shorter
    left, right = tokens[:, :12].T, tokens[:, 10:]  # rows 0-11 of a Gram matrix, from column 10 on
    expected = left.double().mm(right.double())
    assert _close(gemm.matmul(left, right), expected.float())
    out = torch.randn(12, 30, generator=generator)
    sum_expected = out.double().add(expected, alpha=alpha).float()
    gemm.add_matmul_(out, left, right, alpha=alpha)
    assert _close(out, sum_expected)
    assert max(seen_rows) == 10 and sum(seen_rows) == 2 * 95


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's flags() itself warns
def test_onednn_turned_off_in_torch_is_respected(monkeypatch):
    def refuse(*args):
        raise AssertionError("oneDNN was called")

    monkeypatch.setattr(gemm, "_onednn_product", refuse)
    a, b = torch.randn(6, 5), torch.randn(5, 4)
    with torch.backends.mkldnn.flags(enabled=False):
        assert torch.equal(gemm.matmul(a, b), a @ b)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 12), (2, 7, 12), (3, 1, 4, 12)])
def test_linear_is_f_linear(with_bias, shape):
    generator = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=generator)
    weight = torch.randn(9, 12, generator=generator)
    bias = torch.randn(9, generator=generator) if with_bias else None
    for inputs in (x, x.transpose(0, -2) if x.dim() > 2 else x.T.contiguous().T):  # contiguous, and not
        assert _close(gemm.linear(inputs, weight, bias), torch.nn.functional.linear(inputs, weight, bias))


def _spied_linear(monkeypatch) -> list[str]:
    """The names of the threads on which :func:`gemm.linear` took a product through oneDNN."""
    seen = []
    real = gemm.linear

    def spy(x, weight, bias=None):
        if gemm._linear_through_onednn(x, weight, bias):
            seen.append(threading.current_thread().name)
        return real(x, weight, bias)

    monkeypatch.setattr(gemm, "linear", spy)
    return seen


def test_linear_layers_inside_the_mode_go_through_onednn(monkeypatch):
    if not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN float32 product")
    seen = _spied_linear(monkeypatch)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3))
    x = torch.randn(4, 12)
    with torch.no_grad():
        expected = model(x)
        assert not seen  # outside the mode: torch's own
        with gemm.linear_layers_through_onednn():
            got = model(x)
    assert len(seen) == 2 and _close(got, expected)


def test_a_pass_that_records_gradients_keeps_torchs_linear(monkeypatch):
    """oneDNN's op has no backward: with autograd on, the layers run as they would without the mode."""
    seen = _spied_linear(monkeypatch)
    model = torch.nn.Linear(12, 3)
    with gemm.linear_layers_through_onednn():
        model(torch.randn(4, 12)).sum().backward()
    assert not seen and model.weight.grad is not None


def test_the_mode_reaches_a_worker_thread_through_its_job(monkeypatch):
    if not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN float32 product")
    seen = _spied_linear(monkeypatch)
    model = torch.nn.Linear(12, 3)

    def forward():
        with torch.no_grad():
            return model(torch.randn(4, 12))

    worker = threading.Thread(target=gemm.with_linear_layers_through_onednn(forward), name="calibration batch")
    worker.start()
    worker.join()
    assert seen == ["calibration batch"]


def test_a_weight_that_is_not_contiguous_keeps_torchs_linear():
    weight = torch.randn(12, 9).T  # 9 x 12, column-major
    assert not gemm._linear_through_onednn(torch.randn(4, 12), weight, None)
    x = torch.randn(4, 12)
    assert torch.equal(gemm.linear(x, weight), torch.nn.functional.linear(x, weight))


def test_the_mode_takes_f_linear_called_with_keywords(monkeypatch):
    seen = _spied_linear(monkeypatch)
    x, weight = torch.randn(4, 12), torch.randn(3, 12)
    with torch.no_grad(), gemm.linear_layers_through_onednn():
        got = torch.nn.functional.linear(input=x, weight=weight, bias=None)
    assert _close(got, x @ weight.T)
    assert len(seen) == (1 if gemm.onednn_available() else 0)


def test_a_cpu_without_avx512_takes_torchs_products(monkeypatch):
    """There MKL's AVX2 code is the faster: neither the products nor the linear layers reach oneDNN."""

    def refuse(*args):
        raise AssertionError("oneDNN was called")

    monkeypatch.setattr(gemm, "onednn_preferred", lambda: False)
    monkeypatch.setattr(gemm, "_onednn_product", refuse)
    seen = _spied_linear(monkeypatch)
    a, b = torch.randn(6, 5), torch.randn(5, 4)
    assert torch.equal(gemm.matmul(a, b), a @ b)
    out = torch.zeros(6, 4)
    assert torch.equal(gemm.add_matmul_(out, a, b), torch.zeros(6, 4).addmm_(a, b))
    weight = b.T.contiguous()
    expected = torch.nn.functional.linear(a, weight)
    with torch.no_grad(), gemm.linear_layers_through_onednn():
        assert torch.equal(torch.nn.functional.linear(a, weight), expected)
    assert not seen


def test_onednn_is_preferred_exactly_on_avx512_cpus(monkeypatch):
    monkeypatch.undo()  # the real function, not the fixture's stand-in
    try:
        for capability, preferred in (("AVX512", True), ("AVX2", False), ("DEFAULT", False)):
            monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
            gemm.onednn_preferred.cache_clear()
            assert gemm.onednn_preferred() is preferred
    finally:
        monkeypatch.undo()
        gemm.onednn_preferred.cache_clear()
