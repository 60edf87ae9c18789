"""True-sequential calibration inside a block: its layers in stages, each on the quantized output of the ones before.

Block-sequential calibration gives every layer of a block the inputs the quantized
prefix produces, but inside the block all layers are recorded in one pass with the
block still in full precision: ``o_proj`` is solved on attention outputs made by
full-precision ``q/k/v``, ``down_proj`` on activations made by full-precision
``gate/up``.  With ``true_sequential`` (AutoGPTQ's and GPTQModel's name; on by default wherever
layers are aimed at the full-precision outputs) a block is
calibrated in stages instead, each stage solved on inputs that pass through the quantized
layers of the stages before it: for a Llama block ``q/k/v``, then ``o``, then
``gate/up``, then ``down``.

* :func:`layer_stages` finds the stages from the block itself: each layer's stage is one
  more than the latest stage of any layer whose output its input depends on, read from
  the autograd graph of one batch.  So layers reading one input (q/k/v) share a stage, and so do
  layers of independent branches (the experts of a mixture), whatever the model.
* :class:`QuantizedStandIns`: while a block's stages are solved its layers stay in full
  precision (the full-precision stream of ``fp_target`` runs the very same modules);
  in the quantized stream, a solved layer runs its packed layer instead.
* :class:`StageStop` ends a forward pass at the input of the last layer of a stage it
  reaches: nothing after that changes the stage's Gram matrices.
* :class:`PausedPass` runs every batch through the block once, each held at a stage's
  first layer until the stage is solved, instead of one pass per stage and one more to
  make the next block's inputs; :func:`stages_in_call_order` says where it applies.
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..nn import COMQLinear
from ..solver import QuantizedWeight
from ..threads import AllAtOnce
from .placement import materialized

__all__ = ["PausedPass", "QuantizedStandIns", "StageStop", "held_pass_slots", "layer_stages", "stages_in_call_order"]


def layer_stages(model: nn.Module, names: Sequence[str], run_block: Callable[[], Any]) -> list[list[str]]:
    """``names`` in stages, in the order a stage-by-stage calibration solves them.

    ``run_block()`` runs the block once (on one calibration batch).  During it, each
    layer's output is made from a fresh autograd leaf of the same values, and its
    input is kept; afterwards, the leaves in a layer's input's autograd graph are the
    layers it depends on.  The graph is only walked, never differentiated, so in-place
    operations of the model are no obstacle.  Layers of a stage depend on no layer of
    the same or a later stage.  A layer that did not run (an expert the batch routes no
    token to) joins the last stage: its inputs can come after every other layer's.
    Dependencies through integer indices (a router's choice of experts) are not seen,
    so a router and its experts can share a stage.
    """
    inputs: dict[str, torch.Tensor] = {}
    leaves: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if name in leaves or not args or not isinstance(output, torch.Tensor):
                return None  # a second call of the same layer: its first decides
            inputs[name] = args[0]
            leaves[name] = output.detach().requires_grad_(True)
            return leaves[name].clone()  # not the leaf itself, which the model may change in place

        return hook

    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    try:
        with torch.enable_grad():
            run_block()
    finally:
        for handle in handles:
            handle.remove()
    layer_of_leaf = {id(leaf): name for name, leaf in leaves.items()}
    stage_of: dict[str, int] = {}
    for name in leaves:  # the order the layers first ran in: a layer depends only on earlier ones
        depends = _leaves_in_graph(inputs[name], layer_of_leaf)
        stage_of[name] = 1 + max((stage_of[other] for other in depends if other in stage_of), default=-1)
    last = max(stage_of.values(), default=0)
    stages: list[list[str]] = [[] for _ in range(last + 1)]
    for name in names:
        stages[stage_of.get(name, last)].append(name)
    return [stage for stage in stages if stage]


def _leaves_in_graph(value: torch.Tensor, layer_of_leaf: dict[int, str]) -> set[str]:
    """The layers whose output leaf ``value``'s autograd graph reaches."""
    if value.grad_fn is None:
        return {layer_of_leaf[id(value)]} if id(value) in layer_of_leaf else set()
    found: set[str] = set()
    seen: set[Any] = set()
    pending = [value.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node holds its leaf
        if variable is not None and id(variable) in layer_of_leaf:
            found.add(layer_of_leaf[id(variable)])
        pending.extend(child for child, _ in node.next_functions)
    return found


def _restore_forwards(wrapped: list[tuple[nn.Module, Any]]) -> None:
    """Give each wrapped layer back the ``forward`` attribute it had (none: its class's), latest wrap first."""
    for module, own_forward in reversed(wrapped):
        if own_forward is None:
            del module.forward
        else:
            module.forward = own_forward
    wrapped.clear()


class StageComplete(Exception):
    """Raised by :class:`StageStop` once every layer of the stage has been reached in a forward pass."""


class StageStop:
    """Cut a block's forward pass short at the input of the last layer of a stage it reaches.

    Use as a context manager (it owns forward pre-hooks) and run each forward pass through
    :meth:`run`; passes on several threads at once are counted apart.  Make the stop after
    the :class:`~hf_comq.calibration.hooks.HessianRecorder` of the stage: a layer's hooks
    run in the order they were made, so the recorder has taken the last layer's input
    when the stop ends the pass, before that layer computes.

    A pass is cut short only once one pass ran to its end calling every layer of the
    stage exactly once (the first pass of a block, in effect): where a layer is called
    twice, or not in every pass (an expert without routed tokens), ending at the first
    call of each would lose inputs, so every pass runs to the end.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self._wanted = frozenset(names)
        self._seen = threading.local()
        self._armed: bool | None = None  # None until a pass ran to its end: True if it called each layer once
        self._handles = [model.get_submodule(name).register_forward_pre_hook(self._hook(name)) for name in names]

    def __enter__(self) -> "StageStop":
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(self, block: nn.Module, args: tuple, kwargs: dict) -> Any:
        """``block(*args, **kwargs)``, or ``None`` when the stage's layers were all reached before its end."""
        calls = self._seen.calls = collections.Counter()
        try:
            result = block(*args, **kwargs)
        except StageComplete:
            return None
        finally:
            self._seen.calls = None
        if self._armed is None:
            self._armed = calls.keys() == self._wanted and all(count == 1 for count in calls.values())
        return result

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            calls = getattr(self._seen, "calls", None)
            if calls is None:
                return
            calls[name] += 1
            if self._armed and calls.keys() >= self._wanted:
                raise StageComplete

        return hook


class QuantizedStandIns:
    """Solved layers of a block, run in place of its full-precision layers in the quantized stream.

    The block keeps its full-precision layers until all its stages are solved; inside
    :meth:`active` (on the calling thread only), a solved layer's forward runs its packed
    layer instead, on the same input.  Outside, the block is the full-precision one,
    which ``fp_target``'s full-precision stream runs on other threads at the same time.
    The layer's own forward is wrapped rather than its output replaced by a hook, so the
    full-precision product is not computed only to be thrown away; the layer's torch
    hooks still run around the call.  Accelerate's hooks live in the forward it wraps, so
    inside :meth:`active` they do not run: an offloaded layer's weights are not brought
    in for a packed layer that holds its own.  Use as a context manager: the wrappers go
    on exit.
    """

    def __init__(self, model: nn.Module, compute: torch.device, symmetric: bool):
        self._model = model
        self._compute = compute
        self._symmetric = symmetric
        self._active = threading.local()
        self._wrapped: list[tuple[nn.Module, Any]] = []  # each layer and the forward it had as an attribute
        self._packed: dict[str, COMQLinear] = {}

    def __enter__(self) -> "QuantizedStandIns":
        return self

    def __exit__(self, *exc: Any) -> None:
        _restore_forwards(self._wrapped)

    def add(self, name: str, qweight: QuantizedWeight) -> None:
        """Run layer ``name`` as ``qweight`` from now on, inside :meth:`active`."""
        module = self._model.get_submodule(name)
        with materialized(module, self._compute), torch.no_grad():
            packed = COMQLinear.from_quantized(module, qweight, self._symmetric).to(self._compute)
        self._wrapped.append((module, module.__dict__.get("forward")))
        module.forward = self._forward(module.forward, packed)
        self._packed[name] = packed

    def packed(self, name: str) -> COMQLinear:
        """The packed layer standing in for ``name``: what the block installs once every stage is solved, so
        that the stage's codes need not be kept beside it until then."""
        return self._packed[name]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Forward passes on this thread run the solved layers quantized."""
        self._active.on = True
        try:
            yield
        finally:
            self._active.on = False

    def _forward(self, full_precision: Callable[..., Any], packed: COMQLinear) -> Callable[..., Any]:
        def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not getattr(self._active, "on", False):
                return full_precision(hidden, *args, **kwargs)
            return packed(hidden.to(self._compute)).to(hidden.device)

        return forward


def stages_in_call_order(
    model: nn.Module, stages: Sequence[Sequence[str]], run_block: Callable[[], Any]
) -> list[list[str]] | None:
    """``stages``, each in the order a forward pass calls its layers, where a :class:`PausedPass` gives the
    sums a pass per stage gives; ``None`` elsewhere.

    ``run_block()`` runs the block once.  A paused pass holds each batch at the first
    layer of a stage it calls, with that layer's input; the stage's other layers are
    called only once the stage is solved.  So every layer must run once per pass, and
    a stage's layers must all read the very tensor its first one reads: q/k/v, gate/up,
    but not a cross-attention's query beside its key and value, nor a layer called twice.
    """
    inputs: dict[str, list[Any]] = {}  # in the order the layers were first called

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            inputs.setdefault(name, []).append(args[0] if args else None)

        return hook

    names = [name for stage in stages for name in stage]
    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    try:
        run_block()
    finally:
        for handle in handles:
            handle.remove()
    if any(len(inputs.get(name, ())) != 1 for name in names):
        return None
    order = list(inputs)
    ordered = [sorted(stage, key=order.index) for stage in stages]
    for stage in ordered:
        first = inputs[stage[0]][0]
        if not isinstance(first, torch.Tensor) or any(inputs[name][0] is not first for name in stage):
            return None
    return ordered


def held_pass_slots(workers: int) -> int:
    """Slots for a held pass (:class:`PausedPass`) whose batches would run on ``workers`` threads side by
    side: one more where there are several.

    A held pass's slots change hands at every stage of every batch (a batch held, the
    caller's turn to sum it, the next batch let go), each time a thread woken through a
    lock and then the interpreter's; with one slot per thread, that thread's core idles
    through every hand-off.  One slot more keeps it busy meanwhile.  What is computed
    does not depend on how many batches compute at once (each on one torch thread, every
    sum in batch order), so neither do the codes.  With one worker each batch keeps the
    caller's threads (large layers), which a second slot would only split.
    """
    return workers + 1 if workers > 1 else workers


class _PassAborted(Exception):
    """Ends a held pass whose block calibration failed elsewhere (the other failure is the one raised)."""


class PausedPass:
    """Every batch's quantized-stream pass through a block at once, each held at a stage until the stage is solved.

    Solved in stages, a block would otherwise run once per stage (each pass redoing the
    stages before it) and once more, quantized, to make the next block's inputs.  Here
    each batch runs it once: a pass that calls the first layer of a stage not yet solved
    waits there, its input kept, until the caller has summed every batch's inputs
    (:meth:`arrivals`, each as it comes, while later batches still run), solved the
    stage, run its layers quantized (:class:`QuantizedStandIns`, entered inside this
    scope) and said so (:meth:`release`); then it goes on.  Its end is the block's
    quantized output (:meth:`outputs`).  The inputs kept are the ones a pass per stage
    would record, so the sums and codes are the same; the price is that every batch's
    pass is alive at once, with its activations, until the block's last stage is
    solved.  Only for stages from :func:`stages_in_call_order`.

    ``jobs[i]()`` runs batch ``i``'s pass (with the stand-ins active); at most
    ``workers`` compute at once (:class:`~hf_comq.threads.AllAtOnce`), the caller's
    own work in :meth:`caller_turn` included.
    """

    _RUNNING = -1
    _ENDED = math.inf

    def __init__(
        self,
        model: nn.Module,
        stages: Sequence[Sequence[str]],
        jobs: Sequence[Callable[[], Any]],
        workers: int,
    ):
        self._model = model
        self._stages = [list(stage) for stage in stages]
        self._stage_of = {name: index for index, stage in enumerate(self._stages) for name in stage}
        # Two conditions on one lock: an arrival wakes only the caller (waiting in arrivals()), a
        # release only the held batches.  One condition for both would wake every held pass at each
        # arrival, each to take the interpreter lock only to wait again: a herd that grows with the
        # batches and keeps the interpreter from the passes that compute.
        lock = threading.Lock()
        self._arrived = threading.Condition(lock)
        self._released = threading.Condition(lock)
        self._solved = -1  # stages up to this one are solved
        self._aborted = False
        self._error: BaseException | None = None
        self._at: list[float] = [self._RUNNING] * len(jobs)  # per batch: the stage it is held at
        self._held: list[dict[int, torch.Tensor]] = [{} for _ in self._stages]  # per stage: each batch's input
        self._local = threading.local()
        self._wrapped: list[tuple[nn.Module, Any]] = []
        self._all = AllAtOnce([self._job(index, job) for index, job in enumerate(jobs)], workers)

    def __enter__(self) -> "PausedPass":
        for name in self._stage_of:
            module = self._model.get_submodule(name)
            self._wrapped.append((module, module.__dict__.get("forward")))
            module.forward = self._holding(name, module, module.forward)
        self._all.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._released:
            self._aborted = True  # passes still held (the caller failed) end now
            self._released.notify_all()
        self._all.__exit__()
        _restore_forwards(self._wrapped)  # the wrappers, which hold the layers' own forwards, go with them
        self._held = [{} for _ in self._stages]

    def arrivals(self, stage: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(batch, input)`` of each batch held at ``stage``, in batch order, each as soon as that batch
        is held (a batch whose pass ends without reaching the stage is skipped); a failed batch's error
        instead.

        The caller sums each while later batches still compute (in :meth:`caller_turn`), so the
        stage's sums overlap the passes instead of waiting for the last of them, and are added in
        batch order as before: the same sums to the last bit.  Iterate to the end before
        :meth:`release`.
        """
        for batch in range(len(self._at)):
            with self._arrived:
                self._arrived.wait_for(lambda batch=batch: self._error is not None or self._at[batch] >= stage)
                if self._error is not None:
                    raise self._error
                hidden = self._held[stage].pop(batch, None)
            if hidden is not None:
                yield batch, hidden

    def caller_turn(self) -> contextlib.AbstractContextManager[None]:
        """A compute slot for the caller's own work while passes run (:meth:`AllAtOnce.caller_turn
        <hf_comq.threads.AllAtOnce.caller_turn>`): at most ``workers`` compute at once, the caller included."""
        return self._all.caller_turn()

    def release(self, stage: int) -> None:
        """``stage`` is solved and runs quantized: the batches held there go on."""
        with self._released:
            self._solved = stage
            self._released.notify_all()

    def outputs(self) -> list[Any]:
        """Each batch's pass's result, in batch order, once every stage is released."""
        return self._all.results()

    def _job(self, index: int, job: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            self._local.batch = index
            try:
                return job()
            except _PassAborted:
                raise
            except BaseException as error:
                with self._arrived:
                    if self._error is None:
                        self._error = error
                raise
            finally:
                with self._arrived:
                    self._at[index] = self._ENDED
                    self._arrived.notify_all()

        return run

    def _holding(self, name: str, module: nn.Module, own: Callable[..., Any]) -> Callable[..., Any]:
        """``module``'s forward while held passes run: ``own`` (its forward without the hold) once its stage is
        solved or outside a held pass, else the hold first."""
        stage = self._stage_of[name]

        def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            batch = getattr(self._local, "batch", None)
            if batch is None or stage <= self._solved:  # not a held pass (the full-precision stream), or left alone
                return own(hidden, *args, **kwargs)
            self._hold(stage, batch, hidden)
            current = module.__dict__.get("forward")  # the stage's stand-in now, unless the layer was skipped
            if getattr(current, "holds_batches", False):
                return own(hidden, *args, **kwargs)
            return current(hidden, *args, **kwargs)

        forward.holds_batches = True  # a mark, not a reference to itself: no cycle keeps the layer alive
        return forward

    def _hold(self, stage: int, batch: int, hidden: torch.Tensor) -> None:
        with self._arrived:
            self._held[stage][batch] = hidden
            self._at[batch] = stage
            self._arrived.notify_all()
        with self._all.step_aside(), self._released:
            self._released.wait_for(lambda: self._solved >= stage or self._aborted)
            if self._solved < stage:
                raise _PassAborted(f"batch {batch}: the block's calibration stopped before stage {stage} was solved")
            self._at[batch] = self._RUNNING
