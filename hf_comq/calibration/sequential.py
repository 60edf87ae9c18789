"""Calibrate and quantize a loaded model with COMQ, one transformer block at a time.

Why block by block: COMQ only needs each layer's Gram matrix ``H = X^T X``, but ``X``
depends on everything before the layer.  Running the whole model once per layer is
quadratic; holding every layer's activations is out of the question for large
models.  So, as GPTQ implementations do, we capture the inputs of the first block of
each group once (a forward pass cut short by a pre-hook), then walk the blocks: hooks
feed the block's Linear inputs into ``HessianAccumulator``s while the block runs on
the cached inputs, the layers are quantized and swapped for ``COMQLinear``, and the
block is re-run to produce the next block's inputs.  Memory is one block's
activations for the calibration set plus that block's Hessians.

* ``sequential=True`` (default): layer inputs come from the already quantized prefix,
  so later blocks learn to compensate earlier quantization error.
* ``sequential=False``: every layer sees full-precision inputs, as in the COMQ
  reference code.  Replacements are deferred to the end (the quantized codes wait on
  the CPU, about a quarter of the fp32 weights' size) so the prefix stays full
  precision when later groups are captured.

Layers outside the blocks (e.g. Swin's patch-merging ``reduction``) are quantized
too: a layer that runs before a group's first block gets its Hessian during that
group's capture pass (and, in sequential mode, the group is captured again after
it is quantized); the rest get one final full pass.  A quantizable layer that never
runs on the calibration data is left in full precision with a warning.

Devices: compute happens on the first CUDA device if there is one, else the CPU.
An undispatched model has each block moved there while it is processed; a model
dispatched by ``accelerate`` (``device_map``) runs through its hooks, offloaded
weights are materialised with ``accelerate.utils.align_module_device``, and new
quantized layers of offloaded blocks are offloaded again.  Disk offload is rejected.

Keyword inputs: blocks of one group share the keyword inputs (masks, rotary
embeddings) of its first block, except blocks declaring another layer type
(``layer_type`` / ``attention_type``, e.g. sliding-window layers), which use those
recorded at the first block of their type during the capture pass.  A model whose
blocks need other per-layer inputs is not supported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import time
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch import nn
from transformers.utils import logging

from ..modules import find_quantizable_linears
from ..nn import get_linear_weight, linear_shape, replace_module
from ..solver import SOLVER_DEFAULTS, HessianAccumulator, QuantizedWeight, comq_quantize
from ..threads import linear_layer_threads, single_thread
from .blocks import BlockGroup, find_block_groups
from .data import CalibrationData, build_calibration_data

logger = logging.get_logger(__name__)

__all__ = ["LayerSolver", "check_finite_weights", "quantize_model"]

LayerSolver = Callable[..., QuantizedWeight]
"""``solver(weight, hessian, **settings) -> QuantizedWeight``, with the signature of
:func:`hf_comq.comq_quantize`; benchmarks swap in other layer solvers (e.g. GPTQ)
to compare them inside the very same calibration pipeline."""


class _StopForward(Exception):
    """Raised by the capture pre-hook so the forward pass stops at the first block."""


@dataclasses.dataclass
class _Captured:
    """Inputs of one block for one calibration batch; ``mask`` marks real (non-padding) tokens.

    ``kind_kwargs`` holds the keyword inputs of blocks of another *kind* (layer type,
    e.g. sliding-window vs full attention), which get their own attention mask or
    rotary embeddings from the model.
    """

    args: tuple
    kwargs: dict
    mask: torch.Tensor | None
    kind_kwargs: dict = dataclasses.field(default_factory=dict)

    def call_inputs(self, kind: Any) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for a block of ``kind``, with this item's hidden state."""
        kwargs = self.kind_kwargs.get(kind, self.kwargs)
        if not self.args and "hidden_states" in self.kwargs:
            kwargs = {**kwargs, "hidden_states": self.kwargs["hidden_states"]}
        return self.args, kwargs


@dataclasses.dataclass(frozen=True)
class _Placement:
    compute: torch.device
    dispatched: bool
    input_device: torch.device


