"""Build, load and report the compiled CPU kernels: :func:`hf_comq.kernels.packed_linear` and the
solver's column passes and pair moves (:mod:`hf_comq.kernels.solver_ops`).

The C++ sources in ``csrc/`` are compiled with ``torch.utils.cpp_extension.load`` on
first use, into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), under a name that hashes the sources, the torch and
Python versions and the architecture: later processes load the cached library directly
(no compiler needed), and an upgrade of either builds a fresh one instead of loading a
stale binary.  A build that succeeds records its library's digest beside it, and only a
library matching it is opened; building, and removing a library that will not load,
happen under one lock per folder.

Anything that stops the kernel (no compiler, no ninja, a failed build, a big-endian
host) makes :func:`load_kernel` return ``None``: the callers then take the exact torch
path.  That is logged once per process, with the reason, and :func:`active_path`
returns the same text for benchmarks and bug reports.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DISABLE_ENV_VAR = "HF_COMQ_DISABLE_KERNEL"
"""Set to ``1`` to force the torch fallback (no build, no compiled code)."""

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (
    "packed_linear.cpp", "kernels_avx2.cpp", "kernels_scalar.cpp", "column_passes.cpp", "pair_moves.cpp",
    "clip_search.cpp", "solver_loops_avx2.cpp", "solver_loops_avx512.cpp", "solver_loops_scalar.cpp",
)  # fmt: skip
HEADERS = (
    "kernels.h", "kernels_impl.h", "fp_contract_off.h", "solver_tables.h", "pair_moves.h", "pair_moves_impl.h",
    "cpu_features.h", "isa_request.h", "rounding.h", "clip_search.h", "clip_search_impl.h",
)  # fmt: skip
OPS_NAMESPACE = "hf_comq_cpu"
BUILD_NOTICE = (
    "hf_comq: building its CPU kernel, once for these sources and this torch (about a minute on two cores); "
    "once built, later runs load it from %s"
)
TORCH_BUILD_LOCK = "lock"  # the file torch's extension builder waits on, without a timeout, while it exists
FINISHED_MARK_SUFFIX = ".sha256"  # beside a library whose build succeeded: its digest

_lock = threading.Lock()
_state: dict[str, object] = {}


def kernel_disabled() -> bool:
    """True when the user forced the fallback with ``HF_COMQ_DISABLE_KERNEL=1`` (logged once).

    Read on every call (a dict lookup) so that a test or a script can flip it at
    any time without reaching into this module's cache.
    """
    disabled = os.environ.get(DISABLE_ENV_VAR, "").strip().lower() not in ("", "0", "false", "no", "off")
    if disabled and "disabled_logged" not in _state:
        _state["disabled_logged"] = True
        logger.info("hf_comq compiled kernels: torch fallback (%s is set)", DISABLE_ENV_VAR)
    return disabled


def load_kernel():
    """The ``torch.ops.hf_comq_cpu`` namespace, building the extension if needed; ``None`` if unavailable.

    Thread-safe; the outcome (and its one log line) is settled by the first call.
    """
    if "ops" not in _state:
        with _lock:
            if "ops" not in _state:
                ops, reason = _build_and_load()
                _state["reason"] = reason
                _state["ops"] = ops
                if ops is None:
                    logger.warning("hf_comq compiled kernels: %s", reason)
                else:
                    logger.info("hf_comq compiled kernels: %s", reason)
    return _state["ops"]


def build_ahead() -> None:
    """Build or load the extension now, unless it is disabled.

    For a caller about to show progress: a first build is a pause of its own (announced by
    :data:`BUILD_NOTICE`), better taken before a progress bar than inside its first step.
    """
    if not kernel_disabled():
        load_kernel()


def active_path() -> str:
    """One line saying which path CPU fp32 calls of ``packed_linear`` and the solver's column passes take, and why.

    Builds the kernel if that has not happened yet (unless it is disabled).
    """
    if kernel_disabled():
        return f"torch fallback ({DISABLE_ENV_VAR} is set)"
    load_kernel()
    return str(_state["reason"])


def extension_name() -> str:
    """``hf_comq_cpu_<hash>``: the hash covers the C++ sources, the torch and Python versions and the
    machine's architecture (hosts of several architectures may share one cache folder)."""
    digest = hashlib.sha256(f"{torch.__version__} {sys.version_info[:2]} {platform.machine()} {sys.platform}".encode())
    for name in SOURCES + HEADERS:
        digest.update(name.encode())
        digest.update((CSRC / name).read_bytes())
    return f"{OPS_NAMESPACE}_{digest.hexdigest()[:12]}"


