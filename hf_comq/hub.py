"""Model cards and Hub publishing of COMQ-quantized models.

Every COMQ model written by ``save_pretrained`` or uploaded by ``push_to_hub`` gets a
model card: what was quantized and how (bits, grid, solver settings, calibration data),
who can load the checkpoint (:func:`hf_comq.checkpoint.runtime_support`), and optional
evaluation results.  The card is built with huggingface_hub's own card utilities
(:class:`~huggingface_hub.ModelCard`, :class:`~huggingface_hub.ModelCardData`,
:class:`~huggingface_hub.EvalResult`) from the one Jinja template in the repository's
``model_cards/`` folder (shipped as the package ``hf_comq.model_cards``).

Saving integration: :func:`attach_model_card_hook` is called by the quantizer on every
COMQ model once its weights are in place.  It gives the model instance its own
``save_pretrained`` and ``push_to_hub`` (public methods; plain callable objects, so a
``copy.deepcopy`` rebinds them to the copy and ``pickle`` / ``torch.save`` keep working):

* ``save_pretrained`` writes README.md after the regular save, where the folder has no
  README or an unedited card of an earlier save (:func:`is_unedited_card`); with
  ``push_to_hub=True`` it then publishes the folder like ``push_to_hub``;
* ``push_to_hub`` saves into a temporary folder (card included) and publishes it with
  :func:`push_folder`: ``create_repo(exist_ok=True)`` plus one ``upload_folder`` commit.
  A README that already exists on the Hub is the owner's and is kept, with the COMQ tags
  added, unless it is an unedited card of an earlier push, which the new card replaces.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Mapping

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, metadata_load
from huggingface_hub.utils import validate_repo_id
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from . import DISTRIBUTION
from .checkpoint import DOES_NOT_LOAD, plain_loading_requirements, runtime_support, zero_points_plain_loading_fails_on
from .modules import expert_layers, expert_parameter_share, modules_with_weight_buffers
from .nn import PACKED_TENSORS, COMQLinear
from .solver.options import (
    aims_at_full_precision_by_default,
    default_damp,
    refits_by_default,
    solves_in_stages_by_default,
    start_only_method,
    unused_settings,
)
from .tasks import infer_pipeline_tag, is_text_pipeline

__all__ = [
    "ModelCardSettings",
    "attach_model_card_hook",
    "card_tags",
    "is_unedited_card",
    "load_template",
    "mark_card",
    "owned_repo_id",
    "project_url",
    "push_folder",
    "render_model_card",
    "resolve_repo_id",
    "write_model_card",
]

logger = logging.getLogger(__name__)

README_NAME = "README.md"
CARD_TAGS = ("comq", "compressed-tensors", "quantized")  # first in every card's tags, before its bit width
TEMPLATE_NAME = "comq_model_card.md"
_CARD_ATTR = "_comq_model_card"
_MODEL_ID_PLACEHOLDER = "<repo-id-or-folder-of-this-model>"
_MAX_LISTED_MODULES = 12
_HOME_PAGE_LABELS = ("homepage", "home", "repository", "source", "source code")  # Project-URL labels, lower case

# Settings shown in the card, in this order, with a human label.
_SETTINGS: tuple[tuple[str, str], ...] = (
    ("bits", "Weight bits"),
    ("group_size", "Group size"),
    ("symmetric", "Symmetric grid"),
    ("order", "Column order"),
    ("init", "Initialisation"),
    ("iterations", "Coordinate-descent sweeps (max.)"),
    ("scale_refit", "Scale refit"),
    ("scale_search", "Scale search"),
    ("shrink", "Range shrink factor"),
    ("damp", "Damping of the error-feedback start"),
    ("clip_weights", "Clipping search weights"),
    ("start_grids", "Start grids tried per row"),
    ("block_resolve", "Column-block re-solve"),
    ("pair_moves", "Pair-move candidates per row"),
    ("ridge", "Ridge term (fraction of mean diag H)"),
    ("sequential", "Block-sequential calibration"),
    ("fp_target", "Layers aimed at the full-precision outputs"),
    ("true_sequential", "Block layers solved stage by stage"),
)
_DATASET_KEYS: tuple[tuple[str, str], ...] = (
    ("dataset", "Dataset"),
    ("dataset_split", "Split"),
    ("dataset_column", "Column"),
)
_CALIBRATION_KEYS: tuple[tuple[str, str], ...] = (
    ("calibration_samples", "Samples used"),
    ("num_samples", "Requested samples (`num_samples`)"),
    ("batch_size", "Batch size"),
    ("max_length", "Max. sequence length (text inputs)"),
    ("seed", "Sampling seed"),
)



@dataclass
class ModelCardSettings:
    """What the card needs besides the quantization config, kept on the model between save calls.

    ``metrics`` is a comparison table for the card body, ``{"top-1": 0.80}`` or
    ``{"top-1": {"fp32": 0.81, "comq w4": 0.80}}``; ``eval_results`` are this model's own
    results as huggingface_hub ``EvalResult`` objects, written to the card's model-index.
    """

    base_model: str | None = None
    metrics: Mapping[str, Any] | None = None
    eval_results: list[EvalResult] = field(default_factory=list)
    pipeline_tag: str | None = None


# ---------------------------------------------------------------------------------------------- rendering
def load_template() -> str:
    """The Jinja template of ``model_cards/``, shipped inside the package as ``hf_comq.model_cards``."""
    return resources.files("hf_comq.model_cards").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")


def project_url() -> str | None:
    """hf_comq's home page as the installed distribution declares it, ``None`` where it declares none.

    The card links the name to it; without one (a source checkout that is not
    installed, or metadata without a URL) the card names hf_comq without a link rather
    than pointing readers at a made-up address.
    """
    try:
        declared = metadata.metadata(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    labelled = (entry.partition(",") for entry in declared.get_all("Project-URL") or [])
    candidates = [url.strip() for label, _, url in labelled if label.strip().lower() in _HOME_PAGE_LABELS]
    candidates.append((declared.get("Home-page") or "").strip())  # the older single field, after the labelled ones
    return next((url for url in candidates if url.startswith(("https://", "http://"))), None)


def card_tags(bits: int, extra: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The card's tags: ``comq``, ``compressed-tensors``, ``quantized``, ``{bits}-bit``, then ``extra`` once each."""
    tags = [*CARD_TAGS, f"{bits}-bit"]
    for tag in extra or ():
        if isinstance(tag, str) and tag and tag not in tags:
            tags.append(tag)
    return tags


