"""Calibration data: every accepted form of ``COMQConfig.dataset``, sampling, and bad input."""

from __future__ import annotations

import logging

import datasets
import numpy as np
import pytest
import torch
import transformers as T

from hf_comq.calibration import build_calibration_data
from hf_comq.config import COMQConfig

from tests.tiny import (
    chat_tokenizer,
    gray_images,
    image_processor,
    images,
    sentences,
    tiny_model,
    tiny_vit,
    word_tokenizer,
)


@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _config(dataset, **kwargs) -> COMQConfig:
    kwargs.setdefault("batch_size", 4)
    return COMQConfig(dataset=dataset, **kwargs)


def _collect(data) -> list[dict[str, torch.Tensor]]:
    return list(data)


def _image_dataset(count: int, column: str = "image") -> datasets.Dataset:
    return datasets.Dataset.from_dict({column: images(count), "label": list(range(count))})


# ---------------------------------------------------------------- accepted forms


def test_in_memory_image_dataset(vit):
    config = _config(_image_dataset(10), processor=image_processor(), num_samples=6)
    data = build_calibration_data(vit, config)
    batches = _collect(data)
    assert data.num_samples == 6
    assert [tuple(b["pixel_values"].shape) for b in batches] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    assert set(batches[0]) == {"pixel_values"}
    assert config.calibration_description == "datasets.Dataset (column image), 6 samples"


def test_a_datasets_object_is_recorded_with_its_name_and_split(tmp_path, llama, tokenizer):
    """``load_dataset(..., split="validation")`` then ``COMQConfig(dataset=ds)``: the record names what the
    object says, not the unused ``dataset_split`` default."""
    folder = tmp_path / "my_corpus"
    datasets.Dataset.from_dict({"text": sentences(6)}).to_parquet(str(folder / "validation.parquet"))
    loaded = datasets.load_dataset(str(folder), split="validation")
    config = _config(loaded, processor=tokenizer, num_samples=4)
    build_calibration_data(llama, config)
    assert config.calibration_description == "datasets.Dataset 'my_corpus' (split validation, column text), 4 samples"
    recorded = config.provenance()["calibration"]
    assert (recorded["dataset"], recorded["dataset_split"]) == ("my_corpus", "validation")
    config = _config(datasets.Dataset.from_dict({"text": sentences(2)}), processor=tokenizer)
    build_calibration_data(llama, config)
    assert (config.provenance()["calibration"]["dataset_split"], config.calibration_description) == (
        None, "datasets.Dataset (column text), 2 samples",
    )  # fmt: skip
    assert COMQConfig.from_dict(config.to_dict()).provenance()["calibration"]["dataset_split"] is None


def test_img_column_and_column_override(vit):
    dataset = datasets.Dataset.from_dict({"img": images(3), "image": ["not an image"] * 3})
    config = _config(dataset, processor=image_processor(), dataset_column="img")
    batches = _collect(build_calibration_data(vit, config))
    assert sum(b["pixel_values"].shape[0] for b in batches) == 3


def test_pixel_values_column_is_used_as_model_input(vit):
    pixels = torch.randn(5, 3, 32, 32)
    dataset = datasets.Dataset.from_dict({"pixel_values": pixels.numpy()})
    batches = _collect(build_calibration_data(vit, _config(dataset, num_samples=5)))
    stacked = torch.cat([b["pixel_values"] for b in batches])
    assert stacked.shape == (5, 3, 32, 32)
    expected = sorted(pixels.sum(dim=(1, 2, 3)).tolist())
    assert sorted(stacked.sum(dim=(1, 2, 3)).tolist()) == pytest.approx(expected, rel=1e-5)


def test_text_dataset_truncates_pads_and_masks(llama, tokenizer):
    texts = sentences(9)
    config = _config(datasets.Dataset.from_dict({"text": texts}), processor=tokenizer, max_length=6, num_samples=9)
    batches = _collect(build_calibration_data(llama, config))
    assert sum(b["input_ids"].shape[0] for b in batches) == 9
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask"}  # token_type_ids: LLaMA does not take them
        assert batch["input_ids"].shape[1] <= 6
        assert batch["attention_mask"].shape == batch["input_ids"].shape
    lengths = sorted(int(b.sum()) for batch in batches for b in batch["attention_mask"])
    expected = sorted(min(len(text.split()), 6) for text in texts)
    assert lengths == expected


def test_saved_to_disk_dataset_loaded_by_path(tmp_path, vit):
    datasets.DatasetDict({"train": _image_dataset(4), "test": _image_dataset(2)}).save_to_disk(tmp_path / "ds")
    config = _config(str(tmp_path / "ds"), processor=image_processor(), dataset_split="test")
    data = build_calibration_data(vit, config)
    assert data.num_samples == 2
    assert sum(b["pixel_values"].shape[0] for b in data) == 2
    assert config.calibration_description == "local dataset 'ds' (split test, column image), 2 samples"


