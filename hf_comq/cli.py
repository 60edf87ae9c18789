"""``hf-comq``: quantize, evaluate and demo COMQ from the command line.

Why a CLI: the Python API (``from_pretrained(..., quantization_config=COMQConfig(...))``)
is the integration point, but most people first want to *see* what COMQ does to a
model they have, without writing a script.  Three sub-commands cover that:

* ``quantize``: load a full-precision checkpoint with the right Auto class,
  calibrate and quantize it, save it (atomically) and optionally push it.
* ``evaluate``: the metric that fits the model: top-1 accuracy for image
  classifiers, perplexity for causal LMs, embedding cosine to a reference model
  for text encoders.
* ``demo``: the download-free first run on the shipped Fashion-MNIST ViT,
  comparing FP, COMQ and round-to-nearest at 4 and 3 bits.

Errors a user can fix (a missing path, an unknown column, an unsupported model)
end the program with exit code 1 and one line on stderr; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

PROG = "hf-comq"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEMO_OUTPUT = Path("comq-demo")
DEMO_PREFIX = "demo:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_DATA_SUFFIXES = (".parquet", ".json", ".jsonl", ".csv", ".arrow", ".txt")


class CLIError(Exception):
    """A problem the user can fix; reported as one line, without a traceback."""


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-comq`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code.

    Never raises for user errors, so it can be called in-process by tests and
    scripts: argparse's own exits become return codes too.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error argparse already printed
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    if args.handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        with _torch_threads(args.threads):
            return args.handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if args.debug:
            raise
        print(f"{PROG}: error: {_error_line(error)}", file=sys.stderr)
        return EXIT_ERROR


@contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """Use ``count`` torch threads for one command, then restore (``main`` may run in-process)."""
    if count is None:
        yield
        return
    _check_positive("--threads", count)
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _error_line(error: BaseException) -> str:
    """The error as one line; types users cannot act on keep their name and point at ``--debug``."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (CLIError, ValueError, OSError)):
        return text
    return f"{type(error).__name__}: {text} (rerun with --debug for the traceback)"


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-comq`` argument parser (exposed for documentation tools and tests)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "COMQ post-training quantization for Hugging Face Transformers models: quantize a checkpoint, "
            "evaluate it, or run the built-in demo."
        ),
        epilog=(
            "examples:\n"
            "  hf-comq demo\n"
            "  hf-comq quantize google/vit-base-patch16-224 --bits 4 --dataset imagenet-1k --split validation \\\n"
            "      --num-samples 128 --output vit-comq-w4\n"
            "  hf-comq evaluate vit-comq-w4 --dataset imagenet-1k --split validation --limit 2000\n"
            "\nRun 'hf-comq COMMAND --help' for the options of a command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=None, debug=False, threads=None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_quantize(commands)
    _add_evaluate(commands)
    _add_demo(commands)
    return parser


def _command(
    commands: Any, name: str, summary: str, description: str, threads: int | None = None
) -> argparse.ArgumentParser:
    command = commands.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    command.add_argument("--debug", action="store_true", help="show the full traceback when something fails")
    command.add_argument(
        "--threads", type=int, default=threads, metavar="N",
        help=(
            f"CPU threads for torch (default: {threads or 'torch default'}); small models run fastest on one, "
            "and several are many times slower on a busy machine"
        ),
    )  # fmt: skip
    return command


def _add_quantize(commands: Any) -> None:
    command = _command(
        commands,
        "quantize",
        "quantize a full-precision checkpoint with COMQ and save it",
        "Load MODEL (a local folder or a Hub id) with the Auto class its config.json names, calibrate it on\n"
        "--dataset, quantize its linear layers with COMQ, and save the quantized checkpoint (with the model's\n"
        "processor or tokenizer and a model card) to --output.  Nothing is left at --output if a step fails.\n"
        "Supported: image classification, sequence and token classification, causal and masked LMs, and base\n"
        "models, calibrated on images or text.",
    )
    command.add_argument("model", metavar="MODEL", help="local checkpoint folder or Hugging Face Hub model id")
    group = command.add_argument_group("quantization")
    group.add_argument("--bits", type=int, default=4, metavar="B", help="weight bits, 2 to 8 (default: 4)")
    group.add_argument(
        "--group-size", type=int, default=None, metavar="N",
        help="input columns per scale; default: one scale per output channel",
    )  # fmt: skip
    group.add_argument(
        "--rtn", action="store_true",
        help="round-to-nearest baseline instead of COMQ (same pipeline, no coordinate descent)",
    )  # fmt: skip
    _add_data_arguments(command, default_split="train", role="calibration")
    group.add_argument("--num-samples", type=int, default=128, metavar="N", help="calibration samples (default: 128)")
    group.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="samples per calibration forward pass (default: 8)"
    )
    group.add_argument(
        "--max-length", type=int, default=512, metavar="N", help="text truncation length in tokens (default: 512)"
    )
    group.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of the calibration sample choice (default: 0)"
    )
    output = command.add_argument_group("output")
    output.add_argument("--output", "-o", required=True, metavar="DIR", help="folder to write the checkpoint to")
    output.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    output.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the checkpoint to this Hub repository")
    output.add_argument("--private", action="store_true", help="create the Hub repository as private")
    output.add_argument(
        "--device-map", metavar="MAP",
        help="passed to from_pretrained, e.g. 'auto' to spread a large model over GPUs and CPU memory",
    )  # fmt: skip
    command.set_defaults(handler=run_quantize)


