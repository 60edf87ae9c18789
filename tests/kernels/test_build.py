"""Building and loading the compiled kernel: the active path is reported, and failure never breaks a call."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_comq.kernels import DISABLE_ENV_VAR, active_path
from hf_comq.kernels.build import TORCH_BUILD_LOCK, build_error_line, extension_name, load_kernel, missing_toolchain

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter (the build outcome is settled once per process), with its
# own extension cache so that nothing it builds or breaks is seen by other runs.
SCRIPT = """
import logging, torch, torch.nn.functional as F
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from hf_comq.kernels import active_path, packed_linear
from tests.kernels.reference import dequantize_reference, random_packed
codes, packed, scale, zero = random_packed(16, 64, 2, 4, seed=0)
x = torch.randn(3, 64)
for _ in range(2):
    assert torch.equal(packed_linear(x, packed, scale, zero, 4), F.linear(x, dequantize_reference(codes, scale, zero)))
print("PATH:", active_path())
"""


def run_fresh(tmp_path: Path, **environment: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), **environment}
    env.pop(DISABLE_ENV_VAR, None)
    command = [sys.executable, "-c", SCRIPT]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def kernel_log_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "hf_comq compiled kernels" in line]


def test_active_path_names_the_compiled_kernel(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    if missing_toolchain() is not None:
        pytest.skip(f"compiled kernel not buildable here: {missing_toolchain()}")
    assert load_kernel() is not None
    assert active_path().startswith("compiled CPU kernel (")


def test_environment_variable_is_reported(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV_VAR, "1")
    assert DISABLE_ENV_VAR in active_path() and "fallback" in active_path()


def test_missing_compiler_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert "no C++ compiler" in missing_toolchain()


def test_failing_build_falls_back_and_says_so_once(tmp_path):
    """A compiler that fails: the build error is caught, logged once, and every call still answers exactly."""
    compiler = tmp_path / "broken-c++"
    compiler.write_text("#!/bin/sh\necho 'simulated compiler failure' >&2\nexit 1\n")
    compiler.chmod(0o755)
    result = run_fresh(tmp_path, CXX=str(compiler))
    assert result.returncode == 0, result.stderr
    lines = kernel_log_lines(result.stderr)
    assert len(lines) == 1 and "building the compiled CPU kernel failed" in lines[0], result.stderr
    assert "PATH: torch fallback" in result.stdout
    notice = result.stderr.index("hf_comq: building its CPU kernel")  # the pause is announced before it starts
    assert result.stderr.count("hf_comq: building its CPU kernel") == 1 and notice < result.stderr.index(lines[0])


def test_a_later_process_loads_the_cached_library_without_building(monkeypatch):
    """Once built, a new process only loads the library: no compiler, no ninja, no rebuild."""
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    if missing_toolchain() is not None:
        pytest.skip(f"compiled kernel not buildable here: {missing_toolchain()}")
    assert load_kernel() is not None  # builds into the default cache if this process has not yet
    env = {key: value for key, value in os.environ.items() if key != DISABLE_ENV_VAR}
    env.update(PYTHONPATH=str(ROOT), CXX="/no-such-compiler")  # a build attempt would fall back
    script = "from hf_comq.kernels import active_path; print('PATH:', active_path())"
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "PATH: compiled CPU kernel (" in result.stdout and " loaded in " in result.stdout, result.stdout
    assert "building its CPU kernel" not in result.stderr  # nothing is built, so no pause is announced


def test_build_ahead_builds_only_where_the_kernel_is_enabled(tmp_path):
    """The calibration calls build_ahead() before its progress bar: a first build (here one that
    fails) is announced and tried there; with the kernel disabled nothing is built or said."""
    compiler = tmp_path / "broken-c++"
    compiler.write_text("#!/bin/sh\nexit 1\n")
    compiler.chmod(0o755)
    script = "from hf_comq.kernels import build_ahead; build_ahead(); print('DONE')"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "CXX": str(compiler)}
    for disabled in (False, True):
        env.pop(DISABLE_ENV_VAR, None)
        if disabled:
            env[DISABLE_ENV_VAR] = "1"
        result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "DONE" in result.stdout, result.stderr
        announced = "hf_comq: building its CPU kernel" in result.stderr
        failed = "building the compiled CPU kernel failed" in result.stderr
        assert (announced, failed) == ((False, False) if disabled else (True, True)), result.stderr


def test_a_lock_left_by_a_killed_build_is_removed_instead_of_waited_on(tmp_path):
    """torch waits without a timeout while its lock file exists; a build killed half-way leaves it."""
    build_dir = tmp_path / "extensions" / extension_name()
    build_dir.mkdir(parents=True)
    (build_dir / TORCH_BUILD_LOCK).touch()
    compiler = tmp_path / "broken-c++"
    compiler.write_text("#!/bin/sh\nexit 1\n")
    compiler.chmod(0o755)
    script = "from hf_comq.kernels import active_path; print('PATH:', active_path())"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "CXX": str(compiler)}
    env.pop(DISABLE_ENV_VAR, None)
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "left by a kernel build that was stopped half-way" in result.stderr, result.stderr
    assert "PATH: torch fallback: building the compiled CPU kernel failed" in result.stdout


def test_a_failed_build_is_explained_by_the_compilers_error_line():
    message = (
        "Error building extension 'hf_comq_cpu_x': [1/3] c++ -MMD -MF kernels.o.d -DTORCH_EXTENSION_NAME=x -O3 -c kernels.cpp\n"
        "FAILED: kernels.o\n<command-line>: fatal error: Python.h: No such file or directory\ncompilation terminated.\n"
    )
    assert build_error_line(message) == "<command-line>: fatal error: Python.h: No such file or directory"
    assert build_error_line("ninja: not found") == "ninja: not found"


def test_a_build_folder_that_cannot_be_made_falls_back_with_a_line(tmp_path):
    """A read-only cache (a container's home, a TORCH_EXTENSIONS_DIR that is a file): torch answers every call."""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    script = "from hf_comq.kernels import active_path; print('PATH:', active_path())"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": str(blocked)}
    env.pop(DISABLE_ENV_VAR, None)
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "PATH: torch fallback: the kernel cannot be built in" in result.stdout and "TORCH_EXTENSIONS_DIR" in result.stdout


def _built_library() -> Path:
    """The finished library this process loads (built into the default cache if need be)."""
    from hf_comq.kernels import build

    if missing_toolchain() is not None or load_kernel() is None:
        pytest.skip("compiled kernel not buildable here")
    from torch.utils import cpp_extension

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    library = root / extension_name() / f"{extension_name()}.so"
    assert build.is_finished(library)
    return library


def test_only_a_finished_library_is_opened_and_only_the_build_lock_holder_removes_one(monkeypatch, tmp_path):
    """A library cut short (a link killed, or one another process is still writing) made dlopen fault and kill
    every later process; and a process that could not load it removed it under the feet of the process
    building it.  Now a library opens only if its digest is the one its build wrote, and only a caller holding
    the build lock (``discard``) removes one; a read-only cache's files stay as they are."""
    from hf_comq.kernels.build import FINISHED_MARK_SUFFIX, load_cached_library

    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    whole = _built_library().read_bytes()
    library = tmp_path / "hf_comq_cpu_copy.so"
    mark = tmp_path / f"{library.name}{FINISHED_MARK_SUFFIX}"
    library.write_bytes(whole[: len(whole) // 2])  # a link stopped half-way...
    mark.write_text(_built_library().with_name(_built_library().name + FINISHED_MARK_SUFFIX).read_text())
    assert load_cached_library(library) is None and library.exists()  # ...is neither opened nor removed
    mark.unlink()
    library.write_bytes(whole)  # whole, but no build said so (it may still be written)
    assert load_cached_library(library) is None and library.exists()
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(Path, "unlink", read_only)
    assert load_cached_library(library, discard=True) is None  # a read-only cache: no error either
    monkeypatch.undo()
    assert load_cached_library(library, discard=True) is None and not library.exists()


def test_the_cache_name_tells_architectures_apart(monkeypatch):
    """Hosts of two architectures sharing a home folder each removed the other's library and rebuilt theirs."""
    import platform

    name = extension_name()
    monkeypatch.setattr(platform, "machine", lambda: "aarch64" if platform.uname().machine != "aarch64" else "x86_64")
    assert extension_name() != name


def test_waiting_for_another_processs_build_is_said(tmp_path, caplog):
    """The wait for a build another process is running can take minutes, and it was silent."""
    import threading
    import time

    from hf_comq.kernels.build import _one_build_at_a_time

    held, release = threading.Event(), threading.Event()

    def other_build() -> None:
        with _one_build_at_a_time(tmp_path):
            held.set()
            release.wait(10)

    other = threading.Thread(target=other_build)
    other.start()
    held.wait(10)
    threading.Timer(0.2, release.set).start()
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="hf_comq.kernels.build"), _one_build_at_a_time(tmp_path):
        waited = time.monotonic() - started
    other.join()
    assert waited >= 0.15 and "waiting for another process's kernel build" in caplog.text
