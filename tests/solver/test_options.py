"""The solver's plain settings: the bit and group-size rules every layer of hf_comq applies, and their defaults."""

import inspect
import subprocess
import sys

import pytest

from hf_comq.solver import comq_quantize
from hf_comq.solver.options import (
    DEFAULTS,
    MAX_BITS,
    MIN_BITS,
    REFERENCE_CODE,
    ROUND_TO_NEAREST,
    check_bits,
    resolve_group_size,
    unused_settings,
)


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


_OTHER_VALUE = {"order": "sequential", "scale_refit": True, "pair_moves": 4, "block_resolve": False, "damp": 0.2,
                "clip_weights": "diagonal", "start_grids": 1}  # fmt: skip


@pytest.mark.parametrize(
    "settings",
    [ROUND_TO_NEAREST, REFERENCE_CODE, dict(init="rtn", scale_search=True), dict(iterations=0),
     dict(clip_weights="diagonal"), dict(init="fp", scale_search=True)],  # fmt: skip
    ids=["rtn", "reference_code", "rtn_start_searched", "error_feedback_only", "diagonal_search", "fp_start_searched"],
)
def test_a_setting_called_unused_does_not_change_the_codes(settings):
    """What the model card calls "not used" must be so: changing it leaves every code and scale as it was."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(256, 32, dtype=torch.float64)
    weight, hessian = torch.randn(12, 32, dtype=torch.float64), x.T @ x
    values = {**DEFAULTS, **settings}
    unused = unused_settings(values)
    assert unused, "each case leaves some setting unused"
    base = comq_quantize(weight, hessian, bits=3, **{k: v for k, v in values.items() if k != "bits"})
    for name in unused:
        changed = {**values, name: _OTHER_VALUE[name]}
        other = comq_quantize(weight, hessian, bits=3, **{k: v for k, v in changed.items() if k != "bits"})
        assert torch.equal(other.codes, base.codes) and torch.equal(other.scale, base.scale), name


def test_the_default_uses_every_solver_setting():
    assert unused_settings(DEFAULTS) == {}


@pytest.mark.parametrize(
    ("name", "bad"), [("symmetric", "False"), ("scale_search", None), ("block_resolve", 0), ("scale_refit", "no")]
)
def test_on_off_settings_take_true_or_false_only_in_the_solver_and_the_config(name, bad):
    """``symmetric="False"`` is truthy: read as such it turned the symmetric grid on."""
    import torch

    from hf_comq import COMQConfig

    weight, hessian = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match=f"{name}: expected True"):
        comq_quantize(weight, hessian, **{name: bad})
    with pytest.raises(ValueError, match=f"{name}: expected True"):
        COMQConfig(**{name: bad})