def _add_evaluate(commands: Any) -> None:
    command = _command(
        commands,
        "evaluate",
        "measure a (quantized) model: top-1, perplexity or embedding cosine",
        "Evaluate MODEL (a COMQ checkpoint or any full-precision checkpoint) on --dataset with the metric that\n"
        "fits it:\n"
        "  image classification  top-1 accuracy (column --column, labels --label-column)\n"
        "  causal LM             perplexity of the texts in --column\n"
        "  text encoder          mean cosine of mean-pooled embeddings to --reference (required)\n"
        "With --reference, the full-precision model is evaluated too and the difference is shown.",
    )
    command.add_argument("model", metavar="MODEL", help="checkpoint folder or Hub id to evaluate")
    _add_data_arguments(command, default_split="test", role="evaluation")
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
    command.add_argument(
        "--max-length", type=int, default=512, metavar="N", help="text truncation length in tokens (default: 512)"
    )
    command.set_defaults(handler=run_evaluate)


def _add_demo(commands: Any) -> None:
    command = _command(
        commands,
        "demo",
        "quantize the shipped Fashion-MNIST ViT and compare FP, COMQ and RTN",
        "The first run, with no download: quantize the small ViT shipped with hf_comq (trained on\n"
        "Fashion-MNIST) with COMQ and with round-to-nearest (RTN) at each --bits, on the shipped calibration\n"
        "images, and print top-1 accuracy on the shipped test images, quantization time and checkpoint size\n"
        "next to the full-precision model.  The COMQ checkpoints are saved under --output.",
        threads=1,
    )
    command.add_argument(
        "--output", "-o", type=Path, default=DEMO_OUTPUT, metavar="DIR",
        help=f"where to save the COMQ checkpoints (default: ./{DEMO_OUTPUT})",
    )  # fmt: skip
    command.add_argument(
        "--bits", type=int, nargs="+", default=[4, 3], metavar="B", help="bit widths to run (default: 4 3)"
    )
    command.add_argument("--group-size", type=int, default=None, metavar="N", help="input columns per scale")
    command.add_argument(
        "--num-samples", type=int, default=256, metavar="N", help="calibration images (default: 256 of 1024)"
    )
    command.add_argument(
        "--eval-limit", type=int, default=None, metavar="N",
        help="evaluate on a seeded random N of the 2000 test images (default: all)",
    )  # fmt: skip
    command.set_defaults(handler=run_demo)


