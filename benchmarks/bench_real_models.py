"""Whole-model benchmark on two real pretrained models, every method through a real pipeline.

    # once: the checkpoints (see benchmarks/README.md) and the benchmark venv with llm-compressor
    B=/work/venvs/bench/bin/python
    $B benchmarks/bench_real_models.py --model smollm2 --settings 4:channel 3:channel --seeds 0 1 2
    $B benchmarks/bench_real_models.py --model dinov2 --settings 4:channel 3:channel 4:128 --seeds 0 1 2
    $B benchmarks/bench_real_models.py --model smollm2 --table      # markdown from the saved rows

Group sizes must divide every quantized layer's input size: SmolLM2's hidden size is
576, so its grouped settings are 64 (or 32, 192), not 128; DINOv2's is 384 (64 or 128).

* ``smollm2``: SmolLM2-135M-Instruct (``benchmarks/models/convert_smollm2_gguf.py``).
  Calibration: ``--calibration`` chunks of ``--length`` tokens of deduplicated
  English text from the calibration pool (``benchmarks/real_data.py``; the seed picks
  the paragraphs); metric: perplexity on held-out text (``--eval-chunks`` x 256
  tokens, disjoint from every calibration draw).
* ``dinov2``: DINOv2 ViT-S/14 (``benchmarks/models/convert_dinov2_onnx.py``) at 112 px
  on Fashion-MNIST.  A logistic-regression probe is fit once on the FP model's
  features (class token and mean patch token) of 2,000 train images; each model is
  scored by that probe on ``--test-images`` test images (accuracy, and agreement with
  the probe's predictions on FP's features, image by image), beside the mean cosine of
  its features to FP's.  Calibration: ``--calibration`` train images drawn by the seed
  from those the probe never sees.

Methods (each row in its own process, one torch thread): FP; RTN and the COMQ rows
through hf_comq's ``from_pretrained(..., quantization_config=COMQConfig(...))``;
GPTQ act-order with llm-compressor's ``minmax``, ``memoryless_mse`` and ``imatrix_mse``
observers.  For SmolLM2, GPTQ runs through llm-compressor's own ``oneshot`` pipeline on the same
token chunks.  For DINOv2 (``oneshot`` has no image-model calibration path that fits
here), llm-compressor's observer and GPTQ routine replace the layer solver inside
hf_comq's pipeline, so calibration data and Hessians are the same (each layer solved for
its own output, as GPTQ does: ``fp_target=False`` at every bit width).  Each row records
the quantization wall time and the process's peak RSS, and rows quantized by hf_comq's
pipeline the part of that time spent solving layers (``solve_seconds``).  Rows are appended to
``benchmarks/results/real_models_<model>.jsonl``; ``--table`` prints mean and range
over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from hf_comq.solver.options import REFERENCE_CODE, ROUND_TO_NEAREST_MODEL  # noqa: E402  torch-free

GPTQ_OBSERVERS = {"GPTQ minmax": "minmax", "GPTQ mse": "memoryless_mse", "GPTQ imatrix": "imatrix_mse"}
"""llm-compressor's weight observer of each GPTQ row (``imatrix_mse``: MSE clipping weighted by E[x^2])."""
COMQ_VARIANTS = {
    "COMQ reference code": REFERENCE_CODE,
    "COMQ ridge 0.03": dict(ridge=0.03),
    "COMQ ridge auto": dict(ridge="auto"),
    "COMQ fp target": dict(fp_target=True, true_sequential=False),
    "COMQ without fp target": dict(fp_target=False),
    "COMQ true-seq": dict(true_sequential=True),
    "COMQ fp target true-seq": dict(fp_target=True, true_sequential=True),
    "COMQ pair moves": dict(pair_moves=32),
    "COMQ without pair moves": dict(pair_moves=0),
    "COMQ scale refit": dict(scale_refit=True),
    "COMQ without scale refit": dict(scale_refit=False),
    "COMQ damp 0.01": dict(damp=0.01),
    "COMQ one start grid": dict(start_grids=1),
    "COMQ iterations 1": dict(iterations=1),
}
"""COMQ rows other than the default: the paper's code, trials of the solver's ``ridge`` (fixed, and each
layer's Ledoit-Wolf amount), of ``fp_target`` (on at every bit width without ``true_sequential``, and off: the
default turns it on at 3 bits and fewer, and ``true_sequential`` with it) and of ``true_sequential`` (alone and with
``fp_target``), and of
``pair_moves`` (its opt-in trial rows, the default's setting since; and the default without it), the default with
and without the scale refit (the default refits at 2 bits only: whole models did better without it at 3 and 4), and
three trims of the default's cost or damping (GPTQ's damping for the start, one start grid, one sweep)."""
METHODS = ("FP", "RTN", *GPTQ_OBSERVERS, *COMQ_VARIANTS, "COMQ default")
PROBE_TRAIN = 2000


