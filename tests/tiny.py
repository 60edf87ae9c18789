"""Tiny models, processors and data shared by the test modules (no downloads).

A plain module rather than a conftest: tests import these builders directly.
"""

from __future__ import annotations

import torch
import transformers as T
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = "the a cat dog sat on mat ran fast slow big small red blue green house tree sky sun moon".split()


def tiny_vit(**overrides) -> T.ViTForImageClassification:
    config = T.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return T.ViTForImageClassification(config).eval()


def tiny_model(kind: str) -> torch.nn.Module:
    """A tiny, seeded, eval-mode instance of one architecture the issue lists."""
    torch.manual_seed(0)
    return _BUILDERS[kind]().eval()


def tiny_models() -> dict[str, torch.nn.Module]:
    """One tiny instance of every architecture the issue lists."""
    return {kind: tiny_model(kind) for kind in _BUILDERS}


_TEXT = {"vocab_size": 64}
_VISION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
_BUILDERS = {
    "vit": tiny_vit,
    "vit_model": lambda: T.ViTModel(T.ViTConfig(**_VISION, intermediate_size=64)),
    "deit": lambda: T.DeiTForImageClassification(T.DeiTConfig(**_VISION, intermediate_size=64)),
    "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(**_VISION, mlp_ratio=2)),
    "swin": lambda: T.SwinForImageClassification(
        T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4)
    ),
    "bert": lambda: T.BertForSequenceClassification(
        T.BertConfig(**_TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    ),
    "gpt2": lambda: T.GPT2LMHeadModel(
        T.GPT2Config(**_TEXT, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    ),
    "llama": lambda: T.LlamaForCausalLM(
        T.LlamaConfig(
            **_TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=None,
        )
    ),
    "qwen2": lambda: T.Qwen2ForCausalLM(
        T.Qwen2Config(
            **_TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=None,
        )
    ),
    # Mixtures of experts: transformers 5 keeps the experts as batched 3-D parameters, which COMQ quantizes per
    # expert (Mixtral's checkpoint names them w1/w3/w2); Llama 4's experts see every token and stay in full
    # precision, and its router is an nn.Linear subclass whose forward also picks the experts.
    "mixtral": lambda: T.MixtralForCausalLM(
        T.MixtralConfig(
            **_TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, bos_token_id=0, eos_token_id=0,
            pad_token_id=None,
        )
    ),
    "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(
        T.Qwen3MoeConfig(
            **_TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, bos_token_id=0,
            eos_token_id=0, pad_token_id=None,
        )
    ),
    "llama4": lambda: T.Llama4ForCausalLM(
        T.Llama4TextConfig(
            **_TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            intermediate_size=64, intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=1,
            bos_token_id=0, eos_token_id=0, pad_token_id=None,
        )
    ),
    # Frozen batch norms in its backbone: buffers named weight, which plain transformers' loader cannot take.
    "detr": lambda: T.DetrForObjectDetection(
        T.DetrConfig(
            use_timm_backbone=False, use_pretrained_backbone=False, d_model=32, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5,
            backbone_config=T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage2"]),
        )
    ),
}
ARCHITECTURES = tuple(_BUILDERS)


def word_tokenizer(with_pad: bool = True) -> T.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``WORDS`` (ids < 64, so tiny models accept them)."""
    specials = ["[PAD]", "[UNK]", "[EOS]"]
    vocab = {token: index for index, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"pad_token": "[PAD]"} if with_pad else {}
    return T.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]", **kwargs)


def chat_tokenizer() -> T.PreTrainedTokenizerFast:
    """:func:`word_tokenizer` adding a BOS, as Llama's does, with a chat template that writes one too."""
    from tokenizers import processors

    tokenizer = word_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[EOS] $A", special_tokens=[("[EOS]", tokenizer.convert_tokens_to_ids("[EOS]"))]
    )
    tokenizer.bos_token = "[EOS]"
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` random sentences of 3 to 12 words (varied lengths exercise padding)."""
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(count):
        length = int(torch.randint(3, 13, (1,), generator=generator))
        ids = torch.randint(0, len(WORDS), (length,), generator=generator).tolist()
        result.append(" ".join(WORDS[i] for i in ids))
    return result


def images(count: int, size: int = 40, seed: int = 0) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (count, size, size, 3), generator=generator, dtype=torch.uint8).numpy()
    return [Image.fromarray(array) for array in pixels]


def image_processor(channels: int = 3) -> T.ViTImageProcessor:
    """The tiny ViTs' processor; ``channels=1`` for a grayscale model (one mean and std)."""
    if channels == 3:
        return T.ViTImageProcessor(size={"height": 32, "width": 32})
    return T.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * channels, image_std=[0.5] * channels)


def image_parquet(path, pictures: list[Image.Image], num_classes: int = 3):
    """``pictures`` with labels ``0, 1, 2, 0, ...`` written as an image-classification parquet file at ``path``."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=num_classes)})
    labels = [i % num_classes for i in range(len(pictures))]
    datasets.Dataset.from_dict({"image": pictures, "label": labels}, features=features).to_parquet(path)
    return path


def gray_images(count: int, size: int = 28, seed: int = 0) -> list[Image.Image]:
    """Single-channel ("L") PIL images, as Fashion-MNIST or X-ray data come."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (count, size, size), generator=generator, dtype=torch.uint8).numpy()
    return [Image.fromarray(array, mode="L") for array in pixels]


def model_inputs(model: torch.nn.Module, count: int = 2, seed: int = 3) -> dict[str, torch.Tensor]:
    """Seeded inputs of the right kind for a tiny model: images or token ids."""
    generator = torch.Generator().manual_seed(seed)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        return {"pixel_values": torch.randn(count, 3, 32, 32, generator=generator)}
    return {"input_ids": torch.randint(0, 64, (count, 9), generator=generator)}


def first_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits, or the last hidden state of a base model, computed without gradients."""
    dtype = next(model.parameters()).dtype
    inputs = {key: value.to(dtype) if value.is_floating_point() else value for key, value in inputs.items()}
    with torch.no_grad():
        output = model(**inputs)
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def quantize_tiny(path, cls: type, **settings) -> torch.nn.Module:
    """Quantize a saved tiny checkpoint through the real pipeline, fast: round to nearest on 8 samples.

    Tests of storage and loading need valid quantized layers, not good ones.
    """
    from hf_comq import COMQConfig
    from hf_comq.solver import ROUND_TO_NEAREST

    probe = cls.from_pretrained(path)
    config = COMQConfig(dataset=model_inputs(probe, count=8, seed=1).popitem()[1], num_samples=8,
                        **{**ROUND_TO_NEAREST, **settings})  # fmt: skip
    return cls.from_pretrained(path, quantization_config=config).eval()