def test_single_saved_dataset_loaded_by_path(tmp_path, llama, tokenizer):
    datasets.Dataset.from_dict({"text": sentences(5)}).save_to_disk(tmp_path / "single")
    data = build_calibration_data(llama, _config(str(tmp_path / "single"), processor=tokenizer))
    assert data.num_samples == 5


def test_parquet_folder_loaded_by_path_is_streamed(tmp_path, llama, tokenizer):
    folder = tmp_path / "parquet"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": sentences(7)}).to_parquet(str(folder / "train.parquet"))
    config = _config(str(folder), processor=tokenizer, num_samples=5)
    data = build_calibration_data(llama, config)
    assert data.num_samples == 5
    first, second = _collect(data), _collect(data)
    assert sum(b["input_ids"].shape[0] for b in first) == 5
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))  # re-iterable, same order


def test_json_file_loaded_by_path(tmp_path, llama, tokenizer):
    path = tmp_path / "calib.jsonl"
    datasets.Dataset.from_dict({"text": sentences(3)}).to_json(str(path))
    data = build_calibration_data(llama, _config(str(path), processor=tokenizer))
    assert data.num_samples == 3


def test_iterable_dataset(vit):
    stream = _image_dataset(6).to_iterable_dataset()
    config = _config(stream, processor=image_processor(), num_samples=4)
    data = build_calibration_data(vit, config)
    assert data.num_samples == 4
    assert sum(b["pixel_values"].shape[0] for b in data) == 4


@pytest.mark.parametrize("form", ["indexed", "torch format", "stream"])
def test_a_tokenized_dataset_is_read_as_ready_inputs_padded_per_batch(llama, form):
    """``dataset.map(tokenizer)`` output: the same real tokens as the text itself, padding masked out."""
    tokenizer, texts = word_tokenizer(), sentences(5)
    tokenized = datasets.Dataset.from_dict({"text": texts}).map(lambda row: tokenizer(row["text"]))
    tokenized = tokenized.remove_columns("text")
    source = {"indexed": tokenized, "torch format": tokenized.with_format("torch"),
              "stream": tokenized.to_iterable_dataset()}[form]  # fmt: skip
    config = _config(source, batch_size=2)
    batches = _collect(build_calibration_data(llama, config))
    from_text = _collect(build_calibration_data(llama, _config(texts, processor=word_tokenizer(), batch_size=2)))
    assert [sorted(batch) for batch in batches] == [["attention_mask", "input_ids"]] * 3
    real, expected = _real_tokens(batches), _real_tokens(from_text)
    assert sorted(real) == sorted(expected) and len(real) == 5
    assert config.calibration_description.endswith("(column input_ids), 5 samples")


def test_tokenized_rows_are_padded_with_a_valid_id_whatever_the_configs_pad_token_id():
    """Converted LLaMA configs carry pad_token_id=-1: padded positions are masked, so any id the
    embedding holds pads them, and the user's valid rows are not blamed."""
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             num_key_value_heads=1, intermediate_size=64, pad_token_id=-1))  # fmt: skip
    rows = datasets.Dataset.from_dict({"input_ids": [[3, 4, 5], [6, 7]]})
    batch = _collect(build_calibration_data(model, _config(rows, batch_size=2, num_samples=2)))[0]
    assert int(batch["input_ids"].min()) >= 0
    assert sorted(batch["attention_mask"].sum(dim=1).tolist()) == [2, 3]


def test_tokenized_rows_win_over_their_text_and_odd_rows_are_skipped_or_named(llama):
    rows = {"text": ["one two", "", "three four five", "six"], "input_ids": [[3, 4], [], [5, 6, 7], [8]]}
    config = _config(datasets.Dataset.from_dict(rows), batch_size=4)
    batches = _collect(build_calibration_data(llama, config))
    assert sorted(_real_tokens(batches)) == [[3, 4], [5, 6, 7], [8]]  # the user's tokens; the empty row passed over
    assert config.calibration_description.endswith("(column input_ids), 3 samples")
    ragged = {"input_ids": [[3, 4, 5], [6, 7]], "attention_mask": [[1, 1], [1, 1]]}
    refusal = "column 'attention_mask' must hold one entry per token of input_ids; a row of 3"
    with pytest.raises(ValueError, match=refusal):
        _collect(build_calibration_data(llama, _config(datasets.Dataset.from_dict(ragged))))


def _real_tokens(batches: list[dict[str, torch.Tensor]]) -> list[list[int]]:
    """Each row's token ids where its attention mask is set."""
    rows = [zip(batch["input_ids"], batch["attention_mask"]) for batch in batches]
    return [ids[mask.bool()].tolist() for pairs in rows for ids, mask in pairs]


