"""COMQConfig: validation, the compressed-tensors form it serializes to, JSON safety, deep copies, round trips."""

import copy
import json
import logging

import pytest
import torch

import hf_comq
from hf_comq import COMQConfig


def calibration(config: COMQConfig) -> dict:
    return config.to_dict()["comq"]["calibration"]


def test_defaults_serialize_as_a_compressed_tensors_scheme_with_the_comq_settings():
    data = COMQConfig().to_dict()
    assert data["quant_method"] == "compressed-tensors" and data["format"] == "pack-quantized"
    weights = data["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["symmetric"], weights["type"]) == (4, "channel", False, "int")
    assert data["comq"]["selection"]["sequential"] is True and data["comq"]["solver"]["order"] == "act_order"
    assert json.loads(COMQConfig().to_json_string(use_diff=False)) == data
    assert COMQConfig().to_diff_dict() == {} and json.loads(COMQConfig().to_json_string()) == {}
    assert COMQConfig(bits=3, seed=5).to_diff_dict() == {
        "config_groups": {"group_0": {"weights": {"num_bits": 3}}}, "comq": {"calibration": {"seed": 5}},
    }


@pytest.mark.parametrize(
    "settings",
    [dict(iterations=3, pair_moves=0), dict(num_samples=64, seed=5), dict(bits=3, group_size=32, symmetric=True)],
    ids=["solver", "calibration", "format"],
)
def test_from_dict_reads_back_what_to_json_string_and_repr_write(settings):
    """``to_json_string()`` (and ``repr``) write the differences from a default config, as transformers'
    configs do: read back, the solver and calibration settings were dropped and a format change was
    refused as "not a compressed-tensors checkpoint"."""
    config = COMQConfig(**settings)
    restored = COMQConfig.from_dict(json.loads(config.to_json_string()))
    assert restored.to_dict() == config.to_dict()
    assert COMQConfig.from_dict(json.loads(repr(config).split(" ", 1)[1])).to_dict() == config.to_dict()
    with_method = {**json.loads(config.to_json_string()), "quant_method": "comq"}  # as from_pretrained takes a dict
    assert COMQConfig.from_dict(with_method).to_dict() == config.to_dict()


def test_from_dict_round_trips_what_to_dict_writes():
    config = COMQConfig(bits=3, group_size=32, symmetric=True, modules_to_not_convert=["classifier"], dataset="beans",
                        iterations=1, ignore=["classifier"], calibration_samples=64)  # fmt: skip
    written = config.to_dict()
    restored = COMQConfig.from_dict(json.loads(json.dumps(written)))
    assert restored.to_dict() == written
    assert (restored.dataset, restored.iterations, restored.calibration_samples) == ("beans", 1, 64)
    assert restored.format_mismatches(config) == {}


def test_from_dict_accepts_plain_field_values():
    assert COMQConfig.from_dict({"quant_method": "comq", "bits": 3, "group_size": 64}).group_size == 64


def test_unknown_keys_of_a_checkpoints_record_warn_and_are_dropped_when_reading(caplog):
    """A newer hf_comq's record may hold settings this one lacks: its checkpoint still loads."""
    written = COMQConfig(bits=2).to_dict()
    written["comq"]["solver"]["frobnicate"] = 1
    with caplog.at_level(logging.WARNING, logger="hf_comq.config"):
        config = COMQConfig.from_dict(written)
    assert config.bits == 2
    assert "frobnicate" in caplog.text
    assert "frobnicate" not in config.to_json_string()


def test_unknown_keys_of_plain_settings_are_an_error_naming_the_likely_one():
    """A dict given to from_pretrained is the user's own settings: a typo quantized at the default bits."""
    with pytest.raises(ValueError, match=r"unknown COMQ settings 'bitz' \(did you mean 'bits'\?\)"):
        COMQConfig.from_dict({"quant_method": "comq", "bitz": 3})


def test_unknown_keys_are_an_error_when_constructing():
    with pytest.raises(TypeError, match="bitz"):
        COMQConfig(bitz=4)


def test_ridge_auto_is_a_setting_and_survives_the_config_round_trip():
    config = COMQConfig(ridge="auto")
    assert COMQConfig.from_dict(config.to_dict()).ridge == "auto"
    with pytest.raises(ValueError, match="'auto' for one fitted to each layer"):
        COMQConfig(ridge="Auto")


def test_group_size_minus_one_means_per_channel():
    assert COMQConfig(group_size=-1).group_size is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bits", 1),
        ("bits", 9),
        ("bits", 4.0),
        ("bits", True),
        ("group_size", 0),
        ("group_size", "128"),
        ("symmetric", "yes"),
        ("iterations", -1),
        ("order", "random"),
        ("init", "zeros"),
        ("scale_refit", 1),
        ("scale_search", None),
        ("shrink", 0.0),
        ("shrink", 1.5),
        ("damp", -0.1),
        ("damp", 0.0),
        ("damp", float("inf")),
        ("shrink", float("nan")),
        ("clip_weights", "full"),
        ("sum_dtype", "bfloat16"),
        ("start_grids", 0),
        ("start_grids", 5),
        ("ridge", -0.01),
        ("ridge", float("nan")),
        ("ridge", "0.01"),
        ("dataset", ""),
        ("dataset", []),
        ("dataset", 42),
        ("processor", " "),
        ("dataset_split", ""),
        ("dataset_column", 3),
        ("num_samples", 0),
        ("batch_size", 0),
        ("max_length", 0),
        ("seed", -1),
        ("modules_to_not_convert", "classifier"),
        ("modules_to_not_convert", ["classifier", ""]),
        ("block_name", ""),
        ("sequential", "no"),
        ("fp_target", 1),
        ("true_sequential", "yes"),
        ("calibration_description", 5),
        ("quant_method", "gptq"),
    ],
)
def test_every_field_is_validated_with_its_name(field, value):
    with pytest.raises(ValueError, match=field):
        COMQConfig(**{field: value})


