"""Data sources: file kinds, loading by name or path, and the seeded subset (the library's own shuffle)."""

from __future__ import annotations

import datasets
import pytest

from hf_comq.calibration.sources import (
    DATA_FILE_BUILDERS,
    check_local_sources,
    data_file_builder,
    dataset_from_list,
    load_dataset_source,
    pick_column,
    seeded_subset,
)

from tests.tiny import images, sentences


def test_file_kinds_name_the_datasets_builder():
    assert data_file_builder("calib.JSONL") == "json" and data_file_builder("/x/y.parquet") == "parquet"
    assert data_file_builder("model.safetensors") is None
    assert set(DATA_FILE_BUILDERS.values()) == {"parquet", "json", "csv", "arrow", "text"}


@pytest.mark.parametrize("suffix", sorted(DATA_FILE_BUILDERS))
def test_every_file_kind_loads_as_a_stream(tmp_path, suffix):
    texts = sentences(4)
    path = tmp_path / f"data{suffix}"
    table = datasets.Dataset.from_dict({"text": texts})
    if suffix == ".txt":
        path.write_text("\n".join(texts) + "\n")
    elif suffix == ".arrow":
        table.save_to_disk(tmp_path / "saved")
        path = next((tmp_path / "saved").glob("*.arrow"))
    else:
        {".parquet": table.to_parquet, ".csv": table.to_csv}.get(suffix, table.to_json)(str(path))
    loaded, origin = load_dataset_source(str(path), "train")
    assert isinstance(loaded, datasets.IterableDataset)
    assert [row["text"] for row in loaded] == texts
    assert origin == {"source": f"local dataset {path.name!r}", "split": None}  # one file: no splits to name


def test_subset_is_the_libraries_seeded_shuffle():
    table = datasets.Dataset.from_dict({"text": [str(i) for i in range(50)]})
    subset = seeded_subset(table, 7, seed=3)
    assert subset["text"] == table.shuffle(seed=3).select(range(7))["text"]
    stream = seeded_subset(table.to_iterable_dataset(), 7, seed=3)
    assert len(list(stream)) == 7


def test_a_text_subset_passes_over_blank_texts_and_is_unchanged_without_them(caplog):
    texts = [str(i) for i in range(50)]
    table = datasets.Dataset.from_dict({"text": texts})
    assert seeded_subset(table, 7, seed=3, column="text")["text"] == table.shuffle(seed=3).select(range(7))["text"]
    # wikitext-like: most rows blank; the subset is the first 7 texts in the same shuffled order
    blanks = [text if i % 3 == 0 else " \n" * (i % 2) for i, text in enumerate(texts)]
    gappy = datasets.Dataset.from_dict({"text": blanks})
    shuffled = [text for text in gappy.shuffle(seed=3)["text"] if text.strip()]
    assert seeded_subset(gappy, 7, seed=3, column="text")["text"] == shuffled[:7]
    stream = seeded_subset(gappy.to_iterable_dataset(), 7, seed=3, column="text")
    picked = [row["text"] for row in stream]
    assert len(picked) == 7 and all(text.strip() for text in picked)
    # fewer texts than asked for: all of them, with a warning that says what is missing
    every_text = sorted(seeded_subset(gappy, 40, seed=0, column="text")["text"], key=int)
    assert every_text == sorted(shuffled, key=int) and len(every_text) == 17
    assert "the dataset has only 17 non-blank values" in caplog.text
    with pytest.raises(ValueError, match="every value of column 'text' is blank or empty"):
        seeded_subset(datasets.Dataset.from_dict({"text": ["", "  "]}), 4, seed=0, column="text")
    # a null row (a JSON null, a missing value) is passed over like a blank one
    holes = datasets.Dataset.from_dict({"text": ["a", None, "b", None, ""]})
    assert sorted(seeded_subset(holes, 5, seed=0, column="text")["text"]) == ["a", "b"]
    streamed = seeded_subset(holes.to_iterable_dataset(), 5, seed=0, column="text")
    assert sorted(row["text"] for row in streamed) == ["a", "b"]


