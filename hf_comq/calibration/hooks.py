"""What calibration records while the model runs: block inputs (capture) and layer Gram matrices (Hessians).

Both are forward hooks, because transformers models give no other way in.  The one
input a hook cannot see is which tokens are padding: a Linear receives the hidden
states, not the attention mask.  So the caller names the mask of every forward pass
it starts (``with recorder.tokens(mask): model(...)``), and the hooks read it only
inside that scope; outside one, a hook that fires is an error, never a stale mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..modules import expert_layers
from ..nn import linear_shape
from ..solver import HessianAccumulator, NonFiniteActivations, TargetProductAccumulator
from .blocks import BlockGroup
from .placement import send_to_device

__all__ = [
    "CapturedInputs",
    "HessianRecorder",
    "LayerCall",
    "NotAChain",
    "block_kind",
    "capture_block_inputs",
    "hidden_input",
    "hidden_output",
    "token_mask",
]


@dataclasses.dataclass
class CapturedInputs:
    """Inputs of one block for one calibration batch; ``mask`` marks real (non-padding) tokens.

    ``kind_kwargs`` holds the keyword inputs of blocks of another *kind* (layer type,
    e.g. sliding-window vs full attention), which get their own attention mask or
    rotary embeddings from the model.  ``block_inputs`` holds, by block name, the other
    inputs of blocks the model hands inputs of their own (T5's relative position bias,
    computed by the first block and passed on), without the hidden state.
    """

    args: tuple
    kwargs: dict
    mask: torch.Tensor | None
    kind_kwargs: dict = dataclasses.field(default_factory=dict)
    block_inputs: dict = dataclasses.field(default_factory=dict)

    def call_inputs(self, block_name: str, kind: Any) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for the block ``block_name`` of ``kind``, with this item's hidden state."""
        own = self.block_inputs.get(block_name)
        if own is not None:
            args, kwargs = own
            if self.args:
                return (self.args[0],) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self.kwargs["hidden_states"]}
        kwargs = self.kind_kwargs.get(kind, self.kwargs)
        if not self.args and "hidden_states" in self.kwargs:
            kwargs = {**kwargs, "hidden_states": self.kwargs["hidden_states"]}
        return self.args, kwargs

    def with_hidden(self, hidden: torch.Tensor) -> "CapturedInputs":
        """The next block's inputs: the same arguments with the hidden state replaced."""
        hidden_input(self)  # raises a clear error if the hidden state cannot be located
        if self.args:
            args, kwargs = (hidden,) + tuple(self.args[1:]), self.kwargs
        else:
            args, kwargs = self.args, {**self.kwargs, "hidden_states": hidden}
        return CapturedInputs(args, kwargs, self.mask, self.kind_kwargs, self.block_inputs)


