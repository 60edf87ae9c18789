"""Data-parallel COMQ calibration over NCCL (issue 16): N GPU ranks against one, same samples, same checkpoint.

Run with torchrun, one rank per GPU (NCCL needs a GPU of its own per rank):

    torchrun --nproc-per-node 2 benchmarks/gpu/nccl_calibration.py --out /tmp/nccl   # N ranks
    python benchmarks/gpu/nccl_calibration.py --out /tmp/nccl --reference            # one process, one GPU

Each run quantizes the same random-weight Llama (SmolLM2-135M shape by default,
``--shape tiny`` for a 2-layer one) on the same random token ids, writes the
checkpoint (rank 0 only) to ``OUT/ranks-N`` and one JSON line with the calibration
time.  ``--compare`` (after both runs) checks that the checkpoints hold identical
tensors; on a GPU the Gram matrices are summed in float64 from float32 (TF32 is off
here) batch products, so the codes are expected to match exactly; any difference is
printed per tensor.  Layers the ranks solve in row shares (a stage of one layer, such as
o_proj and down_proj with the default's stages) run the solver's products over fewer rows;
on CPUs their codes are one process's (tests/solver/test_shares.py), on GPUs cuBLAS may pick
other kernels for narrower products, so a difference confined to those layers is rounding
there, not a wrong exchange.  ``--backend gloo`` runs the same on CPUs (what the CPU tests check).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}  # fmt: skip


def build(folder: Path, shape: str) -> None:
    """Save the random model once (by the process that gets there first; the others wait for it)."""
    import torch
    import transformers as T

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**SHAPES[shape], bos_token_id=0, eos_token_id=0))
    model.save_pretrained(folder)


def quantize(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import transformers as T

    from hf_comq import COMQConfig, calibration_summary
    from hf_comq.calibration import join_launcher_group, leave_launcher_group

    torch.backends.cuda.matmul.allow_tf32 = False  # the same float32 products on every rank and in the reference
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.backend == "nccl" and not torch.cuda.is_available():
        print("no CUDA device: skipped", file=sys.stderr)
        sys.exit(2)
    join_launcher_group(timeout_s=600, backend=args.backend)  # NCCL: each rank on GPU LOCAL_RANK; nothing alone
    base = args.out / f"base-{args.shape}"
    if rank == 0:
        build(base, args.shape)
    if world > 1:
        dist.barrier()
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.samples, args.length),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    config = COMQConfig(dataset=ids, num_samples=args.samples, batch_size=args.batch_size, bits=args.bits,
                        group_size=args.group_size)  # fmt: skip
    started = time.perf_counter()
    model = T.AutoModelForCausalLM.from_pretrained(base, quantization_config=config, dtype=torch.float32)
    wall = time.perf_counter() - started
    target = args.out / f"ranks-{world}"
    model.save_pretrained(target)  # transformers writes on rank 0 only under torch.distributed
    if world > 1:
        dist.barrier()
    leave_launcher_group()
    if rank == 0:
        summary = calibration_summary(model)
        print(json.dumps({
            "ranks": world, "backend": args.backend, "device": summary["device"], "shape": args.shape,
            "calibration_s": summary["time_s"], "from_pretrained_s": round(wall, 2),
            "layers": summary["layers_quantized"], "mean_relative_error": summary["mean_relative_error"],
            "checkpoint": str(target),
        }))  # fmt: skip


def compare(out: Path) -> int:
    """Exit status 0 when every ``ranks-N`` checkpoint holds the tensors of ``ranks-1``."""
    import torch
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        result = {}
        for file in sorted(folder.glob("*.safetensors")):
            result.update(load_file(file))
        return result

    reference = tensors(out / "ranks-1")
    status = 0
    for folder in sorted(out.glob("ranks-*")):
        if folder.name == "ranks-1":
            continue
        got = tensors(folder)
        differing = [name for name, tensor in reference.items() if name not in got or not torch.equal(got[name], tensor)]
        print(f"{folder.name}: {len(reference) - len(differing)}/{len(reference)} tensors identical to ranks-1")
        for name in differing[:10]:
            delta = (got[name].float() - reference[name].float()).abs().max().item() if name in got else "missing"
            print(f"  differs: {name} (max |delta| {delta})")
        status |= 1 if differing else 0
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--reference", action="store_true", help="one process (same as torchrun with one rank)")
    parser.add_argument("--compare", action="store_true", help="compare the checkpoints written so far")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.compare:
        sys.exit(compare(args.out))
    quantize(args)


if __name__ == "__main__":
    main()
