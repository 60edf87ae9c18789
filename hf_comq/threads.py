"""How many CPU threads hf_comq lets torch use, and for which work.

torch runs an operator over its whole intra-op thread pool as soon as the operator
is more than tiny, and every such operator ends in a barrier that waits for all
pool threads.  On a machine whose cores are busy with other work, a waiting thread
may not be scheduled for a whole time slice, so each barrier can cost far more than
the operator itself.  Much of hf_comq's work is many small operators: the solver
visits one weight column at a time, and small models run small layers.  With
several threads on a busy machine such work runs many times slower than on one,
while a large GEMM loses little (its threads work long between barriers) and gains
nearly the thread count when the cores are free.

So hf_comq sizes its thread count by the work: :func:`threads_for` runs a piece of
work on the caller's threads when its operators reach :data:`MIN_PARALLEL_FLOPS`
and on one thread otherwise, :func:`threads_for_rows` does the same for a compiled pass
over independent rows by its table's size (:data:`MIN_PARALLEL_ROW_ENTRIES`), :func:`single_thread`
runs on one thread (the layer solver runs so, except its large GEMMs and its pair-move
pass), :func:`linear_layer_threads` sizes a model's forward passes by its linear
layers, and :func:`run_side_by_side` gives the cores to independent jobs instead, one
torch thread each (a small block's layer solves, and its calibration batches' forward
passes; :func:`run_independent` the pieces of one operation, such as a batch's
sums; :class:`OnIdleCores` jobs whose results are due later, on a thread of the lowest
priority meanwhile).  The caller's count is ``torch.get_num_threads()`` (what
``torch.set_num_threads`` or ``hf-comq --threads`` chose) when the outermost scope
was entered; nested scopes keep it.
``benchmarks/bench_threads.py`` measures the result against one thread, with and
without a competing process, and prints the GEMM sweep behind the threshold.
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
    "LOWEST_PRIORITY",
    "MIN_PARALLEL_FLOPS",
    "MIN_PARALLEL_ROW_ENTRIES",
    "AllAtOnce",
    "OnIdleCores",
    "caller_threads",
    "gets_caller_threads",
    "linear_layer_threads",
    "run_independent",
    "run_side_by_side",
    "single_thread",
    "thread_priority_is_per_thread",
    "threads_for",
    "threads_for_rows",
]

Result = TypeVar("Result")
Finished = TypeVar("Finished")

MIN_PARALLEL_FLOPS = 4e9
"""Smallest operator (in floating point operations; ``2 * m * k * n`` for a GEMM)
that runs on the caller's thread count.  Below it, a busy machine's barrier waits
cost more than extra threads can save."""

MIN_PARALLEL_ROW_ENTRIES = 1 << 20
"""Smallest table (independent rows times entries per row) for which a compiled pass that
works row by row (the solver's pair moves: every row runs its own rounds, each a scan of
its entries) runs on the caller's threads.  Such a pass is one operator with one barrier
at its end, and its work grows with the table; on a smaller one a busy machine's wait
for a descheduled thread costs what the extra threads save (``benchmarks/README.md``,
"The pair-move pass on the caller's threads")."""

_caller_threads: ContextVar[int | None] = ContextVar("hf_comq_caller_threads", default=None)


def caller_threads() -> int:
    """The thread count the user chose: recorded by the outermost scope, else torch's current one."""
    recorded = _caller_threads.get()
    return recorded if recorded is not None else torch.get_num_threads()


def _threads_for_size(flops: float) -> int:
    return caller_threads() if flops > 0 and flops >= MIN_PARALLEL_FLOPS else 1


def gets_caller_threads(flops: float) -> bool:
    """Whether :func:`threads_for` would run work of ``flops`` on more than one thread."""
    return _threads_for_size(flops) > 1


@contextmanager
def threads_for(flops: float) -> Iterator[None]:
    """Run the enclosed work on the caller's threads if its operators are of ``flops`` or more, else on one."""
    with _on_threads(_threads_for_size(flops)):
        yield