def _add_data_arguments(command: argparse.ArgumentParser, default_split: str, role: str) -> None:
    group = command.add_argument_group(f"{role} data")
    group.add_argument(
        "--dataset", required=True, metavar="NAME_OR_PATH",
        help=(
            "Hub dataset name, local data file (parquet/json/csv/arrow/txt) or save_to_disk folder; "
            "'demo:calibration' and 'demo:test' name the shipped Fashion-MNIST subset"
        ),
    )  # fmt: skip
    group.add_argument("--split", default=default_split, help=f"dataset split (default: {default_split})")
    group.add_argument(
        "--column", default=None,
        help="column with the images or texts (default: image/img/pixel_values, else text)",
    )  # fmt: skip


# ---------------------------------------------------------------------------
# Models: locate, classify, load
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A model family the CLI handles: how to load it and what it consumes."""

    name: str
    auto_class: str
    mapping: str


TASKS: tuple[Task, ...] = (
    Task("image classification", "AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    Task(
        "sequence classification", "AutoModelForSequenceClassification",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    ),
    Task("token classification", "AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    Task("causal LM", "AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    Task("masked LM", "AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    Task("base model", "AutoModel", "MODEL_MAPPING_NAMES"),
)  # fmt: skip
SUPPORTED = "image classification, sequence/token classification, causal and masked LMs, and base models"


@dataclass(frozen=True)
class ModelSpec:
    """What config.json says about a checkpoint, read before any weight is loaded."""

    location: str
    architecture: str
    task: Task
    inputs: str  # "images" or "text": what calibration and evaluation feed it
    config: dict[str, Any]

    @property
    def is_packed(self) -> bool:
        """A compressed-tensors pack-quantized checkpoint (what hf_comq writes): loaded with its layers packed."""
        from .checkpoint import is_packed_checkpoint

        return is_packed_checkpoint(self.config)

    @property
    def is_local(self) -> bool:
        return Path(self.location).is_dir()

    @property
    def display_name(self) -> str:
        return Path(self.location).name if self.is_local else self.location

    def auto_class(self) -> Any:
        import transformers

        return getattr(transformers, self.task.auto_class)


def inspect_model(name: str) -> ModelSpec:
    """Read ``name``'s config.json and decide how to load it; one clear error when we cannot."""
    location, config = _read_model_config(name)
    architectures = [str(arch) for arch in config.get("architectures") or []]
    model_type = config.get("model_type")
    described = f"model type {model_type!r} ({', '.join(architectures) or 'no architectures in config.json'})"
    if config.get("is_encoder_decoder"):
        raise CLIError(
            f"unsupported {described}: encoder-decoder models are not supported; hf-comq handles {SUPPORTED}"
        )
    task, architecture = _match_task(architectures, model_type)
    if task is None:
        raise CLIError(f"unsupported {described}; hf-comq handles {SUPPORTED}")
    inputs = _model_inputs(architecture)
    if inputs is None:
        raise CLIError(
            f"unsupported {described}: COMQ calibration feeds text or images, and {architecture} takes neither"
        )
    return ModelSpec(location, architecture, task, inputs, config)


def _read_model_config(name: str) -> tuple[str, dict[str, Any]]:
    path = Path(name).expanduser()
    if path.exists():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CLIError(f"{name} is not a model checkpoint folder: it has no config.json")
        try:
            return str(path), json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CLIError(f"cannot read {config_file}: {error}") from None
    if not _looks_like_hub_id(name):
        raise CLIError(f"model path {name} does not exist")
    from transformers import PreTrainedConfig

    try:
        config, _ = PreTrainedConfig.get_config_dict(name)
    except Exception as error:  # network, auth and missing-repo errors all end here
        raise CLIError(f"model {name!r} is not a local folder and could not be read from the Hub: {error}") from None
    return name, config


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith(".") and ".." not in name


