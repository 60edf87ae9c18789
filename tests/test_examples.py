"""The examples and the evaluation notebook are run here, so that they cannot rot.

Examples are the first code a user copies; one that fails on a fresh install
(an API renamed, an asset moved) costs more trust than a missing one.  Each
script is run in a fresh interpreter, as a user would run it: ``--help`` for
all of them, the ViT example end to end on the shipped demo model at reduced
settings, ``push_to_hub.py`` against the in-process fake Hub, and the
notebook headless through a Jupyter kernel of this interpreter.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.hub_server import FakeHub

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
SCRIPTS = ("quantize_vit.py", "quantize_text_model.py", "push_to_hub.py")
NOTEBOOK = EXAMPLES / "evaluate.ipynb"
NOTEBOOK_TIMEOUT_S = 420  # per cell; the whole notebook takes about 2 minutes on two CPU cores


def example_env(**extra: str) -> dict[str, str]:
    """The environment of an example run: this checkout importable, no Hub access, quiet progress bars."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        OMP_NUM_THREADS="2",
    )
    env.update(extra)
    return env


def run_example(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        env=env or example_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------- --help
def test_every_example_has_a_help(tmp_path):
    # Started together: each one spends most of its time importing transformers.
    processes = {
        script: subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), "--help"],
            cwd=tmp_path, env=example_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for script in SCRIPTS
    }
    helps = {}
    for script, process in processes.items():
        stdout, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, f"{script}: {stderr[-3000:]}"
        helps[script] = stdout
    for script, text in helps.items():
        assert text.startswith("usage:"), f"{script}: {text[:300]}"
        assert "--bits" in text and "COMQ" in text, f"{script}: {text}"
    assert "--output" in helps["quantize_vit.py"] and "--group-size" in helps["quantize_vit.py"]
    assert "encoder" in helps["quantize_text_model.py"] and "causal-lm" in helps["quantize_text_model.py"]
    # The push needs credentials and may target another Hub: the help has to say how.
    assert "HF_TOKEN" in helps["push_to_hub.py"] and "HF_ENDPOINT" in helps["push_to_hub.py"]


