"""Which layers of a model COMQ converts.

COMQ quantizes the linear layers inside the model's body (attention projections,
MLPs) and leaves the task head in full precision, as the COMQ paper and reference
code do.  ``modules_to_not_convert`` names more modules to keep: it extends the
head list, never replaces it.  transformers' own default skip list (``get_keys_to_not_convert``) is not
used: for image classifiers it yields ``classifier.bias`` -- a parameter, not a
module -- so the head would be quantized.

Matching rule for ``modules_to_not_convert`` entries: an entry is a dotted module
path whose components must appear as a *contiguous run of whole components* of the
module name; each component may use shell wildcards (``*``, ``?``).  So
``"classifier"`` skips ``classifier``, ``"lm_head"`` skips ``model.lm_head``,
``"layers.0"`` skips ``vit.layers.0.attention.q_proj`` but not ``vit.layers.10...``,
and ``"layers.*.mlp"`` skips every MLP.  Names are those of ``model.named_modules()``
(transformers 5 names, e.g. ``vit.layers.N.attention.q_proj`` for ViT).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from .nn.quant_linear import is_linear_like

# Module-name components that denote a task head or a projection head.
HEAD_NAMES = frozenset(
    {
        "classifier",
        "lm_head",
        "pooler",
        "score",
        "qa_outputs",
        "cls",
        "head",
        "heads",
        "pre_classifier",
        "seq_relationship",
        "projection",
        "visual_projection",
        "text_projection",
        "vision_projection",
    }
)
HEAD_SUFFIXES = ("_classifier", "_head")


def matches(name: str, pattern: str) -> bool:
    """True if ``pattern``'s components are a contiguous run of ``name``'s components."""
    parts = name.split(".") if name else []
    wanted = pattern.split(".")
    span = len(wanted)
    return any(
        all(fnmatchcase(part, want) for part, want in zip(parts[start : start + span], wanted))
        for start in range(len(parts) - span + 1)
    )


def is_excluded(name: str, modules_to_not_convert: list[str] | tuple[str, ...]) -> bool:
    """True if any entry of ``modules_to_not_convert`` matches the module ``name``."""
    return any(matches(name, pattern) for pattern in modules_to_not_convert)


def default_modules_to_not_convert(model: nn.Module) -> list[str]:
    """Names of the model's head modules, which stay in full precision by default.

    The list has: modules whose name has a head component (``classifier``,
    ``lm_head``, ``pooler``, ``*_head``, ``*_classifier``, projection heads), the
    output embedding layer, and linear layers whose weight is tied to another weight
    (quantizing one side would silently untie it).  Only heads that contain a linear
    layer are listed; non-linear modules need no entry:
    :func:`find_quantizable_linears` only ever returns ``nn.Linear`` / ``Conv1D``.
    """
    skipped: set[str] = set()
    for name, module in model.named_modules():
        if name and is_linear_like(module) and any(_is_head_component(part) for part in name.split(".")):
            skipped.add(_outermost_head(name))
    skipped.update(_output_embedding_names(model) | _tied_linear_names(model))
    # Drop entries already covered by a broader one (``cls.predictions.decoder`` under ``cls``).
    return sorted(name for name in skipped if not any(other != name and matches(name, other) for other in skipped))


def modules_kept_in_full_precision(
    model: nn.Module, modules_to_not_convert: list[str] | tuple[str, ...] | None = None
) -> list[str]:
    """The task head (:func:`default_modules_to_not_convert`) plus the user's ``modules_to_not_convert``.

    A user's list *extends* the defaults, as transformers' AWQ quantizer does
    (``add_default_skips``): naming one more module to keep must never quantize the
    head by accident.  Raises ``ValueError`` for entries that match no module of
    ``model`` (a typo would otherwise quantize what the user meant to keep).
    """
    extra = list(modules_to_not_convert or [])
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [entry for entry in extra if not any(matches(name, entry) for name in names)]
    if unmatched:
        tops = sorted({name.split(".")[0] for name in names})
        raise ValueError(
            f"modules_to_not_convert: {unmatched} match no module of {type(model).__name__}; an entry is a module "
            f"name or a run of its dotted parts, wildcards allowed (e.g. 'layers.0', 'layers.*.mlp'); "
            f"top-level modules: {tops}"
        )
    defaults = default_modules_to_not_convert(model)
    return defaults + [entry for entry in extra if entry not in defaults]


def find_quantizable_linears(
    model: nn.Module, modules_to_not_convert: list[str] | tuple[str, ...] | None = None
) -> dict[str, nn.Module]:
    """The ``nn.Linear`` / ``Conv1D`` layers COMQ converts, by module name, in model order:
    all but those under :func:`modules_kept_in_full_precision` (the task head and the
    user's ``modules_to_not_convert``)."""
    kept = modules_kept_in_full_precision(model, modules_to_not_convert)
    return {
        name: module
        for name, module in model.named_modules()
        if name and is_linear_like(module) and not is_excluded(name, kept)
    }


def _is_head_component(part: str) -> bool:
    return part in HEAD_NAMES or part.endswith(HEAD_SUFFIXES)


def _outermost_head(name: str) -> str:
    """``cls.predictions.transform.dense`` -> ``cls``: skip the whole head, not one layer of it."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if _is_head_component(part):
            return ".".join(parts[: index + 1])
    return name


def _output_embedding_names(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    if output is None:
        return set()
    return {name for name, module in model.named_modules() if module is output and name}


def _tied_linear_names(model: nn.Module) -> set[str]:
    """Linear layers whose weight tensor is shared with another module."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param_name == "weight":
                owners.setdefault(id(param), []).append(name)
    tied_keys = getattr(model, "all_tied_weights_keys", None) or {}
    declared = {key.removesuffix(".weight") for pair in tied_keys.items() for key in pair}
    linear_names = {name for name, module in model.named_modules() if is_linear_like(module)}
    shared = {name for names in owners.values() if len(names) > 1 for name in names}
    return (shared | declared) & linear_names
