"""``COMQLinear``: a linear layer stored as compressed-tensors ``pack-quantized`` integer codes.

The module's state dict *is* the checkpoint format (compressed-tensors ``pack-quantized``,
readable by plain transformers and vLLM), so ``save_pretrained`` writes it as is and a
pre-quantized checkpoint loads into empty shells by name.  For a layer ``<name>`` that
was an ``nn.Linear`` with weight ``(out, in)``:

* ``<name>.weight_packed`` -- ``int32 (out, ceil(in * bits / 32))``, the unsigned codes
  packed along the input dimension (layout: :mod:`hf_comq.packing`);
* ``<name>.weight_scale`` -- ``float32 (out, n_groups)``.  Always float32, whatever the
  model dtype: the dequantized weight must be bit-identical to
  :meth:`hf_comq.QuantizedWeight.dequantize`, and every loader computes
  ``(q - zero) * scale`` in the scale's dtype before casting to the model's;
* ``<name>.weight_zero_point`` -- asymmetric grids only: ``int32 (ceil(out * bits / 32),
  n_groups)``, integer zero points packed along the *output* dimension, as
  compressed-tensors does for the ``channel`` and ``group`` strategies.  Symmetric grids
  have no tensor: their zero point is ``2**(bits - 1)``;
* ``<name>.weight_shape`` -- ``int64 [out, in]``;
* ``<name>.bias`` -- unchanged from the original layer.

``n_groups`` is 1 for per-channel scales, else ``in // group_size``.

transformers' ``Conv1D`` (GPT-2 style) stores its weight transposed, ``(in, out)``, and
plain transformers dequantizes a checkpoint tensor straight into that parameter.  Those
layers are therefore stored in the ``Conv1D`` layout: codes ``(in, out)`` packed along
``out``, scales ``(n_groups, out)``, and zero points as signed ``int8`` codes
``zero - 2**(bits-1)``, unpacked, ``(n_groups, out)`` -- compressed-tensors' ``block``
strategy with blocks one output channel wide (:mod:`hf_comq.checkpoint` writes that
scheme).  The layer still computes ``x @ W.T`` with ``W`` in ``nn.Linear`` layout.

The forward runs :func:`hf_comq.kernels.packed_linear` (a compiled CPU kernel that never
materialises the weight for a few tokens, with an exact torch fallback) for layers in
``nn.Linear`` layout; ``Conv1D``-layout layers dequantize and call ``F.linear``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map
from transformers.pytorch_utils import Conv1D  # GPT-2 style layer: weight stored transposed, (in, out)

from ..kernels import check_float_input, dequantize_packed, packed_linear, refuse_trainable_scale
from ..packing import pack_codes, pack_zero_points, packed_width, unpack_codes, unpack_zero_points
from ..solver import QuantizedWeight
from ..solver.options import resolve_group_size

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D)
PACKED_TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D``, subclasses included: the layers
    compressed-tensors targets, so each is either quantized or on the checkpoint's ``ignore`` list."""
    return isinstance(module, LINEAR_TYPES)


def has_own_forward(module: nn.Module) -> bool:
    """True for a linear-like layer whose class overrides ``forward``.

    Such a forward may compute more than ``x @ W.T + b`` (Llama 4's MoE router also picks
    the experts, IDEFICS appends extra features) or just the same map another way
    (Falcon), so whether a :class:`COMQLinear` can take its place is only known by
    running it (:func:`computes_linear_map`).
    """
    return is_linear_like(module) and type(module).forward not in (nn.Linear.forward, Conv1D.forward)


@torch.no_grad()
def computes_linear_map(module: nn.Module) -> bool:
    """Whether a linear-like layer's forward returns its linear map, checked on a probe input.

    The weights must be real (not offloaded) while this runs.  Half-precision layers get
    a looser tolerance: the same map computed in another order rounds differently.
    """
    if not has_own_forward(module):
        return is_linear_like(module)
    weight = get_linear_weight(module)
    bias = getattr(module, "bias", None)
    probe = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
    expected = F.linear(probe, weight, bias)
    output = module(probe)
    if not isinstance(output, torch.Tensor) or output.shape != expected.shape:
        return False
    tolerance = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    return bool((output.float() - expected.float()).abs().max() <= tolerance * (expected.float().abs().max() + 1e-6))