def _match_task(architectures: list[str], model_type: str | None) -> tuple[Task | None, str]:
    from transformers.models.auto import modeling_auto

    for architecture in architectures:
        for task in TASKS:
            if architecture in _class_names(getattr(modeling_auto, task.mapping)):
                return task, architecture
    if not architectures and model_type in modeling_auto.MODEL_MAPPING_NAMES:
        names = _class_names({model_type: modeling_auto.MODEL_MAPPING_NAMES[model_type]})
        return TASKS[-1], next(iter(names))
    return None, architectures[0] if architectures else ""


def _class_names(mapping: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (list, tuple)) else (value,))
    return names


def _model_inputs(architecture: str) -> str | None:
    import transformers

    cls = getattr(transformers, architecture, None)
    main_input = getattr(cls, "main_input_name", None)
    return {"pixel_values": "images", "input_ids": "text"}.get(main_input)


def load_model(spec: ModelSpec, **kwargs: Any) -> Any:
    """Load a checkpoint for inference: COMQ checkpoints through the verifying loader."""
    import transformers

    import hf_comq

    if spec.is_packed:
        return hf_comq.load_quantized(spec.location, model_class=getattr(transformers, spec.architecture), **kwargs)
    return spec.auto_class().from_pretrained(spec.location, **kwargs).eval()


def load_processor(location: str, inputs: str) -> Any:
    """The image processor or tokenizer stored with a checkpoint (``ValueError`` if there is none)."""
    from .calibration.data import _load_processor

    return _load_processor(location, inputs)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def resolve_dataset(name: str) -> str:
    """Expand ``demo:SPLIT`` and reject local paths that do not exist (else they'd be tried as Hub names)."""
    if name.startswith(DEMO_PREFIX):
        from .assets import DEMO_SPLITS, demo_dataset_path

        split = name[len(DEMO_PREFIX) :]
        if split not in DEMO_SPLITS:
            choices = ", ".join(DEMO_PREFIX + known for known in DEMO_SPLITS)
            raise CLIError(f"unknown demo dataset {name!r}; use one of {choices}")
        return str(demo_dataset_path(split))
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if path.is_absolute() or name.startswith(".") or path.suffix.lower() in _DATA_SUFFIXES or name.count("/") > 1:
        raise CLIError(f"dataset path {name} does not exist")
    return name


def open_dataset(name: str, split: str) -> Any:
    """Load ``--dataset`` / ``--split`` (streamed where possible), with one-line errors."""
    from .evaluation import load_eval_dataset

    return load_eval_dataset(resolve_dataset(name), split)


def _limited(dataset: Any, limit: int | None) -> Any:
    if limit is None:
        return dataset
    _check_positive("--limit", limit)
    if hasattr(dataset, "select") and hasattr(dataset, "__len__"):
        return dataset.select(range(min(limit, len(dataset))))
    return dataset.take(limit)


def _texts(dataset: Any, column: str) -> list[str]:
    texts = [row[column] for row in dataset.select_columns([column])]
    if not all(isinstance(text, str) for text in texts):
        raise CLIError(f"column {column!r} does not hold text")
    return texts


# ---------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------


def run_quantize(args: argparse.Namespace) -> int:
    """``hf-comq quantize``: checks first (cheap), then load + calibrate, save atomically, push."""
    from .config import COMQConfig
    from .evaluation import pick_column

    spec = inspect_model(args.model)
    if spec.config.get("quantization_config"):
        raise CLIError(f"{args.model} is already quantized; quantize its full-precision original")
    output = Path(args.output).expanduser()
    _check_output(output, args.overwrite)
    dataset = resolve_dataset(args.dataset)
    pick_column(open_dataset(dataset, args.split), args.column, "calibration")
    from .solver import ROUND_TO_NEAREST

    rtn = ROUND_TO_NEAREST if args.rtn else {}
    config = COMQConfig(
        bits=args.bits,
        group_size=args.group_size,
        dataset=dataset,
        dataset_split=args.split,
        dataset_column=args.column,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        **rtn,
    )
    method = "RTN" if args.rtn else "COMQ"
    print(f"Quantizing {spec.display_name} ({spec.architecture}, {spec.task.name}) with {method} at {args.bits} bits")
    load_kwargs = {"device_map": args.device_map} if args.device_map else {}
    started = time.perf_counter()
    model = spec.auto_class().from_pretrained(spec.location, quantization_config=config, **load_kwargs)
    seconds = time.perf_counter() - started
    processor = _optional_processor(spec)

    model_id = args.push_to_hub or output.name
    save_atomically(
        output, lambda folder: _save_with_processor(model, processor, folder, model_id), overwrite=args.overwrite
    )
    summary = getattr(model, "_comq_summary", {}) or {}
    _print_quantize_summary(spec, model, summary, seconds, output)
    if args.push_to_hub:
        _push(output, args.push_to_hub, args.private)
    return EXIT_OK


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output {output} is a file; pass a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise CLIError(
            f"output folder {output} already exists and is not empty; choose another --output or pass --overwrite"
        )