def test_list_of_pil_images(vit):
    config = _config(images(5), processor=image_processor(), num_samples=3)
    batches = _collect(build_calibration_data(vit, config))
    assert [b["pixel_values"].shape[0] for b in batches] == [3]
    assert config.calibration_description == "list of images, 3 samples"


def test_list_of_uint8_image_arrays_is_a_list_of_images(vit):
    """NumPy image datasets (height x width [x channels], uint8) give the pixels their PIL images give."""
    pictures = images(3)
    gray = [picture.convert("L") for picture in pictures[1:]]
    arrays = [np.asarray(pictures[0]), np.asarray(gray[0]), np.asarray(gray[1])[..., None]]
    config = _config(arrays, processor=image_processor())
    batches = _collect(build_calibration_data(vit, config))
    expected = image_processor()(images=[pictures[0]] + [image.convert("RGB") for image in gray], return_tensors="pt")
    got, want = batches[0]["pixel_values"], expected["pixel_values"]  # the same images, in the sampling's order
    assert sorted(got.sum((1, 2, 3)).tolist()) == sorted(want.sum((1, 2, 3)).tolist())
    assert all(any(torch.equal(image, other) for other in want) for image in got)
    assert config.calibration_description == "list of images, 3 samples"


@pytest.mark.parametrize("array", [np.zeros((3, 8, 8), np.uint8), np.zeros((8, 8, 3), np.float32)])
def test_image_arrays_of_another_layout_are_refused_in_one_line(vit, array):
    refusal = r"must be uint8, height x width or height x width x 1/3/4 channels; got"
    with pytest.raises(ValueError, match=refusal) as caught:
        build_calibration_data(vit, _config([array], processor=image_processor()))
    assert str(array.dtype) in str(caught.value) and str(array.shape) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_image_file_paths_are_read_and_a_missing_one_is_one_line(vit, tmp_path, monkeypatch):
    pictures = images(2)
    for index, picture in enumerate(pictures):
        picture.save(tmp_path / f"{index}.png")
    monkeypatch.chdir(tmp_path)
    paths = datasets.Dataset.from_dict({"image": ["0.png", str(tmp_path / "1.png")]})
    batches = _collect(build_calibration_data(vit, _config(paths, processor=image_processor())))
    expected = image_processor()(images=pictures, return_tensors="pt")["pixel_values"]
    assert sorted(batches[0]["pixel_values"].sum((1, 2, 3)).tolist()) == sorted(expected.sum((1, 2, 3)).tolist())
    missing = datasets.Dataset.from_dict({"image": ["gone.png"]})
    refusal = rf"image file 'gone.png' not found \(relative paths are read from the working folder, {tmp_path}\)"
    with pytest.raises(ValueError, match=refusal):
        _collect(build_calibration_data(vit, _config(missing, processor=image_processor())))