def _is_hub_repo_id(name: str) -> bool:
    """True for names that can go into ``base_model`` metadata: Hub ids, not paths on this machine.

    The Hub rejects (and links nowhere for) local paths, and a path would leak the publisher's file layout.
    """
    from huggingface_hub.utils import HFValidationError

    if os.path.isdir(name) or os.path.isabs(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def cached_snapshot_repo_id(folder: str | os.PathLike[str]) -> str | None:
    """The Hub id of a model folder that is a snapshot in the Hub's download cache
    (``.../models--org--name/snapshots/<commit>``, what ``snapshot_download`` returns), else ``None``:
    such a folder is that Hub model, not a local checkpoint named after its commit hash."""
    parts = Path(os.path.abspath(folder)).parts
    if len(parts) < 3 or parts[-2] != "snapshots" or not parts[-3].startswith("models--"):
        return None
    repo_id = parts[-3].removeprefix("models--").replace("--", "/")
    return repo_id if _is_hub_repo_id(repo_id) else None


def _cell(value: Any) -> str:
    """Format a value for a Markdown table cell."""
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):  # a small value (a KL divergence) in significant digits, not rounded to 0
        text = str(round(value, 4)) if value == 0 or abs(value) >= 1e-3 else f"{value:.3g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(f"`{item}`" for item in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _bit_width_default(value: Any, bits: int) -> str:
    """A setting left to its bit width's default, shown as the value that default gave there."""
    return f"{_cell(value)} (the default at {bits} bits)"


def _setting_value(key: str, config: Any) -> str:
    value = getattr(config, key, None)
    if key == "group_size" and value is None:
        return "none (one scale per output channel)"
    if key == "damp" and value is None:
        return _bit_width_default(default_damp(config.bits), config.bits)
    if key == "scale_refit" and value is None:
        return _bit_width_default(refits_by_default(config.bits), config.bits)
    if key == "fp_target" and value is None:
        sequential = getattr(config, "sequential", True)
        aimed = aims_at_full_precision_by_default(config.bits, sequential)
        if not sequential:  # the bit width did not decide: full-precision inputs leave nothing to aim at
            return "no (full-precision inputs: `sequential=False`)"
        return _bit_width_default(aimed, config.bits)
    if key == "true_sequential" and value is None:
        fp_target, sequential = getattr(config, "fp_target", None), getattr(config, "sequential", True)
        staged = solves_in_stages_by_default(fp_target, config.bits, sequential)
        return f"{_cell(staged)} (the default {'where' if staged else 'where no'} layers are aimed at the full-precision outputs)"
    if key == "pair_moves" and value == 0:
        return "off"
    if value is None:
        return "default"
    if isinstance(value, str):  # solver option names, e.g. `act_order`
        return f"`{_cell(value)}`"
    return _cell(value)