def test_an_image_subset_passes_over_missing_images_as_the_stream_does():
    """A None in an indexed Dataset's image column reached the image processor, after the weights
    had loaded; the streamed form of the same data passed it over."""
    pictures = images(4)
    table = datasets.Dataset.from_dict({"image": [pictures[0], None, pictures[1], None, pictures[2], pictures[3]]},
                                       features=datasets.Features({"image": datasets.Image()}))  # fmt: skip
    picked = seeded_subset(table, 6, seed=0, column="image")["image"]
    assert len(picked) == 4 and all(image is not None for image in picked)
    streamed = [row["image"] for row in seeded_subset(table.to_iterable_dataset(), 6, seed=0, column="image")]
    assert len(streamed) == 4 and all(image is not None for image in streamed)
    whole = datasets.Dataset.from_dict({"image": pictures}, features=datasets.Features({"image": datasets.Image()}))
    assert [image.tobytes() for image in seeded_subset(whole, 3, seed=1, column="image")["image"]] == [
        image.tobytes() for image in whole.shuffle(seed=1).select(range(3))["image"]
    ]


def test_a_subset_larger_than_the_data_takes_all_of_it(caplog):
    table = datasets.Dataset.from_dict({"text": ["a", "b"]})
    assert sorted(seeded_subset(table, 9, seed=0)["text"]) == ["a", "b"]
    assert "only 2 samples" in caplog.text


def test_lists_become_one_column_datasets():
    pictures = dataset_from_list(images(2), "image")
    assert isinstance(pictures.features["image"], datasets.Image) and pictures[0]["image"].size == (40, 40)
    assert pick_column(pictures, None) == "image"
    assert pick_column(dataset_from_list(["x"], "text"), None) == "text"


def test_split_slices_are_refused_in_one_line(tmp_path):
    """A single file would be read whole under "train[:3]", a folder or Hub name refused with datasets'
    "Bad split": both get the one line saying what to set instead."""
    file = tmp_path / "data.jsonl"
    file.write_text('{"text": "the cat"}\n')
    folder = tmp_path / "folder"
    datasets.Dataset.from_dict({"text": sentences(3)}).to_parquet(str(folder / "train.parquet"))
    for source, split in ((file, "train[:3]"), (folder, "train[:3]"), (folder, "train+test")):
        with pytest.raises(ValueError, match=r"^split '.*': hf_comq reads whole splits, not slices .* \('train'\)"):
            load_dataset_source(str(source), split)


def test_a_saved_dataset_without_splits_records_the_split_it_holds_not_the_one_asked_for(tmp_path):
    for split in (None, "validation"):
        folder = tmp_path / f"saved-{split}"
        datasets.Dataset.from_dict({"text": sentences(3)}, split=split).save_to_disk(str(folder))
        _, origin = load_dataset_source(str(folder), "test")
        assert origin["split"] == split


def test_a_glob_is_named_as_one(tmp_path):
    with pytest.raises(ValueError, match=r"is a pattern, and hf_comq takes no globs; pass the folder"):
        check_local_sources(str(tmp_path / "shards" / "*.parquet"), None)


def _texts_in(split: datasets.IterableDataset) -> list[str]:
    return [row["text"] for row in split]


def test_a_folder_reads_files_named_after_any_split(tmp_path):
    """datasets itself keeps only train/validation/test names in a folder and drops the other
    files: the shipped subset's calibration.parquet beside test.parquet was unreachable."""
    calibration, shards, test = sentences(6)[:2], sentences(6)[2:4], sentences(6)[4:]
    datasets.Dataset.from_dict({"text": calibration}).to_parquet(str(tmp_path / "calibration.parquet"))
    datasets.Dataset.from_dict({"text": shards}).to_parquet(str(tmp_path / "calibration-00001-of-00002.parquet"))
    datasets.Dataset.from_dict({"text": test}).to_parquet(str(tmp_path / "test.parquet"))
    loaded, origin = load_dataset_source(str(tmp_path), "calibration")
    assert sorted(_texts_in(loaded)) == sorted(calibration + shards) and origin["split"] == "calibration"
    assert _texts_in(load_dataset_source(str(tmp_path), "test")[0]) == test
    with pytest.raises(ValueError, match=r"^split 'train' not found in folder .* the splits \['calibration', 'test'\]"):
        load_dataset_source(str(tmp_path), "train")
    hub_layout = tmp_path / "hub"
    for name in ("train", "test"):
        datasets.Dataset.from_dict({"text": sentences(2)}).to_json(str(hub_layout / "data" / f"{name}.jsonl"))
    with pytest.raises(ValueError, match=r"^split 'validation' not found in folder 'hub', .* the splits \['test', 'train'\]"):
        load_dataset_source(str(hub_layout), "validation")


