"""Which layers of a model COMQ converts.

COMQ quantizes the linear layers inside the model's body (attention projections,
MLPs) and leaves the task head in full precision, as the COMQ paper and reference
code do.  ``modules_to_not_convert`` names more modules to keep: it extends the
head list, never replaces it.  transformers' own default skip list (``get_keys_to_not_convert``) is not
used: for image classifiers it yields ``classifier.bias`` -- a parameter, not a
module -- so the head would be quantized.

Matching rules.  The task head is kept by module name: a head entry keeps that module
and everything under it.  A ``modules_to_not_convert`` entry is read as transformers'
quantizers read it (:func:`hf_comq.compat.matches_module_pattern`): it matches a layer
name from the start up to a module boundary (``"vit.layers.0"`` keeps
``vit.layers.0.attention.q_proj`` but not ``vit.layers.10...``), as a regex matched the
same way (``"vit.layers.*.mlp"`` keeps every MLP), or as a suffix (``"q_proj"``).  Names
are those of ``model.named_modules()`` (transformers 5 names, e.g.
``vit.layers.N.attention.q_proj`` for ViT).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from .compat import matches_module_pattern
from .nn.experts import DEFAULT_PROJECTION_NAMES, UnfusedExperts, is_standard_batched_experts
from .nn.quant_linear import COMQLinear, is_linear_like

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
        "projector",
        "visual_projection",
        "text_projection",
        "vision_projection",
    }
)
HEAD_SUFFIXES = ("_classifier", "_head")
GATE_NAMES = frozenset({"shared_expert_gate"})
"""Linear layers that gate a mixture of experts' shared expert with one output per token (Qwen2-MoE):
kept in full precision, as llm-compressor's recipes keep them, because serving runtimes build them
as plain layers (vLLM's loader has no packed tensors for them) and their one output row is all
the routing there is."""


def matches(name: str, entry: str) -> bool:
    """Whether the ``modules_to_not_convert`` ``entry`` keeps the layer ``name`` (transformers' rule, see above)."""
    return matches_module_pattern(name, entry)


def is_under(name: str, module: str) -> bool:
    """Whether ``name`` is the module ``module`` or inside it: how a task head entry keeps its layers."""
    return name == module or name.startswith(module + ".")


def default_modules_to_not_convert(model: nn.Module) -> list[str]:
    """Names of the model's head modules, which stay in full precision by default.

    The list has: the modules a task class adds around its base model (XLNet's
    ``sequence_summary``, DETR's ``bbox_predictor``, an audio classifier's
    ``projector``), modules whose name has a head component (``classifier``, ``lm_head``,
    ``pooler``, ``*_head``, ``*_classifier``, projection heads) before any list index
    (inside a list of blocks, Funnel's ``q_head`` is a layer of the body), the output
    embedding layer, linear layers whose weight is tied to another weight
    (quantizing one side would silently untie it), and the gates of shared experts
    (:data:`GATE_NAMES`).  Only heads that contain a linear
    layer are listed; non-linear modules need no entry:
    :func:`find_quantizable_linears` only ever returns ``nn.Linear`` / ``Conv1D``.
    """
    skipped: set[str] = set()
    for name, module in model.named_modules():
        if not name or not is_linear_like(module):
            continue
        if any(_is_head_component(part) for part in _outside_block_lists(name)):
            skipped.add(_outermost_head(name))
        elif name.rsplit(".", 1)[-1] in GATE_NAMES:
            skipped.add(name)
    skipped.update(_around_the_base_model(model) | _output_embedding_names(model) | _tied_linear_names(model))
    # Drop entries already covered by a broader one (``cls.predictions.decoder`` under ``cls``).
    return sorted(name for name in skipped if not any(other != name and is_under(name, other) for other in skipped))


def modules_kept_in_full_precision(
    model: nn.Module, modules_to_not_convert: list[str] | tuple[str, ...] | None = None
) -> list[str]:
    """The task head (:func:`default_modules_to_not_convert`) plus the user's ``modules_to_not_convert``.

    A user's list *extends* the defaults, as transformers' AWQ quantizer does
    (``add_default_skips``): naming one more module to keep must never quantize the
    head by accident.  Raises ``ValueError`` for entries that keep no linear layer of
    ``model`` (a typo would otherwise quantize what the user meant to keep).
    """
    extra = _checked_entries(model, modules_to_not_convert)
    defaults = default_modules_to_not_convert(model)
    return defaults + [entry for entry in extra if entry not in defaults]


def _checked_entries(model: nn.Module, modules_to_not_convert: list[str] | tuple[str, ...] | None) -> list[str]:
    extra = list(modules_to_not_convert or [])
    if not extra:
        return extra
    linears = [name for name, module in model.named_modules() if name and is_linear_like(module)]
    batched = _standard_batched_experts(model)
    if batched:  # batched experts' layers are layers too, named as they will be
        names = expert_projection_names(model)
        linears += [layer for experts in batched for layer in _expert_names_to_match(experts, model, names)]
    unmatched = [entry for entry in extra if not any(matches(name, entry) for name in linears)]
    if unmatched:
        tops = sorted({name.split(".")[0] for name, _ in model.named_modules() if name})
        raise ValueError(
            f"modules_to_not_convert: {unmatched} match no module among the linear layers of {type(model).__name__}; "
            "an entry is read as transformers' quantizers read it: the start of a layer name up to a dot "
            f"('vit.layers.0'), a regex matched the same way ('vit.layers.*.mlp'), or a suffix ('q_proj'); "
            f"top-level modules: {tops}"
        )
    return extra


def find_quantizable_linears(
    model: nn.Module, modules_to_not_convert: list[str] | tuple[str, ...] | None = None
) -> dict[str, nn.Module]:
    """The ``nn.Linear`` / ``Conv1D`` layers COMQ converts, by module name, in model order:
    all but those in the task head and those the user's ``modules_to_not_convert`` keeps.
    Calibration also keeps subclasses whose forward is not their linear map
    (:func:`~hf_comq.nn.computes_linear_map`): that takes running them."""
    entries = _checked_entries(model, modules_to_not_convert)
    heads = default_modules_to_not_convert(model)
    return {
        name: module
        for name, module in model.named_modules()
        if name
        and is_linear_like(module)
        and not any(is_under(name, head) for head in heads)
        and not any(matches(name, entry) for entry in entries)
    }


def batched_expert_weights(model: nn.Module) -> dict[str, int]:
    """``{name: elements}`` of the mixture-of-experts weights stored as batched 3-D tensors.

    transformers 5 keeps a MoE layer's experts as one ``(num_experts, out, in)`` parameter
    per projection (``experts.gate_up_proj``, ``experts.down_proj``), not as ``nn.Linear``
    layers.  Those :func:`unfuse_batched_experts` did not replace stay in full precision;
    in a MoE model they hold most of the parameters, which the user must be told.  Found
    by transformers' convention: a module with an integer ``num_experts`` whose 3-D
    parameters lead with that many experts.
    """
    found = {}
    for module_name, module in model.named_modules():
        experts = getattr(module, "num_experts", None)
        if not isinstance(experts, int) or isinstance(experts, bool):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() == 3 and param.shape[0] == experts:
                found[f"{module_name}.{name}" if module_name else name] = param.numel()
    return found


BATCHED_EXPERT_TENSORS = ("experts.gate_up_proj", "experts.down_proj")
"""The batched tensors transformers 5 merges a MoE layer's per-expert checkpoint weights into."""


def merges_batched_experts(transform: object) -> bool:
    """Whether one of transformers' weight conversions merges per-expert weights (``experts.*.<layer>.weight``)
    into a batched experts tensor (:data:`BATCHED_EXPERT_TENSORS`)."""
    targets = list(getattr(transform, "target_patterns", None) or ())
    sources = list(getattr(transform, "source_patterns", None) or ())
    return bool(targets) and targets[0].endswith(BATCHED_EXPERT_TENSORS) and any("*" in source for source in sources)


def expert_projection_names(model: nn.Module) -> tuple[str, str, str]:
    """The checkpoint's names of an expert's gate, up and down layers (``gate_proj``... or Mixtral's ``w1``...).

    Read from the per-expert merges in transformers' weight conversion mapping of the
    model, which is what turns those checkpoint names into the batched tensors.  Named
    so, quantized experts are saved under the names plain transformers and vLLM read.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping

    gate_up = down = None
    try:
        transforms = get_model_conversion_mapping(model, add_legacy=False)
    except Exception:  # a model transformers has no mapping machinery for: the usual names
        transforms = []
    for transform in filter(merges_batched_experts, transforms):
        sources, target = list(transform.source_patterns), transform.target_patterns[0]
        leaves = [source.rsplit(".", 2)[-2] for source in sources if source.endswith(".weight")]
        if len(leaves) != len(sources):
            continue
        if target.endswith(BATCHED_EXPERT_TENSORS[0]) and len(leaves) == 2:
            gate_up = leaves
        elif target.endswith(BATCHED_EXPERT_TENSORS[1]) and len(leaves) == 1:
            down = leaves[0]
    if gate_up is None or down is None:
        return DEFAULT_PROJECTION_NAMES
    return gate_up[0], gate_up[1], down


def unfuse_batched_experts(
    model: nn.Module,
    modules_to_not_convert: list[str] | tuple[str, ...] | None = None,
    *,
    empty: bool = False,
    install: Callable[[nn.Module, str, Callable[[nn.Module], nn.Module]], None] | None = None,
) -> list[str]:
    """Replace every batched experts module COMQ can quantize by :class:`~hf_comq.nn.UnfusedExperts`.

    Returns the names of the modules replaced.  All of the model's experts or none:
    a checkpoint whose experts are packed in some layers and batched dense in others
    loads in no runtime (transformers' merges and compressed-tensors' loader treat
    all experts of a model alike).  So none are replaced when a ``modules_to_not_convert``
    entry keeps some.  ``empty``: per-expert layers on ``meta`` to load a checkpoint
    into, rather than copies of the loaded weights.  ``install(model, name, build)``
    puts ``build(module)`` in place of the module ``name``; the default replaces it
    and refuses (replaces nothing) when some experts' weights are not in memory
    (accelerate's offload: calibration installs those through its placement, see
    :func:`hf_comq.calibration.placement.install_unfused_experts`).
    """
    names = expert_projection_names(model)
    entries = list(modules_to_not_convert or [])
    found = _standard_batched_experts(model)
    kept = [
        module_name
        for module_name in found
        if any(matches(layer, entry) for layer in _expert_names_to_match(module_name, model, names) for entry in entries)
    ]
    offloaded = install is None and not empty and any(module.down_proj.is_meta for module in found.values())
    if kept or offloaded:
        return []
    build = UnfusedExperts.empty_like if empty else UnfusedExperts.from_batched
    replaced = list(found)
    del found  # each batched module must go as soon as it is replaced: peak memory is one layer's experts twice
    for module_name in replaced:
        if install is None:
            model.set_submodule(module_name, build(model.get_submodule(module_name), names))
        else:
            install(model, module_name, lambda module: build(module, names))
    return replaced


def expert_layers(model: nn.Module) -> dict[str, UnfusedExperts]:
    """``{layer name: its experts module}`` for the linear layers (or their packed replacements) inside
    :class:`~hf_comq.nn.UnfusedExperts`: each sees only the tokens routed to its expert."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, UnfusedExperts):
            for child, layer in module.named_modules():
                if is_linear_like(layer) or isinstance(layer, COMQLinear):
                    found[f"{name}.{child}"] = module
    return found


def _standard_batched_experts(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if name and is_standard_batched_experts(module)}


def _expert_names_to_match(module_name: str, model: nn.Module, names: tuple[str, str, str]) -> list[str]:
    """What ``modules_to_not_convert`` entries are matched against for a batched experts module: its own
    name (as transformers reads an entry for the model as loaded, ``"experts"`` is a suffix of it) and the
    per-expert layer names it becomes."""
    experts = model.get_submodule(module_name).num_experts
    return [module_name] + [f"{module_name}.{index}.{name}" for index in range(experts) for name in names]


def modules_with_weight_buffers(model: nn.Module) -> list[str]:
    """Modules holding a buffer (not a parameter) named ``weight``, e.g. DETR's frozen batch norms:
    plain transformers' compressed-tensors loader fails on them (:func:`hf_comq.checkpoint.runtime_support`)."""
    return [name for name, module in model.named_modules() if "weight" in module._buffers]


def expert_parameter_share(model: nn.Module, experts: Mapping[str, int] | None = None) -> float:
    """The share of ``model``'s weights in batched expert tensors, 0 without any.

    ``experts``: :func:`batched_expert_weights` of ``model`` when the caller has it already.
    Packed layers count with the weights they stand for: their codes are buffers, and counted
    as parameters only the float ones left, the share grew with every layer quantized.
    """
    elements = sum((batched_expert_weights(model) if experts is None else experts).values())
    return elements / max(weight_count(model), 1) if elements else 0.0


def weight_count(model: nn.Module) -> int:
    """``model``'s parameters, a packed layer's weight counted as the float one it replaced."""
    packed = sum(module.in_features * module.out_features for module in model.modules() if isinstance(module, COMQLinear))
    return packed + sum(param.numel() for param in model.parameters())


def _outside_block_lists(name: str) -> list[str]:
    """The components of ``name`` before its first list index: where a head can be named."""
    parts = name.split(".")
    index = next((position for position, part in enumerate(parts) if part.isdigit()), len(parts))
    return parts[:index]


def _around_the_base_model(model: nn.Module) -> set[str]:
    """The top-level modules of a task model besides its base model (``model.base_model``) that
    hold a linear layer: the task head, whatever its name."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module) or base is model:
        return set()
    return {
        name
        for name, child in model.named_children()
        if name != prefix and any(is_linear_like(module) for module in child.modules())
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
