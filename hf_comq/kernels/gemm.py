"""The solver's dense products, and calibration's linear layers, on the faster of the two
CPU GEMM libraries torch ships.

torch multiplies float32 matrices on the CPU with MKL, which does not use AVX-512 on
every processor that has it (AMD's take its AVX2 code).  The oneDNN library inside
torch does, through ``torch.ops.mkldnn._linear_pointwise``, the op torch's own compiler
emits for linear layers.  On a CPU without AVX-512 it is the other way round: both run
AVX2 code, and MKL's is the faster (``benchmarks/bench_gemm.py`` times the two side by
side).  So float32 products of CPU tensors with no gradient to record go through oneDNN
where the CPU has AVX-512 (:func:`onednn_preferred`), torch has the op and a first small
product agrees with ``torch.mm``; everything else (GPU, float64, autograd, an AVX2-only
CPU, an older or a different torch build, oneDNN turned off with
``torch.backends.mkldnn.flags(enabled=False)``) runs torch's own product.  Both are
float32 GEMMs: the results differ in summation order only.

oneDNN has no in-place ``out += a @ b``: :func:`add_matmul_` forms the product a band of
output rows at a time, each band a small temporary that stays in cache, and adds it.
The right operand must be contiguous (oneDNN falls back to a reference loop, thousands
of times slower, for a weight with padded rows), so one that is not (a Gram sum's columns
of a batch) is copied first, a slab of its rows at a time: the copy stays small however
large the batch.

Calibration's forward passes spend most of their time in the model's linear layers: run
inside :func:`linear_layers_through_onednn` (a torch function mode, entered by each pass's
job on its own thread), every ``F.linear`` goes through :func:`linear`, oneDNN's linear
op on the weight as ``nn.Linear`` holds it, under the same conditions.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

BAND_BYTES = 2 << 20
"""Bytes of one band's temporary product in :func:`add_matmul_`: the band is formed,
added and dropped while it is still in the core's cache."""

MIN_BAND_ROWS = 16  # fewer rows per product leave oneDNN's kernels underused

SLAB_BYTES = 8 << 20
"""Bytes of one contiguous copy of a right operand that is not contiguous: the inner
dimension is then summed a slab of rows at a time."""

