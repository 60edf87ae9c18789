"""``hf-comq evaluate``: the metric that fits the model (top-1, perplexity or embedding cosine), optionally
against the full-precision ``--reference``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..tasks import SEQ2SEQ_LM
from .common import EXIT_OK, CLIError, add_command, add_setting_option, check_positive, check_single_process, torch_threads
from .data import add_data_arguments, column_texts, limited, open_dataset, resolve_dataset
from .models import ModelSpec, inspect_model, load_model, load_processor, read_model_config

EVALUATION_SPLIT = "test"  # --split's default: evaluation reads held-out data


def add_parser(commands: Any) -> None:
    command = add_command(
        commands,
        "evaluate",
        "measure a (quantized) model: top-1, perplexity or embedding cosine",
        "Evaluate MODEL (a COMQ checkpoint or any full-precision checkpoint) on --dataset with the metric that\n"
        "fits it:\n"
        "  image classification  top-1 accuracy (column --column, labels --label-column)\n"
        "  causal LM             perplexity of the texts in --column (conversations, as a 'messages' column,\n"
        "                        written with the tokenizer's chat template)\n"
        "  text encoder          mean cosine of mean-pooled embeddings to --reference (required)\n"
        "With --reference, the full-precision model is evaluated too and the difference is shown.",
    )
    command.add_argument("model", metavar="MODEL", help="checkpoint folder or Hub id to evaluate")
    add_data_arguments(command, role="evaluation", split=EVALUATION_SPLIT)
    command.add_argument(
        "--label-column", default="label", metavar="COLUMN", help="class id column for top-1 (default: label)"
    )
    command.add_argument("--reference", metavar="FP_MODEL", help="full-precision model to compare against")
    command.add_argument(
        "--limit", type=int, default=None, metavar="N",
        help="evaluate on the first N rows only (advisable for large Hub datasets, which are streamed)",
    )  # fmt: skip
    command.add_argument(
        "--batch-size", type=int, default=None, metavar="N",
        help="evaluation batch size (default: 64 images; 8 texts for perplexity, 32 for embeddings)",
    )  # fmt: skip
    add_setting_option(command, "max_length")
    command.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """``hf-comq evaluate``: pick the metric from the model type, check the data, then load and measure."""
    check_single_process("evaluate")
    read = read_model_config(args.model)
    read_reference = read_model_config(args.reference) if args.reference else None
    if read_reference is not None:
        check_same_model_type(args.model, read[1], args.reference, read_reference[1])
        check_full_precision_reference(args.reference, read_reference[1])
    if args.batch_size is not None:
        check_positive("--batch-size", args.batch_size)
    check_positive("--max-length", args.max_length)
    resolve_dataset(args.dataset)
    with torch_threads(args.threads):
        return _evaluate(args, read, read_reference)


def _evaluate(
    args: argparse.Namespace, read: tuple[str, dict[str, Any]], read_reference: tuple[str, dict[str, Any]] | None
) -> int:
    from ..evaluation import pick_column

    spec = inspect_model(args.model, read)
    reference = inspect_model(args.reference, read_reference) if read_reference is not None else None
    metric = _metric_for(spec)
    if reference is not None:
        check_same_kind(spec, reference)
    if metric == "embedding cosine" and reference is None:
        raise CLIError(
            f"{spec.display_name} is a text encoder: its embedding cosine needs --reference FP_MODEL "
            "(the full-precision model to compare with)"
        )
    dataset = limited(open_dataset(args.dataset, args.split, EVALUATION_SPLIT), args.limit)
    column = pick_column(dataset, args.column, "image" if metric == "top-1" else "text")
    kind = check_data_kind(spec, dataset, column)  # first: text given to an image model is the mistake to name
    if metric == "top-1":
        check_labels(spec, dataset, pick_column(dataset, args.label_column, "label"))
    processor = load_processor(spec.location, spec.inputs)  # a missing one is named before any weight loads
    texts = None
    if metric != "top-1":  # written out now: a chat template that refuses the data is named before the weights load
        texts = column_texts(dataset, column, _chat_renderer(processor) if kind == "chat" else None)

    model = load_model(spec)
    reference_model = load_model(reference) if reference is not None else None
    if metric == "top-1":
        _evaluate_top1(args, spec, processor, model, reference_model, dataset, column)
    elif metric == "perplexity":
        _evaluate_perplexity(args, spec, processor, model, reference, reference_model, texts)
    else:
        _evaluate_cosine(args, spec, processor, model, reference, reference_model, texts)
    return EXIT_OK


def check_data_kind(spec: ModelSpec, dataset: Any, column: str) -> str | None:
    """Images for an image model, text (or chat conversations, written out as text) for a text model: one
    line before any weight loads.  Returns what the column holds (``None``: only blank values seen)."""
    from ..calibration.data import column_kind, fed_as

    kind = column_kind(dataset, column)
    if kind is not None and fed_as(kind) != spec.inputs:
        raise CLIError(
            f"--dataset column {column!r} holds {kind}, but {spec.display_name} ({spec.architecture}) takes "
            f"{spec.inputs}; pass {spec.inputs} (name the column with --column)"
        )
    return kind


def _chat_renderer(processor: Any) -> Any:
    """Conversations written out by the tokenizer's chat template, as calibration writes them."""
    from ..calibration.data import chat_renderer

    try:
        return chat_renderer(processor, "evaluation")
    except ValueError as error:
        raise CLIError(str(error)) from None