def parse_setting(text: str) -> tuple[int, int | None]:
    bits, group = text.split(":")
    return int(bits), None if group == "channel" else int(group)


# ---------------------------------------------------------------- data and metrics


def smollm2_data(calibration: int, length: int, seed: int, eval_chunks: int):
    from transformers import AutoTokenizer

    from benchmarks.layers import SMOLLM2_DIR
    from benchmarks.real_data import calibration_chunks, held_out_chunks

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    return calibration_chunks(tokenizer, calibration, length, seed), held_out_chunks(tokenizer, eval_chunks, 256)


def perplexity(model, chunks: torch.Tensor) -> float:
    losses = []
    with torch.no_grad():
        for start in range(0, chunks.shape[0], 8):
            batch = chunks[start : start + 8]
            losses.append(float(model(input_ids=batch, labels=batch).loss) * batch.shape[0])
    return float(torch.exp(torch.tensor(sum(losses) / chunks.shape[0])))


def dinov2_images(calibration: int, seed: int, test_images: int):
    from benchmarks.real_data import as_pil, fashion_mnist, seeded_subset

    train, train_labels = fashion_mnist("train")
    test, test_labels = fashion_mnist("test")
    pool = PROBE_TRAIN + seeded_subset(calibration, len(train) - PROBE_TRAIN, seed)  # never a probe image
    rgb = lambda images: [image.convert("RGB") for image in as_pil(images)]  # noqa: E731
    return (
        rgb(train[pool]),
        (rgb(train[:PROBE_TRAIN]), train_labels[:PROBE_TRAIN]),
        (rgb(test[:test_images]), test_labels[:test_images]),
    )


def dinov2_features(model, processor, images) -> torch.Tensor:
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            hidden = model(**processor(images[start : start + 64], return_tensors="pt")).last_hidden_state
            chunks.append(torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=1))
    return torch.cat(chunks)


def dinov2_probe(model, processor, probe_set):
    """Logistic regression on standardised FP features (cached: the probe is fit once)."""
    import joblib
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cache = Path("/work/cache/dinov2_probe.joblib")
    if cache.is_file():
        return joblib.load(cache)
    images, labels = probe_set
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    probe.fit(dinov2_features(model, processor, images).numpy(), labels)
    joblib.dump(probe, cache)
    return probe


# ---------------------------------------------------------------- quantization


def comq_config(method: str, bits: int, group: int | None, dataset, seed: int, processor=None):
    from hf_comq import COMQConfig

    from benchmarks.gptq_baseline import PEER_CALIBRATION

    # The peers in hf_comq's pipeline solve each layer for its own output, as they do elsewhere
    # (GPTQ's layer solver here, llm-compressor's pipeline for SmolLM2): no aiming at 3 bits either.
    peers = {"RTN": ROUND_TO_NEAREST_MODEL, **dict.fromkeys(GPTQ_OBSERVERS, PEER_CALIBRATION)}
    extra = {**peers, **COMQ_VARIANTS}.get(method, {})
    if processor is not None:
        extra = dict(extra, processor=processor)
    return COMQConfig(bits=bits, group_size=group, dataset=dataset, num_samples=len(dataset), seed=seed, **extra)


def gptq_in_hf_comq_pipeline(observer: str):
    """A layer solver: llm-compressor's observer picks the grid, its GPTQ routine the codes."""
    from benchmarks.gptq_baseline import gptq_dequantized, observer_grid
    from hf_comq.solver import Grid, QuantizedWeight

    def solve(weight, hessian, *, bits, group_size=None, **_):
        w = weight.float()
        scale, zero = observer_grid(w, hessian, 1, bits, group_size, observer)
        dequant = gptq_dequantized(w, hessian, scale, zero, bits, act_order=True)
        grid = Grid(scale, zero, bits, group_size or w.shape[1])
        scale_c, zero_c = grid.per_column()
        codes = torch.clamp(torch.round(dequant / scale_c) + zero_c, 0, grid.max_code)
        return QuantizedWeight(codes.to(torch.uint8), scale, zero, bits, group_size, weight.dtype, {"relative_error": 0.0})

    return solve