def _settings_rows(config: Any, expert_share: float = 0.0, quantized_experts: bool = False) -> list[tuple[str, str]]:
    unused = unused_settings({name: getattr(config, name) for name in ("init", "iterations", "scale_search", "clip_weights")})
    rows = [
        (label, f"not used ({unused[key]})" if key in unused else _setting_value(key, config)) for key, label in _SETTINGS
    ]
    kept = list(config.ignore or [])
    if kept:
        listed = ", ".join(f"`{name}`" for name in kept[:_MAX_LISTED_MODULES])
        if len(kept) > _MAX_LISTED_MODULES:
            listed += f" and {len(kept) - _MAX_LISTED_MODULES} more"
        rows.append(("Linear layers kept in full precision", listed))
    if expert_share > 0:
        rows.append(("Mixture-of-experts weights", f"kept in full precision ({expert_share:.0%} of the parameters)"))
    elif quantized_experts:
        seen = "every calibration token" if config.calibrate_all_experts else "the tokens routed to it"
        rounded = config.expert_layers_rounded
        unreached = f"; {rounded} expert layers no calibration token reached were rounded to nearest" if rounded else ""
        rows.append(("Mixture-of-experts weights", f"quantized, each expert's layers on {seen}{unreached}"))
    return rows


def _calibration_rows(config: Any, pipeline_tag: str | None) -> list[tuple[str, str]]:
    """The calibration data; text-only options are left out for image and audio models."""
    recorded = config.calibration_description
    if recorded is not None:  # names the source, split, column and samples used: rows of those would repeat it
        rows = [("Data", _cell(recorded))]
        keys = tuple(entry for entry in _CALIBRATION_KEYS if entry[0] != "calibration_samples")
    elif isinstance(config.dataset, str):
        rows, keys = [], _DATASET_KEYS + _CALIBRATION_KEYS
    else:
        description = config.describe_calibration()
        rows, keys = [("Data", _cell(description) if description else "not recorded")], _CALIBRATION_KEYS
    non_text = not is_text_pipeline(pipeline_tag)
    for key, label in keys:
        value = config.serialized(key)
        if (key == "max_length" and non_text) or not isinstance(value, (str, int, float)):
            continue
        rows.append((label, _cell(value)))
    return rows


def _comparison_table(metrics: Mapping[str, Any] | None) -> list[list[str]]:
    """Rows of the evaluation table (header first): one row per metric, one column per model when values are dicts."""
    if not metrics:
        return []
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a dict of metric name -> value (or -> dict of values), got {metrics!r}")
    nested = [name for name, value in metrics.items() if isinstance(value, Mapping)]
    if nested and len(nested) != len(metrics):
        raise ValueError(
            "metrics must either map every metric name to a value, or every name to a dict of values "
            f"(e.g. {{'top-1': {{'fp32': 0.81, 'comq': 0.80}}}}); mixed entries: {sorted(map(str, metrics))}"
        )
    if not nested:
        return [["Metric", "Value"]] + [[_cell(name), _cell(value)] for name, value in metrics.items()]
    columns: list[str] = []
    for value in metrics.values():
        columns += [str(column) for column in value if str(column) not in columns]
    rows = [["Metric"] + [_cell(column) for column in columns]]
    for name, value in metrics.items():
        by_column = {str(column): cell for column, cell in value.items()}
        rows.append([_cell(name)] + [_cell(by_column[column]) if column in by_column else "—" for column in columns])
    return rows


