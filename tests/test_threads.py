"""hf_comq's thread policy: small work on one thread, large GEMMs on the caller's threads.

These tests look at which thread count each piece of work runs with, not at
timings (``benchmarks/bench_threads.py`` measures those).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time

import datasets
import pytest
import torch
from torch import nn

import hf_comq.solver.pair_moves as pair_moves
import hf_comq.solver.passes as passes
from hf_comq import COMQConfig, comq_quantize
from hf_comq.calibration import quantize_model
from hf_comq.evaluation import top1
from hf_comq.kernels import DISABLE_ENV_VAR, active_path, compiled_solver_ops, gemm
from hf_comq.solver import HessianAccumulator
from hf_comq.threads import (
    LOWEST_PRIORITY,
    MIN_PARALLEL_FLOPS,
    MIN_PARALLEL_ROW_ENTRIES,
    AllAtOnce,
    OnIdleCores,
    caller_threads,
    linear_layer_threads,
    run_independent,
    run_side_by_side,
    single_thread,
    thread_priority_is_per_thread,
    threads_for,
    threads_for_rows,
)
from tests.solver.kernel_paths import require_kernel
from tests.tiny import image_processor, images, tiny_vit


def spy(monkeypatch, module, name: str) -> list[int]:
    """Record ``torch.get_num_threads()`` each time ``module.name`` is called."""
    seen: list[int] = []
    original = getattr(module, name)

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return seen


def test_scopes_size_the_thread_count_and_restore_it(two_threads) -> None:
    with single_thread():
        assert torch.get_num_threads() == 1
        assert caller_threads() == 2  # the user's choice is remembered for large work inside
        with threads_for(MIN_PARALLEL_FLOPS):
            assert torch.get_num_threads() == 2
        with threads_for(MIN_PARALLEL_FLOPS / 2):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_the_solver_runs_its_column_loops_on_one_thread(two_threads, monkeypatch) -> None:
    """Before: comq_quantize ran every per-column vector op over the whole pool (many times slower when busy)."""
    monkeypatch.setenv(DISABLE_ENV_VAR, "1")  # the torch loops (the compiled ones: next test)
    in_sweep = spy(monkeypatch, passes.torch, "round")  # error-feedback start, inside the column loop
    weight, hessian = torch.randn(16, 32), torch.eye(32) + 0.1
    comq_quantize(weight, hessian, bits=4)
    assert in_sweep and set(in_sweep) == {1}
    assert torch.get_num_threads() == 2


def test_the_compiled_column_loops_run_on_one_thread(two_threads, monkeypatch) -> None:
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    require_kernel()  # skips only without a toolchain; a kernel that does not build fails
    ops = compiled_solver_ops([torch.zeros(1, 1)], torch.zeros(1, 1))
    assert ops is not None, active_path()
    seen: list[tuple[str, int]] = []

    class Recording:
        def __getattr__(self, name):
            def call(*args):
                seen.append((name, torch.get_num_threads()))
                return getattr(ops, name)(*args)

            return call

    monkeypatch.setattr(passes, "compiled_solver_ops", lambda rows, square: Recording())
    comq_quantize(torch.randn(16, 256), torch.eye(256) + 0.1, bits=4, iterations=1)
    assert {name for name, _ in seen} == {"sweep_block", "feedback_block"}
    assert {threads for _, threads in seen} == {1}
    assert torch.get_num_threads() == 2


def test_a_row_parallel_pass_gets_the_callers_threads_from_a_large_enough_table(two_threads) -> None:
    with single_thread():
        with threads_for_rows(MIN_PARALLEL_ROW_ENTRIES // 64, 64):
            assert torch.get_num_threads() == 2
            with threads_for(0.0):  # small work inside stays small
                assert torch.get_num_threads() == 1
        with threads_for_rows(MIN_PARALLEL_ROW_ENTRIES // 64 - 1, 64):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("rows", [256, 16])
def test_the_compiled_pair_pass_shares_a_layers_rows_over_the_callers_threads(two_threads, monkeypatch, rows) -> None:
    """The solve runs on one thread, but the pair-move pass is one compiled operator over
    independent rows: a large enough layer spreads them over the caller's threads (the same
    moves either way: tests/solver/test_pair_moves.py)."""
    monkeypatch.setattr("hf_comq.threads.MIN_PARALLEL_ROW_ENTRIES", 64 * 64)  # this test's layers: 64 rows
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    require_kernel()  # skips only without a toolchain; a kernel that does not build fails
    ops = compiled_solver_ops([torch.zeros(1, 1)], torch.zeros(1, 1))
    assert ops is not None, active_path()
    seen: list[int] = []

    class Recording:
        def pair_moves(self, *args):
            seen.append(torch.get_num_threads())
            return ops.pair_moves(*args)

    monkeypatch.setattr(pair_moves, "compiled_solver_ops", lambda rows, square: Recording())
    comq_quantize(torch.randn(rows, 64), torch.eye(64) + 0.1, bits=4)
    assert seen and set(seen) == {2 if rows >= 64 else 1}
    assert torch.get_num_threads() == 2


def test_large_gemms_get_the_callers_threads(two_threads, monkeypatch) -> None:
    monkeypatch.setenv(DISABLE_ENV_VAR, "1")  # the torch loops' small block updates are GEMMs too
    monkeypatch.setattr("hf_comq.threads.MIN_PARALLEL_FLOPS", 1.0)  # every GEMM counts as large
    seen: list[int] = []
    original = torch.Tensor.addmm_

    def recording(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "addmm_", recording)
    product = gemm._onednn_product  # float32 products on CPU go through oneDNN where torch has it

    def recording_product(a, b):
        seen.append(torch.get_num_threads())
        return product(a, b)

    monkeypatch.setattr(gemm, "_onednn_product", recording_product)
    with single_thread():
        HessianAccumulator(32).add(torch.randn(10, 32, dtype=torch.float64))  # float64 in: one addmm_
    assert seen == [2]
    seen.clear()
    comq_quantize(torch.randn(16, 256), torch.eye(256) + 0.1, bits=4, iterations=1)
    # the column loops' small block updates on one thread, the GEMMs between blocks on the caller's two
    assert set(seen) == {1, 2}


def test_forward_passes_follow_the_size_of_the_linear_layers(two_threads, monkeypatch) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    seen: list[int] = []
    model[1].register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    with linear_layer_threads(model):
        model(torch.randn(4, 8))
        monkeypatch.setattr("hf_comq.threads.MIN_PARALLEL_FLOPS", 2.0 * 4 * 8)  # the batch's GEMM is now large
        model(torch.randn(4, 8))
        assert torch.get_num_threads() == 1  # what the caller does with the outputs is small work again
    assert seen == [1, 2]
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("fp_target", [None, False], ids=["aimed", "plain"])
def test_calibration_and_evaluation_forwards_run_on_one_thread_for_small_models(two_threads, fp_target) -> None:
    """Before: a tiny ViT's forward passes ran every operator over the whole pool (aimed, where a
    block's one batch runs held on a thread of its own, until that thread started as its caller)."""
    model = tiny_vit(num_labels=3)
    seen: list[int] = []
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    data = datasets.Dataset.from_dict({"image": images(4), "label": [0, 1, 2, 0]})
    top1(model, data, image_processor(), batch_size=2)
    assert seen and set(seen) == {1}
    seen.clear()
    config = COMQConfig(bits=4, dataset=images(4), processor=image_processor(), num_samples=4, fp_target=fp_target)
    assert quantize_model(model, config)["fp_target"] is (fp_target is None)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2