@single_thread()  # checks and bookkeeping on one thread; the forward passes and solver size their own
def quantize_model(model: nn.Module, config: Any, solver: LayerSolver = comq_quantize) -> dict[str, Any]:
    """Quantize every quantizable Linear/Conv1D of ``model`` in place with COMQ.

    ``config`` is a ``COMQConfig`` (only attribute access is used).  ``solver`` is
    the per-layer solver (COMQ unless a benchmark swaps in another one).  Returns a
    JSON-safe summary (layers quantized, bits, mean/max relative layer error, time,
    per-layer statistics), also stored as ``model._comq_summary`` and logged.
    Raises ``ValueError`` for a model with no quantizable layers, unusable
    calibration data, or disk-offloaded weights.
    """
    started = time.perf_counter()
    placement = _resolve_placement(model)
    layers = find_quantizable_linears(model, getattr(config, "modules_to_not_convert", None))
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no quantizable layers (nn.Linear / Conv1D outside modules_to_not_convert)"
        )
    check_finite_weights(layers, placement.compute)
    data = build_calibration_data(model, config)
    groups = find_block_groups(model, getattr(config, "block_name", None))
    calibrator = _Calibrator(model, config, data, placement, layers, groups, solver)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), linear_layer_threads(model):
            calibrator.run()
    finally:
        model.train(was_training)
    summary = calibrator.summary(time.perf_counter() - started)
    model._comq_summary = summary
    _log_summary(summary)
    return summary


def check_finite_weights(layers: dict[str, nn.Module], device: torch.device) -> None:
    """Raise for the first layer with a NaN or infinite weight, before any calibration work.

    Found later, a bad weight would surface as NaN activations in the blocks after it
    (blamed on the data) or only after every block before it was calibrated.
    """
    for name, module in layers.items():
        with _materialized(module, device), torch.no_grad():
            finite = torch.isfinite(get_linear_weight(module))
            bad = 0 if bool(finite.all()) else int((~finite).sum())
        if bad:
            raise ValueError(
                f"layer {name!r} has {bad} NaN or infinite weight value(s): the checkpoint is broken "
                "(or was saved after a diverged training step); quantize a checkpoint with finite weights"
            )


class _SharedInputs:
    """Detects layers that run on the very tensor the previous hooked layer ran on.

    Hooks fire in execution order, and q/k/v (or gate/up) consume one tensor object
    back to back.  The decision is made on a layer's first call and must hold for
    every later batch, otherwise the shared Hessian would be wrong: that raises.
    """

    def __init__(self, accumulators: dict[str, HessianAccumulator]):
        self.accumulators = accumulators
        self.owner_of: dict[str, str] = {}
        self.decided: set[str] = set()
        self.last: tuple[torch.Tensor, str] | None = None

    def reuses(self, name: str, tensor: torch.Tensor) -> bool:
        """True if ``name`` shares another layer's accumulator (and so must not add)."""
        same_as_last = self.last is not None and self.last[0] is tensor
        if name not in self.decided:
            self.decided.add(name)
            if same_as_last:
                self.owner_of[name] = self.last[1]
                self.accumulators[name] = self.accumulators[self.last[1]]
        owner = self.owner_of.get(name)
        if owner is None:
            return False
        if not same_as_last or self.last[1] != owner:
            raise RuntimeError(
                f"{name!r} shared its input with {owner!r} on the first calibration batch but not on a later one; "
                "calibrate with sequential=False or report this model"
            )
        return True

    def remember(self, name: str, tensor: torch.Tensor) -> None:
        self.last = (tensor, name)