def save_atomically(output: Path, write: Callable[[Path], None], *, overwrite: bool = True) -> None:
    """Run ``write(folder)`` on a temporary folder next to ``output``, then rename it into place.

    A crash or error mid-save leaves ``output`` as it was (absent, or the previous
    checkpoint): a half-written checkpoint that loads partially is worse than none.
    The temporary folder sits in the same parent so the final rename is atomic.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        write(staging)
        if output.exists():
            if any(output.iterdir()) and not overwrite:
                raise CLIError(f"output folder {output} appeared while saving; it was left untouched")
            with _moved_aside(output):
                staging.rename(output)
        else:
            staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _moved_aside(path: Path) -> Iterator[None]:
    """Move ``path`` out of the way; delete it on success, put it back on failure."""
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    aside.rmdir()
    path.rename(aside)
    try:
        yield
    except BaseException:
        if not path.exists():
            aside.rename(path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _save_with_processor(model: Any, processor: Any, folder: Path, model_id: str) -> None:
    """Card, weights and processor into ``folder``; the card names ``model_id`` (the staging folder's name would be wrong)."""
    from .hub import write_model_card

    write_model_card(folder, model, model_id=model_id)
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)


def _optional_processor(spec: ModelSpec) -> Any:
    """The checkpoint's processor, saved next to the quantized weights so the folder is self-contained."""
    try:
        return load_processor(spec.location, spec.inputs)
    except ValueError:
        print(f"note: {spec.display_name} has no processor or tokenizer to save with the checkpoint", file=sys.stderr)
        return None


