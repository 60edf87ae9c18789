"""Quantize a model with COMQ, publish it on the Hugging Face Hub, and load it back from there.

The pushed checkpoint is a compressed-tensors ``pack-quantized`` checkpoint: this
example quantizes on load, ``model.push_to_hub(repo_id)`` (one commit with the
weights, the config and a model card that names COMQ, the bit width and the
calibration data), then loads the repository back twice -- with plain
transformers (``from_pretrained``; no hf_comq needed, the weights come back
dense) and with ``hf_comq.load_quantized`` (the layers stay packed) -- and
compares both with the pushed model's logits.  The dequantized weights are
bit-identical; plain transformers' dense matmul sums in another order than
hf_comq's packed kernel, so its logits differ by float32 rounding (about 1e-6).

Requirements:

* A Hub access token with write permission: run ``hf auth login`` once, or set
  ``HF_TOKEN`` in the environment (``--token`` also works, but ends up in your
  shell history).  Without one the push fails with an authentication error.
* Network access to the Hub.  ``HF_ENDPOINT`` points huggingface_hub at
  another endpoint instead of https://huggingface.co, e.g. a mirror or a
  private Hub inside your company: ``HF_ENDPOINT=https://hub.example.com``.

With no MODEL it quantizes the ViT shipped inside hf_comq on the shipped
Fashion-MNIST calibration images::

    HF_TOKEN=hf_... python examples/push_to_hub.py your-name/vit-fashion-mnist-comq-w4 --bits 4

Another image classifier needs its own images (``--dataset``, a name or path with an image column,
split as ``--split`` and ``--test-split`` say): calibrated on another model's data, it would be
published quantized for the wrong inputs::

    python examples/push_to_hub.py your-name/my-vit-comq-w4 path/to/my-vit --dataset path/to/images
"""

from __future__ import annotations

import argparse
import sys

import huggingface_hub
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

from huggingface_hub.utils import validate_repo_id

import hf_comq
from hf_comq.assets import demo_dataset, demo_model_path
from hf_comq.evaluation import load_eval_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Quantize an image classifier with COMQ, push it to the Hub, and reload it with load_quantized.",
        epilog="Needs a Hub token with write access (hf auth login or HF_TOKEN); HF_ENDPOINT selects another Hub.",
    )
    parser.add_argument("repo_id", help="Hub repository to create or update, e.g. your-name/vit-comq-w4")
    parser.add_argument(
        "model", nargs="?", default=None, help="image classifier folder or Hub id (default: the shipped demo ViT)"
    )
    parser.add_argument(
        "--dataset", default=None, help="images to calibrate on, a name or path (needed with MODEL; default: the demo's)"
    )
    parser.add_argument("--split", default="calibration", help="split to calibrate on (default: calibration)")
    parser.add_argument("--test-split", default="test", help="split whose first images check the reloads (default: test)")
    parser.add_argument("--column", default=None, help="the image column (default: the one holding images)")
    parser.add_argument("--bits", type=int, default=4, help="weight bit width, 2 to 8 (default: 4)")
    parser.add_argument("--group-size", type=int, default=None, help="input columns per scale (default: per channel)")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration images (default: 128)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="Hub token (default: the saved login or HF_TOKEN)")
    return parser.parse_args(argv)


def hub_user(token: str | None) -> str:
    """The account the token belongs to; exits with one clear line when there is none.

    Checked before quantizing, so a missing or wrong token costs a second, not
    a whole calibration run that is then thrown away.
    """
    endpoint = huggingface_hub.constants.ENDPOINT
    try:
        return huggingface_hub.whoami(token=token)["name"]
    except (huggingface_hub.errors.LocalTokenNotFoundError, huggingface_hub.errors.HfHubHTTPError) as error:
        # no saved token, or one the Hub answered about (rejected, or without rights)
        raise SystemExit(
            f"cannot push to {endpoint}: {first_line(error)} (log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    except Exception as error:  # offline mode, or no answer at all (any HTTP client's error): the network
        raise SystemExit(f"cannot reach {endpoint} to push: {first_line(error)} (check the connection)") from None


def first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def images(dataset: str | None, split: str, limit: int | None = None):
    """The demo's images, or ``split`` of ``dataset`` (the first ``limit`` rows)."""
    data = demo_dataset(split) if dataset is None else load_eval_dataset(dataset, split)
    if limit is not None:
        data = data.select(range(min(limit, len(data)))) if hasattr(data, "__len__") else data.take(limit)
    return data


def test_images(args: argparse.Namespace) -> list:
    """The first images of ``--test-split``, read before any work: a split or column that is not there
    would otherwise be found after the push."""
    rows = list(images(args.dataset, args.test_split, limit=8))
    if not rows:
        raise ValueError(f"--test-split {args.test_split!r} has no rows")
    column = args.column or next((name for name, value in rows[0].items() if isinstance(value, Image.Image)), None)
    if column not in rows[0]:
        raise ValueError(f"no image column {column or ''} in --test-split {args.test_split!r}; name it with --column")
    return [row[column] for row in rows]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is not None and args.dataset is None:
        sys.exit("push_to_hub.py: error: MODEL needs its own images (--dataset); the shipped ones are the demo ViT's")
    try:  # the repository id and the settings before the Hub is asked or any weight loads
        validate_repo_id(args.repo_id)
        hf_comq.COMQConfig(bits=args.bits, group_size=args.group_size, num_samples=args.num_samples)
    except (ValueError, huggingface_hub.errors.HFValidationError) as error:
        sys.exit(f"push_to_hub.py: error: {first_line(error)}")
    user = hub_user(args.token)
    print(f"pushing as {user}")
    repo_id = args.repo_id if "/" in args.repo_id else f"{user}/{args.repo_id}"  # where create_repo puts a bare name
    private = True if args.private else None  # None: the account's default visibility (an organisation's may be private)
    model_path = args.model or str(demo_model_path())
    try:
        test = test_images(args)
        processor = AutoImageProcessor.from_pretrained(model_path)
        config = hf_comq.COMQConfig(
            bits=args.bits,
            group_size=args.group_size,
            dataset=images(args.dataset, args.split),
            dataset_column=args.column,
            processor=processor,
            num_samples=args.num_samples,
        )
        model = AutoModelForImageClassification.from_pretrained(model_path, quantization_config=config).eval()
    except (ValueError, OSError) as error:  # hf_comq's one-line refusals come before any weight loads
        sys.exit(f"push_to_hub.py: error: {' '.join(str(error).split())}")

    model.push_to_hub(repo_id, private=private, token=args.token)
    # The processor travels with the model so that the Hub repository is usable on its own.
    processor.push_to_hub(repo_id, private=private, token=args.token)
    print(f"pushed to {repo_id}")

    pixels = processor(images=test, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        expected = model(pixel_values=pixels).logits
        for how, reloaded in (
            ("plain transformers", AutoModelForImageClassification.from_pretrained(repo_id, token=args.token)),
            ("hf_comq.load_quantized", hf_comq.load_quantized(repo_id, token=args.token)),
        ):
            difference = (expected - reloaded.eval()(pixel_values=pixels).logits).abs().max().item()
            print(f"reloaded {repo_id} with {how}; max logit difference to the pushed model: {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
