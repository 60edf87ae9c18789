"""``hf-comq demo``: the download-free first run; FP vs COMQ vs RTN on the shipped Fashion-MNIST ViT."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..solver.options import per_channel_as_none
from .common import (
    EXIT_OK,
    CLIError,
    add_command,
    add_setting_option,
    check_positive,
    check_settings,
    check_single_process,
    torch_threads,
)
from .output import check_output, format_table, megabytes, save_atomically, save_with_processor

DEMO_OUTPUT = Path("comq-demo")


def add_parser(commands: Any) -> None:
    command = add_command(
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
    add_setting_option(command, "group_size")
    command.add_argument(
        "--num-samples", type=int, default=256, metavar="N", help="calibration images (default: 256 of 1024)"
    )
    command.add_argument(
        "--eval-limit", type=int, default=None, metavar="N",
        help="evaluate on a seeded random N of the 2000 test images (default: all)",
    )  # fmt: skip
    command.set_defaults(handler=run)


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
    from ..assets import DEMO_MODEL_DIR

    suffix = "" if group_size is None else f"-g{group_size}"
    return output / f"{DEMO_MODEL_DIR.name}-comq-w{bits}{suffix}"


def run(args: argparse.Namespace) -> int:
    """``hf-comq demo``: FP vs COMQ vs RTN on the shipped ViT and Fashion-MNIST subset."""
    check_single_process("demo")
    check_positive("--num-samples", args.num_samples)
    if args.eval_limit is not None:
        check_positive("--eval-limit", args.eval_limit)
    output = Path(args.output).expanduser()
    for bits in args.bits:  # named as the options the demo has, before any work
        check_settings({"bits": bits, "group_size": args.group_size})
    args.group_size = per_channel_as_none(args.group_size)  # -1 names the default folder, as per channel is
    folders = {bits: demo_folder(output, bits, args.group_size) for bits in dict.fromkeys(args.bits)}
    for folder in folders.values():
        check_output(folder, args.overwrite)
    with torch_threads(args.threads):
        return _demo(args, folders)


def _check_demo_group_size(layers: dict, group_size: int | None) -> None:
    """The group-size rule for the shipped ViT, named as the demo's options (it keeps no layer out)."""
    from ..checkpoint import check_group_size

    try:
        check_group_size(layers, group_size)
    except ValueError:
        widths = sorted({module.in_features for module in layers.values()})
        raise CLIError(
            f"--group-size {group_size} does not divide the input size of every layer of the demo ViT ({widths}); "
            "pass a common divisor of those, or -1 for one scale per output channel"
        ) from None


def _demo(args: argparse.Namespace, folders: dict[int, Path]) -> int:
    import torch
    from transformers import AutoImageProcessor, ViTForImageClassification

    from .. import kernels
    from ..assets import demo_dataset, demo_model_path
    from ..config import COMQConfig
    from ..evaluation import checkpoint_size_bytes, fidelity_of_logits, image_logits
    from ..hub import attach_model_card_hook
    from ..modules import find_quantizable_linears
    from ..threads import caller_threads
    from ..solver import ROUND_TO_NEAREST_MODEL

    model_path = demo_model_path()
    fp_model = ViTForImageClassification.from_pretrained(model_path).eval()
    _check_demo_group_size(find_quantizable_linears(fp_model), args.group_size)
    processor = AutoImageProcessor.from_pretrained(model_path)
    calibration = demo_dataset("calibration")
    test = demo_dataset("test")
    all_test_images = len(test)
    if args.eval_limit is not None:
        test = test.shuffle(seed=0).select(range(min(args.eval_limit, len(test))))
    threads = caller_threads()  # the count the command allows; torch runs this part on one
    device = "GPU" if torch.cuda.is_available() else f"CPU, {threads} thread{'s' if threads > 1 else ''}"
    print(
        f"hf-comq demo: ViT trained on Fashion-MNIST ({model_path.name}); calibration on "
        f"{min(args.num_samples, len(calibration))} images, evaluation on {len(test)} test images ({device})"
    )

    kernels.build_ahead()  # a first run's one-off kernel build is not quantization time: out of the timed rows
    fp_logits, labels = image_logits(fp_model, test, processor)
    del fp_model
    fp_correct = fp_logits.argmax(-1) == labels
    rows = [DemoRow("FP32", None, float(fp_correct.float().mean()), 1.0, 0.0, None, checkpoint_size_bytes(model_path))]
    verdicts: list[str] = []
    for bits, folder in folders.items():
        correct: dict[str, torch.Tensor] = {}
        for method, extra in (("COMQ", {}), ("RTN", ROUND_TO_NEAREST_MODEL)):
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
        print(f"evaluate one on all {all_test_images:,} test images with: "
              f"hf-comq evaluate {next(iter(folders.values()))} --dataset demo:test")  # fmt: skip
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
    save_atomically(folder, lambda staging: save_with_processor(model, processor, staging, folder.name))


def demo_verdict(bits: int, comq: DemoRow, rtn: DemoRow, comq_correct: Any, rtn_correct: Any) -> str:
    """One line on COMQ vs RTN at ``bits``: fidelity to FP, and whether the top-1 difference is more than chance."""
    from ..evaluation import mcnemar_exact_p

    only_comq = int((comq_correct & ~rtn_correct).sum())
    only_rtn = int((rtn_correct & ~comq_correct).sum())
    p_value = mcnemar_exact_p(only_comq, only_rtn)
    if comq.kl <= rtn.kl:
        kl = f"{rtn.kl / comq.kl:.1f}x lower than RTN's" if comq.kl > 0 else "0"
    else:
        kl = f"{comq.kl / rtn.kl:.1f}x higher than RTN's"
    fidelity = f"W{bits}: COMQ's KL to FP {kl}, top-1 agreement with FP {comq.agreement:.4f} vs {rtn.agreement:.4f}"
    images = "image" if only_comq == 1 else "images"
    split = f"{only_comq} {images} only COMQ gets right, {only_rtn} only RTN"
    difference = f"top-1 {100 * (comq.top1 - rtn.top1):+.2f} pt ({split})"
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
                f"{1e3 * row.kl:.3f}" if 1e3 * row.kl >= 0.01 or row.kl == 0 else f"{1e3 * row.kl:.2g}",  # W8: tiny, not 0
                "" if row.seconds is None else f"{row.seconds:.1f} s",
                "" if row.size is None else megabytes(row.size),
                "" if is_fp or row.size is None or fp.size is None else f"{row.size / fp.size:.2f}x",
            )
        )
    return format_table(lines)