def render_model_card(
    config: Any,
    base_model: str | None,
    metrics: Mapping[str, Any] | None = None,
    pipeline_tag: str | None = None,
    *,
    model_class: str = "AutoModel",
    model_id: str | None = None,
    revision: str | None = None,
    tags: list[str] | tuple[str, ...] | None = None,
    eval_results: list[EvalResult] | None = None,
    expert_share: float = 0.0,
    quantized_experts: bool = False,
    weight_buffers: bool = False,
    narrow_zero_points: list[str] | None = None,
    packed_share: float | None = None,
) -> ModelCard:
    """The COMQ model card for a quantized model's ``COMQConfig``.

    Args:
        config: the model's :class:`hf_comq.COMQConfig` (after quantization or loading).
        base_model: the checkpoint that was quantized, overriding what the config recorded.  A Hub id goes into
            the ``base_model`` metadata (which links the two repositories on the Hub); a local path is only named
            by its folder.
        metrics: optional comparison table (see :class:`ModelCardSettings`).
        pipeline_tag: the Hub task, when known (see :func:`infer_pipeline_tag`).
        model_class: the transformers class shown in the usage snippet.
        model_id: the repository id (or folder) shown in the usage snippet; a placeholder when unknown.
        revision: the branch the card is pushed to; the snippets name it unless it is the default one
            (a pull request's ``refs/pr/N`` is merged into it, so it is not named either).
        tags: tags added after the COMQ ones.
        eval_results: this model's results for the card's model-index.
        expert_share: the share of the parameters in batched mixture-of-experts tensors, which
            stay in full precision (:func:`hf_comq.modules.batched_expert_weights`).
        quantized_experts: whether the model's experts were quantized (one packed layer per
            expert projection, :class:`hf_comq.nn.UnfusedExperts`).
        weight_buffers: whether the model holds buffers named ``weight`` (see
            :func:`hf_comq.checkpoint.runtime_support`).
        narrow_zero_points: packed layers whose zero points plain transformers cannot unpack
            (:func:`hf_comq.checkpoint.zero_points_plain_loading_fails_on`).
        packed_share: the packed layers' bytes (codes, scales, zero points) as a share of their
            fp32 weights' (:func:`packed_weight_share`); ``None``: estimated from the config.
    """
    if base_model is None:  # what quantization recorded: a Hub id, or a local folder's name
        hub_base, folder = config.base_model, config.base_model_folder
    else:
        hub_base = base_model if _is_hub_repo_id(base_model) else None
        folder = None if hub_base else Path(base_model.rstrip("/\\")).name or "model"
    if hub_base:
        base_model_md = f"[`{hub_base}`](https://huggingface.co/{hub_base})"
        name = hub_base.split("/")[-1]
    elif folder:
        name = folder
        base_model_md = f"a local checkpoint (`{name}`)"
    else:
        name = model_class
        base_model_md = "its base model"
    runtimes = runtime_support(
        config.packed_scheme(), model_class, batched_experts=expert_share > 0, quantized_experts=quantized_experts,
        weight_buffers=weight_buffers, narrow_zero_points=narrow_zero_points,
    )  # fmt: skip
    baseline = start_only_method(config.init, config.iterations)
    title = f"{name} — {baseline[0] if baseline else 'COMQ'} {config.bits}-bit"
    card_data = ModelCardData(
        library_name="transformers",
        base_model=hub_base,
        **({"base_model_relation": "quantized"} if hub_base else {}),  # the Hub's model tree: a quantization, not a fine-tune
        pipeline_tag=pipeline_tag,
        tags=card_tags(config.bits, tags),
        model_name=title if eval_results else None,
        eval_results=list(eval_results) if eval_results else None,
    )
    return ModelCard.from_template(
        card_data,
        template_str=load_template(),
        title=title,
        bits=config.bits,
        packed_percent=f"{100 * (packed_share or _estimated_packed_share(config)):.1f}",
        grid_tensors="scales" if config.symmetric else "scales and zero points",  # a symmetric grid stores no zero point
        baseline=baseline[1] if baseline else None,
        base_model_md=base_model_md,
        model_class=model_class,
        model_id=model_id or _MODEL_ID_PLACEHOLDER,
        load_revision=f', revision="{revision}"' if _names_a_branch(revision) else "",
        is_causal_lm=model_class.endswith("ForCausalLM"),
        runtimes=runtimes,
        plain_transformers_loads=not runtimes[0][1].startswith(DOES_NOT_LOAD),
        plain_requirements=plain_loading_requirements(config.packed_scheme()),
        settings=_settings_rows(config, expert_share, quantized_experts),
        calibration=_calibration_rows(config, pipeline_tag),
        metrics=_comparison_table(metrics),
        hf_comq_version=config.provenance()["hf_comq_version"],
        hf_comq_url=project_url(),
    )


def _estimated_packed_share(config: Any) -> float:
    """:func:`packed_weight_share` from the settings alone: the codes, plus per group a float32
    scale and (asymmetric) an int8 zero point; per channel those are a few bytes per row."""
    group_size = config.group_size
    overhead = 0.0 if group_size is None else (4 + (0 if config.symmetric else 1)) / group_size
    return (config.bits / 8 + overhead) / 4


def packed_weight_share(model: Any) -> float | None:
    """The bytes of the model's packed layers (codes, scales and zero points) as a share of their
    weights in float32: what the card says packing saves, scales included (at small groups they
    are a large part of it).  ``None`` without packed layers."""
    packed = dense = 0
    for module in model.modules():
        if isinstance(module, COMQLinear):
            packed += sum(
                buffer.numel() * buffer.element_size()
                for name, buffer in module.named_buffers(recurse=False)
                if name in PACKED_TENSORS
            )
            dense += 4 * module.in_features * module.out_features
    return packed / dense if dense else None


# ---------------------------------------------------------------------------------------------- model helpers
def _comq_config(model: Any) -> Any:
    from .config import COMQConfig

    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        raise ValueError("The model has no quantization_config: only COMQ-quantized models get a COMQ model card")
    if not isinstance(config, COMQConfig):
        raise ValueError(f"The model is quantized with {type(config).__name__}, not hf_comq's COMQConfig")
    return config


def _card_settings(model: Any) -> ModelCardSettings:
    settings = getattr(model, _CARD_ATTR, None)
    if isinstance(settings, ModelCardSettings):
        return settings
    return ModelCardSettings(pipeline_tag=infer_pipeline_tag(model))


def _model_class_name(model: Any) -> str:
    """The class for the usage snippet: the concrete transformers class, or AutoModel for custom classes."""
    cls = type(model)
    return cls.__name__ if cls.__module__.startswith("transformers.") else "AutoModel"


def _names_a_branch(revision: str | None) -> bool:
    """Whether ``revision`` is a branch other than the default one, which a loader must be told."""
    return bool(revision) and revision != "main" and not revision.startswith("refs/pr")


