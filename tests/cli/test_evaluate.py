"""``hf-comq evaluate`` after ``quantize``: the metric of each model kind, with and without a reference."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers as T

from tests.cli.helpers import error_line, run_cli
from tests.tiny import chat_tokenizer, gray_images, image_parquet, image_processor, sentences, tiny_vit


def test_quantize_and_evaluate_a_grayscale_vit(capsys, tmp_path, monkeypatch) -> None:
    """A one-channel model on one-channel images, through the CLI (before: every image was made RGB and rejected).
    The packed model, not the full-precision reference, has the CPU kernel built before its progress bar."""
    model_dir = tmp_path / "gray-vit"
    tiny_vit(num_channels=1, num_labels=3).save_pretrained(model_dir)
    image_processor(channels=1).save_pretrained(model_dir)
    data = image_parquet(tmp_path / "gray.parquet", gray_images(12))
    output = tmp_path / "gray-w4"
    code, _, err = run_cli(capsys, "quantize", model_dir, "--dataset", data, "--num-samples", 8, "--output", output)
    assert code == 0, err
    built_for = []
    monkeypatch.setattr("hf_comq.kernels.build_ahead", lambda: built_for.append("packed"))
    code, out, err = run_cli(capsys, "evaluate", output, "--dataset", data, "--reference", model_dir)
    assert code == 0, err
    assert re.search(r"top-1 accuracy of gray-w4: \d\.\d{4} on 12 images", out), out
    assert built_for == ["packed"]  # once: the reference loads in full precision


def test_quantize_and_evaluate_a_causal_lm(capsys, tmp_path, gpt2_dir, text_data) -> None:
    output = tmp_path / "gpt2-w8"
    code, out, err = run_cli(
        capsys, "quantize", gpt2_dir, "--bits", 8, "--dataset", text_data, "--num-samples", 8, "--output", output
    )
    assert code == 0, err
    assert "(GPT2LMHeadModel, causal LM)" in out
    assert (output / "tokenizer.json").is_file()
    code, out, err = run_cli(capsys, "evaluate", output, "--dataset", text_data, "--reference", gpt2_dir, "--limit", 6)
    assert code == 0, err
    quantized = re.search(r"perplexity of gpt2-w8: ([\d.]+) on 6 texts", out)
    assert "is a quantized checkpoint" not in err
    reference = re.search(r"perplexity of the reference \S+: ([\d.]+) \(([\d.]+)x\)", out)
    assert quantized and reference, out
    # 8-bit weights barely change a model: perplexities within 2 %
    assert float(quantized.group(1)) == pytest.approx(float(reference.group(1)), rel=0.02)
    # the arguments swapped: said before the numbers, which are against the quantized model
    code, _, err = run_cli(capsys, "evaluate", gpt2_dir, "--dataset", text_data, "--reference", output, "--limit", 2)
    assert code == 0 and f"note: --reference {output} is a quantized checkpoint (compressed-tensors)" in err


def test_evaluate_passes_over_missing_and_empty_texts_as_calibration_does(capsys, tmp_path, gpt2_dir) -> None:
    """A null in a text column stopped evaluate ("does not hold text") where quantize skips it."""
    texts = sentences(5)
    holes, whole = tmp_path / "holes.jsonl", tmp_path / "whole.jsonl"
    holes.write_text("".join(json.dumps({"text": text}) + "\n" for text in [texts[0], None, *texts[1:3], "", *texts[3:]]))
    whole.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    scores = []
    for data in (holes, whole):
        code, out, err = run_cli(capsys, "evaluate", gpt2_dir, "--dataset", data)
        assert code == 0, err
        scores.append(re.search(r"perplexity of \S+: ([\d.]+) on 5 texts", out).group(1))
    assert scores[0] == scores[1]


def test_evaluate_writes_chat_conversations_with_the_chat_template(capsys, tmp_path, gpt2_dir) -> None:
    """A ``messages`` column was refused ("holds chat, but ... takes text"); it is now written out as
    calibration writes it: the chat template's text, with one BOS.  A tokenizer without a template
    is named before any weight loads."""
    chat_model = tmp_path / "gpt2-chat"
    T.GPT2LMHeadModel.from_pretrained(gpt2_dir).save_pretrained(chat_model)
    chat_tokenizer().save_pretrained(chat_model)
    texts = sentences(5)
    chats, plain = tmp_path / "chats.jsonl", tmp_path / "plain.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": text}]}) + "\n" for text in texts))
    plain.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    scores = {}
    for data in (chats, plain):
        code, out, err = run_cli(capsys, "evaluate", chat_model, "--dataset", data)
        assert code == 0, err
        scores[data] = re.search(r"perplexity of gpt2-chat: ([\d.]+) on 5 texts", out).group(1)
    assert scores[chats] == scores[plain]  # the template writes BOS + content; the tokenizer adds BOS to plain text
    code, _, err = run_cli(capsys, "evaluate", gpt2_dir, "--dataset", chats)
    assert code == 1
    assert re.match(r"hf-comq: error: the evaluation data is chat conversations, but \w+ has no chat template", error_line(err))


def test_quantize_and_evaluate_a_text_encoder(capsys, tmp_path, bert_dir, text_data) -> None:
    output = tmp_path / "bert-w4"
    code, _, err = run_cli(
        capsys, "quantize", bert_dir, "--dataset", text_data, "--num-samples", 8, "--group-size", 16, "--output", output
    )
    assert code == 0, err
    weights = json.loads((output / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["group_size"] == 16
    code, out, err = run_cli(capsys, "evaluate", output, "--dataset", text_data, "--reference", bert_dir)
    assert code == 0, err
    match = re.search(r"embedding cosine of bert-w4 to \S+: ([\d.]+) on 12 texts", out)
    assert match, out
    assert 0.9 < float(match.group(1)) < 0.9999

    code, _, err = run_cli(capsys, "evaluate", output, "--dataset", text_data)
    assert code == 1
    assert "needs --reference FP_MODEL" in error_line(err)


def test_quantize_a_sequence_to_sequence_lm_and_evaluate_refuses_it(capsys, tmp_path, text_data) -> None:
    """T5 makes no decoder inputs itself: calibration runs its decoder on the texts shifted right."""
    from hf_comq import COMQLinear, load_quantized
    from tests.cli.helpers import save_text_model

    config = T.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0)
    torch.manual_seed(0)
    folder = save_text_model(T.T5ForConditionalGeneration(config), tmp_path / "t5")
    output = tmp_path / "t5-w4"
    code, out, err = run_cli(capsys, "quantize", folder, "--dataset", text_data, "--num-samples", 8, "--output", output)
    assert code == 0, err
    assert "(T5ForConditionalGeneration, sequence-to-sequence LM)" in out
    layers = [name for name, module in load_quantized(output).named_modules() if isinstance(module, COMQLinear)]
    assert len(layers) == 32 and any(name.startswith("decoder.block.1.layer.1.EncDecAttention") for name in layers)
    code, _, err = run_cli(capsys, "evaluate", output, "--dataset", text_data)
    assert code == 1
    assert "cannot evaluate T5ForConditionalGeneration" in error_line(err)


def test_unknown_label_column(capsys, vit_dir, image_data) -> None:
    code, _, err = run_cli(capsys, "evaluate", vit_dir, "--dataset", image_data, "--label-column", "target")
    assert code == 1
    assert "label dataset column 'target' does not exist" in error_line(err)


def test_text_given_to_an_image_model_is_named_before_its_missing_labels(capsys, vit_dir, text_data) -> None:
    """A text file has no label column either: the message named that, not the mistake."""
    code, _, err = run_cli(capsys, "evaluate", vit_dir, "--dataset", text_data)
    assert code == 1
    assert "column 'text' holds text, but" in error_line(err) and "takes images" in error_line(err)


def test_evaluate_reads_the_texts_of_a_tokenized_dataset_not_its_token_ids(capsys, tmp_path, gpt2_dir) -> None:
    """A tokenized text dataset keeps its texts beside input_ids: evaluate picked input_ids (calibration's
    order) and then refused them as list values."""
    import datasets

    texts = sentences(6)
    path = tmp_path / "tokenized.parquet"
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]] * len(texts), "text": texts}).to_parquet(path)
    code, out, err = run_cli(capsys, "evaluate", gpt2_dir, "--dataset", path)
    assert code == 0, err
    assert "perplexity" in out
