"""Scale past one machine (issue 16): peak memory under disk offload, and 1 vs 2 calibration ranks.

Two measurements, each in fresh processes so one cannot inherit the other's memory:

* ``memory``: a causal LM built from a config with random weights (the SmolLM2-135M
  shape, and a TinyLlama-1.1B shape, about 1.1 B parameters in bf16) is saved once, then
  quantized by ``from_pretrained(..., device_map="auto", max_memory={"cpu": BUDGET},
  offload_folder=...)`` with a budget well below the model size, so most blocks live on
  disk.  Reported: the process's peak resident memory (``ru_maxrss``) while quantizing,
  above the resident memory right after importing everything the run uses (torch,
  transformers, datasets, accelerate, hf_comq: library code that no budget can include),
  against the budget plus one block.  Memory is the point, so the layer solver is round
  to nearest (``ROUND_TO_NEAREST``) unless ``--solver default`` asks for the default COMQ
  solver: calibration passes, Gram matrices, offload and install run as always; the
  solve is cheap.  Each model runs twice: with glibc's
  default allocator, whose dynamic mmap threshold keeps freed layer-sized buffers in
  the heap (resident memory then creeps up block after block), and with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (buffers of 64 KiB and more are returned to the
  system when freed), the setting to use for bounded-memory runs.  ``--fp-target``
  measures the same with ``fp_target=True`` (a second stream of block inputs and a
  target sum beside each Gram matrix), ``--true-sequential`` with ``true_sequential=True``
  (stage discovery runs one batch through a block with autograd recording, and the
  solved layers of a block's earlier stages wait packed beside its full-precision ones),
  ``--sum-dtype float32`` with the calibration sums in float32.  ``--memory-ranks 2`` runs the
  row as two gloo ranks on this machine, each under the budget on one thread (as
  ``torchrun --nproc-per-node 2`` would start them, both mapping the one checkpoint).
* ``solve``: peak resident memory of one layer solve alone (random weight, Gram matrix of
  random inputs), for the 1.1 B shape's widest layers, the default COMQ solver beside
  round to nearest, group 64 and per channel: what a memory-bounded run with the
  default solver adds at its widest layer, in weight-sized float32 copies (after a small
  solve in the same process, which brings in the libraries' code pages once).
* ``ranks``: calibration wall time (``quantize_model``'s own ``time_s``) of the
  SmolLM2-shaped model with the default COMQ solver, one rank on 2 threads against two
  gloo ranks on 1 thread each (the same 2 cores), interleaved, median of the repeats; and
  one process on 1 thread, the work that perfectly halved would bound the two ranks.

    python benchmarks/bench_scale.py memory --models smollm2 tinyllama-1b
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/bench_scale.py memory --fp-target --allocators MALLOC_MMAP_THRESHOLD_=65536
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/bench_scale.py memory --models tinyllama-1b --solver default --fp-target --true-sequential --allocators MALLOC_MMAP_THRESHOLD_=65536 --memory-ranks 2
    python benchmarks/bench_scale.py ranks --repeats 3
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/bench_scale.py solve
    python benchmarks/bench_scale.py all --out benchmarks/results/bench_scale.txt
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("BENCH_SCALE_WORK", "/tmp/bench_scale"))

SHAPES = {
    # SmolLM2-135M's config (HuggingFaceTB/SmolLM2-135M), random weights
    "smollm2": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
        rope_theta=100000.0,
    ),
    # TinyLlama-1.1B's shape: about 1.1 B parameters, 2.2 GB in bf16
    "tinyllama-1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048,
    ),
    # A Qwen3-MoE shape of about 0.7 B parameters (1.4 GB in bf16), nine tenths of them in 32 experts per layer:
    # the experts are split per expert (read one MoE layer at a time, offloaded again) and quantized like any layer
    "qwen3-moe-0.7b": dict(
        hidden_size=1024, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=16,
        num_key_value_heads=4, head_dim=64, vocab_size=32000, tie_word_embeddings=False,
        max_position_embeddings=2048, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
    ),
}  # fmt: skip
CONFIG_CLASSES = {"qwen3-moe-0.7b": "Qwen3MoeConfig"}
"""transformers config class of each shape, ``LlamaConfig`` unless named here."""


# ---------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------


def status_mb(keys: Iterable[str]) -> dict[str, float]:
    """Memory lines of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``RssAnon``, ...) in MiB,
    read in one pass; a key the file lacks is NaN."""
    values = dict.fromkeys(keys, float("nan"))  # in the order asked for
    with open("/proc/self/status") as status:
        for line in status:
            key = line.split(":")[0]
            if key in values:
                values[key] = int(line.split()[1]) / 1024
    return values


def _status_mb(key: str) -> float:
    """One memory line of ``/proc/self/status`` in MiB (see :func:`status_mb`)."""
    return status_mb([key])[key]


def _rss_mb() -> float:
    """Current resident memory of this process (VmRSS), in MiB."""
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Start the peak (VmHWM) again from the current resident memory (Linux), so that a
    peak read later is the one of what ran since, not of setting up its inputs."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def _peak_since_reset_mb() -> float:
    """Peak resident memory (VmHWM) since :func:`reset_peak`, in MiB."""
    return _status_mb("VmHWM")


def join_loopback_ranks(rank: int, world: int, port: int, timeout_s: float = 1800.0) -> None:
    """Join ``world`` gloo ranks that meet on 127.0.0.1:``port``, as ``torchrun`` would start this one (the
    launcher's environment, then :func:`~hf_comq.calibration.join_launcher_group`); a plain process when
    ``world == 1``."""
    from hf_comq.calibration import join_launcher_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    join_launcher_group(timeout_s=timeout_s)


def child_solve(out_features: int, in_features: int, group: int, solver: str) -> None:
    """Peak RSS of one ``comq_quantize`` call above the RSS holding its inputs (one JSON line)."""
    import torch

    from hf_comq.solver import ROUND_TO_NEAREST, comq_quantize

    torch.set_num_threads(1)
    settings = ROUND_TO_NEAREST if solver == "rtn" else {}
    # A small solve first: a process's first solve brings in code pages of torch's
    # libraries and of the compiled kernel, once per process, not this solve's work space.
    sample = torch.randn(256, 128)
    comq_quantize(torch.randn(64, 128), sample.T @ sample, bits=4, group_size=group or None, **settings)
    del sample
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(4096, in_features, generator=generator) * torch.rand(in_features, generator=generator)
    hessian = inputs.T @ inputs
    del inputs
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    before = _rss_mb()
    reset_peak()  # making the inputs peaked above what holds them (each product's operand beside it)
    started = time.perf_counter()
    # overwrite_hessian, as the calibration driver passes for a Gram matrix no other layer reads
    solved = comq_quantize(weight, hessian, bits=4, group_size=group or None, overwrite_hessian=True, **settings)
    seconds = time.perf_counter() - started
    above = _peak_since_reset_mb() - before
    weight_mb = out_features * in_features * 4 / 2**20
    print(json.dumps({"shape": f"{out_features}x{in_features}", "group": group or "channel", "solver": solver,
                      "weight_f32_mb": round(weight_mb, 1), "hessian_f32_mb": round(in_features**2 * 4 / 2**20, 1),
                      "peak_above_inputs_mb": round(above), "weight_copies": round(above / weight_mb, 1),
                      "seconds": round(seconds, 1), "relative_error": solved.stats["relative_error"]}))  # fmt: skip


def run_solve() -> list[dict]:
    shapes = [(5632, 2048), (2048, 5632)]  # gate/up_proj and down_proj of the 1.1 B shape
    rows = []
    for out_features, in_features in shapes:
        for group in (0, 64):
            for solver in ("default", "rtn"):
                rows.append(_last_json(_run_child(["solve", str(out_features), str(in_features), str(group), solver])))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def child_build(shape: str) -> None:
    """Save a random-weight bf16 Llama of ``shape`` under WORK (once)."""
    import torch
    import transformers as T

    folder = WORK / shape
    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    config_class = getattr(T, CONFIG_CLASSES.get(shape, "LlamaConfig"))
    config = config_class(**SHAPES[shape], bos_token_id=0, eos_token_id=0, torch_dtype="bfloat16")
    with torch.device("cpu"):
        model = T.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="500MB")


def _block_mb(model_dir: Path) -> tuple[float, float]:
    """(model size, one block's size) in MiB, from the saved bf16 weights."""
    from safetensors import safe_open

    total = block = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                size = 2
                for dim in shape:
                    size *= dim
                total += size
                if key.startswith("model.layers.0."):
                    block += size
    return total / 2**20, block / 2**20


def child_memory(
    shape: str, budget_mb: int, samples: int, length: int, fp_target: bool = False, true_sequential: bool = False,
    sum_dtype: str = "float64", solver: str = "rtn", rank: int = 0, world: int = 1, port: int = 0,
) -> None:
    """Quantize ``shape`` with ``max_memory={"cpu": budget}`` and disk offload; print one JSON line
    (with the oneDNN cache capacities the run had: the device map caps them, :mod:`hf_comq.onednn_caches`).
    ``world > 1``: this is one of that many gloo ranks, each with the budget and one thread, as torchrun
    would start them; each prints its own line, and only rank 0 writes the checkpoint."""
    import shutil

    import torch
    import transformers as T

    from hf_comq import COMQConfig
    from hf_comq.solver import ROUND_TO_NEAREST

    import accelerate  # noqa: F401  everything the run imports, before the baseline
    import datasets  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    if shape in CONFIG_CLASSES:  # its modeling code is library code too
        import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401

    import hf_comq.calibration  # noqa: F401
    from hf_comq.calibration import leave_launcher_group
    from hf_comq.onednn_caches import ONEDNN_CACHE_VARIABLES

    torch.set_num_threads(2 if world == 1 else 1)
    model_dir = WORK / shape
    offload = WORK / (f"offload-{shape}" if world == 1 else f"offload-{shape}-rank{rank}")
    out = WORK / f"quantized-{shape}"
    shutil.rmtree(offload, ignore_errors=True)
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
    if world > 1:
        join_loopback_ranks(rank, world, port)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (samples, length), generator=torch.Generator().manual_seed(0))
    config = COMQConfig(
        dataset=ids, num_samples=samples, batch_size=4, bits=4, group_size=64, fp_target=fp_target,
        true_sequential=true_sequential, sum_dtype=sum_dtype, **(ROUND_TO_NEAREST if solver == "rtn" else {}),
    )  # fmt: skip
    baseline = _rss_mb()
    started = time.perf_counter()
    model = T.AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=config, device_map="auto", max_memory={"cpu": f"{budget_mb}MiB"},
        offload_folder=str(offload), dtype=torch.bfloat16,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    peak_quantize = _peak_mb()
    devices = sorted(set(map(str, model.hf_device_map.values())))
    on_disk = sum(1 for device in model.hf_device_map.values() if device == "disk")
    model.save_pretrained(out, max_shard_size="100MB")
    peak_save = _peak_mb()
    size, block = _block_mb(model_dir)
    print(json.dumps({
        "model": shape, "model_mb": round(size), "block_mb": round(block), "budget_mb": budget_mb,
        "baseline_rss_mb": round(baseline), "peak_rss_quantize_mb": round(peak_quantize),
        "peak_rss_save_mb": round(peak_save), "devices": devices, "modules_on_disk": on_disk,
        "quantize_s": round(seconds, 1), "samples": samples, "length": length, "fp_target": fp_target,
        "true_sequential": true_sequential, "sum_dtype": sum_dtype, "solver": solver,
        "onednn_caches": {variable: os.environ.get(variable) for variable in ONEDNN_CACHE_VARIABLES},
        "rank": rank, "ranks": world,
    }), flush=True)  # fmt: skip
    if world > 1:
        leave_launcher_group()


def child_rank(rank: int, world: int, port: int, threads: int, samples: int, length: int) -> None:
    """One calibration rank (``world == 1``: a plain process); rank 0 prints one JSON line."""
    import torch
    import transformers as T

    from hf_comq import COMQConfig, calibration_summary
    from hf_comq.calibration import leave_launcher_group

    torch.set_num_threads(threads)
    join_loopback_ranks(rank, world, port, timeout_s=600)

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPES["smollm2"]["vocab_size"], (samples, length), generator=generator)
    config = COMQConfig(dataset=ids, num_samples=samples, batch_size=4, bits=4)
    started, cpu_started = time.perf_counter(), time.process_time()
    model = T.AutoModelForCausalLM.from_pretrained(WORK / "smollm2", quantization_config=config, dtype=torch.float32)
    wall = time.perf_counter() - started
    cpu = torch.tensor([time.process_time() - cpu_started], dtype=torch.float64)
    if world > 1:  # the busiest rank's CPU time: the wall time on cores nobody else uses
        torch.distributed.all_reduce(cpu, op=torch.distributed.ReduceOp.MAX)
    summary = calibration_summary(model)
    if rank == 0:
        print(json.dumps({
            "ranks": world, "threads_per_rank": threads, "calibration_s": summary["time_s"],
            "from_pretrained_s": round(wall, 2), "busiest_rank_cpu_s": round(float(cpu), 2),
            "mean_relative_error": summary["mean_relative_error"],
        }))  # fmt: skip
    leave_launcher_group()


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def _run_child(args: list[str], env: dict | None = None, timeout: int = 7200) -> str:
    return _run_children([args], env, timeout)[0]


