"""Where a lower layer objective does not give a closer model: COMQ vs GPTQ, layer and task.

    python benchmarks/diagnose_task_gap.py --vit benchmarks/models/vit-fashion-mnist-p4 --bits 2
    python benchmarks/diagnose_task_gap.py --bits 3 --group 64      # the shipped ViT

``bench_models.py`` scores whole models; this script asks why two solvers rank
differently at the layer and at the task. It prints three tables for one Fashion-MNIST
ViT, bit width and grouping. It needs the bench environment, for GPTQ (see
``benchmarks/README.md``).

1. **Per layer, FP inputs.** Each layer is solved on the Gram matrix of 256
   calibration images. Its objective is then scored as COMQ / GPTQ act-order twice:
   on that matrix, and on one from 512 held-out test images. If the held-out ratio is
   worse than the calibration one, COMQ's extra descent over-fits the calibration
   set.
2. **KL to FP of whole models** on the 2,000 shipped test images, all through the
   same block-sequential pipeline as ``bench_models.py``. The rows are GPTQ, COMQ's
   default, the default without coordinate sweeps (``iterations=0``: the
   error-feedback start, clipping search and start choice only), and the default
   with sweeps in one block only. The last rows show which block's sweeps move the
   task-level result.
3. **The same KL on other calibration subsets** of the same size (``COMQConfig.seed``)
   for GPTQ, COMQ's default and COMQ without sweeps. A whole-model difference that
   flips from one subset to the next belongs to the draw, not to the solver.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CALIBRATION_IMAGES = 256
HELD_OUT_IMAGES = 512


def _linear_grams(model: torch.nn.Module, processor, images: list, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """``X^T X`` of the input of every layer the pipeline would quantize, over ``images``
    (FP model, all tokens)."""
    from hf_comq import HessianAccumulator
    from hf_comq.modules import find_quantizable_linears

    layers = find_quantizable_linears(model)
    accumulators = {name: HessianAccumulator(layer.in_features) for name, layer in layers.items()}
    handles = [
        layer.register_forward_hook(lambda _module, inputs, _output, name=name: accumulators[name].add(inputs[0]))
        for name, layer in layers.items()
    ]
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                model(**processor(images[start : start + batch_size], return_tensors="pt"))
    finally:
        for handle in handles:
            handle.remove()
    return {name: accumulator.result().float() for name, accumulator in accumulators.items()}


def layer_table(path: str, bits: int, group_size: int | None) -> None:
    from hf_comq.assets import demo_dataset
    from hf_comq.solver import comq_quantize, layer_objective
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from benchmarks.gptq_baseline import gptq_layer_solver

    model = AutoModelForImageClassification.from_pretrained(path).eval()
    processor = AutoImageProcessor.from_pretrained(path)
    calibration = _linear_grams(model, processor, demo_dataset("calibration")[:CALIBRATION_IMAGES]["image"])
    held_out = _linear_grams(model, processor, demo_dataset("test")[:HELD_OUT_IMAGES]["image"])
    print(f"\n### Per layer, FP inputs: COMQ / GPTQ act-order objective (W{bits}, group {group_size or 'channel'})")
    print(f"| layer | on the calibration H ({CALIBRATION_IMAGES} images) | on a held-out H ({HELD_OUT_IMAGES} test images) |")
    print("|---|---|---|")
    for name, gram in calibration.items():
        weight = model.get_submodule(name).weight.detach()
        comq = comq_quantize(weight, gram, bits=bits, group_size=group_size).dequantize().float()
        gptq = gptq_layer_solver(weight, gram, bits=bits, group_size=group_size).dequantize().float()
        ratios = [layer_objective(weight, comq, h) / layer_objective(weight, gptq, h) for h in (gram, held_out[name])]
        print(f"| {name} | {ratios[0]:.3f} | {ratios[1]:.3f} |", flush=True)


@contextlib.contextmanager
def _layer_names_to_solver(solver) -> Iterator[object]:
    """Run the calibration pipeline with ``solver(name, weight, hessian, **settings)``.

    The pipeline's solver contract has no layer name, so this diagnostic wraps the
    calibrator's private per-layer step to pass it along.
    """
    import hf_comq.calibration as calibration
    from hf_comq.calibration.sequential import _Calibrator

    current: dict[str, str] = {}
    original = _Calibrator._solve

    def quantize_layer(self, name, *rest):
        current["name"] = name
        return original(self, name, *rest)

    def named(weight, hessian, **settings):
        return solver(current["name"], weight, hessian, **settings)

    with mock.patch.object(_Calibrator, "_solve", quantize_layer), mock.patch.object(
        calibration, "quantize_model", functools.partial(calibration.quantize_model, solver=named)
    ):
        yield


class _WholeModel:
    """Quantizes the ViT through the calibration pipeline with a given layer solver and
    scores it against FP on the shipped test images."""

    def __init__(self, path: str, bits: int, group_size: int | None):
        from hf_comq.assets import demo_dataset
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.path, self.bits, self.group_size = path, bits, group_size
        self.calibration, self.test = demo_dataset("calibration"), demo_dataset("test")
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.reference = AutoModelForImageClassification.from_pretrained(path).eval()
        self._scored: dict[tuple[object, int], dict[str, float]] = {}

    def fidelity(self, solver, seed: int = 0) -> dict[str, float]:
        """``solver(name, weight, hessian, **settings)``; ``seed`` picks the calibration subset.
        Each (solver, seed) is quantized once: both tables ask for seed 0."""
        if (solver, seed) not in self._scored:
            self._scored[solver, seed] = self._quantize_and_score(solver, seed)
        return self._scored[solver, seed]

    def _quantize_and_score(self, solver, seed: int) -> dict[str, float]:
        from hf_comq import COMQConfig
        from hf_comq.evaluation import prediction_fidelity
        from transformers import AutoModelForImageClassification

        from benchmarks.gptq_baseline import PEER_CALIBRATION

        config = COMQConfig(  # every solver on the peers' calibration: only the layer solver differs
            bits=self.bits, group_size=self.group_size, dataset=self.calibration,
            num_samples=CALIBRATION_IMAGES, seed=seed, **PEER_CALIBRATION,
        )
        with _layer_names_to_solver(solver):
            model = AutoModelForImageClassification.from_pretrained(self.path, quantization_config=config).eval()
        return prediction_fidelity(model, self.reference, self.test, self.processor)


def _gptq(name, weight, hessian, **settings):
    from benchmarks.gptq_baseline import gptq_layer_solver

    return gptq_layer_solver(weight, hessian, **settings)


def _comq_sweeping_in(blocks: set[int] | None):
    """COMQ's default, with coordinate sweeps only in ``blocks`` (``None``: everywhere)."""
    from hf_comq.solver import comq_quantize

    def solver(name, weight, hessian, **settings):
        block = int(name.split(".layers.")[1].split(".")[0])
        if blocks is not None and block not in blocks:
            settings = dict(settings, iterations=0)
        return comq_quantize(weight, hessian, **settings)

    return solver