def test_a_split_in_two_formats_is_one_line(tmp_path):
    datasets.Dataset.from_dict({"text": sentences(2)}).to_parquet(str(tmp_path / "calibration.parquet"))
    datasets.Dataset.from_dict({"text": sentences(2)}).to_json(str(tmp_path / "calibration.jsonl"))
    with pytest.raises(ValueError, match=r"^split 'calibration' of folder .* has files of 2 formats"):
        load_dataset_source(str(tmp_path), "calibration")


def test_a_single_file_warns_that_a_split_other_than_the_default_is_ignored(tmp_path, caplog):
    file = tmp_path / "data.jsonl"
    file.write_text('{"text": "the cat"}\n')
    with caplog.at_level("WARNING", logger="hf_comq.calibration.sources"):
        load_dataset_source(str(file), "train", "train")
        assert not caplog.records
        loaded, origin = load_dataset_source(str(file), "validation", "train")
    assert "split 'validation' ignored" in caplog.text and "single data file" in caplog.text
    assert _texts_in(loaded) == ["the cat"] and origin["split"] is None


def test_the_default_split_of_a_folder_of_named_files_warns_that_it_reads_them_all(tmp_path, caplog):
    """datasets reads a folder whose files name no split as one train split: calibration.parquet and
    holdout.parquet were calibrated on together, held-out rows included, without a word."""
    for name in ("calibration", "holdout"):
        datasets.Dataset.from_dict({"text": sentences(2)}).to_parquet(str(tmp_path / f"{name}.parquet"))
    with caplog.at_level("WARNING", logger="hf_comq.calibration.sources"):
        loaded, _ = load_dataset_source(str(tmp_path), "train")
    assert len(_texts_in(loaded)) == 4
    assert "reads all its data files as one split" in caplog.text and "['calibration', 'holdout']" in caplog.text
    caplog.clear()
    shards = tmp_path / "shards"
    for index in range(2):
        datasets.Dataset.from_dict({"text": sentences(2)}).to_parquet(str(shards / f"data-0000{index}-of-00002.parquet"))
    with caplog.at_level("WARNING", logger="hf_comq.calibration.sources"):
        load_dataset_source(str(shards), "train")
    assert not caplog.records
    # names datasets itself reads as one split (train.jsonl and train_extra.jsonl, Spark's part files): all, no word
    for folder, names in (("extra", ["train", "train_extra"]), ("spark", ["part-00000", "part-00001"])):
        for name in names:
            datasets.Dataset.from_dict({"text": sentences(2)}).to_json(str(tmp_path / folder / f"{name}.jsonl"))
        with caplog.at_level("WARNING", logger="hf_comq.calibration.sources"):
            assert len(_texts_in(load_dataset_source(str(tmp_path / folder), "train")[0])) == 4
        assert not caplog.records


def test_a_split_given_for_a_saved_single_dataset_is_ignored_with_a_warning(tmp_path, caplog):
    datasets.Dataset.from_dict({"text": sentences(3)}).save_to_disk(str(tmp_path / "saved"))
    with caplog.at_level("WARNING", logger="hf_comq.calibration.sources"):
        load_dataset_source(str(tmp_path / "saved"), "train", "train")
        assert not caplog.records
        load_dataset_source(str(tmp_path / "saved"), "validation", "train")
    assert "split 'validation' ignored" in caplog.text and "holds one saved dataset" in caplog.text