class _Calibrator:
    """State of one calibration run: pending layers, results, the current token mask."""

    def __init__(
        self,
        model: nn.Module,
        config: Any,
        data: CalibrationData,
        placement: _Placement,
        layers: dict[str, nn.Module],
        groups: list[BlockGroup],
        solver: LayerSolver = comq_quantize,
    ):
        self.model = model
        self.solver = solver
        self.groups = groups
        self.block_names = [block for group in groups for block in group.block_names]
        self.config = config
        self.data = data
        self.placement = placement
        self.sequential = bool(getattr(config, "sequential", True))
        self.solver_kwargs = {name: getattr(config, name) for name in SOLVER_DEFAULTS if hasattr(config, name)}
        self.pending = list(layers)
        self.results: dict[str, dict[str, float]] = {}
        self.skipped: dict[str, str] = {}
        self.deferred: list[tuple[str, QuantizedWeight]] = []
        self.mask: torch.Tensor | None = None
        self.forward_kwargs = _forward_kwargs(model)
        self.input_dtype = _floating_dtype(model)
        self.checked_size = False

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        total = len(self.block_names) + 1
        with logging.tqdm(total=total, desc="COMQ calibration", unit="block") as bar:
            for group in self.groups:
                self._run_group(group, bar)
            self._run_remaining()
            self._install_deferred()
            # The finished bar doubles as the visible summary (the log line is INFO level).
            bits = self.solver_kwargs.get("bits")
            bar.set_postfix(layers=len(self.results), bits=bits, mean_rel_err=f"{self._mean_error():.3g}")
            bar.update(1)
        if not self.results:
            raise ValueError(
                "no layer ran on the calibration data, so nothing was quantized; check that the data match the model"
            )

    def _run_group(self, group: BlockGroup, bar: Any) -> None:
        captured = self._capture(group)
        if captured is None:
            self._skip_group(group)
            bar.update(len(group))
            return
        self._check_size(captured)
        for index, block_name in enumerate(group.block_names):
            is_last = index == len(group) - 1
            captured = self._process_block(block_name, captured, need_outputs=not is_last)
            bar.set_postfix(block=block_name, rel_err=f"{self._mean_error():.3g}")
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
    def _capture(self, group: BlockGroup) -> list[_Captured] | None:
        """Inputs of the group's first block for every batch; layers running before it are quantized on the way."""
        outside = self._pending_outside_blocks()
        captured, accumulators = self._capture_pass(group, outside)
        fired = [name for name in outside if accumulators[name].num_tokens > 0]
        for name in fired:
            self._quantize_layer(name, accumulators.pop(name))
        if fired and self.sequential and captured is not None:
            captured, _ = self._capture_pass(group, [])  # the group must see the quantized prefix
        return captured

    def _capture_pass(
        self, group: BlockGroup, hessian_layers: list[str]
    ) -> tuple[list[_Captured] | None, dict[str, HessianAccumulator]]:
        """Run the model until the group's first block (or first block of its last new kind) and record inputs.

        Blocks of a different kind (layer type) than the first get their keyword
        inputs from their own first occurrence, so e.g. sliding-window layers see
        the sliding-window mask; the forward pass stops once every kind was seen.
        """
        captured: list[_Captured] = []
        compute = self.placement.compute
        representatives = _first_block_of_each_kind(self.model, group)
        last = max(representatives.values(), key=group.block_names.index)

        def record(block_name: str, kind: Any):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                if block_name == group.block_names[0]:
                    captured.append(_Captured(_to_device(args, compute), _to_device(kwargs, compute), self.mask))
                captured[-1].kind_kwargs[kind] = _to_device(kwargs, compute)
                if block_name == last:
                    raise _StopForward

            return hook

        handles = [
            self.model.get_submodule(name).register_forward_pre_hook(record(name, kind), with_kwargs=True)
            for kind, name in representatives.items()
        ]
        reached = True
        try:
            with self._hessian_hooks(hessian_layers) as accumulators:
                for batch in self._batches():
                    try:
                        self.model(**batch, **self.forward_kwargs)
                    except _StopForward:
                        continue
                    reached = False
        finally:
            for handle in handles:
                handle.remove()
            self.mask = None
        return (captured if reached else None), accumulators

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Calibration batches on the input device; sets ``self.mask`` for the Hessian hooks."""
        count = 0
        for batch in self.data:
            count += 1
            self.mask = _token_mask(batch, self.placement.compute)
            device, dtype = self.placement.input_device, self.input_dtype
            yield {name: _as_input(value, device, dtype) for name, value in batch.items()}
        if count == 0:
            raise ValueError(
                "the calibration dataset is too small: it produced no usable batch (e.g. only empty texts)"
            )

    def _check_size(self, captured: list[_Captured]) -> None:
        """Reject calibration sets with no tokens; warn when every Hessian would be rank-deficient."""
        if self.checked_size:
            return
        self.checked_size = True
        tokens, width = 0, 0
        for item in captured:
            hidden = _hidden_input(item)
            width = hidden.shape[-1]
            tokens += int(item.mask.sum()) if item.mask is not None else hidden.shape[:-1].numel()
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
    def _process_block(self, block_name: str, captured: list[_Captured], need_outputs: bool) -> list[_Captured]:
        block = self.model.get_submodule(block_name)
        names = self._pending_under(block_name)
        keep_fp_outputs = need_outputs and not self.sequential
        with self._block_on_compute(block):
            with self._hessian_hooks(names) as accumulators:
                outputs = self._run_block(block, captured, collect=keep_fp_outputs)
            for name in names:
                self._quantize_layer(name, accumulators.pop(name))
            if need_outputs and self.sequential:
                outputs = self._run_block(block, captured, collect=True)
        return outputs

    def _run_block(self, block: nn.Module, captured: list[_Captured], collect: bool) -> list[_Captured]:
        outputs = []
        kind = _block_kind(block)
        try:
            for item in captured:
                self.mask = item.mask
                args, kwargs = item.call_inputs(kind)
                result = block(*args, **kwargs)
                if collect:
                    hidden = _to_device(_hidden_output(result), self.placement.compute)
                    outputs.append(_with_hidden(item, hidden))
        finally:
            self.mask = None
        return outputs

    @contextlib.contextmanager
    def _block_on_compute(self, block: nn.Module) -> Iterator[None]:
        """Move an undispatched block to the compute device for the duration (accelerate handles dispatched ones)."""
        devices = {t.device for t in list(block.parameters()) + list(block.buffers())}
        if self.placement.dispatched or len(devices) != 1 or devices == {self.placement.compute}:
            yield
            return
        original = devices.pop()
        block.to(self.placement.compute)
        try:
            yield
        finally:
            block.to(original)

    def _run_remaining(self) -> None:
        """One full pass for quantizable layers outside the blocks that no capture pass reached."""
        names = list(self.pending)
        if not names:
            return
        with self._hessian_hooks(names) as accumulators:
            try:
                for batch in self._batches():
                    self.model(**batch, **self.forward_kwargs)
            finally:
                self.mask = None
        for name in names:
            self._quantize_layer(name, accumulators.pop(name))

    # ------------------------------------------------------------------ Hessians
    @contextlib.contextmanager
    def _hessian_hooks(self, names: list[str]) -> Iterator[dict[str, HessianAccumulator]]:
        """Forward hooks feeding each named layer's (unpadded) inputs into a Hessian accumulator.

        Layers fed the very same input tensor (q/k/v projections, gate/up) have the same
        Hessian, so they share one accumulator and ``X^T X`` is computed once for them.
        """
        accumulators: dict[str, HessianAccumulator] = {}
        sharing = _SharedInputs(accumulators)
        handles = []
        try:
            for name in names:
                module = self.model.get_submodule(name)
                accumulators[name] = HessianAccumulator(linear_shape(module)[1], device=self.placement.compute)
                handles.append(module.register_forward_hook(self._hessian_hook(name, sharing)))
            yield accumulators
        finally:
            for handle in handles:
                handle.remove()

    def _hessian_hook(self, name: str, sharing: "_SharedInputs"):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if sharing.reuses(name, inputs[0]):
                return
            activations = inputs[0].detach()
            mask = self.mask
            if mask is not None and activations.shape[:-1] == mask.shape:
                activations = activations[mask.to(activations.device)]
            sharing.accumulators[name].add(activations)
            sharing.remember(name, inputs[0])

        return hook

    # ------------------------------------------------------------------ quantization
    def _quantize_layer(self, name: str, accumulator: HessianAccumulator) -> None:
        self.pending.remove(name)
        if accumulator.num_tokens == 0:
            self._skip(name, "it never ran on the calibration data")
            return
        module = self.model.get_submodule(name)
        started = time.perf_counter()
        with _materialized(module, self.placement.compute):
            weight = get_linear_weight(module).detach().to(self.placement.compute)
        try:
            qweight = self.solver(weight, accumulator.result(), **self.solver_kwargs)
        except ValueError as error:
            raise ValueError(f"COMQ could not quantize {name!r}: {error}") from error
        del weight
        self.results[name] = {
            "relative_error": float(qweight.stats["relative_error"]),
            "num_tokens": int(accumulator.num_tokens),
            "seconds": round(time.perf_counter() - started, 4),
        }
        if self.sequential:
            self._install(name, module, qweight)
        else:
            self.deferred.append((name, _to_cpu(qweight)))

    def _install(self, name: str, module: nn.Module, qweight: QuantizedWeight) -> None:
        """Swap ``module`` for a ``COMQLinear``, keeping accelerate's placement (and offload) of the old layer."""
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module
        from accelerate.utils import has_offloaded_params

        hook = _align_hook(module)
        offloaded = has_offloaded_params(module)
        with _materialized(module, self.placement.compute):
            layer = replace_module(self.model, name, qweight, symmetric=bool(getattr(self.config, "symmetric", False)))
        if hook is None:
            return
        if offloaded:
            layer.to("cpu")
            new_hook = AlignDevicesHook(
                execution_device=hook.execution_device,
                offload=True,
                offload_buffers=True,
                io_same_device=hook.io_same_device,
            )
        else:
            new_hook = AlignDevicesHook(execution_device=hook.execution_device, io_same_device=hook.io_same_device)
        add_hook_to_module(layer, new_hook)

    def _install_deferred(self) -> None:
        for name, qweight in self.deferred:
            self._install(name, self.model.get_submodule(name), qweight)
        self.deferred.clear()

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
        return [name for name in self.pending if not self._in_some_block(name)]

    def _in_some_block(self, name: str) -> bool:
        return any(name.startswith(f"{block}.") for block in self.block_names)

    def _mean_error(self) -> float:
        errors = [result["relative_error"] for result in self.results.values()]
        return sum(errors) / len(errors) if errors else float("nan")

    def summary(self, seconds: float) -> dict[str, Any]:
        errors = [result["relative_error"] for result in self.results.values()]
        return {
            "layers_quantized": len(self.results),
            "layers_skipped": dict(sorted(self.skipped.items())),
            "bits": self.solver_kwargs.get("bits"),
            "group_size": self.solver_kwargs.get("group_size"),
            "sequential": self.sequential,
            "num_blocks": len(self.block_names),
            "num_samples": self.data.num_samples,
            "mean_relative_error": sum(errors) / len(errors) if errors else None,
            "max_relative_error": max(errors) if errors else None,
            "time_s": round(seconds, 3),
            "device": str(self.placement.compute),
            "layers": self.results,
        }


