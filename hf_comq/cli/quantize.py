"""``hf-comq quantize``: load a full-precision checkpoint, calibrate and quantize it, save it atomically, push it."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..settings import COMQSettings
from ..solver.options import SUM_DTYPES
from .common import (
    EXIT_OK,
    CLIError,
    add_command,
    add_setting_flag,
    add_setting_option,
    check_settings,
    launched_processes,
    torch_threads,
)
from .data import add_data_arguments, open_dataset, resolve_dataset
from .models import LOAD_DTYPES, ModelSpec, hub_unavailable, inspect_model, load_processor, read_model_config
from .output import check_output, megabytes, print_fields, save_atomically, save_with_processor

CALIBRATION_SETTINGS = ("num_samples", "batch_size", "max_length", "seed")
SETTINGS = (
    "bits", "group_size", "symmetric", "pair_moves", "scale_refit", "fp_target", "true_sequential",
    "calibrate_all_experts", "sum_dtype", "modules_to_not_convert", *CALIBRATION_SETTINGS,
)  # fmt: skip
"""The COMQ settings ``quantize`` takes as options of the same name."""
Result = TypeVar("Result")


def add_parser(commands: Any) -> None:
    command = add_command(
        commands,
        "quantize",
        "quantize a full-precision checkpoint with COMQ and save it",
        "Load MODEL (a local folder or a Hub id) with the Auto class its config.json names, calibrate it on\n"
        "--dataset, quantize its linear layers with COMQ, and save the quantized checkpoint (with the model's\n"
        "processor or tokenizer and a model card) to --output.  Nothing is left at --output if a step fails.\n"
        "Supported: image classification, sequence and token classification, causal, masked and\n"
        "sequence-to-sequence LMs (the decoder runs on the calibration text shifted right), and base models,\n"
        "calibrated on images or text.\n\n"
        "Under torchrun (torchrun --nproc-per-node N -m hf_comq quantize ...) the ranks split the calibration\n"
        "samples (gloo on CPUs, NCCL with one GPU per rank) and rank 0 alone writes --output and pushes; a\n"
        "check or step that fails on one rank stops every rank with the same one line.",
    )
    command.add_argument("model", metavar="MODEL", help="local checkpoint folder or Hugging Face Hub model id")
    group = command.add_argument_group("quantization")
    add_setting_option(group, "bits", metavar="B")
    add_setting_option(group, "group_size")
    add_setting_flag(group, "symmetric", "what plain transformers needs to load quantized mixture-of-experts layers")
    group.add_argument(
        "--rtn", action="store_true",
        help="round-to-nearest baseline instead of COMQ (same pipeline, no coordinate descent)",
    )  # fmt: skip
    add_setting_option(group, "pair_moves")
    add_setting_flag(
        group, "scale_refit",
        "the paper's delta update: a lower layer objective; SmolLM2's perplexity was lower with it at 2 bits "
        "and higher at 3 and 4 (see the README)",
    )  # fmt: skip
    add_setting_flag(
        group, "fp_target",
        "it lowered a causal LM's perplexity at every width measured, for one more forward pass per block and one "
        "more Gram-sized sum per layer while calibrating",
    )  # fmt: skip
    add_setting_flag(
        group, "true_sequential",
        "wherever layers are aimed it lowered perplexity again, for little or no more time in memory; "
        "--no-true-sequential solves a block's layers from one pass",
    )  # fmt: skip
    add_setting_flag(
        group, "calibrate_all_experts",
        "as llm-compressor does by default; every expert runs on every token while its layers are calibrated",
    )  # fmt: skip
    data = add_data_arguments(command, role="calibration")
    for name in CALIBRATION_SETTINGS:
        add_setting_option(data, name)
    add_setting_option(group, "sum_dtype", metavar="DTYPE", choices=list(SUM_DTYPES))
    add_setting_option(group, "modules_to_not_convert", metavar="NAME", nargs="+")
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
        "--dtype", choices=LOAD_DTYPES, default="auto",
        help="dtype to load and calibrate the model in (from_pretrained's dtype): 'auto' (default) keeps the "
        "checkpoint's own; float32 for a float16 model whose activations overflow",
    )  # fmt: skip
    output.add_argument(
        "--device-map", metavar="MAP",
        help="passed to from_pretrained, e.g. 'auto' to spread a large model over GPUs and CPU memory; also keeps "
        "oneDNN's caches of compiled products small (hf_comq.onednn_caches), as a memory budget needs",
    )  # fmt: skip
    output.add_argument(
        "--offload-folder", metavar="DIR",
        help="with --device-map: where weights that fit nowhere else go (accelerate's disk offload; needed for a "
        ".bin checkpoint, a safetensors one is read in place)",
    )  # fmt: skip
    command.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """``hf-comq quantize``: every check that needs no model first, then load + calibrate, save atomically, push."""
    output = Path(args.output).expanduser()
    ranks = _launcher_ranks()
    try:
        read, dataset = _on_every_rank(ranks, lambda: _check_before_work(args, output, _saves(ranks)))
        with torch_threads(args.threads):
            return _quantize(args, output, read, dataset, ranks)
    finally:
        _leave_launcher_group(ranks)


def _check_before_work(args: argparse.Namespace, output: Path, saving: bool) -> tuple[tuple[str, dict], str]:
    """The checks that need no model; only the rank that saves looks at (and tidies) ``--output``."""
    if saving:
        check_output(output, args.overwrite, source=args.model)
    settings = {name: getattr(args, name) for name in SETTINGS}
    check_settings({**settings, "dataset_split": args.split, "dataset_column": args.column})
    if args.rtn:
        _check_rtn_flags(args)
    if args.push_to_hub:
        args.push_to_hub = check_push_target(args.push_to_hub, args.private)  # owner/name: what the card names
    elif args.private:
        raise CLIError("--private makes the repository that --push-to-hub creates private; pass --push-to-hub too")
    if args.offload_folder:
        _check_offload_folder(args, output)
    read = read_model_config(args.model)
    if read[1].get("quantization_config"):
        raise CLIError(f"{args.model} is already quantized; quantize its full-precision original")
    return read, resolve_dataset(args.dataset)


def _check_offload_folder(args: argparse.Namespace, output: Path) -> None:
    """``--offload-folder`` needs ``--device-map`` and a place of its own: inside ``--output`` it would be
    saved with the checkpoint (and block the swap), inside the model's folder it would fill it with files."""
    if not args.device_map:
        raise CLIError("--offload-folder holds what a --device-map offloads to disk; pass --device-map too (e.g. auto)")
    folder = Path(args.offload_folder).expanduser().resolve()
    taken = [(output, "--output"), *([(Path(args.model), "the model's folder")] if Path(args.model).is_dir() else [])]
    for place, name in taken:
        place = place.expanduser().resolve()
        if folder == place or place in folder.parents or folder in place.parents:
            raise CLIError(f"--offload-folder {args.offload_folder} overlaps {name} ({place}); give it a folder of its own")


