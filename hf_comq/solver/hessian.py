"""Streaming accumulation of the layer Gram matrix ``H = X^T X``.

COMQ only ever needs ``H`` (in x in), never the calibration activations ``X``
(N x in, with N = samples x tokens in the hundreds of thousands), so callers feed
activations batch by batch and drop them immediately.
"""

from __future__ import annotations

import functools

import torch

from ..kernels.gemm import add_matmul_, matmul
from ..threads import run_independent, single_thread
from .spans import rows_fitting, spans

GRAM_BLOCK_BYTES = 16 * 1024 * 1024
"""Bytes of one row block of the sum plus its batch product's float32 temporary.  A
whole wide layer's product would be an ``in x in`` float32 matrix beside the sum: at the
peak of a calibration pass, more than the sum's own size."""
MIN_BLOCK_ROWS = 64
"""Never thinner row blocks: a product only one or two rows high takes the BLAS's
matrix-vector path, which orders its sums differently."""
TRIANGLE_BLOCKS = 8
"""At least this many row blocks where :data:`MIN_BLOCK_ROWS` allows: a layer narrow
enough for one block would otherwise compute the whole square product, the half below
the diagonal thrown away; with eight the products cover little more than the triangle
(``(1 + 1/8) / 2`` of the square)."""
PRODUCT_BLOCKS = 4
"""At least this many row blocks for the sums that are not a triangle (the target shift,
the target product) where :data:`MIN_BLOCK_ROWS` allows: a batch's products are shared
among the caller's threads block by block (:func:`~hf_comq.threads.run_independent`),
and a sum in one block would keep all but one of them waiting for it."""


SHRINKAGE_FLOOR = 1e-6
"""Smallest ``1 - delta`` in :meth:`HessianAccumulator.shrinkage_ridge`: a layer whose every
token is its own direction (``delta = 1``) gets a large finite ridge, not an infinite one."""


class NonFiniteActivations(ValueError):
    """Calibration inputs (or full-precision targets) of a layer hold NaN or inf: usually a model
    whose activations overflow its dtype (float16), else broken calibration data.

    ``values`` says which of a layer's values they were ("inputs", "full-precision inputs",
    "full-precision outputs"), so that a caller who knows the layer can name both."""

    def __init__(self, message: str, values: str = "inputs"):
        super().__init__(message)
        self.values = values