def test_cli_commands_run_economically_and_restore_the_thread_count(two_threads, tmp_path, monkeypatch) -> None:
    """Loading and evaluating through hf-comq: small work on one thread, the user's count back afterwards."""
    from hf_comq.cli import main

    folder = tmp_path / "vit"
    tiny_vit(num_labels=3).save_pretrained(folder)
    image_processor().save_pretrained(folder)
    data = tmp_path / "images.parquet"
    datasets.Dataset.from_dict({"image": images(4), "label": [0, 1, 2, 0]}).to_parquet(data)
    seen: list[int] = []
    original = torch.nn.LayerNorm.forward

    def recording(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.LayerNorm, "forward", recording)
    assert main(["evaluate", str(folder), "--dataset", str(data)]) == 0
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
    assert main(["evaluate", str(folder), "--dataset", str(data), "--threads", "1"]) == 0
    assert torch.get_num_threads() == 2


def test_jobs_side_by_side_run_at_once_each_on_one_thread_and_keep_their_order(two_threads) -> None:
    meeting = threading.Barrier(2, timeout=30)  # passes only if both jobs run at the same time
    seen: list[tuple[int, int]] = []

    def job(value: int):
        def run() -> int:
            meeting.wait()
            with threads_for(MIN_PARALLEL_FLOPS):  # large work inside a job does not widen it
                seen.append((torch.get_num_threads(), caller_threads()))
            return value

        return run

    assert run_side_by_side([job(1), job(2)], workers=2) == [1, 2]
    assert seen == [(1, 1), (1, 1)]
    assert torch.get_num_threads() == 2