MIN_SLAB_ROWS = 64  # a shorter inner dimension leaves oneDNN's kernels underused


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` (``m x k``) and ``b`` (``k x n``), a new contiguous tensor."""
    if not _through_onednn(a, b):
        return a @ b
    first, *rest = _slabs(b)
    product = _onednn_product(a[:, first], b[first].contiguous())
    for slab in rest:
        add_matmul_(product, a[:, slab], b[slab])
    return product


def add_matmul_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``out += alpha * (a @ b)`` in place (``out`` is ``m x n`` with contiguous rows); returns ``out``."""
    if not (_through_onednn(out, a, b) and out.stride(1) == 1):
        return out.addmm_(a, b, alpha=alpha)
    rows = max(MIN_BAND_ROWS, BAND_BYTES // max(1, out.shape[1] * out.element_size()))
    for slab in _slabs(b):
        right = b[slab].contiguous()
        for start in range(0, out.shape[0], rows):
            band = slice(start, start + rows)
            out[band].add_(_onednn_product(a[band, slab], right), alpha=alpha)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where it applies: float32 CPU tensors, a
    contiguous ``out x in`` weight (oneDNN's own layout for it), and no gradient to record."""
    if not _linear_through_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    product = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return product.view(*x.shape[:-1], weight.shape[0])


class _LinearThroughOneDNN(TorchFunctionMode):
    """Every ``F.linear`` (every ``nn.Linear``'s forward) run inside the mode goes through :func:`linear`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.linear:
            if "input" in kwargs:  # F.linear's own name for it
                kwargs["x"] = kwargs.pop("input")
            return linear(*args, **kwargs)
        return func(*args, **kwargs)


def linear_layers_through_onednn() -> TorchFunctionMode:
    """A context in which the linear layers of forward passes run through :func:`linear`.

    A torch function mode: it applies to the thread that enters it only, so a forward
    pass run on a worker thread enters it there (:func:`with_linear_layers_through_onednn`).
    """
    return _LinearThroughOneDNN()


def with_linear_layers_through_onednn(job: Callable[..., Any]) -> Callable[..., Any]:
    """``job`` run inside :func:`linear_layers_through_onednn`, on whichever thread calls it."""

    @functools.wraps(job)
    def run(*args: Any, **kwargs: Any) -> Any:
        with linear_layers_through_onednn():
            return job(*args, **kwargs)

    return run


def _linear_through_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``F.linear(x, weight, bias)`` runs through oneDNN (see :func:`linear`)."""
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, bias) if t is not None):
        return False
    return (
        x.dim() >= 2
        and weight.dim() == 2
        and weight.is_contiguous()
        and x.shape[-1] == weight.shape[1]
        and (bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0] and bias.is_contiguous()))
        and _onednn_applies(x, weight, *(() if bias is None else (bias,)))
    )


def _through_onednn(*tensors: torch.Tensor) -> bool:
    """Whether these 2-D operands' product runs through oneDNN (see the module's docstring)."""
    return all(t.dim() == 2 for t in tensors) and _onednn_applies(*tensors)


def _onednn_applies(*tensors: torch.Tensor) -> bool:
    """The one rule for both: non-empty float32 CPU tensors, no gradient being recorded through them
    (oneDNN's op has no backward), not inside ``torch.compile``'s tracing, and oneDNN in use in this
    process (:func:`products_through_onednn`)."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() > 0 for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and not torch.compiler.is_compiling()
        and products_through_onednn()
    )


def products_through_onednn() -> bool:
    """The part of the rule that does not depend on the operands: oneDNN on in torch (the user's
    switch, ``torch.backends.mkldnn``), a CPU on which it is the faster library
    (:func:`onednn_preferred`) and its op at hand (:func:`onednn_available`)."""
    return torch.backends.mkldnn.enabled and onednn_preferred() and onednn_available()


def _slabs(b: torch.Tensor) -> list[slice]:
    """The slabs of ``b``'s rows (the inner dimension) summed one at a time: all of it when ``b``
    is contiguous (no copy), else as many rows as :data:`SLAB_BYTES` holds."""
    inner = b.shape[0]
    if b.is_contiguous():
        return [slice(0, inner)]
    rows = max(MIN_SLAB_ROWS, SLAB_BYTES // max(1, b.shape[1] * b.element_size()))
    return [slice(start, min(start + rows, inner)) for start in range(0, inner, rows)]


def _onednn_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` through oneDNN's inner product (``a @ w^T`` with ``w = b^T``, laid out as
    oneDNN reads a weight without a copy when ``b`` is contiguous)."""
    return torch.ops.mkldnn._linear_pointwise(a, b.T, None, "none", [], "")


@functools.cache
def onednn_preferred() -> bool:
    """Whether this CPU has AVX-512 (torch's own CPU capability), where oneDNN's float32 GEMM
    uses it and MKL on AMD processors does not; without it MKL's AVX2 code is the faster.

    The packed layers' library-GEMM path (``csrc/packed_linear.cpp``, ``onednn_linear``) asks
    the same question of the CPU.
    """
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


@functools.cache
def onednn_available() -> bool:
    """Whether torch has oneDNN's float32 product and it agrees with ``torch.mm`` on a
    small problem (settled once per process; logged at debug level when it does not)."""
    if not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(24, 40, generator=generator)
    b = torch.randn(40, 56, generator=generator)
    try:
        product = _onednn_product(a, b)
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        logger.debug("oneDNN float32 products unavailable, torch.mm runs them: %s", error)
        return False
    agrees = product.shape == (24, 56) and torch.allclose(product, a @ b, rtol=1e-5, atol=1e-4)
    if not agrees:
        logger.debug("oneDNN float32 products disagree with torch.mm; torch.mm runs them")
    return agrees