def has_linear_shape(module: nn.Module) -> bool:
    """True for the layers :func:`linear_shape` reads: linear-like ones and the :class:`COMQLinear` that replaced them."""
    return is_linear_like(module) or isinstance(module, COMQLinear)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an ``nn.Linear``, ``Conv1D`` or :class:`COMQLinear`."""
    if isinstance(module, (nn.Linear, COMQLinear)):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.nf, module.nx
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def get_linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight in ``nn.Linear`` layout ``(out, in)``: what ``comq_quantize`` expects.

    ``Conv1D`` stores ``(in, out)``; returning a transposed view keeps callers from
    having to special-case GPT-2 style models.
    """
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, Conv1D):
        return module.weight.t()
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def group_count(in_features: int, group_size: int | None) -> int:
    """Scale groups per row, by the solver's group-size rule (:func:`~hf_comq.solver.options.resolve_group_size`)."""
    return in_features // resolve_group_size(in_features, group_size)


class COMQLinear(nn.Module):
    """Linear layer holding packed integer codes, per-group scales and (asymmetric) zero points.

    ``forward(x)`` equals ``F.linear(x, dequantize(x.dtype), bias)`` up to fp32 summation
    order (exactly, on the fallback path); the dense weight is never cached, so memory and
    the state dict only ever hold the packed form and there is no stale copy to keep in sync.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int | None = None,
        symmetric: bool = False,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        transposed_source: bool = False,
    ):
        """Build an *empty* layer (uninitialised buffers); used on ``meta`` before loading.

        ``dtype`` is the original weight dtype: the bias is created in it and
        :meth:`dequantize` returns it by default.  ``transposed_source`` marks a
        ``Conv1D`` origin: the tensors then use the ``Conv1D`` layout (module docstring)
        and :meth:`to_float_module` restores a ``Conv1D``.
        """
        super().__init__()
        if group_size == in_features:
            group_size = None
        n_groups = group_count(in_features, group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.weight_dtype = dtype or torch.get_default_dtype()
        self.transposed_source = transposed_source
        rows, cols = (in_features, out_features) if transposed_source else (out_features, in_features)
        scale_shape = (n_groups, out_features) if transposed_source else (out_features, n_groups)
        self.register_buffer(
            "weight_packed", torch.empty(rows, packed_width(cols, bits), dtype=torch.int32, device=device)
        )
        self.register_buffer("weight_scale", torch.empty(scale_shape, dtype=torch.float32, device=device))
        if symmetric:
            self.weight_zero_point = None
        elif transposed_source:
            self.register_buffer("weight_zero_point", torch.empty(scale_shape, dtype=torch.int8, device=device))
        else:
            zero_rows = packed_width(out_features, bits)
            self.register_buffer(
                "weight_zero_point", torch.empty(zero_rows, n_groups, dtype=torch.int32, device=device)
            )
        self.register_buffer("weight_shape", torch.tensor([rows, cols], dtype=torch.int64, device=device))
        self._zero_cache: tuple[tuple, torch.Tensor] | None = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=self.weight_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def n_groups(self) -> int:
        return group_count(self.in_features, self.group_size)

    def _apply(self, fn: Any, recurse: bool = True) -> COMQLinear:
        """Moves follow the model; casts leave the scales float32 (``model.to(torch.bfloat16)``).

        A scale rounded to bf16 would move every weight of its group for good (a cast back
        cannot restore it), and a checkpoint saved after would carry the rounded scales.
        The weight's dtype (:attr:`weight_dtype`, what :meth:`dequantize` and ``weight``
        return) follows the cast, as a dense layer's weight would: ``fn`` is applied to an
        empty tensor of that dtype to learn the new one.
        """
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != scale.dtype:
            self._buffers["weight_scale"] = scale.to(self.weight_scale.device)
        cast = fn(torch.empty(0, dtype=self.weight_dtype, device=scale.device))
        if cast.is_floating_point():
            self.weight_dtype = cast.dtype
        return self

    @classmethod
    def empty_like(
        cls, module: nn.Module, bits: int, group_size: int | None, symmetric: bool = False, device=None
    ) -> COMQLinear:
        """An empty shell shaped like ``module`` (``nn.Linear`` or ``Conv1D``), on ``meta`` by default.

        Used when loading a pre-quantized checkpoint: the buffers are then filled by name.
        """
        out_features, in_features = linear_shape(module)
        weight = get_linear_weight(module)
        return cls(
            in_features,
            out_features,
            bits=bits,
            group_size=group_size,
            symmetric=symmetric,
            bias=module.bias is not None,
            dtype=weight.dtype,
            device=device if device is not None else torch.device("meta"),
            transposed_source=not isinstance(module, nn.Linear),
        )

    @classmethod
    def from_quantized(cls, module: nn.Module, qweight: QuantizedWeight, symmetric: bool = False) -> COMQLinear:
        """Convert ``module`` (``nn.Linear`` or ``Conv1D``) using the solver's result.

        ``qweight.codes`` must be in ``nn.Linear`` layout ``(out, in)``: for ``Conv1D``,
        quantize ``get_linear_weight(module)`` (the transposed weight).  ``symmetric``
        layers store no zero point, so every zero point must then be ``2**(bits-1)``.
        """
        out_features, in_features = linear_shape(module)
        if tuple(qweight.codes.shape) != (out_features, in_features):
            raise ValueError(
                f"QuantizedWeight has shape {tuple(qweight.codes.shape)} but the {type(module).__name__} needs "
                f"(out, in) = {(out_features, in_features)}; for Conv1D quantize get_linear_weight(module), "
                "which is the transposed weight"
            )
        device = get_linear_weight(module).device
        layer = cls.empty_like(module, qweight.bits, qweight.group_size, symmetric, device=device)
        layer.weight_dtype = qweight.dtype
        zero = zero_points_as_codes(qweight.zero_point, qweight.bits).to(device)
        if symmetric and not bool((zero == 1 << (qweight.bits - 1)).all()):
            raise ValueError(
                f"a symmetric layer needs every zero point at {1 << (qweight.bits - 1)}; quantize with symmetric=True"
            )
        codes = qweight.codes.to(device)
        scale = qweight.scale.to(device=device, dtype=torch.float32)
        if layer.transposed_source:
            layer.weight_packed.copy_(pack_codes(codes.t(), qweight.bits))
            layer.weight_scale.copy_(scale.t())
            if not symmetric:
                layer.weight_zero_point.copy_((zero.t().to(torch.int16) - (1 << (qweight.bits - 1))).to(torch.int8))
        else:
            layer.weight_packed.copy_(pack_codes(codes, qweight.bits))
            layer.weight_scale.copy_(scale)
            if not symmetric:
                layer.weight_zero_point.copy_(pack_zero_points(zero, qweight.bits))
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        return layer

    # ------------------------------------------------------------------ views in nn.Linear layout
    def codes(self) -> torch.Tensor:
        """Unpacked ``uint8`` codes, ``(out_features, in_features)``."""
        if self.transposed_source:
            return unpack_codes(self.weight_packed, self.bits, self.out_features).t()
        return unpack_codes(self.weight_packed, self.bits, self.in_features)

    def scales(self) -> torch.Tensor:
        """Scales ``(out_features, n_groups)``."""
        return self.weight_scale.t() if self.transposed_source else self.weight_scale

    def zero_points(self) -> torch.Tensor:
        """Integer zero points ``(out_features, n_groups)`` as ``uint8`` codes."""
        offset = 1 << (self.bits - 1)
        if self.weight_zero_point is None:
            return torch.full((self.out_features, self.n_groups), offset, dtype=torch.uint8, device=self.weight_scale.device)
        if self.transposed_source:
            return (self.weight_zero_point.t().to(torch.int16) + offset).to(torch.uint8)
        return unpack_zero_points(self.weight_zero_point, self.bits, self.out_features)

    def zero_codes(self) -> torch.Tensor:
        """:meth:`zero_points`, unpacked once and reused while the packed tensor is unchanged.

        The kernel needs them unpacked on every call; they are tiny, but unpacking them per
        call would cost a noticeable share of a one-token forward.  The cache is keyed on the
        packed tensor's identity, storage and version counter, so loading or editing the
        checkpoint tensor invalidates it (in place under ``torch.no_grad()``, or by assigning a
        new tensor; a write through ``.data`` or a NumPy view bypasses the version counter and
        is not seen); under ``torch.compile`` they are unpacked in the graph.
        They are unpacked outside ``torch.inference_mode`` even when called under it: an
        inference tensor in the cache would break every later forward that autograd records.
        A layer whose own tensors are inference tensors (copied or moved under
        ``torch.inference_mode``) has no version counter to key on: it unpacks them per call.
        """
        source = self.weight_zero_point if self.weight_zero_point is not None else self.weight_scale
        if torch.compiler.is_compiling() or source.device.type == "meta" or source.is_inference():
            return self.zero_points()
        key = (id(source), source.data_ptr(), source._version, source.device)
        if self._zero_cache is None or self._zero_cache[0] != key:
            with torch.inference_mode(False):
                self._zero_cache = (key, self.zero_points())
        return self._zero_cache[1]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``(code - zero) * scale`` in ``nn.Linear`` layout, computed in float32, then cast."""
        dtype = dtype or self.weight_dtype
        if not self.transposed_source:
            scale = self.weight_scale.float()
            return dequantize_packed(self.weight_packed, scale, self.zero_codes(), self.bits, self.in_features).to(dtype)
        codes = self.codes().to(torch.int32).view(self.out_features, self.n_groups, -1)
        zero = self.zero_points().to(torch.int32).unsqueeze(-1)
        weight = (codes - zero).float() * self.scales().float().unsqueeze(-1)
        return weight.view(self.out_features, self.in_features).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the *source* layout (``Conv1D``: ``(in, out)``), computed when first read.

        Model code reads ``layer.weight`` in every forward for its dtype alone (T5's
        feed-forward casts its input to ``wo.weight.dtype``) and outside ``forward`` (GPT-2's
        ``_init_weights`` re-initialises ``c_proj.weight`` while loading).  So this is a
        :class:`DequantizedWeight`: its shape, dtype and device cost nothing, the first op on
        its values dequantizes once.  It is a fresh copy: writing into it does not change the
        layer.  Under ``torch.compile`` it is the plain tensor, which the compiler drops where
        only its dtype is read.
        """
        if torch.compiler.is_compiling():
            return self.source_layout_weight()
        shape = (self.out_features, self.in_features)
        shape = shape[::-1] if self.transposed_source else shape
        return DequantizedWeight(self.source_layout_weight, shape, self.weight_dtype, self.weight_packed.device)

    def source_layout_weight(self) -> torch.Tensor:
        """:meth:`dequantize` in the layout of the layer it replaced (``Conv1D``: transposed, ``(in, out)``)."""
        weight = self.dequantize()
        return weight.t() if self.transposed_source else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        if self.transposed_source:
            check_float_input(x)  # as packed_linear checks it for the nn.Linear layout
            if torch.is_grad_enabled():
                refuse_trainable_scale(self.weight_scale)  # as packed_linear does for the nn.Linear layout
            return F.linear(x, self.dequantize(x.dtype), bias)
        scale = self.weight_scale if self.weight_scale.dtype == torch.float32 else self.weight_scale.float()
        zero = self.zero_codes()
        return packed_linear(x, self.weight_packed, scale, zero, self.bits, bias, in_features=self.in_features)

    def to_float_module(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A plain ``nn.Linear`` (or ``Conv1D`` if that is what was quantized) with the dequantized weight."""
        weight = self.dequantize(dtype)
        bias = None if self.bias is None else self.bias.detach().to(weight.dtype)
        with torch.device("meta"):  # skip allocating and initialising a throwaway weight
            if self.transposed_source:
                layer = Conv1D(self.out_features, self.in_features)
                weight = weight.t().contiguous()
                bias = bias if bias is not None else torch.zeros(self.out_features, dtype=weight.dtype, device=weight.device)
            else:
                layer = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
        layer.weight = nn.Parameter(weight)
        if bias is not None:
            layer.bias = nn.Parameter(bias)
        return layer

    def extra_repr(self) -> str:
        groups = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        grid = "symmetric" if self.symmetric else "asymmetric"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"{groups}, {grid}, bias={self.bias is not None}"
        )