def threads_for_rows(rows: int, row_length: int) -> Any:
    """Run a compiled pass over ``rows`` independent rows of ``row_length`` entries on the caller's
    threads if the table has :data:`MIN_PARALLEL_ROW_ENTRIES` or more, else on one (a context manager)."""
    return _on_threads(caller_threads() if rows * row_length >= MIN_PARALLEL_ROW_ENTRIES else 1)


@contextmanager
def _on_threads(wanted: int, recorded: int | None = None) -> Iterator[None]:
    """torch on ``wanted`` threads inside, the caller's count recorded for nested scopes
    (``recorded``: this count recorded as the caller's instead, so that no scope inside goes past it)."""
    token = _caller_threads.set(caller_threads() if recorded is None else recorded)
    previous = torch.get_num_threads()
    if wanted != previous:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
        _caller_threads.reset(token)


def single_thread() -> Any:
    """Run the enclosed work on one thread; also a decorator (``@single_thread()``).

    For work made of many small operators: per-column vector updates, searches over
    cache-sized chunks, blocked factorisations of a layer-sized matrix.
    """
    return threads_for(0.0)


def run_side_by_side(
    jobs: Sequence[Callable[[], Result]],
    workers: int,
    in_order: Callable[[int, Result], Finished] | None = None,
) -> list[Result] | list[Finished]:
    """Run independent ``jobs`` on up to ``workers`` Python threads; their results in order.

    For work that a thread pool cannot speed up but several cores can: a layer solve
    is mostly small operators, best on one thread, and the solves of one block do
    not depend on each other.  torch releases the GIL inside its operators, so solves
    on separate threads use separate cores.  Each worker runs its jobs on one torch
    thread (torch's count is per thread) and as a caller of one thread, so no
    :func:`threads_for` inside widens it into a pool that competes with the other
    workers.  With ``workers`` 1 (or one job) the jobs run here, one after the other.

    ``in_order(index, result)``, if given, runs on each job's result in job order
    (job ``i``'s right after job ``i`` and ``in_order`` of every earlier job), on the
    job's worker; its return values are returned instead.  It is for what jobs add to
    shared state, such as a batch's Gram matrix terms, which must be added in the order
    one thread would add them so that the sums come out the same to the last bit, while
    the jobs themselves (the batches' forward passes) overlap.  A worker holds its
    job's result until that job's turn, so at most ``workers`` results wait at once.

    Each worker runs in a copy of the caller's context variables and its grad mode
    (torch's is per thread: without it a forward pass would build an autograd graph
    that keeps every activation alive).  The first failing job's error is raised once
    the running ones have finished; jobs not started by then are dropped, and jobs
    waiting for a turn after a failed one give up theirs.
    """
    if workers <= 1 or len(jobs) <= 1:
        return [job() if in_order is None else in_order(index, job()) for index, job in enumerate(jobs)]
    turns = _Turns() if in_order is not None else None
    outcomes: list[tuple[bool, Any] | None] = [None] * len(jobs)  # (succeeded, result or error)
    lock = threading.Lock()
    queue = {"next": 0, "failed": False}

    def take() -> int | None:
        with lock:
            if queue["failed"] or queue["next"] >= len(jobs):
                return None
            queue["next"] += 1
            return queue["next"] - 1

    grad_enabled = torch.is_grad_enabled()  # a thread-local mode: a forward pass would build a graph without it

    def run_jobs() -> None:
        """One worker: jobs in index order, each on one torch thread, until none is left or one failed."""
        with _worker(1, grad_enabled):
            while (index := take()) is not None:
                try:
                    result = jobs[index]()
                    if turns is not None:
                        with turns.turn(index):
                            result = in_order(index, result)
                    outcomes[index] = (True, result)
                except BaseException as error:
                    outcomes[index] = (False, error)
                    if turns is not None:
                        turns.fail(index)
                    with lock:
                        queue["failed"] = True

    previous = torch.get_num_threads()
    try:
        count = min(workers, len(jobs))
        with ThreadPoolExecutor(max_workers=count, thread_name_prefix="hf_comq") as pool:
            # each worker in a copy of the caller's context variables, as the jobs would run here
            for worker in [pool.submit(contextvars.copy_context().run, run_jobs) for _ in range(count)]:
                worker.result()
    finally:
        torch.set_num_threads(previous)  # the workers' count became the default of threads started later
    for outcome in outcomes:  # jobs are taken in order: a failure comes before every dropped job
        if outcome is not None and not outcome[0]:
            raise outcome[1]
    return [outcome[1] for outcome in outcomes]