class HessianAccumulator:
    """Accumulates ``X^T X`` over batches of activations of any leading shape.

    ``dtype=torch.float64`` (the default) keeps the running sum exact enough for very
    many tokens; ``float32`` halves memory for wide layers.  Each batch's own product
    is computed in float32 unless the activations are float64 already: that GEMM is
    most of a calibration pass's cost on a CPU, float64 doubles it, and a batch's
    sum of a few thousand products loses nothing that matters in float32 (GPTQ
    implementations accumulate the whole Hessian in float32).  The sum is *not* averaged:
    the COMQ objective ``||X W^T - X Wq^T||^2`` is defined on the raw Gram matrix,
    and the coordinate updates are invariant to its scale anyway.

    ``X^T X`` is symmetric, so only its upper triangle is summed, in row blocks of
    ``H`` (see :data:`GRAM_BLOCK_BYTES`): block ``[a:b]`` holds rows ``a:b`` from column
    ``a`` on.  That halves both the calibration pass's Gram-matrix GEMMs and the memory
    of the sums, which for a wide MLP layer are the largest thing a calibration pass
    holds; no ``in x in`` temporary exists.  :meth:`result` mirrors the triangle into
    the full matrix the solver takes.

    ``with_target=True`` also sums the *target shift* ``(X_fp - X)^T X``, where ``X_fp``
    are the same tokens' inputs to this layer in the full-precision model (given to
    :meth:`add` as ``target``): with it, :func:`~hf_comq.solver.target.fp_target_weight`
    turns the layer's objective into ``||X_fp W^T - X Wq^T||^2``, the distance to the
    full-precision model's outputs rather than to this layer's own output on the
    quantized prefix's inputs.  It is not symmetric, so it is summed whole, in row blocks
    (each ``rows x in``) within :data:`GRAM_BLOCK_BYTES`, at least :data:`PRODUCT_BLOCKS`.
    """

    def __init__(
        self,
        in_features: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        with_target: bool = False,
    ):
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulation dtype must be torch.float32 or torch.float64, got {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self.num_tokens = 0
        bytes_per_row = in_features * (dtype.itemsize + 4)
        self._spans = _row_blocks(in_features, bytes_per_row, TRIANGLE_BLOCKS)
        self._shift_spans = _row_blocks(in_features, bytes_per_row, PRODUCT_BLOCKS)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._with_target = with_target
        # The sums are made on first use: a layer found sharing another's input (q/k/v, an expert's
        # gate/up) or never reached (an expert no token is routed to) never needs its own.
        self._upper: list[torch.Tensor] | None = None
        self._shift: list[torch.Tensor] | None = None
        self._whole: torch.Tensor | None = None
        self._whole_shift: torch.Tensor | None = None
        self._norm_fourth: torch.Tensor | None = None  # sum over tokens of ||x||^4, for shrinkage_ridge()
        self._made = False
        self._handed_over = False

    @property
    def with_target(self) -> bool:
        """Whether the target shift is summed (see the class docstring)."""
        return self._with_target

    def _sums(self) -> None:
        """Make the zero sums (the triangle's row blocks, and the target shift's) unless they exist."""
        if self._made:
            return
        self._made = True
        n, dtype, device = self.in_features, self.dtype, self._device
        self._upper = [torch.zeros(span.stop - span.start, n - span.start, dtype=dtype, device=device) for span in self._spans]
        self._norm_fourth = torch.zeros(1, dtype=torch.float64, device=device)
        if self._with_target:
            self._shift = [torch.zeros(span.stop - span.start, n, dtype=dtype, device=device) for span in self._shift_spans]

    @single_thread()  # small elementwise work; the products share the caller's threads (run_independent)
    def add(self, activations: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Add a batch of inputs whose last dimension is ``in_features``.

        ``target``: the same tokens' inputs in the full-precision model, required
        exactly when the accumulator sums the target shift.
        """
        if activations.shape[-1] != self.in_features:
            raise ValueError(
                f"activations have last dimension {activations.shape[-1]}, expected in_features={self.in_features}"
            )
        if self._handed_over:
            raise RuntimeError("this Gram matrix was already handed over (result()); it takes no more batches")
        product_dtype = torch.float64 if activations.dtype == torch.float64 else torch.float32
        # Detached: a batch captured with autograd on would otherwise chain every later sum
        # to its graph and keep all batches alive.
        rows = activations.detach().reshape(-1, self.in_features).to(device=self._device, dtype=product_dtype)
        if not _all_finite(rows):
            raise NonFiniteActivations("activations contain NaN or inf; check the calibration inputs and the model's dtype")
        if (target is not None) != self.with_target:
            raise ValueError(
                "this Gram matrix sums the target shift: pass the full-precision inputs as target"
                if self.with_target
                else "this Gram matrix was made without with_target=True: it takes no target inputs"
            )
        shift_rows = None
        if target is not None:
            if target.shape != activations.shape:
                raise ValueError(f"target inputs have shape {tuple(target.shape)}, expected {tuple(activations.shape)}")
            shift_rows = target.detach().reshape(-1, self.in_features).to(device=rows.device, dtype=product_dtype) - rows
            if not _all_finite(shift_rows):
                raise NonFiniteActivations(
                    "target activations contain NaN or inf; check the model's dtype", values="full-precision inputs"
                )
        self._sums()
        self._norm_fourth += torch.linalg.vector_norm(rows, dim=1).double().pow(4).sum()  # no batch-sized temporary
        pieces = [] if shift_rows is None else _products(self._shift, self._shift_spans, shift_rows, rows)
        pieces += [  # the triangle's widest blocks first: the threads sharing them end close together
            functools.partial(_add_product, block, rows[:, span].T, rows[:, span.start :])
            for span, block in zip(self._spans, self._upper)
        ]
        run_independent(pieces, (1.0 if shift_rows is None else 3.0) * rows.numel() * self.in_features)
        self.num_tokens += rows.shape[0]

    def partial_sums(self) -> list[torch.Tensor]:
        """The running sums themselves (the triangle's row blocks, the target shift's, then the sum of
        ``||x||^4`` that :meth:`shrinkage_ridge` reads), for summing over processes in place."""
        if self._handed_over:
            raise RuntimeError("this Gram matrix was already handed over (result()); its partial sums are gone")
        self._sums()  # a process with no tokens for this layer still adds its zeros to the others'
        return self._upper + (self._shift or []) + [self._norm_fourth]

    def result(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The accumulated ``X^T X`` as a full symmetric matrix; raises if nothing was added.

        The first call ends accumulation (:meth:`add` refuses more batches) and the
        triangle's blocks are freed as they are mirrored, so the sum never exists twice.
        With ``dtype`` the matrix is made in (or converted once to) that dtype and
        *replaces* the previous one: a solver working in float32 never holds a float64
        matrix beside its own copy.
        """
        if self.num_tokens == 0:
            raise ValueError("no activations were accumulated: the layer never ran on calibration data")
        if self._whole is None:  # tokens were added here, or summed in through partial_sums(): the sums exist
            self._handed_over = True
            self._whole = self._mirrored(dtype or self.dtype)
        elif dtype is not None and dtype != self._whole.dtype:
            self._whole = self._whole.to(dtype)
        return self._whole

    def target_shift(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The accumulated ``(X_fp - X)^T X`` (``in x in``); like :meth:`result`, it ends accumulation."""
        if not self.with_target:
            raise RuntimeError("this Gram matrix was made without with_target=True: it has no target shift")
        if self.num_tokens == 0:
            raise ValueError("no activations were accumulated: the layer never ran on calibration data")
        if self._whole_shift is None:
            self._handed_over = True
            blocks, self._shift = self._shift, None
            self._whole_shift = _stacked(blocks, self._shift_spans, dtype or self.dtype)
        elif dtype is not None and dtype != self._whole_shift.dtype:
            self._whole_shift = self._whole_shift.to(dtype)
        return self._whole_shift

    def shrinkage_ridge(self) -> float:
        """The solver's ``ridge`` that makes ``H + ridge * mean(diag H) * I`` the Ledoit-Wolf estimate.

        ``H / n`` estimates the inputs' second-moment matrix from ``n`` tokens, and with
        few tokens per input its small eigenvalues are far too small: the solver then
        fits directions the calibration set barely sampled.  Ledoit and Wolf (2004) give
        the weight ``delta`` of the mixture ``(1 - delta) H / n + delta * mu * I``
        (``mu = tr(H) / (n * in)``) that is closest to the true matrix in expectation,
        estimated from the data alone: ``delta = min(b2, d2) / d2``, with
        ``d2 = ||H / n - mu I||_F^2`` and ``b2 = (sum_t ||x_t||^4 / n - ||H / n||_F^2) / n``
        the spread of the tokens' own ``x_t x_t^T`` around their mean.  Up to a scale that
        no solve depends on, that mixture is ``H + delta / (1 - delta) * mean(diag H) * I``.
        It vanishes as tokens grow (``b2`` falls like ``1 / n``), so no constant is tuned.
        One token has no spread to measure (``b2`` is zero by construction, not by evidence)
        and is its own only direction: it gets ``delta = 1``, as a layer whose every token is.
        Reads the full matrix (call after :meth:`result`, or it calls it).
        """
        if self._norm_fourth is None:
            raise ValueError("no activations were accumulated: the layer never ran on calibration data")
        whole = self.result() if self._whole is None else self._whole
        n, p = float(self.num_tokens), float(self.in_features)
        # ||H / n||_F^2 from per-row norms: a float64 copy of a wide H would be its size again, and
        # one float32 sum of all in^2 squares drifts (rows of in terms each do not)
        square_norm = float(torch.linalg.vector_norm(whole, dim=1).double().square().sum()) / n**2
        mu = float(torch.diagonal(whole).double().sum()) / (n * p)
        d2 = square_norm - p * mu**2
        b2 = max(float(self._norm_fourth) / n**2 - square_norm / n, 0.0)
        if d2 <= 0.0 or mu <= 0.0:
            return 0.0  # already a multiple of I (or no signal): nothing to shrink towards
        delta = 1.0 if self.num_tokens == 1 else min(b2, d2) / d2
        return delta / max(1.0 - delta, SHRINKAGE_FLOOR)

    def _mirrored(self, dtype: torch.dtype) -> torch.Tensor:
        """The full matrix from the upper triangle's row blocks, each block freed once copied.

        The upper triangle is filled first, row block by row block, and mirrored within
        the matrix afterwards: the matrix's pages are then written in the order the
        blocks are freed, so the triangle and the matrix never both exist whole (a
        block's columns written into every row below it would touch nearly all of the
        matrix's pages while the triangle is still there).
        """
        blocks, self._upper = self._upper, None
        whole = torch.empty(self.in_features, self.in_features, dtype=dtype, device=blocks[0].device)
        for index, span in enumerate(self._spans):
            block, width = blocks[index], span.stop - span.start
            whole[span, span.stop :] = block[:, width:]
            square = block[:, :width]  # its lower triangle holds the same sums as its upper, perhaps rounded apart
            whole[span, span] = square.triu() + square.triu(1).T
            blocks[index] = block = square = None
        for span in self._spans:
            whole[span.stop :, span] = whole[span, span.stop :].T
        return whole


class TargetProductAccumulator:
    """Accumulates ``Y_fp^T X`` (``out x in``) over batches: what one layer's target product is made from.

    ``Y_fp`` is the layer's output on the full-precision model's inputs ``X_fp`` and
    ``X`` its input in the quantized prefix, for the same tokens.  Since the layer's
    own output on ``X`` is ``X W^T + b``, its target product ``(Y_fp - X W^T - b)^T X``
    is this sum less ``W H`` and ``b`` times the sum of the inputs (also kept here,
    :meth:`input_sum`; :func:`~hf_comq.solver.target.target_product_from_outputs`), the
    weight times the target shift that :class:`HessianAccumulator` can sum instead
    (see :mod:`hf_comq.solver.target`); so the quantized pass needs only the layer's
    input, and may end there.  Per token it costs ``out x in`` where the shift costs
    ``in x in``, and the layer's full-precision outputs are kept between the two
    passes instead of its inputs: the cheaper form for a layer narrower out than in
    (an MLP's down projection), whose shift no other layer reads.  Sums in float64 in
    row blocks, like :class:`HessianAccumulator`, each batch's product in float32
    unless the outputs are float64 already.  In a bfloat16 or float16 model ``Y_fp``
    is rounded to that dtype, so the target product carries that rounding on top of
    the inputs' (which the shift carries alone): the aimed weight is a little noisier
    there, most where the two inputs barely differ and the move is small anyway.
    """

    def __init__(self, out_features: int, in_features: int, *, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None):  # fmt: skip
        if out_features <= 0 or in_features <= 0:
            raise ValueError(f"out_features and in_features must be positive, got {out_features} and {in_features}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulation dtype must be torch.float32 or torch.float64, got {dtype}")
        self.out_features, self.in_features, self.dtype = out_features, in_features, dtype
        self.num_tokens = 0
        self._spans = _row_blocks(out_features, in_features * (dtype.itemsize + 4), PRODUCT_BLOCKS)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._blocks: list[torch.Tensor] | None = None  # made on first use, as HessianAccumulator's sums
        self._whole: torch.Tensor | None = None
        self._input_sum: torch.Tensor | None = None  # (1, in): a bias's share of Y^T X

    @single_thread()  # as HessianAccumulator.add
    def add(self, activations: torch.Tensor, target_outputs: torch.Tensor) -> None:
        """Add one batch: the layer's inputs ``X`` and the same tokens' full-precision outputs ``Y_fp``."""
        if activations.shape[-1] != self.in_features or target_outputs.shape[-1] != self.out_features:
            raise ValueError(
                f"inputs {tuple(activations.shape)} and full-precision outputs {tuple(target_outputs.shape)} must end "
                f"in in_features={self.in_features} and out_features={self.out_features}"
            )
        if target_outputs.shape[:-1] != activations.shape[:-1]:
            raise ValueError(
                f"inputs {tuple(activations.shape)} and full-precision outputs {tuple(target_outputs.shape)} "
                "are not the same tokens"
            )
        if self._whole is not None:
            raise RuntimeError("this target product was already handed over (result()); it takes no more batches")
        product_dtype = torch.float64 if activations.dtype == torch.float64 else torch.float32

        def flat(values: torch.Tensor) -> torch.Tensor:  # detached, as in HessianAccumulator.add
            return values.detach().reshape(-1, values.shape[-1]).to(device=self._device, dtype=product_dtype)

        rows, kept = flat(activations), flat(target_outputs)
        if not _all_finite(rows):
            raise NonFiniteActivations("activations contain NaN or inf; check the calibration inputs and the model's dtype")
        if not _all_finite(kept):
            raise NonFiniteActivations(
                "full-precision outputs contain NaN or inf; check the model's dtype", values="full-precision outputs"
            )
        self._sums()
        run_independent(_products(self._blocks, self._spans, kept, rows), 2.0 * kept.numel() * self.in_features)
        self._input_sum += rows.sum(dim=0, keepdim=True, dtype=self.dtype)
        self.num_tokens += rows.shape[0]

    def partial_sums(self) -> list[torch.Tensor]:
        """The running sums themselves, for summing over processes in place (see :meth:`HessianAccumulator.partial_sums`)."""
        if self._whole is not None:
            raise RuntimeError("this target product was already handed over (result()); its partial sums are gone")
        self._sums()
        return [*self._blocks, self._input_sum]

    def input_sum(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The sum of the inputs ``X`` over the tokens (``1 x in``), in ``dtype`` (the sums' by default)."""
        if self._input_sum is None:
            raise ValueError("no activations were accumulated: the layer never ran on calibration data")
        return self._input_sum.to(dtype or self.dtype)

    def result(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The summed ``Y_fp^T X`` (``out x in``); the first call ends accumulation, as :meth:`HessianAccumulator.result`."""
        if self.num_tokens == 0:
            raise ValueError("no activations were accumulated: the layer never ran on calibration data")
        if self._whole is None:
            blocks, self._blocks = self._blocks, None
            self._whole = _stacked(blocks, self._spans, dtype or self.dtype)
        elif dtype is not None and dtype != self._whole.dtype:
            self._whole = self._whole.to(dtype)
        return self._whole

    def _sums(self) -> None:
        if self._blocks is None and self._whole is None:
            self._blocks = [
                torch.zeros(span.stop - span.start, self.in_features, dtype=self.dtype, device=self._device)
                for span in self._spans
            ]
            self._input_sum = torch.zeros(1, self.in_features, dtype=self.dtype, device=self._device)


def _stacked(blocks: list[torch.Tensor | None], row_spans: list[slice], dtype: torch.dtype) -> torch.Tensor:
    """The whole matrix from its row blocks, each freed (set to ``None`` in ``blocks``) once copied,
    so the sum never exists twice."""
    whole = torch.empty(row_spans[-1].stop, blocks[0].shape[1], dtype=dtype, device=blocks[0].device)
    for index, span in enumerate(row_spans):
        whole[span] = blocks[index]
        blocks[index] = None
    return whole


def _all_finite(rows: torch.Tensor) -> bool:
    """Whether every entry is finite, by one reduction first: a NaN or inf anywhere makes
    the sum non-finite, and the elementwise test (several passes over the batch, a large
    share of an accumulation's time) runs only then, to tell an overflowing sum apart."""
    return bool(torch.isfinite(rows.sum())) or bool(torch.isfinite(rows).all())


def _row_blocks(rows: int, bytes_per_row: int, at_least: int) -> list[slice]:
    """Row blocks of a sum: each within :data:`GRAM_BLOCK_BYTES` with its product (never under
    :data:`MIN_BLOCK_ROWS` rows, even where that is over the budget), ``at_least`` of them where
    :data:`MIN_BLOCK_ROWS` allows.  They depend on the shape alone, never on the threads, so the
    sums come out the same however the blocks are shared."""
    fitting = rows_fitting(GRAM_BLOCK_BYTES, bytes_per_row, MIN_BLOCK_ROWS)
    return spans(rows, max(min(fitting, -(-rows // at_least)), MIN_BLOCK_ROWS))


def _products(blocks: list[torch.Tensor], row_spans: list[slice], left: torch.Tensor, right: torch.Tensor) -> list:
    """The pieces adding ``left[:, span].T @ right`` to each row block of a sum (for :func:`run_independent`)."""
    return [functools.partial(_add_product, block, left[:, span].T, right) for span, block in zip(row_spans, blocks)]


def _add_product(total: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """``total += left @ right``, in place when the dtypes allow it (no product-sized temporary)."""
    if left.dtype == total.dtype:
        add_matmul_(total, left, right)
    else:
        total.add_(matmul(left, right))