def test_grayscale_images_are_converted_to_rgb(vit):
    gray = [image.convert("L") for image in images(2)]
    batches = _collect(build_calibration_data(vit, _config(gray, processor=image_processor())))
    assert batches[0]["pixel_values"].shape == (2, 3, 32, 32)


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped():
    """PIL's convert clips 16-bit values above 255: a full-range scan came out nearly all white."""
    from PIL import Image

    from hf_comq.calibration.processors import to_eight_bits

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    scaled = np.asarray(to_eight_bits(Image.fromarray(ramp)).convert("RGB"))
    assert scaled.min() == 0 and scaled.max() == 255 and (scaled == 255).mean() < 0.01
    np.testing.assert_array_equal(scaled[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    # the container's range, whatever an image's brightest pixel: two near-identical dark scans stay alike
    dark, darker = (np.asarray(to_eight_bits(Image.fromarray(np.full((4, 4), top, dtype=np.uint16)))) for top in (256, 255))
    assert dark.max() == 1 and darker.max() == 1
    eight_bit = Image.fromarray(np.full((4, 4), 200, dtype=np.int32), mode="I")  # 32-bit, values on the 8-bit scale
    assert to_eight_bits(eight_bit) is eight_bit


def test_the_tokenizers_backend_keeps_its_truncation_and_padding(llama):
    """The call's truncation stayed set in the Rust backend, and a saved tokenizer.json cut every
    input at calibration's length for what reads it with the tokenizers library."""
    tokenizer = word_tokenizer()
    before = (tokenizer.backend_tokenizer.truncation, tokenizer.backend_tokenizer.padding)
    _collect(build_calibration_data(llama, _config(sentences(4), processor=tokenizer, max_length=5)))
    assert (tokenizer.backend_tokenizer.truncation, tokenizer.backend_tokenizer.padding) == before
    tokenizer.backend_tokenizer.enable_truncation(max_length=300)
    _collect(build_calibration_data(llama, _config(sentences(4), processor=tokenizer, max_length=5)))
    assert tokenizer.backend_tokenizer.truncation["max_length"] == 300


def test_a_padless_tokenizer_is_not_changed_and_needs_no_pad_token(llama):
    """Calibration pads its batches itself (masked positions, id 0): the caller's tokenizer, which
    hf-comq quantize saves next to the weights, keeps having no pad token, whatever the batch size."""
    tokenizer = word_tokenizer(with_pad=False)
    for batch_size in (4, 1):
        batches = _collect(build_calibration_data(llama, _config(sentences(4), processor=tokenizer, batch_size=batch_size)))
        assert sum(batch["input_ids"].shape[0] for batch in batches) == 4
    assert tokenizer.pad_token is None
    bare = T.PreTrainedTokenizerFast(tokenizer_object=word_tokenizer().backend_tokenizer)  # no pad, eos or unk token
    batches = _collect(build_calibration_data(llama, _config(sentences(4), processor=bare)))
    assert batches[0]["input_ids"].shape[0] == 4 and bare.pad_token is None


def test_texts_are_padded_on_the_right_whatever_the_tokenizers_side():
    """A tokenizer saved for generation pads on the left; calibration still starts every text at
    position 0, as the model sees it alone (GPT-2's learned positions would shift otherwise)."""
    gpt2 = tiny_model("gpt2")
    tokenizer = word_tokenizer(with_pad=False)
    tokenizer.padding_side = "left"
    texts = sentences(4)
    batch = _collect(build_calibration_data(gpt2, _config(texts, processor=tokenizer, num_samples=4, seed=0)))[0]
    for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        length = sum(mask)
        assert mask == [1] * length + [0] * (len(mask) - length)
        assert ids[:length] in [tokenizer(text)["input_ids"] for text in texts]
    assert tokenizer.padding_side == "left"


@pytest.mark.parametrize("form", ["token rows", "ready inputs"])
def test_left_padded_tokens_start_at_position_0_as_texts_do(form):
    """Texts tokenized by a left-padding tokenizer, as token rows or as the ready dict
    ``tokenizer(texts, padding=True, return_tensors="pt")``, start at position 0 as the texts
    themselves do (GPT-2 has no position_ids from the mask: its learned positions would shift)."""
    gpt2 = tiny_model("gpt2")
    tokenizer = word_tokenizer()
    tokenizer.padding_side = "left"
    texts = sentences(4)
    if form == "token rows":
        data = datasets.Dataset.from_dict(dict(tokenizer(texts, padding=True)))
    else:
        data = [dict(tokenizer(texts, padding=True, return_tensors="pt"))]
    batches = _collect(build_calibration_data(gpt2, _config(data, num_samples=4, seed=0)))
    batch = {name: torch.cat([part[name] for part in batches]) for name in ("input_ids", "attention_mask")}
    assert batch["input_ids"].shape[0] == 4
    for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        length = sum(mask)
        assert mask == [1] * length + [0] * (len(mask) - length)
        assert ids[:length] in [tokenizer(text)["input_ids"] for text in texts]


def test_a_pad_token_the_embedding_lacks_pads_with_an_id_it_has():
    """A pad token added to the tokenizer without resizing the embedding: padding took its id, and the
    token-id check then blamed the user's tokenizer for hf_comq's own (masked) padding."""
    tokenizer = word_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "[MYPAD]"})
    llama = T.LlamaForCausalLM(
        T.LlamaConfig(vocab_size=tokenizer.pad_token_id, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64)
    )  # fmt: skip
    texts = ["the cat", "the cat sat on the mat"]
    batch = _collect(build_calibration_data(llama, _config(texts, processor=tokenizer, num_samples=2, seed=0)))[0]
    assert int(batch["input_ids"].max()) < tokenizer.pad_token_id and not bool(batch["attention_mask"].all())


def test_chat_conversations_are_written_with_the_chat_template_and_one_bos(llama):
    """A ``messages`` column is read without being named and becomes what the chat model sees; text
    that a chat template already began with BOS gets no second one."""
    tokenizer, texts = chat_tokenizer(), sentences(3)
    conversations = [[{"role": "user", "content": text}, {"role": "assistant", "content": text}] for text in texts]
    expected = sorted(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"] for chat in conversations)
    rendered = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in conversations]
    sources = {
        "messages": datasets.Dataset.from_dict({"messages": conversations}),
        "list of conversations": conversations,
        "templated text": rendered,
    }
    for name, source in sources.items():
        config = _config(source, processor=tokenizer, num_samples=3)
        assert sorted(_real_tokens(_collect(build_calibration_data(llama, config)))) == expected, name
    assert config.calibration_description == "list of text, 3 samples"
    plain = _real_tokens(_collect(build_calibration_data(llama, _config(texts[:1], processor=tokenizer))))
    assert plain == [tokenizer(texts[0])["input_ids"]]  # text without BOS still gets the tokenizer's
    without_template = word_tokenizer()
    with pytest.raises(ValueError, match=r"^the calibration data is chat conversations, but \w+ has no chat template"):
        build_calibration_data(llama, _config(sources["messages"], processor=without_template))


