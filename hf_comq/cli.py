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
  comparing FP, COMQ and round-to-nearest at 4, 3 and 2 bits: top-1 and fidelity
  to the full-precision model.

Errors a user can fix (a missing path, an unknown column, an unsupported model)
end the program with exit code 1 and one line on stderr; ``--debug`` shows the
traceback instead.  Everything that can be checked without the model (output
folder, Hub repository id, data paths, Hub availability) is checked first, and
nothing heavy is imported before the arguments are parsed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import secrets
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
        if args.threads is not None:
            _check_positive("--threads", args.threads)
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
def torch_threads(count: int | None) -> Iterator[None]:
    """The heavy part of a command: ``count`` torch threads allowed (default: torch's), restored after.

    Entered after the cheap checks (importing torch takes seconds).  The work runs
    inside :func:`hf_comq.threads.single_thread`: loading, saving and small layers on
    one thread, large GEMMs on the allowed count (see :mod:`hf_comq.threads`);
    ``main`` may run in-process, hence the restore.
    """
    import torch

    from .threads import single_thread

    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        with single_thread():
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


def _command(commands: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    command = commands.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    command.add_argument("--debug", action="store_true", help="show the full traceback when something fails")
    command.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help=(
            "most CPU threads torch may use (default: torch's default, one per core); hf-comq runs small work on "
            "one thread whatever this says, because a thread pool makes it many times slower on a busy machine, "
            "and gives large layers these threads"
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
    output.add_argument(
        "--overwrite", action="store_true",
        help=(
            "replace --output when it holds a checkpoint an earlier hf-comq run wrote (the whole folder is "
            "replaced); a folder holding anything else is refused, never emptied"
        ),
    )  # fmt: skip
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
        "images, and compare each with the full-precision model on the shipped test images: top-1 accuracy,\n"
        "and how faithfully it reproduces the full-precision model (top-1 agreement and KL divergence of the\n"
        "class probabilities), which shows the quantization error before it costs accuracy.  A top-1\n"
        "difference between COMQ and RTN that chance explains (McNemar's exact test on the images only one\n"
        "of them gets right) is reported as such, not as a ranking.  The COMQ checkpoints are saved under\n"
        "--output.",
    )
    command.add_argument(
        "--output", "-o", type=Path, default=DEMO_OUTPUT, metavar="DIR",
        help=f"where to save the COMQ checkpoints (default: ./{DEMO_OUTPUT})",
    )  # fmt: skip
    command.add_argument(
        "--overwrite", action="store_true",
        help="replace checkpoints an earlier demo saved under --output (otherwise they are kept and the demo stops)",
    )  # fmt: skip
    command.add_argument(
        "--bits", type=int, nargs="+", default=[4, 3, 2], metavar="B", help="bit widths to run (default: 4 3 2)"
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


def inspect_model(name: str, read: tuple[str, dict[str, Any]] | None = None) -> ModelSpec:
    """Read ``name``'s config.json (unless ``read`` holds it) and decide how to load it; one clear error when we cannot."""
    location, config = read if read is not None else read_model_config(name)
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


def read_model_config(name: str) -> tuple[str, dict[str, Any]]:
    """``(location, config.json)`` of a local folder or Hub id, without importing torch or transformers."""
    path = Path(name).expanduser()
    if path.exists():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CLIError(f"{name} is not a model checkpoint folder: it has no config.json")
        try:
            return str(path), json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CLIError(f"cannot read {config_file}: {error}") from None
    if not _is_repo_id(name):
        raise CLIError(f"model path {name} does not exist")
    check_hub_available(name, "model", cached_file="config.json")
    from transformers import PreTrainedConfig

    try:
        config, _ = PreTrainedConfig.get_config_dict(name)
    except Exception as error:  # network, auth and missing-repo errors all end here
        raise CLIError(f"model {name!r} is not a local folder and could not be read from the Hub: {error}") from None
    return name, config


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_hub_available(name: str, what: str, cached_file: str | None = None) -> None:
    """Fail at once when ``name``, not a local path, would have to come from a Hub that is off or unreachable.

    The Hub client would otherwise retry for half a minute before saying the same.
    A model whose ``cached_file`` is in the local Hub cache passes: transformers can
    load it from there.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    problem = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else _hub_unreachable(constants.ENDPOINT)
    if problem is None:
        return
    if cached_file is not None and isinstance(try_to_load_from_cache(name, cached_file), str):
        return
    hint = "; a single word is taken as a Hub id: if it is meant as a local path, check it" if "/" not in name else ""
    raise CLIError(f"{what} {name!r} is not a local path, and the Hugging Face Hub is unavailable ({problem}){hint}")


@functools.lru_cache(maxsize=None)
def _hub_unreachable(endpoint: str) -> str | None:
    """Why the Hub at ``endpoint`` cannot be reached, or ``None`` (also when a proxy makes that undecidable here)."""
    import socket
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlsplit(endpoint)
    if not url.hostname or urllib.request.getproxies():
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=2.0).close()
    except OSError as error:
        return f"cannot connect to {url.hostname}: {error.strerror or error}"
    return None


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
    """The image processor or tokenizer stored with a checkpoint; one clear line, naming the fix, if there is none."""
    from .calibration.data import load_processor as load

    try:
        return load(location, inputs)
    except ValueError:
        kind, loader = ("image processor", "AutoImageProcessor") if inputs == "images" else ("tokenizer", "AutoTokenizer")
        raise CLIError(
            f"{location} has no {kind}; save the original model's one next to the weights: "
            f"{loader}.from_pretrained(ORIGINAL).save_pretrained({str(location)!r})"
        ) from None


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def resolve_dataset(name: str) -> str:
    """Check a ``--dataset`` before any work: a ``demo:`` name, an existing local path, or a Hub name the Hub can serve."""
    from .assets import demo_dataset_file

    if demo_dataset_file(name) is not None:
        return name
    path = Path(name).expanduser()
    if path.exists():
        _check_not_empty(path, name)
        return str(path)
    if path.is_absolute() or name.startswith(".") or path.suffix.lower() in _DATA_SUFFIXES or name.count("/") > 1:
        raise CLIError(f"dataset path {name} does not exist")
    check_hub_available(name, "dataset")
    return name


def _check_not_empty(path: Path, name: str) -> None:
    """Empty data files, found from their size or parquet footer before anything heavy is imported."""
    if not path.is_file():
        return
    if path.stat().st_size == 0:
        raise CLIError(f"dataset file {name!r} is empty (0 bytes); pass a file with data")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as parquet

        try:
            rows = parquet.read_metadata(path).num_rows
        except Exception as error:  # pyarrow raises its own types for files that are not parquet
            raise CLIError(f"dataset file {name!r} is not a readable parquet file: {error}") from None
        if rows == 0:
            raise CLIError(f"dataset file {name!r} has no rows; pass data with at least one sample")


def open_dataset(name: str, split: str) -> Any:
    """Load ``--dataset`` / ``--split`` (streamed where possible), with one-line errors; empty data is one of them."""
    from .evaluation import load_eval_dataset

    dataset = load_eval_dataset(resolve_dataset(name), split)
    try:
        empty = len(dataset) == 0
    except TypeError:  # streamed: look at one row
        empty = next(iter(dataset.take(1)), None) is None
    if empty:
        raise CLIError(f"--dataset {name} has no rows in split {split!r}; pass data with at least one sample")
    return dataset


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
    """``hf-comq quantize``: every check that needs no model first, then load + calibrate, save atomically, push."""
    output = Path(args.output).expanduser()
    check_output(output, args.overwrite, source=args.model)
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)
    read = read_model_config(args.model)
    if read[1].get("quantization_config"):
        raise CLIError(f"{args.model} is already quantized; quantize its full-precision original")
    dataset = resolve_dataset(args.dataset)
    with torch_threads(args.threads):
        return _quantize(args, output, read, dataset)


def _quantize(args: argparse.Namespace, output: Path, read: tuple[str, dict[str, Any]], dataset: str) -> int:
    spec = inspect_model(args.model, read)

    from .config import COMQConfig
    from .evaluation import pick_column
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
    pick_column(open_dataset(dataset, args.split), args.column, "calibration")
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


def check_output(output: Path, overwrite: bool, source: str | None = None) -> None:
    """Everything about ``--output`` that can be checked before any work; one clear error otherwise.

    ``source`` is the local folder being quantized, which the output must not replace.
    """
    for note in recover_interrupted_save(output):
        print(f"note: {note}", file=sys.stderr)
    resolved = output.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise CLIError(
            f"--output {output} is the current folder or one above it, which cannot be replaced; "
            "name a new folder, e.g. --output ./quantized"
        )
    if source is not None and Path(source).is_dir():
        original = Path(source).resolve()
        if resolved == original or resolved in original.parents:
            raise CLIError(f"--output {output} would replace the model being quantized ({source}); choose another folder")
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output {output} is a file; pass a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise CLIError(
                f"output folder {output} already exists and is not empty; choose another --output or pass --overwrite"
            )
        if not is_comq_checkpoint_folder(output):
            listed = ", ".join(sorted(entry.name for entry in output.iterdir())[:5])
            raise CLIError(
                f"--overwrite only replaces a checkpoint hf-comq wrote, and {output} holds other files ({listed}); "
                "choose another --output, or empty the folder yourself"
            )
    _check_writable(output)


def is_comq_checkpoint_folder(folder: Path) -> bool:
    """True for a folder an hf_comq save wrote: its config.json records the COMQ settings."""
    from .checkpoint import PROVENANCE_KEY, is_packed_checkpoint

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return is_packed_checkpoint(config) and isinstance(config["quantization_config"].get(PROVENANCE_KEY), dict)


def _check_writable(output: Path) -> None:
    """Create and remove a folder where the save will create its staging folder (parents may not exist yet)."""
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        probe = Path(tempfile.mkdtemp(prefix=f".{output.name}.probe-", dir=parent))
        probe.rmdir()
    except OSError as error:
        raise CLIError(f"cannot write the output folder {output}: {parent} is not writable ({error.strerror or error})")


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _sibling(output: Path, kind: str) -> Path:
    """A hidden neighbour of ``output`` named so that :func:`recover_interrupted_save` can tell it is ours."""
    return output.parent / f".{output.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def recover_interrupted_save(output: Path) -> list[str]:
    """Undo what a killed :func:`save_atomically` left next to ``output``; returns one note per action.

    Only hidden folders named by :func:`_sibling` whose process is gone are touched: a
    ``.NAME.old-*`` folder is the previous checkpoint, put back when ``output`` is
    missing (the kill fell between the two renames of the swap) and deleted otherwise;
    a ``.NAME.partial-*`` folder is an unfinished save and is deleted.
    """
    output = Path(output)
    if not output.parent.is_dir():
        return []
    notes = []
    leftovers = sorted(
        (entry for entry in output.parent.iterdir() if entry.is_dir() and (match := _LEFTOVER.match(entry.name))
         and match["name"] == output.name and not _process_alive(int(match["pid"]))),
        key=lambda entry: _LEFTOVER.match(entry.name)["kind"] != "old",  # restore before deleting
    )  # fmt: skip
    for entry in leftovers:
        if _LEFTOVER.match(entry.name)["kind"] == "old" and not output.exists():
            entry.rename(output)
            notes.append(f"restored {output} from a save that was interrupted")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            notes.append(f"removed {entry.name}, left by a save that was interrupted")
    return notes


def save_atomically(output: Path, write: Callable[[Path], None], *, overwrite: bool = True) -> None:
    """Run ``write(folder)`` on a hidden folder next to ``output``, then swap it into place.

    A crash or error mid-save leaves ``output`` as it was (absent, or the previous
    checkpoint): a half-written checkpoint that loads partially is worse than none.
    The staging folder sits in the same parent so the renames are atomic.  Replacing
    an existing ``output`` takes two renames (old aside, new in); if the process is
    killed between them, the next save or ``hf-comq`` run on the same output puts the
    old one back (:func:`recover_interrupted_save`).  Folders get the permissions of
    the user's umask, as ``save_pretrained``'s do.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for note in recover_interrupted_save(output):
        print(f"note: {note}", file=sys.stderr)
    staging = _sibling(output, "partial")
    staging.mkdir()
    try:
        write(staging)
        if not output.exists():
            staging.rename(output)
            return
        if any(output.iterdir()) and not overwrite:
            raise CLIError(f"output folder {output} appeared while saving; it was left untouched")
        aside = _sibling(output, "old")
        output.rename(aside)
        try:
            staging.rename(output)
        except BaseException:
            aside.rename(output)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


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
    except CLIError:
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


def check_repo_id(repo_id: str) -> None:
    """huggingface_hub's own rules for a repository id, checked before any work."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise CLIError(f"--push-to-hub {repo_id!r} is not a valid Hub repository id: {error}") from None


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
    read = read_model_config(args.model)
    read_reference = read_model_config(args.reference) if args.reference else None
    if read_reference is not None:
        check_same_model_type(args.model, read[1], args.reference, read_reference[1])
    if args.batch_size is not None:
        _check_positive("--batch-size", args.batch_size)
    resolve_dataset(args.dataset)
    with torch_threads(args.threads):
        return _evaluate(args, read, read_reference)


def _evaluate(
    args: argparse.Namespace, read: tuple[str, dict[str, Any]], read_reference: tuple[str, dict[str, Any]] | None
) -> int:
    from .evaluation import pick_column

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


_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_labels", "num_channels", "image_size")


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
    agreement: float
    kl: float
    seconds: float | None
    size: int | None


DEMO_CHANCE_LEVEL = 0.05  # McNemar p above this: the top-1 difference is reported as chance


def demo_folder(output: Path, bits: int, group_size: int | None) -> Path:
    from .assets import DEMO_MODEL_DIR

    suffix = "" if group_size is None else f"-g{group_size}"
    return output / f"{DEMO_MODEL_DIR.name}-comq-w{bits}{suffix}"


def run_demo(args: argparse.Namespace) -> int:
    """``hf-comq demo``: FP vs COMQ vs RTN on the shipped ViT and Fashion-MNIST subset."""
    _check_positive("--num-samples", args.num_samples)
    if args.eval_limit is not None:
        _check_positive("--eval-limit", args.eval_limit)
    output = Path(args.output).expanduser()
    folders = {bits: demo_folder(output, bits, args.group_size) for bits in dict.fromkeys(args.bits)}
    for folder in folders.values():
        check_output(folder, args.overwrite)
    with torch_threads(args.threads):
        return _demo(args, folders)


def _demo(args: argparse.Namespace, folders: dict[int, Path]) -> int:
    import torch
    from transformers import AutoImageProcessor, ViTForImageClassification

    from .assets import demo_dataset, demo_model_path
    from .config import COMQConfig
    from .evaluation import checkpoint_size_bytes, fidelity_of_logits, image_logits
    from .hub import attach_model_card_hook
    from .solver import ROUND_TO_NEAREST

    for bits in folders:
        COMQConfig(bits=bits, group_size=args.group_size)  # reject bad settings before any work
    model_path = demo_model_path()
    processor = AutoImageProcessor.from_pretrained(model_path)
    calibration = demo_dataset("calibration")
    test = demo_dataset("test")
    if args.eval_limit is not None:
        test = test.shuffle(seed=0).select(range(min(args.eval_limit, len(test))))
    threads = torch.get_num_threads()
    device = "GPU" if torch.cuda.is_available() else f"CPU, {threads} thread{'s' if threads > 1 else ''}"
    print(
        f"hf-comq demo: ViT trained on Fashion-MNIST ({model_path.name}); calibration on "
        f"{min(args.num_samples, len(calibration))} images, evaluation on {len(test)} test images ({device})"
    )

    fp_model = ViTForImageClassification.from_pretrained(model_path).eval()
    fp_logits, labels = image_logits(fp_model, test, processor)
    del fp_model
    fp_correct = fp_logits.argmax(-1) == labels
    rows = [DemoRow("FP32", None, float(fp_correct.float().mean()), 1.0, 0.0, None, checkpoint_size_bytes(model_path))]
    verdicts: list[str] = []
    for bits, folder in folders.items():
        correct: dict[str, torch.Tensor] = {}
        for method, extra in (("COMQ", {}), ("RTN", ROUND_TO_NEAREST)):
            config = COMQConfig(
                bits=bits, group_size=args.group_size, dataset=calibration, num_samples=args.num_samples, **extra
            )
            started = time.perf_counter()
            model = ViTForImageClassification.from_pretrained(model_path, quantization_config=config).eval()
            seconds = time.perf_counter() - started
            logits, _ = image_logits(model, test, processor, label_column=None)
            correct[method] = logits.argmax(-1) == labels
            fidelity = fidelity_of_logits(logits, fp_logits)
            row = DemoRow(method, bits, float(correct[method].float().mean()), fidelity["agreement"],
                          fidelity["kl"], seconds, None)  # fmt: skip
            if method == "COMQ":
                _save_demo_checkpoint(model, processor, folder, rows[0], row, len(test), attach_model_card_hook)
                row.size = checkpoint_size_bytes(folder)
            rows.append(row)
            del model
        verdicts.append(demo_verdict(bits, rows[-2], rows[-1], correct["COMQ"], correct["RTN"]))
    print(format_demo_table(rows))
    print(
        "agreement: share of test images where the quantized model predicts the FP model's class; "
        "KL: mean KL divergence of its class probabilities from FP's (0 = identical)"
    )
    print()
    for line in verdicts:
        print(line)
    for folder in folders.values():
        print(f"saved {folder}")
    if folders:
        print(f"evaluate one again with: hf-comq evaluate {next(iter(folders.values()))} --dataset demo:test")
    return EXIT_OK


def _save_demo_checkpoint(
    model: Any, processor: Any, folder: Path, fp: DemoRow, comq: DemoRow, images: int, attach: Callable[..., None]
) -> None:
    attach(
        model,
        metrics={
            f"Fashion-MNIST test subset ({images} images)": {
                "fp32 top-1": round(fp.top1, 4), f"comq w{comq.bits} top-1": round(comq.top1, 4),
                f"comq w{comq.bits} top-1 agreement with fp32": round(comq.agreement, 4),
                f"comq w{comq.bits} KL(fp32 || comq)": float(f"{comq.kl:.3g}"),
            }  # fmt: skip
        },
    )
    save_atomically(folder, lambda staging: _save_with_processor(model, processor, staging, folder.name))


def demo_verdict(bits: int, comq: DemoRow, rtn: DemoRow, comq_correct: Any, rtn_correct: Any) -> str:
    """One line on COMQ vs RTN at ``bits``: fidelity to FP, and whether the top-1 difference is more than chance."""
    from .evaluation import mcnemar_exact_p

    only_comq = int((comq_correct & ~rtn_correct).sum())
    only_rtn = int((rtn_correct & ~comq_correct).sum())
    p_value = mcnemar_exact_p(only_comq, only_rtn)
    if comq.kl <= rtn.kl:
        kl = f"{rtn.kl / comq.kl:.1f}x lower than RTN's" if comq.kl > 0 else "0"
    else:
        kl = f"{comq.kl / rtn.kl:.1f}x higher than RTN's"
    fidelity = f"W{bits}: COMQ's KL to FP {kl}, top-1 agreement with FP {comq.agreement:.4f} vs {rtn.agreement:.4f}"
    difference = f"top-1 {100 * (comq.top1 - rtn.top1):+.2f} pt ({only_comq} images only COMQ gets right, {only_rtn} only RTN)"
    if p_value > DEMO_CHANCE_LEVEL:
        return f"{fidelity}; {difference}: within chance (McNemar p = {p_value:.2f}), not a ranking"
    better = "COMQ" if only_comq > only_rtn else "RTN"
    return f"{fidelity}; {difference}: {better} ahead beyond chance (McNemar p = {p_value:.2g})"


def format_demo_table(rows: list[DemoRow]) -> str:
    """The demo's result table: one row per model, differences and ratios against the FP row."""
    fp = rows[0]
    header = ("method", "bits", "top-1", "vs FP", "agreement with FP", "KL(FP||q) x1e-3", "quant time", "size", "size vs FP")
    lines = [header]
    for row in rows:
        is_fp = row is fp
        lines.append(
            (
                row.method,
                "32" if row.bits is None else str(row.bits),
                f"{row.top1:.4f}",
                "" if is_fp else f"{100 * (row.top1 - fp.top1):+.2f} pt",
                f"{row.agreement:.4f}",
                f"{1e3 * row.kl:.3f}",
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
