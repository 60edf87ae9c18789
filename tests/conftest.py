import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Run every test on one torch thread.

    The tests use tiny models; on a shared 2-core machine, OpenMP's two-thread
    barriers make tiny matmuls up to 100x slower whenever another process holds a
    core, and one thread is as fast as two for these sizes anyway.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def two_threads():
    """Two torch threads, as a user without ``--threads`` has on a two-core machine (the suite runs on one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)