def test_a_conversation_the_chat_template_cannot_write_is_one_line(llama):
    """A template that refuses a role (Gemma's has no system role) raised its own exception, naming
    neither the calibration data nor the template."""
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }} {% endfor %}"
    )
    conversations = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]]
    with pytest.raises(ValueError, match=r"chat template could not write a calibration conversation \(TemplateError: "
                       r"System role not supported\); give conversations the roles"):  # fmt: skip
        build_calibration_data(llama, _config(datasets.Dataset.from_dict({"messages": conversations}), processor=tokenizer))


def test_empty_strings_are_dropped(llama, tokenizer):
    batches = _collect(build_calibration_data(llama, _config(["", "  ", "the cat"], processor=tokenizer)))
    assert [b["input_ids"].tolist() for b in batches] == [tokenizer(["the cat"])["input_ids"]]


def test_an_image_that_cannot_be_read_is_one_line(vit):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="PNG")
    rows = [{"bytes": buffer.getvalue(), "path": None}, {"bytes": b"not a png", "path": "broken.png"}]
    data = datasets.Dataset.from_dict({"image": rows}).cast_column("image", datasets.Image())
    with pytest.raises(ValueError, match=r"calibration image of column 'image' \(broken.png\) cannot be read "
                       r"\(UnidentifiedImageError\); remove or repair it"):  # fmt: skip
        _collect(build_calibration_data(vit, _config(data, num_samples=2, batch_size=1, processor=image_processor())))


def test_float_tensor_is_pixel_values(vit):
    pixels = torch.randn(6, 3, 32, 32)
    config = _config(pixels, num_samples=6)
    batches = _collect(build_calibration_data(vit, config))
    stacked = torch.cat([b["pixel_values"] for b in batches])

    def by_first_pixel(tensor):
        return tensor[tensor[:, 0, 0, 0].argsort()]

    assert torch.equal(by_first_pixel(stacked), by_first_pixel(pixels))  # the same samples, shuffled
    assert config.calibration_description == "tensor (pixel_values), 6 samples"


def test_integer_tensor_is_input_ids(llama):
    ids = torch.randint(0, 64, (5, 7))
    batches = _collect(build_calibration_data(llama, _config(ids)))
    assert torch.cat([b["input_ids"] for b in batches]).shape == (5, 7)


def test_list_of_dicts_kept_as_batches_and_trimmed_to_num_samples(llama):
    dicts = [
        {"input_ids": torch.randint(0, 64, (3, 5)), "attention_mask": torch.ones(3, 5, dtype=torch.long)},
        {"input_ids": torch.randint(0, 64, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)},
        {"input_ids": torch.randint(0, 64, (6,)), "token_type_ids": torch.zeros(6, dtype=torch.long)},
    ]
    data = build_calibration_data(llama, _config(dicts, num_samples=4, batch_size=8))
    batches = _collect(data)
    assert data.num_samples == 4
    assert sum(b["input_ids"].shape[0] for b in batches) == 4
    assert all("token_type_ids" not in b for b in batches)
    widths = {b["input_ids"].shape[1] for b in batches}
    assert widths <= {5, 9, 6}  # never re-padded


def test_single_dict_of_tensors(vit):
    batches = _collect(build_calibration_data(vit, _config({"pixel_values": torch.randn(5, 3, 32, 32)}, batch_size=2)))
    assert [b["pixel_values"].shape[0] for b in batches] == [2, 2, 1]


def test_seeded_shuffle_picks_a_reproducible_subset(llama):
    ids = torch.arange(40).reshape(20, 2) % 64

    def picked(seed):
        data = build_calibration_data(llama, _config(ids, num_samples=5, seed=seed))
        return torch.cat([b["input_ids"] for b in data])[:, 0].tolist()

    assert picked(0) == picked(0)
    assert picked(0) != picked(1)
    assert len(set(picked(0))) == 5


def test_processor_loaded_from_path(tmp_path, vit):
    image_processor().save_pretrained(tmp_path)
    batches = _collect(build_calibration_data(vit, _config(images(2), processor=str(tmp_path))))
    assert batches[0]["pixel_values"].shape == (2, 3, 32, 32)


def test_default_processor_is_the_checkpoints_own(tmp_path, llama):
    word_tokenizer().save_pretrained(tmp_path)
    llama.name_or_path = str(tmp_path)
    try:
        batches = _collect(build_calibration_data(llama, _config(sentences(3))))
    finally:
        llama.name_or_path = ""
    assert batches[0]["input_ids"].shape[0] == 3


# ---------------------------------------------------------------- bad input


def test_no_dataset_is_an_error(vit):
    with pytest.raises(ValueError, match="needs calibration data"):
        build_calibration_data(vit, COMQConfig())