_COMQ_DEFAULT = _comq_sweeping_in(None)
_COMQ_WITHOUT_SWEEPS = _comq_sweeping_in(set())


def task_table(whole: _WholeModel) -> None:
    blocks = whole.reference.config.num_hidden_layers
    rows = [("GPTQ act-order", _gptq), ("COMQ default", _COMQ_DEFAULT),
            ("COMQ without sweeps (iterations=0)", _COMQ_WITHOUT_SWEEPS)]
    rows += [(f"COMQ, sweeps only in block {block}", _comq_sweeping_in({block})) for block in range(blocks)]
    print(f"\n### Whole model, KL to FP on the {len(whole.test)} shipped test images "
          f"(W{whole.bits}, group {whole.group_size or 'channel'}, calibration seed 0)")
    print("| solver | KL(FP ‖ quantized) x1e-3 | top-1 agreement with FP |")
    print("|---|---|---|")
    for label, solver in rows:
        fidelity = whole.fidelity(solver)
        print(f"| {label} | {1000 * fidelity['kl']:.3f} | {fidelity['agreement']:.4f} |", flush=True)


def calibration_seed_table(whole: _WholeModel, seeds: range) -> None:
    """The same comparison on other random calibration subsets of the same size: how much
    of a whole-model difference is the draw rather than the solver."""
    rows = [("GPTQ act-order", _gptq), ("COMQ default", _COMQ_DEFAULT), ("COMQ without sweeps", _COMQ_WITHOUT_SWEEPS)]
    print(f"\n### Whole model, KL to FP x1e-3 by calibration subset ({CALIBRATION_IMAGES} of the "
          f"{len(whole.calibration)} calibration images, drawn with COMQConfig.seed)")
    print("| solver | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for label, solver in rows:
        kls = [1000 * whole.fidelity(solver, seed)["kl"] for seed in seeds]
        print(f"| {label} | " + " | ".join(f"{kl:.3f}" for kl in kls) + f" | {sum(kls) / len(kls):.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vit", default="shipped", help="ViT checkpoint folder (default: the shipped demo model)")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group", type=int, default=0, help="group size; 0 for one scale per output channel")
    parser.add_argument("--seeds", type=int, default=5, help="calibration subsets for the last table")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    from hf_comq.assets import demo_model_path

    path = str(demo_model_path()) if args.vit == "shipped" else str(Path(args.vit).resolve())
    print(f"# {Path(path).name}, W{args.bits}, group {args.group or 'channel'}")
    layer_table(path, args.bits, args.group or None)
    whole = _WholeModel(path, args.bits, args.group or None)
    task_table(whole)
    calibration_seed_table(whole, range(args.seeds))


if __name__ == "__main__":
    main()
