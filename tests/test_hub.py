"""Model card rendering and Hub publishing of COMQ models, against the in-process fake Hub.

``huggingface_hub`` reads ``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET`` when it is imported, so everything that talks
to the fake Hub runs in a child Python process with those variables (and a private ``HF_HOME``) set; the test
process hosts the server and inspects what was uploaded.  Card rendering and the save hook are tested in-process.
"""

from __future__ import annotations

import copy
import email.message
import logging
import hashlib
import importlib.metadata
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from huggingface_hub import EvalResult
from transformers import ViTConfig, ViTForImageClassification

from hf_comq import COMQConfig
from hf_comq.hub import (
    packed_weight_share,
    README_NAME,
    attach_model_card_hook,
    is_unedited_card,
    mark_card,
    render_model_card,
    write_model_card,
)
from tests.hub_server import FakeHub

REPO_ROOT = Path(__file__).resolve().parents[1]


def comq_config(**changes) -> COMQConfig:
    """A COMQ config as quantization leaves it: grid, solver settings and the recorded layout."""
    settings = dict(
        bits=4, group_size=32, symmetric=True, iterations=3, scale_search=False, damp=0.01,
        modules_to_not_convert=["classifier"], ignore=["classifier"], layer_type="Linear",
        calibration_description="tensor (pixel_values), 64 samples", calibration_samples=64,
    )  # fmt: skip
    return COMQConfig(**{**settings, **changes})


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    """A ViT small enough to quantize in about a second (its source is also sent to the child processes)."""
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    torch.manual_seed(seed)
    return ViTForImageClassification(config).eval()


