"""Threads: is torch's default thread count ever slower than one thread for hf_comq's work?

    python benchmarks/bench_threads.py               # everything, without and with a CPU hog
    python benchmarks/bench_threads.py --parts solver evaluate --repeats 5
    python benchmarks/bench_threads.py --load hog    # only with the competing process
    python benchmarks/bench_threads.py --only ViT Llama --repeats 1

Each job runs with one torch thread and with torch's default (the machine's core
count, what a user gets without ``--threads``), interleaved, ``--repeats`` times; the
table shows the medians and the ratio default / best.  "hog" runs a busy-looping
Python process alongside, the way a shared machine looks to a user; "none" runs
without it (other users' load, if any, is still there: the load average is printed).

Jobs (no downloads):

* ``gemm``: one ``A @ B`` per size, the sweep behind ``hf_comq.threads.MIN_PARALLEL_FLOPS``
  (this one is plain torch, not hf_comq's thread policy: it shows what a thread pool
  costs per operator size);
* ``solver``: ``comq_quantize`` on layers of MiniLM (384x384, 1536x384) and
  BERT-large (4096x1024) shape with correlated synthetic inputs;
* ``quantize``: ``from_pretrained(..., quantization_config=COMQConfig(...))`` of the
  shipped Fashion-MNIST ViT (128 images), of a MiniLM-sized BERT (6 layers, hidden
  384, 64 texts of 128 tokens) and of a one-layer Llama with hidden 1024 (16 x 256
  tokens: its linear layers are above the threshold, so the default uses the pool);
* ``evaluate``: top-1 of the ViT on the 2,000 shipped test images, and the Llama's
  perplexity on 16 x 256 random tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transformers as T  # noqa: E402
from transformers.utils import logging  # noqa: E402

import hf_comq  # noqa: E402,F401  (registers the quantizer)
from hf_comq import COMQConfig, comq_quantize  # noqa: E402
from hf_comq.assets import demo_dataset, demo_model_path  # noqa: E402
from hf_comq.evaluation import perplexity, top1  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()
PARTS = ("gemm", "solver", "quantize", "evaluate")


def seconds(job: Callable[[], object]) -> float:
    start = time.perf_counter()
    job()
    return time.perf_counter() - start


def side_by_side(job: Callable[[], object], repeats: int) -> dict[int, float]:
    """Median seconds of ``job`` with 1 and with the default thread count, interleaved."""
    times: dict[int, list[float]] = {1: [], DEFAULT_THREADS: []}
    torch.set_num_threads(1)
    job()  # warm-up (first-call costs are not what this measures)
    for _ in range(repeats):
        for threads in times:
            torch.set_num_threads(threads)
            times[threads].append(seconds(job))
    torch.set_num_threads(DEFAULT_THREADS)
    return {threads: statistics.median(values) for threads, values in times.items()}


def row(name: str, measured: dict[int, float]) -> str:
    one, default = measured[1], measured[DEFAULT_THREADS]
    return f"| {name} | {one:.3f} | {default:.3f} | {default / one:.2f} | {default / min(one, default):.2f} |"


# ---------------------------------------------------------------------------------------------- jobs
def gemm_jobs() -> dict[str, Callable[[], object]]:
    jobs = {}
    for m, k, n in ((512, 384, 384), (1024, 384, 1536), (2048, 576, 1536), (4096, 1024, 1024), (4096, 1024, 4096)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        jobs[f"GEMM {m}x{k}x{n} ({2 * m * k * n / 1e9:.2f} GFLOP)"] = lambda a=a, b=b: a @ b
    return jobs


def correlated_hessian(in_features: int, tokens: int = 4096) -> torch.Tensor:
    mixing = torch.randn(in_features, in_features) / in_features**0.5 + torch.eye(in_features)
    x = torch.randn(tokens, in_features) @ mixing
    return x.T @ x


def solver_jobs() -> dict[str, Callable[[], object]]:
    jobs = {}
    for out_features, in_features in ((384, 384), (1536, 384), (4096, 1024)):
        weight, hessian = torch.randn(out_features, in_features) * 0.02, correlated_hessian(in_features)
        jobs[f"comq_quantize {out_features}x{in_features} W4"] = lambda w=weight, h=hessian: comq_quantize(w, h, bits=4)
    return jobs


def mini_bert(folder: Path) -> Path:
    torch.manual_seed(0)
    config = T.BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    T.BertModel(config).save_pretrained(folder)
    return folder


def one_layer_llama(folder: Path) -> Path:
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=1, num_attention_heads=16,
        num_key_value_heads=16, bos_token_id=0, eos_token_id=0, pad_token_id=None,
    )  # fmt: skip
    T.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def quantize_jobs(workdir: Path) -> dict[str, Callable[[], object]]:
    vit, images = demo_model_path(), demo_dataset("calibration")
    bert, llama = mini_bert(workdir / "bert"), one_layer_llama(workdir / "llama")
    generator = torch.Generator().manual_seed(0)
    texts = torch.randint(1000, 30000, (64, 128), generator=generator)
    tokens = torch.randint(0, 4096, (16, 256), generator=generator)
    return {
        "quantize Fashion-MNIST ViT, 128 images": lambda: T.ViTForImageClassification.from_pretrained(
            vit, quantization_config=COMQConfig(dataset=images, num_samples=128)
        ),
        "quantize MiniLM-sized BERT, 64 x 128 tokens": lambda: T.BertModel.from_pretrained(
            bert, quantization_config=COMQConfig(dataset=texts, num_samples=64)
        ),
        "quantize 1-layer Llama h1024, 16 x 256 tokens": lambda: T.LlamaForCausalLM.from_pretrained(
            llama, quantization_config=COMQConfig(dataset=tokens, num_samples=16, batch_size=16)
        ),
    }


class IdTokenizer:
    """Texts of space-separated token ids -> ids: ``perplexity`` on a random-weight model without a vocabulary."""

    pad_token_id = 0

    def __call__(self, text: list[str], add_special_tokens: bool = True, truncation: bool = True,
                 max_length: int = 512) -> dict:
        return {"input_ids": [[int(token) for token in row.split()][:max_length] for row in text]}


def evaluate_jobs(workdir: Path) -> dict[str, Callable[[], object]]:
    vit = T.ViTForImageClassification.from_pretrained(demo_model_path()).eval()
    processor = T.AutoImageProcessor.from_pretrained(demo_model_path())
    test = demo_dataset("test")
    llama = T.LlamaForCausalLM.from_pretrained(one_layer_llama(workdir / "llama-eval")).eval()
    tokens = torch.randint(0, 4096, (16, 256), generator=torch.Generator().manual_seed(1))
    texts = [" ".join(map(str, row.tolist())) for row in tokens]
    return {
        "top-1 of the ViT, 2,000 images": lambda: top1(vit, test, processor).accuracy,
        "perplexity of the Llama, 16 x 256 tokens": lambda: perplexity(llama, IdTokenizer(), texts, batch_size=16),
    }


# ---------------------------------------------------------------------------------------------- driver
def start_hog() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--load", nargs="+", choices=("none", "hog"), default=["none", "hog"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="only the jobs whose name contains one of these (any case)")
    args = parser.parse_args()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        builders = {
            "gemm": gemm_jobs,
            "solver": solver_jobs,
            "quantize": lambda: quantize_jobs(workdir),
            "evaluate": lambda: evaluate_jobs(workdir),
        }
        jobs: dict[str, Callable[[], object]] = {}
        for part in args.parts:
            jobs.update(builders[part]())
        if args.only:
            jobs = {name: job for name, job in jobs.items() if any(text.lower() in name.lower() for text in args.only)}
            if not jobs:
                parser.error(f"--only {' '.join(args.only)} matches no job")
        for load in args.load:
            hog = start_hog() if load == "hog" else None
            try:
                time.sleep(0.5)
                print(
                    f"\n### {'with a busy-looping process alongside' if hog else 'no extra load'} "
                    f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; default = "
                    f"{DEFAULT_THREADS} torch threads; median of {args.repeats})"
                )
                print("| job | 1 thread (s) | default (s) | default / 1 thread | default / best |")
                print("|---|---|---|---|---|")
                for name, job in jobs.items():
                    print(row(name, side_by_side(job, args.repeats)), flush=True)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()


if __name__ == "__main__":
    main()
