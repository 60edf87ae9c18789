"""The solver's settings as plain values: names, choices, ranges and defaults.

Kept free of torch so that :mod:`hf_comq.settings` (and through it the ``hf-comq``
argument parser) can describe every setting before torch is imported;
:func:`hf_comq.solver.comq_quantize` takes its keyword defaults from here.  The defaults
that depend on the bit width live here too, the solver's (damping, scale refit) beside the
ones of the calibration (aiming at the full-precision outputs, and solving a block stage by stage).
"""

from __future__ import annotations

from typing import Any, Mapping

MIN_BITS = 2
MAX_BITS = 8
ORDERS = ("greedy", "sequential", "act_order")
START_POINTS = ("fp", "rtn", "error_feedback")
CLIP_WEIGHTS = ("conditional", "diagonal")
MAX_START_GRIDS = 4
SUM_DTYPES = ("float64", "float32")
"""Dtypes of the calibration sums (:class:`~hf_comq.solver.HessianAccumulator`, the target sums), by name."""

DEFAULTS: dict = dict(
    bits=4,
    group_size=None,
    symmetric=False,
    iterations=2,
    order="act_order",
    init="error_feedback",
    scale_refit=None,
    scale_search=True,
    clip_weights="conditional",
    start_grids=3,
    block_resolve=True,
    pair_moves=32,
    ridge=0.0,
    shrink=1.0,
    damp=None,
)
"""Defaults of the user-facing :func:`~hf_comq.solver.comq_quantize` settings (the one place they are written)."""

ROUND_TO_NEAREST: dict = dict(init="rtn", iterations=0, scale_refit=False, scale_search=False)
"""Settings that make :func:`comq_quantize` plain round-to-nearest on the min-max grid
(the baseline every table compares against)."""

ROUND_TO_NEAREST_MODEL: dict = dict(ROUND_TO_NEAREST, fp_target=False)
""":data:`ROUND_TO_NEAREST` as a whole model's settings (a ``COMQConfig``'s): the baseline rounds
each layer's own weight, never one aimed at the full-precision outputs, which ``fp_target=None``
would hand it at 4 bits and fewer (:func:`aims_at_full_precision_by_default`)."""

REFERENCE_CODE: dict = dict(
    init="fp", order="greedy", iterations=1, scale_refit=False, scale_search=False, pair_moves=0
)
"""Settings that reproduce the COMQ reference code's codes (paper-faithful mode: one
coordinate sweep, none of the moves added since)."""


START_ONLY_METHODS = {
    "fp": ("RTN", "round-to-nearest"),
    "rtn": ("RTN", "round-to-nearest"),
    "error_feedback": ("error-feedback rounding", "error-feedback rounding (GPTQ's act-order rounding)"),
}
"""What settings without a coordinate sweep (``iterations=0``) amount to, by start point:
``(short name, full name)``.  Every COMQ step after the start runs inside a sweep, so such
settings do not run COMQ at all: a baseline, to be named as one."""


def start_only_method(init: str, iterations: int) -> tuple[str, str] | None:
    """:data:`START_ONLY_METHODS`' names for settings that stop at their start; ``None`` where COMQ's sweeps run."""
    return START_ONLY_METHODS[init] if iterations == 0 else None


def unused_settings(settings: Mapping[str, Any]) -> dict[str, str]:
    """Solver settings that ``settings`` (a ``COMQConfig``'s or :func:`comq_quantize`'s values)
    leave without effect, each with why: ``{name: reason}``.

    Lets a record of a run (the model card) say which steps did not run instead of
    listing their values as if they had.  Mirrors where :func:`comq_quantize` reads them.
    """
    init, iterations = settings["init"], settings["iterations"]
    scale_search, clip_weights = settings["scale_search"], settings["clip_weights"]
    unused: dict[str, str] = {}
    if iterations == 0:
        for name in ("order", "scale_refit", "pair_moves", "block_resolve"):
            unused[name] = "no coordinate sweep"
    elif init != "error_feedback":
        unused["block_resolve"] = "error-feedback start only"
    if init != "error_feedback":
        unused["damp"] = "error-feedback start only"
    if not scale_search:
        unused["clip_weights"] = unused["start_grids"] = "no scale search"
    elif init != "error_feedback" or clip_weights != "conditional":
        unused["start_grids"] = "conditional clipping search of the error-feedback start only"
    return unused


def default_damp(bits: int) -> float:
    """Damping of the error-feedback start when ``damp=None``.

    Measured with ``benchmarks/bench_solver.py`` on real ViT and MiniLM activations
    and synthetic layers: 0.003 lowers the final objective at 4 bits on every layer
    tried, while at 3 and 2 bits it loses on some; 0.01 is GPTQ's customary value.
    """
    return 0.003 if bits >= 4 else 0.01


MAX_BITS_REFIT_BY_DEFAULT = 2
"""Widest codes whose solve refits the scales when ``scale_refit=None`` (see :func:`refits_by_default`)."""


def refits_by_default(bits: int) -> bool:
    """Whether ``scale_refit=None`` refits the scales after each sweep: at 2 bits only.

    The refit always lowers the layer objective, but whole models did better without it
    at 3 and 4 bits (SmolLM2's perplexity on 10 of 12 paired draws) and worse at 2 bits
    (SmolLM2 at group 64, the demo ViT's agreement with full precision); see
    benchmarks/README.md, "The scale refit at 2 bits only".
    """
    return bits <= MAX_BITS_REFIT_BY_DEFAULT


MAX_BITS_AIMED_BY_DEFAULT = 4
"""Widest codes whose block-sequential calibration aims each layer at the full-precision
outputs when ``fp_target=None`` (see :func:`aims_at_full_precision_by_default`)."""


