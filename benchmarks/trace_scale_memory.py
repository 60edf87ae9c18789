"""Where the memory of a disk-offloaded quantization goes: resident memory after each step of the first blocks.

A companion to ``bench_scale.py memory`` (run that first: it builds the random models
under ``/tmp/bench_scale``).  Wraps the calibration driver's steps and prints, after
each (and before a block is onloaded and before its forward), the peak (``VmHWM``)
and current anonymous and file-backed resident memory in MiB, so a peak can be
pinned on its step (Gram-matrix accumulation, a layer solve, an install).
Diagnostic only: it patches private methods of the driver.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/trace_scale_memory.py tinyllama-1b 512 --blocks 2

With ``--mappings N`` it also prints, at the end, the N mappings whose resident memory
grew the most since the imports (``/proc/self/smaps``: a library's file, the checkpoint,
``[heap]``, or ``[anon]`` for unnamed memory), which says whose pages a peak holds.
With ``--step-peaks`` each line's ``VmHWM`` is the peak of that step alone (Linux resets
it after every line; ``run peak`` keeps the run's), which pins the run's peak on its step.
With ``--ranks N --rank R`` it traces one of N gloo ranks; start each rank's process with the
same ``--port``.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_scale import SHAPES, WORK, join_loopback_ranks, reset_peak, status_mb  # noqa: E402


STEP_PEAKS = {"on": False, "peak": 0}


def memory(tag: str) -> None:
    """Print the resident memory now; with ``--step-peaks`` the peak is this step's own, then reset."""
    values = {key: int(mb) for key, mb in status_mb(("VmHWM", "VmRSS", "RssAnon", "RssFile")).items()}
    if STEP_PEAKS["on"]:
        STEP_PEAKS["peak"] = max(STEP_PEAKS["peak"], values["VmHWM"])
        values["run peak"] = STEP_PEAKS["peak"]
        reset_peak()
    print(f"{tag:50s} {values}", flush=True)


def resident_by_mapping() -> collections.Counter:
    """Resident KiB per mapped file (or ``[heap]``, ``[stack]``, ``[anon]`` for unnamed memory)."""
    resident: collections.Counter = collections.Counter()
    name = "[anon]"
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
                name = fields[5] if len(fields) > 5 else "[anon]"
            elif fields[0] == "Rss:":
                resident[name] += int(fields[1])
    return resident


def print_growth(before: collections.Counter, count: int) -> None:
    after = resident_by_mapping()
    growth = {name: after[name] - before[name] for name in set(before) | set(after)}
    print(f"resident memory grown since the imports, by mapping (MiB; all: {sum(growth.values()) / 1024:.1f}):")
    for name, kib in sorted(growth.items(), key=lambda item: -abs(item[1]))[:count]:
        print(f"  {kib / 1024:7.1f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("budget_mb", type=int)
    parser.add_argument("--blocks", type=int, default=2, help="trace this many blocks, then stop")
    parser.add_argument("--fp-target", action="store_true", help="quantize with fp_target=True")
    parser.add_argument("--true-sequential", action="store_true", help="quantize with true_sequential=True")
    parser.add_argument("--sum-dtype", default="float64", choices=["float64", "float32"], help="COMQConfig(sum_dtype=...)")
    parser.add_argument("--solver", default="rtn", choices=["rtn", "default"], help="round to nearest or the default COMQ solver")
    parser.add_argument("--mappings", type=int, default=0, help="at the end, the N mappings that grew the most")
    parser.add_argument("--rank", type=int, default=0, help="with --ranks: this process's rank")
    parser.add_argument("--ranks", type=int, default=1,
                        help="trace one of this many gloo ranks (start each with its --rank and the same --port)")
    parser.add_argument("--port", type=int, default=29517, help="with --ranks: the rendezvous port on 127.0.0.1")
    parser.add_argument("--step-peaks", action="store_true",
                        help="VmHWM is each step's own peak (reset after every line); 'run peak' keeps the run's")
    args = parser.parse_args()
    STEP_PEAKS["on"] = args.step_peaks

    import accelerate  # noqa: F401  everything the run imports, before the first line
    import datasets  # noqa: F401
    import torch
    import transformers as T
    import transformers.models.llama.modeling_llama  # noqa: F401

    import hf_comq.calibration.sequential as sequential
    from hf_comq import COMQConfig
    from hf_comq.solver import ROUND_TO_NEAREST

    torch.set_num_threads(2 if args.ranks == 1 else 1)
    if args.ranks > 1:  # as bench_scale.py memory --memory-ranks starts them
        join_loopback_ranks(args.rank, args.ranks, args.port)
    memory("after imports")
    if args.mappings:  # also when the trace stops early, by SystemExit
        atexit.register(print_growth, resident_by_mapping(), args.mappings)
    done = []

    def traced(method: str):
        original = getattr(sequential._Calibrator, method)

        def wrapper(self, *positional, **keywords):
            # what loading, onloading and the forward each add
            if method in ("_capture_pass", "_process_block", "_process_block_in_stages", "_run_block",
                          "_run_block_with_targets"):
                memory(f"before {method}")
            result = original(self, *positional, **keywords)
            label = positional[0] if positional and isinstance(positional[0], str) else ""
            memory(f"{method} {label}")
            if method == "_process_block":
                done.append(label)
                if len(done) >= args.blocks:
                    raise SystemExit(0)
            return result

        setattr(sequential._Calibrator, method, wrapper)

    for method in ("_capture_pass", "_run_block", "_run_block_with_targets", "_solve", "_install", "_process_block",
                   "_process_block_in_stages", "_sum_over_ranks", "_gram_pass_after_products"):
        traced(method)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (8, 64), generator=torch.Generator().manual_seed(0))
    config = COMQConfig(
        dataset=ids, num_samples=8, batch_size=4, bits=4, group_size=64, fp_target=args.fp_target,
        true_sequential=args.true_sequential, sum_dtype=args.sum_dtype, **(ROUND_TO_NEAREST if args.solver == "rtn" else {})
    )
    T.AutoModelForCausalLM.from_pretrained(
        WORK / args.shape, quantization_config=config, device_map="auto", max_memory={"cpu": f"{args.budget_mb}MiB"},
        offload_folder=str(WORK / (f"offload-trace-{args.shape}" + (f"-rank{args.rank}" if args.ranks > 1 else ""))),
        dtype=torch.bfloat16,
    )  # fmt: skip


if __name__ == "__main__":
    main()