def _no_rows():
    yield from ()


EMPTY = {
    "list": lambda: [],
    "tensor": lambda: torch.empty(0, 3, 32, 32),
    "dataset": lambda: datasets.Dataset.from_dict({"image": []}),
    "iterable": lambda: datasets.IterableDataset.from_generator(
        _no_rows, features=datasets.Features({"text": datasets.Value("string")})
    ),
}


@pytest.mark.parametrize("kind", sorted(EMPTY))
def test_empty_dataset_is_an_error(vit, kind):
    with pytest.raises(ValueError, match="empty"):
        build_calibration_data(vit, _config(EMPTY[kind](), processor=image_processor()))


def test_missing_column_lists_the_available_ones(vit):
    dataset = datasets.Dataset.from_dict({"photo": images(2), "label": [0, 1]})
    with pytest.raises(ValueError, match=r"available columns: \['photo', 'label'\]"):
        build_calibration_data(vit, _config(dataset, processor=image_processor()))
    with pytest.raises(ValueError, match=r"'picture' does not exist; available columns: \['photo', 'label'\]"):
        build_calibration_data(vit, _config(dataset, processor=image_processor(), dataset_column="picture"))


def test_missing_split_lists_the_available_ones(tmp_path, vit):
    datasets.DatasetDict({"train": _image_dataset(2)}).save_to_disk(tmp_path)
    with pytest.raises(ValueError, match=r"split 'validation' not found .* \['train'\]"):
        build_calibration_data(vit, _config(str(tmp_path), processor=image_processor(), dataset_split="validation"))


@pytest.mark.parametrize("model_channels", [1, 3])
@pytest.mark.parametrize("make_images", [gray_images, images], ids=["gray", "rgb"])
def test_images_follow_the_models_channel_count(model_channels, make_images):
    """Before: every image became RGB, so a one-channel model's processor (one mean) rejected them all."""
    model = tiny_vit(num_channels=model_channels)
    config = _config(make_images(3), processor=image_processor(channels=model_channels))
    (batch,) = _collect(build_calibration_data(model, config))
    assert batch["pixel_values"].shape == (3, model_channels, 32, 32)


def test_without_num_channels_the_processor_decides():
    """A model config without num_channels: the processor's image_mean length says how many channels."""
    from hf_comq.calibration.data import image_channels

    assert image_channels(None, image_processor(channels=1)) == 1
    assert image_channels(torch.nn.Linear(2, 2), image_processor()) == 3
    assert image_channels(None, object()) is None


def test_images_the_processor_rejects(vit):
    dataset = datasets.Dataset.from_dict({"image": [np.zeros((4, 4, 7), dtype=np.uint8).tolist()] * 2})
    data = None
    with pytest.raises(ValueError, match="rejected the images"):
        data = build_calibration_data(vit, _config(dataset, processor=image_processor()))
        _collect(data)


def test_non_image_values_in_an_image_column_are_rejected(vit):
    dataset = datasets.Dataset.from_dict({"image": ["a.png", "b.png"]})  # names of no file here
    with pytest.raises(ValueError, match="image file 'a.png' not found"):
        _collect(build_calibration_data(vit, _config(dataset, processor=image_processor())))
    numbers = datasets.Dataset.from_dict({"image": [1, 2]})
    with pytest.raises(ValueError, match="rejected the images"):
        _collect(build_calibration_data(vit, _config(numbers, processor=image_processor())))


def test_column_of_numbers_is_rejected(vit):
    dataset = datasets.Dataset.from_dict({"label": [1, 2]})
    with pytest.raises(ValueError, match=r"holds int values; hf_comq reads images \(PIL\), text \(str\) or chat conversations .*: name such a column"):
        build_calibration_data(vit, _config(dataset, dataset_column="label"))


def test_more_samples_than_data_warns_and_uses_all(vit, caplog):
    with caplog.at_level(logging.WARNING):
        data = build_calibration_data(vit, _config(images(3), processor=image_processor(), num_samples=50))
    assert data.num_samples == 3
    assert "num_samples=50 but the dataset has only 3 samples" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stream = _image_dataset(2).to_iterable_dataset()
        assert build_calibration_data(vit, _config(stream, processor=image_processor(), num_samples=9)).num_samples == 2
    assert "only 2 samples" in caplog.text


@pytest.mark.parametrize(
    "bad, message",
    [
        ([images(1)[0], "text"], r"only PIL images \(or uint8 image arrays\), only strings"),
        (42, "unsupported"),
        (torch.randn(2, 5), "must be float pixel_values"),
        ([{"foo": torch.zeros(2)}], "none of which"),
    ],
)
def test_malformed_datasets(vit, bad, message):
    with pytest.raises(ValueError, match=message):
        build_calibration_data(vit, _config(bad, processor=image_processor()))


