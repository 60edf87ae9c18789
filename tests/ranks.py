"""Start processes as ``torchrun`` starts ranks (``RANK``, ``WORLD_SIZE``, ``MASTER_PORT``...), gloo on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_ranks(argv: list[str], size: int = 2, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run ``argv`` once per rank, all at once, one thread each; the finished processes in rank order."""
    base = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(size), "HF_HUB_OFFLINE": "1"}  # fmt: skip
    processes = [
        subprocess.Popen(argv, env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for rank in range(size)
    ]
    finished = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        finished.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return finished
