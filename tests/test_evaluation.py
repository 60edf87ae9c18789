"""Tests for ``hf_comq.evaluation``: each metric against a direct computation, on tiny models."""

from __future__ import annotations

import copy
import math
import types

import datasets
import pytest
import torch
import transformers as T

import hf_comq
from hf_comq.evaluation import (
    checkpoint_size_bytes,
    embedding_cosine,
    fidelity_of_logits,
    image_logits,
    load_eval_dataset,
    mcnemar_exact_p,
    perplexity,
    prediction_fidelity,
    top1,
)
from tests.tiny import chat_tokenizer, image_processor, images, sentences, tiny_vit, word_tokenizer

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def vit() -> T.ViTForImageClassification:
    model = tiny_vit(num_labels=3)
    model.config.id2label = dict(enumerate(CLASSES))
    model.config.label2id = {name: index for index, name in enumerate(CLASSES)}
    return model


def predictions(model: torch.nn.Module, pictures: list) -> list[int]:
    pixels = image_processor()(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixel_values=pixels).logits.argmax(-1).tolist()


def image_dataset(pictures: list, labels: list[int], names: list[str] = CLASSES) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": pictures, "label": labels}, features=features)


# ---------------------------------------------------------------------------- top-1


def test_top1_counts_correct_predictions(vit) -> None:
    pictures = images(10)
    predicted = predictions(vit, pictures)
    # Labels equal to the prediction for the first 7 images and wrong for the last 3.
    labels = predicted[:7] + [(label + 1) % 3 for label in predicted[7:]]
    dataset = image_dataset(pictures, labels)
    for batch_size in (3, 64):  # partial last batch must count exactly once
        result = top1(vit, dataset, image_processor(), batch_size=batch_size)
        assert (result.correct, result.total, result.accuracy) == (7, 10, pytest.approx(0.7))
        assert result.predictions.tolist() == predicted and result.labels.tolist() == labels


def test_top1_names_labels_that_are_not_class_ids(vit) -> None:
    beyond = datasets.Dataset.from_dict({"image": images(2), "label": [0, 7]})  # the model has 3 classes
    with pytest.raises(ValueError, match=r"label 7 in column 'label' is not one of the model's 3 classes"):
        top1(vit, beyond, image_processor())
    unlabelled = datasets.Dataset.from_dict({"image": images(2), "label": [-1, -1]})  # a Hub test split, often
    with pytest.raises(ValueError, match=r"holds label -1, .* this split is not labelled"):
        top1(vit, unlabelled, image_processor())
    named = datasets.Dataset.from_dict({"image": images(2), "label": ["cat", "dog"]})
    with pytest.raises(ValueError, match=r"holds \['str'\] values; top-1 needs integer class ids"):
        top1(vit, named, image_processor())


def test_top1_predictions_are_per_image_in_dataset_order(vit) -> None:
    pictures = images(7)
    predicted = predictions(vit, pictures)
    labels = [(label + index % 2) % 3 for index, label in enumerate(predicted)]  # every other one wrong
    result = top1(vit, image_dataset(pictures, labels), image_processor(), batch_size=3)
    assert result.predictions.tolist() == predicted
    assert result.labels.tolist() == labels


def test_top1_maps_labels_by_class_name(vit) -> None:
    """Same classes, other order in the dataset: comparing raw ids would score 0."""
    pictures = images(6, seed=1)
    predicted = predictions(vit, pictures)
    reordered = ["cat", "ant", "bee"]
    labels = [reordered.index(CLASSES[label]) for label in predicted]
    dataset = image_dataset(pictures, labels, names=reordered)
    assert top1(vit, dataset, image_processor()).accuracy == 1.0


def test_top1_maps_a_subset_of_the_models_classes_by_name_and_refuses_names_it_does_not_have(vit) -> None:
    """Some of the model's classes (a subset of a test set) were compared by raw id and scored as wrong;
    names that only partly match (a folder cannot be named T-shirt/top) scored at random."""
    pictures = images(8, seed=4)
    predicted = predictions(vit, pictures)
    kept = [index for index, label in enumerate(predicted) if label != 0][:4]
    subset = ["bee", "cat"]  # the model's classes 2 and 1, in the dataset's own order
    labels = [subset.index(CLASSES[predicted[index]]) for index in kept]
    dataset = image_dataset([pictures[index] for index in kept], labels, names=subset)
    assert top1(vit, dataset, image_processor()).accuracy == 1.0
    with pytest.raises(ValueError, match=r"the dataset's classes \['bee'\] are the model's under other ids, and "
                                         r"\['wasp'\] are not"):  # fmt: skip
        top1(vit, image_dataset(pictures[:2], [0, 1], names=["bee", "wasp"]), image_processor())
    # spelled another way where the rest sit at the model's ids (the Hub's "T - shirt / top"): ids as they are
    respelled = image_dataset(pictures, predicted, names=["Ant", "bee", "cat"])
    assert top1(vit, respelled, image_processor()).accuracy == 1.0
    unlabelled = datasets.Dataset.from_dict({"image": pictures[:2], "label": [-1, -1]},
                                            features=image_dataset(pictures[:2], [0, 0], names=subset).features)  # fmt: skip
    with pytest.raises(ValueError, match=r"holds label -1, .* this split is not labelled"):  # not counted as a class
        top1(vit, unlabelled, image_processor())