def check_labels(spec: ModelSpec, dataset: Any, label_column: str, rows: int = 64) -> None:
    """The first ``rows`` labels are class ids of the model (one line before any weight loads)."""
    import itertools

    from ..evaluation import class_ids

    classes = _config_value(spec.config, "num_labels")
    first = itertools.islice(iter(dataset.select_columns([label_column])), rows)  # images left undecoded
    labels = [example[label_column] for example in first]
    try:
        class_ids(labels, label_column, classes or 0, check_range=bool(classes))
    except ValueError as error:
        raise CLIError(str(error)) from None


_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_labels", "num_channels", "image_size")


def check_full_precision_reference(reference: str, reference_config: dict[str, Any]) -> None:
    """``--reference`` is meant to be the full-precision model: a quantized one there (the arguments
    swapped, most likely) prints its ratios against that model, so say so first."""
    stored = reference_config.get("quantization_config")
    if isinstance(stored, dict) and stored.get("quant_method"):
        print(
            f"note: --reference {reference} is a quantized checkpoint ({stored['quant_method']}): the differences "
            "below are against it, not against full precision (the full-precision original goes in --reference)",
            file=sys.stderr,
        )


def check_same_model_type(name: str, config: dict[str, Any], reference: str, reference_config: dict[str, Any]) -> None:
    """A quick first check of ``--reference`` from the two config.json files alone (no torch needed)."""
    mine, theirs = config.get("model_type"), reference_config.get("model_type")
    if mine and theirs and mine != theirs:
        raise CLIError(
            f"--reference {reference} is a {theirs!r} model and {name} a {mine!r} model; "
            "pass the full-precision original of the evaluated model"
        )


def check_same_kind(spec: ModelSpec, reference: ModelSpec) -> None:
    """``--reference`` must be the same kind of model (task, inputs, sizes): comparing others means nothing."""
    problems = []
    if (reference.task, reference.inputs) != (spec.task, spec.inputs):
        problems.append(f"it is a {reference.task.name} on {reference.inputs}, not a {spec.task.name} on {spec.inputs}")
    for key in _SHAPE_KEYS:
        mine, theirs = _config_value(spec.config, key), _config_value(reference.config, key)
        if mine is not None and theirs is not None and mine != theirs:
            problems.append(f"{key} {theirs} vs {mine}")
    if problems:
        raise CLIError(
            f"--reference {reference.display_name} ({reference.architecture}) is not the same kind of model as "
            f"{spec.display_name} ({spec.architecture}): {'; '.join(problems)}; pass the full-precision original"
        )


def _config_value(config: dict[str, Any], key: str) -> Any:
    if key == "num_labels" and isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return config.get(key)


def _metric_for(spec: ModelSpec) -> str:
    if spec.task is SEQ2SEQ_LM:
        raise CLIError(
            f"cannot evaluate {spec.architecture}: hf-comq evaluate measures image classifiers (top-1), "
            "causal LMs (perplexity) and text encoders (embedding cosine), not sequence-to-sequence LMs"
        )
    if spec.task.name == "image classification":
        return "top-1"
    if spec.task.name == "causal LM":
        return "perplexity"
    if spec.inputs == "text":
        return "embedding cosine"
    raise CLIError(
        f"cannot evaluate {spec.architecture}: hf-comq evaluate measures image classifiers (top-1), "
        "causal LMs (perplexity) and text encoders (embedding cosine)"
    )


def _evaluate_top1(
    args: argparse.Namespace, spec: ModelSpec, processor: Any, model: Any, reference: Any, dataset: Any, column: str
) -> None:
    from ..evaluation import top1

    kwargs = {"image_column": column, "label_column": args.label_column, "batch_size": args.batch_size or 64}
    result = top1(model, dataset, processor, **kwargs)
    score = result.accuracy
    print(f"top-1 accuracy of {spec.display_name}: {score:.4f} on {result.total} images")
    if reference is not None:
        baseline = top1(reference, dataset, processor, **kwargs).accuracy
        print(f"top-1 accuracy of the reference: {baseline:.4f} (difference {100 * (score - baseline):+.2f} points)")


def _evaluate_perplexity(
    args: argparse.Namespace,
    spec: ModelSpec,
    tokenizer: Any,
    model: Any,
    reference: ModelSpec | None,
    reference_model: Any,
    texts: list[str],
) -> None:
    from ..evaluation import perplexity

    kwargs = {"max_length": args.max_length, "batch_size": args.batch_size or 8}
    score = perplexity(model, tokenizer, texts, **kwargs)
    print(f"perplexity of {spec.display_name}: {score:.4f} on {len(texts)} texts")
    if reference_model is not None:
        baseline = perplexity(reference_model, tokenizer, texts, **kwargs)
        print(f"perplexity of the reference {reference.display_name}: {baseline:.4f} ({score / baseline:.3f}x)")


def _evaluate_cosine(
    args: argparse.Namespace,
    spec: ModelSpec,
    tokenizer: Any,
    model: Any,
    reference: ModelSpec,
    reference_model: Any,
    texts: list[str],
) -> None:
    from ..evaluation import embedding_cosine

    score = embedding_cosine(
        model, reference_model, tokenizer, texts, batch_size=args.batch_size or 32, max_length=args.max_length
    )
    print(f"embedding cosine of {spec.display_name} to {reference.display_name}: {score:.6f} on {len(texts)} texts")