def _launcher_ranks() -> Any:
    """The ``torch.distributed`` group a launcher (torchrun) started this process in, joined; ``None`` alone.

    Checked from the environment first so a single process does not import torch before its cheap checks.
    """
    if launched_processes() <= 1:
        return None
    from ..calibration import join_launcher_group

    return join_launcher_group()


def _leave_launcher_group(ranks: Any) -> None:
    """Leave the group :func:`_launcher_ranks` joined (see :func:`~hf_comq.calibration.leave_launcher_group`)."""
    if ranks is None:
        return
    from ..calibration import leave_launcher_group

    leave_launcher_group()


def _saves(ranks: Any) -> bool:
    """Whether this process writes ``--output``: a single process, or rank 0."""
    return ranks is None or ranks.is_main


def _on_every_rank(ranks: Any, step: Callable[[], Result]) -> Result:
    """Run ``step`` on this rank; if it fails on any rank, every rank stops with that rank's one line."""
    if ranks is None:
        return step()
    from ..calibration.distributed import first_failure

    result, message = None, None
    try:
        result = step()
    except Exception as error:  # the healthy ranks must hear of it, not wait at the next collective
        message = " ".join(str(error).split()) or type(error).__name__
    failure = first_failure(ranks, message)
    if failure is not None:
        rank, text = failure
        raise CLIError(text if rank == ranks.rank else f"rank {rank} of {ranks.size} failed: {text}")
    return result


def _quantize(
    args: argparse.Namespace, output: Path, read: tuple[str, dict[str, Any]], dataset: str, ranks: Any
) -> int:
    saving = _saves(ranks)
    spec = inspect_model(args.model, read)

    from ..calibration.data import chat_renderer, column_kind, fed_as
    from ..calibration.sources import TOKEN_COLUMNS, named_decoding_errors
    from ..config import COMQConfig
    from ..evaluation import pick_column
    from ..solver import ROUND_TO_NEAREST_MODEL

    settings = {name: getattr(args, name) for name in SETTINGS}
    rtn = {}
    if args.rtn:  # the baseline rounds each layer's own weight, unless --fp-target asks to aim it first
        rtn = {key: value for key, value in ROUND_TO_NEAREST_MODEL.items() if settings.get(key) is None}
    with named_decoding_errors(dataset):
        opened = open_dataset(dataset, args.split)
        column = pick_column(opened, args.column, "calibration", tokens=True)  # calibration reads token ids too
        # Raw images or text need the checkpoint's processor; both are checked before the weights load.
        tokens = column == TOKEN_COLUMNS[0]
        kind = None if tokens else column_kind(opened, column)  # one line for a column of neither images nor text
    if kind is not None and fed_as(kind) != spec.inputs:
        raise CLIError(f"--dataset column {column!r} holds {kind}, but {spec.architecture} takes {spec.inputs}")
    processor = _optional_processor(spec) if tokens else load_processor(spec.location, spec.inputs)
    if kind == "chat":
        chat_renderer(processor)  # a tokenizer without a chat template, named before the weights load
    data = dict(dataset=dataset, dataset_split=args.split, dataset_column=args.column, processor=processor)
    config = COMQConfig(**data, **{**settings, **rtn})
    method = "RTN" if args.rtn else "COMQ"
    if ranks is not None:
        print(f"rank {ranks.rank} of {ranks.size}: calibrating on its share of the samples", file=sys.stderr)
    if saving:
        print(f"Quantizing {spec.display_name} ({spec.architecture}, {spec.task.name}) with {method} at {args.bits} bits")
    load_kwargs = {"device_map": args.device_map} if args.device_map else {}
    if args.dtype != "auto":
        load_kwargs["dtype"] = args.dtype
    if args.offload_folder:
        load_kwargs["offload_folder"] = str(Path(args.offload_folder).expanduser())
    started = time.perf_counter()
    model = spec.auto_class().from_pretrained(spec.location, quantization_config=config, **load_kwargs)
    seconds = time.perf_counter() - started

    model_id = args.push_to_hub or output.name

    def save() -> None:
        if saving:
            save_atomically(
                output, lambda folder: save_with_processor(model, processor, folder, model_id), overwrite=args.overwrite
            )

    _on_every_rank(ranks, save)
    if not saving:
        return EXIT_OK
    from ..calibration import calibration_summary

    _print_quantize_summary(spec, model, calibration_summary(model), seconds, output)
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
    from ..calibration import calibration_mode
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
         + (f", mean relative squared error {error:.4g}" if isinstance(error, float) else "")),
        ("calibration", config.calibration_description or "?"),
        ("calibration mode", calibration_mode(summary)),
        ("time", _time_text(seconds, summary.get("solve_time_s"))),
        ("checkpoint", size_text),
        ("saved to", str(output)),
    ]  # fmt: skip
    print_fields(rows)


