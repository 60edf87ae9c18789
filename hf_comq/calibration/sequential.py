"""Calibrate and quantize a loaded model with COMQ, one transformer block at a time.

Why block by block: COMQ only needs each layer's Gram matrix ``H = X^T X``, but ``X``
depends on everything before the layer.  Running the whole model once per layer is
quadratic; holding every layer's activations is out of the question for large
models.  So, as GPTQ implementations do, we capture the inputs of the first block of
each group once (a forward pass cut short by a pre-hook), then walk the blocks: hooks
feed the block's Linear inputs into ``HessianAccumulator``s while the block runs on
the cached inputs (a pass that ends at its last layer's input: its outputs are not
needed), the layers are quantized and swapped for ``COMQLinear``, and the block is
re-run to produce the next block's inputs.  Memory is one block's
activations for the calibration set plus that block's Hessians.

* ``sequential=True`` (default): layer inputs come from the already quantized prefix,
  so later blocks learn to compensate earlier quantization error.
* ``fp_target`` (block-sequential only; ``None``, the default, turns it on at 4 bits and
  fewer, :func:`~hf_comq.solver.options.aims_at_full_precision_by_default`): the full-precision model's inputs of each
  block are carried beside the quantized prefix's; each batch runs the block on both,
  and the layers' hooks sum the target shift ``(X_fp - X)^T X`` beside ``H`` (a layer
  narrower out than in sums ``Y_fp^T X`` instead, its target product ``(Y_fp - Y)^T X``
  once the solve takes off ``W H + b s``), so each layer is
  solved towards the full-precision outputs (:mod:`hf_comq.solver.target`).  That holds
  two sets of block inputs and a second sum per layer (``in x in``, or ``out x in``),
  and runs one more block forward per block.
  The full-precision stream restarts at each group's capture (e.g. a decoder after an
  encoder starts from the quantized encoder's outputs).
* ``true_sequential`` (block-sequential only; ``None``, the default, turns it on wherever
  layers are aimed, :func:`~hf_comq.solver.options.solves_in_stages_by_default`): a block's
  layers are solved in stages, each on inputs made by the quantized layers of the stages
  before it (:mod:`.stages`).
* ``sequential=False``: every layer sees full-precision inputs, as in the COMQ
  reference code.  Replacements are deferred to the end (the quantized codes wait on
  the CPU, about a quarter of the fp32 weights' size) so the prefix stays full
  precision when later groups are captured.

Layers outside the blocks (e.g. Swin's patch-merging ``reduction``) are quantized
too: a layer that runs before a group's first block gets its Hessian during that
group's capture pass (and, in sequential mode, the group is captured again after
it is quantized); the rest get one final full pass.  A quantizable layer that never
runs on the calibration data is left in full precision with a warning.

Devices and offload (:mod:`.placement`): compute happens on the first CUDA device if
there is one, else the CPU; a model dispatched by ``accelerate`` runs through its hooks,
and new quantized layers of CPU- or disk-offloaded blocks are offloaded again, so memory
stays about one block.

Threads (:mod:`hf_comq.threads`): on a CPU with the model in memory, a block small enough
that its GEMMs run on one thread anyway runs its calibration batches' forward passes side
by side, one per thread the caller gave, and then its layer solves; the Gram terms are
summed in batch order and the solves are independent, so the codes are one thread's.

Several processes (:mod:`.distributed`): under an initialised ``torch.distributed``
process group each rank runs its share of the calibration batches, each layer's Gram
matrix is summed over the ranks, each layer is solved by one rank and installed by all,
and every rank computes the next block's inputs for its own batches.

Block inputs besides the hidden state: blocks of one group share those (masks, rotary
embeddings) of its first block, except blocks declaring another layer type
(``layer_type`` / ``attention_type``, e.g. sliding-window layers), which use those
recorded at the first block of their type during the capture pass.  The capture's first
batch runs the whole group to check this; where the model hands some block inputs of its
own (T5 passes the relative position bias its first block computes to the others), each
block's are recorded from the full-precision model on every batch.  An encoder-decoder
model's decoder runs on the calibration text shifted right (T5 does not make decoder
inputs itself).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Callable

import torch
from torch import nn
from transformers.utils import logging

from ..checkpoint import zero_points_plain_loading_fails_on
from ..kernels import build_ahead
from ..kernels.gemm import with_linear_layers_through_onednn
from ..modules import (
    batched_expert_weights,
    expert_layers,
    expert_parameter_share,
    find_quantizable_linears,
    unfuse_batched_experts,
)
from ..nn import (
    computes_linear_map,
    every_token_to_every_expert,
    get_linear_weight,
    has_linear_shape,
    has_own_forward,
    linear_shape,
)
from ..solver import (
    RIDGE_FROM_DATA,
    SOLVER_DEFAULTS,
    SUM_DTYPES,
    HessianAccumulator,
    QuantizedWeight,
    RowShare,
    TargetProductAccumulator,
    aims_at_full_precision,
    can_share_rows,
    comq_quantize,
    fp_target_weight,
    shared_rows,
    solves_in_stages_by_default,
    target_product,
    target_product_from_outputs,
    widest_threaded_gemm,
)
from ..threads import (
    OnIdleCores,
    caller_threads,
    gets_caller_threads,
    linear_layer_threads,
    run_side_by_side,
    single_thread,
    thread_priority_is_per_thread,
)
from .blocks import BlockGroup, find_block_groups
from .data import CalibrationData, build_calibration_data
from .distributed import (
    Group,
    agree_on,
    agree_on_shared_inputs,
    agree_on_stages,
    agree_on_values,
    all_reduce_hessians,
    balanced_owners,
    current_group,
    gather_row_shares,
    share_solutions,
    sum_over_ranks,
)
from .hooks import (
    CapturedInputs,
    HessianRecorder,
    LayerCall,
    NotAChain,
    block_kind,
    capture_block_inputs,
    hidden_input,
    hidden_output,
    sums_target_product,
    token_mask,
)
from .placement import (
    Placement,
    block_on_compute,
    free_memory,
    install_built_layer,
    install_quantized_layer,
    install_unfused_experts,
    materialized,
    module_devices,
    release_file_mappings,
    release_file_pages,
    resolve_placement,
    retie_offloaded_weights,
    send_to_device,
    trim_heap,
)
from .processors import model_input_names
from .stages import PausedPass, QuantizedStandIns, StageStop, held_pass_slots, layer_stages, stages_in_call_order

logger = logging.get_logger(__name__)

__all__ = ["LayerSolver", "calibration_mode", "calibration_summary", "check_finite_weights", "quantize_model"]

LayerSolver = Callable[..., QuantizedWeight]
"""``solver(weight, hessian, **settings) -> QuantizedWeight``, with the signature of
:func:`hf_comq.comq_quantize`; benchmarks swap in other layer solvers (e.g. GPTQ)
to compare them inside the very same calibration pipeline.  ``hessian`` arrives in
the dtype COMQ solves in (float32): it is summed in float64, and the sum is converted
(and freed) before the solve, which for a wide layer would otherwise hold both.  The
solver also receives ``overwrite_hessian=True`` for a Gram matrix no later layer reads,
and may then use its storage as work space."""


@single_thread()  # checks and bookkeeping on one thread; the forward passes and solver size their own
def quantize_model(
    model: nn.Module, config: Any, solver: LayerSolver = comq_quantize, data: CalibrationData | None = None
) -> dict[str, Any]:
    """Quantize every quantizable Linear/Conv1D of ``model`` in place with COMQ.

    ``config`` is a ``COMQConfig`` (only attribute access is used).  ``solver`` is
    the per-layer solver (COMQ unless a benchmark swaps in another one).  ``data``:
    the calibration data built from ``config`` already (the quantizer builds it before
    the weights load, so a data mistake costs no load); ``None`` builds it here.  Returns a
    JSON-safe summary (layers quantized, bits, mean/max relative layer error, time,
    per-layer statistics), also stored as ``model._comq_summary`` and logged.
    Raises ``ValueError`` for a model with no quantizable layers or unusable
    calibration data, and :class:`~hf_comq.calibration.distributed.CalibrationGroupError`
    when the ranks of a process group disagree or one of them fails.
    """
    started = time.perf_counter()
    placement = resolve_placement(model)
    _unfuse_experts(model, config, placement)
    layers = _replaceable(find_quantizable_linears(model, getattr(config, "modules_to_not_convert", None)), placement)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no quantizable layers (nn.Linear / Conv1D outside modules_to_not_convert)"
        )
    weights = check_finite_weights(layers, placement.compute, release_pages=placement.dispatched)
    expert_parameters = _warn_about_expert_weights(model)
    _warn_about_zero_points_plain_loading_fails_on(model, layers, config)
    data = build_calibration_data(model, config) if data is None else data
    group = current_group()
    _warn_about_a_launcher_without_group(group)
    settings = _Settings.from_config(config, solver)
    agree_on(group, _fingerprint(model, layers, settings, config, data, parallel=group.is_parallel, weights=weights))
    if group.is_parallel:
        agree_on_values(group, _resident_parameter_digests(model, release_pages=placement.dispatched))
    inputs = _ModelInputs(model, data.shard(group.rank, group.size), placement)
    groups = find_block_groups(model, getattr(config, "block_name", None))
    calibrator = _Calibrator(model, settings, inputs, group, list(layers), groups)
    del layers  # the original modules: held here, every replaced weight would stay in memory to the end
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), linear_layer_threads(model), _caches_off(model):
            calibrator.run()
    finally:
        model.train(was_training)
    retie_offloaded_weights(model)
    summary = calibrator.summary(time.perf_counter() - started, data.num_samples)
    summary["expert_parameters_in_full_precision"] = expert_parameters
    model._comq_summary = summary
    _log_summary(summary)
    return summary


def _warn_about_zero_points_plain_loading_fails_on(model: nn.Module, layers: dict[str, nn.Module], config: Any) -> None:
    """Say before calibrating when plain transformers will not load the checkpoint for its narrowest
    layers' zero points (:func:`hf_comq.checkpoint.zero_points_plain_loading_fails_on`)."""
    shapes = {name: linear_shape(module) for name, module in layers.items() if isinstance(module, nn.Linear)}
    narrow = zero_points_plain_loading_fails_on(config.packed_scheme(), shapes)
    if narrow:
        logger.warning(
            "COMQ: %s has layers of 8 or fewer outputs (%s); at 4 bits on an asymmetric group-wise grid "
            "hf_comq.load_quantized loads the checkpoint, plain transformers does not (compressed-tensors cannot "
            "unpack their zero points): quantize with symmetric=True (hf-comq: --symmetric) for a checkpoint it loads",
            type(model).__name__, ", ".join(narrow[:3]) + (", ..." if len(narrow) > 3 else ""),
        )  # fmt: skip