def test_one_worker_runs_the_jobs_here_in_order(two_threads) -> None:
    here = threading.get_ident()
    ran: list[tuple[int, int]] = []
    jobs = [lambda index=index: ran.append((index, threading.get_ident())) or index for index in range(3)]
    assert run_side_by_side(jobs, workers=1) == [0, 1, 2]
    assert ran == [(0, here), (1, here), (2, here)]


def test_a_failing_job_side_by_side_raises_its_error_and_restores_the_threads(two_threads) -> None:
    def failing() -> None:
        raise ValueError("COMQ could not quantize 'layer'")

    with pytest.raises(ValueError, match="could not quantize 'layer'"):
        run_side_by_side([lambda: 1, failing], workers=2)
    assert torch.get_num_threads() == 2


def test_in_order_takes_each_jobs_result_in_job_order_whichever_finishes_first(two_threads) -> None:
    """A batch's Gram terms are added in batch order even when a later batch's forward pass ends first."""
    second_done = threading.Event()
    events: list[str] = []

    def first() -> str:
        assert second_done.wait(timeout=30)  # the second job finishes before this one
        events.append("job 0")
        return "a"

    def second() -> str:
        events.append("job 1")
        second_done.set()
        return "b"

    def in_order(index: int, result: str) -> str:
        events.append(f"in order {index}")
        return result.upper()

    assert run_side_by_side([first, second], workers=2, in_order=in_order) == ["A", "B"]
    assert events == ["job 1", "job 0", "in order 0", "in order 1"]
    assert run_side_by_side([lambda: "c", lambda: "d"], workers=1, in_order=in_order) == ["C", "D"]


def test_jobs_waiting_for_their_turn_give_up_after_an_earlier_job_fails(two_threads) -> None:
    """The failure is raised, not a wait for a turn that never comes."""

    def failing() -> None:
        raise ValueError("batch 0 failed")

    taken: list[int] = []
    with pytest.raises(ValueError, match="batch 0 failed"):
        run_side_by_side([failing, lambda: 1, lambda: 2], workers=2, in_order=lambda index, _: taken.append(index))
    assert taken == []

    def failing_turn(index: int, result: int) -> int:
        if index == 1:
            raise ValueError("turn 1 failed")
        taken.append(index)
        return result

    with pytest.raises(ValueError, match="turn 1 failed"):
        run_side_by_side([lambda: 0, lambda: 1, lambda: 2], workers=2, in_order=failing_turn)
    assert taken == [0]
    assert torch.get_num_threads() == 2


def test_jobs_side_by_side_keep_the_callers_grad_mode_and_context(two_threads) -> None:
    """torch's grad mode is per thread: a worker left with grad on would build an autograd
    graph in every forward pass it runs, keeping all of its activations alive."""
    from contextvars import ContextVar

    marker: ContextVar[str] = ContextVar("marker", default="unset")
    marker.set("caller's")
    weight = torch.randn(4, 4, requires_grad=True)

    def job() -> tuple[bool, str, bool]:
        return torch.is_grad_enabled(), marker.get(), (torch.ones(4) @ weight).requires_grad

    with torch.no_grad():
        assert run_side_by_side([job, job], workers=2) == [(False, "caller's", False)] * 2
    assert run_side_by_side([job, job], workers=2) == [(True, "caller's", True)] * 2


def test_independent_pieces_of_small_work_share_the_callers_threads_one_torch_thread_each(two_threads) -> None:
    meeting = threading.Barrier(2, timeout=30)  # passes only if two pieces run at the same time
    seen: list[tuple[int, int]] = []
    here = threading.get_ident()

    def piece() -> None:
        meeting.wait()
        seen.append((threading.get_ident(), torch.get_num_threads()))

    run_independent([piece, piece], MIN_PARALLEL_FLOPS / 2)
    assert {threads for _, threads in seen} == {1} and len({ident for ident, _ in seen}) == 2
    assert here in {ident for ident, _ in seen}  # the caller takes pieces too, beside one helper
    assert torch.get_num_threads() == 2