def test_top1_loads_the_models_own_processor_and_reads_streamed_files(vit, tmp_path) -> None:
    vit.save_pretrained(tmp_path / "model")
    image_processor().save_pretrained(tmp_path / "model")
    model = T.ViTForImageClassification.from_pretrained(tmp_path / "model").eval()
    pictures = images(5, seed=2)
    image_dataset(pictures, predictions(model, pictures)).to_parquet(tmp_path / "test.parquet")
    streamed = load_eval_dataset(tmp_path / "test.parquet", "test")
    assert isinstance(streamed, datasets.IterableDataset)
    assert top1(model, streamed, batch_size=2).accuracy == 1.0


def test_prediction_fidelity_against_a_direct_computation(vit) -> None:
    pictures = images(10, seed=3)
    data = image_dataset(pictures, [0] * 10)
    assert prediction_fidelity(vit, vit, data, image_processor(), batch_size=4) == {"agreement": 1.0, "kl": 0.0}

    noisy = copy.deepcopy(vit)
    with torch.no_grad():
        noisy.classifier.weight.add_(torch.randn_like(noisy.classifier.weight))
    pixels = image_processor()(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours, theirs = noisy(pixel_values=pixels).logits, vit(pixel_values=pixels).logits
    p = theirs.softmax(-1)
    expected_kl = float((p * (p.log() - ours.log_softmax(-1))).sum(-1).mean())
    expected_agreement = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    result = prediction_fidelity(noisy, vit, data, image_processor(), batch_size=3)
    assert result["agreement"] == pytest.approx(expected_agreement)
    assert result["kl"] == pytest.approx(expected_kl, rel=1e-4) and result["kl"] > 0
    with pytest.raises(ValueError, match="prediction_fidelity needs an image processor"):
        prediction_fidelity(noisy, vit, data)  # in-memory model: no checkpoint to take a processor from


def test_top1_rejects_missing_columns(vit) -> None:
    dataset = image_dataset(images(2), [0, 1])
    expected = r"label dataset column 'target' does not exist; available columns: \['image', 'label'\]"
    with pytest.raises(ValueError, match=expected):
        top1(vit, dataset, image_processor(), label_column="target")
    with pytest.raises(ValueError, match="image dataset column 'photo' does not exist"):
        top1(vit, dataset, image_processor(), image_column="photo")


def test_image_logits_take_a_list_of_images_where_no_labels_are_read(vit) -> None:
    pictures = images(4, seed=5)
    logits, labels = image_logits(vit, pictures, image_processor(), label_column=None)
    assert labels is None and logits.argmax(-1).tolist() == predictions(vit, pictures)
    with pytest.raises(ValueError, match="a list of images has no labels: pass a datasets.Dataset"):
        top1(vit, pictures, image_processor())


def test_top1_refuses_a_model_without_class_logits_and_a_missing_label_column(vit) -> None:
    dataset = image_dataset(images(2), [0, 1])
    bare = T.ViTModel(vit.config)
    with pytest.raises(ValueError, match="ViTModel gives no class logits: top-1 and prediction fidelity need an image"):
        top1(bare, dataset, image_processor())
    with pytest.raises(ValueError, match="top1 needs labels: .* use prediction_fidelity"):
        top1(vit, dataset, image_processor(), label_column=None)


def test_fidelity_and_mcnemar_refuse_what_they_cannot_measure() -> None:
    with pytest.raises(ValueError, match="the model's logits hold NaN or infinite values"):
        fidelity_of_logits(torch.full((2, 3), float("nan")), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"only_a: expected a count of images \(an integer >= 0\), got -1"):
        mcnemar_exact_p(-1, 3)
    assert mcnemar_exact_p(0, 6) == pytest.approx(2 / 64) and mcnemar_exact_p(3, 3) == 1.0


def test_mcnemar_matches_the_exact_binomial_tail_at_large_counts() -> None:
    """Summed in log space (exact big-integer coefficients took seconds at ImageNet's counts)."""
    import math

    for only_a, only_b in ((1500, 1620), (40, 7), (0, 1200)):
        count = only_a + only_b
        exact = min(1.0, 2 * sum(math.comb(count, k) for k in range(min(only_a, only_b) + 1)) / 2**count)
        assert mcnemar_exact_p(only_a, only_b) == pytest.approx(exact, rel=1e-9, abs=0)


# ---------------------------------------------------------------------------- perplexity


@pytest.fixture(scope="module")
def gpt2() -> T.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(config).eval()


def test_perplexity_is_token_weighted_exp_loss(gpt2) -> None:
    tokenizer = word_tokenizer(with_pad=False)
    texts = sentences(5)
    nll = tokens = 0.0
    for text in texts:  # one text at a time: no padding involved, the model's own loss
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            loss = gpt2(input_ids=ids, labels=ids).loss
        nll += float(loss) * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    expected = math.exp(nll / tokens)
    # Padded batches (texts have 3 to 12 words) must give the same number.
    for batch_size in (1, 2, 8):
        assert perplexity(gpt2, tokenizer, texts, batch_size=batch_size) == pytest.approx(expected, rel=1e-4)
    assert tokenizer.pad_token is None, "perplexity must not modify the tokenizer"


def test_text_metrics_cut_texts_to_the_positions_the_model_declares(caplog) -> None:
    """GPT-2's learned position table: a longer input was an IndexError deep inside the forward."""
    torch.manual_seed(0)
    short = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=8,
                                           bos_token_id=0, eos_token_id=0)).eval()  # fmt: skip
    texts = [" ".join(["word"] * 40)] * 2
    with caplog.at_level("INFO"):
        value = perplexity(short, word_tokenizer(), texts)
    assert math.isfinite(value) and "max_length=512 is longer than the 8 positions GPT2LMHeadModel declares" in caplog.text
    assert embedding_cosine(short, short, word_tokenizer(), texts) == pytest.approx(1.0)