def _warn_about_a_launcher_without_group(group: Any) -> None:
    """A process a launcher (``torchrun``) started as one of several, with no process group: it would
    calibrate on all the data alone, beside the others doing the same, and write the same files."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not group.is_parallel and world.isdigit() and int(world) > 1:
        logger.warning(
            "COMQ: this process is one of %s a launcher started (WORLD_SIZE), but no torch.distributed group is "
            "initialised, so it calibrates on all the data alone; call hf_comq.calibration.join_launcher_group() "
            "before from_pretrained to share the work", world,
        )  # fmt: skip


def calibration_summary(model: nn.Module) -> dict[str, Any]:
    """The summary :func:`quantize_model` left on ``model`` (empty for a model it did not quantize).

    ``from_pretrained`` returns the model, not the summary, so callers read it here
    instead of reaching for the attribute it is kept under.  A copy: what a caller
    does with it leaves the model's record as calibration wrote it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"calibration_summary takes the quantized model (an nn.Module), got {type(model).__name__}; a saved "
            "checkpoint records its calibration in config.json's quantization_config and in its model card"
        )
    return copy.deepcopy(getattr(model, "_comq_summary", None) or {})


def _replaceable(layers: dict[str, nn.Module], placement: Placement) -> dict[str, nn.Module]:
    """``layers`` without the subclasses whose forward is not their linear map, which stay in full precision.

    A :class:`~hf_comq.nn.COMQLinear` computes only the map, so in place of Llama 4's
    MoE router (which also returns the chosen experts) it would break the model; a
    subclass computing the same map its own way (Falcon's) is replaced as usual.
    """
    kept, dropped = {}, []
    for name, module in layers.items():
        if has_own_forward(module):
            with materialized(module, placement.compute), torch.no_grad():
                replaceable = computes_linear_map(module)
            if not replaceable:
                dropped.append(f"{name} ({type(module).__name__})")
                continue
        kept[name] = module
    if dropped:
        logger.info("COMQ: %d layer(s) computing more than their linear map stay in full precision: %s",
                    len(dropped), ", ".join(dropped[:4]) + (", ..." if len(dropped) > 4 else ""))  # fmt: skip
    return kept


def _unfuse_experts(model: nn.Module, config: Any, placement: Placement) -> None:
    """Give the model's batched experts per-expert layers to quantize (:func:`hf_comq.modules.unfuse_batched_experts`),
    placed where the batched ones lived in a dispatched model (offloaded ones offloaded again).
    ``from_pretrained`` may have given them already, loading a checkpoint that stores its
    experts one by one straight into them.

    On an asymmetric grid, say now that plain transformers will not load the
    checkpoint: its loader of packed experts drops their zero points.  Say too when
    ``calibrate_all_experts`` asks for something the model has no experts for.
    """
    install = install_unfused_experts if placement.dispatched else None
    unfuse_batched_experts(model, getattr(config, "modules_to_not_convert", None), install=install)
    quantized_experts = bool(expert_layers(model))
    if getattr(config, "calibrate_all_experts", False) and not quantized_experts:
        logger.warning(
            "COMQ: calibrate_all_experts=True has no effect on %s: it has no mixture-of-experts layers that COMQ "
            "quantizes; drop the setting",
            type(model).__name__,
        )
    if quantized_experts and not getattr(config, "symmetric", False):
        logger.warning(
            "COMQ: %s's experts are quantized on an asymmetric grid; hf_comq.load_quantized loads the checkpoint, "
            "plain transformers does not (it drops packed experts' zero points): quantize with symmetric=True "
            "(hf-comq: --symmetric) for a checkpoint it loads",
            type(model).__name__,
        )


def _warn_about_expert_weights(model: nn.Module) -> int:
    """Warn that a mixture-of-experts model's batched expert weights stay in full precision; returns their size.

    They are most of such a model, and nothing else would tell the user that the
    checkpoint is far larger than the bit width suggests (see
    :func:`hf_comq.modules.batched_expert_weights`).
    """
    experts = batched_expert_weights(model)
    if not experts:
        return 0
    share = expert_parameter_share(model, experts)
    logger.warning(
        "COMQ: %s keeps %d mixture-of-experts weight tensors (%.0f%% of its parameters, e.g. %s) in full "
        "precision: COMQ quantizes all of a model's experts or none, and only batched experts of the common "
        "layout (gate_up_proj and down_proj, no biases) when modules_to_not_convert keeps none of them "
        "(attention and the other linear layers are quantized)",
        type(model).__name__,
        len(experts),
        100 * share,
        next(iter(experts)),
    )
    return sum(experts.values())


def check_finite_weights(layers: dict[str, nn.Module], device: torch.device, *, release_pages: bool = False) -> str:
    """Raise for the first layer with a NaN or infinite weight, before any calibration work;
    return a digest of a sample of every layer's weight values.

    Found later, a bad weight would surface as NaN activations in the blocks after it
    (blamed on the data) or only after every block before it was calibrated.  With
    ``release_pages`` (a dispatched model, i.e. one loaded under a ``device_map`` or
    memory budget), a weight read from a mapped checkpoint does not stay resident
    because the check read it: its block reads it again when its turn comes.  The
    digest (exact bytes of about a thousand values a layer, read while the weight is
    here anyway) lets data-parallel ranks check that they loaded the same weights.
    """
    digest = hashlib.sha256()
    for name, module in layers.items():
        with materialized(module, device), torch.no_grad():
            weight = get_linear_weight(module)
            finite = torch.isfinite(weight)
            bad = 0 if bool(finite.all()) else int((~finite).sum())
            _digest_sample(digest, name, weight, 1024)
            if release_pages:
                release_file_pages(module.weight)
        if bad:
            raise ValueError(
                f"layer {name!r} has {bad} NaN or infinite weight value(s): the checkpoint is broken "
                "(or was saved after a diverged training step); quantize a checkpoint with finite weights"
            )
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What decides the quantized layers: the solver and its settings, the calibration mode."""

    solver: LayerSolver
    solver_kwargs: dict[str, Any]
    sequential: bool
    fp_target: bool
    true_sequential: bool
    symmetric: bool
    calibrate_all_experts: bool
    sum_dtype: torch.dtype

    @classmethod
    def from_config(cls, config: Any, solver: LayerSolver) -> "_Settings":
        sequential = bool(getattr(config, "sequential", True))
        bits = getattr(config, "bits", SOLVER_DEFAULTS["bits"])
        fp_target = aims_at_full_precision(getattr(config, "fp_target", False), bits, sequential)
        true_sequential = getattr(config, "true_sequential", None)
        if true_sequential is None:
            true_sequential = solves_in_stages_by_default(fp_target, bits, sequential)
        return cls(
            solver=solver,
            solver_kwargs={name: getattr(config, name) for name in SOLVER_DEFAULTS if hasattr(config, name)},
            sequential=sequential,
            fp_target=fp_target,
            true_sequential=bool(true_sequential),
            symmetric=bool(getattr(config, "symmetric", False)),
            calibrate_all_experts=bool(getattr(config, "calibrate_all_experts", False)),
            sum_dtype=getattr(torch, getattr(config, "sum_dtype", SUM_DTYPES[0])),
        )

    def solver_kwargs_for(self, accumulator: HessianAccumulator) -> dict[str, Any]:
        """The solver's settings for one layer: a ridge asked for as ``"auto"`` becomes its Ledoit-Wolf amount."""
        if self.solver_kwargs.get("ridge") != RIDGE_FROM_DATA:
            return self.solver_kwargs
        return {**self.solver_kwargs, "ridge": accumulator.shrinkage_ridge()}

    @property
    def hessian_dtype(self) -> torch.dtype:
        """The dtype the solver computes in, which the Gram matrices are handed over in."""
        return self.solver_kwargs.get("compute_dtype", SOLVER_DEFAULTS["compute_dtype"])


class _ModelInputs:
    """This rank's calibration batches as model inputs on the input device, each with its real-token mask."""

    def __init__(self, model: nn.Module, data: CalibrationData, placement: Placement):
        self.data = data
        self.model = model
        self.placement = placement
        self.dtype = _floating_dtype(model)
        self.forward_kwargs = _forward_kwargs(model)
        self.decoder_inputs = _decoder_inputs_maker(model)
        self.decoder_inputs_wanted = _decoder_inputs_wanted(model)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
        device = self.placement.input_device
        for batch in self.data:
            inputs = {name: _as_input(value, device, self.dtype) for name, value in batch.items()}
            _check_decoder_inputs(self.model, inputs, self.decoder_inputs_wanted)
            if self.decoder_inputs is not None and "input_ids" in inputs and "decoder_input_ids" not in inputs:
                inputs["decoder_input_ids"] = self.decoder_inputs(labels=inputs["input_ids"])
            yield inputs, token_mask(batch, self.placement.compute)