def aims_at_full_precision_by_default(bits: int, sequential: bool = True) -> bool:
    """Whether ``fp_target=None`` aims each layer at the full-precision model's outputs: at 4 bits and fewer,
    in block-sequential calibration (the only mode with a quantized prefix whose error there is to cancel).

    The quantized prefix's error grows as the codes narrow, and so does what aiming past it
    buys; at 4 bits it still lowered SmolLM2's perplexity on every calibration draw (per channel
    and group 64) and brought DINOv2's features closer to full precision, for one more forward
    pass per block and a second sum per layer.  Wider codes, not measured, keep the cheaper
    calibration (benchmarks/README.md, "Aiming at 4 bits too").
    """
    return sequential and bits <= MAX_BITS_AIMED_BY_DEFAULT


def aims_at_full_precision(fp_target: bool | None, bits: int, sequential: bool = True) -> bool:
    """``fp_target`` as calibration applies it: ``None`` becomes :func:`aims_at_full_precision_by_default`.

    The one place ``None`` is resolved, so that what :func:`solves_in_stages_by_default`
    follows is the aiming calibration actually does."""
    return aims_at_full_precision_by_default(bits, sequential) if fp_target is None else bool(fp_target)


def solves_in_stages_by_default(fp_target: bool | None, bits: int, sequential: bool = True) -> bool:
    """Whether ``true_sequential=None`` solves each block's layers stage by stage: wherever they are aimed at
    the full-precision outputs (``fp_target`` as :func:`aims_at_full_precision` resolves it).

    Aimed, a stage's layers can correct the error of the stages before them in the same
    block, which they see only when those run quantized: SmolLM2's perplexity fell again at
    every 3- and 2-bit setting (on 8 of 9 paired draws).  In memory a held pass makes it about
    as dear as aiming alone (one quantized pass per block replaces a Gram pass and a
    quantized pass); where a block's stages cannot be held they run passes of their own, at
    a higher cost with the same codes.  Without aiming a layer is only asked for its own
    output on inputs that carry that error, and it helped little (benchmarks/README.md,
    "Stage by stage wherever layers are aimed").
    """
    return sequential and aims_at_full_precision(fp_target, bits, sequential)


def check_bits(bits: int, low: int = MIN_BITS) -> None:
    """The one bit-width rule: an integer in ``[low, MAX_BITS]`` (``low`` lower only for the packed layout's own range)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not low <= bits <= MAX_BITS:
        raise ValueError(
            f"bits must be an integer between {low} and {MAX_BITS}, got {bits!r}; "
            "pick 4 for near-lossless, 3 or 2 for stronger compression"
        )


def per_channel_as_none(group_size: Any) -> Any:
    """``group_size``, with -1 (the command line's and transformers' way to say "per channel") as ``None``."""
    return None if group_size == -1 else group_size


def resolve_group_size(in_features: int, group_size: int | None) -> int:
    """Columns per scale group of a layer with ``in_features`` inputs; the one group-size rule.

    Groups that straddle the end of a row would need ragged scale tensors in every
    consumer, so a non-dividing group size is rejected rather than silently padded.
    ``None`` and ``-1`` mean one group per row (per-channel scales).
    """
    group_size = per_channel_as_none(group_size)
    if group_size is None:
        return in_features
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
    if in_features % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features}; "
            f"use a divisor of {in_features} (e.g. 32, 64 or 128 where they divide) or group_size=None "
            "(hf-comq: --group-size -1) for per-channel scales"
        )
    return group_size


def check_flag(name: str, value: object, optional: bool = False) -> None:
    """The one rule for on/off settings: ``True`` or ``False`` (or ``None``, the default for
    the bit width, where ``optional``), never a truthy stand-in such as the string ``"False"``."""
    if value is None and optional:
        return
    if not isinstance(value, bool):
        choices = "True, False or None (the default for the bit width)" if optional else "True or False"
        raise ValueError(f"{name}: expected {choices}, got {value!r}")


def check_damp(damp: float | None) -> None:
    """The one ``damp`` rule: ``None`` (the bit width's default) or a finite number above zero.

    Zero would leave a rank-deficient ``H`` (fewer calibration tokens than inputs, a
    layer seen by few tokens) without the damping that makes its factorisation exist.
    """
    if damp is None:
        return
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not 0 < damp < float("inf"):
        raise ValueError(
            f"damp: expected a number > 0 or None, got {damp!r}; use a small positive damping such as 0.01, "
            "or None for the default"
        )


def check_pair_moves(pair_moves: int) -> None:
    """The one ``pair_moves`` rule: a whole number of candidates per row, 0 (off) or more."""
    if not isinstance(pair_moves, int) or isinstance(pair_moves, bool) or pair_moves < 0:
        raise ValueError(
            f"pair_moves: expected a non-negative integer, got {pair_moves!r}; use 0 (off) or e.g. 32 candidates per row"
        )


RIDGE_FROM_DATA = "auto"
"""The ``ridge`` setting that asks calibration for each layer's Ledoit-Wolf ridge
(:meth:`hf_comq.solver.HessianAccumulator.shrinkage_ridge`), which needs the layer's tokens, not only ``H``."""


def check_ridge(ridge: float | str, from_data_allowed: bool = False) -> None:
    """The one ``ridge`` rule: a finite number, zero or more (or, where the tokens are at hand, ``"auto"``)."""
    if from_data_allowed and ridge == RIDGE_FROM_DATA:
        return
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or not 0 <= ridge < float("inf"):
        hint = f", or {RIDGE_FROM_DATA!r} for one fitted to each layer's calibration tokens" if from_data_allowed else ""
        raise ValueError(f"ridge: expected a non-negative number, got {ridge!r}; use e.g. 0.01, or 0 for none{hint}")
