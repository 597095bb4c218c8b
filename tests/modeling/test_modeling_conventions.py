"""transformers conventions of P-MNER's forward: return_dict, **kwargs with num_items_in_batch (checked through the
Trainer), attn_implementation, output_attentions with the fusion layers' weights, inputs_embeds, the label-word
lookup's device, NumPy and non-finite inputs."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertConfig, BertForMaskedLM, Trainer, TrainingArguments

from modeling_pmner import PMNERConfig, PMNERForTokenClassification, PMNERModel

from fixtures import write_tiny_tokenizer
from model_tester import Rows, accumulation_rows, tester


def tiny_model(**kwargs) -> PMNERForTokenClassification:
    torch.manual_seed(0)
    return PMNERForTokenClassification(tester.get_config(**kwargs)).eval()


def without_labels(inputs: dict) -> dict:
    return {key: value for key, value in inputs.items() if key != "labels"}


# ---- return_dict -------------------------------------------------------------------------------------------------


def test_return_dict_false_gives_the_same_values_as_a_tuple():
    model = tiny_model()
    inputs = tester.get_inputs()
    as_dict = model(**inputs)
    as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    base = model.pmner(**without_labels(inputs), return_dict=False)
    assert isinstance(base, tuple)
    torch.testing.assert_close(base[0], model.pmner(**without_labels(inputs)).last_hidden_state)
    # the default comes from the config
    model.config.return_dict = False
    assert isinstance(model(**inputs), tuple)


# ---- **kwargs and num_items_in_batch -------------------------------------------------------------------------------


def test_num_items_in_batch_divides_the_summed_loss():
    model = tiny_model()
    inputs = tester.get_inputs()
    labelled = int((inputs["labels"] != -100).sum())
    mean_loss = model(**inputs).loss
    summed = model(**inputs, num_items_in_batch=torch.tensor(1)).loss
    torch.testing.assert_close(summed, mean_loss * labelled)
    torch.testing.assert_close(model(**inputs, num_items_in_batch=2 * labelled).loss, mean_loss / 2)


def test_unknown_keyword_arguments_are_refused():
    model = tiny_model()
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['pixel_values'\]"):
        model(**tester.get_inputs(), pixel_values=torch.zeros(1))
    with pytest.raises(TypeError, match="PMNERModel.forward got unexpected"):
        model.pmner(**without_labels(tester.get_inputs()), position_ids=torch.zeros(1))


def _train_one_step(tmp_path, name, batch_size, accumulation, accepts_loss_kwargs=None):
    model = tiny_model().train()
    if accepts_loss_kwargs is not None:
        model.accepts_loss_kwargs = accepts_loss_kwargs
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("num_items_in_batch")), with_kwargs=True
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(accumulation_rows()))
    trainer.train()
    return trainer, {name: value.detach().clone() for name, value in model.named_parameters()}, seen


def test_gradient_accumulation_through_the_trainer_matches_one_big_batch(tmp_path):
    """1 step of 8 and 1 optimizer step of 2 x 4 with gradient_accumulation_steps=2: same parameters (SGD, no
    dropout), because the Trainer passes num_items_in_batch and the loss is a sum divided by it."""
    start = {name: value.detach().clone() for name, value in tiny_model().named_parameters()}
    trainer, big, seen_big = _train_one_step(tmp_path, "big", 8, 1)
    assert trainer.model_accepts_loss_kwargs
    labelled = sum(int((row["labels"] != -100).sum()) for row in accumulation_rows())
    assert [int(n) for n in seen_big] == [labelled]
    _, accumulated, seen_accumulated = _train_one_step(tmp_path, "accumulated", 4, 2)
    assert [int(n) for n in seen_accumulated] == [labelled, labelled]
    assert any(not torch.equal(start[name], big[name]) for name in big)  # the step did move the parameters
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], atol=1e-6, rtol=1e-5, msg=name)
    # Control: without num_items_in_batch (a mean of micro-batch means) the same run ends elsewhere.
    _, averaged, seen_averaged = _train_one_step(tmp_path, "averaged", 4, 2, accepts_loss_kwargs=False)
    assert seen_averaged == [None, None]
    assert any(not torch.allclose(averaged[name], big[name], atol=1e-6, rtol=1e-5) for name in big)


def test_trainer_keeps_the_visual_columns(tmp_path):
    """remove_unused_columns keeps the columns named in forward: the visual inputs must stay named arguments."""
    model = tiny_model()
    rows = accumulation_rows()[:2]
    dataset = Dataset.from_list(
        [{key: value.tolist() for key, value in row.items()} | {"tokens": ["a"], "image_id": "x"} for row in rows]
    )
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    kept = trainer._remove_unused_columns(dataset).column_names
    assert sorted(kept) == ["attention_mask", "input_ids", "labels", "visual_features", "visual_mask"]


# ---- attn_implementation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_from_pretrained_passes_attn_implementation_to_the_text_encoder(tmp_path, implementation):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = PMNERForTokenClassification.from_pretrained(tmp_path, attn_implementation=implementation).eval()
    assert loaded.config._attn_implementation == implementation
    assert loaded.pmner.text_model.config._attn_implementation == implementation
    inputs = tester.get_inputs()
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-4)


def test_attention_flags_follow_the_text_encoder():
    bert = tiny_model()
    assert bert._supports_sdpa and bert._supports_flash_attn and bert._supports_flex_attn
    deberta_text = dict(
        model_type="deberta", vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=37,
    )
    config = PMNERConfig(text_config=deberta_text, fusion_num_heads=4, visual_feature_dim=16)
    deberta = PMNERForTokenClassification(config)
    assert not deberta._supports_sdpa  # DeBERTa has no sdpa in transformers: the default falls back to eager
    assert deberta.config._attn_implementation == "eager"
    config = PMNERConfig(text_config=deberta_text, fusion_num_heads=4, visual_feature_dim=16, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="does not support an attention implementation through torch.nn.functional"):
        PMNERForTokenClassification(config)


def test_from_text_pretrained_takes_attn_implementation(tmp_path):
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(**{k: v for k, v in tester.text_config().items() if k != "model_type"})).save_pretrained(
        tmp_path
    )
    write_tiny_tokenizer(tmp_path)
    for implementation in ("eager", "sdpa"):
        model = PMNERForTokenClassification.from_text_pretrained(
            str(tmp_path), attn_implementation=implementation, fusion_num_heads=4, visual_feature_dim=16
        )
        assert model.pmner.text_model.config._attn_implementation == implementation


# ---- output_attentions -------------------------------------------------------------------------------------------


def _masked_softmax_attention(attention, queries, keys, key_mask):
    """The attention weights of a `PMNERAttention`, recomputed from its projections."""
    batch, heads = queries.shape[0], attention.num_heads
    query = attention.query(queries).view(batch, -1, heads, attention.head_dim).transpose(1, 2)
    key = attention.key(keys).view(batch, -1, heads, attention.head_dim).transpose(1, 2)
    scores = (query @ key.transpose(-1, -2)) / attention.head_dim**0.5
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(-1)
    return torch.nan_to_num(scores, nan=0.0)  # a row with no key at all: zeros


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_output_attentions_returns_encoder_and_fusion_weights(implementation):
    model = tiny_model()
    model.set_attn_implementation(implementation)
    assert model.pmner.text_model.config._attn_implementation == implementation
    inputs = tester.get_inputs(with_labels=False)
    batch, length, objects, heads = tester.batch_size, tester.seq_length, tester.num_objects, 4
    outputs = model(**inputs, output_attentions=True)
    assert model.pmner.text_model.config._attn_implementation == implementation  # restored after the call
    assert len(outputs.attentions) == 2 and all(a.shape == (batch, heads, length, length) for a in outputs.attentions)
    assert outputs.text_self_attentions.shape == (batch, heads, length, length)
    assert outputs.object_self_attentions.shape == (batch, heads, objects, objects)
    assert outputs.object_to_text_attentions.shape == (batch, heads, objects, length)
    assert outputs.text_to_object_attentions.shape == (batch, heads, length, objects)
    assert outputs.text_to_fused_object_attentions.shape == (batch, heads, length, objects)
    # encoder attention rows sum to 1 and ignore padding tokens
    padded = ~inputs["attention_mask"].bool()
    for layer in outputs.attentions:
        torch.testing.assert_close(layer.sum(-1), torch.ones(batch, heads, length))
        assert layer[1][..., padded[1]].abs().max() < 1e-6
    # text-to-object grounding: recomputed from the layer's projections; padded objects weigh 0; no object -> 0
    base = model.pmner(**inputs)
    fusion = model.pmner.fusion
    mask = inputs["visual_mask"]
    expected = _masked_softmax_attention(
        fusion.text_to_visual, base.text_hidden_state, base.visual_hidden_state, mask
    )
    torch.testing.assert_close(outputs.text_to_object_attentions, expected)
    assert outputs.text_to_object_attentions[0, ..., 3].abs().max() == 0  # object 3 of row 0 is padding
    torch.testing.assert_close(outputs.text_to_object_attentions[0].sum(-1), torch.ones(heads, length))
    assert outputs.text_to_object_attentions[2].abs().max() == 0  # row 2 has no object
    # without output_attentions none of them is returned; the logits do not change
    plain = model(**inputs)
    assert plain.attentions is None and plain.text_to_object_attentions is None
    torch.testing.assert_close(plain.logits, outputs.logits)


def test_output_fusion_attentions_keeps_the_encoder_kernel_and_returns_tcfm_weights_only(monkeypatch):
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    inputs = tester.get_inputs(with_labels=False)
    seen = []
    forward = model.pmner.text_model.forward

    def spy(*args, **kwargs):
        seen.append((model.pmner.text_model.config._attn_implementation, kwargs.get("output_attentions")))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.pmner.text_model, "forward", spy)
    fusion_only = model(**inputs, output_fusion_attentions=True)
    full = model(**inputs, output_attentions=True)
    assert seen == [("sdpa", False), ("eager", True)]  # the encoder ran with sdpa and returned no attention
    assert fusion_only.attentions is None
    for name in ("text_to_object_attentions", "text_to_fused_object_attentions", "object_to_text_attentions"):
        torch.testing.assert_close(getattr(fusion_only, name), getattr(full, name))
    torch.testing.assert_close(fusion_only.logits, full.logits)


def test_encoder_attentions_agree_between_sdpa_and_eager():
    model = tiny_model()
    inputs = tester.get_inputs(with_labels=False)
    model.pmner.text_model.config._attn_implementation_internal = "sdpa"
    with_sdpa = model(**inputs, output_attentions=True).attentions
    model.pmner.text_model.config._attn_implementation_internal = "eager"
    with_eager = model(**inputs, output_attentions=True).attentions
    for left, right in zip(with_sdpa, with_eager):
        torch.testing.assert_close(left, right)


def test_concat_fusion_returns_only_the_self_attentions_and_tuples_keep_them():
    model = tiny_model(fusion="concat")
    outputs = model(**tester.get_inputs(with_labels=False), output_attentions=True)
    assert outputs.text_self_attentions is not None and outputs.object_self_attentions is not None
    assert outputs.text_to_object_attentions is None
    as_tuple = model(**tester.get_inputs(with_labels=False), output_attentions=True, return_dict=False)
    assert len(as_tuple) == 4  # logits, encoder attentions, text and object self-attentions


# ---- inputs_embeds, hidden states --------------------------------------------------------------------------------


def test_inputs_embeds_give_the_logits_of_input_ids():
    model = tiny_model()
    inputs = tester.get_inputs()
    expected = model(**inputs, output_hidden_states=True)
    embedded = dict(inputs, inputs_embeds=model.get_input_embeddings()(inputs.pop("input_ids")))
    outputs = model(**embedded, output_hidden_states=True)
    torch.testing.assert_close(outputs.logits, expected.logits)
    torch.testing.assert_close(outputs.loss, expected.loss)
    assert len(outputs.hidden_states) == 3
    with pytest.raises(ValueError, match="exactly one of `input_ids` and `inputs_embeds`"):
        model(**embedded, input_ids=tester.get_inputs()["input_ids"])
    with pytest.raises(ValueError, match="exactly one of"):
        model(attention_mask=embedded["attention_mask"])
    expected = r"`inputs_embeds` has shape \(3, 9, 8\); expected \(batch, sequence_length, embedding size=32\)"
    with pytest.raises(ValueError, match=expected):
        model(inputs_embeds=torch.zeros(3, 9, 8))


TEXT_ENCODERS = {
    "distilbert": dict(model_type="distilbert", dim=32, n_layers=1, n_heads=4, hidden_dim=37),
    "electra": dict(
        model_type="electra", embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=37,
    ),
    "roberta": dict(
        model_type="roberta", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        pad_token_id=1,
    ),
    "xlm-roberta": dict(
        model_type="xlm-roberta", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        pad_token_id=1,
    ),
    "deberta-v2": dict(
        model_type="deberta-v2", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37
    ),
}


@pytest.mark.parametrize("family", TEXT_ENCODERS)
def test_conventions_hold_for_other_text_encoders(family):
    """DistilBERT (no layer_norm_eps, no token types), ELECTRA (embeddings narrower than the hidden size), RoBERTa,
    XLM-R and DeBERTa-v2 (no sdpa in transformers): attention flags, attentions, inputs_embeds, the loss."""
    torch.manual_seed(0)
    config = PMNERConfig(
        text_config=dict(TEXT_ENCODERS[family], vocab_size=99, max_position_embeddings=64),
        fusion_num_heads=4, visual_feature_dim=8, fusion_dropout=0.0,
    )
    model = PMNERForTokenClassification(config).eval()
    encoder = model.pmner.text_model
    assert model._supports_sdpa == type(encoder)._supports_sdpa
    assert model.config._attn_implementation == encoder.config._attn_implementation
    ids, features = torch.randint(3, 99, (2, 6)), torch.randn(2, 3, 8)
    labels = torch.randint(0, 9, (2, 6))
    outputs = model(input_ids=ids, visual_features=features, labels=labels, output_attentions=True)
    assert len(outputs.attentions) == 1 and outputs.attentions[0].shape[-2:] == (6, 6)
    assert outputs.text_to_object_attentions.shape == (2, 4, 6, 3)
    summed = model(input_ids=ids, visual_features=features, labels=labels, num_items_in_batch=1).loss
    torch.testing.assert_close(summed, outputs.loss * 12)
    embedded = model(inputs_embeds=model.get_input_embeddings()(ids), visual_features=features).logits
    torch.testing.assert_close(embedded, outputs.logits)


# ---- the label-word lookup's device ------------------------------------------------------------------------------


class _IndexDevices(TorchDispatchMode):
    """Records (indexed tensor's device, index devices) of every aten.index call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.index.Tensor:
            self.calls.append((args[0].device, [index.device for index in args[1] if index is not None]))
        return func(*args, **(kwargs or {}))


def test_label_word_lookup_indexes_on_the_embeddings_device():
    """With a device_map split the head and the input embeddings may sit on different devices: the label-word
    index must follow the embeddings (the meta device stands for a second GPU here)."""
    model = tiny_model()
    head = model.verbalizer_head
    embeddings = torch.nn.Embedding(model.config.text_config.vocab_size, 32, device="meta")
    with _IndexDevices() as recorder:
        matrix = head.label_embedding_matrix(embeddings)
    assert recorder.calls == [(torch.device("meta"), [torch.device("meta")])]
    assert matrix.device == torch.device("meta") and matrix.shape == (9, 32)
    assert head.label_word_index.device == torch.device("cpu")  # the buffer itself stays with the head


# ---- NumPy and non-finite inputs ---------------------------------------------------------------------------------


def test_numpy_inputs_are_converted():
    model = tiny_model()
    inputs = tester.get_inputs()
    expected = model(**inputs)
    as_numpy = {key: value.numpy() for key, value in inputs.items()}
    as_numpy["visual_features"] = as_numpy["visual_features"].astype(np.float64)
    outputs = model(**as_numpy)
    torch.testing.assert_close(outputs.logits, expected.logits)
    torch.testing.assert_close(outputs.loss, expected.loss)
    with pytest.raises(TypeError, match="`visual_mask` is a list; expected a torch.Tensor or a NumPy array"):
        model(**dict(inputs, visual_mask=[[1, 1, 1, 0]] * 3))


def test_non_finite_visual_features_raise_naming_the_rows():
    model = tiny_model()
    inputs = tester.get_inputs()
    broken = inputs["visual_features"].clone()
    broken[0, 1, 3] = float("nan")
    broken[1, 0, 0] = float("inf")
    with pytest.raises(ValueError) as error:
        model(**dict(inputs, visual_features=broken))
    assert "batch rows [0, 1]" in str(error.value) and "{0: [1], 1: [0]}" in str(error.value)
    # non-finite values in padding objects (mask 0) are ignored like any padding
    padded = inputs["visual_features"].clone()
    padded[0, 3] = float("nan")
    padded[2] = float("inf")
    logits = model(**dict(inputs, visual_features=padded)).logits
    torch.testing.assert_close(logits, model(**inputs).logits)


def test_pmner_model_alone_accepts_the_same_conventions():
    model = PMNERModel(tester.get_config()).eval()
    inputs = without_labels(tester.get_inputs())
    outputs = model(**{key: value.numpy() for key, value in inputs.items()}, output_attentions=True)
    assert outputs.text_to_object_attentions.shape == (3, 4, 9, 4)
    assert isinstance(model(**inputs, return_dict=False), tuple)