class DequantizedWeight(torch.Tensor):
    """A dense weight as torch sees it (shape, dtype, device) whose values are computed on first use.

    :attr:`COMQLinear.weight` returns one, as optimum-quanto's and torchao's quantized
    weights are tensors of the float dtype: ``isinstance(w, torch.Tensor)`` and ``w.dtype``
    answer without dequantizing, and every op (``F.linear``, ``w.t()``, ``w.data.normal_()``,
    printing, ``torch.save``) runs on the dense tensor, computed once per returned object
    and plain from then on.  What reads memory without an op (its storage and address,
    ``share_memory_``, safetensors' writer) reads the dense tensor's; ``nn.Parameter(w)``
    gives a parameter of the dense values.
    """

    @staticmethod
    def __new__(cls, compute: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=False)

    def __init__(self, compute: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self._compute = compute
        self._dense: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """The values, a plain tensor, computed by the first call."""
        if self._dense is None:
            self._dense = self._compute()
        return self._dense

    __torch_function__ = torch._C._disabled_torch_function_impl  # every op reaches __torch_dispatch__

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        def dense(value: Any) -> Any:
            return value.dense() if isinstance(value, DequantizedWeight) else value

        return func(*tree_map(dense, args), **tree_map(dense, kwargs or {}))

    # The methods that read memory directly rather than through an op.
    def __repr__(self, **kwargs: Any) -> str:
        return repr(self.dense())

    def __reduce_ex__(self, protocol: int) -> Any:
        return self.dense().__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict) -> torch.Tensor:
        return self.dense().clone()

    def numpy(self, *, force: bool = False) -> Any:
        return self.dense().numpy(force=force)

    def tolist(self) -> Any:
        return self.dense().tolist()

    def untyped_storage(self) -> torch.UntypedStorage:
        return self.dense().untyped_storage()

    def data_ptr(self) -> int:
        return self.dense().data_ptr()

    def storage_offset(self) -> int:
        return self.dense().storage_offset()

    def share_memory_(self) -> torch.Tensor:
        self.dense().share_memory_()
        return self

    def detach(self) -> torch.Tensor:
        """Of the same type, as ``nn.Parameter(w)`` requires of a tensor subclass; the values are the same object."""
        return DequantizedWeight(lambda: self.dense().detach(), tuple(self.shape), self.dtype, self.device)