def _run_children(argvs: list[list[str]], env: dict | None = None, timeout: int = 7200) -> list[str]:
    """Run this script's children at once (the ranks of one run, or one child) with ``env`` on top of this
    process's; their outputs in order, or the first failing child's error output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    processes = [
        subprocess.Popen([sys.executable, __file__, "child", *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
        for args in argvs
    ]
    outputs = [process.communicate(timeout=timeout) for process in processes]
    for args, process, (_, stderr) in zip(argvs, processes, outputs):
        if process.returncode != 0:
            raise RuntimeError(f"child {args} failed:\n{stderr[-3000:]}")
    return [stdout for stdout, _ in outputs]


def _last_json(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


ALLOCATORS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def run_memory(
    models: list[str], budgets: dict[str, int], samples: int, length: int, allocators: list[str], fp_target: bool,
    true_sequential: bool = False, sum_dtype: str = "float64", solver: str = "rtn", ranks: int = 1,
) -> list[dict]:  # fmt: skip
    rows = []
    for shape in models:
        _run_child(["build", shape])
        for allocator in allocators:
            rows.append(
                _memory_row(
                    shape, budgets[shape], samples, length, allocator, fp_target, true_sequential, sum_dtype, solver,
                    ranks,
                )
            )  # fmt: skip
    return rows


def _memory_row(
    shape: str, budget: int, samples: int, length: int, allocator: str, fp_target: bool, true_sequential: bool,
    sum_dtype: str = "float64", solver: str = "rtn", ranks: int = 1,
) -> dict:  # fmt: skip
    """One memory run; with ``ranks > 1`` that many gloo ranks at once, each under the budget: the row is
    rank 0's, its peak above imports the largest of any rank's (each rank's in ``rank_peaks_above_mb``)."""
    argv = [
        "memory", shape, str(budget), str(samples), str(length), str(int(fp_target)), str(int(true_sequential)),
        sum_dtype, solver,
    ]  # fmt: skip
    if ranks == 1:
        row = _last_json(_run_child(argv, env=ALLOCATORS[allocator]))
        above = row["peak_rss_quantize_mb"] - row["baseline_rss_mb"]
    else:
        port = _free_port()
        outputs = _run_children([[*argv, str(rank), str(ranks), str(port)] for rank in range(ranks)], ALLOCATORS[allocator])
        lines = [_last_json(output) for output in outputs]
        row = lines[0]
        row["rank_peaks_above_mb"] = [line["peak_rss_quantize_mb"] - line["baseline_rss_mb"] for line in lines]
        above = max(row["rank_peaks_above_mb"])
    row["allocator"] = allocator
    row["peak_above_baseline_mb"] = above
    row["target_mb"] = row["budget_mb"] + row["block_mb"]
    row["model_over_budget"] = round(row["model_mb"] / row["budget_mb"], 2)
    row["meets_target"] = above <= row["target_mb"]
    print(json.dumps(row), flush=True)
    return row


def _ranks_once(world: int, threads: int, samples: int, length: int) -> dict:
    port = _free_port()
    argvs = [["rank", str(rank), str(world), str(port), str(threads), str(samples), str(length)] for rank in range(world)]
    return _last_json(_run_children(argvs, env={"OMP_NUM_THREADS": str(threads)})[0])


RANK_LAYOUTS = ((1, 2), (2, 1), (1, 1))
"""(ranks, threads per rank) of the ranks run: the two ways to use 2 cores, and one process on one of them."""


def run_ranks(repeats: int, samples: int, length: int) -> dict:
    _run_child(["build", "smollm2"])
    rows = []
    for _ in range(repeats):  # interleaved, so every layout sees the same machine load
        for world, threads in RANK_LAYOUTS:
            row = _ranks_once(world, threads, samples, length)
            print(json.dumps(row), flush=True)
            rows.append(row)

    def median(layout: tuple[int, int], key: str) -> float:
        return statistics.median(row[key] for row in rows if (row["ranks"], row["threads_per_rank"]) == layout)

    one, two, one_thread = (median(layout, "calibration_s") for layout in RANK_LAYOUTS)
    cpu = {1: median((1, 2), "busiest_rank_cpu_s"), 2: median((2, 1), "busiest_rank_cpu_s")}
    return {"rows": rows, "median_1_rank_s": one, "median_2_ranks_s": two, "median_1_thread_s": one_thread,
            "ratio": round(two / one, 3), "ratio_to_1_thread": round(two / one_thread, 3),
            "halving_bound": round(one_thread / 2 / one, 3), "cpu_ratio": round(cpu[2] / cpu[1], 3), "cpu": cpu}  # fmt: skip


def _report(memory: list[dict], solves: list[dict], ranks: dict | None, command: str) -> str:
    lines = [f"# bench_scale ({datetime.date.today()}, {os.cpu_count()} CPU cores, shared machine)", f"# {command}", ""]
    if memory:
        lines.append("## Peak RSS while quantizing with disk offload (max_memory={'cpu': budget})")
        lines.append("model | solver | ranks | allocator | fp_target | true_sequential | sum_dtype | params MiB (bf16) | budget MiB | model/budget | one block MiB | RSS after "
                     "imports | peak RSS quantizing | peak above imports | budget + block | met | peak incl. save | "
                     "device_map entries on disk | quantize s")
        for row in memory:
            lines.append(" | ".join(str(value) for value in (
                row["model"], row.get("solver", "rtn"), row.get("ranks", 1), row["allocator"], row["fp_target"], row.get("true_sequential", False),
                row.get("sum_dtype", "float64"), row["model_mb"], row["budget_mb"], row["model_over_budget"],
                row["block_mb"],
                row["baseline_rss_mb"], row["peak_rss_quantize_mb"],
                row["peak_above_baseline_mb"] if "rank_peaks_above_mb" not in row
                else f"{row['peak_above_baseline_mb']} (ranks: {row['rank_peaks_above_mb']})",
                row["target_mb"],
                "yes" if row["meets_target"] else "NO", row["peak_rss_save_mb"], row["modules_on_disk"],
                row["quantize_s"],
            )))  # fmt: skip
        lines.append("")
    if solves:
        lines.append("## Peak RSS of one layer solve above its inputs (W4, 1 thread)")
        lines.append("shape | group | solver | weight f32 MiB | H f32 MiB | peak above inputs MiB | in weight copies | "
                     "solve s | relative error")
        for row in solves:
            lines.append(" | ".join(str(row[key]) for key in (
                "shape", "group", "solver", "weight_f32_mb", "hessian_f32_mb", "peak_above_inputs_mb", "weight_copies",
                "seconds", "relative_error")))  # fmt: skip
        lines.append("")
    if ranks:
        lines.append("## Calibration wall time, SmolLM2-135M shape (random fp32 weights), default COMQ solver, W4")
        lines.append("ranks x threads | calibration s (each repeat) | median")
        medians = (ranks["median_1_rank_s"], ranks["median_2_ranks_s"], ranks["median_1_thread_s"])
        for (world, threads), median in zip(RANK_LAYOUTS, medians):
            times = [row["calibration_s"] for row in ranks["rows"] if (row["ranks"], row["threads_per_rank"]) == (world, threads)]
            lines.append(f"{world} x {threads} | {times} | {median}")
        lines.append(f"ratio 2 ranks / 1 rank: {ranks['ratio']} (target <= 0.6)")
        lines.append(f"ratio 2 ranks / 1 rank on 1 thread: {ranks['ratio_to_1_thread']} (0.5: the work halved); "
                     f"halved, the 1-thread work would give {ranks['halving_bound']} of 1 x 2")
        lines.append(f"CPU seconds of the busiest rank, from_pretrained (median): 1 x 2: {ranks['cpu'][1]}, "
                     f"2 x 1: {ranks['cpu'][2]}; ratio {ranks['cpu_ratio']} (the share of the work the busiest "
                     "rank does; wall time follows it only where nothing else competes for the cores)")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        kind, *rest = sys.argv[2:]
        if kind == "build":
            child_build(rest[0])
        elif kind == "memory":
            child_memory(
                rest[0], int(rest[1]), int(rest[2]), int(rest[3]), bool(int(rest[4])), bool(int(rest[5])), rest[6],
                rest[7], *(int(value) for value in rest[8:11]),
            )
        elif kind == "solve":
            child_solve(int(rest[0]), int(rest[1]), int(rest[2]), rest[3])
        elif kind == "rank":
            child_rank(*(int(value) for value in rest))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["memory", "solve", "ranks", "all"])
    parser.add_argument("--models", nargs="+", default=["smollm2", "tinyllama-1b"], choices=sorted(SHAPES))
    parser.add_argument("--budget-smollm2", type=int, default=64, help="MiB of CPU memory for the 135M model")
    parser.add_argument("--budget-tinyllama-1b", type=int, default=512, help="MiB of CPU memory for the 1.1B model")
    parser.add_argument("--budget-qwen3-moe", type=int, default=256, help="MiB of CPU memory for the MoE model")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank-samples", type=int, default=32)
    parser.add_argument("--rank-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=list(ALLOCATORS))
    parser.add_argument("--fp-target", action="store_true",
                        help="memory rows with COMQConfig(fp_target=True); without it fp_target=False, the plain "
                        "calibration (the library's default aims at 4 bits and fewer: pass this and --true-sequential)")
    parser.add_argument("--true-sequential", action="store_true", help="memory rows with COMQConfig(true_sequential=True)")
    parser.add_argument("--sum-dtype", default="float64", choices=["float64", "float32"], help="COMQConfig(sum_dtype=...)")
    parser.add_argument("--solver", default="rtn", choices=["rtn", "default"],
                        help="memory rows' layer solver: round to nearest (the memory is the point) or the default COMQ solver")
    parser.add_argument("--memory-ranks", type=int, default=1,
                        help="memory rows run as this many gloo ranks at once (1 thread each), each under the budget")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    budgets = {
        "smollm2": args.budget_smollm2, "tinyllama-1b": args.budget_tinyllama_1b,
        "qwen3-moe-0.7b": args.budget_qwen3_moe,
    }  # fmt: skip
    memory = []
    if args.part in ("memory", "all"):
        memory = run_memory(
            args.models, budgets, args.samples, args.length, args.allocators, args.fp_target, args.true_sequential,
            args.sum_dtype, args.solver, args.memory_ranks,
        )  # fmt: skip
    solves = run_solve() if args.part in ("solve", "all") else []
    ranks = run_ranks(args.repeats, args.rank_samples, args.rank_length) if args.part in ("ranks", "all") else None
    report = _report(memory, solves, ranks, "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]))
    print(report)
    if args.out:
        args.out.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
