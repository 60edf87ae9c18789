"""``COMQLinear``: a linear layer stored as packed COMQ integer codes.

State dict (what ``save_pretrained`` writes for a converted layer ``<name>``):

* ``<name>.qweight`` -- ``int32 (out_features, packed_width(in_features, bits))``, the
  codes packed along the input dimension (layout: :mod:`hf_comq.packing`).
* ``<name>.scales`` -- ``float32 (out_features, n_groups)``.  Always float32, whatever
  the model dtype: the dequantized weight must be bit-identical to
  :meth:`hf_comq.QuantizedWeight.dequantize`, and transformers keeps a buffer's own
  dtype when the empty module declares it, so a bf16 reload does not round them.
* ``<name>.qzeros`` -- ``uint8 (out_features, n_groups)``, integer zero points.
* ``<name>.bias`` -- unchanged from the original layer.

``n_groups`` is 1 for per-channel scales (``group_size=None``), else
``in_features // group_size``.  ``bits`` and ``group_size`` are not in the state
dict: they come from the checkpoint's ``quantization_config``, and the packed shape
is checked against them when loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..packing import pack_codes, packed_width, unpack_codes
from ..solver import QuantizedWeight

from transformers.pytorch_utils import Conv1D  # GPT-2 style layer: weight stored transposed, (in, out)

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D)
BUFFER_NAMES = ("qweight", "scales", "qzeros")


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D`` (the layers COMQ converts)."""
    return isinstance(module, LINEAR_TYPES)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an ``nn.Linear`` or ``Conv1D``."""
    if isinstance(module, nn.Linear):
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
    """Scale groups per row; rejects a group size that does not divide ``in_features``."""
    if group_size is None or group_size == in_features:
        return 1
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features}; "
            "use a divisor of every quantized layer's input size, or group_size=None"
        )
    return in_features // group_size


class COMQLinear(nn.Module):
    """Linear layer holding COMQ-packed integer codes, per-group scales and zero points.

    ``forward(x)`` is ``F.linear(x, dequantize(x.dtype), bias)``: the weight is rebuilt
    on every call and never cached, so the state dict only ever holds the packed form
    and there is no stale copy to keep in sync.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int | None = None,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        transposed_source: bool = False,
    ):
        """Build an *empty* layer (uninitialised buffers); used on ``meta`` before loading.

        ``dtype`` is the original weight dtype: the bias is created in it and
        :meth:`dequantize` returns it by default.  ``transposed_source`` remembers a
        ``Conv1D`` origin so :meth:`to_float_module` restores the same layout.
        """
        super().__init__()
        if group_size == in_features:
            group_size = None
        n_groups = group_count(in_features, group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.weight_dtype = dtype or torch.get_default_dtype()
        self.transposed_source = transposed_source
        width = packed_width(in_features, bits)
        self.register_buffer("qweight", torch.empty(out_features, width, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(out_features, n_groups, dtype=torch.float32, device=device))
        self.register_buffer("qzeros", torch.empty(out_features, n_groups, dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=self.weight_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def empty_like(cls, module: nn.Module, bits: int, group_size: int | None, device=None) -> COMQLinear:
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
            bias=module.bias is not None,
            dtype=weight.dtype,
            device=device if device is not None else torch.device("meta"),
            transposed_source=not isinstance(module, nn.Linear),
        )

    @classmethod
    def from_quantized(cls, module: nn.Module, qweight: QuantizedWeight) -> COMQLinear:
        """Convert ``module`` (``nn.Linear`` or ``Conv1D``) using the solver's result.

        ``qweight.codes`` must be in ``nn.Linear`` layout ``(out, in)``: for ``Conv1D``,
        quantize ``get_linear_weight(module)`` (the transposed weight).
        """
        out_features, in_features = linear_shape(module)
        if tuple(qweight.codes.shape) != (out_features, in_features):
            raise ValueError(
                f"QuantizedWeight has shape {tuple(qweight.codes.shape)} but the {type(module).__name__} needs "
                f"(out, in) = {(out_features, in_features)}; for Conv1D quantize get_linear_weight(module), "
                "which is the transposed weight"
            )
        device = get_linear_weight(module).device
        layer = cls.empty_like(module, qweight.bits, qweight.group_size, device=device)
        layer.weight_dtype = qweight.dtype
        layer.qweight.copy_(pack_codes(qweight.codes.to(device), qweight.bits))
        layer.scales.copy_(qweight.scale.to(device=device, dtype=torch.float32))
        layer.qzeros.copy_(_zero_points_as_uint8(qweight.zero_point, qweight.bits).to(device))
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        return layer

    def codes(self) -> torch.Tensor:
        """Unpacked ``uint8`` codes, ``(out_features, in_features)``."""
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scales * (codes - qzeros)`` per group, ``(out, in)``, in ``dtype`` (default: the original weight dtype).

        Same operations in the same order as ``QuantizedWeight.dequantize`` (float32
        arithmetic, then one cast), so the two are bit-identical.
        """
        n_groups = self.scales.shape[1]
        # Broadcast each group's scale and zero point over its columns instead of
        # materialising (out, in) copies of them: same values, less memory traffic.
        codes = self.codes().float().view(self.out_features, n_groups, -1)
        weight = (codes - self.qzeros.float().unsqueeze(-1)) * self.scales.float().unsqueeze(-1)
        return weight.view(self.out_features, self.in_features).to(dtype or self.weight_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A fresh dequantized copy in the *source* layout (``Conv1D``: ``(in, out)``); read-only in effect.

        Model code reads ``layer.weight`` outside ``forward`` (GPT-2's ``_init_weights``
        re-initialises ``c_proj.weight`` while loading; others read ``.weight.dtype``).
        Writing into the returned tensor does not change the layer.
        """
        weight = self.dequantize()
        return weight.t() if self.transposed_source else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

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
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"{groups}, bias={self.bias is not None}"
        )


def replace_module(model: nn.Module, name: str, qweight: QuantizedWeight) -> COMQLinear:
    """Swap the layer ``name`` of ``model`` for a :class:`COMQLinear` built from ``qweight``.

    Returns the new layer.  The original weight is dropped (its memory is freed once
    the caller lets go of it), the bias object is kept.
    """
    parent, child_name = _parent_of(model, name)
    module = getattr(parent, child_name)
    if not is_linear_like(module):
        raise TypeError(f"{name!r} is a {type(module).__name__}, not an nn.Linear or Conv1D")
    layer = COMQLinear.from_quantized(module, qweight)
    setattr(parent, child_name, layer)
    return layer


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent, child_name = _parent_of(model, name)
    setattr(parent, child_name, new)


def _parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if not name:
        raise ValueError("cannot replace the root module; pass the dotted name of a submodule")
    parent_name, _, child_name = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError as error:
        raise KeyError(f"model has no submodule {parent_name!r} (while looking up {name!r})") from error
    if not hasattr(parent, child_name):
        raise KeyError(f"model has no submodule {name!r}")
    return parent, child_name


def _zero_points_as_uint8(zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points are stored as ``uint8`` codes: check they are integers in ``[0, 2**bits - 1]``.

    The loader applies the same rule, so a layer that passes here can always be reloaded.
    """
    values = zero_point.float()
    rounded = torch.round(values)
    max_code = (1 << bits) - 1
    if values.numel() and (not torch.equal(rounded, values) or float(rounded.min()) < 0 or float(rounded.max()) > max_code):
        raise ValueError(f"zero points must be integers in [0, {max_code}] for bits={bits}")
    return rounded.to(torch.uint8)