def replace_module(model: nn.Module, name: str, qweight: QuantizedWeight, symmetric: bool = False) -> COMQLinear:
    """Swap the layer ``name`` of ``model`` for a :class:`COMQLinear` built from ``qweight``.

    Returns the new layer.  The original weight is dropped (its memory is freed once
    the caller lets go of it), the bias object is kept.

    A building block for calibration, not a way to make checkpoints: a model whose
    layers were swapped by hand has no ``quantization_config`` in its config, so
    ``save_pretrained`` writes packed tensors that no loader maps back (plain
    transformers reloads such a layer with random weights, ``load_quantized`` refuses
    the folder).  Checkpoints come from ``from_pretrained(...,
    quantization_config=COMQConfig(...))``.
    """
    module = model.get_submodule(name)
    if not is_linear_like(module):
        raise TypeError(f"{name!r} is a {type(module).__name__}, not an nn.Linear or Conv1D")
    layer = COMQLinear.from_quantized(module, qweight, symmetric)
    model.set_submodule(name, layer)
    return layer


def zero_points_as_codes(zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points are stored as codes: check they are integers in ``[0, 2**bits - 1]``.

    The loader applies the same rule, so a layer that passes here can always be reloaded.
    """
    values = zero_point.float()
    rounded = torch.round(values)
    max_code = (1 << bits) - 1
    if values.numel() and (not torch.equal(rounded, values) or float(rounded.min()) < 0 or float(rounded.max()) > max_code):
        raise ValueError(f"zero points must be integers in [0, {max_code}] for bits={bits}")
    return rounded.to(torch.uint8)
