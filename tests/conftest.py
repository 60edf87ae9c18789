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