def _print_quantize_summary(spec: ModelSpec, model: Any, summary: dict, seconds: float, output: Path) -> None:
    from .evaluation import checkpoint_size_bytes

    config = model.config.quantization_config
    grid = f"group size {config.group_size}" if config.group_size else "per-channel scales"
    error = summary.get("mean_relative_error")
    size = checkpoint_size_bytes(output)
    size_text = _megabytes(size)
    if spec.is_local:
        try:
            original = checkpoint_size_bytes(spec.location)
            size_text += f" ({size / original:.2f}x of {_megabytes(original)} full precision)"
        except FileNotFoundError:
            pass
    rows = [
        ("bits", f"{config.bits} ({grid})"),
        ("layers quantized", f"{summary.get('layers_quantized', '?')}"
         + (f", mean relative error {error:.4g}" if isinstance(error, float) else "")),
        ("calibration", config.calibration_description or "?"),
        ("time", f"{seconds:.1f} s (loading and calibration)"),
        ("checkpoint", size_text),
        ("saved to", str(output)),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def _push(output: Path, repo_id: str, private: bool) -> None:
    """Publish the finished folder (weights, processor, card) as it is, in one commit."""
    from .hub import push_folder

    try:
        push_folder(output, repo_id, private=private)
    except Exception as error:
        raise CLIError(f"saved to {output}, but pushing to the Hub repository {repo_id!r} failed: {error}") from None
    print(f"  pushed to        https://huggingface.co/{repo_id}")


# ---------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------


def run_evaluate(args: argparse.Namespace) -> int:
    """``hf-comq evaluate``: pick the metric from the model type, check the data, then load and measure."""
    from .evaluation import pick_column

    spec = inspect_model(args.model)
    reference = inspect_model(args.reference) if args.reference else None
    metric = _metric_for(spec)
    if metric == "embedding cosine" and reference is None:
        raise CLIError(
            f"{spec.display_name} is a text encoder: its embedding cosine needs --reference FP_MODEL "
            "(the full-precision model to compare with)"
        )
    if args.batch_size is not None:
        _check_positive("--batch-size", args.batch_size)
    dataset = _limited(open_dataset(args.dataset, args.split), args.limit)
    if metric == "top-1":
        column = pick_column(dataset, args.column, "image")
        pick_column(dataset, args.label_column, "label")
    else:
        column = pick_column(dataset, args.column, "text")

    model = load_model(spec)
    reference_model = load_model(reference) if reference is not None else None
    if metric == "top-1":
        _evaluate_top1(args, spec, model, reference_model, dataset, column)
    elif metric == "perplexity":
        _evaluate_perplexity(args, spec, model, reference, reference_model, _texts(dataset, column))
    else:
        _evaluate_cosine(args, spec, model, reference, reference_model, _texts(dataset, column))
    return EXIT_OK


def _metric_for(spec: ModelSpec) -> str:
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
    args: argparse.Namespace, spec: ModelSpec, model: Any, reference: Any, dataset: Any, column: str
) -> None:
    from .evaluation import top1_counts

    processor = load_processor(spec.location, "images")
    kwargs = {"image_column": column, "label_column": args.label_column, "batch_size": args.batch_size or 64}
    correct, total = top1_counts(model, dataset, processor, **kwargs)
    score = correct / total
    print(f"top-1 accuracy of {spec.display_name}: {score:.4f} on {total} images")
    if reference is not None:
        correct, total = top1_counts(reference, dataset, processor, **kwargs)
        baseline = correct / total
        print(f"top-1 accuracy of the reference: {baseline:.4f} (difference {100 * (score - baseline):+.2f} points)")


def _evaluate_perplexity(
    args: argparse.Namespace,
    spec: ModelSpec,
    model: Any,
    reference: ModelSpec | None,
    reference_model: Any,
    texts: list[str],
) -> None:
    from .evaluation import perplexity

    tokenizer = load_processor(spec.location, "text")
    kwargs = {"max_length": args.max_length, "batch_size": args.batch_size or 8}
    score = perplexity(model, tokenizer, texts, **kwargs)
    print(f"perplexity of {spec.display_name}: {score:.4f} on {len(texts)} texts")
    if reference_model is not None:
        baseline = perplexity(reference_model, tokenizer, texts, **kwargs)
        print(f"perplexity of the reference {reference.display_name}: {baseline:.4f} ({score / baseline:.3f}x)")


def _evaluate_cosine(
    args: argparse.Namespace, spec: ModelSpec, model: Any, reference: ModelSpec, reference_model: Any, texts: list[str]
) -> None:
    from .evaluation import embedding_cosine

    tokenizer = load_processor(spec.location, "text")
    score = embedding_cosine(
        model, reference_model, tokenizer, texts, batch_size=args.batch_size or 32, max_length=args.max_length
    )
    print(f"embedding cosine of {spec.display_name} to {reference.display_name}: {score:.6f} on {len(texts)} texts")


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------


@dataclass
class DemoRow:
    method: str
    bits: int | None
    top1: float
    seconds: float | None
    size: int | None