def _time_text(seconds: float, solving: float | None) -> str:
    """The run's wall time and how much of it went to solving layers (the rest loads the model and
    runs the calibration passes, which grow with the calibration data; the solves do not)."""
    if solving is None:
        return f"{seconds:.1f} s (loading and calibration)"
    return f"{seconds:.1f} s (loading and calibration; {solving:.1f} s of it solving layers)"


def _check_rtn_flags(args: argparse.Namespace) -> None:
    """``--rtn`` runs no COMQ sweep: the flags of steps inside a sweep would only be recorded in the card."""
    ignored = [flag for flag, given in (
        ("--scale-refit/--no-scale-refit", args.scale_refit is not None),
        ("--pair-moves", args.pair_moves != COMQSettings.default("pair_moves")),
    ) if given]  # fmt: skip
    if ignored:
        raise CLIError(
            f"--rtn rounds each weight with no COMQ sweep, so {' and '.join(ignored)} would do nothing; "
            "drop them, or drop --rtn"
        )


def check_push_target(repo_id: str, private: bool = False) -> str:
    """Before any work: huggingface_hub's own rules for a repository id, a Hub that can be reached,
    a token it accepts for writing (the push comes after the whole calibration), and, with
    ``private``, no public repository of that name (the Hub sets the visibility of a new repository
    only, so the model would go public).  Returns the repository as ``owner/name`` (a bare name goes
    to the token's user)."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise CLIError(f"--push-to-hub {repo_id!r} is not a valid Hub repository id: {error}") from None
    problem = hub_unavailable()
    if problem is not None:
        raise CLIError(
            f"--push-to-hub needs the Hugging Face Hub, which is unavailable ({problem}); "
            "quantize without --push-to-hub and upload the folder later (hf upload)"
        )
    if get_token() is None:
        raise CLIError("--push-to-hub needs a Hub token: run `hf auth login` or set HF_TOKEN")
    try:
        account = HfApi().whoami()
    except Exception as error:
        raise CLIError(
            f"--push-to-hub: the Hub did not accept the token ({' '.join(str(error).split())[:200]}); "
            "run `hf auth login` or set HF_TOKEN to a token with write access"
        ) from None
    role = ((account.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise CLIError("--push-to-hub: the Hub token is read-only; pushing needs a token with write access")
    from ..hub import owned_repo_id

    repo_id = owned_repo_id(repo_id, account["name"])
    if private:
        _check_not_public(repo_id)
    return repo_id


def _check_not_public(repo_id: str) -> None:
    """Refuse ``--private`` for a repository that exists and is public."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        public = not HfApi().repo_info(repo_id).private
    except RepositoryNotFoundError:
        return
    if public:
        raise CLIError(
            f"--private: {repo_id} already exists and is public, and the Hub sets the visibility of a new "
            "repository only; make it private on the Hub first, or push to a new repository"
        )


def _push(output: Path, repo_id: str, private: bool) -> None:
    """Publish the finished folder (weights, processor, card) as it is, in one commit.

    Without ``--private`` the repository gets the account's default visibility (an
    organisation may make its repositories private by default), as ``hf upload`` does.
    """
    from huggingface_hub import constants

    from ..hub import push_folder

    try:
        push_folder(output, repo_id, private=True if private else None)
    except Exception as error:
        raise CLIError(f"saved to {output}, but pushing to the Hub repository {repo_id!r} failed: {error}") from None
    print(f"  pushed to        {constants.ENDPOINT.rstrip('/')}/{repo_id}")