# ---------------------------------------------------------------------------
# Placement (accelerate)
# ---------------------------------------------------------------------------


def _resolve_placement(model: nn.Module) -> _Placement:
    """Pick the compute device and check the model's accelerate dispatch is usable."""
    device_map = getattr(model, "hf_device_map", None) or {}
    disk = sorted(name for name, device in device_map.items() if device == "disk")
    if disk or any(_offloads_to_disk(module) for module in model.modules()):
        raise ValueError(
            "COMQ cannot calibrate a model whose weights are offloaded to disk "
            f"({', '.join(disk[:3]) or 'disk offload hooks'}); load it with CPU offload instead "
            "(e.g. a device_map/max_memory that keeps the rest on 'cpu')"
        )
    compute = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dispatched = any(hasattr(module, "_hf_hook") for module in model.modules())
    if dispatched:
        return _Placement(compute, True, compute)
    devices = {p.device for p in model.parameters()}
    if any(device.type == "meta" for device in devices):
        raise ValueError("the model has weights on the meta device and no accelerate offload hooks to load them")
    input_device = next(iter(devices)) if len(devices) == 1 else compute
    return _Placement(compute, False, input_device)


def _align_hook(module: nn.Module) -> Any:
    """The module's accelerate ``AlignDevicesHook`` (also inside a ``SequentialHook``), or ``None``."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hook = getattr(module, "_hf_hook", None)
    if isinstance(hook, SequentialHook):
        hook = next((h for h in hook.hooks if isinstance(h, AlignDevicesHook)), None)
    return hook if isinstance(hook, AlignDevicesHook) else None


def _offloads_to_disk(module: nn.Module) -> bool:
    hook = _align_hook(module)
    if hook is None or not hook.offload:
        return False
    loader = getattr(hook.weights_map, "dataset", hook.weights_map)
    return bool(getattr(loader, "index", None))


@contextlib.contextmanager
def _materialized(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Make an offloaded layer's weights real for the duration (no-op otherwise)."""
    from accelerate.utils import align_module_device, has_offloaded_params

    if has_offloaded_params(module):
        with align_module_device(module, device):
            yield
    else:
        yield


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Turn off KV caches: calibration forwards must not allocate or return them."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in parameters else {}


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


