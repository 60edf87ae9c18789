"""How long ``hf-comq`` takes to answer ``--help`` and to report mistakes that need no model.

    python benchmarks/bench_cli_latency.py              # median of 3 runs per case
    python benchmarks/bench_cli_latency.py --repeats 5

Each case runs ``python -m hf_comq ...`` in a fresh process (what a user waits for,
interpreter start included) and prints the wall time and the error line.  Targets
(issue 15): ``--help`` under 1 s, every error in the table under 2 s.  A tiny ViT
checkpoint and data files are written to a temporary folder first; the Hub cases use
an endpoint nothing listens on, or ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prepare(folder: Path) -> dict[str, Path]:
    """A tiny ViT checkpoint (with processor), an image parquet file, an empty one and a file to write 'into'."""
    import datasets
    import numpy as np
    import transformers as T
    from PIL import Image

    model = folder / "tiny-vit"
    config = T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         image_size=32, patch_size=8, num_labels=3)  # fmt: skip
    T.ViTForImageClassification(config).save_pretrained(model)
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model)
    pictures = [Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)) for value in range(4)]
    datasets.Dataset.from_dict({"image": pictures, "label": [0, 1, 2, 0]}).to_parquet(folder / "images.parquet")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    datasets.Dataset.from_dict({"image": [], "label": []}, features=features).to_parquet(folder / "no-rows.parquet")
    (folder / "zero-bytes.parquet").write_bytes(b"")
    (folder / "a-file").write_text("x")
    bert = folder / "tiny-bert"
    T.BertModel(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64)).save_pretrained(bert)  # fmt: skip
    return {"model": model, "bert": bert, "data": folder / "images.parquet"}


def cases(folder: Path, paths: dict[str, Path]) -> list[tuple[str, list[str], dict[str, str]]]:
    model, data, out = str(paths["model"]), str(paths["data"]), str(folder / "out")
    quantize = ["quantize", model, "--dataset", data]
    unreachable = {"HF_ENDPOINT": "http://127.0.0.1:9"}
    return [
        ("hf-comq --help", ["--help"], {}),
        ("hf-comq quantize --help", ["quantize", "--help"], {}),
        ("missing arguments", ["quantize", model], {}),
        ("--output . (the current folder)", quantize + ["--output", "."], {}),
        ("--output inside a file (not writable)", quantize + ["--output", str(folder / "a-file" / "out")], {}),
        ("--output is the model", quantize + ["--output", model, "--overwrite"], {}),
        ("invalid --push-to-hub id", quantize + ["--output", out, "--push-to-hub", "me/my model"], {}),
        ("model 'x': Hub unreachable", ["quantize", "x", "--dataset", data, "--output", out], unreachable),
        ("model id with HF_HUB_OFFLINE=1", ["quantize", "me/vit", "--dataset", data, "--output", out],
         {"HF_HUB_OFFLINE": "1"}),  # fmt: skip
        ("dataset name, Hub unreachable", ["quantize", model, "--dataset", "beans", "--output", out], unreachable),
        ("dataset path missing", ["quantize", model, "--dataset", str(folder / "none.parquet"), "--output", out], {}),
        ("empty parquet (0 bytes)", ["quantize", model, "--dataset", str(folder / "zero-bytes.parquet"), "--output", out], {}),
        ("parquet without rows", ["evaluate", model, "--dataset", str(folder / "no-rows.parquet")], {}),
        ("evaluate --reference of another model type", ["evaluate", model, "--dataset", data, "--reference",
                                                         str(paths["bert"])], {}),  # fmt: skip
    ]


def _seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def run_case(argv: list[str], extra_env: dict[str, str], cwd: Path) -> tuple[float, int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.update(extra_env)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "hf_comq", *argv], capture_output=True, text=True, env=env, cwd=cwd)
    seconds = time.perf_counter() - started
    lines = [line for line in result.stderr.splitlines() if line.startswith("hf-comq: error:")]
    answer = lines[-1] if lines else (result.stdout.splitlines() or result.stderr.splitlines() or [""])[0]
    return seconds, result.returncode, answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = prepare(folder)
        baseline = statistics.median(_seconds([sys.executable, "-c", "pass"]) for _ in range(args.repeats))
        print(f"### hf-comq answers (median of {args.repeats}; load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores; a bare `python -c pass` takes {baseline:.2f} s)")  # fmt: skip
        print("| case | seconds | exit code | answer |")
        print("|---|---|---|---|")
        for name, argv, extra_env in cases(folder, paths):
            runs = [run_case(argv, extra_env, folder) for _ in range(args.repeats)]
            seconds = statistics.median(run[0] for run in runs)
            _, code, answer = runs[-1]
            answer = answer.replace(tmp, "TMP").replace("|", "\\|")
            print(f"| {name} | {seconds:.2f} | {code} | {answer[:150]} |", flush=True)


if __name__ == "__main__":
    main()
