"""What a transformers model class is for: its task, the Auto class that loads it, its inputs, its Hub pipeline tag.

The one place that maps classes to tasks: ``hf-comq`` picks the Auto class and the
metric from it (:func:`task_of`, :func:`model_inputs`) and the model card its pipeline
tag (:func:`infer_pipeline_tag`).  Nothing here imports torch or transformers at module
import; the class lists come from transformers' auto mappings (:mod:`hf_comq.compat`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Task:
    """A model family ``hf-comq`` handles: how to load it, which transformers mapping lists its
    classes, and its Hub pipeline tag (a base model's depends on its inputs: ``None`` here)."""

    name: str
    auto_class: str
    mapping: str
    pipeline_tag: str | None


TASKS: tuple[Task, ...] = (
    Task(
        "image classification", "AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        "image-classification",
    ),
    Task(
        "sequence classification", "AutoModelForSequenceClassification",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text-classification",
    ),
    Task(
        "token classification", "AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
        "token-classification",
    ),
    Task("causal LM", "AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation"),
    # Before masked LMs: transformers lists BART, mBART and MVP's generation classes as masked LMs too.
    Task(
        "sequence-to-sequence LM", "AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
        "text2text-generation",
    ),
    Task("masked LM", "AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask"),
    Task("base model", "AutoModel", "MODEL_MAPPING_NAMES", None),
)  # fmt: skip
"""Tasks in the order :func:`task_of` tries them: the first whose mapping lists a class is its task."""
SEQ2SEQ_LM = next(task for task in TASKS if task.auto_class == "AutoModelForSeq2SeqLM")
BASE_MODEL = TASKS[-1]
SUPPORTED = (
    "image classification, sequence/token classification, causal, masked and sequence-to-sequence LMs, "
    "and base models"
)

TEXT_AND_IMAGE_MAPPING = "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES"
"""The mapping of contrastive text-image models (CLIP, SigLIP, ALIGN, ...), whose forward embeds
a text and an image together and fails on either alone."""

INPUT_OF_KIND = {"images": "pixel_values", "text": "input_ids"}
"""The model input each kind of data becomes (the processor's output a ``forward`` must take)."""

# Task head suffixes of transformers class names -> Hub pipeline tag, for classes no task lists.
PIPELINE_SUFFIXES: tuple[tuple[str, str], ...] = (
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
NON_TEXT_PIPELINES = ("image-", "object-", "audio-", "automatic-speech")


def task_of(architectures: list[str], model_type: str | None) -> tuple[Task | None, str]:
    """The first of ``architectures`` (config.json's) that a task lists, and that task; ``(None, ...)`` when none does.

    A config without architectures names a base model by its ``model_type``.
    """
    from .compat import auto_mapping

    for architecture in architectures:
        for task in TASKS:
            if architecture in _class_names(auto_mapping(task.mapping)):
                return task, architecture
    base_models = auto_mapping(BASE_MODEL.mapping)
    if not architectures and model_type in base_models:
        return BASE_MODEL, next(iter(_class_names({model_type: base_models[model_type]})))
    for architecture in architectures:  # a backbone no mapping lists, such as T5EncoderModel
        if architecture.endswith("Model") and _is_transformers_model(architecture):
            return BASE_MODEL, architecture
    return None, architectures[0] if architectures else ""


def _is_transformers_model(name: str) -> bool:
    import transformers

    cls = getattr(transformers, name, None)
    return isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)


def _class_names(mapping: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (list, tuple)) else (value,))
    return names


def needs_text_and_images(architecture: str) -> bool:
    """Whether the class's forward needs text and images at once (:data:`TEXT_AND_IMAGE_MAPPING`)."""
    from .compat import auto_mapping

    return architecture in _class_names(auto_mapping(TEXT_AND_IMAGE_MAPPING))


def text_and_images_refusal(architecture: str, fix: str) -> str:
    """The line for data of one kind given to a model that needs both (``fix``: what else the user can pass)."""
    return (
        f"{architecture} embeds a text and an image together: its forward needs input_ids and pixel_values at once, "
        f"which data of one kind (images or text) cannot give; quantize one of its towers on its own (e.g. "
        f"CLIPVisionModel or CLIPTextModel, saved from it){fix}"
    )


def model_inputs(architecture: str) -> str | None:
    """``"images"`` or ``"text"``: what the class's ``main_input_name`` takes (``None`` for anything else)."""
    import transformers

    cls = getattr(transformers, architecture, None)
    main_input = getattr(cls, "main_input_name", None)
    return next((kind for kind, name in INPUT_OF_KIND.items() if name == main_input), None)


def infer_pipeline_tag(model: Any) -> str | None:
    """The Hub pipeline tag of a transformers model (``None`` when ambiguous).

    The task that transformers' auto mappings give the class decides, as for ``hf-comq``'s
    own choice of Auto class: a class name alone misleads (``GPT2LMHeadModel`` is a causal
    LM, not a bare ``...Model``; ``...ForConditionalGeneration`` names vision-language models
    too).  Classes no task lists fall back to their name's task suffix.
    """
    class_name = type(model).__name__
    task = task_of([class_name], None)[0]
    if task is not None and task.pipeline_tag is not None:
        return task.pipeline_tag
    for suffix, tag in PIPELINE_SUFFIXES:
        if class_name.endswith(suffix):
            return tag
    if task is BASE_MODEL or class_name.endswith("Model"):  # bare backbones produce features
        is_vision = getattr(model, "main_input_name", "") == "pixel_values"
        return "image-feature-extraction" if is_vision else "feature-extraction"
    return None


def is_text_pipeline(pipeline_tag: str | None) -> bool:
    """Whether a pipeline's inputs are text (so text-only settings such as ``max_length`` apply)."""
    return not (pipeline_tag or "").startswith(NON_TEXT_PIPELINES)
