"""Model cards and Hub publishing for COMQ-quantized models.

A COMQ checkpoint is only usable with ``import hf_comq`` run before ``from_pretrained``: without it transformers
silently loads random weights in place of the quantized layers.  The model card is where users learn that, so
every COMQ model written by ``save_pretrained`` or uploaded by ``push_to_hub`` gets one, filled from the
quantization config (bits, grid, solver settings, calibration data) and optional evaluation metrics.

The template lives in ``hf_comq/templates/comq_model_card.md`` (a copy of ``model_cards/comq_model_card.md`` in
the repository) and uses :class:`string.Template` placeholders (``${name}``) so that it stays a readable Markdown
file without adding a templating dependency.

Saving integration: :func:`attach_model_card_hook` is called by the quantizer on every COMQ model once its
weights are in place.  It installs two per-instance methods (bound with :class:`types.MethodType`, so a
``copy.deepcopy`` of the model rebinds them to the copy instead of saving the original):

* ``save_pretrained`` writes README.md after the regular save when the folder has none;
* ``_upload_modified_files`` (the single upload step shared by ``push_to_hub`` and
  ``save_pretrained(push_to_hub=True)``) replaces the generic card transformers generates for a repository that
  has no README yet.  A README that already exists on the Hub is kept; it only receives the COMQ tags.
"""

from __future__ import annotations

import json
import os
import re
import types
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Mapping

from huggingface_hub import HfApi, ModelCard

__all__ = [
    "ModelCardSettings",
    "attach_model_card_hook",
    "card_tags",
    "infer_pipeline_tag",
    "load_template",
    "render_model_card",
    "write_model_card",
]

README_NAME = "README.md"
_CARD_ATTR = "_comq_model_card"
_MODEL_ID_PLACEHOLDER = "<repo-id-or-folder-of-this-model>"

# Solver settings shown first, in this order, with a human label.  Keys follow COMQConfig / comq_quantize.
_PRIMARY_SETTINGS: tuple[tuple[str, str], ...] = (
    ("bits", "Weight bits"),
    ("group_size", "Group size"),
    ("symmetric", "Symmetric grid"),
    ("order", "Column order"),
    ("init", "Initialisation"),
    ("iterations", "Coordinate-descent sweeps (max.)"),
    ("scale_refit", "Scale refit"),
    ("scale_search", "Scale search"),
)
# Keys described in the calibration section rather than in the settings table.  The dataset name, split and
# column only mean something when the dataset was given by name (in-memory data is serialized as None).
_DATASET_KEYS: tuple[tuple[str, str], ...] = (
    ("dataset", "Dataset"),
    ("dataset_split", "Split"),
    ("dataset_column", "Column"),
)
_CALIBRATION_KEYS: tuple[tuple[str, str], ...] = (
    ("num_samples", "Requested samples (`num_samples`)"),
    ("batch_size", "Batch size"),
    ("max_length", "Max. sequence length (text inputs)"),
    ("seed", "Sampling seed"),
)
# Keys that are not settings of the quantized result (bookkeeping, objects, or rendered elsewhere).
_NOT_SETTINGS = frozenset(
    {"quant_method", "calibration_description", "processor", "modules_to_not_convert"}
    | {key for key, _ in _DATASET_KEYS + _CALIBRATION_KEYS}
)
_MAX_LISTED_MODULES = 12

# Task head suffixes of transformers class names -> Hub pipeline tag.
_PIPELINE_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("ForImageClassification", "image-classification"),
    ("ForCausalLM", "text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForObjectDetection", "object-detection"),
    ("ForSemanticSegmentation", "image-segmentation"),
    ("ForCTC", "automatic-speech-recognition"),
    ("ForSpeechSeq2Seq", "automatic-speech-recognition"),
    ("ForAudioClassification", "audio-classification"),
)
_NON_TEXT_PIPELINES = ("image-", "object-", "audio-", "automatic-speech")
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]{0,95}(/[A-Za-z0-9][\w.\-]{0,95})?")


class _Unset:
    """Sentinel type: "argument not given", distinct from an explicit ``None``."""