def test_perplexity_truncates_and_drops_empty_texts(gpt2) -> None:
    tokenizer = word_tokenizer()
    long_text = " ".join(["the cat sat on the mat"] * 4)
    truncated = " ".join(long_text.split()[:5])
    assert perplexity(gpt2, tokenizer, [long_text, "", "   "], max_length=5) == pytest.approx(
        perplexity(gpt2, tokenizer, [truncated]), rel=1e-5
    )
    with pytest.raises(ValueError, match="at least two tokens"):
        perplexity(gpt2, tokenizer, ["cat", ""])


def test_text_a_chat_template_wrote_is_scored_with_one_bos_and_batches_pad_on_the_right(gpt2) -> None:
    """Text from ``apply_chat_template(tokenize=False)`` already starts with BOS: it was tokenized with a
    second one, so a chat model was scored on an input it never sees.  A tokenizer saved with left
    padding must not shift the texts of a batch (GPT-2 numbers positions from the first column)."""
    tokenizer, texts = chat_tokenizer(), sentences(4)
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False) for text in texts]
    assert all(text.startswith("[EOS]") for text in rendered)
    assert perplexity(gpt2, tokenizer, rendered) == pytest.approx(perplexity(gpt2, tokenizer, texts), rel=1e-6)
    left = word_tokenizer()
    left.padding_side = "left"
    assert perplexity(gpt2, left, texts, batch_size=4) == pytest.approx(perplexity(gpt2, left, texts, batch_size=1), rel=1e-5)


def test_a_pad_token_added_past_the_embedding_pads_with_an_id_the_model_holds(gpt2) -> None:
    """Llama tokenizers have no pad token and users add one without resizing the embedding: its id is
    one past the last row, and padded batches were an IndexError inside the embedding."""
    tokenizer, texts = word_tokenizer(with_pad=False), sentences(4)
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).eval()
    expected = perplexity(model, tokenizer, texts, batch_size=1)
    tokenizer.add_special_tokens({"pad_token": "[NEW-PAD]"})
    assert tokenizer.pad_token_id == model.get_input_embeddings().num_embeddings
    assert perplexity(model, tokenizer, texts, batch_size=4) == pytest.approx(expected, rel=1e-5)
    assert embedding_cosine(model, model, tokenizer, texts, batch_size=4) == pytest.approx(1.0, abs=1e-6)


