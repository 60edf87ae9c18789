"""``hf-comq``: the parser and the dispatch to one module per command (:mod:`.quantize`, :mod:`.evaluate`,
:mod:`.demo`).  Errors a user can fix end with exit code 1 and one line on stderr; ``--debug`` shows the
traceback instead."""

from __future__ import annotations

import _thread
import argparse
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from . import demo, evaluate, quantize
from .common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, PROG, CLIError, check_positive


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-comq`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code.

    Never raises for user errors, so it can be called in-process by tests and
    scripts: argparse's own exits become return codes too.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error argparse already printed
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    if args.handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.threads is not None:
            check_positive("--threads", args.threads)
        with _terminate_as_interrupt():
            return args.handler(args)
    except Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if args.debug:
            raise
        print(f"{PROG}: error: {_error_line(error)}", file=sys.stderr)
        return EXIT_ERROR


INTERRUPT_AGAIN_AFTER_S = 0.01  # long enough for a finalizer to end, short against any step of a run


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``docker stop``, a batch scheduler, torchrun's agent), raised where the
    process is, so that a save in progress is cleaned up as after Ctrl-C instead of left half-written."""


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raised as :class:`Terminated`, and an interrupt that lands in a finalizer delivered again.

    Python runs signal handlers between bytecodes of the main thread, and that may be inside a
    ``__del__`` the garbage collector is running, where an exception is printed as "Exception
    ignored" and dropped: Ctrl-C then let the run go on and save.  Such a dropped interrupt is
    raised anew (``_thread.interrupt_main``, from another thread a moment after the hook has
    returned: raised while the hook still runs, it would be dropped with the hook's own error),
    outside the finalizer.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated()

    def deliver_again(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            signum = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
            hook_returning = threading.Event()
            threading.Thread(target=_interrupt_main_after, args=(signum, hook_returning), daemon=True).start()
            hook_returning.set()  # last: the interrupt waits for it, not for a thread start the main thread may lag on
        else:
            previous_hook(unraisable)

    previous, previous_hook = signal.signal(signal.SIGTERM, terminate), sys.unraisablehook
    sys.unraisablehook = deliver_again
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook


def _interrupt_main_after(signum: int, hook_returning: threading.Event) -> None:
    """Deliver ``signum`` to the main thread :data:`INTERRUPT_AGAIN_AFTER_S` after its unraisable hook is returning."""
    hook_returning.wait()
    time.sleep(INTERRUPT_AGAIN_AFTER_S)
    _thread.interrupt_main(signum)


def _error_line(error: BaseException) -> str:
    """The error as one line; types users cannot act on keep their name and point at ``--debug``."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (CLIError, ValueError, OSError)):
        return text
    return f"{type(error).__name__}: {text} (rerun with --debug for the traceback)"


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-comq`` argument parser (exposed for documentation tools and tests)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "COMQ post-training quantization for Hugging Face Transformers models: quantize a checkpoint, "
            "evaluate it, or run the built-in demo."
        ),
        epilog=(
            "examples:\n"
            "  hf-comq demo\n"
            "  hf-comq quantize google/vit-base-patch16-224 --bits 4 --dataset imagenet-1k --split validation \\\n"
            "      --num-samples 128 --output vit-comq-w4\n"
            "  hf-comq evaluate vit-comq-w4 --dataset imagenet-1k --split validation --limit 2000\n"
            "\nRun 'hf-comq COMMAND --help' for the options of a command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=None, debug=False, threads=None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for command in (quantize, evaluate, demo):
        command.add_parser(commands)
    return parser
