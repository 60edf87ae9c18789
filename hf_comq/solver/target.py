"""Aim a layer at the full-precision model's outputs: the weight whose fit COMQ then solves.

In block-sequential calibration a layer's inputs ``X`` come from the already quantized
prefix, while the same tokens reach it as ``X_fp`` in the full-precision model.  The
plain objective ``||X W^T - X Wq^T||^2`` asks the layer to reproduce what its
full-precision weight would make of the *quantized* inputs, so the prefix's error is
carried forward untouched.  Aiming at the full-precision outputs instead,
``||X_fp W^T - X Wq^T||^2``, lets each layer cancel part of the error it inherits
(the "asymmetric calibration" of GPTAQ, also called GPTQv2, ICML 2025).

That objective is the plain one for another weight, up to a constant: with
``H = X^T X`` and the target shift ``S = (X_fp - X)^T X``, its gradient in ``Wq`` is
``2 (Wq H - W (H + S))``, so it equals ``||X W'^T - X Wq^T||^2 + const`` with
``W' = W (H + S) H^-1 = W + W S H^-1``.  Handing COMQ ``W'`` leaves the solver
unchanged: grids, start, sweeps and refits all work on ``W'`` and ``H``.

The target enters only through the *target product* ``W S = (Y_fp - Y)^T X``, where
``Y_fp = X_fp W^T`` and ``Y = X W^T`` are the layer's own outputs on the two inputs
(a bias cancels).  It can be summed either way: ``S`` (``in x in``) once for all the
layers reading one input, or ``Y_fp^T X`` (``out x in``) per layer, less work and
room for a layer narrower out than in, such as an MLP's down projection
(:class:`~hf_comq.solver.hessian.TargetProductAccumulator`), from which ``Y^T X = W H``
is taken at the solve (:func:`target_product_from_outputs`).

That ``W'`` is a least-squares fit of the full-precision outputs on the calibration
tokens, and the whole move fits their noise too: on SmolLM2 at 3 bits it takes the
weights tens of percent of their norm away and wrecks held-out perplexity
(benchmarks/README.md).  So, as GPTAQ does (its ``alpha``), only a fraction
:data:`TARGET_STRENGTH` of the move is made: the solver's target lies between the
layer's own output and the full-precision one.
The solver's ``stats`` (objective, relative error) are then measured from ``W'``.
"""

from __future__ import annotations

import torch

from .start import SavedUpperTriangle, damped_cholesky

TARGET_DAMP = 0.01
"""Relative diagonal damping of ``H`` in ``W S H^-1`` (the start's damping rule,
:func:`~hf_comq.solver.start.damped_cholesky`), GPTQ's customary value: with few tokens
per input ``H`` is nearly singular along directions the calibration set barely visits,
and an undamped inverse would move ``W'`` far along them."""


TARGET_STRENGTH = 0.25
"""Fraction of the move towards the full-precision fit that is made: GPTAQ's published
``alpha`` (not tuned here; ``benchmarks/bench_real_models.py`` measures the result)."""


def fp_target_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    product: torch.Tensor,
    damp: float = TARGET_DAMP,
    strength: float = TARGET_STRENGTH,
    overwrite_product: bool = False,
    lend_hessian: bool = False,
) -> torch.Tensor:
    """``W + strength * W S (H + D)^-1`` in ``weight``'s dtype, from the target product ``W S`` (see the module docstring).

    ``D`` is the start's damping (``damp * mean(diag H)``, grown if ``H + D`` does not
    factorise).  ``weight`` and ``product`` are ``(out, in)``; ``hessian`` is
    ``(in, in)`` (symmetric: the factorisation reads one triangle).  A zero
    ``product`` (inputs equal to the full-precision ones, e.g. the first block) returns
    ``weight`` unchanged.  ``overwrite_product``: work in ``product``'s storage where its
    dtype and device allow, for a caller that needs it no more (a weight-sized buffer
    less beside the Gram matrix and its factor, a wide layer's peak).  ``lend_hessian``:
    factorise in ``hessian``'s own storage where its dtype, device and layout allow,
    keeping its upper triangle aside and rebuilding it exactly before returning (half an
    ``in x in`` matrix beside it instead of a whole factor), for a caller whose Gram
    matrix nothing else reads meanwhile.
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features) or product.shape != (out_features, in_features):
        raise ValueError(
            f"the Gram matrix {tuple(hessian.shape)} must be ({in_features}, {in_features}) and the target "
            f"product {tuple(product.shape)} ({out_features}, {in_features}) for a weight of shape {tuple(weight.shape)}"
        )
    if not bool(product.any()):
        return weight
    weight, hessian, product = weight.detach(), hessian.detach(), product.detach()  # in-place solves refuse autograd
    dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    gram = hessian.to(device=weight.device, dtype=dtype)
    saved = SavedUpperTriangle(gram) if lend_hessian and gram is hessian and gram.is_contiguous() else None
    factor, _ = damped_cholesky(gram, damp, saved=saved)
    # W S H^-1 = (H^-1 (W S)^T)^T, and the aimed weight in the same storage: each
    # weight-sized temporary would add to the solve's peak
    correction_t = _solve_in_place(factor, product.to(device=weight.device, dtype=dtype, copy=not overwrite_product).T)
    del factor
    if saved is not None:
        saved.restore(hessian)
    return correction_t.mul_(strength).T.add_(weight).to(weight.dtype)


def _solve_in_place(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``(L L^T)^-1 rhs`` written over ``rhs``, for ``L`` the lower Cholesky ``factor``.

    The two triangular solves ``torch.cholesky_solve`` makes, each in place: it would
    first copy the factor and ``rhs`` (an ``in x in`` matrix and a weight-sized one
    beside the Gram matrix, at a wide layer's peak).  These are the two solves LAPACK's
    ``potrs`` makes, so the values are its own.
    """
    torch.linalg.solve_triangular(factor, rhs, upper=False, out=rhs)
    return torch.linalg.solve_triangular(factor.mT, rhs, upper=True, out=rhs)


def target_product(weight: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The target product ``W S`` of a layer whose target shift ``S`` was summed, in ``shift``'s dtype on its device."""
    return weight.to(device=shift.device, dtype=shift.dtype) @ shift


def target_product_from_outputs(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    outputs_product: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """The target product ``(Y_fp - Y)^T X`` from the summed ``Y_fp^T X``, in ``outputs_product``'s storage.

    ``Y = X W^T + b``, so ``Y^T X = W H + b s`` with ``s`` the sum of the inputs over the
    tokens (``input_sum``, ``1 x in``; needed with a ``bias``): subtracting it once here,
    from sums over every batch (and every rank), spares the quantized pass the layer's
    own output on each batch.  ``hessian`` is the layer's Gram matrix over the same
    tokens, in ``outputs_product``'s dtype and on its device.
    """
    dtype, device = outputs_product.dtype, outputs_product.device
    outputs_product.addmm_(weight.to(device=device, dtype=dtype), hessian, alpha=-1)
    if bias is not None:
        if input_sum is None:
            raise ValueError("a layer with a bias needs the sum of its inputs (input_sum) for its target product")
        outputs_product.addmm_(bias.to(device=device, dtype=dtype).reshape(-1, 1), input_sum.to(device=device, dtype=dtype), alpha=-1)
    return outputs_product