_UNSET = _Unset()


@dataclass
class ModelCardSettings:
    """What the card hook needs besides the quantization config, kept on the model between save calls."""

    base_model: str | None = None
    metrics: Mapping[str, Any] | None = None
    pipeline_tag: str | None = None


# ---------------------------------------------------------------------------------------------- rendering
def load_template() -> str:
    """The Markdown template shipped inside the package (so an installed wheel can render cards)."""
    template = resources.files("hf_comq").joinpath("templates").joinpath("comq_model_card.md")
    return template.read_text(encoding="utf-8")


def card_tags(bits: int, extra: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The card's tags: ``comq``, ``quantized``, ``{bits}-bit`` first, then ``extra`` without duplicates."""
    tags = ["comq", "quantized", f"{bits}-bit"]
    for tag in extra or ():
        if isinstance(tag, str) and tag and tag not in tags:
            tags.append(tag)
    return tags


def _is_hub_repo_id(name: str) -> bool:
    """True for names that can go into ``base_model`` metadata: Hub ids, not paths on this machine.

    The Hub rejects (and links nowhere for) local paths, and a path would leak the publisher's file layout.
    """
    return (
        _HUB_REPO_ID.fullmatch(name) is not None
        and "--" not in name
        and ".." not in name
        and not os.path.isdir(name)
    )


def _yaml_scalar(value: str) -> str:
    """A JSON string is a valid YAML scalar: quoting this way cannot break the front matter."""
    return json.dumps(value, ensure_ascii=False)


def _cell(value: Any) -> str:
    """Format a value for a Markdown table cell."""
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = str(round(value, 4))
    elif isinstance(value, (list, tuple)):
        text = ", ".join(f"`{item}`" for item in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _setting_value(key: str, config: Mapping[str, Any]) -> str:
    if key not in config:
        return "not recorded"
    value = config[key]
    if key == "group_size" and value is None:
        return "none (one scale per output channel)"
    if value is None:
        return "default"
    if isinstance(value, str):  # solver option names, e.g. `act_order`
        return f"`{_cell(value)}`"
    return _cell(value)


def _settings_rows(config: Mapping[str, Any]) -> str:
    rows = [f"| {label} | {_setting_value(key, config)} |" for key, label in _PRIMARY_SETTINGS]
    shown = {key for key, _ in _PRIMARY_SETTINGS} | _NOT_SETTINGS
    for key in sorted(config):
        value = config[key]
        if key in shown or key.startswith("_") or value is None:
            continue
        if isinstance(value, (bool, int, float, str)):
            rows.append(f"| `{key}` | {_cell(value)} |")
    skipped = config.get("modules_to_not_convert")
    if skipped:
        names = list(skipped)
        listed = ", ".join(f"`{name}`" for name in names[:_MAX_LISTED_MODULES])
        if len(names) > _MAX_LISTED_MODULES:
            listed += f" and {len(names) - _MAX_LISTED_MODULES} more"
        rows.append(f"| Kept in full precision | {listed} |")
    return "\n".join(rows)


def _calibration_md(config: Mapping[str, Any], pipeline_tag: str | None) -> str:
    """Bullet list of the calibration data; text-only options are left out for image and audio models."""
    description = config.get("calibration_description")
    if isinstance(description, Mapping):
        description = ", ".join(f"{key}: {value}" for key, value in description.items())
    lines = [f"- **Data:** {_cell(description) if description else 'not recorded'}"]
    keys = (_DATASET_KEYS if isinstance(config.get("dataset"), str) else ()) + _CALIBRATION_KEYS
    non_text = (pipeline_tag or "").startswith(_NON_TEXT_PIPELINES)
    for key, label in keys:
        if key == "max_length" and non_text:
            continue
        if isinstance(config.get(key), (str, int, float)):
            lines.append(f"- **{label}:** {_cell(config[key])}")
    lines.append("")
    lines.append(
        "COMQ only uses the calibration inputs to measure each layer's input statistics: no labels and no "
        "back-propagation are involved, and the calibration data is not part of this repository."
    )
    return "\n".join(lines)


def _metrics_md(metrics: Mapping[str, Any] | None) -> str:
    """An "Evaluation" section: one row per metric, one column per model variant when values are dicts."""
    if not metrics:
        return "## Evaluation\n\nNo evaluation results were recorded for this model card."
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a dict of metric name -> value (or -> dict of values), got {metrics!r}")
    nested = [name for name, value in metrics.items() if isinstance(value, Mapping)]
    if nested and len(nested) != len(metrics):
        raise ValueError(
            "metrics must either map every metric name to a value, or every name to a dict of values "
            f"(e.g. {{'top-1': {{'fp32': 0.81, 'comq': 0.80}}}}); mixed entries: {sorted(map(str, metrics))}"
        )
    if not nested:
        rows = ["| Metric | Value |", "|---|---|"]
        rows += [f"| {_cell(name)} | {_cell(value)} |" for name, value in metrics.items()]
    else:
        columns: list[str] = []
        for value in metrics.values():
            columns += [str(column) for column in value if str(column) not in columns]
        rows = ["| Metric | " + " | ".join(_cell(column) for column in columns) + " |"]
        rows.append("|---|" + "---|" * len(columns))
        for name, value in metrics.items():
            by_column = {str(column): cell for column, cell in value.items()}
            cells = [_cell(by_column[column]) if column in by_column else "—" for column in columns]
            rows.append(f"| {_cell(name)} | " + " | ".join(cells) + " |")
    return "## Evaluation\n\n" + "\n".join(rows)


def _tidy(text: str) -> str:
    """Drop the metadata lines of absent optional fields and collapse runs of blank lines in the body."""
    match = re.match(r"\A---\n(.*?)\n---\n", text, flags=re.DOTALL)
    if match is None:
        raise ValueError("The model card template must start with a YAML front matter block")
    metadata = "\n".join(line for line in match.group(1).splitlines() if line.strip())
    body = re.sub(r"\n{3,}", "\n\n", text[match.end() :]).strip("\n")
    return f"---\n{metadata}\n---\n\n{body}\n"


def render_model_card(
    config_dict: Mapping[str, Any],
    base_model: str | None,
    metrics: Mapping[str, Any] | None = None,
    pipeline_tag: str | None = None,
    *,
    model_class: str = "AutoModel",
    model_id: str | None = None,
    tags: list[str] | tuple[str, ...] | None = None,
) -> str:
    """Fill the COMQ model card template.

    Args:
        config_dict: ``COMQConfig.to_dict()`` (what ``config.json["quantization_config"]`` holds).
        base_model: the checkpoint that was quantized.  A Hub id goes into the ``base_model`` metadata (which
            links the two repositories on the Hub); a local path is only named by its folder.
        metrics: optional evaluation results, ``{"top-1": 0.80}`` or ``{"top-1": {"fp32": 0.81, "comq": 0.80}}``.
        pipeline_tag: the Hub task, when known (see :func:`infer_pipeline_tag`).
        model_class: the transformers class shown in the usage snippet.
        model_id: the repository id (or folder) shown in the usage snippet; a placeholder when unknown.
        tags: tags added after ``comq``, ``quantized`` and ``{bits}-bit``.

    Returns:
        The README.md text: YAML front matter followed by the Markdown card.

    Raises:
        ValueError: when ``config_dict`` is not a COMQ config, or metrics have an unsupported shape.
    """
    quant_method = config_dict.get("quant_method", "comq")
    quant_method = getattr(quant_method, "value", quant_method)
    if quant_method != "comq":
        raise ValueError(f"render_model_card expects a COMQ quantization config, got quant_method={quant_method!r}")
    bits = config_dict.get("bits")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"The quantization config must record an integer bit width in [1, 8], got bits={bits!r}")

    hub_base = base_model if base_model and _is_hub_repo_id(base_model) else None
    if hub_base:
        base_model_md = f"[`{hub_base}`](https://huggingface.co/{hub_base})"
        name = hub_base.split("/")[-1]
    elif base_model:
        name = Path(base_model.rstrip("/\\")).name or "model"
        base_model_md = f"a local checkpoint (`{name}`)"
    else:
        name = model_class
        base_model_md = "its base model"

    values = {
        "base_model_yaml": f"base_model: {_yaml_scalar(hub_base)}" if hub_base else "",
        "pipeline_tag_yaml": f"pipeline_tag: {_yaml_scalar(pipeline_tag)}" if pipeline_tag else "",
        "bits": str(bits),
        "extra_tags_yaml": "\n".join(f"- {_yaml_scalar(tag)}" for tag in card_tags(bits, tags)[3:]),
        "title": f"{name} — COMQ {bits}-bit",
        "base_model_md": base_model_md,
        "model_class": model_class,
        "model_id": model_id or _MODEL_ID_PLACEHOLDER,
        "settings_rows": _settings_rows(config_dict),
        "calibration_md": _calibration_md(config_dict, pipeline_tag),
        "metrics_md": _metrics_md(metrics),
    }
    return _tidy(Template(load_template()).substitute(values))


# ---------------------------------------------------------------------------------------------- model helpers
def infer_pipeline_tag(model: Any) -> str | None:
    """The Hub pipeline tag of a transformers model, from its class name (``None`` when ambiguous)."""
    class_name = type(model).__name__
    for suffix, tag in _PIPELINE_SUFFIXES:
        if class_name.endswith(suffix):
            return tag
    if class_name.endswith("Model"):  # bare backbones produce features
        is_vision = getattr(model, "main_input_name", "") == "pixel_values"
        return "image-feature-extraction" if is_vision else "feature-extraction"
    return None


def _quantization_config_dict(model: Any) -> dict[str, Any]:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        raise ValueError("The model has no quantization_config: only COMQ-quantized models get a COMQ model card")
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    quant_method = config_dict.get("quant_method")
    if getattr(quant_method, "value", quant_method) != "comq":
        raise ValueError(f"The model is quantized with {quant_method!r}, not COMQ")
    return config_dict


def _default_base_model(model: Any) -> str | None:
    """The checkpoint that was quantized: the one ``from_pretrained`` loaded, unless it was already COMQ.

    When a pre-quantized COMQ checkpoint is loaded, ``name_or_path`` names the quantized model itself, which
    must not be advertised as its own base model.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer, "pre_quantized", False):
        return None
    name = getattr(model, "name_or_path", None)
    return str(name) if name else None


def _card_settings(model: Any) -> ModelCardSettings:
    settings = getattr(model, _CARD_ATTR, None)
    if isinstance(settings, ModelCardSettings):
        return settings
    return ModelCardSettings(base_model=_default_base_model(model), pipeline_tag=infer_pipeline_tag(model))


def _model_class_name(model: Any) -> str:
    """The class for the usage snippet: the concrete transformers class, or AutoModel for custom classes."""
    cls = type(model)
    return cls.__name__ if cls.__module__.startswith("transformers.") else "AutoModel"


def _render_for_model(
    model: Any,
    metrics: Mapping[str, Any] | None = None,
    model_id: str | None = None,
    tags: list[str] | None = None,
) -> str:
    settings = _card_settings(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return render_model_card(
        _quantization_config_dict(model),
        settings.base_model,
        metrics if metrics is not None else settings.metrics,
        settings.pipeline_tag,
        model_class=_model_class_name(model),
        model_id=model_id,
        tags=([model_type] if model_type else []) + list(tags or []),
    )


def write_model_card(
    save_directory: str | os.PathLike[str],
    model: Any,
    metrics: Mapping[str, Any] | None = None,
    *,
    model_id: str | None = None,
) -> Path | None:
    """Write README.md for a COMQ model into ``save_directory`` unless the folder already has one.

    An existing README is the user's (or a previous save's) and is never overwritten.  Metrics default to those
    given to :func:`attach_model_card_hook`.

    Returns:
        The path written, or ``None`` when a README already existed.
    """
    path = Path(save_directory) / README_NAME
    if path.exists():
        return None
    text = _render_for_model(model, metrics, model_id=model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x", encoding="utf-8") as handle:  # "x": never clobber a README created meanwhile
            handle.write(text)
    except FileExistsError:
        return None
    return path


# ---------------------------------------------------------------------------------------------- save hooks
def _is_comq_model(model: Any) -> bool:
    """Still COMQ-quantized?  ``model.dequantize()`` removes the config, and then no COMQ card is due."""
    try:
        _quantization_config_dict(model)
    except ValueError:
        return False
    return True


def _save_pretrained_with_card(self: Any, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` of a COMQ model: the regular save, then README.md if the folder has none."""
    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    is_main_process = kwargs.get("is_main_process", args[0] if args else True)
    if is_main_process and os.path.isdir(save_directory) and _is_comq_model(self):
        write_model_card(save_directory, self)
    return result


