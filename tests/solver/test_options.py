"""The solver's plain settings: the bit and group-size rules every layer of hf_comq applies, and their defaults."""

import inspect
import subprocess
import sys

import pytest

from hf_comq.solver import comq_quantize
from hf_comq.solver.options import DEFAULTS, MAX_BITS, MIN_BITS, check_bits, resolve_group_size


def test_group_size_validation():
    assert resolve_group_size(96, None) == 96
    assert resolve_group_size(96, -1) == 96
    assert resolve_group_size(96, 32) == 32
    with pytest.raises(ValueError, match="group_size=64 does not divide in_features=96"):
        resolve_group_size(96, 64)
    with pytest.raises(ValueError, match="positive integer"):
        resolve_group_size(96, 0)


@pytest.mark.parametrize("bits", [MIN_BITS - 1, MAX_BITS + 1, 4.0, True])
def test_bits_outside_the_range_are_refused(bits):
    with pytest.raises(ValueError, match=f"between {MIN_BITS} and {MAX_BITS}"):
        check_bits(bits)


def test_the_packed_layout_may_hold_one_bit_codes():
    check_bits(1, low=1)


def test_comq_quantize_takes_its_defaults_from_the_options():
    parameters = inspect.signature(comq_quantize).parameters
    assert {name: parameters[name].default for name in DEFAULTS} == DEFAULTS


def test_the_options_import_without_torch():
    code = "import sys, hf_comq.solver.options; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