def token_mask(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """The batch's real-token mask (``attention_mask`` of a text batch), ``None`` when every token is real."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return None
    return mask.to(device=device, dtype=torch.bool)


# ---------------------------------------------------------------------------
# Gram matrices
# ---------------------------------------------------------------------------

LayerCall = tuple[str, torch.Tensor | None, tuple[torch.Tensor, int] | None, torch.Tensor | None]
"""One layer call kept for :meth:`HessianRecorder.replay`: the layer's name, its input, for an
expert's layer :meth:`~hf_comq.nn.UnfusedExperts.routed_rows`, and, in a full-precision pass,
its output (a copy) where the layer's target product is summed from outputs."""


def sums_target_product(out_features: int, in_features: int) -> bool:
    """Whether a layer of this shape, aimed at the full-precision outputs, sums its own target product
    from its outputs rather than the target shift of its input: where it is narrower out than in (an
    MLP's down projection), the cheaper form (see :class:`HessianRecorder`)."""
    return out_features < in_features


class HessianRecorder:
    """Forward hooks feeding each named layer's real-token inputs into a :class:`HessianAccumulator`.

    Layers fed the very same input tensor (q/k/v projections, gate/up) have the same
    Hessian, so they share one accumulator and ``X^T X`` is computed once for them:
    the decision is made on a layer's first call and must hold for every later batch.
    Use as a context manager; run each forward pass inside :meth:`tokens`, or, for
    forward passes of several batches at once on other threads, inside
    :meth:`calls_later` there and then :meth:`replay` each batch's calls in batch order.

    ``with_targets=True`` also sums what aims each layer at the full-precision
    model's outputs (:mod:`hf_comq.solver.target`): before each batch's pass inside
    :meth:`tokens`, the same batch's full-precision inputs run the block inside
    :meth:`targets`, whose hooks keep each layer's inputs until the quantized-prefix
    pass reaches it.  On other threads both passes run inside :meth:`calls_later`
    (the full-precision one with ``full_precision=True``), and :meth:`replay` is
    handed the full-precision pass's calls as the batch's ``targets``.  A layer
    narrower out than in (an MLP's down projection) keeps a copy of its full-precision
    *outputs* instead and sums its own target product (:attr:`target_products`),
    which costs ``out x in`` per token where the shift costs ``in x in``; one that
    shares its input with a layer summing the shift (k/v beside q) reads that shift,
    and a layer needing the shift never shares the Gram matrix of one that does not
    sum it.

    ``dtype`` is the dtype of every sum (``COMQConfig.sum_dtype``): float64 by default.
    ``replay_only=True`` puts no hooks on the layers: the sums come from :meth:`replay`
    alone, while passes on other threads may still call the layers (a held pass whose
    batches arrive at a stage while the earlier ones are summed).  ``gram=False`` sums
    the target products alone, for a stage whose Gram matrices another pass sums
    afterwards, so that a wide layer's two largest sums are never alive at once (under
    a memory budget: :mod:`hf_comq.calibration.sequential`).

    In the quantized-prefix pass every layer is taken as it is called, from its input
    (a forward pre-hook), so the pass may end there
    (:class:`~hf_comq.calibration.stages.StageStop`); a full-precision pass keeps the
    outputs of a layer summing its target product once it ran.

    An expert's layers (inside :class:`~hf_comq.nn.UnfusedExperts`) see the tokens
    routed to it: their padding is told by the rows the experts module reports, and
    they get no target shift, since the full-precision model routes the tokens its
    own way.
    """

    _OUTSIDE = object()

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        device: torch.device,
        *,
        with_targets: bool = False,
        dtype: torch.dtype = torch.float64,
        replay_only: bool = False,
        gram: bool = True,
    ):
        self.accumulators: dict[str, HessianAccumulator] = {}
        # the layers whose target product is summed from their outputs (see the class docstring)
        self.target_products: dict[str, TargetProductAccumulator] = {}
        self._owner_of: dict[str, str] = {}
        self._decided: set[str] = set()
        self._last: tuple[torch.Tensor, str] | None = None
        self._mask: Any = self._OUTSIDE
        self._with_targets = with_targets
        self._gram = gram
        self._collecting_targets = False
        self._targets: dict[str, list[torch.Tensor]] = {}  # per layer, in call order
        self._later = threading.local()  # a thread's forward pass whose calls wait for replay()
        self._handles = []
        wanted = set(names)  # an expert's layers are told by the experts module that routes tokens to them
        self._routers = {name: experts for name, experts in expert_layers(model).items() if name in wanted}
        for name in names:
            module = model.get_submodule(name)
            out_features, in_features = linear_shape(module)
            targeted = with_targets and name not in self._routers
            by_outputs = targeted and sums_target_product(out_features, in_features)
            self.accumulators[name] = HessianAccumulator(
                in_features, dtype=dtype, device=device, with_target=targeted and not by_outputs
            )
            if not replay_only:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
            if by_outputs:
                self.target_products[name] = TargetProductAccumulator(out_features, in_features, dtype=dtype, device=device)
                if not replay_only:
                    self._handles.append(module.register_forward_hook(self._output_hook(name)))
        # fixed here, not read from target_products: a full-precision pass on another thread must not see a
        # layer turn into a shift reader (replay decides sharing) between its two hooks
        self._by_outputs = frozenset(self.target_products)

    def __enter__(self) -> "HessianRecorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def tokens(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Run one forward pass whose real tokens are ``mask`` (``None``: all of them)."""
        self._mask, self._last = mask, None
        try:
            yield
        finally:
            self._mask, self._last = self._OUTSIDE, None

    @contextlib.contextmanager
    def calls_later(self, full_precision: bool = False) -> Iterator[list[LayerCall]]:
        """Run one forward pass on this thread whose layer inputs are kept, not summed, until :meth:`replay`.

        Forward passes of several batches may run so at once, each on its own thread;
        the sums are made by replaying each batch's calls in batch order, so they are
        the very sums of the same batches recorded one after another in :meth:`tokens`.
        Holds the batch's layer inputs until replayed.  With targets, a batch's
        full-precision pass is kept the same way, in a scope of its own made with
        ``full_precision=True`` (it keeps the outputs of layers summing a target product).
        """
        calls: list[LayerCall] = []
        self._later.calls, self._later.full_precision = calls, full_precision
        try:
            yield calls
        finally:
            self._later.calls, self._later.full_precision = None, False

    def replay(
        self,
        calls: list[LayerCall],
        mask: torch.Tensor | None,
        targets: list[LayerCall] | None = None,
    ) -> None:
        """Sum one batch's layer inputs kept by :meth:`calls_later`, as :meth:`tokens` would have; ``mask`` its real tokens.

        ``targets``: the same batch's full-precision pass, kept by another
        :meth:`calls_later` scope (recorders made ``with_targets`` only); it is taken
        as :meth:`targets` would have taken it, before the calls are summed.
        """
        if targets is not None:
            self.keep_targets(targets, mask)
        with self.tokens(mask):
            for name, tensor, rows, _ in calls:
                self._record(name, tensor, rows)

    @contextlib.contextmanager
    def targets(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Run one batch's full-precision pass: each layer's inputs are kept as its target, nothing is summed."""
        if not self._with_targets:
            raise RuntimeError("this recorder was made without with_targets=True")
        self._targets.clear()
        self._mask, self._collecting_targets = mask, True
        try:
            yield
        finally:
            self._mask, self._collecting_targets = self._OUTSIDE, False

    def keep_targets(self, targets: list[LayerCall], mask: torch.Tensor | None) -> None:
        """Take one batch's full-precision pass, kept earlier (:meth:`target_calls`), as :meth:`targets` would have;
        the batch's quantized-prefix pass follows."""
        with self.targets(mask):
            for name, tensor, _, output in targets:
                if name in self.accumulators:  # a block's targets serve each of its stages' recorders
                    self._keep_target(name, tensor, output)

    def target_calls(self, calls: list[LayerCall]) -> list[LayerCall]:
        """A full-precision pass's calls (kept by :meth:`calls_later`) cut to what :meth:`keep_targets` reads:
        the inputs of layers that sum the target shift, the outputs of those that sum a target product, nothing
        of the others (an expert's layers).  Kept for a whole block of batches, it holds no more than that."""
        kept = []
        for name, tensor, _, output in calls:
            if output is not None:
                kept.append((name, None, None, output))
            elif self.accumulators[name].with_target:
                kept.append((name, tensor, None, None))
        return kept

    def shared_inputs(self) -> dict[str, str]:
        """``{layer: owner}`` for the layers found reading the same input tensor as ``owner`` (q/k/v, gate/up)."""
        return dict(self._owner_of)

    def adopt_shared_inputs(self, owners: Mapping[str, str]) -> None:
        """Take the sharing other ranks found for layers that never ran here (a rank with no batches).

        Sharing is only seen on a forward pass; without this, such a rank would sum
        three Gram matrices where the others sum one, and the ranks' collectives
        would no longer pair up.
        """
        for name, owner in owners.items():
            if name not in self._decided:
                self._decided.add(name)
                self._share(name, owner)

    def distinct(self) -> list[HessianAccumulator]:
        """Each accumulator once (shared ones appear under several names), in the order of their layers'
        names: the same on every rank, whatever order a rank's recorder was given its layers in."""
        seen: dict[int, HessianAccumulator] = {}
        for _, accumulator in sorted(self.accumulators.items()):
            seen.setdefault(id(accumulator), accumulator)
        return list(seen.values())

    def sums(self) -> list[HessianAccumulator | TargetProductAccumulator]:
        """Every running sum once, in an order every rank agrees on (for summing over processes): the
        distinct accumulators, then the target products (decided once sharing is, see
        :meth:`adopt_shared_inputs`), each by layer name."""
        return [*self.distinct(), *(product for _, product in sorted(self.target_products.items()))]

    def _full_precision_pass(self) -> bool:
        """Whether the pass running on this thread is a full-precision one: :meth:`calls_later` with
        ``full_precision=True``, or, outside such scopes, :meth:`targets` (which the replaying thread
        enters while passes on other threads run)."""
        if getattr(self._later, "calls", None) is not None:
            return self._later.full_precision
        return self._collecting_targets

    def _input_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if name in self._by_outputs and self._full_precision_pass():
                return  # its full-precision outputs are taken once it ran
            self._take(name, inputs[0], None)

        return hook

    def _output_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if name in self._by_outputs and self._full_precision_pass():
                # a copy: the model may change its output in place (Falcon adds the attention output into the MLP's)
                self._take(name, None, output.detach().clone())

        return hook

    def _take(self, name: str, tensor: torch.Tensor | None, kept_output: torch.Tensor | None) -> None:
        """One call of layer ``name``: kept for :meth:`replay`, kept as a target, or summed now."""
        router = self._routers.get(name)
        rows = None if router is None else router.routed_rows()
        later = getattr(self._later, "calls", None)
        if later is not None:
            later.append((name, tensor, rows, kept_output))  # the tensor itself: sharing is told by identity
            return
        if self._mask is self._OUTSIDE:
            raise RuntimeError(f"{name!r} ran outside HessianRecorder.tokens(); the padding mask is unknown")
        if self._collecting_targets:
            self._keep_target(name, tensor, kept_output)
            return
        self._record(name, tensor, rows)

    def _share(self, name: str, owner: str) -> None:
        """Make ``name`` read ``owner``'s Gram matrix, and its target shift where ``owner`` sums one."""
        self._owner_of[name] = owner
        self.accumulators[name] = self.accumulators[owner]
        if self.accumulators[owner].with_target:
            self.target_products.pop(name, None)

    def _keep_target(self, name: str, tensor: torch.Tensor | None, output: torch.Tensor | None) -> None:
        """Keep one layer call's real-token inputs of the full-precision pass until the quantized pass reaches it
        (its outputs, ``output``, where the layer sums its target product from them)."""
        if name not in self._routers:
            self._targets.setdefault(name, []).append(self._real_tokens(tensor if output is None else output))

    def _record(self, name: str, tensor: torch.Tensor, rows: tuple[torch.Tensor, int] | None = None) -> None:
        """Add one layer call's real-token inputs to its Gram sum (unless it shares an earlier call's),
        and to its target product where it sums one.

        ``rows``: for an expert's layer, which of the experts' flattened tokens its inputs are.
        """
        target = self._target_of(name)
        shared = self._reuses(name, tensor)
        product = self.target_products.get(name)  # after _reuses: sharing a shift drops it
        if shared and product is None:
            return
        activations = self._real_tokens(tensor, rows)
        if target is not None and target.shape[:-1] != activations.shape[:-1]:
            raise ValueError(
                f"{name!r} got {tuple(target.shape[:-1])} tokens in the full-precision pass and "
                f"{tuple(activations.shape[:-1])} in the quantized one (a routed layer, e.g. a mixture-of-experts "
                "expert?); fp_target needs the same tokens in both: calibrate with fp_target=False"
            )
        try:
            if product is not None:
                product.add(activations, target)
            if not shared and self._gram:
                accumulator = self.accumulators[name]
                accumulator.add(activations, target if accumulator.with_target else None)
        except NonFiniteActivations as error:
            raise NonFiniteActivations(_non_finite_message(name, tensor.dtype, error.values), error.values) from None
        if not shared:
            self._last = (tensor, name)

    def _real_tokens(self, tensor: torch.Tensor, rows: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
        activations = tensor.detach()
        mask = self._mask
        if mask is None:
            return activations
        if rows is not None:
            positions, tokens = rows
            if tokens != mask.numel():  # the experts were not handed the batch's tokens one for one
                return activations
            return activations[mask.reshape(-1).to(activations.device)[positions.to(activations.device)]]
        if activations.shape[:-1] == mask.shape:
            activations = activations[mask.to(activations.device)]
        return activations

    def _target_of(self, name: str) -> torch.Tensor | None:
        """The layer's full-precision inputs of this batch (``None`` without targets); each is read once."""
        if not self._with_targets or name in self._routers:
            return None
        if not self._targets.get(name):
            raise RuntimeError(
                f"{name!r} ran on the quantized prefix's inputs but not in the batch's full-precision pass; "
                "calibrate with fp_target=False or report this model"
            )
        return self._targets[name].pop(0)

    def _reuses(self, name: str, tensor: torch.Tensor) -> bool:
        """True if ``name`` shares another layer's accumulator (and so must not add)."""
        same_as_last = self._last is not None and self._last[0] is tensor
        if name not in self._decided:
            self._decided.add(name)
            # a layer that needs the target shift shares only a Gram matrix summing it
            if same_as_last and (not self.accumulators[name].with_target or self.accumulators[self._last[1]].with_target):
                self._share(name, self._last[1])
        owner = self._owner_of.get(name)
        if owner is None:
            return False
        if not same_as_last or self._last[1] != owner:
            raise RuntimeError(
                f"{name!r} shared its input with {owner!r} on the first calibration batch but not on a later one; "
                "calibrate with sequential=False or report this model"
            )
        return True


# ---------------------------------------------------------------------------
# Block inputs
# ---------------------------------------------------------------------------


def _non_finite_message(layer: str, dtype: torch.dtype, values: str = "inputs") -> str:
    """One line for a layer whose calibration ``values`` (its inputs, or with ``fp_target`` its
    full-precision inputs or outputs) are not finite: where, and what to do."""
    if dtype in (torch.float16, torch.bfloat16):
        return (
            f"the calibration {values} of {layer!r} hold NaN or inf: the model overflows in "
            f"{str(dtype).removeprefix('torch.')}; load it in float32 (from_pretrained(..., dtype=torch.float32); "
            "hf-comq quantize --dtype float32)"
        )
    return f"the calibration {values} of {layer!r} hold NaN or inf; check the calibration data"


class _StopForward(Exception):
    """Raised by the capture pre-hook so the forward pass stops at the first block."""


class NotAChain(Exception):
    """A list found as blocks whose members do not run back to back: a block's hidden input is not
    the block before it's output (a segmentation head's or a depth neck's per-scale projections,
    each taking its own feature map).  Calibrating it as blocks would feed each member the wrong
    input; its layers are calibrated as stand-alone layers instead."""


def capture_block_inputs(
    model: nn.Module,
    group: BlockGroup,
    batches: Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]],
    recorder: HessianRecorder,
    forward_kwargs: dict[str, Any],
    device: torch.device,
) -> tuple[list[CapturedInputs], int, bool]:
    """Run the model until the group's first block (or the first block of its last new kind) on every batch.

    ``batches`` yields ``(model inputs, token mask)``.  Blocks of another kind (layer
    type) than the first get their keyword inputs from their own first occurrence, so
    e.g. sliding-window layers see the sliding-window mask; the forward pass stops once
    every kind was seen.  The first batch runs the whole group, to check that every
    block gets its kind's inputs besides the hidden state; where some block does not
    (T5 hands its relative position bias from the first block to the others), every
    batch runs the whole group and each block's own inputs are kept
    (``CapturedInputs.block_inputs``).  Returns the captured inputs, the number of
    batches, and whether every batch reached the group (a group that never runs is skipped).
    """
    captured: list[CapturedInputs] = []
    kinds = {name: block_kind(model.get_submodule(name)) for name in group.block_names}
    representatives = _first_block_of_each_kind(kinds)
    last_representative = max(representatives.values(), key=group.block_names.index)
    first_batch: dict[str, tuple[tuple, dict]] = {}  # every block's inputs but the hidden state
    per_block: bool | None = None  # whether blocks get inputs of their own; the first batch decides
    last_output: list[Any] = []  # the first batch's latest block output, to check the blocks run back to back

    def record(block_name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if per_block is None and last_output and not _continues(last_output.pop(), args, kwargs):
                raise NotAChain(f"{block_name} does not take the output of the block before it")
            if block_name == group.block_names[0]:
                captured.append(CapturedInputs(send_to_device(args, device), send_to_device(kwargs, device), None))
            if representatives.get(kinds[block_name]) == block_name:
                captured[-1].kind_kwargs[kinds[block_name]] = send_to_device(kwargs, device)
            if per_block is None:
                first_batch[block_name] = _without_hidden(args, kwargs)
            elif per_block and block_name != group.block_names[0]:
                captured[-1].block_inputs[block_name] = send_to_device(_without_hidden(args, kwargs), device)
            if block_name == (last_representative if per_block is False else group.block_names[-1]):
                raise _StopForward

        return hook

    def keep_output(module: nn.Module, args: tuple, output: Any) -> None:
        if per_block is None:
            last_output[:] = [output]

    handles = [
        model.get_submodule(name).register_forward_pre_hook(record(name), with_kwargs=True) for name in group.block_names
    ]
    handles += [model.get_submodule(name).register_forward_hook(keep_output) for name in group.block_names[:-1]]
    count, reached = 0, True
    try:
        for batch, mask in batches:
            count += 1
            try:
                with recorder.tokens(mask):
                    model(**batch, **forward_kwargs)
            except _StopForward:
                captured[-1].mask = mask
                if per_block is None:
                    own = _blocks_with_inputs_of_their_own(first_batch, representatives, kinds)
                    captured[-1].block_inputs = {name: send_to_device(first_batch[name], device) for name in own}
                    per_block = bool(own)
                    first_batch.clear()
                continue
            reached = False
    finally:
        for handle in handles:
            handle.remove()
    return captured, count, reached


def _continues(previous_output: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a block's hidden input is the output of the block that ran before it (where either
    cannot be told apart, assumed so: the check is there to catch lists that plainly are not chains)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    try:
        before = hidden_output(previous_output)
    except ValueError:
        return True
    if not isinstance(hidden, torch.Tensor):
        return True
    return hidden is before or (hidden.shape == before.shape and torch.equal(hidden, before))


def _without_hidden(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block's inputs with its hidden state left out (``None`` in its place), as the blocks' own inputs are kept."""
    if args:
        return (None,) + tuple(args[1:]), kwargs
    return args, {name: value for name, value in kwargs.items() if name != "hidden_states"}


def _blocks_with_inputs_of_their_own(
    inputs: dict[str, tuple[tuple, dict]], representatives: dict[Any, str], kinds: dict[str, Any]
) -> list[str]:
    """The blocks whose inputs besides the hidden state are not those of their kind's first block."""
    return [
        name
        for name, own in inputs.items()
        if representatives[kinds[name]] in inputs and not _same_inputs(own, inputs[representatives[kinds[name]]])
    ]


def _same_inputs(first: Any, second: Any) -> bool:
    """Whether two block inputs (tensors, nested tuples/lists/dicts, other objects) hold the same values."""
    if first is second:
        return True
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        return (
            isinstance(first, torch.Tensor)
            and isinstance(second, torch.Tensor)
            and first.shape == second.shape
            and first.dtype == second.dtype
            and first.device == second.device
            and bool(torch.equal(first, second))
        )
    if isinstance(first, (tuple, list)) and isinstance(second, (tuple, list)):
        return len(first) == len(second) and all(_same_inputs(a, b) for a, b in zip(first, second))
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        return first.keys() == second.keys() and all(_same_inputs(first[key], second[key]) for key in first)
    try:
        return bool(first == second)
    except Exception:  # objects without a usable equality (e.g. caches) differ unless identical
        return False


def block_kind(block: nn.Module) -> tuple[str, ...]:
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


def _first_block_of_each_kind(kinds: dict[str, tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """``{kind: name of its first block}`` from ``{block name: kind}`` in forward order.

    The group's first block is always included."""
    representatives: dict[tuple[str, ...], str] = {}
    for name, kind in kinds.items():
        representatives.setdefault(kind, name)
    return representatives


def hidden_input(item: CapturedInputs) -> torch.Tensor:
    """The hidden state among a block's inputs: its first positional argument or ``hidden_states``."""
    if item.args:
        return item.args[0]
    if "hidden_states" in item.kwargs:
        return item.kwargs["hidden_states"]
    raise ValueError(
        f"cannot tell which input of the block is the hidden state (kwargs: {sorted(item.kwargs)}); "
        "set COMQConfig(block_name=...) to a list of blocks taking the hidden state first"
    )


def hidden_output(result: Any) -> torch.Tensor:
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