def _card_for_model(
    model: Any, model_id: str | None = None, tags: list[str] | None = None, revision: str | None = None
) -> ModelCard:
    settings = _card_settings(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return render_model_card(
        _comq_config(model),
        settings.base_model,
        settings.metrics,
        settings.pipeline_tag,
        model_class=_model_class_name(model),
        model_id=model_id,
        revision=revision,
        tags=([model_type] if model_type else []) + list(tags or []),
        eval_results=settings.eval_results,
        expert_share=expert_parameter_share(model),
        quantized_experts=bool(expert_layers(model)),
        weight_buffers=bool(modules_with_weight_buffers(model)),
        narrow_zero_points=_narrow_zero_points(model),
        packed_share=packed_weight_share(model),
    )


def _narrow_zero_points(model: Any) -> list[str]:
    """The packed layers whose zero points plain transformers cannot unpack (:func:`zero_points_plain_loading_fails_on`)."""
    shapes = {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, COMQLinear) and not module.transposed_source
    }
    return zero_points_plain_loading_fails_on(_comq_config(model).packed_scheme(), shapes)


def write_model_card(
    save_directory: str | os.PathLike[str], model: Any, *, model_id: str | None = None, revision: str | None = None
) -> Path | None:
    """Write README.md for a COMQ model into ``save_directory``, unless the folder has a README
    that is not an unedited hf_comq card, or another tool made the checkpoint (loaded with
    ``load_quantized``; a COMQ card would claim its settings).

    A card hf_comq wrote carries a digest of its text (:func:`is_unedited_card`): saving
    again into the same folder replaces it, since it describes the earlier save (another
    bit width, other data).  Any other README is the user's, or a card they edited, and is
    kept; an edited card is named in a warning, as its settings may no longer be the model's.

    Returns:
        The path written, or ``None`` when a README was kept.
    """
    if _comq_config(model).other_producer:
        logger.info("no COMQ model card for %s: another tool made its checkpoint", type(model).__name__)
        return None
    path = Path(save_directory) / README_NAME
    if path.exists() and not _holds_unedited_card(path):
        _say_kept(path)
        return None
    text = mark_card(str(_card_for_model(model, model_id=model_id, revision=revision)))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Whole or not at all (a reader never sees half a card), and with the permissions the user's
    # umask gives, as save_pretrained's other files (a temporary file module's would be private).
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


_CARD_MARK = "<!-- hf_comq model card {digest}: saving the model here again rewrites this card unless it is edited -->"
_CARD_MARK_PATTERN = re.compile(r"^<!-- hf_comq model card ([0-9a-f]{16}): .*-->\s*$", re.MULTILINE)


def _card_digest(body: str) -> str:
    return hashlib.sha256(body.strip().encode("utf-8")).hexdigest()[:16]


def _card_parts(text: str) -> tuple[str, str]:
    """The card's YAML metadata and the text after it."""
    if text.startswith("---"):
        end = text.find("\n---", 3)
        if end >= 0:
            return text[3:end], text[end + 4 :]
    return "", text


def _digested(metadata: str, body: str) -> str:
    """What a card's digest covers: its body and its metadata but the ``tags``, which a push extends
    (parsed, so that a rewrite of the same metadata in another YAML layout is no edit)."""
    try:
        fields = yaml.safe_load(metadata) or {}
    except yaml.YAMLError:
        fields = {"unparsed": metadata}
    if isinstance(fields, dict):
        fields.pop("tags", None)
    return json.dumps(fields, sort_keys=True, default=str) + "\n" + body.strip()


def mark_card(text: str) -> str:
    """``text`` with the last line that tells a later save it may replace the card: a digest of its body
    and metadata."""
    metadata, body = _card_parts(text)
    return text.rstrip("\n") + "\n\n" + _CARD_MARK.format(digest=_card_digest(_digested(metadata, body))) + "\n"


def is_unedited_card(text: str) -> bool:
    """Whether ``text`` is a card hf_comq wrote (:func:`mark_card`) that nobody has changed since, its
    metadata included (cards of earlier hf_comq versions digested the body alone, and are read so)."""
    metadata, body = _card_parts(text)
    marks = list(_CARD_MARK_PATTERN.finditer(body))
    if not marks:
        return False
    last = marks[-1]
    unmarked = body[: last.start()] + body[last.end() :]
    return last.group(1) in (_card_digest(_digested(metadata, unmarked)), _card_digest(unmarked))


def _holds_unedited_card(path: Path) -> bool:
    """Whether the file at ``path`` is a card hf_comq wrote that nobody edited (any bytes: a README
    that is not UTF-8 is someone else's)."""
    return is_unedited_card(path.read_text(encoding="utf-8", errors="replace"))