def test_a_checkpoint_saved_again_keeps_the_hf_comq_version_that_made_it():
    """Re-saving a loaded checkpoint stamped the running version as its maker's."""
    written = COMQConfig(bits=3).to_dict()
    written["comq"]["hf_comq_version"] = "0.0.9"
    loaded = COMQConfig.from_dict(written)
    assert loaded.hf_comq_version == "0.0.9" and loaded.to_dict()["comq"]["hf_comq_version"] == "0.0.9"
    assert COMQConfig().to_dict()["comq"]["hf_comq_version"] == hf_comq.__version__


def test_fp_target_needs_block_sequential_calibration():
    with pytest.raises(ValueError, match=r"fp_target: needs sequential=True .*set sequential=True"):
        COMQConfig(fp_target=True, sequential=False)
    assert COMQConfig(fp_target=True).fp_target
    assert COMQConfig(bits=3, sequential=False).fp_target is None  # the default's None never asks for it


def test_fp_target_survives_the_config_round_trip_as_given():
    for value in (None, True, False):
        config = COMQConfig.from_dict(COMQConfig(bits=3, fp_target=value).to_dict())
        assert config.fp_target is value


def test_true_sequential_survives_the_config_round_trip_as_given():
    assert COMQConfig().true_sequential is None  # decided with fp_target, when calibration starts
    for value in (None, True, False):
        config = COMQConfig.from_dict(COMQConfig(bits=3, true_sequential=value).to_dict())
        assert config.true_sequential is value


def test_true_sequential_needs_block_sequential_calibration():
    with pytest.raises(ValueError, match=r"true_sequential: needs sequential=True .*set sequential=True"):
        COMQConfig(true_sequential=True, sequential=False)
    config = COMQConfig(true_sequential=True, fp_target=True)
    assert config.true_sequential and COMQConfig.from_dict(config.to_dict()).true_sequential


class _FakeDataset:
    """Stands for a datasets.Dataset: large, iterable, not JSON serializable."""

    def __init__(self):
        self.rows = [{"text": "hello"}] * 10

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)


class _FakeProcessor:
    """Stands for a tokenizer object: callable, not JSON serializable."""

    def __call__(self, *args, **kwargs):
        return {}


def test_in_memory_data_never_reaches_json():
    dataset, processor = _FakeDataset(), _FakeProcessor()
    config = COMQConfig(dataset=dataset, processor=processor)
    data = calibration(config)
    assert data["dataset"] is None and data["processor"] is None
    assert "_FakeDataset" in data["description"] and "10 rows" in data["description"]
    json.dumps(config.to_dict())
    assert "object at 0x" not in config.to_json_string()
    assert config.dataset is dataset  # serializing must not drop the data from the live config


def test_local_paths_are_written_by_name_only(tmp_path):
    """A local path means nothing elsewhere and would publish the user's directory
    layout on push_to_hub; Hub dataset names are kept as given."""
    data_file = tmp_path / "private" / "calibration.parquet"
    data_file.parent.mkdir()
    data_file.write_bytes(b"")
    assert calibration(COMQConfig(dataset=str(data_file), processor=str(tmp_path)))["dataset"] == "calibration.parquet"
    assert calibration(COMQConfig(processor=str(tmp_path)))["processor"] == tmp_path.name
    assert str(tmp_path) not in COMQConfig(dataset=str(data_file)).to_json_string()
    assert calibration(COMQConfig(dataset="/no/such/dir/data.parquet"))["dataset"] == "data.parquet"
    assert calibration(COMQConfig(dataset="ILSVRC/imagenet-1k"))["dataset"] == "ILSVRC/imagenet-1k"


def test_tensor_and_list_datasets_are_described():
    assert "shape (4, 16)" in calibration(COMQConfig(dataset=torch.zeros(4, 16, dtype=torch.long)))["description"]
    assert "list of 2 str" in calibration(COMQConfig(dataset=["a", "b"]))["description"]


def test_calibration_description_set_by_calibration_wins():
    config = COMQConfig(dataset=["a"], calibration_description="2 captions from coco")
    assert calibration(config)["description"] == "2 captions from coco"