def llmcompressor_oneshot(model, method: str, bits: int, group: int | None, chunks: torch.Tensor, damp: float):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    grouping = dict(strategy="channel") if group is None else dict(strategy="group", group_size=group)
    observer = GPTQ_OBSERVERS[method]
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, observer=observer, actorder="static", **grouping)
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"], dampening_frac=damp,
    )
    dataset = Dataset.from_dict({"input_ids": chunks.tolist(), "attention_mask": torch.ones_like(chunks).tolist()})
    oneshot(
        model=model, dataset=dataset, recipe=recipe, num_calibration_samples=chunks.shape[0],
        max_seq_length=chunks.shape[1], shuffle_calibration_samples=False,
    )
    return model


def _quantization_clock() -> tuple[float, resource.struct_rusage]:
    """Wall clock and this process's resource usage now, the start of :func:`_record_quantization_cost`."""
    return time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)


def _record_quantization_cost(record: dict, started: tuple[float, resource.struct_rusage]) -> None:
    """Wall time, CPU time (user + system), system time and minor page faults since ``started``, into ``record``.

    On a shared machine wall time also counts the time other processes held the cores;
    with one thread, CPU time is the work done.  Memory given back to the kernel and
    allocated again shows up in the system time and the faults (the kernel zeroing pages).
    """
    wall, before = started
    after = resource.getrusage(resource.RUSAGE_SELF)
    record["seconds"] = time.perf_counter() - wall
    record["cpu_seconds"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    record["system_seconds"] = after.ru_stime - before.ru_stime
    record["minor_faults"] = after.ru_minflt - before.ru_minflt


def _record_solve_time(record: dict, model) -> None:
    """The wall time hf_comq's pipeline spent solving layers (its summary's ``solve_time_s``), for its own rows:
    the rest of ``seconds`` is loading and the calibration passes, which grow with the calibration tokens."""
    from hf_comq import calibration_summary

    summary = calibration_summary(model)
    if summary:
        record["solve_seconds"] = summary["solve_time_s"]


def _commit() -> str:
    """The code version a row was measured with ("+dirty" with uncommitted changes)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=ROOT).stdout
    return head + ("+dirty" if dirty.strip() else "")


def run_one(model_name: str, method: str, bits: int, group: int | None, seed: int, options: dict) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(options.get("threads", 1))
    os.environ.setdefault("LLMCOMPRESSOR_DISABLE_GPTQ_TRITON", "1")
    from benchmarks.layers import DINOV2_DIR, SMOLLM2_DIR, weights_fingerprint

    record = dict(model=model_name, method=method, bits=bits, group=group, seed=seed, commit=_commit(), **options)
    if model_name == "smollm2":
        from transformers import AutoModelForCausalLM

        calibration, held_out = smollm2_data(options["calibration"], options["length"], seed, options["eval_chunks"])
        started = _quantization_clock()
        if method == "FP":
            model = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR)
        elif method.startswith("GPTQ"):
            model = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR)
            llmcompressor_oneshot(model, method, bits, group, calibration, options["damp"])
        else:
            dataset = [{"input_ids": calibration[i : i + 1]} for i in range(calibration.shape[0])]
            model = AutoModelForCausalLM.from_pretrained(
                SMOLLM2_DIR, quantization_config=comq_config(method, bits, group, dataset, seed)
            )
        _record_quantization_cost(record, started)
        _record_solve_time(record, model)
        record["perplexity"] = perplexity(model.eval(), held_out)
    else:
        from transformers import BitImageProcessorPil, Dinov2Model

        processor = BitImageProcessorPil.from_pretrained(DINOV2_DIR)
        calibration, probe_set, (test_images, test_labels) = dinov2_images(options["calibration"], seed, options["test_images"])
        fp_model = Dinov2Model.from_pretrained(DINOV2_DIR).eval()
        probe = dinov2_probe(fp_model, processor, probe_set)
        started = _quantization_clock()
        if method == "FP":
            model = fp_model
        else:
            config = comq_config(method, bits, group, calibration, seed, processor)
            if method.startswith("GPTQ"):
                import functools
                from unittest import mock

                import hf_comq.calibration as calibration_module

                observer = GPTQ_OBSERVERS[method]
                swapped = functools.partial(calibration_module.quantize_model, solver=gptq_in_hf_comq_pipeline(observer))
                with mock.patch.object(calibration_module, "quantize_model", swapped):
                    model = Dinov2Model.from_pretrained(DINOV2_DIR, quantization_config=config)
            else:
                model = Dinov2Model.from_pretrained(DINOV2_DIR, quantization_config=config)
        _record_quantization_cost(record, started)
        _record_solve_time(record, model)
        features = dinov2_features(model.eval(), processor, test_images)
        fp_cache = Path(f"/work/cache/dinov2_fp_test_{len(test_images)}.pt")
        if method == "FP":
            fp_features = features
            torch.save(features, fp_cache)
        else:
            fp_features = torch.load(fp_cache) if fp_cache.is_file() else dinov2_features(fp_model, processor, test_images)
        predictions = probe.predict(features.numpy())
        record["probe_accuracy"] = float((predictions == test_labels).mean())
        # Paired with FP image by image: far less draw-to-draw noise than accuracy on 1,000 images.
        record["fp_agreement"] = float((predictions == probe.predict(fp_features.numpy())).mean())
        record["feature_cosine"] = float(torch.nn.functional.cosine_similarity(features, fp_features).mean())
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # after the peak is read: the fingerprint reads every tensor of the checkpoint once more
    record["model_fingerprint"] = weights_fingerprint(SMOLLM2_DIR if model_name == "smollm2" else DINOV2_DIR)
    return record


# ---------------------------------------------------------------- driver and table


def spawn(settings: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--one", json.dumps(settings)], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{settings} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def spawn_side_by_side(jobs: list[dict]) -> list[dict]:
    """Run every job at the same time, one process each: on a shared machine the rows
    then see the same load, so their wall times compare (a ratio measured in one run)."""
    import tempfile

    # Output goes to files, not pipes: a child blocked on a full pipe (llm-compressor
    # logs a lot) while the parent waits on another child would stall and skew the timing.
    logs = [tempfile.TemporaryFile("w+") for _ in jobs]
    started = [
        subprocess.Popen([sys.executable, __file__, "--one", json.dumps(job)], stdout=log, stderr=subprocess.STDOUT,
                         text=True, cwd=ROOT)
        for job, log in zip(jobs, logs)
    ]
    rows = []
    for job, process, log in zip(jobs, started, logs):
        process.wait()
        log.seek(0)
        output = log.read()
        lines = [line for line in output.splitlines() if line.startswith("{")]
        if process.returncode != 0 or not lines:
            raise SystemExit(f"{job} failed:\n{output[-3000:]}")
        rows.append(dict(json.loads(lines[-1]), side_by_side=len(jobs)))
    return rows


def print_table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # A rerun (e.g. after a solver change) replaces earlier rows of the same method, setting, seed and run
    # conditions; rows of other calibration sizes or thread counts are other rows, in a table line of their own.
    latest = {(row["method"], row["bits"], row["group"], row["seed"], *_conditions(row)): row for row in rows}
    rows = list(latest.values())
    metric = "perplexity" if rows[0]["model"] == "smollm2" else "probe_accuracy"
    extra = [] if metric == "perplexity" else ["fp_agreement", "feature_cosine"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["bits"] if row["method"] != "FP" else 32, row["group"] if row["method"] != "FP" else None,
               row["method"], *_conditions(row))  # fmt: skip
        groups.setdefault(key, []).append(row)
    header = [metric, *extra, "quantization time (s)", "quantization CPU time (s)", "peak RSS (MB)"]
    print(f"| bits | group | method | calibration | threads | seeds | {' | '.join(header)} | code |")
    print("|---|---|---|---|---|---|" + "---|" * (len(header) + 1))
    order = {m: i for i, m in enumerate(METHODS)}
    for (bits, group, method, calibration, threads), items in sorted(
        groups.items(), key=lambda kv: (-kv[0][0], -(kv[0][1] or 10**6), order[kv[0][2]], kv[0][3:])
    ):
        cells = []
        for name in header:
            key = {"quantization time (s)": "seconds", "quantization CPU time (s)": "cpu_seconds",
                   "peak RSS (MB)": "peak_rss_mb"}.get(name, name)
            values = [item.get(key, float("nan")) for item in items]
            fmt = ".4f" if name in (metric, "fp_agreement", "feature_cosine") else ".0f"
            if metric == "perplexity" and name == metric:
                fmt = ".3f"
            mean = statistics.mean(values)
            cells.append(f"{mean:{fmt}}" + (f" ({min(values):{fmt}}-{max(values):{fmt}})" if len(values) > 1 else ""))
        seeds = ",".join(str(item["seed"]) for item in items)
        commits = ",".join(sorted({item.get("commit", "?") for item in items}))
        print(f"| {bits} | {group or 'channel'} | {method} | {calibration} | {threads} | {seeds} | {' | '.join(cells)} | {commits} |")


def _conditions(row: dict) -> tuple[int, int]:
    """What a row was measured under besides its method, setting and seed: calibration samples and torch threads
    (a row records its threads only when they are not one)."""
    return row["calibration"], row.get("threads", 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "dinov2"], required=False)
    parser.add_argument("--settings", nargs="+", default=["4:channel", "3:channel"], help="bits:group, group 'channel' or an int")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--calibration", type=int, default=None, help="samples (default: 128 chunks / 128 images)")
    parser.add_argument("--length", type=int, default=256, help="tokens per calibration chunk (SmolLM2)")
    parser.add_argument("--eval-chunks", type=int, default=40, help="held-out chunks of 256 tokens (SmolLM2)")
    parser.add_argument("--test-images", type=int, default=1000, help="Fashion-MNIST test images (DINOv2)")
    parser.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening_frac (llm-compressor's default 0.01)")
    parser.add_argument("--output", type=Path, default=None, help="JSONL file to append rows to")
    parser.add_argument("--table", action="store_true", help="print the saved rows as a markdown table and exit")
    parser.add_argument("--side-by-side", action="store_true",
                        help="run the rows at the same time (one process each) and print their wall-time ratios; "
                             "rows go to real_models_<model>_side_by_side.jsonl")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each row (recorded in the row; 1 unless given)")
    parser.add_argument("--one", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        settings = json.loads(args.one)
        print(json.dumps(run_one(settings.pop("model"), settings.pop("method"), settings.pop("bits"), settings.pop("group"), settings.pop("seed"), settings)))
        return
    if args.model is None:
        raise SystemExit("--model smollm2 or --model dinov2")
    suffix = "_side_by_side" if args.side_by_side else ""
    output = args.output or RESULTS / f"real_models_{args.model}{suffix}.jsonl"
    if args.table:
        print_table(output)
        return
    options = dict(calibration=args.calibration or 128, damp=args.damp)
    if args.threads != 1:  # rows without the key ran on one thread
        options["threads"] = args.threads
    options.update(dict(length=args.length, eval_chunks=args.eval_chunks) if args.model == "smollm2" else dict(test_images=args.test_images))
    jobs = []
    if "FP" in args.methods:
        jobs.append(dict(method="FP", bits=32, group=None, seed=0))
    for seed in args.seeds:
        for bits, group in map(parse_setting, args.settings):
            jobs += [dict(method=m, bits=bits, group=group, seed=seed) for m in args.methods if m != "FP"]
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.side_by_side:
        rows = spawn_side_by_side([dict(model=args.model, **job, **options) for job in jobs])
        with output.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        for row in rows:
            print(f"{row['method']:>22} W{row['bits']} g{row['group']} seed {row['seed']}: "
                  f"{row['seconds']:.0f}s wall ({row['seconds'] / rows[0]['seconds']:.2f}x the first) "
                  f"{row['cpu_seconds']:.0f}s CPU ({row['cpu_seconds'] / rows[0]['cpu_seconds']:.2f}x) "
                  f"{row['peak_rss_mb']:.0f}MB", flush=True)
        return
    for job in jobs:
        row = spawn(dict(model=args.model, **job, **options))
        with output.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        metric = row.get("perplexity", row.get("probe_accuracy"))
        solving = f" ({row['solve_seconds']:.0f}s of it solving layers)" if "solve_seconds" in row else ""
        print(f"{job['method']:>22} W{job['bits']} g{job['group']} seed {job['seed']}: {metric:.4f} "
              f"{row['seconds']:.0f}s wall{solving} {row['cpu_seconds']:.0f}s CPU {row['peak_rss_mb']:.0f}MB", flush=True)


if __name__ == "__main__":
    main()
