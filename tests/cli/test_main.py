"""The ``hf-comq`` entry points: usage errors, help, one-line library errors, ``python -m``, the console script."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading

import pytest

from hf_comq.cli import main
from tests.cli.helpers import REPO_ROOT, error_line, run_cli


def test_library_errors_become_one_line_and_debug_shows_the_traceback(capsys, tmp_path, vit_dir, image_data) -> None:
    argv = ["quantize", vit_dir, "--dataset", image_data, "--group-size", 7, "--output", tmp_path / "out"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    assert "group_size=7 does not divide in_features" in error_line(err)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="group_size=7"):
        main([str(arg) for arg in argv] + ["--debug"])


def test_usage_errors_and_help(capsys) -> None:
    assert main([]) == 2
    assert "usage: hf-comq" in capsys.readouterr().err
    assert main(["quantize", "model"]) == 2  # --dataset and --output are required
    assert "the following arguments are required: --dataset, --output" in capsys.readouterr().err
    assert main(["demo", "--help"]) == 0
    assert "Fashion-MNIST" in capsys.readouterr().out


def test_boolean_settings_become_flags_only_when_not_on_by_default(capsys) -> None:
    import argparse

    from hf_comq.cli.common import add_setting_flag

    assert main(["quantize", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--calibrate-all-experts" in out and "--no-calibrate-all-experts" not in out
    assert "--scale-refit, --no-scale-refit" in out  # its default depends on the bit width: both ways
    assert "--fp-target, --no-fp-target" in out  # so does this one's
    assert "--true-sequential, --no-true-sequential" in out  # and this one's on the aiming
    with pytest.raises(ValueError, match="sequential is on by default; a flag could not turn it off"):
        add_setting_flag(argparse.ArgumentParser(), "sequential")
    parser = argparse.ArgumentParser()
    add_setting_flag(parser, "scale_refit")
    assert [parser.parse_args(argv).scale_refit for argv in ([], ["--scale-refit"], ["--no-scale-refit"])] == [
        None, True, False
    ]


def test_python_dash_m_help_in_a_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hf_comq", "--help"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: hf-comq")
    for command in ("quantize", "evaluate", "demo"):
        assert command in result.stdout


def test_console_script_points_at_main(capsys) -> None:
    """``pip install`` turns this entry into the ``hf-comq`` executable; its target must resolve and run."""
    import importlib
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    module_name, function_name = project["scripts"]["hf-comq"].split(":")
    entry = getattr(importlib.import_module(module_name), function_name)
    assert entry is main
    assert entry(["quantize", "--help"]) == 0
    assert "--push-to-hub REPO_ID" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["evaluate", "some-model", "--dataset", "some-data"], ["demo"]])
def test_commands_that_do_not_split_their_work_refuse_to_run_under_torchrun(capsys, monkeypatch, tmp_path, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(capsys, *command)
    assert code == 1
    assert f"hf-comq {command[0]} runs in one process, but a launcher started 2" in error_line(err)
    assert list(tmp_path.iterdir()) == []  # nothing loaded, nothing written


def test_an_empty_world_size_is_one_process_and_a_malformed_one_is_named(monkeypatch) -> None:
    from hf_comq.cli.common import CLIError, launched_processes

    monkeypatch.setenv("WORLD_SIZE", "")
    assert launched_processes() == 1
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(CLIError, match=r"WORLD_SIZE='two' is not a number of processes"):
        launched_processes()


def test_parsing_the_arguments_imports_neither_torch_nor_transformers() -> None:
    """`hf-comq --help` and a usage error answer at once: the command modules import nothing heavy
    until a command runs (a torch import alone takes seconds on a cold machine)."""
    script = (
        "import sys; from hf_comq.cli.main import build_parser; build_parser()\n"
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.fixture
def python_sigint():
    """Python's default SIGINT handler for the test, as a CLI process started from a terminal has.  A
    process started in the background of a non-interactive shell has SIGINT ignored (Python then keeps
    ``SIG_IGN``), under which an interrupt raises nothing; reported as a warning when found."""
    import signal
    import warnings

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    if previous is not signal.default_int_handler:
        warnings.warn(f"the test process had SIGINT handler {previous!r} ({getattr(previous, '__module__', None)})")
    yield
    signal.signal(signal.SIGINT, previous)


def _interrupt_dropped_in_a_finalizer(error: type[BaseException], while_dropped=contextlib.nullcontext) -> None:
    """Raise ``error`` in a finalizer (dropped there, as a handler run inside a ``__del__`` would be)
    under the CLI's interrupt handling, ``while_dropped`` around the drop; then wait for it to come back."""
    import time

    from hf_comq.cli.main import _terminate_as_interrupt

    class Finalized:
        def __del__(self):
            raise error()

    previous_hook = sys.unraisablehook
    with pytest.raises(error):
        with _terminate_as_interrupt():
            with while_dropped():
                Finalized()  # dropped at once
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                time.sleep(0.001)
    assert sys.unraisablehook is previous_hook


@pytest.mark.parametrize("signalled", ["interrupt", "terminate"])
def test_an_interrupt_that_lands_in_a_finalizer_is_raised_again_outside_it(signalled, python_sigint):
    """Python runs a signal's handler wherever the main thread is, a garbage collector's ``__del__``
    included, and drops what a finalizer raises: Ctrl-C during calibration let the run go on and save."""
    from hf_comq.cli.main import Terminated

    _interrupt_dropped_in_a_finalizer(Terminated if signalled == "terminate" else KeyboardInterrupt)


def test_an_interrupt_redelivered_while_the_main_thread_lags_in_the_hook_is_not_dropped(monkeypatch, python_sigint):
    """On a busy machine the main thread can lag inside the unraisable hook (here: after starting the
    thread that delivers the interrupt again); delivered then, the interrupt was raised inside the hook
    and dropped with it, and the run went on.  It now waits for the hook to return."""
    import time

    from hf_comq.cli.main import INTERRUPT_AGAIN_AFTER_S

    start = threading.Thread.start

    def lagging_start(self) -> None:
        start(self)
        time.sleep(20 * INTERRUPT_AGAIN_AFTER_S)  # the main thread descheduled right after the start

    @contextlib.contextmanager
    def lagging():
        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", lagging_start)
            yield

    _interrupt_dropped_in_a_finalizer(KeyboardInterrupt, lagging)