def run_demo(args: argparse.Namespace) -> int:
    """``hf-comq demo``: FP vs COMQ vs RTN on the shipped ViT and Fashion-MNIST subset."""
    import torch
    from transformers import AutoImageProcessor, ViTForImageClassification

    from .assets import demo_dataset, demo_model_path
    from .config import COMQConfig
    from .evaluation import checkpoint_size_bytes, top1_accuracy
    from .hub import attach_model_card_hook
    from .solver import ROUND_TO_NEAREST

    for bits in args.bits:
        COMQConfig(bits=bits, group_size=args.group_size)  # reject bad settings before any work
    _check_positive("--num-samples", args.num_samples)
    model_path = demo_model_path()
    processor = AutoImageProcessor.from_pretrained(model_path)
    calibration = demo_dataset("calibration")
    test = demo_dataset("test")
    if args.eval_limit is not None:
        _check_positive("--eval-limit", args.eval_limit)
        test = test.shuffle(seed=0).select(range(min(args.eval_limit, len(test))))
    output = Path(args.output).expanduser()
    threads = torch.get_num_threads()
    device = "GPU" if torch.cuda.is_available() else f"CPU, {threads} thread{'s' if threads > 1 else ''}"
    print(
        f"hf-comq demo: ViT trained on Fashion-MNIST ({model_path.name}); calibration on "
        f"{min(args.num_samples, len(calibration))} images, top-1 on {len(test)} test images ({device})"
    )

    fp_model = ViTForImageClassification.from_pretrained(model_path).eval()
    fp_size = checkpoint_size_bytes(model_path)
    rows = [DemoRow("FP32", None, top1_accuracy(fp_model, test, processor), None, fp_size)]
    del fp_model
    saved: list[Path] = []
    for bits in args.bits:
        results: dict[str, tuple[Any, float]] = {}
        for method, extra in (
            ("COMQ", {}),
            ("RTN", ROUND_TO_NEAREST),
        ):
            config = COMQConfig(
                bits=bits, group_size=args.group_size, dataset=calibration, num_samples=args.num_samples, **extra
            )
            started = time.perf_counter()
            model = ViTForImageClassification.from_pretrained(model_path, quantization_config=config).eval()
            results[method] = (model, time.perf_counter() - started)
        scores = {method: top1_accuracy(model, test, processor) for method, (model, _) in results.items()}
        comq_model = results["COMQ"][0]
        attach_model_card_hook(
            comq_model,
            metrics={
                f"top-1, Fashion-MNIST test subset ({len(test)} images)": {
                    "fp32": round(rows[0].top1, 4), f"comq w{bits}": round(scores["COMQ"], 4),
                    f"rtn w{bits}": round(scores["RTN"], 4),
                }  # fmt: skip
            },
        )
        suffix = "" if args.group_size is None else f"-g{args.group_size}"
        folder = output / f"{model_path.name}-comq-w{bits}{suffix}"
        save_atomically(folder, lambda staging: _save_with_processor(comq_model, processor, staging, folder.name))
        size = checkpoint_size_bytes(folder)
        saved.append(folder)
        for method, (model, seconds) in results.items():
            rows.append(DemoRow(method, bits, scores[method], seconds, size))
        del results, comq_model
    print(format_demo_table(rows))
    for folder in saved:
        print(f"saved {folder}")
    if saved:
        print(f"evaluate one again with: hf-comq evaluate {saved[0]} --dataset demo:test")
    return EXIT_OK


def format_demo_table(rows: list[DemoRow]) -> str:
    """The demo's result table: one row per model, differences and ratios against the FP row."""
    fp = rows[0]
    header = ("method", "bits", "top-1", "vs FP", "quant time", "size", "size vs FP")
    lines = [header]
    for row in rows:
        is_fp = row is fp
        lines.append(
            (
                row.method,
                "32" if row.bits is None else str(row.bits),
                f"{row.top1:.4f}",
                "" if is_fp else f"{100 * (row.top1 - fp.top1):+.2f} pt",
                "" if row.seconds is None else f"{row.seconds:.1f} s",
                "" if row.size is None else _megabytes(row.size),
                "" if is_fp or row.size is None or fp.size is None else f"{row.size / fp.size:.2f}x",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    rendered.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(rendered)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def _check_positive(option: str, value: int) -> None:
    if value < 1:
        raise CLIError(f"{option} must be a positive integer, got {value}")


if __name__ == "__main__":
    sys.exit(main())
