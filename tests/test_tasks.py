"""Which task a transformers class is for: the Auto class and inputs hf-comq uses, the card's pipeline tag."""

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
    ViTModel,
)

from hf_comq.tasks import TASKS, infer_pipeline_tag, model_inputs, needs_text_and_images, task_of
from tests.tiny import tiny_vit


def test_architectures_map_to_the_first_task_that_lists_them():
    assert task_of(["ViTForImageClassification"], "vit")[0].auto_class == "AutoModelForImageClassification"
    assert task_of(["LlamaForCausalLM"], "llama") == (TASKS[3], "LlamaForCausalLM")
    assert task_of([], "bert") == (TASKS[-1], "BertModel")
    assert task_of(["NoSuchModel"], "nothing") == (None, "NoSuchModel")
    assert task_of(["T5ForConditionalGeneration"], "t5")[0].auto_class == "AutoModelForSeq2SeqLM"
    assert task_of(["T5Model"], "t5")[0] is TASKS[-1]
    # transformers lists BART-like generation classes as masked LMs too: they are sequence-to-sequence LMs
    for bart_like in ("BartForConditionalGeneration", "MBartForConditionalGeneration", "MvpForConditionalGeneration"):
        assert task_of([bart_like], None)[0].auto_class == "AutoModelForSeq2SeqLM", bart_like
    assert task_of(["BertForMaskedLM"], "bert")[0].auto_class == "AutoModelForMaskedLM"
    # a backbone no mapping lists (README: "T5 (T5EncoderModel ...)") is a base model
    assert task_of(["T5EncoderModel"], "t5") == (TASKS[-1], "T5EncoderModel")
    assert task_of(["NoSuchModel"], "nothing")[0] is None


def test_inputs_come_from_the_main_input_name():
    assert (model_inputs("ViTModel"), model_inputs("BertModel"), model_inputs("NoSuchModel")) == ("images", "text", None)


def test_infer_pipeline_tag():
    assert infer_pipeline_tag(tiny_vit()) == "image-classification"
    assert infer_pipeline_tag(ViTModel(tiny_vit().config)) == "image-feature-extraction"
    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    assert infer_pipeline_tag(bert) == "feature-extraction"
    assert infer_pipeline_tag(torch.nn.Linear(2, 2)) is None
    t5 = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    assert infer_pipeline_tag(T5ForConditionalGeneration(t5)) == "text2text-generation"


def test_infer_pipeline_tag_follows_the_task_not_the_class_name():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    assert infer_pipeline_tag(gpt2) == "text-generation"  # an "...LMHeadModel", no "ForCausalLM" in its name
    bert = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    assert infer_pipeline_tag(BertForMaskedLM(bert)) == "fill-mask"
    assert infer_pipeline_tag(BertForQuestionAnswering(bert)) == "question-answering"  # no task of hf-comq's: by name


def test_contrastive_text_image_models_need_both_inputs():
    assert needs_text_and_images("CLIPModel") and needs_text_and_images("SiglipModel")
    assert not any(map(needs_text_and_images, ("CLIPVisionModel", "CLIPTextModel", "LlavaForConditionalGeneration")))
