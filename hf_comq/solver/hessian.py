"""Streaming accumulation of the layer Gram matrix ``H = X^T X``.

COMQ only ever needs ``H`` (in x in), never the calibration activations ``X``
(N x in, with N = samples x tokens in the hundreds of thousands), so callers feed
activations batch by batch and drop them immediately.
"""

from __future__ import annotations

import torch

from ..threads import threads_for
from .spans import rows_fitting, spans

GRAM_BLOCK_BYTES = 16 * 1024 * 1024
"""Bytes of the temporaries of one row block of a batch's ``X^T X`` (its product and,
when the sum is float64, the product's float64 copy).  A whole wide layer's product
would be an ``in x in`` float32 matrix plus its float64 copy beside the sum: three
times the sum's own size at the peak of a calibration pass."""
MIN_BLOCK_ROWS = 64


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

    The product is formed in row blocks of ``H`` (see :data:`GRAM_BLOCK_BYTES`): each
    block's entries are the very same dot products as the whole product's, so the sum
    does not depend on the block size, and no ``in x in`` temporary exists.
    """

    def __init__(self, in_features: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None):
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulation dtype must be torch.float32 or torch.float64, got {dtype}")
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.num_tokens = 0
        self._converted = False

    def add(self, activations: torch.Tensor) -> None:
        """Add a batch of inputs whose last dimension is ``in_features``."""
        if activations.shape[-1] != self.in_features:
            raise ValueError(
                f"activations have last dimension {activations.shape[-1]}, expected in_features={self.in_features}"
            )
        if self._converted:
            raise RuntimeError("this Gram matrix was already handed over (result(dtype)); it takes no more batches")
        product_dtype = torch.float64 if activations.dtype == torch.float64 else torch.float32
        rows = activations.reshape(-1, self.in_features).to(device=self.hessian.device, dtype=product_dtype)
        if not torch.isfinite(rows).all():
            raise ValueError("activations contain NaN or inf; check the calibration inputs and the model's dtype")
        with threads_for(2.0 * rows.numel() * self.in_features):
            for span in self._row_spans(rows.element_size()):
                block = self.hessian[span]
                if product_dtype == self.hessian.dtype:
                    block.addmm_(rows[:, span].T, rows)
                else:
                    block.add_(rows[:, span].T @ rows)
        self.num_tokens += rows.shape[0]

    def result(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The accumulated ``X^T X``; raises if nothing was added.

        With ``dtype``, the sum is converted once and the converted matrix *replaces*
        it: a solver working in float32 then never holds the float64 sum beside its
        own copy (for a wide layer, twice the float32 matrix).  Accumulation is over
        by then; :meth:`add` refuses more batches.
        """
        if self.num_tokens == 0:
            raise ValueError("no activations were accumulated: the layer never ran on calibration data")
        if dtype is not None and dtype != self.hessian.dtype:
            self.hessian = self.hessian.to(dtype)
            self._converted = True
        return self.hessian

    def _row_spans(self, activation_bytes: int) -> list[slice]:
        """Row ranges of ``H`` whose product temporaries fit :data:`GRAM_BLOCK_BYTES`.

        Never thinner than :data:`MIN_BLOCK_ROWS`: a product only one or two rows high takes
        the BLAS's matrix-vector path, which orders its sums differently.
        """
        bytes_per_row = self.in_features * (self.hessian.element_size() + activation_bytes)
        return spans(self.in_features, rows_fitting(GRAM_BLOCK_BYTES, bytes_per_row, MIN_BLOCK_ROWS))