class _Calibrator:
    """One calibration run: walks the block groups, records Hessians, solves and installs layers."""

    def __init__(
        self,
        model: nn.Module,
        settings: _Settings,
        inputs: _ModelInputs,
        group: Group,
        layers: list[str],
        groups: list[BlockGroup],
    ):
        self.model = model
        self.settings = settings
        self.inputs = inputs
        self.group = group
        self.groups = groups
        self.unchained: list[BlockGroup] = []  # lists found as blocks that do not run back to back (NotAChain)
        self.pending = list(layers)
        self.routed = expert_layers(model)  # experts' layers: each sees only the tokens routed to its expert
        self.unrouted: list[str] = []
        self.results: dict[str, dict[str, float]] = {}
        self.skipped: dict[str, str] = {}
        # Wall time in the layer solves (each _quantize_layers call, as the caller waits for it): the part
        # of a run that does not grow with the calibration data, unlike the passes that make the sums.
        self.solve_seconds = 0.0
        self.deferred: list[tuple[str, QuantizedWeight]] = []
        # With fp_target: the current block's inputs in the full-precision model (the
        # very list of the quantized-prefix inputs while the two are still the same).
        self.fp_inputs: list[CapturedInputs] | None = None
        self.checked_size = False
        # With true_sequential: each block layout's stages (layer names relative to the block).
        self.stage_layouts: dict[tuple[str, ...], list[list[str]]] = {}
        # ... and whether a held pass solves them (None where it cannot), in call order.
        self.held_layouts: dict[tuple[str, ...], list[list[str]] | None] = {}
        # The next block's full-precision pass, started while this block is solved (_start_targets_ahead).
        self.targets_ahead: _TargetsAhead | None = None
        # Whether every rank runs under accelerate's hooks (one process: this one): only then does every rank
        # take a block's stages pass by pass (a rank in memory may solve them from one held pass), so only
        # then can a stage's sums be summed apart (_sums_apart) on every rank alike.
        self.every_rank_dispatched = sum_over_ranks(group, [float(inputs.placement.dispatched)])[0] == group.size

    @property
    def compute(self) -> torch.device:
        return self.inputs.placement.compute

    @property
    def block_names(self) -> list[str]:
        return [block for group in self.groups if group not in self.unchained for block in group.block_names]

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        total = len(self.block_names) + 1
        if self.compute.type == "cpu":
            build_ahead()  # a first build's pause and notice before the progress bar, not inside it
        with logging.tqdm(total=total, desc="COMQ calibration", unit="block", disable=not self.group.is_main) as bar:
            try:
                for group in self.groups:
                    self._run_group(group, bar)
            finally:  # a block that failed leaves no pass running ahead
                if self.targets_ahead is not None:
                    self.targets_ahead.close()
                    self.targets_ahead = None
            self._run_remaining()
            for name, qweight in self.deferred:
                self._install(name, qweight)
            self.deferred.clear()
            # The finished bar doubles as the visible summary (the log line is INFO level).
            bits = self.settings.solver_kwargs.get("bits")
            bar.set_postfix(layers=len(self.results), bits=bits, **self._error_so_far())
            bar.update(1)
        if not self.results:
            raise ValueError(
                "no layer ran on the calibration data, so nothing was quantized; check that the data match the model"
            )
        if self.unrouted:
            logger.warning(
                "COMQ: the router sent no calibration token to %d expert layer(s), e.g. %s; they were rounded to "
                "the nearest grid point instead (more calibration samples reach more experts; "
                "calibrate_all_experts=True, hf-comq: --calibrate-all-experts, solves every expert on every "
                "calibration token)",
                len(self.unrouted),
                self.unrouted[0],
            )

    def _run_group(self, group: BlockGroup, bar: Any) -> None:
        try:
            captured = self._capture(group)
        except NotAChain as reason:
            logger.info("COMQ: %s is not a list of blocks run back to back (%s); its layers are calibrated "
                        "one by one", group.name, reason)  # fmt: skip
            self.unchained.append(group)
            bar.update(len(group))
            return
        if captured is None:
            self._skip_group(group)
            bar.update(len(group))
            return
        self._check_size(captured)
        for index, block_name in enumerate(group.block_names):
            captured = self._process_block(block_name, captured, following=group.block_names[index + 1 :])
            trim_heap()  # the block's Gram sums and weights were freed: their pages go back, not just to the heap
            bar.set_postfix(block=block_name, **self._error_so_far())
            bar.update(1)

    def _skip_group(self, group: BlockGroup) -> None:
        logger.warning(
            "COMQ: the blocks of %s never ran on the calibration inputs; their layers stay in full precision",
            group.name,
        )
        for block_name in group.block_names:
            for name in self._pending_under(block_name):
                self._skip(name, "its block never ran on the calibration data")

    # ------------------------------------------------------------------ capture
    def _capture(self, group: BlockGroup) -> list[CapturedInputs] | None:
        """Inputs of the group's first block for every batch; layers running before it are quantized on the way."""
        outside = self._pending_outside_blocks()
        captured, accumulators = self._capture_pass(group, outside)
        fired = [name for name in outside if accumulators[name].num_tokens > 0]
        self._quantize_layers(fired, accumulators)
        full_precision = captured
        if fired and self.settings.sequential and captured is not None:
            captured, _ = self._capture_pass(group, [])  # the group must see the quantized prefix
        self.fp_inputs = full_precision if self.settings.fp_target else None
        return captured

    def _capture_pass(
        self, group: BlockGroup, hessian_layers: list[str]
    ) -> tuple[list[CapturedInputs] | None, dict[str, HessianAccumulator]]:
        with self._recorder(hessian_layers) as recorder:
            captured, count, reached = capture_block_inputs(
                self.model, group, iter(self.inputs), recorder, self.inputs.forward_kwargs, self.compute
            )
        if self.inputs.placement.dispatched:
            self._release_capture_pages(group)
        batches, missed = sum_over_ranks(self.group, [count, 0 if reached else 1])
        self._check_batches(batches)
        self._sum_over_ranks(recorder)
        return (captured if missed == 0 else None), recorder.accumulators

    def _release_capture_pages(self, group: BlockGroup) -> None:
        """Give back the pages of the mapped checkpoint that nothing reads before their turn.

        The capture runs the model up to the group: the modules outside every block (the
        input embeddings above all, often a language model's largest weight) are read
        again only by a later group's capture or once the model is used or saved, and the
        capture's first batch also runs every block of the group (see
        :func:`~.hooks.capture_block_inputs`).  Loading left pages of the weights it
        offloaded to disk mapped as well.  Under a memory budget all of these would
        otherwise stay resident for the rest of the run, not only for their own turn (the
        reason :func:`check_finite_weights` gives back the pages it reads); the weights of
        the other groups' blocks keep theirs.
        """
        in_blocks = tuple(f"{block}." for block in self.block_names)
        in_group = tuple(f"{block}." for block in group.block_names)
        params = dict(self.model.named_parameters())
        keep = [param for name, param in params.items() if name.startswith(in_blocks) and not name.startswith(in_group)]
        release_file_mappings(params.values(), keep=keep)

    def _check_batches(self, total: float) -> None:
        if total == 0:
            raise ValueError(
                "the calibration dataset is too small: it produced no usable batch (e.g. only empty texts)"
            )

    def _check_size(self, captured: list[CapturedInputs]) -> None:
        """Reject calibration sets with no tokens; warn when every Hessian would be rank-deficient."""
        if self.checked_size:
            return
        self.checked_size = True
        tokens, width = 0, 0
        for item in captured:
            hidden = hidden_input(item)
            width = hidden.shape[-1]
            tokens += int(item.mask.sum()) if item.mask is not None else hidden.shape[:-1].numel()
        # A rank without batches knows no width: average it over the ranks that have some.
        tokens, width, holders = (int(v) for v in sum_over_ranks(self.group, [tokens, width, 1 if captured else 0]))
        width //= max(holders, 1)
        if tokens == 0:
            raise ValueError("the calibration dataset is too small: it holds no tokens")
        if tokens < width:
            logger.warning(
                "COMQ calibration: only %d tokens for hidden size %d; the Hessians are rank-deficient and the "
                "quantization will be poor. Use more (or longer) calibration samples",
                tokens,
                width,
            )

    # ------------------------------------------------------------------ blocks
    def _process_block(
        self, block_name: str, captured: list[CapturedInputs], following: Sequence[str]
    ) -> list[CapturedInputs]:
        """Calibrate one block on its inputs ``captured``; the next block's inputs unless no block ``following`` it
        in the group needs them."""
        need_outputs = bool(following)
        if self.settings.true_sequential:
            return self._process_block_in_stages(block_name, captured, following)
        block = self.model.get_submodule(block_name)
        names = self._pending_under(block_name)
        fp_inputs, self.fp_inputs = self.fp_inputs, None
        targeted = fp_inputs is not None and fp_inputs is not captured
        keep_fp_outputs = need_outputs and (not self.settings.sequential or fp_inputs is captured)
        # a pass whose outputs nobody reads ends once the block's layers were reached (not under
        # accelerate's hooks, whose offloading runs after a module's forward)
        cut_short = not self.inputs.placement.dispatched and (targeted or not keep_fp_outputs)
        with block_on_compute(block, self.inputs.placement):
            with (
                self._recorder(names, with_targets=targeted) as recorder,
                StageStop(self.model, names) if cut_short else nullcontext() as stop,
                self._expert_routing(block),
            ):
                if targeted:
                    fp_outputs = self._run_block_with_targets(
                        block_name, captured, fp_inputs, recorder, collect=need_outputs, stop=stop
                    )
                else:
                    fp_outputs = self._run_block(block_name, captured, recorder, collect=keep_fp_outputs, stop=stop)
            del fp_inputs
            self._sum_over_ranks(recorder)
            self._quantize_layers(names, recorder.accumulators, products=recorder.target_products)
            outputs = fp_outputs
            if need_outputs and self.settings.sequential:
                outputs = self._run_block(block_name, captured, None, collect=True)
        if self.settings.fp_target and need_outputs:
            self.fp_inputs = fp_outputs
        return outputs

    def _process_block_in_stages(
        self, block_name: str, captured: list[CapturedInputs], following: Sequence[str]
    ) -> list[CapturedInputs]:
        """:meth:`_process_block` with ``true_sequential``: the block's layers solved stage by stage (:mod:`.stages`).

        Each stage's Gram matrices (and target shifts) come from a pass in which the
        layers of earlier stages run quantized, ended at the input of the stage's last
        layer where the block is not dispatched.  The quantized layers are installed once
        every stage is solved; until then the full-precision stream of ``fp_target``
        runs the block as it was.  With ``fp_target`` a stage after the first is aimed
        at the full-precision outputs even in a block whose inputs are still the
        full-precision ones: the stages before it already changed its inputs.

        The full-precision stream does not depend on what is solved, so where the block
        is not dispatched one pass of it keeps every stage's targets for every batch
        (:meth:`_full_precision_targets`) and collects the next block's; each stage
        then runs the quantized stream alone.  Under accelerate's hooks (a memory
        budget) the targets are not held for the whole block: each targeted stage runs
        both streams, and the first stage's full-precision pass runs to the block's end
        to collect.

        Where every batch can be held at each stage instead (:meth:`_held_stages`), one
        pass of the quantized stream solves every stage and makes the next block's
        inputs (:meth:`_solve_stages_held`), with the same sums and codes; meanwhile the
        next block's full-precision pass may run on the cores it leaves idle
        (:meth:`_start_targets_ahead`).
        """
        block = self.model.get_submodule(block_name)
        need_outputs = bool(following)
        fp_inputs, self.fp_inputs = self.fp_inputs, None
        keep_fp_outputs = need_outputs and self.settings.fp_target
        with_targets = fp_inputs is not None  # fp_inputs may be freed below, once its targets are kept
        aimed_from_start = with_targets and fp_inputs is not captured
        fp_outputs: list[CapturedInputs] = []
        solved: list[str] = []
        with block_on_compute(block, self.inputs.placement):
            cached = None
            if with_targets and not self.inputs.placement.dispatched:  # first: its pass may be running ahead
                cached, fp_outputs = self._full_precision_targets(block_name, fp_inputs, collect=keep_fp_outputs)
                fp_inputs = None
            stages = self._stages(block_name, captured)
            held = self._held_stages(block_name, stages, captured)
            if held is not None:
                if fp_outputs:  # the next block's inputs: its full-precision pass may run while this block is solved
                    self._start_targets_ahead(following[0], fp_outputs, collect=len(following) > 1)
                outputs = self._solve_stages_held(block_name, held, captured, cached, aimed_from_start, need_outputs)
                if self.settings.fp_target and need_outputs:
                    self.fp_inputs = fp_outputs
                return outputs
            with QuantizedStandIns(self.model, self.compute, self.settings.symmetric) as stand_ins:
                for index, stage in enumerate(stages):
                    targeted = with_targets and (index > 0 or aimed_from_start)
                    collect = keep_fp_outputs and index == 0 and cached is None
                    # a targeted pass's full-precision stream runs to the end to collect; its quantized one need not
                    cut_short = not self.inputs.placement.dispatched and (targeted or not collect)
                    apart = targeted and self._sums_apart(stage)  # dispatched only, so never with cached targets
                    with (
                        self._recorder(stage, with_targets=targeted, gram=not apart) as recorder,
                        StageStop(self.model, stage) if cut_short else nullcontext() as stop,
                        self._expert_routing(block),
                    ):
                        if targeted and cached is None:
                            outputs = self._run_block_with_targets(
                                block_name, captured, fp_inputs, recorder, collect=collect, stop=stop,
                                stand_ins=stand_ins,
                            )  # fmt: skip
                        else:
                            outputs = self._run_block(
                                block_name, captured, recorder, collect=collect, stop=stop, stand_ins=stand_ins,
                                targets=cached if targeted else None,
                            )  # fmt: skip
                    if index == len(stages) - 1:
                        self._release_solved_weights(solved)
                    products = recorder.target_products
                    if apart:
                        recorder = self._gram_pass_after_products(block_name, stage, captured, products, stand_ins)
                    if collect:
                        fp_outputs = outputs
                    solved.extend(self._solve_stage(stage, recorder, stand_ins, products))
            del fp_inputs, cached
            for name in solved:
                self._install_stand_in(name, stand_ins)
            outputs = self._run_block(block_name, captured, None, collect=True) if need_outputs else []
        if self.settings.fp_target and need_outputs:
            self.fp_inputs = fp_outputs
        return outputs

    def _release_solved_weights(self, names: Iterable[str]) -> None:
        """Hand back the pages of the full-precision weights of a dispatched block's solved layers once its last
        full-precision pass is over (:func:`~.placement.release_file_pages`).

        The full-precision stream runs the whole block as it was, so a solved layer's
        weight stays mapped until the block's last stage has run that stream; the
        quantized stream runs the solved layers as stand-ins, and installing them needs
        their codes alone.  A block kept in CPU memory under a budget holds its weights
        as pages of the mapped checkpoint, which would otherwise stay resident through
        the last stage's solve, the widest of the block.
        """
        if self.inputs.placement.dispatched:
            for name in names:
                release_file_pages(self.model.get_submodule(name).weight)

    def _sums_apart(self, stage: list[str]) -> bool:
        """Whether a targeted stage sums its target products in one pass and its Gram matrices in another.

        A layer narrower out than in (an MLP's down projection) sums an ``in x in`` Gram
        matrix and an ``out x in`` target product over the same tokens, both in float64
        by default: on a wide model they are the largest buffers of a run under a memory
        budget, and side by side they make its peak.  Summed apart, the target products
        are turned into the solver's dtype (half their size) before the Gram matrices
        begin, at the cost of one more pass of the quantized stream; the sums, and so the
        codes, are the very same.  Only under accelerate's hooks (a memory budget:
        elsewhere the extra pass would cost time for nothing), on every rank of a group
        (the ranks then sum the products after the first pass and the Gram matrices after
        the second, all in the same order; a rank that summed both after one pass would
        not pair with them), with sums wider than the solver's dtype (float32 sums would
        not shrink), and where no layer of the stage needs the target shift, which comes
        from the full-precision stream in the Gram matrix's own pass.
        """
        if not self.every_rank_dispatched:
            return False
        if self.settings.sum_dtype.itemsize <= self.settings.hessian_dtype.itemsize:
            return False
        aimed = [name for name in stage if name not in self.routed]
        return bool(aimed) and all(sums_target_product(*linear_shape(self.model.get_submodule(name))) for name in aimed)

    def _gram_pass_after_products(
        self,
        block_name: str,
        stage: list[str],
        captured: list[CapturedInputs],
        products: dict[str, TargetProductAccumulator],
        stand_ins: QuantizedStandIns,
    ) -> HessianRecorder:
        """The second pass of a stage summed apart (:meth:`_sums_apart`): ``products`` (summed by the first) handed
        over in the solver's dtype first (summed over the ranks before, in their own width), then the quantized stream
        again to sum the Gram matrices; returns its recorder."""
        all_reduce_hessians(self.group, [product for _, product in sorted(products.items())])
        for product in products.values():
            product.result(self.settings.hessian_dtype)
        with self._recorder(stage) as recorder, self._expert_routing(self.model.get_submodule(block_name)):
            self._run_block(block_name, captured, recorder, collect=False, stand_ins=stand_ins)
        return recorder

    def _solve_stage(
        self,
        stage: list[str],
        recorder: HessianRecorder,
        stand_ins: QuantizedStandIns,
        products: dict[str, TargetProductAccumulator] | None = None,
    ) -> list[str]:
        """Solve one stage from its recorder's sums (over every rank), and ``products`` where another
        recorder summed its target products (:meth:`_sums_apart`); its layers then run quantized in the
        quantized stream (``stand_ins``) until the block installs those.  Returns the layers solved."""
        self._sum_over_ranks(recorder)
        products = recorder.target_products if products is None else products
        solutions = self._quantize_layers(stage, recorder.accumulators, install=False, products=products)
        for name, qweight in solutions.items():
            stand_ins.add(name, qweight)
        return list(solutions)

    def _held_stages(
        self, block_name: str, stages: list[list[str]], captured: list[CapturedInputs]
    ) -> list[list[str]] | None:
        """The stages in call order where a held pass (:class:`~.stages.PausedPass`) solves the block, else ``None``.

        Not under accelerate's hooks (a memory budget), nor where every batch's activations
        alive at once would not fit (:meth:`_held_passes_fit`), nor for experts (their
        tokens are routed per batch); and only where :func:`~.stages.stages_in_call_order`
        finds the block's layers called once each, a stage's layers on one input, decided
        once per block layout on this rank's first batch.  Ranks may differ here: both
        ways run the same collectives, stage by stage, and those pair a stage's layers by
        name (:meth:`_quantize_layers`, :meth:`~.hooks.HessianRecorder.sums`), whatever
        order each rank holds them in.
        """
        names = [name for stage in stages for name in stage]
        if self.inputs.placement.dispatched or not captured or any(name in self.routed for name in names):
            return None
        block = self.model.get_submodule(block_name)
        if not self._held_passes_fit(block, captured):
            return None
        layout = _relative_to(block_name, names)
        if layout not in self.held_layouts:
            args, kwargs = captured[0].call_inputs(block_name, block_kind(block))
            found = stages_in_call_order(self.model, stages, lambda: block(*args, **kwargs))
            self.held_layouts[layout] = None if found is None else [list(_relative_to(block_name, stage)) for stage in found]
        found = self.held_layouts[layout]
        return None if found is None else _inside(block_name, found)

    def _held_passes_fit(self, block: nn.Module, captured: list[CapturedInputs], passes: int = 1) -> bool:
        """Whether every batch's pass through ``block`` can be alive at once: the inputs and outputs of all the
        block's linear layers for every batch's tokens (about what held passes keep) within half the compute
        device's free memory, leaving the rest to the allocator and the solves; room for ``passes`` of them
        (a held pass and, beside it, the next block's full-precision pass ahead, which keeps less)."""
        tokens = sum(hidden_input(item).shape[:-1].numel() for item in captured)
        per_token = sum(sum(linear_shape(module)) for module in block.modules() if has_linear_shape(module))
        held = tokens * per_token * hidden_input(captured[0]).element_size()
        return held <= free_memory(self.compute) // (2 * passes)

    def _solve_stages_held(
        self,
        block_name: str,
        stages: list[list[str]],
        captured: list[CapturedInputs],
        targets: list[list[LayerCall]] | None,
        aimed_from_start: bool,
        collect: bool,
    ) -> list[CapturedInputs]:
        """Solve the block stage by stage in one held pass of every batch; with ``collect``, the block's outputs.

        ``targets``: each batch's full-precision pass (:meth:`_full_precision_targets`)
        where the stages are aimed at the full-precision outputs; the first stage only
        with ``aimed_from_start``, as in :meth:`_process_block_in_stages`.  Each stage's
        sums replay the held batches' inputs in batch order, as the side-by-side passes
        of :meth:`_run_block` do, each batch's as it arrives while later ones still run
        up to the stage, in a compute slot of the pass's own (one slot more than the
        batches' threads: :func:`~.stages.held_pass_slots`); once the stage is solved
        its layers run quantized for the rest of the pass.  A batch's targets of a stage
        are dropped from ``targets`` once summed, so what the block keeps shrinks while
        the next block's pass ahead grows.
        """
        block = self.model.get_submodule(block_name)
        kind = block_kind(block)
        stand_ins = QuantizedStandIns(self.model, self.compute, self.settings.symmetric)

        def run(item: CapturedInputs) -> torch.Tensor | None:
            args, kwargs = item.call_inputs(block_name, kind)
            with stand_ins.active():
                result = block(*args, **kwargs)
            return send_to_device(hidden_output(result), self.compute) if collect else None

        jobs = [self._pass_job(functools.partial(run, item)) for item in captured]
        solved: list[str] = []
        slots = held_pass_slots(self._forward_workers(block, captured))
        with PausedPass(self.model, stages, jobs, slots) as paused, stand_ins:
            for index, stage in enumerate(stages):
                targeted = targets is not None and (index > 0 or aimed_from_start)
                # each batch summed as it arrives, while later ones still run up to the stage
                with self._recorder(stage, with_targets=targeted, replay_only=True) as recorder:
                    for batch, hidden in paused.arrivals(index):
                        calls = [(name, hidden, None, None) for name in stage]
                        with paused.caller_turn():
                            recorder.replay(calls, captured[batch].mask, targets=targets[batch] if targeted else None)
                        if targets is not None:  # the batch keeps only the later stages' targets
                            targets[batch] = [call for call in targets[batch] if call[0] not in stage]
                solved.extend(self._solve_stage(stage, recorder, stand_ins))
                trim_heap()  # each batch's thread freed its stage's temporaries in a heap of its own
                paused.release(index)
            results = paused.outputs()
        for name in solved:
            self._install_stand_in(name, stand_ins)
        return [item.with_hidden(value) for item, value in zip(captured, results)] if collect else []

    def _stages(self, block_name: str, captured: list[CapturedInputs]) -> list[list[str]]:
        """The block's pending layers in stages (:func:`layer_stages`), found once per block layout.

        Found on this rank's first batch; ranks agree on the lowest rank's stages, so
        their collectives pair up (a rank without batches finds none).
        """
        names = self._pending_under(block_name)
        layout = _relative_to(block_name, names)
        if layout not in self.stage_layouts:
            block = self.model.get_submodule(block_name)
            found = None
            if captured:
                args, kwargs = captured[0].call_inputs(block_name, block_kind(block))
                with self._expert_routing(block):
                    found = layer_stages(self.model, names, lambda: block(*args, **kwargs))
                found = [list(_relative_to(block_name, stage)) for stage in found]
            self.stage_layouts[layout] = agree_on_stages(self.group, found)
        return _inside(block_name, self.stage_layouts[layout])

    def _run_block(
        self,
        block_name: str,
        captured: list[CapturedInputs],
        recorder: HessianRecorder | None,
        collect: bool,
        stop: StageStop | None = None,
        stand_ins: QuantizedStandIns | None = None,
        targets: list[list[LayerCall]] | None = None,
    ) -> list[CapturedInputs]:
        """Every batch through ``block``, its layers' inputs summed by ``recorder``; the outputs with ``collect``.

        The batches run side by side where :meth:`_forward_workers` allows; their Gram
        terms are then summed in batch order all the same (see
        :meth:`HessianRecorder.calls_later`), so the sums do not depend on the threads.
        ``stop`` cuts each pass short at the input of a stage's last layer (no outputs then);
        ``stand_ins`` run the block's solved layers quantized; ``targets``: each batch's
        full-precision pass, kept by :meth:`_full_precision_targets`, for a recorder
        made ``with_targets``.
        """
        block = self.model.get_submodule(block_name)
        kind = block_kind(block)
        workers = self._forward_workers(block, captured, targeted=targets is not None)

        def forward(index: int) -> tuple[list | None, torch.Tensor | None]:
            item = captured[index]
            args, kwargs = item.call_inputs(block_name, kind)
            if recorder is None:
                scope = nullcontext()
            elif workers > 1:
                scope = recorder.calls_later()
            else:
                if targets is not None:
                    recorder.keep_targets(targets[index], item.mask)
                scope = recorder.tokens(item.mask)
            with scope as calls, stand_ins.active() if stand_ins is not None else nullcontext():
                result = stop.run(block, args, kwargs) if stop is not None else block(*args, **kwargs)
            return calls, (send_to_device(hidden_output(result), self.compute) if collect else None)

        def finish(index: int, forwarded: tuple[list | None, torch.Tensor | None]) -> CapturedInputs | None:
            calls, hidden = forwarded
            if calls is not None:
                recorder.replay(calls, captured[index].mask, targets=None if targets is None else targets[index])
            return captured[index].with_hidden(hidden) if collect else None

        jobs = [self._pass_job(functools.partial(forward, index)) for index in range(len(captured))]
        outputs = run_side_by_side(jobs, workers, in_order=finish)
        return outputs if collect else []

    def _full_precision_targets(
        self, block_name: str, fp_inputs: list[CapturedInputs], collect: bool
    ) -> tuple[list[list[LayerCall]], list[CapturedInputs]]:
        """One full-precision pass of every batch through the block: what each of its layers' targets needs
        (:meth:`HessianRecorder.target_calls`), per batch, and the block's outputs with ``collect``.

        ``true_sequential`` reads every stage's targets from it instead of running the
        full-precision stream again for each stage; nothing is summed here.  The pass
        started ahead while the block before was solved (:meth:`_start_targets_ahead`)
        is finished here instead, with the same results.
        """
        ahead, self.targets_ahead = self.targets_ahead, None
        if ahead is not None and ahead.block_name == block_name:
            passes = ahead.results()
        else:
            if ahead is not None:
                ahead.close()
            block = self.model.get_submodule(block_name)
            names = self._pending_under(block_name)
            with self._recorder(names, with_targets=True) as recorder, self._expert_routing(block):
                jobs = self._full_precision_jobs(block_name, fp_inputs, recorder, collect)
                passes = run_side_by_side(jobs, self._forward_workers(block, fp_inputs))
        return [targets for targets, _ in passes], [hidden for _, hidden in passes] if collect else []

    def _full_precision_jobs(
        self, block_name: str, fp_inputs: list[CapturedInputs], recorder: HessianRecorder, collect: bool
    ) -> list[Callable[[], tuple[list[LayerCall], CapturedInputs | None]]]:
        """Each batch's full-precision pass through the block, its calls kept by ``recorder`` (made ``with_targets``
        on the block's pending layers); the block's output for the batch with ``collect``."""
        block = self.model.get_submodule(block_name)
        kind = block_kind(block)

        def forward(item: CapturedInputs) -> tuple[list[LayerCall], CapturedInputs | None]:
            args, kwargs = item.call_inputs(block_name, kind)
            with recorder.calls_later(full_precision=True) as calls:
                result = block(*args, **kwargs)
            hidden = item.with_hidden(send_to_device(hidden_output(result), self.compute)) if collect else None
            return recorder.target_calls(calls), hidden

        return [self._pass_job(functools.partial(forward, item)) for item in fp_inputs]

    def _start_targets_ahead(self, block_name: str, fp_inputs: list[CapturedInputs], collect: bool) -> None:
        """Start the full-precision pass of ``block_name`` (the next block) on the cores a held pass leaves idle,
        where that changes nothing but the time (:class:`~hf_comq.threads.OnIdleCores`).

        A held pass keeps some cores idle (a lone layer solve runs on one thread, the
        caller waits for batches), and the next block's full-precision stream depends
        on nothing solved here.  Only where its batches would run side by side anyway
        (each on one torch thread, as the pass ahead runs them: the same targets to the
        last bit), on the CPU with the block's weights there, with no experts (routed
        per batch), and where its kept targets fit beside the held pass
        (:meth:`_held_passes_fit`, for the two together).
        """
        block = self.model.get_submodule(block_name)
        names = self._pending_under(block_name)
        workers = self._forward_workers(block, fp_inputs)
        if (
            workers <= 1
            or not thread_priority_is_per_thread()
            or self.compute.type != "cpu"
            or module_devices(block) != {self.compute}
            or any(name in self.routed for name in names)
            or not self._held_passes_fit(block, fp_inputs, passes=2)
        ):
            return
        recorder = self._recorder(names, with_targets=True)
        passes = OnIdleCores(self._full_precision_jobs(block_name, fp_inputs, recorder, collect), workers)
        self.targets_ahead = _TargetsAhead(block_name, recorder, passes.__enter__())

    def _pass_job(self, job: Callable[[], Any]) -> Callable[[], Any]:
        """A batch's forward pass as it runs: on the CPU, its linear layers (a pass's largest
        operators) through oneDNN's float32 GEMM (:func:`~hf_comq.kernels.gemm.linear_layers_through_onednn`);
        elsewhere as it is (the mode's per-operator dispatch would cost a GPU pass more than it
        could save)."""
        return with_linear_layers_through_onednn(job) if self.compute.type == "cpu" else job

    def _forward_workers(self, block: nn.Module, captured: list[CapturedInputs], targeted: bool = False) -> int:
        """Threads for a block's forward passes over the batches (see :meth:`_side_by_side_workers`).

        The largest operators are each linear layer's GEMM and its Gram product for the
        longest batch (``2 * tokens * in * max(out, in)`` bounds both); ``targeted``: the
        Gram product comes with the target shift's full ``in x in`` product or the target
        product's ``out x in``, the pair bounded by ``3 * tokens * in * max(out, in)``.
        """
        tokens = max((hidden_input(item).shape[:-1].numel() for item in captured), default=0)
        shapes = (linear_shape(module) for module in block.modules() if has_linear_shape(module))
        per_token = 3.0 if targeted else 2.0
        return self._side_by_side_workers(len(captured), (per_token * tokens * i * max(o, i) for o, i in shapes))

    def _run_block_with_targets(
        self,
        block_name: str,
        captured: list[CapturedInputs],
        fp_inputs: list[CapturedInputs],
        recorder: HessianRecorder,
        collect: bool,
        stop: StageStop | None = None,
        stand_ins: QuantizedStandIns | None = None,
    ) -> list[CapturedInputs]:
        """Each batch through the full-precision stream (its layer inputs kept as targets), then the quantized one.

        Returns the full-precision stream's block outputs (with ``collect``): the block
        is still in full precision here, so they are the next block's targets.  Batches
        run side by side as in :meth:`_run_block`, each batch's two passes on one
        worker, and are summed in batch order all the same.  ``stop`` and ``stand_ins``
        as in :meth:`_run_block`, for the quantized stream only.
        """
        block = self.model.get_submodule(block_name)
        kind = block_kind(block)
        workers = self._forward_workers(block, captured, targeted=True)

        def forward(pair: tuple[CapturedInputs, CapturedInputs]) -> tuple[list | None, list | None, torch.Tensor | None]:
            item, fp_item = pair
            args, kwargs = fp_item.call_inputs(block_name, kind)
            # to its end: the stop ends a pass at layers' inputs, where this one keeps some layers' outputs
            with recorder.calls_later(full_precision=True) if workers > 1 else recorder.targets(fp_item.mask) as targets:
                result = block(*args, **kwargs)
            hidden = send_to_device(hidden_output(result), self.compute) if collect else None
            del result
            args, kwargs = item.call_inputs(block_name, kind)
            with (
                recorder.calls_later() if workers > 1 else recorder.tokens(item.mask) as calls,
                stand_ins.active() if stand_ins is not None else nullcontext(),
            ):
                stop.run(block, args, kwargs) if stop is not None else block(*args, **kwargs)
            return targets, calls, hidden

        def finish(index: int, forwarded: tuple[list | None, list | None, torch.Tensor | None]) -> CapturedInputs | None:
            targets, calls, hidden = forwarded
            if calls is not None:
                recorder.replay(calls, captured[index].mask, targets=targets)
            return fp_inputs[index].with_hidden(hidden) if collect else None

        pairs = zip(captured, fp_inputs, strict=True)
        jobs = [self._pass_job(functools.partial(forward, pair)) for pair in pairs]
        outputs = run_side_by_side(jobs, workers, in_order=finish)
        return outputs if collect else []

    def _run_remaining(self) -> None:
        """One full pass for quantizable layers outside the blocks that no capture pass reached."""
        names = list(self.pending)
        if not names:
            return
        count = 0
        with self._recorder(names) as recorder, self._expert_routing(self.model):
            for batch, mask in self.inputs:
                count += 1
                with recorder.tokens(mask):
                    self.model(**batch, **self.inputs.forward_kwargs)
        self._check_batches(sum_over_ranks(self.group, [count])[0])
        self._sum_over_ranks(recorder)
        self._quantize_layers(names, recorder.accumulators)

    def _recorder(
        self, names: list[str], with_targets: bool = False, replay_only: bool = False, gram: bool = True
    ) -> HessianRecorder:
        """A recorder of these layers' calibration sums, in the configured ``sum_dtype``."""
        return HessianRecorder(
            self.model, names, self.compute, with_targets=with_targets, dtype=self.settings.sum_dtype,
            replay_only=replay_only, gram=gram,
        )

    def _expert_routing(self, module: nn.Module) -> Any:
        """How the experts under ``module`` route while their Gram matrices are summed: every
        token to every expert with ``calibrate_all_experts``, else as the router says."""
        return every_token_to_every_expert(module) if self.settings.calibrate_all_experts else nullcontext()

    def _sum_over_ranks(self, recorder: HessianRecorder) -> None:
        agree_on_shared_inputs(self.group, recorder)
        all_reduce_hessians(self.group, recorder.sums())

    # ------------------------------------------------------------------ quantization
    def _quantize_layers(
        self,
        names: list[str],
        accumulators: dict[str, HessianAccumulator],
        install: bool = True,
        products: dict[str, TargetProductAccumulator] | None = None,
    ) -> dict[str, QuantizedWeight]:
        """Solve ``names`` (each by one rank of the group, or a wide one by every rank, a share of its rows each)
        and install the results on every rank.

        Returns every rank's solutions, none where each was installed as soon as it was solved
        (:meth:`_installs_each_as_solved`); with ``install=False`` the caller installs them.
        ``products``: the target products of the layers that sum theirs from outputs
        (:attr:`HessianRecorder.target_products`).
        """
        products = {} if products is None else products
        tokens = {name: accumulators[name].num_tokens for name in names}
        unrouted = [name for name in names if name in self.routed and tokens[name] == 0]
        solvable = []
        for name in names:
            self.pending.remove(name)
            if tokens[name] == 0 and name not in unrouted:
                self._skip(name, "it never ran on the calibration data")
            else:
                solvable.append(name)
        started = time.perf_counter()
        self._round_unrouted(unrouted, accumulators)
        # Owners, and the broadcasts that follow them, go by name: ranks may hold a stage's layers in
        # different orders (a held pass takes them in call order, which one rank may find and another not).
        by_name = sorted(solvable)
        costs = [self._cost(name) for name in by_name]
        owners = dict(zip(by_name, balanced_owners(costs, self.group.size, [self._shares_rows(name) for name in by_name])))
        for name in solvable:  # Gram matrices of layers another rank solves go now
            if owners[name] not in (self.group.rank, None):
                del accumulators[name]
                products.pop(name, None)
        own = [name for name in solvable if owners[name] == self.group.rank]
        in_shares = [name for name in by_name if owners[name] is None]
        if install and self._installs_each_as_solved():
            results: dict[str, dict[str, float]] = {}

            def install_now(name: str, qweight: QuantizedWeight) -> None:
                results[name], qweight = _result_and_solution(qweight, tokens[name])
                self._install(name, qweight)

            self._solve_own(own, accumulators, products, then=install_now)
            self.results.update((name, results[name]) for name in solvable)  # in the model's order
            self.solve_seconds += time.perf_counter() - started
            return {}
        my_shares = self._solve_shares(in_shares, accumulators, products, later=own)
        mine = self._solve_own(own, accumulators, products)
        solutions = {}
        shared = share_solutions(self.group, mine, {name: owner for name, owner in owners.items() if owner is not None})
        shared.update(gather_row_shares(self.group, my_shares, self._rows_of_share))
        for name in solvable:  # in the model's order, which the summary and the card list
            self.results[name], qweight = _result_and_solution(shared[name], tokens[name])
            solutions[name] = qweight
            if not install:
                continue
            if self.settings.sequential:
                self._install(name, qweight)
            else:
                self.deferred.append((name, _to_cpu(qweight)))
        self.solve_seconds += time.perf_counter() - started
        return solutions

    def _installs_each_as_solved(self) -> bool:
        """Whether a solved layer is installed at once rather than once every layer of its step is solved.

        Under accelerate's hooks (a memory budget) in one process: the solves of a step run one
        at a time there, and installed at once a layer's codes and its old weight's mapped pages
        do not stay through the step's later solves, a block's widest (its down projection)
        among them.  Ranks share a step's solutions only after all of them, and a model in
        memory solves layers side by side, where installing (swapping modules) would race.
        """
        return self.settings.sequential and self.inputs.placement.dispatched and not self.group.is_parallel

    def _round_unrouted(self, names: list[str], accumulators: dict[str, HessianAccumulator]) -> None:
        """Give the expert layers no token was routed to the identity as their Gram matrix.

        Their objective is then the weight error itself, the round-to-nearest fit on
        the solver's grid.  Such experts cannot stay in full precision: a checkpoint
        whose experts are partly packed, partly dense loads in no runtime.  Layers
        sharing one accumulator (an expert that saw only padding: gate and up) get it once.
        """
        for accumulator in {id(accumulators[name]): accumulators[name] for name in names}.values():
            accumulator.add(torch.eye(accumulator.in_features, device=self.compute))
        self.unrouted.extend(names)

    def _hand_over(self, accumulators: list[HessianAccumulator]) -> None:
        """Turn summed triangles into the solver's full matrices in its dtype before the first solve.

        A float64 triangle and the full float32 matrix are about the same size, and the
        triangle's blocks are freed as they are copied, so this costs no room; done
        here, smallest first, no solve's work space ever sits beside a half-made copy.
        A float32 triangle (``sum_dtype="float32"``) is half its full matrix: those are
        handed over by their own solve (:meth:`_solve_own` passes only the ones that
        several jobs read, which must not mirror one matrix on two threads at once).
        """
        distinct = {id(accumulator): accumulator for accumulator in accumulators}
        for accumulator in sorted(distinct.values(), key=lambda accumulator: accumulator.in_features):
            accumulator.result(self.settings.hessian_dtype)
            if accumulator.with_target:
                accumulator.target_shift(self.settings.hessian_dtype)

    def _solve_own(
        self,
        names: list[str],
        accumulators: dict[str, HessianAccumulator],
        products: dict[str, TargetProductAccumulator],
        then: Callable[[str, QuantizedWeight], None] | None = None,
    ) -> dict[str, QuantizedWeight]:
        """Solve this rank's layers of a step, in ``names``' order; ``then``: hand each solution to it as soon
        as it is made instead of returning them all (on one worker only, see :meth:`_installs_each_as_solved`).

        Layers that read one Gram matrix (q/k/v, gate/up) are solved one after another,
        the last allowed to overwrite it, and the matrix is freed with that solve;
        different Gram matrices are solved side by side on the caller's threads (see
        :meth:`_solve_workers`).  Where there are fewer Gram matrices than threads (a
        stage of ``true_sequential``: q/k/v alone), the readers of one are solved side by
        side too, none overwriting it: each solve works on its own copy anyway.
        """
        readers: dict[int, tuple[HessianAccumulator, list[str]]] = {}
        for name in names:
            accumulator = accumulators.pop(name)
            readers.setdefault(id(accumulator), (accumulator, []))[1].append(name)
        pending: list[tuple[HessianAccumulator, list[str]] | None] = list(readers.values())
        del readers
        workers = self._solve_workers(names, len(pending))
        if len(pending) < len(names) and self._solve_workers(names, len(names)) > workers:
            pending = [(accumulator, [name]) for accumulator, group in pending for name in group]
            workers = self._solve_workers(names, len(pending))
        jobs_reading = collections.Counter(id(accumulator) for accumulator, _ in pending)
        lazily = self.settings.sum_dtype != torch.float64  # see _hand_over
        self._hand_over([accumulator for accumulator, _ in pending if not lazily or jobs_reading[id(accumulator)] > 1])
        order = range(len(pending))
        if workers > 1:  # the costliest first, so that no worker is left with a wide layer at the end
            order = sorted(order, key=lambda index: -sum(self._cost(name) for name in pending[index][1]))

        def solve_readers(index: int) -> dict[str, QuantizedWeight]:
            accumulator, group = pending[index]
            pending[index] = None  # the Gram matrix goes when its last reader is solved
            # the last reader may overwrite its Gram matrix unless another job reads it too
            alone = jobs_reading[id(accumulator)] == 1
            made = {}
            for name in group:
                qweight = self._solve(name, accumulator, products.pop(name, None), last_reader=alone and name == group[-1])
                if then is None:
                    made[name] = qweight
                else:
                    then(name, qweight)
            return made

        if then is not None:
            workers = 1
        solved: dict[str, QuantizedWeight] = {}
        for part in run_side_by_side([functools.partial(solve_readers, index) for index in order], workers):
            solved.update(part)
        return {name: solved[name] for name in names if name in solved}

    def _solve_shares(
        self,
        names: list[str],
        accumulators: dict[str, HessianAccumulator],
        products: dict[str, TargetProductAccumulator],
        later: list[str],
    ) -> dict[str, QuantizedWeight]:
        """This rank's share of the rows of each layer in ``names``, which every rank solves together
        (:func:`~hf_comq.calibration.distributed.balanced_owners`), one layer at a time in ``names``' order
        on every rank: each share's solve sums its objective with the others' as it goes.

        They run before this rank's own layers (``later``), so that no rank waits in a shared solve
        for another's own layers; a Gram matrix that one of those reads is left for them intact.
        """
        if not names:
            return {}
        if self.settings.sum_dtype == torch.float64:  # see _hand_over
            self._hand_over([accumulators[name] for name in names])
        total = functools.partial(sum_over_ranks, self.group, purpose="sum a shared layer's objective")
        solved = {}
        for index, name in enumerate(names):
            accumulator = accumulators.pop(name)
            last_reader = all(accumulators.get(other) is not accumulator for other in [*names[index + 1 :], *later])
            share = RowShare(self.group.rank, self.group.size, linear_shape(self.model.get_submodule(name))[0], total)
            solved[name] = self._solve(name, accumulator, products.pop(name, None), last_reader, share)
        return solved

    def _shares_rows(self, name: str) -> bool:
        """Whether the ranks can solve this layer together, a share of its rows each (COMQ's own solver only)."""
        out_features, in_features = linear_shape(self.model.get_submodule(name))
        return self.settings.solver is comq_quantize and can_share_rows(
            out_features, in_features, self.group.size, self.settings.hessian_dtype
        )

    def _rows_of_share(self, name: str, rank: int) -> list[slice]:
        """The rows of layer ``name`` that ``rank`` solves when the ranks share it."""
        out_features, in_features = linear_shape(self.model.get_submodule(name))
        return shared_rows(out_features, in_features, rank, self.group.size, self.settings.hessian_dtype)

    def _solve_workers(self, names: list[str], jobs: int) -> int:
        """Threads for one step's solves (see :meth:`_side_by_side_workers`); a solve's largest
        operator is its widest threaded GEMM."""
        shapes = (linear_shape(self.model.get_submodule(name)) for name in names)
        return self._side_by_side_workers(
            jobs, (widest_threaded_gemm(*shape, **self.settings.solver_kwargs) for shape in shapes)
        )

    def _side_by_side_workers(self, jobs: int, largest_operators: Iterable[float]) -> int:
        """Threads for ``jobs`` independent pieces of work (solves, batches' forward passes):
        the caller's, at most one per job, on a CPU with the model in memory; else one.

        Work whose every operator is under the pool's size runs on one thread whatever
        the caller gave, so jobs side by side, one torch thread each, are what uses the
        caller's cores.  Work with an operator of that size (``largest_operators``, in
        floating point operations) keeps the caller's threads inside it, one job at a time;
        so does work under accelerate's hooks (offload under a memory budget: one job's
        memory at a time is what bounds it) and on a GPU (one job fills the device).
        """
        if jobs < 2 or self.compute.type != "cpu" or self.inputs.placement.dispatched:
            return 1
        if any(gets_caller_threads(flops) for flops in largest_operators):
            return 1
        return min(caller_threads(), jobs)

    def _cost(self, name: str) -> float:
        """A layer's solve cost for balancing ranks and workers: its weight's size."""
        out_features, in_features = linear_shape(self.model.get_submodule(name))
        return float(out_features) * in_features

    def _solve(
        self,
        name: str,
        accumulator: HessianAccumulator,
        product: TargetProductAccumulator | None,
        last_reader: bool,
        share: RowShare | None = None,
    ) -> QuantizedWeight:
        """Solve one layer, or with ``share`` this rank's share of its rows; with ``fp_target`` its weight is
        first aimed at the full-precision outputs, from its Gram matrix's target shift or from its own target
        ``product`` (the share's rows only: rows are aimed independently)."""
        module = self.model.get_submodule(name)
        started = time.perf_counter()
        rows = None if share is None else self._rows_of_share(name, share.index)
        with materialized(module, self.compute):
            weight = _rows(get_linear_weight(module).detach(), rows).to(self.compute)
            bias = getattr(module, "bias", None) if product is not None else None
            bias = None if bias is None else _rows(bias.detach(), rows).to(self.compute)
        try:
            dtype = self.settings.hessian_dtype
            hessian = accumulator.result(dtype)
            target = None
            if accumulator.with_target:
                target = target_product(weight, accumulator.target_shift(dtype))
            elif product is not None:  # this solve is the product's only reader: it goes with the aimed weight
                outputs_product, input_sum = _rows(product.result(dtype), rows), product.input_sum(dtype)
                product = None  # a share's rows are a copy: the whole product goes before they are aimed
                target = target_product_from_outputs(weight, hessian, outputs_product, bias, input_sum)
            if target is not None:
                weight = fp_target_weight(weight, hessian, target, overwrite_product=True, lend_hessian=last_reader)
                del target
            qweight = self.settings.solver(
                weight, hessian, **self.settings.solver_kwargs_for(accumulator),
                **({"overwrite_hessian": True} if last_reader else {}), **({"share": share} if share else {}),
            )
        except ValueError as error:
            raise ValueError(f"COMQ could not quantize {name!r}: {error}") from error
        return dataclasses.replace(qweight, stats={**qweight.stats, "seconds": time.perf_counter() - started})

    def _install(self, name: str, qweight: QuantizedWeight) -> None:
        install_quantized_layer(self.model, name, qweight, symmetric=self.settings.symmetric, compute=self.compute)

    def _install_stand_in(self, name: str, stand_ins: QuantizedStandIns) -> None:
        """Install a block's layer solved in a stage as its stand-in, the packed layer made from its codes then:
        the stage's codes (a byte per weight) are not kept beside it until the block's last stage is solved.

        The stand-in ran on the compute device; it goes where :meth:`_install` would build the layer, on
        the old layer's device (its own GPU in a model spread over several, which its hook keeps running it on).
        """
        def stand_in(module: nn.Module) -> nn.Module:
            return stand_ins.packed(name).to(get_linear_weight(module).device)

        install_built_layer(self.model, name, stand_in, self.compute)

    # ------------------------------------------------------------------ bookkeeping
    def _skip(self, name: str, reason: str) -> None:
        if name in self.pending:
            self.pending.remove(name)
        self.skipped[name] = reason
        logger.warning("COMQ: %s stays in full precision: %s", name, reason)

    def _pending_under(self, block_name: str) -> list[str]:
        prefix = f"{block_name}."
        return [name for name in self.pending if name.startswith(prefix)]

    def _pending_outside_blocks(self) -> list[str]:
        blocks = self.block_names
        return [name for name in self.pending if not any(name.startswith(f"{block}.") for block in blocks)]

    def _error_so_far(self) -> dict[str, str]:
        """The progress bar's mean relative error of every layer solved so far; nothing before the first
        (a block whose layers are all kept in full precision showed ``nan``)."""
        errors = [result["relative_error"] for result in self.results.values()]
        return {"mean_rel_err": f"{sum(errors) / len(errors):.3g}"} if errors else {}

    def summary(self, seconds: float, num_samples: int) -> dict[str, Any]:
        errors = [result["relative_error"] for result in self.results.values()]
        return {
            "layers_quantized": len(self.results),
            "layers_skipped": dict(sorted(self.skipped.items())),
            "bits": self.settings.solver_kwargs.get("bits"),
            "group_size": self.settings.solver_kwargs.get("group_size"),
            "sequential": self.settings.sequential,
            "fp_target": self.settings.fp_target,
            "true_sequential": self.settings.true_sequential,
            "num_blocks": len(self.block_names),
            "num_samples": num_samples,
            "mean_relative_error": sum(errors) / len(errors) if errors else None,
            "max_relative_error": max(errors) if errors else None,
            "time_s": round(seconds, 3),
            "solve_time_s": round(self.solve_seconds, 3),
            "device": str(self.compute),
            "ranks": self.group.size,
            "expert_layers_without_tokens": sorted(self.unrouted),
            "layers": self.results,
        }


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _TargetsAhead:
    """A block's full-precision pass running ahead (:meth:`_Calibrator._start_targets_ahead`), and the
    recorder whose hooks keep its calls (they stay on the block's layers until the pass is done)."""

    block_name: str
    recorder: HessianRecorder
    passes: OnIdleCores

    def results(self) -> list[tuple[list[LayerCall], CapturedInputs | None]]:
        """Each batch's pass, once the ones not run ahead have run here."""
        try:
            return self.passes.results()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the pass after the batch it is running, and take the recorder's hooks off the layers."""
        self.passes.__exit__(None, None, None)
        self.recorder.__exit__(None, None, None)