def _upload_modified_files_with_card(
    self: Any,
    working_dir: str | os.PathLike[str],
    repo_id: str,
    files_timestamps: dict[str, float],
    commit_message: str | None = None,
    token: bool | str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    commit_description: str | None = None,
) -> Any:
    """Upload step of ``push_to_hub``: put the COMQ card (or the COMQ tags) into README.md, then upload.

    Just before this step transformers writes into ``working_dir`` either the README already on the Hub or, for a
    repository without one, a generic template card.  The generic card is replaced by the COMQ card (keeping the
    tags it carries, such as ``push_to_hub(tags=...)``); an existing card is the owner's text and only gets the
    COMQ tags, so that the model is still found as a COMQ model.
    """
    readme = Path(working_dir) / README_NAME
    if _is_comq_model(self):
        existing = ModelCard.load(readme) if readme.is_file() else None
        existing_tags = list(existing.data.tags or []) if existing is not None else []
        # transformers looked for the remote card on the default branch; ask the same question.
        if existing is None or not HfApi().file_exists(repo_id, README_NAME, token=token):
            readme.write_text(_render_for_model(self, model_id=repo_id, tags=existing_tags), encoding="utf-8")
        else:
            bits = int(_quantization_config_dict(self)["bits"])
            existing.data.tags = existing_tags + [tag for tag in card_tags(bits) if tag not in existing_tags]
            existing.save(readme)
    return type(self)._upload_modified_files(
        self,
        working_dir,
        repo_id,
        files_timestamps,
        commit_message=commit_message,
        token=token,
        create_pr=create_pr,
        revision=revision,
        commit_description=commit_description,
    )