CLIENT_PRELUDE = (
    "import json, os, sys\n"
    "import torch\n"
    "from transformers import ViTConfig, ViTForImageClassification\n\n\n" + inspect.getsource(tiny_vit)
)


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """Front matter (parsed) and body of a README."""
    match = re.match(r"\A---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match is not None, text[:200]
    return yaml.safe_load(match.group(1)), text[match.end() :]


def run_hub_client(hub: FakeHub, tmp_path: Path, body: str, args: dict[str, Any], timeout: float = 120) -> dict:
    """Run ``body`` in a fresh interpreter pointed at ``hub``; it must print one JSON object on its last line."""
    script = tmp_path / "hub_client.py"
    script.write_text(CLIENT_PRELUDE + textwrap.dedent(body), encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.pop("TRANSFORMERS_OFFLINE", None)
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_TOKEN=hub.token,
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        OMP_NUM_THREADS="2",  # tiny models: more threads only add contention with parallel test runs
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    result = subprocess.run(
        [sys.executable, str(script), json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    assert result.returncode == 0, f"client failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- the card
def test_card_names_what_plain_transformers_needs_for_the_checkpoint():
    linear = split_card(str(render_model_card(comq_config(), None, model_class="ViTForImageClassification")))[1]
    assert 'pip install "compressed-tensors>=0.18,<0.21"\n' in linear
    conv1d = comq_config(layer_type="Conv1D", group_size=None)
    gpt2 = split_card(str(render_model_card(conv1d, None, model_class="GPT2LMHeadModel")))[1]
    assert 'pip install "compressed-tensors>=0.18,<0.21" "transformers>=5.23"\n' in gpt2
    assert "loads it exactly with transformers 5.23 or later" in gpt2


def test_render_model_card_metadata_and_sections():
    metrics = {"top-1": {"fp32": 0.81234, "comq": 0.80501}, "top-5": {"fp32": 0.95, "comq": 0.94}}
    results = [EvalResult(task_type="image-classification", dataset_type="imagenet-1k", dataset_name="ImageNet",
                          metric_type="accuracy", metric_value=0.805)]  # fmt: skip
    card = render_model_card(
        comq_config(), "google/vit-base-patch16-224", metrics, "image-classification",
        model_class="ViTForImageClassification", model_id="user/vit-comq", tags=["vit", "comq"], eval_results=results,
    )  # fmt: skip
    metadata, body = split_card(str(card))
    assert metadata["library_name"] == "transformers"
    assert metadata["base_model"] == "google/vit-base-patch16-224"
    assert metadata["base_model_relation"] == "quantized"
    assert metadata["pipeline_tag"] == "image-classification"
    assert metadata["tags"] == ["comq", "compressed-tensors", "quantized", "4-bit", "vit"]
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.805
    assert card.data.eval_results[0].metric_value == 0.805  # huggingface_hub reads its own model-index back
    assert "# vit-base-patch16-224 — COMQ 4-bit" in body
    for row in (
        "| Weight bits | 4 |",
        "| Group size | 32 |",
        "| Symmetric grid | yes |",
        "| Column order | `act_order` |",
        "| Initialisation | `error_feedback` |",
        "| Coordinate-descent sweeps (max.) | 3 |",
        "| Scale refit | no (the default at 4 bits) |",
        "| Scale search | no |",
        "| Damping of the error-feedback start | 0.01 |",
        "| Column-block re-solve | yes |",
        "| Pair-move candidates per row | 32 |",
        "| Ridge term (fraction of mean diag H) | 0.0 |",
        "| Layers aimed at the full-precision outputs | yes (the default at 4 bits) |",
        "| Linear layers kept in full precision | `classifier` |",
    ):
        assert row in body, row
    # fp_target=None: the card says what the bit width and the calibration mode made of it.
    for changes, row in (
        (dict(bits=3), "yes (the default at 3 bits)"),
        (dict(bits=5), "no (the default at 5 bits)"),
        (dict(bits=3, sequential=False), "no (full-precision inputs: `sequential=False`)"),  # not the bit width's
        (dict(bits=5, fp_target=True), "yes"),
    ):
        card_body = split_card(str(render_model_card(comq_config(**changes), "google/vit-base-patch16-224", None, None)))[1]
        assert f"| Layers aimed at the full-precision outputs | {row} |" in card_body, changes
    # true_sequential=None follows the aiming, whether the bit width or fp_target decided it.
    for changes, row in (
        (dict(bits=5), "no (the default where no layers are aimed at the full-precision outputs)"),
        (dict(bits=4), "yes (the default where layers are aimed at the full-precision outputs)"),
        (dict(bits=5, fp_target=True), "yes (the default where layers are aimed at the full-precision outputs)"),
        (dict(bits=3, true_sequential=False), "no"),
    ):
        card_body = split_card(str(render_model_card(comq_config(**changes), "google/vit-base-patch16-224", None, None)))[1]
        assert f"| Block layers solved stage by stage | {row} |" in card_body, changes
    # damp=None: the card shows the damping the bit width gave the start.
    for bits, row in ((4, "0.003 (the default at 4 bits)"), (3, "0.01 (the default at 3 bits)")):
        config = comq_config(bits=bits, damp=None)
        card_body = split_card(str(render_model_card(config, "google/vit-base-patch16-224", None, None)))[1]
        assert f"| Damping of the error-feedback start | {row} |" in card_body, bits
    off = render_model_card(comq_config(pair_moves=0), "google/vit-base-patch16-224", metrics, "image-classification")
    assert "| Pair-move candidates per row | off |" in split_card(str(off))[1]
    # In-memory data: the description is shown, the meaningless default split is not.
    assert "- **Data:** tensor (pixel_values), 64 samples" in body
    assert "- **Requested samples (`num_samples`):** 128" in body
    assert "Split" not in body and "Samples used" not in body  # the data line names its samples
    assert "sequence length" not in body  # a text-only option, meaningless for an image classifier
    assert "| Metric | fp32 | comq |" in body and "| top-1 | 0.8123 | 0.805 |" in body
    # Loading: plain transformers first, then hf_comq's packed loader; no plugin import needed any more.
    assert 'ViTForImageClassification.from_pretrained("user/vit-comq")' in body
    assert 'hf_comq.load_quantized("user/vit-comq")' in body
    assert "compressed-tensors" in body and "random" not in body
    assert "| `hf_comq.load_quantized` |" in body and "| vLLM |" in body
    assert "{{" not in str(card) and "{%" not in str(card)


def test_render_local_base_model_is_not_metadata(tmp_path):
    base = tmp_path / "my-local-vit"
    base.mkdir()
    config = comq_config(group_size=None, dataset="imagenet-1k", dataset_column="image", calibration_description=None)
    metadata, body = split_card(str(render_model_card(config, str(base), None, None)))
    assert "base_model" not in metadata and "pipeline_tag" not in metadata
    assert str(tmp_path) not in body, "a local path must not leak into a published card"
    assert "a local checkpoint (`my-local-vit`)" in body
    assert "| Group size | none (one scale per output channel) |" in body
    assert "- **Max. sequence length (text inputs):** 512" in body  # task unknown: kept
    assert "- **Dataset:** imagenet-1k" in body and "- **Split:** train" in body and "- **Column:** image" in body
    assert "**Data:**" not in body  # nothing recorded yet: the dataset's own rows, not a line repeating them
    assert "No evaluation results were recorded" in body
    assert "AutoModel.from_pretrained(" in body


def test_render_recorded_data_line_is_not_repeated():
    """After calibration the data line names the dataset, split, column and samples: no rows repeat them."""
    config = comq_config(
        dataset="texts.jsonl", dataset_column="text", calibration_samples=12,
        calibration_description="local dataset 'texts.jsonl' (split train, column text), 12 samples",
    )  # fmt: skip
    body = split_card(str(render_model_card(config, None, None, "token-classification")))[1]
    assert "- **Data:** local dataset 'texts.jsonl' (split train, column text), 12 samples" in body
    for repeated in ("**Dataset:**", "**Split:**", "**Column:**", "**Samples used:**"):
        assert repeated not in body, repeated
    assert "- **Requested samples (`num_samples`):** 128" in body and "- **Sampling seed:** 0" in body


def test_a_card_of_settings_without_a_sweep_names_the_baseline_not_comq():
    """``hf-comq quantize --rtn`` (iterations=0): no COMQ step ran, and the card must not say it did."""
    card = str(render_model_card(comq_config(bits=4, init="rtn", iterations=0), "google/vit-base-patch16-224", None, None))
    _, body = split_card(card)
    assert "# vit-base-patch16-224 — RTN 4-bit" in body and "— COMQ" not in body
    assert "using **round-to-nearest** on COMQ's grid, with no COMQ coordinate\ndescent" in body
    assert "by coordinate descent, updating one weight" not in body
    assert "Only linear layers are quantized" in body
    for label in ("Column-block re-solve", "Pair-move candidates per row", "Column order"):
        assert f"| {label} | not used (no coordinate sweep) |" in body, label
    assert "| Damping of the error-feedback start | not used (error-feedback start only) |" in body
    started = str(render_model_card(comq_config(init="error_feedback", iterations=0), None, None, None))
    assert "— error-feedback rounding 4-bit" in started and "GPTQ's act-order rounding" in started
    comq = split_card(str(render_model_card(comq_config(), "google/vit-base-patch16-224", None, None)))[1]
    assert "# vit-base-patch16-224 — COMQ 4-bit" in comq and "by coordinate descent, updating one weight" in comq


def test_a_mixture_of_experts_card_counts_the_expert_layers_no_token_reached():
    config = comq_config(expert_layers_rounded=12)
    body = split_card(str(render_model_card(config, None, None, "text-generation", quantized_experts=True)))[1]
    assert ("| Mixture-of-experts weights | quantized, each expert's layers on the tokens routed to it; 12 expert "
            "layers no calibration token reached were rounded to nearest |") in body  # fmt: skip
    restored = COMQConfig.from_dict(config.to_dict())  # recorded in config.json, as the samples used are
    assert restored.expert_layers_rounded == 12
    assert COMQConfig.from_dict(comq_config().to_dict()).expert_layers_rounded is None


def test_render_flat_metrics_and_yaml_safe_tags():
    card = render_model_card(comq_config(bits=3), None, {"perplexity": 12.3456789, "note": "a|b"}, None,
                             tags=['needs: "quotes"', "3-bit"])  # fmt: skip
    metadata, body = split_card(str(card))
    assert metadata["tags"] == ["comq", "compressed-tensors", "quantized", "3-bit", 'needs: "quotes"']
    assert "| perplexity | 12.3457 |" in body and "| note | a\\|b |" in body
    small = split_card(str(render_model_card(comq_config(), None, {"kl": 8.0312e-05, "zero": 0.0}, None)))[1]
    assert "| kl | 8.03e-05 |" in small and "| zero | 0.0 |" in small  # a KL divergence was rounded to 0.0001 or 0.0


def _declared_metadata(*project_urls: str, home_page: str | None = None) -> email.message.Message:
    declared = email.message.Message()
    declared["Name"] = "hf_comq"
    for entry in project_urls:
        declared["Project-URL"] = entry
    if home_page is not None:
        declared["Home-page"] = home_page
    return declared


@pytest.mark.parametrize(
    ("declared", "link"),
    [
        (_declared_metadata("Documentation, https://docs.example.org/comq", "Homepage, https://example.org/hf_comq"),
         "https://example.org/hf_comq"),
        (_declared_metadata(home_page="https://example.org/home"), "https://example.org/home"),
        (_declared_metadata("Documentation, https://docs.example.org/comq", home_page="UNKNOWN"), None),
        (None, None),  # a source checkout that is not installed
    ],
)
def test_the_card_links_hf_comq_only_to_the_home_page_its_metadata_declares(monkeypatch, declared, link):
    def read(name):
        assert name == "hf_comq"
        if declared is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return declared

    monkeypatch.setattr(importlib.metadata, "metadata", read)
    body = split_card(str(render_model_card(comq_config(), "google/vit-base-patch16-224", None, None)))[1]
    version = COMQConfig().provenance()["hf_comq_version"]
    if link is None:
        assert f"made with\nhf_comq {version} using" in body
    else:
        assert f"[hf_comq]({link}) {version} using" in body
    assert "](https://github.com/)" not in body
    assert "[arXiv:2403.07134](https://arxiv.org/abs/2403.07134)" in body


def test_conv1d_checkpoints_are_not_offered_to_vllm():
    body = str(render_model_card(comq_config(layer_type="Conv1D", conv1d_rows=768, group_size=None), None))
    assert "| vLLM | not served" in body


@pytest.mark.parametrize(
    ("metrics", "message"),
    [({"top-1": 0.8, "top-5": {"comq": 0.9}}, "mixed entries"), ([("top-1", 0.8)], "metrics must be a dict")],
)
def test_render_rejects_bad_metrics(metrics, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        render_model_card(comq_config(), None, metrics)


# ---------------------------------------------------------------------------------------------- save hook
@pytest.fixture
def comq_like_vit():
    """A tiny ViT whose config carries a COMQ quantization config: enough for the card hook, which only reads it.

    The quantizer itself is exercised end to end by the Hub tests below.
    """
    model = tiny_vit()
    model.config.quantization_config = comq_config()
    return model


def test_save_pretrained_writes_the_card(comq_like_vit, tmp_path):
    attach_model_card_hook(comq_like_vit, base_model="google/vit-base-patch16-224")
    comq_like_vit.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    metadata, body = split_card((tmp_path / README_NAME).read_text(encoding="utf-8"))
    assert metadata == {
        "library_name": "transformers",
        "base_model": "google/vit-base-patch16-224",
        "base_model_relation": "quantized",
        "pipeline_tag": "image-classification",
        "tags": ["comq", "compressed-tensors", "quantized", "4-bit", "vit"],
    }
    assert "ViTForImageClassification.from_pretrained(" in body and "| Group size | 32 |" in body


def test_the_card_states_the_packed_size_with_scales_and_zero_points(tmp_path):
    """At 2 bits in groups of 16 with zero points the scales are a large part of the packed bytes: the
    card said "about 2/32 of the fp32 weight bytes" where they were 4.1/32."""
    from hf_comq.solver import ROUND_TO_NEAREST

    tiny_vit().save_pretrained(tmp_path / "fp")
    config = COMQConfig(bits=2, group_size=16, symmetric=False, dataset=torch.randn(4, 3, 32, 32), num_samples=4,
                        **ROUND_TO_NEAREST)  # fmt: skip
    model = ViTForImageClassification.from_pretrained(tmp_path / "fp", quantization_config=config)
    share = packed_weight_share(model)
    assert 2 / 32 + 4 / 16 / 4 < share < 3 / 32 + 5 / 16 / 4  # codes (int32 words), float32 scales, int8 zero points
    model.save_pretrained(tmp_path / "q")
    assert f"about {100 * share:.1f} % of their fp32" in (tmp_path / "q" / README_NAME).read_text()
    estimated = split_card(str(render_model_card(config, None).content))[1]
    assert f"about {100 * (2 / 8 + 5 / 16) / 4:.1f} %" in estimated  # from the settings alone
    assert "scales and zero points included" in estimated and "(integer codes, scales and zero points)" in estimated
    symmetric = split_card(str(render_model_card(COMQConfig(bits=2, group_size=16, symmetric=True), None).content))[1]
    assert "zero point" not in symmetric and "scales included" in symmetric  # a symmetric grid stores none


def test_a_mixture_of_experts_card_says_the_experts_stay_in_full_precision(tmp_path):
    from tests.tiny import tiny_model

    model = tiny_model("mixtral")
    model.config.quantization_config = comq_config(ignore=["lm_head"], modules_to_not_convert=["lm_head"])
    _, body = split_card(write_model_card(tmp_path, model).read_text(encoding="utf-8"))
    assert "| Mixture-of-experts weights | kept in full precision (82% of the parameters) |" in body
    assert "no hf_comq | does not load it" in body


def test_save_pretrained_never_overwrites_a_readme(comq_like_vit, tmp_path):
    attach_model_card_hook(comq_like_vit)
    (tmp_path / README_NAME).write_text("# My own notes\n", encoding="utf-8")
    comq_like_vit.save_pretrained(tmp_path)
    assert (tmp_path / README_NAME).read_text(encoding="utf-8") == "# My own notes\n"
    assert write_model_card(tmp_path, comq_like_vit) is None


def test_saving_again_into_the_folder_rewrites_the_card_of_the_earlier_save(comq_like_vit, tmp_path):
    attach_model_card_hook(comq_like_vit)
    comq_like_vit.save_pretrained(tmp_path)
    assert "| Weight bits | 4 |" in (tmp_path / README_NAME).read_text(encoding="utf-8")
    comq_like_vit.config.quantization_config = comq_config(bits=2)
    comq_like_vit.save_pretrained(tmp_path)
    card = (tmp_path / README_NAME).read_text(encoding="utf-8")
    assert "| Weight bits | 2 |" in card and "| Weight bits | 4 |" not in card
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / README_NAME).stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes


def test_a_card_edited_since_it_was_written_is_kept_with_a_warning(comq_like_vit, tmp_path, caplog):
    attach_model_card_hook(comq_like_vit)
    comq_like_vit.save_pretrained(tmp_path)
    readme = tmp_path / README_NAME
    edited = readme.read_text(encoding="utf-8").replace("## Limitations", "## Our results\n\nGood.\n\n## Limitations")
    readme.write_text(edited, encoding="utf-8")
    comq_like_vit.config.quantization_config = comq_config(bits=2)
    with caplog.at_level(logging.WARNING, logger="hf_comq.hub"):
        comq_like_vit.save_pretrained(tmp_path)
    assert readme.read_text(encoding="utf-8") == edited
    assert "an hf_comq card edited since it was written" in caplog.text and "delete it" in caplog.text


def test_a_card_without_a_digest_from_an_older_hf_comq_is_kept_with_a_warning(comq_like_vit, tmp_path, caplog):
    attach_model_card_hook(comq_like_vit)
    older = str(render_model_card(comq_config(), None, None, "image-classification"))  # as written before digests
    (tmp_path / README_NAME).write_text(older, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="hf_comq.hub"):
        comq_like_vit.save_pretrained(tmp_path)
    assert (tmp_path / README_NAME).read_text(encoding="utf-8") == older
    assert "written without a digest, by an older hf_comq" in caplog.text
    caplog.clear()
    (tmp_path / README_NAME).write_text("# My own notes\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="hf_comq.hub"):
        comq_like_vit.save_pretrained(tmp_path)
    assert caplog.text == ""  # the user's own README: kept without a word


def test_a_marked_card_is_unedited_until_its_text_or_metadata_changes():
    card = mark_card(str(render_model_card(comq_config(), None, None, "image-classification")))
    assert is_unedited_card(card) and card.rstrip().endswith("-->")
    metadata_end = card.index("\n---", 3)
    with_tags = card[:metadata_end] + "\n- another-tag" + card[metadata_end:]  # a push adds tags to the metadata
    assert is_unedited_card(with_tags)
    assert not is_unedited_card(card.replace("| Weight bits | 4 |", "| Weight bits | 3 |"))
    assert not is_unedited_card(card[:metadata_end] + "\nlicense: apache-2.0" + card[metadata_end:])  # the user's
    assert not is_unedited_card("# My own notes\n")
    metadata, body = card[3:metadata_end], card[metadata_end + 4 :]
    relaid = "---\n" + yaml.safe_dump(yaml.safe_load(metadata), default_flow_style=True) + "---" + body
    assert is_unedited_card(relaid)  # the same metadata in another YAML layout is no edit


def test_a_card_of_an_earlier_hf_comq_with_its_body_digested_alone_still_reads_unedited():
    card = str(render_model_card(comq_config(), None, None, "image-classification"))
    body = card[card.index("\n---", 3) + 4 :]
    digest = hashlib.sha256(body.strip().encode("utf-8")).hexdigest()[:16]
    marked = card.rstrip("\n") + f"\n\n<!-- hf_comq model card {digest}: saving the model here again rewrites this card unless it is edited -->\n"
    assert is_unedited_card(marked)


def test_attach_is_idempotent_and_updates_metrics(comq_like_vit, tmp_path):
    attach_model_card_hook(comq_like_vit)
    first_save = comq_like_vit.save_pretrained
    attach_model_card_hook(comq_like_vit, metrics={"top-1": 0.5}, base_model="google/vit-base-patch16-224")
    assert comq_like_vit.__dict__["save_pretrained"] is first_save  # not wrapped twice
    written = write_model_card(tmp_path, comq_like_vit)
    metadata, body = split_card(written.read_text(encoding="utf-8"))
    assert metadata["base_model"] == "google/vit-base-patch16-224"
    assert "| top-1 | 0.5 |" in body
    # recorded with the settings too: a card written when the saved checkpoint is saved again still names it
    assert comq_like_vit.config.quantization_config.to_dict()["comq"]["base_model"] == "google/vit-base-patch16-224"


def test_card_hook_follows_deep_copies(comq_like_vit, tmp_path):
    attach_model_card_hook(comq_like_vit)
    clone = copy.deepcopy(comq_like_vit)
    assert clone.save_pretrained.model is clone, "a copy must save itself, not the original"
    clone.save_pretrained(tmp_path)
    assert (tmp_path / README_NAME).is_file()


def test_a_hooked_model_survives_torch_save_and_pickle(comq_like_vit, tmp_path):
    attach_model_card_hook(comq_like_vit)
    torch.save(comq_like_vit, tmp_path / "model.pt")
    restored = torch.load(tmp_path / "model.pt", weights_only=False)
    assert restored.save_pretrained.model is restored
    restored.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / README_NAME).is_file()
    assert torch.equal(restored(torch.ones(1, 3, 32, 32)).logits, comq_like_vit(torch.ones(1, 3, 32, 32)).logits)


def test_no_card_once_the_model_is_no_longer_quantized(comq_like_vit, tmp_path):
    attach_model_card_hook(comq_like_vit)
    del comq_like_vit.config.quantization_config  # what model.dequantize() does
    comq_like_vit.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / README_NAME).exists()


def test_a_dequantized_model_saved_where_its_card_was_removes_the_card(comq_like_vit, tmp_path):
    """The unedited card of the packed save stayed beside the dense weights, still saying 4-bit."""
    attach_model_card_hook(comq_like_vit)
    comq_like_vit.save_pretrained(tmp_path)
    assert is_unedited_card((tmp_path / README_NAME).read_text(encoding="utf-8"))
    del comq_like_vit.config.quantization_config  # what model.dequantize() does
    comq_like_vit.save_pretrained(tmp_path)
    assert not (tmp_path / README_NAME).exists()


def test_a_sharded_save_removes_the_single_file_weights_of_an_earlier_save(comq_like_vit, tmp_path):
    """Loaders take model.safetensors first: beside a new sharded save it loaded as the earlier model."""
    attach_model_card_hook(comq_like_vit)
    comq_like_vit.save_pretrained(tmp_path)
    comq_like_vit.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    comq_like_vit.save_pretrained(tmp_path)  # and back: transformers removes the shards, not their index
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "model.safetensors.index.json").exists()
    del comq_like_vit.config.quantization_config  # dequantized since: the same clean-up
    comq_like_vit.save_pretrained(tmp_path / "dense")
    comq_like_vit.save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    assert not (tmp_path / "dense" / "model.safetensors").exists()


def test_card_hook_rejects_models_not_quantized_with_comq(tmp_path):
    with pytest.raises(ValueError, match="no quantization_config"):
        attach_model_card_hook(tiny_vit())
    with pytest.raises(ValueError, match="no quantization_config"):
        write_model_card(tmp_path, tiny_vit())
    assert not (tmp_path / README_NAME).exists()


# ---------------------------------------------------------------------------------------------- fake Hub
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 must never go via a proxy


def _post(url: str, payload: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
    try:
        with _DIRECT.open(request, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


def test_fake_hub_is_strict_where_the_hub_is():
    """A push that passes against the fake Hub must have authenticated and uploaded every LFS object."""
    with FakeHub(max_lifetime_s=30) as server:
        status, _ = _post(f"{server.url}/api/repos/create", b'{"name": "strict"}', {})
        assert status == 401
        auth = {"Authorization": f"Bearer {server.token}"}
        assert _post(f"{server.url}/api/repos/create", b'{"name": "strict"}', auth)[0] == 200
        commit = b"\n".join(
            [
                b'{"key": "header", "value": {"summary": "weights"}}',
                b'{"key": "lfsFile", "value": {"path": "model.safetensors", "algo": "sha256", "oid": "'
                + b"0" * 64
                + b'", "size": 3}}',
            ]
        )
        headers = {**auth, "Content-Type": "application/x-ndjson"}
        assert _post(f"{server.url}/api/models/user/strict/commit/main", commit, headers)[0] == 400
        assert list(server.files("user/strict")) == [".gitattributes"]
        status, headers = _post(f"{server.url}/api/models/user/missing/commit/main", commit, headers)
        assert (status, headers.get("X-Error-Code")) == (404, "RepoNotFound")


HUB_ROUND_TRIP = """
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError
from transformers import ViTForImageClassification
from hf_comq import COMQConfig
from hf_comq.hub import attach_model_card_hook, render_model_card

args = json.loads(sys.argv[1])
api = HfApi()

# 1. Protocol round trip with a plain model, then a card uploaded on its own.
repo = "user/plain-vit"
model = tiny_vit()
model.push_to_hub(repo)
card = str(render_model_card(COMQConfig.from_dict(args["config"]), "google/vit-base-patch16-224", None,
                             "image-classification", model_class="ViTForImageClassification", model_id=repo))
api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo, commit_message="COMQ card")
model.push_to_hub(repo)  # the weights did not change: their LFS object must not be uploaded again
reloaded = ViTForImageClassification.from_pretrained(repo).eval()
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
with torch.no_grad():
    identical = torch.equal(model(x).logits, reloaded(x).logits)
try:
    hf_hub_download(repo, "missing.txt")
    missing_file_error = None
except EntryNotFoundError as error:
    missing_file_error = type(error).__name__

# 2. The card hook on push_to_hub (the config is all it reads): a new repository gets the COMQ card ...
comq_like = tiny_vit(seed=1)
comq_like.config.quantization_config = COMQConfig.from_dict(args["config"])
attach_model_card_hook(comq_like)
comq_like.push_to_hub("user/comq-like", tags=["demo"])
# ... and a repository that already has a README keeps it, with the COMQ tags added.
api.create_repo("user/has-card")
api.upload_file(path_or_fileobj=b"---\\ntags:\\n- mine\\n---\\n# My notes\\n", path_in_repo="README.md",
                repo_id="user/has-card")
comq_like.push_to_hub("user/has-card")
# 3. Pushed again after requantizing: the unedited card of the first push is replaced.
comq_like.push_to_hub("user/re-pushed")
comq_like.config.quantization_config = COMQConfig.from_dict(args["config_2_bits"])
comq_like.push_to_hub("user/re-pushed")
# 4. A COMQ card edited on the Hub is kept, and the push says its settings may be stale.
comq_like.push_to_hub("user/edited")
edited = ModelCard.load("user/edited")
edited.text = edited.text + "\\nMy own notes.\\n"
edited.push_to_hub("user/edited")
import logging
warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("hf_comq").addHandler(handler)
comq_like.push_to_hub("user/edited")
# 5. A name without an owner goes to the token's user; the card names the repository that exists.
comq_like.push_to_hub("bare-name")
# 6. Pushed with its card, then dequantized (no quantization_config left) and pushed again from the same folder.
import tempfile
dequantized_folder = tempfile.mkdtemp()
comq_like.save_pretrained(dequantized_folder, push_to_hub=True, repo_id="user/dequantized")
del comq_like.config.quantization_config
comq_like.save_pretrained(dequantized_folder, push_to_hub=True, repo_id="user/dequantized")
dequantized_local_readme = os.path.exists(os.path.join(dequantized_folder, "README.md"))

print(json.dumps({
    "edited_warnings": warnings,
    "dequantized_local_readme": dequantized_local_readme,
    "identical": identical,
    "card_tags": ModelCard.load(repo).data.tags,
    "files": sorted(api.list_repo_files(repo)),
    "snapshot": sorted(os.listdir(snapshot_download(repo))),
    "missing_file_error": missing_file_error,
}))
"""


@pytest.fixture(scope="module")
def hub_round_trip(tmp_path_factory):
    """Push/pull plain and card-hooked models against one fake Hub; the tests below inspect the outcome."""
    tmp_path = tmp_path_factory.mktemp("hub-round-trip")
    with FakeHub(max_lifetime_s=240) as server:
        configs = {"config": comq_config().to_dict(), "config_2_bits": comq_config(bits=2).to_dict()}
        result = run_hub_client(server, tmp_path, HUB_ROUND_TRIP, configs)
        yield server, result


def test_fake_hub_round_trip_of_a_plain_model(hub_round_trip):
    server, result = hub_round_trip
    assert result["identical"]
    assert result["files"] == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    assert result["snapshot"] == result["files"]
    assert result["card_tags"] == ["comq", "compressed-tensors", "quantized", "4-bit"]
    assert result["missing_file_error"] == "RemoteEntryNotFoundError"
    stored = server.stored("user/plain-vit")
    assert stored["model.safetensors"].lfs and not stored["config.json"].lfs
    assert ("POST", "/api/validate-yaml") in server.requests
    lfs_puts = [path for method, path in server.requests if method == "PUT" and path.startswith("/__lfs__/")]
    weights = {server.stored(repo)["model.safetensors"].sha256 for repo in ("user/plain-vit", "user/comq-like")}
    # Each distinct weights file is uploaded once, although "user/plain-vit" was pushed twice.
    assert sorted(lfs_puts) == sorted(f"/__lfs__/{sha}" for sha in weights)


def test_push_to_hub_replaces_the_generic_card(hub_round_trip):
    server, _ = hub_round_trip
    metadata, body = split_card(server.files("user/comq-like")["README.md"].decode("utf-8"))
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-classification"
    assert metadata["tags"] == ["comq", "compressed-tensors", "quantized", "4-bit", "vit", "demo"]
    assert 'ViTForImageClassification.from_pretrained("user/comq-like")' in body
    assert "| Group size | 32 |" in body and "This is the model card of a" not in body
    # One push, one commit after the repository's initial one: weights, config and card together.
    assert [commit.title for commit in server._repo("user/comq-like").commits][1:] == ["Upload COMQ-quantized model"]


def test_push_to_hub_replaces_the_unedited_card_of_an_earlier_push(hub_round_trip):
    server, _ = hub_round_trip
    metadata, body = split_card(server.files("user/re-pushed")["README.md"].decode("utf-8"))
    assert "| Weight bits | 2 |" in body and "| Weight bits | 4 |" not in body
    assert metadata["tags"] == ["comq", "compressed-tensors", "quantized", "2-bit", "vit"]


def test_push_to_hub_keeps_a_comq_card_edited_on_the_hub_with_a_warning(hub_round_trip):
    server, result = hub_round_trip
    assert "My own notes." in server.files("user/edited")["README.md"].decode("utf-8")
    assert any("kept the README.md of user/edited: an hf_comq card edited on the Hub" in line
               for line in result["edited_warnings"])  # fmt: skip


def test_push_to_hub_of_a_name_without_owner_names_the_owners_repository_in_the_card(hub_round_trip):
    server, _ = hub_round_trip
    body = split_card(server.files("user/bare-name")["README.md"].decode("utf-8"))[1]
    assert 'from_pretrained("user/bare-name")' in body and '"bare-name"' not in body


def test_a_dequantized_model_is_pushed_without_the_card_of_its_packed_push(hub_round_trip):
    """save_pretrained(push_to_hub=True) of a model dequantized since quantization uploaded nothing at
    first; then, through transformers' push, it brought back the COMQ card of the earlier push."""
    server, result = hub_round_trip
    files = server.files("user/dequantized")
    assert "model.safetensors" in files and "quantization_config" not in json.loads(files["config.json"])
    assert "README.md" not in files and not result["dequantized_local_readme"]
    assert server._repo("user/dequantized").commits[-1].title == "Upload model"


def test_push_to_hub_keeps_an_existing_readme_and_adds_the_tags(hub_round_trip):
    server, _ = hub_round_trip
    metadata, body = split_card(server.files("user/has-card")["README.md"].decode("utf-8"))
    assert body.strip() == "# My notes"
    assert metadata["tags"] == ["mine", "comq", "compressed-tensors", "quantized", "4-bit", "vit"]


QUANTIZED_PUSH = """
import torch
import hf_comq
from hf_comq import COMQConfig
from transformers import ViTForImageClassification


def read_text(path):
    return open(path, encoding="utf-8").read() if os.path.exists(path) else None


args = json.loads(sys.argv[1])
base = os.path.join(args["work"], "tiny-vit-base")
tiny_vit().save_pretrained(base)
generator = torch.Generator().manual_seed(1)
calibration = torch.randn(8, 3, 32, 32, generator=generator)
x = torch.randn(2, 3, 32, 32, generator=generator)
model = ViTForImageClassification.from_pretrained(
    base, quantization_config=COMQConfig(bits=4, dataset=calibration, num_samples=8, iterations=1)
).eval()
with torch.no_grad():
    expected = model(x).logits
hooked_on_load = "save_pretrained" in model.__dict__
local = os.path.join(args["work"], "local-save")
model.save_pretrained(local)

# 1. A new repository: push_to_hub uploads the COMQ card; plain transformers and hf_comq both load it back.
model.push_to_hub("user/comq-vit", tags=["demo"])
plain = ViTForImageClassification.from_pretrained("user/comq-vit").eval()
reloaded = hf_comq.load_quantized("user/comq-vit").eval()
with torch.no_grad():
    got, plain_got = reloaded(x).logits, plain(x).logits

# 2. save_pretrained(push_to_hub=True) of the reloaded (packed) model.
from huggingface_hub import HfApi
resaved = os.path.join(args["work"], "resaved")
os.makedirs(os.path.join(resaved, "notes"))
for leftover in ("notes/mine.txt", "model.safetensors.index.json"):  # the user's file, an earlier sharded save's
    with open(os.path.join(resaved, leftover), "w") as handle:
        handle.write("{}")
reloaded.save_pretrained(resaved, push_to_hub=True, repo_id="user/resaved")

# 2b. Saved and pushed again from that folder in shards: the single file of the first push goes, here and there.
reloaded.save_pretrained(resaved, push_to_hub=True, repo_id="user/resaved", max_shard_size="20KB")

# 2c. model.push_to_hub in one file over that sharded push, then in shards over a single-file one: each
# push removes the other layout's weight files from the repository.
reloaded.push_to_hub("user/resaved")
after_single = sorted(HfApi().list_repo_files("user/resaved"))
reloaded.push_to_hub("user/resaved", max_shard_size="20KB")
after_sharded = sorted(HfApi().list_repo_files("user/resaved"))

# 3. Branches.  A COMQ card pushed to "dev" first; then the owner writes main's README; a second push to dev
# replaces dev's unedited card (the README read is dev's, not main's) and leaves main as the owner wrote it.
api = HfApi()
reloaded.push_to_hub("user/branched", revision="dev")
api.upload_file(path_or_fileobj=b"---\\nlicense: mit\\n---\\n# The owner's text\\n", path_in_repo="README.md",
                repo_id="user/branched")
reloaded.push_to_hub("user/branched", revision="dev")  # the same files: nothing to commit
# save_pretrained(push_to_hub=True) into a folder that holds the user's own README: the push goes to the
# branch asked for, and the local README stays the user's (the repository's own README is kept on the Hub).
with_notes = os.path.join(args["work"], "with-notes")
os.makedirs(with_notes)
with open(os.path.join(with_notes, "README.md"), "w") as handle:
    handle.write("# My local notes\\n")
reloaded.save_pretrained(with_notes, push_to_hub=True, repo_id="user/branched", revision="notes")
print(json.dumps({
    "hooked_on_load": hooked_on_load,
    "local_readme": read_text(os.path.join(local, "README.md")),
    "identical": torch.equal(expected, got),
    "plain_identical": torch.equal(expected, plain_got),
    "layer_types": sorted({type(module).__name__ for module in reloaded.modules()}),
    "resaved_readme": read_text(os.path.join(resaved, "README.md")),
    "local_notes": read_text(os.path.join(with_notes, "README.md")),
    "after_single": after_single,
    "after_sharded": after_sharded,
}))
"""


@pytest.fixture(scope="module")
def quantized_push(tmp_path_factory):
    """Quantize, push, reload and re-push a tiny ViT against one fake Hub; tests below inspect the outcome."""
    tmp_path = tmp_path_factory.mktemp("quantized-push")
    with FakeHub(max_lifetime_s=240) as server:
        result = run_hub_client(server, tmp_path, QUANTIZED_PUSH, {"work": str(tmp_path)}, timeout=180)
        yield server, result


def test_quantizer_attaches_the_card_hook(quantized_push):
    """Quantizing during from_pretrained is enough for save_pretrained to write the card."""
    _, result = quantized_push
    assert result["hooked_on_load"], "the COMQ quantizer must call hf_comq.hub.attach_model_card_hook(model)"
    assert result["local_readme"] is not None
    metadata, body = split_card(result["local_readme"])
    assert metadata["tags"][:4] == ["comq", "compressed-tensors", "quantized", "4-bit"]
    assert metadata["pipeline_tag"] == "image-classification"
    assert "base_model" not in metadata  # quantized from a local folder
    assert "tensor (pixel_values), 8 samples" in body


def test_pushed_comq_model_loads_back_identical(quantized_push):
    server, result = quantized_push
    assert result["identical"] and result["plain_identical"]
    assert "COMQLinear" in result["layer_types"]
    stored = server.stored("user/comq-vit")
    assert stored["model.safetensors"].lfs
    config = json.loads(stored["config.json"].data)["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["config_groups"]["group_0"]["weights"]["num_bits"] == 4


def test_push_to_hub_uploads_the_card_of_a_quantized_model(quantized_push):
    server, _ = quantized_push
    metadata, body = split_card(server.files("user/comq-vit")["README.md"].decode("utf-8"))
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-classification"
    assert metadata["tags"][:4] == ["comq", "compressed-tensors", "quantized", "4-bit"]
    assert {"demo", "vit"} <= set(metadata["tags"])
    assert 'ViTForImageClassification.from_pretrained("user/comq-vit")' in body
    assert 'hf_comq.load_quantized("user/comq-vit")' in body
    assert "| Weight bits | 4 |" in body and "tensor (pixel_values), 8 samples" in body
    assert [commit.title for commit in server._repo("user/comq-vit").commits][1:] == ["Upload COMQ-quantized model"]


def test_save_pretrained_push_to_hub_uploads_only_what_the_save_wrote(quantized_push):
    """As transformers' own push: the user's other files in the folder and an earlier save's leftovers stay local."""
    server, _ = quantized_push
    first_push = server._repo("user/resaved").commits[1].files
    assert sorted(first_push) == [".gitattributes", "README.md", "config.json", "model.safetensors"]


def test_a_sharded_push_over_a_single_file_one_removes_the_single_file_from_the_hub(quantized_push):
    """The Hub kept the first push's model.safetensors beside the new shards, and loaded it first."""
    server, _ = quantized_push
    files = server.files("user/resaved")
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert any(name.startswith("model-00001-of-") for name in files)


def test_a_push_in_one_layout_removes_the_other_layouts_weight_files_from_the_hub(quantized_push):
    """An earlier push's index and shards stayed beside a new single file (index-following loaders such as
    vLLM read the old shards), and its single file beside new shards (every loader reads it first)."""
    _, result = quantized_push
    assert [name for name in result["after_single"] if name.startswith("model")] == ["model.safetensors"]
    sharded = [name for name in result["after_sharded"] if name.startswith("model")]
    assert "model.safetensors" not in sharded and "model.safetensors.index.json" in sharded and len(sharded) > 2


def test_save_pretrained_push_to_hub_uploads_the_card(quantized_push):
    server, result = quantized_push
    uploaded = server.files("user/resaved")["README.md"].decode("utf-8")
    assert result["resaved_readme"] is not None
    assert uploaded == result["resaved_readme"], "the local folder and the Hub must hold the same card"
    metadata, body = split_card(uploaded)
    assert metadata["tags"][:4] == ["comq", "compressed-tensors", "quantized", "4-bit"]
    assert "base_model" not in metadata  # quantized from a local folder, recorded by name only
    assert "a local checkpoint (`tiny-vit-base`)" in body  # the provenance travelled through the checkpoint
    assert 'from_pretrained("user/resaved")' in body


def test_a_push_to_a_branch_reads_and_writes_that_branch_only(quantized_push):
    """``revision=`` was dropped by ``save_pretrained(push_to_hub=True)`` (the commit went to main), and
    ``push_to_hub(revision=)`` judged the README to keep by main's, uploading the owner's text to the branch."""
    server, result = quantized_push
    dev = server.files("user/branched", "dev")
    assert is_unedited_card(dev["README.md"].decode("utf-8")) and "model.safetensors" in dev
    # the card's snippets load the branch the card is on, not main (which holds no weights here)
    assert 'hf_comq.load_quantized("user/branched", revision="dev")' in dev["README.md"].decode("utf-8")
    assert server.files("user/branched")["README.md"] == b"---\nlicense: mit\n---\n# The owner's text\n"
    assert "model.safetensors" not in server.files("user/branched")  # main: only the owner's upload
    notes = server.files("user/branched", "notes")
    assert "model.safetensors" in notes and notes["README.md"].startswith(b"---\nlicense: mit")


def test_save_pretrained_push_to_hub_leaves_the_local_readme_as_it_was(quantized_push):
    """The push wrote the README it uploaded (here the repository's own) over the folder's, the user's notes."""
    _, result = quantized_push
    assert result["local_notes"] == "# My local notes\n"


CLI_PUSH = """
import shutil
from hf_comq.cli import main
from tests.tiny import image_processor

args = json.loads(sys.argv[1])
base = os.path.join(args["work"], "tiny-vit-base")
tiny_vit().save_pretrained(base)
image_processor().save_pretrained(base)
argv = ["quantize", base, "--dataset", args["images"], "--output", os.path.join(args["work"], "out"),
        "--push-to-hub", "cli-push", "--num-samples", "4", "--rtn"]
token = os.environ["HF_TOKEN"]
os.environ["HF_TOKEN"] = "hf_not_the_token"
refused = main(argv)
refused_before_work = not os.path.exists(os.path.join(args["work"], "out"))
os.environ["HF_TOKEN"] = token
pushed = main(argv)
shutil.rmtree(os.path.join(args["work"], "out"))
private_over_public = main(argv + ["--private"])  # the repository exists now, and is public
print(json.dumps({"refused": refused, "refused_before_work": refused_before_work, "pushed": pushed,
                  "private_over_public": private_over_public,
                  "private_refused_before_work": not os.path.exists(os.path.join(args["work"], "out"))}))
"""


def test_cli_push_checks_the_token_first_and_leaves_the_visibility_to_the_account(tmp_path):
    """A token the Hub rejects is found before any work; without --private the repository gets the account's
    default visibility (an organisation's may be private), and a name without owner goes to the token's user.
    --private for a repository that exists and is public is refused before any work: the Hub would keep it
    public and the model would go out."""
    from tests.tiny import image_parquet, images

    image_parquet(tmp_path / "images.parquet", images(4))
    with FakeHub(max_lifetime_s=240) as server:
        result = run_hub_client(server, tmp_path, CLI_PUSH, {"work": str(tmp_path), "images": str(tmp_path / "images.parquet")},
                                timeout=180)  # fmt: skip
        assert result == {"refused": 1, "refused_before_work": True, "pushed": 0, "private_over_public": 1,
                          "private_refused_before_work": True}  # fmt: skip
        assert [request.get("private") for request in server.create_requests] == [None]
        assert 'from_pretrained("user/cli-push")' in server.files("user/cli-push")["README.md"].decode("utf-8")


def test_a_mixture_of_experts_card_says_the_experts_are_quantized_and_who_loads_them(tmp_path):
    from tests.tiny import quantize_tiny, tiny_model

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "fp")
    model = quantize_tiny(tmp_path / "fp", type(tiny_model("qwen3_moe")), bits=4, group_size=None, symmetric=False)
    _, body = split_card(write_model_card(tmp_path, model).read_text(encoding="utf-8"))
    assert "| Mixture-of-experts weights | quantized, each expert's layers on the tokens routed to it |" in body
    assert "drops the zero points" in body and "`WNA16` MoE method, Marlin kernels" in body
    # no snippet that would fail: the Loading section offers hf_comq's loader alone
    loading = body[body.index("## Loading") : body.index("## Who can run")]
    assert "Plain transformers does not load this one" in loading and "from_pretrained(" not in loading
    assert 'hf_comq.load_quantized("' in loading


def test_a_push_removes_only_the_weight_files_transformers_reads():
    """Other tools' files (CTranslate2's model.bin, a consolidated checkpoint) are theirs: a push left them."""
    from hf_comq.hub import WEIGHT_FILE

    ours = ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
            "pytorch_model.bin", "pytorch_model-00002-of-00003.bin", "pytorch_model.bin.index.json"]  # fmt: skip
    theirs = ["model.bin", "pytorch_model.safetensors", "model-00001-of-00002.bin", "consolidated.safetensors",
              "model-fp16.safetensors", "onnx/model.safetensors", "adapter_model.safetensors"]  # fmt: skip
    assert all(WEIGHT_FILE.fullmatch(name) for name in ours)
    assert not any(WEIGHT_FILE.fullmatch(name) for name in theirs)