def _relative_to(block_name: str, names: Iterable[str]) -> tuple[str, ...]:
    """Layer names relative to their block: a block layout's key, the same for every block built alike."""
    prefix = len(block_name) + 1
    return tuple(name[prefix:] for name in names)


def _inside(block_name: str, stages: list[list[str]]) -> list[list[str]]:
    """Stages of names relative to a block (:func:`_relative_to`) as the full names of that block's layers."""
    return [[f"{block_name}.{name}" for name in stage] for stage in stages]


def _fingerprint(
    model: nn.Module, layers: dict[str, nn.Module], settings: _Settings, config: Any, data: Any,
    parallel: bool = False, weights: str | None = None,
) -> str:  # fmt: skip
    """What every rank of a data-parallel run must share: model, layers, settings and calibration data.

    ``parallel``: also the content of the data's first batch, not only its description
    (in-memory data of the same kind and length describes alike on every rank), and the
    ``weights`` digest of :func:`check_finite_weights` (two checkpoints of one
    architecture have the same layers and shapes).
    """
    calibration = {name: getattr(config, name, None) for name in ("batch_size", "seed", "max_length", "block_name")}
    if parallel:
        calibration["first_batch"] = _first_batch_digest(data)
    return json.dumps(
        {
            "model": type(model).__name__,
            "weights": weights if parallel else None,
            "layers": [[name, list(linear_shape(module))] for name, module in layers.items()],
            "solver": getattr(settings.solver, "__qualname__", repr(settings.solver)),
            "settings": settings.solver_kwargs,
            "sequential": settings.sequential,
            "fp_target": settings.fp_target,
            "true_sequential": settings.true_sequential,
            "symmetric": settings.symmetric,
            "calibrate_all_experts": settings.calibrate_all_experts,
            "sum_dtype": str(settings.sum_dtype),
            "calibration": calibration,
            "data": data.description,
        },
        sort_keys=True,
        default=str,
    )