def attach_model_card_hook(
    model: Any,
    *,
    base_model: str | None | _Unset = _UNSET,
    metrics: Mapping[str, Any] | None | _Unset = _UNSET,
    pipeline_tag: str | None | _Unset = _UNSET,
) -> None:
    """Make ``model.save_pretrained`` and ``model.push_to_hub`` publish the COMQ model card.

    Called by the COMQ quantizer once the model's weights are quantized (or loaded); idempotent, so users may call
    it again to add evaluation ``metrics`` or to name the ``base_model`` explicitly.  Arguments not given keep
    their current value (defaults: the checkpoint passed to ``from_pretrained``, no metrics, the pipeline tag
    inferred from the model class).

    Raises:
        ValueError: when the model is not quantized with COMQ.
    """
    _quantization_config_dict(model)  # raises unless the model is COMQ-quantized
    settings = _card_settings(model)
    if not isinstance(base_model, _Unset):
        settings.base_model = base_model
    if not isinstance(metrics, _Unset):
        _metrics_md(metrics)  # validate now rather than at save time
        settings.metrics = metrics
    if not isinstance(pipeline_tag, _Unset):
        settings.pipeline_tag = pipeline_tag
    # A plain attribute (nn.Module keeps non-tensor attributes in __dict__): deep copies carry it along.
    setattr(model, _CARD_ATTR, settings)
    for name, function in (
        ("save_pretrained", _save_pretrained_with_card),
        ("_upload_modified_files", _upload_modified_files_with_card),
    ):
        if not hasattr(type(model), name):
            raise TypeError(f"{type(model).__name__} has no {name}: cannot attach the COMQ model card hook")
        bound = model.__dict__.get(name)
        if not (isinstance(bound, types.MethodType) and bound.__func__ is function):
            setattr(model, name, types.MethodType(function, model))
