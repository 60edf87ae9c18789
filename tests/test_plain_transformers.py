"""COMQ checkpoints load in plain transformers, without hf_comq, and reproduce the quantized model exactly.

Every checkpoint below is quantized through the real pipeline and saved; one fresh Python
process, in which ``import hf_comq`` is made impossible (``sys.modules["hf_comq"] = None``),
loads each of them with the class its config.json names and records the outputs.  They must
equal the in-memory quantized model's outputs bit for bit (fp32).  The same checkpoints also
load through ``hf_comq.load_quantized`` with their layers kept packed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_comq import COMQLinear, load_quantized
from hf_comq.kernels import DISABLE_ENV_VAR
from tests.tiny import first_output, model_inputs, quantize_tiny, tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]

# (architecture, bits, group_size, symmetric): every architecture at the default W4 per-channel asymmetric grid,
# then every bit width and both grids on an nn.Linear model (Llama) and a transformers Conv1D model (GPT-2).
CASES = [(arch, 4, None, False) for arch in ("vit", "deit", "dinov2", "bert", "gpt2", "llama", "qwen2", "mixtral", "llama4")]
CASES += [
    (arch, bits, group_size, symmetric)
    for arch in ("llama", "gpt2")
    for bits in (2, 3, 8)
    for group_size, symmetric in ((None, False), (16, True))
] + [("llama", 4, 16, False), ("llama", 4, None, True), ("gpt2", 4, 16, False), ("gpt2", 4, None, True)]
CASES += [("mixtral", 4, None, True), ("qwen3_moe", 4, None, False), ("qwen3_moe", 4, 16, True)]  # quantized experts
CASES += [("detr", 4, None, False)]

# transformers 5.2x cannot load ANY compressed-tensors checkpoint of these architectures: its compressed-tensors
# quantizer adds the packed tensor names to the model's own 1-to-2 weight converter (Dinov2's SwiGLU split), which
# then refuses to be many-to-many.  Strict, so that the day transformers fixes it this test says so.
# Llama 4 loads with the experts at random values: for a compressed-tensors checkpoint transformers swaps its batched
# experts for per-expert nn.Linear layers, whose names the checkpoint (experts batched, in full precision: they see
# every token, so COMQ leaves them) does not have.  Quantized experts (Mixtral, Qwen3-MoE) load on a symmetric grid;
# on an asymmetric one transformers' loader of packed experts drops the zero points and fails.  DETR's backbone keeps
# frozen batch norms whose weight is a buffer, which transformers' dequantizing converter fails on.
PLAIN_TRANSFORMERS_BUG = {
    "dinov2": "transformers merges compressed-tensors names into Dinov2's SwiGLU converter",
    "llama4": "transformers expects per-expert layers in a compressed-tensors Llama 4 checkpoint",
    "detr": "transformers' compressed-tensors converter dequantizes the frozen batch norms' weight buffers",
}
QUANTIZED_EXPERTS = ("mixtral", "qwen3_moe")
ASYMMETRIC_EXPERTS_BUG = "transformers' loader of packed experts drops their zero points"


def plain_transformers_bug(case: tuple) -> str | None:
    """Why plain transformers cannot load this case's checkpoint, or ``None`` when it must."""
    arch, _, _, symmetric = case
    if arch in QUANTIZED_EXPERTS and not symmetric:
        return ASYMMETRIC_EXPERTS_BUG
    return PLAIN_TRANSFORMERS_BUG.get(arch)

LOADER = """
import json, sys, traceback
sys.modules["hf_comq"] = None  # the plugin must not be needed
import torch
import transformers

cases = json.loads(sys.argv[1])
results = {}
for key, path in cases.items():
    try:
        config = json.load(open(f"{path}/config.json"))
        cls = getattr(transformers, config["architectures"][0])
        model = cls.from_pretrained(path).eval()
        inputs = torch.load(f"{path}/inputs.pt")
        with torch.no_grad():
            output = model(**inputs)
        output = output.logits if hasattr(output, "logits") else output.last_hidden_state
        torch.save(output, f"{path}/plain_output.pt")
        results[key] = "ok"
    except Exception as error:
        results[key] = f"{type(error).__name__}: {error}"[:500]
print(json.dumps(results))
"""


def case_id(case: tuple) -> str:
    arch, bits, group_size, symmetric = case
    return f"{arch}-w{bits}-{'g' + str(group_size) if group_size else 'channel'}-{'sym' if symmetric else 'asym'}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{case id: (folder, quantized model output)}`` for every case, plus the plain-loading outcome."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests and the loading process run: a MoE's expert products vary with threads
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(DISABLE_ENV_VAR, "1")  # the exact path: dequantize + F.linear, as plain transformers does
            built = _build_and_load_plain(tmp_path_factory.mktemp("interop"))
    finally:
        torch.set_num_threads(threads)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DISABLE_ENV_VAR, "1")
        yield built