def _say_kept(path: Path) -> None:
    """Log why README.md was kept: a warning where it is an hf_comq card, whose settings may be stale."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if _CARD_MARK_PATTERN.search(_card_parts(text)[1]) or _has_comq_tag(path):
        logger.warning(
            "kept %s: an hf_comq card edited since it was written (or written without a digest, by an older "
            "hf_comq), so its settings may be an earlier save's; delete it to get this model's card",
            path,
        )
    else:
        logger.info("kept %s (not an hf_comq card): the COMQ model card was not written", path)


def _has_comq_tag(path: Path) -> bool:
    """Whether the README's metadata lists the ``comq`` tag every hf_comq card carries (:func:`card_tags`)."""
    try:
        metadata = metadata_load(path) or {}
    except Exception:  # metadata that is not YAML: a README of the user's own
        return False
    return _lists_comq_tag(metadata.get("tags") if isinstance(metadata, dict) else None)


def _lists_comq_tag(tags: Any) -> bool:
    """Whether card metadata ``tags`` hold the ``comq`` tag every hf_comq card carries (:func:`card_tags`)."""
    return isinstance(tags, list) and CARD_TAGS[0] in tags


def resolve_repo_id(repo_id: str, token: bool | str | None = None) -> str:
    """``owner/name`` for ``repo_id``: a name without an owner goes to the token's user, where
    ``create_repo`` puts it, so that the card's snippets name the repository that exists."""
    if "/" in repo_id:
        return repo_id
    return owned_repo_id(repo_id, HfApi(token=token).whoami()["name"])


def owned_repo_id(repo_id: str, owner: str) -> str:
    """``repo_id``, a name without an owner given ``owner`` (the token's user): the Hub's rule for ``create_repo``."""
    return repo_id if "/" in repo_id else f"{owner}/{repo_id}"


def _resolved_or_given(repo_id: str, token: bool | str | None) -> str:
    """:func:`resolve_repo_id`, or ``repo_id`` itself where the Hub cannot say (the push then reports why)."""
    try:
        return resolve_repo_id(repo_id, token)
    except Exception as error:  # no token, no network: the upload that follows fails with the reason
        logger.debug("could not resolve the owner of %s: %s", repo_id, error)
        return repo_id


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    token: bool | str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    tags: list[str] | None = None,
    files: list[str] | None = None,
    deleted: list[str] | None = None,
    drop_comq_card: bool = False,
) -> Any:
    """Publish a finished checkpoint folder in one commit: ``create_repo(exist_ok=True)`` + ``upload_folder``.

    The folder's README.md is the COMQ card; when the repository (at ``revision``) already has
    a README, that one is kept (it is the owner's text) and only receives the folder card's
    tags, unless it is an unedited COMQ card of an earlier push (:func:`is_unedited_card`).
    The card that goes up is written into a staging folder, never into ``folder``: a local
    README stays as it was.  ``files``: only these paths of the folder (relative, POSIX), as
    ``save_pretrained(push_to_hub=True)`` uploads only what the save wrote; ``None``: the whole folder.
    ``deleted``: paths the save removed from the folder, removed from the repository in the same
    commit (a single-file checkpoint a sharded one replaced would otherwise load first there too).
    ``drop_comq_card``: the model is no longer quantized, so an unedited COMQ card of an earlier
    push is removed rather than left to describe packed weights.
    """
    validate_repo_id(repo_id)
    folder = Path(folder)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    names = _relative_files(folder) if files is None else list(files)
    delete = list(deleted or [])
    if any(WEIGHT_FILE.fullmatch(name) for name in names):  # a checkpoint: earlier weights must not stay beside it
        delete += _stale_weight_files(api, repo_id, revision, folder)
    card = None
    if README_NAME in names and (folder / README_NAME).is_file():
        card = _card_to_upload(api, repo_id, revision, folder / README_NAME, tags)
    elif drop_comq_card:
        hub_card = _hub_card(api, repo_id, revision)
        if hub_card is not None and is_unedited_card(hub_card.content):
            delete.append(README_NAME)
    with _upload_view(folder, names, card) as staged:
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(staged),
            commit_message=commit_message or "Upload COMQ-quantized model",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            delete_patterns=[glob.escape(name) for name in delete] or None,
        )


WEIGHT_FILE = re.compile(
    r"model(-\d+-of-\d+)?\.safetensors|pytorch_model(-\d+-of-\d+)?\.bin|(model\.safetensors|pytorch_model\.bin)\.index\.json"
)
"""The top-level weight files (and indexes) transformers reads, single-file or sharded; other tools' names
(``model.bin``, ``consolidated.safetensors``) are theirs."""


def _stale_weight_files(api: HfApi, repo_id: str, revision: str | None, folder: Path) -> list[str]:
    """The repository's weight files (at ``revision``) that ``folder``'s checkpoint does not hold: an earlier
    push's single file beside new shards loads first, and its index beside a new single file sends
    index-following loaders (vLLM) to the old shards."""
    present = {path.name for path in folder.iterdir() if WEIGHT_FILE.fullmatch(path.name)}
    remote = api.list_repo_files(repo_id, revision=revision)
    stale = [name for name in remote if WEIGHT_FILE.fullmatch(name) and name not in present]
    if stale:
        logger.warning("removing %s from %s in this push: an earlier checkpoint's weights, which loaders would "
                       "read instead of (or beside) this one", ", ".join(stale), repo_id)
    return stale