def run_independent(pieces: Sequence[Callable[[], Any]], flops: float) -> None:
    """Run the independent ``pieces`` of one operation of ``flops`` in all (a batch's row-block
    products, each into a sum of its own), on the caller's threads either way.

    Where the operation reaches :data:`MIN_PARALLEL_FLOPS` its pieces run one after
    another, each on the caller's thread pool (:func:`threads_for`); below it they run
    side by side, one torch thread each: the calling thread and helper threads kept
    for the whole process (threads started per call would spend much of what a
    batch's small pieces save) take the pieces in order, whichever is free.  That is
    whole GEMMs between the threads' one join, not a barrier after each of many small
    operators.  Each piece computes on one thread, or on the pool, exactly as it would
    with no other piece beside it, so the results do not depend on how many threads
    shared the pieces.  The first failing piece's error is raised once every piece has
    run or failed.
    """
    threads = min(caller_threads(), len(pieces))
    if gets_caller_threads(flops) or threads <= 1:
        with threads_for(flops):
            for piece in pieces:
                piece()
        return
    taken = itertools.count()  # next() on it is atomic: each piece is taken once
    errors: list[BaseException] = []
    grad_enabled = torch.is_grad_enabled()

    def take_pieces() -> None:
        while (index := next(taken)) < len(pieces):
            try:
                pieces[index]()
            except BaseException as error:  # the other pieces still run: their sums are left whole
                errors.append(error)

    def helper() -> None:
        with _worker(1, grad_enabled):
            take_pieces()

    previous = torch.get_num_threads()
    pool = _helper_threads.pool(threads - 1)
    helpers = [pool.submit(contextvars.copy_context().run, helper) for _ in range(threads - 1)]
    try:
        with _on_threads(1):
            take_pieces()
    finally:
        for running in helpers:
            if not running.cancel():  # one not started yet (its thread busy elsewhere) has nothing left to take
                running.result()
        torch.set_num_threads(previous)  # the helpers' count became the default of threads started later
    if errors:
        raise errors[0]