def test_text_metrics_take_a_tokenizer_path_and_name_a_dataset_given_as_texts(gpt2, tmp_path) -> None:
    tokenizer, texts = word_tokenizer(), sentences(4)
    tokenizer.save_pretrained(tmp_path)
    assert perplexity(gpt2, str(tmp_path), texts) == pytest.approx(perplexity(gpt2, tokenizer, texts), rel=1e-6)
    rows = datasets.Dataset.from_dict({"text": texts})
    metrics = (lambda data: perplexity(gpt2, tokenizer, data), lambda data: embedding_cosine(gpt2, gpt2, tokenizer, data))
    for metric in metrics:
        with pytest.raises(TypeError, match=r"texts must be strings, got \['dict'\] items; .* dataset\['text'\]"):
            metric(rows)
        assert metric(rows["text"]) > 0


# ---------------------------------------------------------------------------- embedding cosine


def tiny_bert_config() -> T.BertConfig:
    return T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def bert() -> T.BertModel:
    torch.manual_seed(0)
    config = tiny_bert_config()
    return T.BertModel(config).eval()


def test_embedding_cosine_of_a_model_with_itself_is_one(bert) -> None:
    texts = sentences(6)
    assert embedding_cosine(bert, bert, word_tokenizer(), texts, batch_size=4) == pytest.approx(1.0, abs=1e-5)


def test_embedding_cosine_mean_pools_real_tokens(bert) -> None:
    tokenizer = word_tokenizer()
    perturbed = copy.deepcopy(bert)
    with torch.no_grad():
        for parameter in perturbed.encoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    texts = sentences(6, seed=3)
    expected = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            a = bert(input_ids=ids).last_hidden_state.mean(dim=1)
            b = perturbed(input_ids=ids).last_hidden_state.mean(dim=1)
        expected.append(float(torch.nn.functional.cosine_similarity(a, b)))
    reference = sum(expected) / len(expected)
    assert reference < 0.999  # the perturbation is visible
    for batch_size in (1, 4):  # padding must not leak into the means
        assert embedding_cosine(perturbed, bert, tokenizer, texts, batch_size=batch_size) == pytest.approx(
            reference, abs=1e-5
        )


def test_embedding_cosine_reads_hidden_states_of_task_models() -> None:
    torch.manual_seed(0)
    config = tiny_bert_config()
    classifier = T.BertForSequenceClassification(config).eval()
    assert embedding_cosine(classifier, classifier.bert, word_tokenizer(), sentences(3)) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------- checkpoint size


def test_checkpoint_size_counts_weight_files_only(vit, tmp_path) -> None:
    vit.save_pretrained(tmp_path / "fp")
    image_processor().save_pretrained(tmp_path / "fp")
    weights = sorted((tmp_path / "fp").glob("*.safetensors"))
    assert weights
    assert checkpoint_size_bytes(tmp_path / "fp") == sum(path.stat().st_size for path in weights)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint_size_bytes(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        checkpoint_size_bytes(tmp_path / "empty")


def test_quantized_checkpoint_is_smaller(vit, tmp_path) -> None:
    vit.save_pretrained(tmp_path / "fp")
    image_processor().save_pretrained(tmp_path / "fp")
    config = hf_comq.COMQConfig(bits=4, dataset=images(8), num_samples=8)
    quantized = T.ViTForImageClassification.from_pretrained(tmp_path / "fp", quantization_config=config)
    quantized.save_pretrained(tmp_path / "q")
    assert checkpoint_size_bytes(tmp_path / "q") < 0.6 * checkpoint_size_bytes(tmp_path / "fp")


def test_checkpoint_size_counts_the_weight_files_the_model_loads(vit, tmp_path) -> None:
    """Mistral's repositories keep consolidated.safetensors beside the shards: counted, it doubled the
    full-precision size and halved the compression the CLI printed."""
    vit.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    (tmp_path / "sharded" / "consolidated.safetensors").write_bytes(b"x" * 100_000)
    assert checkpoint_size_bytes(tmp_path / "sharded") == sum(path.stat().st_size for path in shards)


def test_a_class_name_the_model_uses_twice_stays_at_the_datasets_id() -> None:
    """ImageNet names classes 134 and 517 "crane": a name map kept the last id for both."""
    from hf_comq.evaluation import _label_remap

    model = types.SimpleNamespace(config=types.SimpleNamespace(id2label={0: "crane", 1: "bee", 2: "crane", 3: "ant"}))

    def classes(*names: str) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"label": [0]}, features=datasets.Features({"label": datasets.ClassLabel(names=names)}))

    assert _label_remap(classes("crane", "bee", "crane_2", "ant"), "label", model) is None  # shared names in place
    assert _label_remap(classes("ant", "bee", "crane"), "label", model).tolist() == [3, 1, 2]
    with pytest.raises(ValueError, match=r"\['crane'\] are not \(or not once\) among its class names"):
        _label_remap(classes("ant", "crane", "bee"), "label", model)  # which crane: no telling
