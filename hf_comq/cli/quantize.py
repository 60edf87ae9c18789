"""``hf-comq quantize``: load a full-precision checkpoint, calibrate and quantize it, save it atomically, push it."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .common import EXIT_OK, CLIError, add_command, add_setting_option, torch_threads
from .data import add_data_arguments, open_dataset, resolve_dataset
from .models import ModelSpec, inspect_model, load_processor, read_model_config
from .output import check_output, megabytes, print_fields, save_atomically, save_with_processor

CALIBRATION_SETTINGS = ("num_samples", "batch_size", "max_length", "seed")


def add_parser(commands: Any) -> None:
    command = add_command(
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
    add_setting_option(group, "bits", metavar="B")
    add_setting_option(group, "group_size")
    group.add_argument(
        "--rtn", action="store_true",
        help="round-to-nearest baseline instead of COMQ (same pipeline, no coordinate descent)",
    )  # fmt: skip
    add_data_arguments(command, role="calibration")
    for name in CALIBRATION_SETTINGS:
        add_setting_option(group, name)
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
    command.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
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

    from ..config import COMQConfig
    from ..evaluation import pick_column
    from ..solver import ROUND_TO_NEAREST

    rtn = ROUND_TO_NEAREST if args.rtn else {}
    settings = {name: getattr(args, name) for name in ("bits", "group_size", *CALIBRATION_SETTINGS)}
    config = COMQConfig(dataset=dataset, dataset_split=args.split, dataset_column=args.column, **settings, **rtn)
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
        output, lambda folder: save_with_processor(model, processor, folder, model_id), overwrite=args.overwrite
    )
    from ..calibration import calibration_summary

    summary = calibration_summary(model)
    _print_quantize_summary(spec, model, summary, seconds, output)
    if args.push_to_hub:
        _push(output, args.push_to_hub, args.private)
    return EXIT_OK


def _optional_processor(spec: ModelSpec) -> Any:
    """The checkpoint's processor, saved next to the quantized weights so the folder is self-contained."""
    try:
        return load_processor(spec.location, spec.inputs)
    except CLIError:
        print(f"note: {spec.display_name} has no processor or tokenizer to save with the checkpoint", file=sys.stderr)
        return None


def _print_quantize_summary(spec: ModelSpec, model: Any, summary: dict, seconds: float, output: Path) -> None:
    from ..evaluation import checkpoint_size_bytes

    config = model.config.quantization_config
    grid = f"group size {config.group_size}" if config.group_size else "per-channel scales"
    error = summary.get("mean_relative_error")
    size = checkpoint_size_bytes(output)
    size_text = megabytes(size)
    if spec.is_local:
        try:
            original = checkpoint_size_bytes(spec.location)
            size_text += f" ({size / original:.2f}x of {megabytes(original)} full precision)"
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
    print_fields(rows)


def check_repo_id(repo_id: str) -> None:
    """huggingface_hub's own rules for a repository id, checked before any work."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise CLIError(f"--push-to-hub {repo_id!r} is not a valid Hub repository id: {error}") from None


def _push(output: Path, repo_id: str, private: bool) -> None:
    """Publish the finished folder (weights, processor, card) as it is, in one commit."""
    from ..hub import push_folder

    try:
        push_folder(output, repo_id, private=private)
    except Exception as error:
        raise CLIError(f"saved to {output}, but pushing to the Hub repository {repo_id!r} failed: {error}") from None
    print(f"  pushed to        https://huggingface.co/{repo_id}")
