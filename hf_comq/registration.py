"""Register ``"comq"`` with transformers' quantizer registry, idempotently.

transformers has no entry-point discovery: ``from_pretrained`` only knows COMQ once
``hf_comq`` is imported.  Its ``register_*`` decorators raise when the name exists,
which a second ``register()`` call or an ``importlib.reload`` would trigger, so
registration goes through :func:`_register_once`.
"""

from __future__ import annotations

from typing import Callable

from transformers.quantizers import register_quantization_config, register_quantizer

from .compat import quantizer_registries
from .config import QUANT_METHOD, COMQConfig
from .quantizer import COMQHfQuantizer


def register() -> None:
    """Make ``quant_method="comq"`` resolve to :class:`COMQConfig` / :class:`COMQHfQuantizer`.

    Safe to call any number of times.  After a module reload the registry is pointed
    at the current class objects, so ``isinstance`` checks keep agreeing with what
    ``hf_comq`` exports.  Raises ``RuntimeError`` if another package registered
    ``"comq"``: silently using someone else's loader would be worse than failing.
    """
    configs, quantizers = quantizer_registries()
    _register_once(configs, register_quantization_config, COMQConfig)
    _register_once(quantizers, register_quantizer, COMQHfQuantizer)


def is_registered() -> bool:
    """True when both the config and the quantizer for ``"comq"`` are ours."""
    return all(_is_ours(registry.get(QUANT_METHOD)) for registry in quantizer_registries())


def _register_once(mapping: dict, decorator: Callable[[str], Callable[[type], type]], cls: type) -> None:
    existing = mapping.get(QUANT_METHOD)
    if existing is cls:
        return
    if existing is None:
        decorator(QUANT_METHOD)(cls)
    elif _is_ours(existing):
        mapping[QUANT_METHOD] = cls  # a reloaded hf_comq module: point at the new class object
    else:
        raise RuntimeError(
            f"quant method {QUANT_METHOD!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
            "hf_comq cannot register its own. Uninstall or avoid importing the other package."
        )


def _is_ours(cls: type | None) -> bool:
    return cls is not None and cls.__module__.split(".")[0] == "hf_comq"