class _HelperThreads:
    """The process's helper threads for :func:`run_independent`: made on first use, made anew
    when more are asked for, and in a forked child (which has none of the parent's threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._size = 0
        self._pid = 0

    def pool(self, size: int) -> ThreadPoolExecutor:
        """A pool of at least ``size`` threads."""
        with self._lock:
            if self._pool is None or self._size < size or self._pid != os.getpid():
                if self._pool is not None and self._pid == os.getpid():
                    self._pool.shutdown(wait=False)  # its threads end once their pieces are done
                self._pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="hf_comq_helper")
                self._size, self._pid = size, os.getpid()
            return self._pool


_helper_threads = _HelperThreads()


LOWEST_PRIORITY = 19
"""The nice value of an :class:`OnIdleCores` thread: the lowest a process may give itself."""


def thread_priority_is_per_thread() -> bool:
    """Whether this thread's CPU priority can be lowered without the rest of the process's
    (Linux, where each thread has a nice value of its own; elsewhere it is the process's)."""
    return sys.platform.startswith("linux") and hasattr(os, "setpriority") and hasattr(threading, "get_native_id")


class OnIdleCores:
    """Independent jobs run ahead on one background thread of the lowest CPU priority; :meth:`results`
    runs the ones it has not started and hands back every result in order.

    For work whose inputs are ready long before its results are needed (the next
    block's full-precision pass while this block is solved): the kernel gives a thread
    of the lowest priority the cores that the other threads leave idle (a lone layer
    solve on one thread, a caller waiting for its batches) and little of the ones they
    use, so the work fills the gaps of a pass that cannot keep every core busy rather
    than taking cores from it (it still shares the interpreter lock, which torch's operators
    also take, the caches and the memory bandwidth with the pass: it slows it).
    :meth:`results` takes the jobs the background thread has not started, runs them
    side by side on ``workers`` threads (:func:`run_side_by_side`)
    and then waits for the one it is running; every job runs on one torch thread
    wherever it runs, so the results are those of ``run_side_by_side(jobs, workers)``
    whatever share ran ahead.  Where a thread's priority cannot be lowered alone
    (:func:`thread_priority_is_per_thread`), no thread starts and :meth:`results` runs
    every job.  Use as a context manager: leaving it stops and joins the thread, so a
    failure elsewhere leaves nothing running.
    """

    def __init__(self, jobs: Sequence[Callable[[], Result]], workers: int):
        self._jobs = list(jobs)
        self._workers = workers
        self._outcomes: list[tuple[bool, Any] | None] = [None] * len(self._jobs)
        self._lock = threading.Lock()
        self._next = 0  # the next job not taken, by the thread or by results()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "OnIdleCores":
        if thread_priority_is_per_thread() and self._jobs:
            context = contextvars.copy_context()
            self._thread = threading.Thread(
                target=context.run, args=(self._run_ahead, torch.is_grad_enabled()), name="hf_comq_ahead", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._take_the_rest()
        self._join()

    def results(self) -> list[Result]:
        """Every job's result in job order; the first failed job's error instead."""
        rest = self._take_the_rest()
        try:
            for index, result in zip(rest, run_side_by_side([self._jobs[index] for index in rest], self._workers)):
                self._outcomes[index] = (True, result)
        except BaseException as error:  # after every job that ran ahead, whose failure comes first
            self._outcomes[rest.start] = (False, error)
        self._join()  # once the rest ran: the job still running ahead held none of them up
        outcomes, self._outcomes, self._jobs = self._outcomes, [], []
        for outcome in outcomes:  # jobs are taken in order: a failure comes before every job not run
            if outcome is not None and not outcome[0]:
                raise outcome[1]
        return [outcome[1] for outcome in outcomes]

    def _take_the_rest(self) -> range:
        """The jobs the thread has not started (none once one of its jobs failed), taken from it."""
        with self._lock:
            rest = range(self._next, len(self._jobs))
            self._next = len(self._jobs)
        return rest

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= len(self._jobs):
                return None
            self._next += 1
            return self._next - 1

    def _run_ahead(self, grad_enabled: bool) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_PRIORITY)  # this thread's alone
        except OSError:  # a sandbox that refuses it: results() runs every job, none competes with the caller
            return
        with _worker(1, grad_enabled):
            while (index := self._take()) is not None:
                try:
                    self._outcomes[index] = (True, self._jobs[index]())
                except BaseException as error:  # raised by results(), in job order
                    self._outcomes[index] = (False, error)
                    self._take_the_rest()


class AllAtOnce:
    """Every job started at once, each on a Python thread of its own, at most ``workers`` computing at a time.

    For jobs that wait for each other midway, which :func:`run_side_by_side` cannot
    run: a block's calibration batches, each held at a layer until that layer is solved
    from all of them (:class:`~hf_comq.calibration.stages.PausedPass`).  A job gives
    its slot to another while it waits (:meth:`step_aside`), so ``workers`` bounds the
    work in flight, never the jobs alive.  Threads as in :func:`run_side_by_side`: one
    torch thread each where several compute at once; where one does, each job starts on the
    count its caller runs on as the jobs start, with the caller's own count recorded, as it
    would run in the caller's place (inside :func:`linear_layer_threads`: one thread, widened
    only where a layer's work is large).  Each job runs in a copy of the caller's context
    variables and grad mode.  Use as a context manager; :meth:`results` waits for every job
    and raises the failure of the lowest job.
    Where more jobs wait for a slot than there are, the lowest job index gets it.
    """

    _CALLER_RANK = -1  # the caller's own turn comes before every waiting job

    def __init__(self, jobs: Sequence[Callable[[], Result]], workers: int):
        self._jobs = list(jobs)
        self._slots = _Slots(max(1, workers))
        self._index = threading.local()  # a job thread's own index, its rank for a slot
        self._threads_each = 1 if workers > 1 else caller_threads()
        self._outcomes: list[tuple[bool, Any] | None] = [None] * len(self._jobs)
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "AllAtOnce":
        self._previous = torch.get_num_threads()
        grad_enabled = torch.is_grad_enabled()
        for index in range(len(self._jobs)):
            context = contextvars.copy_context()
            thread = threading.Thread(
                target=context.run, args=(self._run, index, grad_enabled), name=f"hf_comq-{index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for thread in self._threads:
            thread.join()
        # the jobs' closures often reach back here (a job that steps aside): no cycle keeps what they hold alive
        self._jobs, self._threads = [], []
        torch.set_num_threads(self._previous)  # the jobs' count became the default of threads started later

    @contextmanager
    def step_aside(self) -> Iterator[None]:
        """Wait inside this scope without holding a slot (call it from a job's own thread)."""
        self._slots.release()
        try:
            yield
        finally:
            self._slots.acquire(self._index.index)

    @contextmanager
    def caller_turn(self) -> Iterator[None]:
        """Compute in a slot of the jobs' own, on the calling thread, ahead of the jobs waiting for one.

        For the caller's share of the work while jobs run (a held stage's sums, batch
        by batch as the batches arrive): it then overlaps with the jobs' compute
        without more than ``workers`` computing at once.  The turn also takes every
        slot that is free as it starts (no job waits for one: the jobs are held, or
        done), so the caller's work uses those cores rather than leaving them idle.
        Inside, torch runs on the threads a job gets, and the threads of every slot
        taken are recorded as the caller's: what :func:`run_independent` shares out,
        and the most any scope inside widens to.
        """
        slots = 1
        self._slots.acquire(self._CALLER_RANK)
        try:
            slots += self._slots.take_free()
            with _on_threads(self._threads_each, recorded=self._threads_each * slots):
                yield
        finally:
            for _ in range(slots):
                self._slots.release()

    def results(self) -> list[Result]:
        """Every job's result in job order, once all have ended; the lowest failed job's error instead."""
        self.__exit__()
        outcomes, self._outcomes = self._outcomes, []
        for outcome in outcomes:
            if outcome is not None and not outcome[0]:
                raise outcome[1]
        return [outcome[1] for outcome in outcomes]

    def _run(self, index: int, grad_enabled: bool) -> None:
        self._index.index = index
        start = 1 if self._threads_each == 1 else self._previous  # the caller's count as the jobs started
        with _worker(self._threads_each, grad_enabled, start=start):
            self._slots.acquire(index)
            try:
                self._outcomes[index] = (True, self._jobs[index]())
            except BaseException as error:  # handed to results(), in the caller's thread
                self._outcomes[index] = (False, error)
            finally:
                self._slots.release()


class _Slots:
    """A counting semaphore that hands each freed slot to the waiter of the lowest rank.

    A job waits with its own index as its rank, so the jobs compute in job order
    (the order the caller reads their results in) whenever more wait than run; the
    caller's own turn (:meth:`AllAtOnce.caller_turn`) ranks before every job.  A
    freed slot goes straight to that one waiter: no release wakes every thread.
    """

    def __init__(self, count: int):
        self._lock = threading.Lock()
        self._free = count
        self._waiting: list[tuple[int, int, threading.Event]] = []  # a heap of (rank, arrival, event)
        self._arrivals = itertools.count()

    def acquire(self, rank: int) -> None:
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return
            granted = threading.Event()
            entry = (rank, next(self._arrivals), granted)
            heapq.heappush(self._waiting, entry)
        try:
            granted.wait()  # the releasing thread took the slot for this one
        except BaseException:  # interrupted (Ctrl-C in the caller): no slot may stay with a waiter that left
            with self._lock:
                if not granted.is_set():
                    self._waiting.remove(entry)
                    heapq.heapify(self._waiting)
                    raise
            self.release()
            raise

    def take_free(self) -> int:
        """Take every free slot unless someone waits for one (then none); how many were taken."""
        with self._lock:
            if self._waiting:
                return 0
            taken, self._free = self._free, 0
            return taken

    def release(self) -> None:
        with self._lock:
            if self._waiting:
                heapq.heappop(self._waiting)[2].set()
            else:
                self._free += 1


@contextmanager
def _worker(threads: int, grad_enabled: bool, start: int | None = None) -> Iterator[None]:
    """A worker thread's scope: ``threads`` torch threads (``start`` at first, where given), ``threads``
    recorded as the caller's so that no scope inside widens past them, and the caller's grad mode (torch's
    is per thread: without it a forward pass would build an autograd graph that keeps every activation
    alive)."""
    token = _caller_threads.set(threads)
    # A thread's first query sets its count from the one last set on any thread (torch's lazy
    # per-thread start): made here, so that it cannot undo this thread's own count later on.
    torch.get_num_threads()
    torch.set_num_threads(threads if start is None else start)
    try:
        with torch.set_grad_enabled(grad_enabled):
            yield
    finally:
        _caller_threads.reset(token)


class _Turns:
    """Job indices take turns: :meth:`turn` waits until every earlier index has had its turn.

    A failed job never takes its turn, so later ones stop waiting once an earlier one
    failed (and raise :class:`_EarlierJobFailed`; the failure itself comes first in job order).
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next = 0
        self._first_failed: int | None = None

    @contextmanager
    def turn(self, index: int) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: self._next == index or self._failed_before(index))
            if self._failed_before(index):
                raise _EarlierJobFailed(f"job {self._first_failed} failed before job {index}'s turn")
        yield
        with self._condition:
            self._next += 1
            self._condition.notify_all()

    def fail(self, index: int) -> None:
        with self._condition:
            if self._first_failed is None or index < self._first_failed:
                self._first_failed = index
            self._condition.notify_all()

    def _failed_before(self, index: int) -> bool:
        return self._first_failed is not None and self._first_failed < index


class _EarlierJobFailed(RuntimeError):
    """A job gave up its turn because an earlier job failed (whose error is the one raised)."""


@contextmanager
def linear_layer_threads(*models: nn.Module) -> Iterator[None]:
    """Run forward passes of ``models`` on one thread, or on the caller's threads where the linear layers are big.

    A pre-hook on every linear layer picks the count from that layer's GEMM for the
    batch at hand (``2 * tokens * in * out``); the operators that follow it
    (activations, attention, norms) keep that count until the next linear layer.
    A large model thereby runs on the caller's threads and a small one on one
    thread, whatever the batch.
    """
    from .nn import has_linear_shape, linear_shape

    def choose(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            wanted = _threads_for_size(2.0 * args[0].numel() * linear_shape(module)[0])
            if wanted != torch.get_num_threads():
                torch.set_num_threads(wanted)

    def back_to_one(module: nn.Module, args: tuple, output: object) -> None:
        if torch.get_num_threads() != 1:  # what callers do with the outputs (losses, argmax) is small work
            torch.set_num_threads(1)

    with single_thread():
        handles = [
            module.register_forward_pre_hook(choose)
            for model in models
            for module in model.modules()
            if has_linear_shape(module)
        ]
        handles += [model.register_forward_hook(back_to_one) for model in models]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