def _token_mask(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return None
    return mask.to(device=device, dtype=torch.bool)


def _to_device(value: Any, device: torch.device) -> Any:
    """Move tensors inside nested tuples/lists/dicts; other objects pass through unchanged."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_to_device(item, device) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def _block_kind(block: nn.Module) -> tuple[str, ...]:
    """The layer types declared inside a block (transformers' ``layer_type`` / ``attention_type``).

    Models with mixed layer types (Gemma 2/3, Qwen2 with sliding windows, ...) pass each
    type its own attention mask and sometimes rotary embeddings; blocks of one kind
    take the same keyword inputs.  Blocks that declare nothing are all one kind.
    """
    kinds = set()
    for module in block.modules():
        for attribute in ("layer_type", "attention_type"):
            value = getattr(module, attribute, None)
            if isinstance(value, str):
                kinds.add(value)
    return tuple(sorted(kinds))


def _first_block_of_each_kind(model: nn.Module, group: BlockGroup) -> dict[tuple[str, ...], str]:
    """``{kind: name of its first block}`` in forward order; the group's first block always included."""
    representatives: dict[tuple[str, ...], str] = {}
    for name in group.block_names:
        representatives.setdefault(_block_kind(model.get_submodule(name)), name)
    return representatives


def _hidden_input(item: _Captured) -> torch.Tensor:
    if item.args:
        return item.args[0]
    if "hidden_states" in item.kwargs:
        return item.kwargs["hidden_states"]
    raise ValueError(
        f"cannot tell which input of the block is the hidden state (kwargs: {sorted(item.kwargs)}); "
        "set COMQConfig(block_name=...) to a list of blocks taking the hidden state first"
    )


def _hidden_output(result: Any) -> torch.Tensor:
    """A block's new hidden state: the tensor itself, or the first element of a tuple/ModelOutput."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
        return result[0]
    if isinstance(result, dict) and result:
        first = next(iter(result.values()))
        if isinstance(first, torch.Tensor):
            return first
    raise ValueError(f"cannot find the hidden state in a block output of type {type(result).__name__}")


def _with_hidden(item: _Captured, hidden: torch.Tensor) -> _Captured:
    """The next block's inputs: the same arguments with the hidden state replaced."""
    _hidden_input(item)  # raises a clear error if the hidden state cannot be located
    if item.args:
        return _Captured((hidden,) + tuple(item.args[1:]), item.kwargs, item.mask, item.kind_kwargs)
    return _Captured(item.args, {**item.kwargs, "hidden_states": hidden}, item.mask, item.kind_kwargs)


def _to_cpu(qweight: QuantizedWeight) -> QuantizedWeight:
    return dataclasses.replace(
        qweight, codes=qweight.codes.cpu(), scale=qweight.scale.cpu(), zero_point=qweight.zero_point.cpu()
    )


def _log_summary(summary: dict[str, Any]) -> None:
    mean = summary["mean_relative_error"]
    logger.info(
        "COMQ: quantized %d layers to %s bits (%s, %d blocks, %d samples) in %.1f s; mean relative layer error %s%s",
        summary["layers_quantized"],
        summary["bits"],
        "block-sequential" if summary["sequential"] else "full-precision inputs",
        summary["num_blocks"],
        summary["num_samples"],
        summary["time_s"],
        f"{mean:.4g}" if mean is not None else "n/a",
        f"; {len(summary['layers_skipped'])} layers left in full precision" if summary["layers_skipped"] else "",
    )
