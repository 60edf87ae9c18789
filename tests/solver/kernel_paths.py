"""Running a solver step with the compiled kernel and with its torch code, and comparing the two.

The kernels (hf_comq/kernels/csrc/) run the same float32 arithmetic as the torch code
they stand in for.  torch's vectorised kernels may fuse a multiply-add the kernel rounds
twice, so a value can differ in its last bit and a code now and then round the other
way (or a move win a near-tie the other way); the solve must not otherwise depend on
whether a machine could build the kernel.
"""

from __future__ import annotations

import pytest

from hf_comq.kernels import DISABLE_ENV_VAR
from hf_comq.kernels.build import load_kernel, missing_toolchain

MAX_CODES_APART = 0.01
"""Share of codes the two paths may round apart: a last-bit difference flips a code only
near a rounding tie, and what the pass feeds forward from it can flip a few more."""
OBJECTIVE_TOLERANCE = 1e-4


def require_kernel() -> None:
    """Skip only without a toolchain: with one, a kernel that does not build is a failure."""
    missing = missing_toolchain()
    if missing is not None:
        pytest.skip(f"compiled kernel not buildable here: {missing}")
    assert load_kernel() is not None, "a C++ compiler and ninja are present but the kernel did not build"


def assert_same_solution(codes, codes_torch, objective, objective_torch) -> None:
    apart = (codes != codes_torch).float().mean().item()
    assert apart <= MAX_CODES_APART, f"{apart:.2%} of the codes differ between the kernel and the torch code"
    assert abs(objective - objective_torch) <= OBJECTIVE_TOLERANCE * abs(objective_torch)


def both_paths(monkeypatch, run):
    """``run()`` with the compiled kernel, then with the torch code."""
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    compiled = run()
    monkeypatch.setenv(DISABLE_ENV_VAR, "1")
    in_torch = run()
    return compiled, in_torch