def _hub_card(api: HfApi, repo_id: str, revision: str | None) -> ModelCard | None:
    """The repository's README.md at ``revision``, ``None`` if it has none."""
    if not api.file_exists(repo_id, README_NAME, revision=revision):
        return None
    return ModelCard.load(api.hf_hub_download(repo_id, README_NAME, revision=revision))


def _card_to_upload(
    api: HfApi, repo_id: str, revision: str | None, readme: Path, tags: list[str] | None
) -> ModelCard | None:
    """The card to upload for the folder's ``readme``: the repository's own README at ``revision``
    with the folder card's tags (and ``tags``) added when that one is the owner's text (or their
    edit of a COMQ card), else the folder's card with ``tags``; ``None``: the folder's file as it
    is (nothing to add: uploaded byte for byte, not re-serialized)."""
    card = ModelCard.load(readme)
    owned = _hub_card(api, repo_id, revision)
    if owned is not None and not is_unedited_card(owned.content):
        if _lists_comq_tag(owned.data.tags):
            logger.warning(
                "kept the README.md of %s: an hf_comq card edited on the Hub (or written by an older "
                "hf_comq), so its settings may be an earlier push's; delete it there to get this model's card",
                repo_id,
            )
        _add_tags(owned, list(card.data.tags or []) + list(tags or []))
        return owned
    return card if _add_tags(card, tags) else None


@contextmanager
def _upload_view(folder: Path, names: list[str], card: ModelCard | None) -> Iterator[Path]:
    """A temporary folder of links to ``folder``'s files ``names``, README.md written from ``card``
    (when given) instead: what one ``upload_folder`` commit sends, with the upload's own card."""
    with tempfile.TemporaryDirectory(prefix="hf-comq-push-") as staging:
        root = Path(staging)
        for name in names:
            if card is not None and name == README_NAME:
                continue
            link = root / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((folder / name).resolve())
        if card is not None:
            card.save(root / README_NAME)
        yield root


def _add_tags(card: ModelCard, tags: list[str] | None) -> bool:
    """Append the ``tags`` the card's metadata does not list yet, in order; whether there were any."""
    present = list(card.data.tags or [])
    added = [tag for tag in dict.fromkeys(tags or ()) if tag not in present]
    if added:
        card.data.tags = present + added
    return bool(added)


# ---------------------------------------------------------------------------------------------- save hooks
def _is_comq_model(model: Any) -> bool:
    """Still COMQ-quantized?  ``model.dequantize()`` removes the config, and then no COMQ card is due."""
    try:
        _comq_config(model)
    except ValueError:
        return False
    return True


class _SavePretrainedWithCard:
    """``model.save_pretrained`` of a COMQ model: the regular save, then README.md (:func:`write_model_card`).

    ``push_to_hub=True`` is taken out of transformers' hands so that the upload is the
    folder as saved here, card included, in one commit (:func:`push_folder`).  A model
    dequantized since gets no card: one an earlier save wrote is removed, here and on the Hub.
    """

    def __init__(self, model: Any):
        self.model = model

    def __call__(self, save_directory: str | os.PathLike[str], *args: Any, push_to_hub: bool = False, **kwargs: Any):
        from .calibration.distributed import is_saving_rank
        from .calibration.placement import retie_offloaded_weights

        push_keys = ("repo_id", "token", "private", "revision", "commit_message", "commit_description", "create_pr")
        push = {key: kwargs.pop(key) for key in push_keys if key in kwargs}
        model = self.model
        folder = Path(save_directory)
        before = _file_stamps(folder)
        retie_offloaded_weights(model)  # a forward since loading split a tied embedding: saved twice otherwise
        result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
        # transformers writes weights and config on the main process only; the card follows the same rule
        is_main_process = is_saving_rank(kwargs.get("is_main_process", args[0] if args else True))
        if not (is_main_process and folder.is_dir()):
            return result
        removed = _remove_shadowing_weights(folder, before)
        quantized = _is_comq_model(model)
        repo_id = push.pop("repo_id", None) or folder.name
        if push_to_hub:
            repo_id = _resolved_or_given(repo_id, push.get("token"))
        if quantized:
            revision = push.get("revision") if push_to_hub else None
            write_model_card(save_directory, model, model_id=repo_id, revision=revision)
        else:  # dequantized since: a card an earlier save wrote would describe packed weights
            _remove_unedited_card(folder)
            push["commit_message"] = push.get("commit_message") or "Upload model"
        if push_to_hub:
            files = _changed_files(folder, before)
            push_folder(folder, repo_id, files=files, deleted=removed, drop_comq_card=not quantized, **push)
        return result