def _build_and_load_plain(root: Path) -> dict:
    saved, expected = {}, {}
    for case in CASES:
        arch, bits, group_size, symmetric = case
        key = case_id(case)
        fp_path = root / f"fp-{arch}"
        if not fp_path.exists():
            tiny_model(arch).save_pretrained(fp_path)
        model = quantize_tiny(fp_path, type(tiny_model(arch)), bits=bits, group_size=group_size, symmetric=symmetric)
        inputs = model_inputs(model)
        expected[key] = first_output(model, inputs)
        model.save_pretrained(root / key)
        torch.save(inputs, root / key / "inputs.pt")
        saved[key] = str(root / key)
    environment = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOADER), json.dumps(saved)],
        capture_output=True, text=True, timeout=300, env=environment, cwd=root,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    return {key: (saved[key], expected[key], outcome[key]) for key in saved}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_plain_transformers_reproduces_the_quantized_model(checkpoints, case):
    path, expected, outcome = checkpoints[case_id(case)]
    reproduced = outcome == "ok" and torch.equal(torch.load(Path(path) / "plain_output.pt"), expected)
    bug = plain_transformers_bug(case)
    if bug is not None:
        assert not reproduced, "transformers can load this checkpoint now: drop it from plain_transformers_bug"
        pytest.xfail(bug)
    assert outcome == "ok", outcome
    assert reproduced


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_load_quantized_keeps_the_layers_packed_and_exact(checkpoints, case, monkeypatch):
    path, expected, _ = checkpoints[case_id(case)]
    model = load_quantized(path).eval()
    layers = [module for module in model.modules() if isinstance(module, COMQLinear)]
    assert layers and all(layer.bits == case[1] and layer.symmetric == case[3] for layer in layers)
    kept = set(json.loads((Path(path) / "config.json").read_text())["quantization_config"]["ignore"])
    assert all(name in kept for name, module in model.named_modules() if type(module) is torch.nn.Linear)
    inputs = torch.load(Path(path) / "inputs.pt")
    assert torch.equal(first_output(model, inputs), expected)  # the exact path
    monkeypatch.delenv(DISABLE_ENV_VAR)
    torch.testing.assert_close(first_output(model, inputs), expected, rtol=1e-4, atol=1e-5)  # the packed kernel


def test_the_checkpoint_declares_compressed_tensors_and_keeps_the_comq_provenance(checkpoints):
    path, _, _ = checkpoints[case_id(("llama", 3, 16, True))]
    stored = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "compressed-tensors" and stored["format"] == "pack-quantized"
    weights = stored["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"], weights["symmetric"]) == (3, "group", 16, True)
    assert stored["ignore"] == ["lm_head"]
    provenance = stored["comq"]
    assert provenance["hf_comq_version"] and provenance["base_model_folder"] == "fp-llama" and not provenance["base_model"]
    assert provenance["calibration"]["samples_used"] == 8 and provenance["solver"]["init"] == "rtn"
    resaved = Path(path).parent / "resaved"
    load_quantized(path).save_pretrained(resaved)
    assert json.loads((resaved / "config.json").read_text())["quantization_config"] == stored


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_layers_of_eight_outputs_at_4_bits_asymmetric_are_named_where_plain_transformers_fails(
    tmp_path, caplog, symmetric
):
    """A key/value projection of one 8-wide head: compressed-tensors unpacks its zero points (one int32 row,
    several groups) through a byte view it refuses.  hf_comq warns before calibrating, the card says plain
    transformers does not load it, load_quantized does; symmetric grids store no zero points and load."""
    import logging

    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, head_dim=8,
                           num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=0)  # fmt: skip
    T.LlamaForCausalLM(config).save_pretrained(tmp_path / "fp")
    with caplog.at_level(logging.WARNING):
        model = quantize_tiny(tmp_path / "fp", T.LlamaForCausalLM, bits=4, group_size=8, symmetric=symmetric)
    model.save_pretrained(tmp_path / "q")
    inputs = model_inputs(model)
    torch.save(inputs, tmp_path / "q" / "inputs.pt")
    card = (tmp_path / "q" / "README.md").read_text(encoding="utf-8")
    named = "unpack the 4-bit zero points of layers with 8 or fewer outputs (`model.layers.0.self_attn.k_proj`"
    assert (named in card) is not symmetric
    assert ("cannot unpack their zero points" in caplog.text) is not symmetric
    loaded = load_quantized(tmp_path / "q")
    assert torch.equal(first_output(loaded, inputs), first_output(model, inputs))
    environment = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOADER), json.dumps({"q": str(tmp_path / "q")})],
        capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path,
    )  # fmt: skip
    outcome = json.loads(result.stdout.strip().splitlines()[-1])["q"]
    if symmetric:
        assert outcome == "ok", outcome
    else:
        assert outcome != "ok", "compressed-tensors loads it now: drop zero_points_plain_loading_fails_on"
