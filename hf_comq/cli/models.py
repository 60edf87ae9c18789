"""Models on the command line: read config.json before any weight, decide how to load, load.

Everything up to :func:`inspect_model` works from the config.json file alone, so a
wrong model name or an unsupported architecture is reported before torch is imported.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..tasks import (
    BASE_MODEL,
    SEQ2SEQ_LM,
    SUPPORTED,
    Task,
    model_inputs,
    needs_text_and_images,
    task_of,
    text_and_images_refusal,
)
from .common import CLIError

LOAD_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""The dtypes ``from_pretrained`` takes by name on the command line; ``"auto"`` is the checkpoint's own."""


@dataclass(frozen=True)
class ModelSpec:
    """What config.json says about a checkpoint, read before any weight is loaded."""

    location: str
    architecture: str
    task: Task
    inputs: str  # "images" or "text": what calibration and evaluation feed it
    config: dict[str, Any]

    @property
    def is_packed(self) -> bool:
        """A compressed-tensors pack-quantized checkpoint (what hf_comq writes): loaded with its layers packed."""
        from ..checkpoint import is_packed_checkpoint

        return is_packed_checkpoint(self.config)

    @property
    def is_local(self) -> bool:
        return Path(self.location).is_dir()

    @property
    def display_name(self) -> str:
        return Path(self.location).name if self.is_local else self.location

    def auto_class(self) -> Any:
        """The class to load with: the task's Auto class; a base model's own class (``AutoModel``
        would load a ``T5EncoderModel`` checkpoint as a ``T5Model``, which needs decoder inputs)."""
        import transformers

        if self.task is BASE_MODEL and isinstance(getattr(transformers, self.architecture, None), type):
            return getattr(transformers, self.architecture)
        return getattr(transformers, self.task.auto_class)


def inspect_model(name: str, read: tuple[str, dict[str, Any]] | None = None) -> ModelSpec:
    """Read ``name``'s config.json (unless ``read`` holds it) and decide how to load it; one clear error when we cannot."""
    location, config = read if read is not None else read_model_config(name)
    architectures = [str(arch) for arch in config.get("architectures") or []]
    model_type = config.get("model_type")
    described = f"model type {model_type!r} ({', '.join(architectures) or 'no architectures in config.json'})"
    task, architecture = task_of(architectures, model_type)
    if config.get("is_encoder_decoder") and task is not SEQ2SEQ_LM:  # its decoder would get no inputs
        raise CLIError(
            f"unsupported {described}: of encoder-decoder models hf-comq handles sequence-to-sequence LMs "
            f"(e.g. T5ForConditionalGeneration), whose decoder it runs on the calibration text; it handles {SUPPORTED}"
        )
    if task is None:
        raise CLIError(f"unsupported {described}; hf-comq handles {SUPPORTED}")
    if needs_text_and_images(architecture):
        raise CLIError(text_and_images_refusal(architecture, ""))
    inputs = model_inputs(architecture)
    if inputs is None:
        raise CLIError(
            f"unsupported {described}: COMQ calibration feeds text or images, and {architecture} takes neither"
        )
    return ModelSpec(location, architecture, task, inputs, config)


def read_model_config(name: str) -> tuple[str, dict[str, Any]]:
    """``(location, config.json)`` of a local folder or Hub id, without importing torch or transformers."""
    path = Path(name).expanduser()
    if path.exists():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CLIError(f"{name} is not a model checkpoint folder: it has no config.json")
        try:
            return str(path), json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CLIError(f"cannot read {config_file}: {error}") from None
    if not is_repo_id(name):
        raise CLIError(f"model path {name} does not exist")
    check_hub_available(name, "model", cached_file="config.json")
    from transformers import PreTrainedConfig

    try:
        config, _ = PreTrainedConfig.get_config_dict(name)
    except Exception as error:  # network, auth and missing-repo errors all end here
        raise CLIError(f"model {name!r} is not a local folder and could not be read from the Hub: {error}") from None
    return name, config


def is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_hub_available(name: str, what: str, cached_file: str | None = None) -> None:
    """Fail at once when ``name``, not a local path, would have to come from a Hub that is off or unreachable.

    The Hub client would otherwise retry for half a minute before saying the same.
    A model whose ``cached_file`` is in the local Hub cache passes: transformers can
    load it from there.
    """
    from huggingface_hub import try_to_load_from_cache

    problem = hub_unavailable()
    if problem is None:
        return
    if cached_file is not None and isinstance(try_to_load_from_cache(name, cached_file), str):
        return
    hint = "; a single word is taken as a Hub id: if it is meant as a local path, check it" if "/" not in name else ""
    raise CLIError(f"{what} {name!r} is not a local path, and the Hugging Face Hub is unavailable ({problem}){hint}")


def hub_unavailable() -> str | None:
    """Why the Hugging Face Hub cannot be used now (offline mode, or its endpoint unreachable), or ``None``."""
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else _hub_unreachable(constants.ENDPOINT)


@functools.lru_cache(maxsize=None)
def _hub_unreachable(endpoint: str) -> str | None:
    """Why the Hub at ``endpoint`` cannot be reached, or ``None`` (also when a proxy makes that undecidable here)."""
    import socket
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlsplit(endpoint)
    proxies = {scheme: proxy for scheme, proxy in urllib.request.getproxies().items() if scheme != "no"}
    if not url.hostname or (proxies and not urllib.request.proxy_bypass(url.hostname)):
        return None  # through a proxy: a direct connection says nothing (no_proxy alone names no proxy)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=2.0).close()
    except OSError as error:
        return f"cannot connect to {url.hostname}: {error.strerror or error}"
    return None


def load_model(spec: ModelSpec, **kwargs: Any) -> Any:
    """Load a checkpoint for inference: COMQ checkpoints through the verifying loader."""
    import transformers

    import hf_comq
    from hf_comq.kernels import build_ahead

    if spec.is_packed:
        model = hf_comq.load_quantized(spec.location, model_class=getattr(transformers, spec.architecture), **kwargs)
        if model.device.type == "cpu":
            build_ahead()  # its packed layers run the CPU kernel: a first build before the progress bars
        return model
    return spec.auto_class().from_pretrained(spec.location, **kwargs).eval()


def load_processor(location: str, inputs: str) -> Any:
    """The image processor or tokenizer stored with a checkpoint; one clear line, naming the fix, if there is none."""
    from ..calibration.data import load_processor as load

    try:
        return load(location, inputs)
    except ValueError:
        kind, loader = ("image processor", "AutoImageProcessor") if inputs == "images" else ("tokenizer", "AutoTokenizer")
        raise CLIError(
            f"{location} has no {kind}; save the original model's one next to the weights: "
            f"{loader}.from_pretrained(ORIGINAL).save_pretrained({str(location)!r})"
        ) from None