# ---------------------------------------------------------------------------------------------- quantize_vit.py
def test_quantize_vit_on_the_demo_model(tmp_path):
    output = tmp_path / "vit-w4"
    result = run_example(
        "quantize_vit.py", "--bits", "4", "--num-samples", "32", "--eval-samples", "300", "--output", str(output),
        cwd=tmp_path,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    out = result.stdout
    fp = float(re.search(r"^FP top-1: (\d\.\d{4})$", out, re.M).group(1))
    comq = float(re.search(r"^COMQ W4 top-1: (\d\.\d{4}) \(([+-]\d+\.\d\d) points\)$", out, re.M).group(1))
    reloaded = float(re.search(r"^reloaded COMQ W4 top-1: (\d\.\d{4})$", out, re.M).group(1))
    assert "test images: 300, calibration images: 32" in out
    # A trained 10-class model, far above chance, and 4-bit COMQ close to it even on 32 calibration images.
    assert fp > 0.7, out
    assert comq > fp - 0.05, out
    assert reloaded == comq, "the saved checkpoint must classify exactly like the in-memory quantized model"
    assert (output / "config.json").is_file() and (output / "preprocessor_config.json").is_file()
    config = json.loads((output / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert re.search(r"^checkpoint: .*\(\d+\.\dx smaller\)$", out, re.M), out


def test_a_group_size_the_layers_refuse_is_one_line_before_any_evaluation_or_training(tmp_path):
    vit = run_example("quantize_vit.py", "--group-size", "48", "--output", str(tmp_path / "vit"), cwd=tmp_path)
    assert vit.returncode != 0 and "Traceback" not in vit.stderr, vit.stderr[-3000:]
    assert vit.stderr.strip().splitlines()[-1].startswith("quantize_vit.py: error: group_size=48 does not divide")
    assert "top-1" not in vit.stdout, vit.stdout
    text = run_example("quantize_text_model.py", "causal-lm", "--group-size", "96", "--workdir", str(tmp_path / "w"),
                       cwd=tmp_path)  # fmt: skip
    assert text.returncode != 0 and "Traceback" not in text.stderr, text.stderr[-3000:]
    assert "--group-size 96 does not divide the tiny LM's layer input sizes" in text.stderr
    assert "training step" not in text.stdout, text.stdout


# ---------------------------------------------------------------------------------------------- push_to_hub.py
@pytest.fixture(scope="module")
def fake_hub():
    with FakeHub(max_lifetime_s=600) as hub:
        yield hub


def hub_env(hub: FakeHub, tmp_path: Path, token: str | None) -> dict[str, str]:
    env = example_env(
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(tmp_path / "hf_home"),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    del env["HF_HUB_OFFLINE"]
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def test_push_to_hub_round_trip(fake_hub, tmp_path):
    """Given a name without owner (the account's repository, as create_repo makes it); without --private the
    repository gets the account's default visibility."""
    repo = f"{fake_hub.user}/vit-comq-w3"
    requests_before = len(fake_hub.create_requests)
    result = run_example(
        "push_to_hub.py", "vit-comq-w3", "--bits", "3", "--num-samples", "16",
        cwd=tmp_path, env=hub_env(fake_hub, tmp_path, fake_hub.token),
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert f"pushing as {fake_hub.user}" in result.stdout
    assert f"pushed to {repo}" in result.stdout
    differences = re.findall(r"with (.+); max logit difference to the pushed model: (\S+)$", result.stdout, re.M)
    assert [how for how, _ in differences] == ["plain transformers", "hf_comq.load_quantized"], result.stdout
    plain, packed = (float(value) for _, value in differences)
    assert packed == 0.0 and plain < 1e-4, result.stdout  # plain: a dense matmul, float32 rounding apart
    files = fake_hub.files(repo)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    assert json.loads(files["config.json"])["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 3
    assert {request.get("private") for request in fake_hub.create_requests[requests_before:]} == {None}


def test_push_to_hub_without_a_token_fails(fake_hub, tmp_path):
    result = run_example(
        "push_to_hub.py", f"{fake_hub.user}/no-token", "--num-samples", "8",
        cwd=tmp_path, env=hub_env(fake_hub, tmp_path, None),
    )
    assert result.returncode == 1
    assert "pushed to" not in result.stdout
    # One clear line, before any quantization work, that says what to do.
    assert "cannot push to http://127.0.0.1" in result.stderr and "HF_TOKEN" in result.stderr, result.stderr[-2000:]
    assert "COMQ calibration" not in result.stderr


def test_push_to_hub_to_a_hub_that_does_not_answer_names_the_connection(tmp_path):
    env = example_env(HF_HUB_OFFLINE="0", HF_TOKEN="hf_token", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path))
    env.update(NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    result = run_example("push_to_hub.py", "me/unreachable", "--num-samples", "8", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "cannot reach http://127.0.0.1:9 to push" in result.stderr and "(check the connection)" in result.stderr
    assert "hf auth login" not in result.stderr and "COMQ calibration" not in result.stderr


# ---------------------------------------------------------------------------------------------- the notebook
@pytest.fixture
def venv_kernel(tmp_path, monkeypatch):
    """A Jupyter kernel spec that runs this very interpreter, found before any system-wide ``python3`` spec."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "hf-comq-test"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "hf_comq test kernel",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))  # connection files; HOME may be read-only
    for key, value in example_env(MPLBACKEND="module://matplotlib_inline.backend_inline").items():
        monkeypatch.setenv(key, value)
    return "hf-comq-test"


def test_evaluate_notebook_runs_and_plots(venv_kernel, tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name=venv_kernel,
        timeout=NOTEBOOK_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the traceback, if any cell fails

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells), "every code cell must have run"
    outputs = [output for cell in code_cells for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == 2, "expected the accuracy-vs-bits plot and the per-layer error plot"
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")

    fp = float(re.search(r"FP top-1:\s+(\d\.\d{4})", text).group(1))
    comq4 = float(re.search(r"COMQ W4 top-1:\s+(\d\.\d{4})", text).group(1))
    assert fp > 0.7 and comq4 > fp - 0.03, text
    rows = {
        int(match.group(1)): tuple(float(value) for value in match.group(2, 3, 4, 5, 6))
        for match in re.finditer(r"^\s+([234])\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", text, re.M)
    }
    assert sorted(rows) == [2, 3, 4], text
    for bits, (_fp, _rtn_acc, _comq_acc, rtn_err, comq_err) in rows.items():
        # At 4 bits COMQ minimizes this layer error from a start no worse than RTN's; at 3 and 2 bits it is
        # measured against the weight COMQ aims for, RTN's against the layer's own (the notebook says so),
        # and COMQ's is still expected lower: a looser check there, but a failure would be worth a look.
        assert comq_err <= rtn_err, f"W{bits}: COMQ layer error {comq_err} above RTN's {rtn_err}"
    fidelity = {
        int(match.group(1)): tuple(float(value) for value in match.group(2, 3, 4, 5))
        for match in re.finditer(r"^\s+([234])\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", text, re.M)
    }
    assert sorted(fidelity) == [2, 3, 4], text
    rtn_agreement, comq_agreement, rtn_kl, comq_kl = fidelity[2]
    assert comq_kl < rtn_kl and comq_agreement > rtn_agreement, f"W2: rounding should fail visibly where COMQ does not\n{text}"
