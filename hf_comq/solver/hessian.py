"""Streaming accumulation of the layer Gram matrix ``H = X^T X``.

COMQ only ever needs ``H`` (in x in), never the calibration activations ``X``
(N x in, with N = samples x tokens in the hundreds of thousands), so callers feed
activations batch by batch and drop them immediately.
"""

from __future__ import annotations

import torch

from ..threads import threads_for


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
    """

    def __init__(self, in_features: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None):
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulation dtype must be torch.float32 or torch.float64, got {dtype}")
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.num_tokens = 0

    def add(self, activations: torch.Tensor) -> None:
        """Add a batch of inputs whose last dimension is ``in_features``."""
        if activations.shape[-1] != self.in_features:
            raise ValueError(
                f"activations have last dimension {activations.shape[-1]}, expected in_features={self.in_features}"
            )
        product_dtype = torch.float64 if activations.dtype == torch.float64 else torch.float32
        rows = activations.reshape(-1, self.in_features).to(device=self.hessian.device, dtype=product_dtype)
        if not torch.isfinite(rows).all():
            raise ValueError("activations contain NaN or inf; check the calibration inputs and the model's dtype")
        with threads_for(2.0 * rows.numel() * self.in_features):
            if product_dtype == self.hessian.dtype:
                self.hessian.addmm_(rows.T, rows)
            else:
                self.hessian.add_(rows.T @ rows)
        self.num_tokens += rows.shape[0]

    def result(self) -> torch.Tensor:
        """The accumulated ``X^T X``; raises if nothing was added."""
        if self.num_tokens == 0:
            raise ValueError("no activations were accumulated: the layer never ran on calibration data")
        return self.hessian