def test_raw_data_without_any_processor_is_an_error(vit):
    with pytest.raises(ValueError, match="calibration needs an image processor and none is known"):
        build_calibration_data(vit, _config(images(2)))


def test_unloadable_processor_path_is_an_error(tmp_path, vit):
    with pytest.raises(ValueError, match=r"calibration processor: no folder at .*missing; pass the folder that holds"):
        build_calibration_data(vit, _config(images(2), processor=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"could not load an image processor .*; pass COMQConfig\(processor=...\)"):
        build_calibration_data(vit, _config(images(2), processor=str(tmp_path / "empty")))


def test_a_text_model_without_a_tokenizer_is_an_error(llama):
    with pytest.raises(ValueError, match=r"calibration needs a tokenizer and none is known: pass COMQConfig\(processor"):
        build_calibration_data(llama, _config(sentences(2)))


@pytest.mark.parametrize("model_name, data, message", [
    ("vit", sentences(2), "the calibration data is text, but ViTForImageClassification.forward takes no input_ids"),
    ("llama", images(2), "the calibration data is images, but LlamaForCausalLM.forward takes no pixel_values"),
])  # fmt: skip
def test_data_of_a_kind_the_model_cannot_take_is_named_before_any_processor(request, model_name, data, message):
    # a processor of the right kind for the data is given: the model, not the processor, is what cannot take it
    processor = word_tokenizer() if isinstance(data[0], str) else image_processor()
    with pytest.raises(ValueError, match=message):
        build_calibration_data(request.getfixturevalue(model_name), _config(data, processor=processor))


def test_texts_are_cut_to_the_positions_the_model_declares(caplog):
    import transformers as T

    short = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=8,
                                           bos_token_id=0, eos_token_id=0))  # fmt: skip
    with caplog.at_level(logging.INFO):
        data = build_calibration_data(short, _config([" ".join(["word"] * 40)] * 2, processor=word_tokenizer()))
        batch = next(iter(data))
    assert batch["input_ids"].shape[1] == 8
    assert "max_length=512 is longer than the 8 positions GPT2LMHeadModel declares; texts are cut to 8" in caplog.text
    config = _config(sentences(2), processor=word_tokenizer())
    build_calibration_data(short, config)
    assert config.max_length == 8  # the record (config.json, card) says what was used
    # RoBERTa counts positions from its padding row on: 40 rows (padding_idx 1) hold 38 tokens
    roberta = T.RobertaModel(T.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=40, pad_token_id=1))  # fmt: skip
    long_texts = _config([" ".join(["word"] * 60)] * 2, processor=word_tokenizer(), max_length=100)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(build_calibration_data(roberta, long_texts)))
    assert batch["input_ids"].shape[1] == 38 and "max_length=100 is longer than the 38 positions" in caplog.text
    with torch.no_grad():
        roberta(**batch)  # within its table


def test_text_for_a_model_of_neither_images_nor_text_asks_for_ready_inputs():
    import transformers as T

    audio = T.Wav2Vec2Model(T.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2,
    ))  # fmt: skip
    expected = r"Wav2Vec2Model takes input_values, and hf_comq turns only images and text into model inputs: pass ready"
    with pytest.raises(ValueError, match=expected):
        build_calibration_data(audio, _config(sentences(2)))
    waveforms = [np.zeros(1600, dtype=np.float32)] * 2  # not image arrays: the same line, not uint8 image advice
    with pytest.raises(ValueError, match=expected):
        build_calibration_data(audio, _config(waveforms))
    rows = datasets.Dataset.from_dict({"audio": [{"array": [0.0] * 1600, "sampling_rate": 16000}] * 2})
    with pytest.raises(ValueError, match=expected):  # before the column lookup, which would ask for dataset_column
        build_calibration_data(audio, _config(rows))


def test_text_for_a_model_whose_forward_also_requires_images_asks_for_both():
    import transformers as T

    vision = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    qformer = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32,
                   vocab_size=64)  # fmt: skip
    text = T.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                       word_embed_proj_dim=32, pad_token_id=0).to_dict()  # fmt: skip
    blip2 = T.Blip2ForConditionalGeneration(T.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                                                          num_query_tokens=4, image_token_index=63))  # fmt: skip
    with pytest.raises(ValueError, match=r"Blip2ForConditionalGeneration.forward needs pixel_values as well; pass ready "
                                         r"inputs: dicts of input_ids and pixel_values"):  # fmt: skip
        build_calibration_data(blip2, _config(sentences(2), processor=word_tokenizer()))


def test_data_of_one_kind_for_a_model_that_needs_text_and_images_is_one_line():
    import transformers as T

    clip = T.CLIPModel(T.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=8,
    ))  # fmt: skip
    for data, processor in ((images(2), image_processor()), (sentences(2), word_tokenizer())):
        with pytest.raises(ValueError, match=r"CLIPModel embeds a text and an image together: .* or pass ready inputs"):
            build_calibration_data(clip, _config(data, processor=processor))