def test_independent_pieces_of_large_work_run_here_in_order_on_the_callers_pool(two_threads) -> None:
    seen: list[tuple[int, int, int]] = []
    pieces = [lambda index=index: seen.append((index, threading.get_ident(), torch.get_num_threads())) for index in range(3)]
    run_independent(pieces, MIN_PARALLEL_FLOPS)
    assert seen == [(index, threading.get_ident(), 2) for index in range(3)]
    with single_thread():  # one caller thread: the pieces run here, one after another
        seen.clear()
        run_independent(pieces, MIN_PARALLEL_FLOPS / 2)
    assert seen == [(index, threading.get_ident(), 1) for index in range(3)]


def test_a_failing_piece_raises_its_error_once_every_other_piece_ran(two_threads) -> None:
    ran: list[int] = []

    def failing() -> None:
        raise ValueError("activations contain NaN or inf")

    pieces = [failing] + [lambda index=index: ran.append(index) for index in range(4)]
    with pytest.raises(ValueError, match="NaN or inf"):
        run_independent(pieces, 1.0)
    assert sorted(ran) == [0, 1, 2, 3] and torch.get_num_threads() == 2


def test_all_at_once_starts_every_job_and_lets_a_waiting_job_give_up_its_slot(two_threads) -> None:
    """Three jobs that each wait for all three: with one slot they only finish because a waiting
    job steps aside.  One computing at a time, each starts on the count the caller runs on, with the
    caller's recorded (inside ``single_thread``: one, widened only by a scope that asks, as in the
    caller's place); several, one each."""
    for workers, scope, threads_each in ((1, contextlib.nullcontext, (2, 2)), (1, single_thread, (1, 2)),
                                         (2, contextlib.nullcontext, (1, 1))):  # fmt: skip
        everyone = threading.Barrier(3, timeout=30)
        computing = {"now": 0, "most": 0}
        lock = threading.Lock()
        seen: list[tuple[int, int]] = []
        runner: dict[str, AllAtOnce] = {}

        def job(value: int):
            def run() -> int:
                with lock:
                    computing["now"] += 1
                    computing["most"] = max(computing["most"], computing["now"])
                    seen.append((torch.get_num_threads(), caller_threads()))
                time.sleep(0.05)  # computing: the others wait for a slot meanwhile
                with lock:
                    computing["now"] -= 1
                with runner["all"].step_aside():
                    everyone.wait()
                return value

            return run

        with scope(), AllAtOnce([job(value) for value in range(3)], workers) as runner["all"]:
            assert runner["all"].results() == [0, 1, 2]
        assert seen == [threads_each] * 3 and computing["most"] <= workers
        assert torch.get_num_threads() == 2


def test_all_at_once_hands_a_freed_slot_to_the_lowest_waiting_job_and_the_caller_first(two_threads) -> None:
    """One slot: jobs released from a wait queue for it while the caller holds it, and take it in job
    order whatever order their threads woke in; a caller's turn asked for meanwhile comes before them."""
    jobs_count = 5
    arrived = threading.Semaphore(0)
    go_on = threading.Event()
    order: list[str] = []
    lock = threading.Lock()
    runner: dict[str, AllAtOnce] = {}

    def job(index: int):
        def run() -> int:
            with runner["all"].step_aside():
                arrived.release()
                go_on.wait(timeout=30)
            with lock:
                order.append(f"job {index}")
            time.sleep(0.02)  # computing, holding the slot
            return index

        return run

    runner["all"] = AllAtOnce([job(index) for index in range(jobs_count)], 1)  # before the jobs start
    with runner["all"]:
        for _ in range(jobs_count):
            assert arrived.acquire(timeout=30)
        with runner["all"].caller_turn():  # every job stepped aside: the slot is free
            assert torch.get_num_threads() == 2 and caller_threads() == 2  # one slot: the caller's threads
            order.append("caller")
            go_on.set()
            time.sleep(0.3)  # the jobs wake, in whatever order, and queue for the slot
        with runner["all"].caller_turn():  # asked for while four jobs still wait
            order.append("caller")
        assert runner["all"].results() == list(range(jobs_count))
    assert order == ["caller", "job 0", "caller", "job 1", "job 2", "job 3", "job 4"]


