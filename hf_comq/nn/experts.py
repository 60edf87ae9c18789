"""``UnfusedExperts``: a mixture-of-experts layer's experts as one small MLP each, so COMQ can quantize them.

transformers 5 keeps a MoE layer's experts as two batched 3-D parameters,
``gate_up_proj (experts, 2 * intermediate, hidden)`` and ``down_proj (experts, hidden,
intermediate)``; checkpoints, vLLM and compressed-tensors name them one expert at a
time (``experts.<e>.gate_proj.weight``, ...), and transformers merges those while
loading.  COMQ quantizes ``nn.Linear`` layers on their own inputs, and an expert's
inputs are only the tokens the router sends it.  ``UnfusedExperts`` holds expert ``e``
as ``self[e]``, an :class:`ExpertMLP` of three ``nn.Linear`` (or, once quantized,
:class:`~hf_comq.nn.COMQLinear`) layers, and computes what the batched module computed.
So calibration hooks each expert's layers like any other layer, and the state dict
names are the per-expert checkpoint names: ``save_pretrained`` writes the
compressed-tensors layout that plain transformers and vLLM read for quantized experts.

Only the common layout is taken (:func:`is_standard_batched_experts`): no biases, not
transposed, ``act_fn(gate) * up``, called as ``experts(hidden, top_k_index,
top_k_weights)``.  Other layouts (GPT-OSS's clamped activation, Llama 4's experts that
see every token) stay batched and in full precision.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import nn

DEFAULT_PROJECTION_NAMES = ("gate_proj", "up_proj", "down_proj")
"""Per-expert layer names where the model's checkpoint mapping names none (Mixtral's are ``w1``, ``w3``, ``w2``)."""


LAYOUT_FLAGS = ("is_transposed", "has_bias", "is_concatenated", "has_gate")
"""What transformers' experts interface (``use_experts_implementation``) declares on every experts module
it drives (since transformers 5.17); its eager, batched and grouped implementations all compute what the
flags say.  Later versions add ``has_post_expert_norm``, false unless declared."""
STANDARD_LAYOUT = (False, False, True, True)
"""The flags of the layout :class:`UnfusedExperts` reproduces: ``down(act(gate(x)) * up(x))``, gate and up
concatenated in ``gate_up_proj``, ``(out, in)`` weights, no biases (and no norm after the experts)."""


def is_standard_batched_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a batched experts module in the layout :class:`UnfusedExperts` reproduces.

    Only modules declared through transformers' experts interface qualify: a module
    that merely has parameters of the right names and shapes may compute anything.
    """
    own = dict(module.named_parameters(recurse=False))
    gate_up, down = own.get("gate_up_proj"), own.get("down_proj")
    experts = getattr(module, "num_experts", None)
    if not isinstance(experts, int) or isinstance(experts, bool) or gate_up is None or down is None:
        return False
    if not all(hasattr(module, flag) for flag in LAYOUT_FLAGS):
        return False
    layout = tuple(bool(getattr(module, flag)) for flag in LAYOUT_FLAGS)
    if layout != STANDARD_LAYOUT or getattr(module, "has_post_expert_norm", False):
        return False
    if not callable(getattr(module, "act_fn", None)):
        return False
    if any(name.endswith("bias") for name in own):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != experts or down.shape[0] != experts:
        return False
    hidden, intermediate = down.shape[1], down.shape[2]
    return tuple(gate_up.shape[1:]) == (2 * intermediate, hidden)


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its three layers under the checkpoint's names."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, names: Sequence[str], act_fn: nn.Module):
        super().__init__()
        self.projection_names = tuple(names)
        for name, layer in zip(self.projection_names, (gate, up, down)):
            self.add_module(name, layer)
        self.act_fn = act_fn

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """``(gate, up, down)``, whatever the checkpoint calls them."""
        return tuple(getattr(self, name) for name in self.projection_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.projections()
        return down(self.act_fn(gate(x)) * up(x))  # gate and up read the same tensor: one Gram matrix for both


class UnfusedExperts(nn.ModuleList):
    """The experts of one MoE layer, one :class:`ExpertMLP` each; a drop-in for the batched module it replaces."""

    def __init__(self, experts: Sequence[ExpertMLP]):
        super().__init__(experts)
        self.num_experts = len(experts)
        self.every_token = False  # see every_token_to_every_expert
        self._routing = threading.local()

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the per-thread routing record: a thread-local cannot be copied,
        and the record only lives while an expert runs (:meth:`routed_rows`)."""
        state = super().__getstate__()
        state.pop("_routing", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._routing = threading.local()

    @classmethod
    def from_batched(cls, module: nn.Module, names: Sequence[str] = DEFAULT_PROJECTION_NAMES) -> "UnfusedExperts":
        """Copy a standard batched experts module (:func:`is_standard_batched_experts`) into per-expert layers."""
        if not is_standard_batched_experts(module):
            raise ValueError(f"{type(module).__name__} is not a batched experts module in the standard layout")
        gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
        intermediate = down.shape[2]
        experts = []
        for index in range(module.num_experts):
            gate, up = gate_up[index, :intermediate], gate_up[index, intermediate:]
            layers = [_linear_from(weight) for weight in (gate, up, down[index])]
            experts.append(ExpertMLP(*layers, names, module.act_fn))
        return cls(experts)

    @classmethod
    def empty_like(cls, module: nn.Module, names: Sequence[str] = DEFAULT_PROJECTION_NAMES) -> "UnfusedExperts":
        """Per-expert ``nn.Linear`` layers on ``meta`` shaped like ``module``'s experts, to be filled by loading."""
        if not is_standard_batched_experts(module):
            raise ValueError(f"{type(module).__name__} is not a batched experts module in the standard layout")
        hidden, intermediate = module.down_proj.shape[1:]
        dtype = module.down_proj.dtype

        def layer(in_features: int, out_features: int) -> nn.Linear:
            return nn.Linear(in_features, out_features, bias=False, device="meta", dtype=dtype)

        experts = [
            ExpertMLP(
                layer(hidden, intermediate), layer(hidden, intermediate), layer(intermediate, hidden), names, module.act_fn
            )
            for _ in range(module.num_experts)
        ]
        return cls(experts)

    def routed_rows(self) -> tuple[torch.Tensor, int] | None:
        """``(rows, tokens)`` of the expert call running on this thread, else ``None``: which of the
        ``tokens`` hidden states handed to the experts (flattened positions) the expert's inputs are.

        Calibration reads it to leave padding tokens out of an expert's Gram matrix,
        as it does for every other layer with the batch's attention mask (with
        :attr:`every_token` the rows are all ``tokens``).
        """
        return getattr(self._routing, "rows", None)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``sum_k weight_k * expert_k(x)`` over each token's chosen experts (transformers' eager loop).

        With :attr:`every_token` set, every expert runs on every token and only its
        routed tokens' outputs are kept: the output is the routed one, the inputs the
        experts' layers see are all tokens.
        """
        if torch.compiler.is_compiling():
            return self.traceable_forward(hidden_states, top_k_index, top_k_weights)
        output = torch.zeros_like(hidden_states)
        everyone = torch.arange(hidden_states.shape[0], device=hidden_states.device) if self.every_token else None
        chosen = range(self.num_experts) if self.every_token else torch.unique(top_k_index).tolist()
        for expert in chosen:
            if not 0 <= expert < self.num_experts:  # transformers marks dropped routes with num_experts
                continue
            slot, tokens = torch.where(top_k_index.T == expert)  # slot-major, as transformers orders them
            self._routing.rows = (tokens if everyone is None else everyone, hidden_states.shape[0])
            try:
                expert_output = self[expert](hidden_states if everyone is not None else hidden_states[tokens])
            finally:
                self._routing.rows = None
            if everyone is not None:
                expert_output = expert_output[tokens]
            weighted = expert_output * top_k_weights[tokens, slot, None]
            output.index_add_(0, tokens, weighted.to(output.dtype))
        return output

    def traceable_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward` for ``torch.compile`` and ``torch.export``: the same sum, in the same order.

        Every expert is visited, chosen or not: which experts were chosen
        (``torch.unique(...).tolist()``) is data the graph cannot branch on, while a gather
        of no rows is legal.  Calibration's records (:meth:`routed_rows`, :attr:`every_token`)
        are eager-only.
        """
        output = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            slot, tokens = torch.where(top_k_index.T == expert)
            weighted = self[expert](hidden_states[tokens]) * top_k_weights[tokens, slot, None]
            output.index_add_(0, tokens, weighted.to(output.dtype))
        return output


@contextlib.contextmanager
def every_token_to_every_expert(root: nn.Module) -> Iterator[None]:
    """While open, every :class:`UnfusedExperts` under ``root`` runs each of its experts on every token.

    Calibration's option ``calibrate_all_experts`` (llm-compressor's name and idea for
    the same thing): an expert's layers are then solved on the inputs of all calibration
    tokens, not only the few the router happens to send it, at the price of running
    every expert on every token while the Gram matrices are summed.  The model's
    outputs stay the routed ones, so later blocks see what they would see anyway.
    """
    experts = [module for module in root.modules() if isinstance(module, UnfusedExperts)]
    for module in experts:
        module.every_token = True
    try:
        yield
    finally:
        for module in experts:
            module.every_token = False


def _linear_from(weight: torch.Tensor) -> nn.Linear:
    """A bias-free ``nn.Linear`` holding its own copy of ``weight`` (a slice would keep the batched tensor alive)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
    return layer