def _remove_shadowing_weights(folder: Path, before: Mapping[str, tuple[int, int]]) -> list[str]:
    """Remove what an earlier save left of its checkpoint beside this one (transformers' own clean-up
    removes earlier shards only): a single-file ``model.safetensors`` beside new shards, which loaders
    take first, so the folder would load as the earlier model; or an index beside a new single file,
    which sends index-following loaders (vLLM) to shards that are gone.  Returns the names removed."""
    single, index = folder / SAFE_WEIGHTS_NAME, folder / SAFE_WEIGHTS_INDEX_NAME
    written = _changed_files(folder, before)
    for new, old in ((index, single), (single, index)):
        if new.name in written and old.name not in written and old.is_file():
            old.unlink()
            logger.warning("removed %s of an earlier save: it would be read instead of the checkpoint just saved", old)
            return [old.name]
    return []


def _remove_unedited_card(folder: Path) -> None:
    """Remove README.md where it is a COMQ card hf_comq wrote and nobody edited."""
    readme = folder / README_NAME
    if readme.is_file() and _holds_unedited_card(readme):
        readme.unlink()
        logger.info("removed the COMQ model card of an earlier save: the model saved is no longer quantized")


def _relative_files(folder: str | os.PathLike[str]) -> list[str]:
    """The relative POSIX paths of every file under ``folder``, sorted (none if it does not exist)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())


def _file_stamps(folder: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """``relative POSIX path -> (mtime_ns, size)`` of every file under ``folder`` (none if it does not exist)."""
    stamps = {}
    for name in _relative_files(folder):
        status = (Path(folder) / name).stat()
        stamps[name] = (status.st_mtime_ns, status.st_size)
    return stamps


def _changed_files(folder: str | os.PathLike[str], before: Mapping[str, tuple[int, int]]) -> list[str]:
    """The files of ``folder`` written since ``before`` was taken: what a save wrote there, not the
    user's other files nor a previous save's leftovers (transformers' push uploads the same)."""
    return sorted(name for name, stamp in _file_stamps(folder).items() if before.get(name) != stamp)


class _PushToHubWithCard:
    """``model.push_to_hub`` of a COMQ model: save (card included) into a temporary folder, publish it in one commit."""

    def __init__(self, model: Any):
        self.model = model

    def __call__(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ) -> Any:
        model = self.model
        if not _is_comq_model(model):
            return type(model).push_to_hub(
                model, repo_id, commit_message=commit_message, commit_description=commit_description,
                private=private, token=token, revision=revision, create_pr=create_pr,
                max_shard_size=max_shard_size, tags=tags,
            )  # fmt: skip
        validate_repo_id(repo_id)  # before the save, which can be long for a large model
        from .calibration.distributed import is_saving_rank

        if not is_saving_rank():  # one upload per process group, from the rank that saves
            return None
        repo_id = _resolved_or_given(repo_id, token)
        with tempfile.TemporaryDirectory() as folder:
            type(model).save_pretrained(model, folder, max_shard_size=max_shard_size)
            write_model_card(folder, model, model_id=repo_id, revision=revision)
            return push_folder(
                folder, repo_id, token=token, private=private, revision=revision, create_pr=create_pr,
                commit_message=commit_message, commit_description=commit_description,
                tags=list(model.model_tags or []) + list(tags or []),
            )  # fmt: skip


def attach_model_card_hook(
    model: Any,
    *,
    base_model: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    eval_results: list[EvalResult] | None = None,
    pipeline_tag: str | None = None,
) -> None:
    """Make ``model.save_pretrained`` and ``model.push_to_hub`` publish the COMQ model card.

    Called by the COMQ quantizer once the model's weights are quantized (or loaded); idempotent, so users may call
    it again to add evaluation ``metrics`` / ``eval_results`` or to name the ``base_model``.  Arguments left at
    ``None`` keep their current value (defaults: the checkpoint that was quantized, no metrics, the pipeline tag
    inferred from the model class).

    Raises:
        ValueError: when the model is not quantized with COMQ, or ``metrics`` has an unsupported shape.
    """
    config = _comq_config(model)  # raises unless the model is COMQ-quantized
    settings = _card_settings(model)
    if base_model is not None:
        settings.base_model = base_model
        config.base_model = base_model  # recorded in config.json too: a card written on a later save names it
    if metrics is not None:
        _comparison_table(metrics)  # validate now rather than at save time
        settings.metrics = metrics
    if eval_results is not None:
        settings.eval_results = list(eval_results)
    if pipeline_tag is not None:
        settings.pipeline_tag = pipeline_tag
    # Plain attributes and callable objects (nn.Module keeps them in __dict__): deep copies and pickles carry them.
    setattr(model, _CARD_ATTR, settings)
    for name, hook in (("save_pretrained", _SavePretrainedWithCard), ("push_to_hub", _PushToHubWithCard)):
        if not hasattr(type(model), name):
            raise TypeError(f"{type(model).__name__} has no {name}: cannot attach the COMQ model card hook")
        if not isinstance(model.__dict__.get(name), hook):
            setattr(model, name, hook(model))