def test_unknown_dataset_name_is_an_error(vit, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # datasets read the variable when imported
    with pytest.raises(ValueError, match="could not load calibration dataset"):
        build_calibration_data(vit, _config("someone/definitely-not-a-dataset"))  # a Hub name, offline
    with pytest.raises(ValueError, match="calibration dataset: no file or folder at /nonexistent/definitely-not"):
        build_calibration_data(vit, _config("/nonexistent/definitely-not-a-dataset"))  # a path: no Hub lookup


def test_token_ids_outside_the_vocabulary_name_the_fix_that_fits_where_they_came_from(llama):
    """COMQConfig(processor=...) only helps where hf_comq tokenizes; token rows are taken as they are."""
    rows = datasets.Dataset.from_dict({"input_ids": [[3, 4, 5000], [6, 7]]})
    with pytest.raises(ValueError, match=r"token id 5000, .*; tokenize with the model's own tokenizer, "
                                         r"AutoTokenizer.from_pretrained\(MODEL\), or pass the texts themselves$"):
        _collect(build_calibration_data(llama, _config(rows, processor=word_tokenizer())))


@pytest.mark.parametrize("data, message", [
    (lambda tokenizer: tokenizer(sentences(4)),
     r"^calibration input 'input_ids' is not a tensor and cannot become one \(expected sequence of length .*\): "
     r".*datasets.Dataset.from_dict\(dict\(encoding\)\)"),
    (lambda tokenizer: {"text": sentences(4)},
     r"none of which LlamaForCausalLM.forward accepts; 'text' is raw data, which goes in as a list"),
])  # fmt: skip
def test_an_input_dict_of_unpadded_rows_or_of_texts_is_one_line_with_the_fix(llama, tokenizer, data, message):
    with pytest.raises(ValueError, match=message):
        build_calibration_data(llama, _config(data(tokenizer)))


def test_a_data_file_that_is_not_utf8_is_named_with_the_fix(llama, tokenizer, tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes("text\ncafé the cat\nnaïve dog ran\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{path} is not UTF-8 text \(.*\); re-encode it as UTF-8"):
        build_calibration_data(llama, _config(str(path), processor=tokenizer))


def test_a_column_named_for_a_list_of_texts_is_one_line(llama, tokenizer):
    with pytest.raises(ValueError, match=r"^dataset_column='prompt' names a column of a dataset, but .* list of text"):
        build_calibration_data(llama, _config(sentences(2), processor=tokenizer, dataset_column="prompt"))


def test_a_seed_beyond_64_bits_chooses_tensor_samples_too(llama):
    """torch's generators take 64-bit seeds: a larger one was torch's bare "Overflow when unpacking long long"."""
    ids = torch.randint(0, 64, (6, 5))
    batches = _collect(build_calibration_data(llama, _config(ids, num_samples=4, seed=2**70)))
    assert sum(batch["input_ids"].shape[0] for batch in batches) == 4


def test_ready_token_inputs_record_the_length_they_were_used_at(llama):
    """Ready inputs are never cut: the record (card and config.json) said max_length=16 for rows of 40 tokens."""
    ids = torch.randint(0, 64, (4, 40))
    config = _config(ids, max_length=16)
    build_calibration_data(llama, config)
    assert config.max_length == 40
    dicts = _config([{"input_ids": ids[:2]}, {"input_ids": ids[2:, :30]}], max_length=512)
    build_calibration_data(llama, dicts)
    assert dicts.max_length == 40


def test_a_long_image_list_stores_only_the_images_the_seeded_subset_takes(monkeypatch):
    """Every image of a list was stored as an image file in a ``datasets.Dataset`` before ``num_samples`` of them
    were picked (a long list cost time and memory with its length, not with num_samples); now only the images
    the same seeded subset takes are stored, and they are those images."""
    from PIL import Image

    import hf_comq.calibration.data as data_module
    from hf_comq.calibration.sources import dataset_from_list, seeded_subset

    pictures = [Image.new("RGB", (32, 32), (index, 255 - index, 7)) for index in range(60)]
    stored = []
    real = data_module.dataset_from_list
    monkeypatch.setattr(data_module, "dataset_from_list", lambda items, column: stored.append(len(items)) or real(items, column))
    model = tiny_vit()
    data = build_calibration_data(model, COMQConfig(dataset=pictures, num_samples=8, seed=3, processor=image_processor()))
    assert stored[-1] == 8 and data.num_samples == 8
    everything = seeded_subset(dataset_from_list(pictures, "image"), 8, 3)
    expected = sorted(tuple(image.getpixel((0, 0))) for image in everything["image"])
    kept = data_module._images_to_calibrate_on(pictures, COMQConfig(num_samples=8, seed=3))
    assert sorted(image.getpixel((0, 0)) for image in kept) == expected
