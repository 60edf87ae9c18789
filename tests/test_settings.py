"""The settings table: torch-free, the one source of COMQConfig's fields and of the CLI's options."""

import subprocess
import sys

from hf_comq import COMQConfig
from hf_comq.cli import build_parser
from hf_comq.settings import CALIBRATION, COMQSettings
from hf_comq.solver.options import DEFAULTS


def test_the_table_imports_without_torch_or_transformers():
    code = "import sys, hf_comq.settings; assert not {'torch', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_comq_config_has_exactly_the_settings_fields():
    assert COMQConfig.field_names() == COMQSettings.field_names()
    assert all(COMQConfig.default(name) == DEFAULTS[name] for name in DEFAULTS if name in COMQConfig.field_names())
    assert "dataset" in COMQSettings.field_names(CALIBRATION)


def test_cli_options_take_type_and_default_from_the_table():
    parser = build_parser()
    quantize = parser._subparsers._group_actions[0].choices["quantize"]
    defaults = {action.dest: action.default for action in quantize._actions}
    for name in ("bits", "group_size", "num_samples", "batch_size", "max_length", "seed"):
        assert defaults[name] == COMQSettings.default(name), name
    assert (defaults["split"], defaults["column"]) == (COMQSettings.default("dataset_split"), None)
    args = parser.parse_args(["quantize", "m", "--dataset", "d", "--output", "o", "--bits", "3"])
    assert args.bits == 3 and args.num_samples == COMQSettings.default("num_samples")