@contextmanager
def _caches_off(model: nn.Module) -> Iterator[None]:
    """``use_cache=False`` in every config the model's modules read, put back afterwards.

    A forward that takes ``use_cache`` only through ``**kwargs`` (many task heads and
    multimodal models) cannot be told so by :func:`_forward_kwargs`; its decoder then
    makes a cache from its config, the captured block inputs carry it, and every rerun of
    a block appends its keys to the same cache: attention then sees earlier passes' keys.
    Nested models (a VLM's language model) read their own config, hence every module's.
    """
    configs = {id(config): config for config in _module_configs(model) if getattr(config, "use_cache", None)}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


def _module_configs(model: nn.Module) -> Iterator[Any]:
    """The ``config`` of the model and of every module that has one, with its nested text config."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        yield config
        text_config = getattr(config, "get_text_config", None)
        if callable(text_config):
            yield text_config()


def _resident_parameter_digests(model: nn.Module, *, release_pages: bool = False) -> dict[str, str]:
    """A digest of a sample of each parameter held in memory (embeddings, norms, biases; those offloaded
    to disk are left out), by name, so that ranks compare more than the layers
    :func:`check_finite_weights` reads, whatever each of them offloaded.

    ``release_pages`` as in :func:`check_finite_weights`: a few hundred values spread over a
    parameter read from a mapped checkpoint fault in all of its pages (the kernel maps a
    page's neighbours with it), and a model's embedding and output matrices, kept in memory
    under a budget, would then stay resident to the end of calibration.
    """
    digests = {}
    for name, parameter in model.named_parameters():
        if parameter.device.type != "meta":
            digest = hashlib.sha256()
            _digest_sample(digest, name, parameter.detach(), 256)
            digests[name] = digest.hexdigest()
            if release_pages:
                release_file_pages(parameter.detach())
    return digests


def _digest_sample(digest: Any, name: str, tensor: torch.Tensor, values: int) -> None:
    """Add about ``values`` evenly spaced values of ``tensor`` (their exact bytes) to ``digest``, under ``name``."""
    sample = tensor.reshape(-1)[:: max(1, tensor.numel() // values)].cpu().contiguous()
    digest.update(f"{name} {sample.dtype}".encode())
    digest.update(sample.view(torch.uint8).numpy().tobytes())


def _first_batch_digest(data: Any) -> str:
    """A digest of the data's first model-input batch (before any sharding): names, shapes and bytes.

    A batch that cannot be made gives its error's type instead: the ranks then compare
    that, and the error itself comes up where calibration handles a failing rank."""
    try:
        batch = next(iter(data), None)
    except Exception as error:  # reported by the calibration pass, where every rank is told
        return f"no batch: {type(error).__name__}"
    digest = hashlib.sha256()
    for name, tensor in sorted((batch or {}).items()):
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {values.dtype} {tuple(values.shape)}".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Turn off KV caches: calibration forwards must not allocate or return them."""
    return {"use_cache": False} if "use_cache" in (model_input_names(model) or ()) else {}


def _decoder_inputs_maker(model: nn.Module) -> Callable[..., torch.Tensor] | None:
    """What makes an encoder-decoder model's decoder inputs from the calibration text: its own
    ``prepare_decoder_input_ids_from_labels``, else a shift right by ``decoder_start_token_id``.

    Some such models make the decoder's inputs from ``input_ids`` themselves (BART);
    others (T5, M2M100, the bare ``T5Model``) stop without them.  The decoder is calibrated
    on the same text as the encoder, shifted right as in training, so its tokens line up
    with the batch's real-token mask.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        return prepare
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        return None
    pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else start
    return functools.partial(_shifted_right, start=start, pad=pad)


def _shifted_right(labels: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    """Decoder inputs for target ``labels``: the start token, then each label but the last (-100 as padding)."""
    shifted = torch.full_like(labels, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill_(shifted == -100, pad)


def _decoder_inputs_wanted(model: nn.Module) -> str | None:
    """What an encoder-decoder model's batches must hold when they hold no text to shift
    (``decoder_input_ids``, or ``labels`` where its forward takes them); ``None`` for other models."""
    names = model_input_names(model) or set()
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False) or "decoder_input_ids" not in names:
        return None
    return "decoder_input_ids or labels" if "labels" in names else "decoder_input_ids"


def _check_decoder_inputs(model: nn.Module, inputs: Mapping[str, Any], wanted: str | None) -> None:
    """An encoder-decoder model given no text to make decoder inputs from (Whisper's audio features alone)."""
    if wanted is None or "input_ids" in inputs:
        return
    if {"decoder_input_ids", "decoder_inputs_embeds", "labels"} & set(inputs):  # labels: the model shifts them itself
        return
    raise ValueError(
        f"{type(model).__name__} is an encoder-decoder model and the calibration inputs hold no text to run its "
        f"decoder on: pass dicts that also hold {wanted} (e.g. the tokenized transcripts or targets)"
    )


def _floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The model's float dtype: processors return float32 pixel values even for bf16/fp16 models."""
    for tensor in model.parameters():
        if tensor.dtype.is_floating_point:
            return tensor.dtype
    return None


def _as_input(value: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and value.dtype.is_floating_point:
        return value.to(device=device, dtype=dtype)
    return value.to(device)


def _result_and_solution(qweight: QuantizedWeight, num_tokens: int) -> tuple[dict[str, float], QuantizedWeight]:
    """A solved layer's entry in the calibration summary, and the solution with its solve time moved there."""
    stats = dict(qweight.stats)
    result = {
        "relative_error": float(stats["relative_error"]),
        "num_tokens": int(num_tokens),
        "seconds": round(float(stats.pop("seconds")), 4),
    }
    return result, dataclasses.replace(qweight, stats=stats)


def _rows(tensor: torch.Tensor, rows: list[slice] | None) -> torch.Tensor:
    """The rows ``rows`` of ``tensor`` one after another (a row share's: see :meth:`_Calibrator._rows_of_share`);
    ``tensor`` itself for ``None``."""
    return tensor if rows is None else torch.cat([tensor[span] for span in rows])


def _to_cpu(qweight: QuantizedWeight) -> QuantizedWeight:
    return dataclasses.replace(
        qweight, codes=qweight.codes.cpu(), scale=qweight.scale.cpu(), zero_point=qweight.zero_point.cpu()
    )


def calibration_mode(summary: dict[str, Any]) -> str:
    """How the layers were calibrated, in words, from a :func:`quantize_model` summary (for logs and the CLI)."""
    if not summary["sequential"]:
        return "full-precision inputs"
    mode = "true-sequential" if summary.get("true_sequential") else "block-sequential"
    return f"{mode}, aimed at full-precision outputs" if summary["fp_target"] else mode


def _log_summary(summary: dict[str, Any]) -> None:
    mean = summary["mean_relative_error"]
    logger.info(
        "COMQ: quantized %d layers to %s bits (%s, %d blocks, %d samples, %d rank(s)) in %.1f s (%.1f s of it "
        "solving layers); mean relative squared layer error %s%s",
        summary["layers_quantized"],
        summary["bits"],
        calibration_mode(summary),
        summary["num_blocks"],
        summary["num_samples"],
        summary["ranks"],
        summary["time_s"],
        summary["solve_time_s"],
        f"{mean:.4g}" if mean is not None else "n/a",
        f"; {len(summary['layers_skipped'])} layers left in full precision" if summary["layers_skipped"] else "",
    )