def missing_toolchain() -> str | None:
    """Why the extension cannot be built here, or ``None`` if a compiler and ninja are present."""
    if sys.byteorder != "little":
        return "the kernel reads packed words as little-endian bytes and this host is big-endian"
    from torch.utils.cpp_extension import get_cxx_compiler, is_ninja_available

    compiler = get_cxx_compiler()
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not on PATH; install g++ or set CXX)"

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _build_and_load():
    """(ops, one-line reason).  Never raises: a kernel that cannot load means the fallback."""
    from torch.utils import cpp_extension

    name = extension_name()
    build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name
    start = time.perf_counter()
    library = build_dir / f"{name}.so"
    ops = load_cached_library(library)  # outside the build lock: loads a finished library, never removes one
    if ops is not None:
        seconds = time.perf_counter() - start
        return ops, f"compiled CPU kernel ({ops.isa()}): {name}, loaded in {seconds:.1f} s from {build_dir}"
    missing = missing_toolchain()
    if missing is not None:
        return None, f"torch fallback: compiled CPU kernel unavailable, {missing}"
    try:
        with _one_build_at_a_time(build_dir):
            ops = load_cached_library(library, discard=True)  # built by another process while this one waited
            if ops is not None:
                seconds = time.perf_counter() - start
                return ops, f"compiled CPU kernel ({ops.isa()}): {name}, loaded in {seconds:.1f} s from {build_dir}"
            return _build(name, build_dir, start)
    except OSError as error:  # a build folder that cannot be made or locked (a read-only cache): fall back
        return None, (
            f"torch fallback: the kernel cannot be built in {build_dir} ({error.strerror or error}); "
            "set TORCH_EXTENSIONS_DIR to a writable folder"
        )


@contextmanager
def _one_build_at_a_time(build_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the build folder while building.

    torch marks a build in progress with a lock file and makes every other process wait
    for it to go, without a timeout; a build killed half-way (``kill -9``, out of memory,
    a reboot) leaves it behind and every later run would wait forever.  The ``flock`` is
    released by the system when its holder dies, so whoever holds it knows that a lock
    file still there is left over from a dead build, and removes it.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file only
        yield
        return
    with open(build_dir / "hf_comq.build.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is building: say so, since the wait can be minutes
            logger.warning("hf_comq: waiting for another process's kernel build in %s to finish", build_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            left_over = build_dir / TORCH_BUILD_LOCK
            if left_over.exists():
                logger.warning("hf_comq: removing %s, left by a kernel build that was stopped half-way", left_over)
                left_over.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(name: str, build_dir: Path, start: float):
    """Compile and load the extension: ``(ops, one-line reason)``, never raising."""
    from torch.utils import cpp_extension

    # The first run pauses here (before calibration, or at a first packed forward): say why, once.
    logger.warning(BUILD_NOTICE, build_dir)
    try:
        sources = copy_sources(build_dir / "src")
        cpp_extension.load(
            name=name,
            build_directory=str(build_dir),
            sources=[str(source) for source in sources],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        ops = getattr(torch.ops, OPS_NAMESPACE)
        isa = ops.isa()
        mark_finished(build_dir / f"{name}.so")
    except Exception as error:  # a failed build must never break the caller: fall back
        cause = build_error_line(str(error)) or type(error).__name__
        return None, f"torch fallback: building the compiled CPU kernel failed ({type(error).__name__}: {cause})"
    seconds = time.perf_counter() - start
    return ops, f"compiled CPU kernel ({isa}): {name}, built in {seconds:.1f} s, cached in {build_dir}"


def build_error_line(message: str) -> str:
    """The line of a failed build's output that says why: the compiler's first ``error:`` line.

    torch's message starts with ninja's compile command, hundreds of characters that name
    no cause; the compiler's own line (a missing header, a bad flag) says what to install.
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    line = errors[0] if errors else (lines[0] if lines else "")
    return line if len(line) <= 300 else line[:297] + "..."


def load_cached_library(library: Path, discard: bool = False):
    """The ops of an already built library, or ``None`` when there is none, it is not a finished
    build (:func:`is_finished`) or it does not load.

    Loading the file directly skips the compiler and ninja checks, so a process that
    finds the cache pays only the ``dlopen``.  Only a finished library is opened: a file
    cut short (a link killed half-way, or one still being written) makes ``dlopen`` fault
    and kill the process rather than fail.  With ``discard`` (the caller holds the build
    lock, so no other process is writing it) a library that is not a finished, loadable
    build is removed, so that the caller builds it again.
    """
    if not library.is_file():
        return None
    if is_finished(library):
        try:
            torch.ops.load_library(str(library))
            ops = getattr(torch.ops, OPS_NAMESPACE)
            ops.isa()
            return ops
        except Exception:  # a foreign or damaged file: rebuild rather than fail
            pass
    if discard:
        for path in (library, _finished_mark(library)):
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a read-only cache: nothing to clean, the build that follows says why
                pass
    return None


def _finished_mark(library: Path) -> Path:
    return library.with_name(library.name + FINISHED_MARK_SUFFIX)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_finished(library: Path) -> bool:
    """Whether ``library`` is the whole file a build ended with: its digest is the one written then."""
    try:
        return _finished_mark(library).read_text(encoding="utf-8").strip() == _digest(library)
    except OSError:
        return False


def mark_finished(library: Path) -> None:
    """Record ``library``'s digest beside it once its build succeeded (written whole or not at all)."""
    mark = _finished_mark(library)
    partial = mark.with_name(f".{mark.name}.{os.getpid()}.partial")
    partial.write_text(_digest(library) + "\n", encoding="utf-8")
    os.replace(partial, mark)


def copy_sources(destination: Path) -> list[Path]:
    """Copy the C++ sources next to the build, and return the paths to compile.

    ninja's build file records source paths; compiling a copy keeps those paths the
    same for every checkout or install of the same sources (same hash, same folder),
    so two installs never make each other rebuild.
    """
    destination.mkdir(parents=True, exist_ok=True)
    for name in SOURCES + HEADERS:
        target = destination / name
        content = (CSRC / name).read_bytes()
        if not target.is_file() or target.read_bytes() != content:
            target.write_bytes(content)
    return [destination / name for name in SOURCES]