def test_the_callers_turn_takes_the_slots_no_job_waits_for(two_threads) -> None:
    """Two slots: while every job is held (stepped aside) the caller's turn takes both, one torch
    thread with two recorded as the caller's (:func:`run_independent` shares them); once a job
    waits for a slot, the turn takes one and leaves the other to the job."""
    held, go_on = threading.Semaphore(0), threading.Event()
    runner: dict[str, AllAtOnce] = {}

    def job(index: int):
        def run() -> int:
            with runner["all"].step_aside():
                held.release()
                go_on.wait(timeout=30)
            time.sleep(0.3 if index == 0 else 0.0)  # job 0 computes while job 1 waits for the second slot
            return index

        return run

    runner["all"] = AllAtOnce([job(0), job(1), job(2)], 2)
    with runner["all"]:
        for _ in range(3):
            assert held.acquire(timeout=30)
        with runner["all"].caller_turn():
            assert (torch.get_num_threads(), caller_threads()) == (1, 2)
        go_on.set()
        time.sleep(0.1)  # jobs 0 and 1 take the slots, job 2 queues
        with runner["all"].caller_turn():  # asked for while job 2 waits: the next slot freed, alone
            assert (torch.get_num_threads(), caller_threads()) == (1, 1)
        assert runner["all"].results() == [0, 1, 2]
    assert torch.get_num_threads() == 2


def test_a_caller_interrupted_while_waiting_for_a_slot_leaves_no_slot_behind(monkeypatch) -> None:
    """Ctrl-C while the caller queues for a slot: the slot must not go to the waiter that left, or the
    jobs would wait forever when the pass is wound up."""
    runner = AllAtOnce([], 1)
    holding, let_go = threading.Lock(), threading.Lock()
    let_go.acquire()

    def hold_the_slot() -> None:
        with runner.caller_turn():
            holding.release()
            let_go.acquire(timeout=30)

    holding.acquire()
    holder = threading.Thread(target=hold_the_slot)
    holder.start()
    assert holding.acquire(timeout=30)  # the other thread has the only slot

    def interrupted(self, timeout=None):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(threading.Event, "wait", interrupted)
        with pytest.raises(KeyboardInterrupt), runner.caller_turn():
            pass
    let_go.release()
    holder.join(timeout=30)
    done = threading.Event()

    def take_a_turn() -> None:
        with runner.caller_turn():
            done.set()

    waiter = threading.Thread(target=take_a_turn, daemon=True)
    waiter.start()
    assert done.wait(timeout=30), "the freed slot went to the interrupted waiter"
    waiter.join(timeout=30)


def test_jobs_that_start_computing_after_the_callers_turn_still_run_on_one_thread(two_threads) -> None:
    """A thread's first torch call takes the count last set on any thread: a job that first computes
    after the caller's turn set and restored its own count must not run on the caller's two."""
    seen: list[int] = []
    started = threading.Event()

    def job(index: int):
        def run() -> int:
            if index:
                started.wait(timeout=30)  # its first torch call after the caller's turn
            seen.append(torch.get_num_threads())
            return index

        return run

    with AllAtOnce([job(0), job(1)], 2) as runner:
        with runner.caller_turn():
            pass
        started.set()
        assert runner.results() == [0, 1]
    assert seen == [1, 1] and torch.get_num_threads() == 2


def test_all_at_once_raises_the_failure_of_the_lowest_job(two_threads) -> None:
    def failing(message: str):
        def run() -> None:
            raise ValueError(message)

        return run

    with pytest.raises(ValueError, match="first"), AllAtOnce([lambda: 1, failing("first"), failing("second")], 2) as jobs:
        jobs.results()


def _where_and_how(index: int) -> tuple[int, str, int, int, bool]:
    """A job's index, thread name, torch thread count, CPU priority and grad mode."""
    return (
        index,
        threading.current_thread().name,
        torch.get_num_threads(),
        os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
        torch.is_grad_enabled(),
    )