def test_settings_changed_after_construction_are_checked():
    """``update`` checks as a whole and leaves the config as it was on a bad value; an assignment
    is checked when a quantizer takes the config, before any weight loads."""
    from hf_comq import COMQHfQuantizer

    config = COMQConfig(bits=4)
    with pytest.raises(ValueError, match="bits: expected an integer in"):
        config.update(bits=99, group_size=64)
    assert config.bits == 4 and config.group_size is None
    assert config.update(group_size=-1, not_a_setting=1) == {"not_a_setting": 1} and config.group_size is None
    with pytest.raises(ValueError, match=r"quant_method: COMQConfig only describes 'comq', got 'gptq'"):
        config.update(quant_method="gptq")  # was accepted, and from_pretrained then asked for optimum
    assert config.quant_method == "comq"
    config.num_samples = -3
    with pytest.raises(ValueError, match="num_samples: expected an integer >= 1"):
        COMQHfQuantizer(config)


def test_numpy_scalars_are_accepted_as_python_values():
    np = pytest.importorskip("numpy")
    config = COMQConfig(bits=np.int64(3), group_size=np.int32(64), shrink=np.float32(0.5), symmetric=np.True_)
    assert (config.bits, config.group_size, config.shrink, config.symmetric) == (3, 64, 0.5, True)
    assert type(config.bits) is int and type(config.shrink) is float and type(config.symmetric) is bool
    json.dumps(config.to_dict())
    with pytest.raises(ValueError, match="bits: expected an integer"):
        COMQConfig(bits=np.float64(4.0))


def test_configs_are_equal_when_their_settings_are():
    data = ["a sentence"]
    assert COMQConfig(bits=3, dataset=data) == COMQConfig(bits=3, dataset=data)
    assert COMQConfig(bits=3) != COMQConfig(bits=4)
    assert COMQConfig(dataset=["a"]) != COMQConfig(dataset=["a"])  # data compare as objects: not read
    assert COMQConfig(dataset="demo:calibration") == COMQConfig(dataset="demo:calibration")
    assert COMQConfig(bits=3) not in [COMQConfig(bits=4), COMQConfig(group_size=64)]


def test_numbers_compare_by_value_and_paths_and_demo_names_are_checked_at_construction(tmp_path):
    assert COMQConfig(ridge=0) == COMQConfig() and COMQConfig(shrink=1) == COMQConfig(shrink=1.0)
    assert COMQConfig(dataset=tmp_path).dataset == tmp_path  # a pathlib.Path, as processor= takes one
    with pytest.raises(ValueError, match="dataset: unknown demo dataset 'demo:nope'; use one of demo:calibration"):
        COMQConfig(dataset="demo:nope")


def test_per_channel_assigned_as_minus_one_after_construction_serializes():
    config = COMQConfig(group_size=64)
    config.group_size = -1  # the command line's spelling, assigned rather than passed
    assert config.to_dict()["config_groups"]["group_0"]["weights"]["strategy"] == "channel"


def test_help_and_default_name_the_settings_for_an_unknown_name():
    with pytest.raises(ValueError, match="'group' is not a COMQ setting; the settings are bits, group_size"):
        COMQConfig.help("group")
    with pytest.raises(ValueError, match="'nbits' is not a COMQ setting"):
        COMQConfig.default("nbits")


def test_an_empty_recorded_folder_name_reads_as_none():
    """hf_comq before this fix recorded "" for a model loaded from "."; such checkpoints must load."""
    assert COMQConfig.from_dict({**COMQConfig().to_dict(), "comq": {"base_model_folder": ""}}).base_model_folder is None


def test_every_setting_has_a_kind_and_a_help_text():
    assert set(COMQConfig.field_names()) == set(COMQConfig.field_names("format") + COMQConfig.field_names("solver")
        + COMQConfig.field_names("calibration") + COMQConfig.field_names("selection")
        + COMQConfig.field_names("recorded"))  # fmt: skip
    assert all(COMQConfig.help(name) for name in COMQConfig.field_names())
    assert COMQConfig.default("num_samples") == 128 and COMQConfig.default("bits") == 4


def test_deepcopy_shares_dataset_and_processor():
    dataset, processor = _FakeDataset(), _FakeProcessor()
    config = COMQConfig(dataset=dataset, processor=processor, modules_to_not_convert=["classifier"])
    clone = copy.deepcopy(config)
    assert clone.dataset is dataset and clone.processor is processor
    assert clone.modules_to_not_convert == ["classifier"]
    assert clone.modules_to_not_convert is not config.modules_to_not_convert
    assert clone.to_dict() == config.to_dict()


def test_dict_conversion_does_not_copy_the_dataset():
    dataset = _FakeDataset()
    assert dict(COMQConfig(dataset=dataset))["comq"]["calibration"]["dataset"] is None


def test_format_mismatches_lists_the_differing_fields():
    assert COMQConfig(bits=4).format_mismatches(COMQConfig(bits=4, iterations=1)) == {}
    assert COMQConfig(bits=4).format_mismatches(COMQConfig(bits=3, group_size=64)) == {
        "bits": (4, 3),
        "group_size": (None, 64),
    }
