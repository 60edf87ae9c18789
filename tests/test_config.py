"""COMQConfig: validation, JSON safety, deep copies that share the data, round trips."""

import copy
import json
import logging

import pytest
import torch

from hf_comq import COMQConfig


def test_defaults_serialize_with_the_quant_method():
    data = COMQConfig().to_dict()
    assert data["quant_method"] == "comq"
    assert data["bits"] == 4 and data["group_size"] is None and data["sequential"] is True
    assert json.loads(COMQConfig().to_json_string()) == data


def test_from_dict_round_trips_what_to_dict_writes():
    config = COMQConfig(bits=3, group_size=32, symmetric=True, modules_to_not_convert=["classifier"], dataset="beans")
    written = config.to_dict()
    restored = COMQConfig.from_dict(json.loads(json.dumps(written)))
    assert restored.to_dict() == written
    assert restored.dataset == "beans"


def test_unknown_keys_warn_and_are_dropped(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_comq.config"):
        config = COMQConfig.from_dict({"quant_method": "comq", "bits": 2, "frobnicate": 1})
    assert config.bits == 2
    assert "frobnicate" in caplog.text
    assert "frobnicate" not in config.to_dict()


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
        ("calibration_description", 5),
        ("quant_method", "gptq"),
    ],
)
def test_every_field_is_validated_with_its_name(field, value):
    with pytest.raises(ValueError, match=field):
        COMQConfig(**{field: value})


class _FakeDataset:
    """Stands for a datasets.Dataset: large, iterable, not JSON serializable."""

    def __init__(self):
        self.rows = [{"text": "hello"}] * 10

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)


def test_in_memory_data_never_reaches_json():
    dataset, processor = _FakeDataset(), object()
    config = COMQConfig(dataset=dataset, processor=processor)
    data = config.to_dict()
    assert data["dataset"] is None and data["processor"] is None
    assert "_FakeDataset" in data["calibration_description"] and "10 rows" in data["calibration_description"]
    json.dumps(data)
    assert "object at 0x" not in config.to_json_string()
    assert config.dataset is dataset  # serializing must not drop the data from the live config


def test_local_paths_are_written_by_name_only(tmp_path):
    """A local path means nothing elsewhere and would publish the user's directory
    layout on push_to_hub; Hub dataset names are kept as given."""
    data_file = tmp_path / "private" / "calibration.parquet"
    data_file.parent.mkdir()
    data_file.write_bytes(b"")
    assert COMQConfig(dataset=str(data_file), processor=str(tmp_path)).to_dict()["dataset"] == "calibration.parquet"
    assert COMQConfig(processor=str(tmp_path)).to_dict()["processor"] == tmp_path.name
    assert str(tmp_path) not in COMQConfig(dataset=str(data_file)).to_json_string()
    assert COMQConfig(dataset="/no/such/dir/data.parquet").to_dict()["dataset"] == "data.parquet"
    assert COMQConfig(dataset="ILSVRC/imagenet-1k").to_dict()["dataset"] == "ILSVRC/imagenet-1k"


def test_tensor_and_list_datasets_are_described():
    assert "shape (4, 16)" in COMQConfig(dataset=torch.zeros(4, 16, dtype=torch.long)).to_dict()["calibration_description"]
    assert "list of 2 str" in COMQConfig(dataset=["a", "b"]).to_dict()["calibration_description"]


def test_calibration_description_set_by_calibration_wins():
    config = COMQConfig(dataset=["a"], calibration_description="2 captions from coco")
    assert config.to_dict()["calibration_description"] == "2 captions from coco"


def test_deepcopy_shares_dataset_and_processor():
    dataset, processor = _FakeDataset(), object()
    config = COMQConfig(dataset=dataset, processor=processor, modules_to_not_convert=["classifier"])
    clone = copy.deepcopy(config)
    assert clone.dataset is dataset and clone.processor is processor
    assert clone.modules_to_not_convert == ["classifier"]
    assert clone.modules_to_not_convert is not config.modules_to_not_convert
    assert clone.to_dict() == config.to_dict()


def test_dict_conversion_does_not_copy_the_dataset():
    dataset = _FakeDataset()
    assert dict(COMQConfig(dataset=dataset))["dataset"] is None


def test_format_mismatches_lists_the_differing_fields():
    assert COMQConfig(bits=4).format_mismatches(COMQConfig(bits=4, iterations=1)) == {}
    assert COMQConfig(bits=4).format_mismatches(COMQConfig(bits=3, group_size=64)) == {
        "bits": (4, 3),
        "group_size": (None, 64),
    }