@pytest.mark.skipif(not thread_priority_is_per_thread(), reason="a thread's priority is its process's here")
def test_jobs_run_ahead_on_a_thread_of_the_lowest_priority_and_the_rest_side_by_side_when_the_results_are_due(
    two_threads,
) -> None:
    """The thread ahead runs jobs in order until results() takes the others; every job runs once,
    on one torch thread, in the caller's grad mode, and the caller keeps its own priority."""
    first_done = threading.Event()
    let_go = threading.Event()
    own_priority = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def job(index: int) -> tuple[int, str, int, int, bool]:
        seen = _where_and_how(index)
        if index == 0:
            first_done.set()
            assert let_go.wait(timeout=30)  # results() takes the jobs left while this one runs
        let_go.set()
        return seen

    with torch.no_grad(), OnIdleCores([functools.partial(job, index) for index in range(4)], workers=2) as ahead:
        assert first_done.wait(timeout=30)
        results = ahead.results()
    assert [index for index, *_ in results] == [0, 1, 2, 3]
    assert results[0][1:] == ("hf_comq_ahead", 1, LOWEST_PRIORITY, False)
    assert {result[1] for result in results[1:]} != {"hf_comq_ahead"}
    assert all(result[2:] == (1, own_priority, False) for result in results[1:])
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own_priority
    assert torch.get_num_threads() == 2
    assert not [thread for thread in threading.enumerate() if thread.name == "hf_comq_ahead"]


def test_jobs_run_ahead_raise_the_first_failure_and_leave_no_thread_when_left_early(two_threads) -> None:
    """A failed job's error comes from results(), no later job runs; leaving without results()
    (a failure elsewhere) stops the thread after its current job."""
    ran: list[int] = []

    def job(index: int) -> None:
        if index == 1:
            raise ValueError("batch 1 failed")
        ran.append(index)

    with pytest.raises(ValueError, match="batch 1 failed"):
        with OnIdleCores([functools.partial(job, index) for index in range(4)], workers=2) as ahead:
            ahead.results()
    assert ran == [0]
    started = threading.Event()

    def slow() -> None:
        started.set()
        time.sleep(0.2)

    with OnIdleCores([slow] * 50, workers=2):
        if thread_priority_is_per_thread():
            assert started.wait(timeout=30)
    assert not [thread for thread in threading.enumerate() if thread.name == "hf_comq_ahead"]


def test_jobs_run_ahead_give_the_results_of_jobs_side_by_side(two_threads) -> None:
    """Whatever share ran ahead, the results are the ones run_side_by_side gives: each job computes
    on one torch thread either way."""
    weights = torch.randn(8, 96, 96)
    jobs = [functools.partial(torch.linalg.matrix_power, weights[index], 5) for index in range(8)]
    with OnIdleCores(jobs, workers=2) as ahead:
        ahead_results = ahead.results()
    side_by_side = run_side_by_side(jobs, workers=2)
    assert all(torch.equal(a, b) for a, b in zip(ahead_results, side_by_side))


def test_jobs_meant_to_run_ahead_run_when_due_where_the_priority_cannot_be_lowered(two_threads, monkeypatch) -> None:
    """A sandbox refusing setpriority leaves every job to results(), none on the thread ahead."""

    def refused(*args) -> None:
        raise PermissionError("setpriority refused")

    monkeypatch.setattr(os, "setpriority", refused)
    with OnIdleCores([functools.partial(_where_and_how, index) for index in range(3)], workers=2) as ahead:
        time.sleep(0.05)  # room for a thread that would (wrongly) run jobs anyway
        results = ahead.results()
    assert [index for index, *_ in results] == [0, 1, 2]
    assert "hf_comq_ahead" not in {name for _, name, *_ in results}


def test_threads_started_after_the_helpers_keep_the_callers_count(two_threads) -> None:
    """torch.set_num_threads also sets the count every thread started later begins with: the helpers' workers
    set 1, and the caller's own count being unchanged, nothing was put back; a server's request thread then
    ran torch on one thread."""
    from hf_comq.threads import AllAtOnce, run_independent, run_side_by_side

    def count_in_a_new_thread() -> int:
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return seen[0]

    run_side_by_side([lambda: 1, lambda: 2], workers=2)
    assert count_in_a_new_thread() == 2
    run_independent([lambda: None, lambda: None], flops=1.0)
    assert count_in_a_new_thread() == 2
    with AllAtOnce([lambda: 1, lambda: 2], workers=2) as jobs:
        jobs.results()
    assert count_in_a_new_thread() == 2
