"""Every place hf_comq relies on a transformers detail that is not public API.

Each of these can change in any transformers release; keeping them here, each with a
test in ``tests/test_compat.py`` that fails loudly when transformers changes it, makes an
upgrade a one-file review instead of a hunt.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and transformers are imported where used: hf_comq.tasks reads the auto mappings cheaply
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

LOADED_MARK = "_is_hf_initialized"


def was_loaded(tensor: torch.Tensor) -> bool:
    """Whether ``from_pretrained`` filled ``tensor`` from the checkpoint.

    transformers marks each tensor it loads with ``_is_hf_initialized``; an empty shell's
    buffer that the checkpoint did not provide stays unmarked (and uninitialised).
    """
    return bool(getattr(tensor, LOADED_MARK, False))


def saved_state_dict_names(model: nn.Module, state: dict[str, Any]) -> dict[str, str]:
    """Model key -> the key ``save_pretrained`` writes for it.

    transformers 5 renames some modules on load (e.g. ViT's ``encoder.layer.N`` ->
    ``layers.N``) and reverts the rename on save; ``revert_weight_conversion`` is that
    reversal.  It is internal API, so a failure degrades to the model's own names (the
    checks that use this then verify after loading instead).
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(model, dict(state))
    except Exception as error:  # internal API: degrade rather than fail the load
        logger.debug("could not compute saved tensor names: %s", error)
        return {}
    by_identity = {id(tensor): key for key, tensor in state.items()}
    return {by_identity[id(tensor)]: saved for saved, tensor in reverted.items() if id(tensor) in by_identity}


def auto_mapping(name: str) -> dict[str, Any]:
    """transformers' ``MODEL_FOR_*_MAPPING_NAMES`` table ``name``: model type -> class name(s).

    These tables are what the Auto classes dispatch on, but they live in
    ``transformers.models.auto.modeling_auto`` without being documented API.
    """
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, name)


def quantizer_registries() -> tuple[dict[str, type], dict[str, type]]:
    """transformers' registries ``quant_method -> config class`` and ``quant_method -> quantizer class``.

    ``register_quantization_config`` / ``register_quantizer`` are public but refuse a name
    that exists (a second registration, a module reload); :mod:`hf_comq.registration`
    reads the tables themselves to register idempotently.
    """
    from transformers.quantizers import auto

    return auto.AUTO_QUANTIZATION_CONFIG_MAPPING, auto.AUTO_QUANTIZER_MAPPING


def matches_module_pattern(name: str, pattern: str) -> bool:
    """transformers' rule for a ``modules_to_not_convert`` entry, so COMQ reads the list as every quantizer does.

    ``should_convert_module`` (in ``transformers.quantizers.quantizers_utils``, not public
    API) skips a module when the entry matches its name from the start up to a module
    boundary (``"vit.layers.1"``: ``vit.layers.1.mlp`` but not ``vit.layers.11``), does
    so as a regex (``"vit.layers.*.mlp"``), or is a suffix of it (``"q_proj"``).  An
    entry that is not a valid regex raises ``ValueError`` naming it.
    """
    import re

    from transformers.quantizers.quantizers_utils import should_convert_module

    try:
        return not should_convert_module(name, [pattern])
    except re.error as error:
        raise ValueError(
            f"modules_to_not_convert: {pattern!r} is not a valid regular expression ({error}); "
            "escape special characters or name the module plainly"
        ) from None
