"""Data-parallel primitives on two CPU ranks (gloo over loopback): sharing, sums, solutions, failures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from hf_comq.calibration.distributed import Group, current_group

REPO_ROOT = Path(__file__).resolve().parents[2]

WORKER = """
import datetime, json, os, sys
import torch
import torch.distributed as dist
from hf_comq import HessianAccumulator, QuantizedWeight
from hf_comq.calibration.distributed import (
    CalibrationGroupError, agree_on, all_reduce_hessians, current_group, empty_solution, share_solution,
)

rank, port, scenario, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
group = current_group()
result = {"rank": group.rank, "size": group.size}
try:
    if scenario == "ok":
        agree_on(group, "same settings")
        accumulator = HessianAccumulator(3)
        accumulator.add(torch.full((rank + 1, 3), float(rank + 1), dtype=torch.float64))
        all_reduce_hessians(group, [accumulator])
        result["hessian"] = accumulator.result().tolist()
        result["tokens"] = accumulator.num_tokens
        solved = None
        if rank == 1:
            solved = QuantizedWeight(
                codes=torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8), scale=torch.tensor([[0.5], [0.25]]),
                zero_point=torch.tensor([[1.0], [2.0]]), bits=4, group_size=None, stats={"relative_error": 0.1},
            )
        shared = share_solution(group, solved, 1, empty_solution(2, 2, 4, None, torch.float32))
        result["codes"] = shared.codes.tolist()
        result["stats"] = shared.stats
    elif scenario == "different":
        agree_on(group, f"settings of rank {rank}")
    elif scenario == "dies":
        if rank == 1:
            os._exit(3)
        all_reduce_hessians(group, [HessianAccumulator(2)])
except CalibrationGroupError as error:
    result["error"] = str(error)
with open(out, "w") as handle:
    json.dump(result, handle)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_ranks(tmp_path: Path, scenario: str) -> list[dict | None]:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER), encoding="utf-8")
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen([sys.executable, str(script), str(rank), port, scenario, str(tmp_path / f"rank{rank}.json")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for rank in range(2)
    ]
    for process in processes:
        process.communicate(timeout=120)
    results = []
    for rank in range(2):
        path = tmp_path / f"rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else None)
    return results


def test_a_single_process_is_a_group_of_one():
    group = current_group()
    assert group == Group() and not group.is_parallel and group.is_main
    assert Group(1, 3).share(list(range(8))) == [1, 4, 7]
    assert [Group(0, 2).owner(index) for index in range(4)] == [0, 1, 0, 1]


def test_two_ranks_sum_gram_matrices_and_share_a_solution(tmp_path):
    results = run_two_ranks(tmp_path, "ok")
    expected_hessian = (1 * 1 * 1 + 2 * 2 * 2)  # rank 0: one row of ones; rank 1: two rows of twos
    for result in results:
        assert result["size"] == 2 and "error" not in result
        assert result["hessian"] == [[expected_hessian] * 3] * 3 and result["tokens"] == 3
        assert result["codes"] == [[1, 2], [3, 4]] and result["stats"] == {"relative_error": 0.1}


def test_ranks_with_different_settings_fail_with_one_line_each(tmp_path):
    for result in run_two_ranks(tmp_path, "different"):
        assert "different calibration settings" in result["error"] and "\n" not in result["error"]


def test_a_rank_that_dies_is_reported_by_the_others(tmp_path):
    survivor, dead = run_two_ranks(tmp_path, "dies")
    assert dead is None
    assert "one of them failed or left" in survivor["error"] and "nothing was saved" in survivor["error"]
