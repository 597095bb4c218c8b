"""Tests of PMNERConfig / PMNERForTokenClassification in the transformers ModelTester way: tiny configs, offline."""

import itertools
import json
import os
import shutil
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForTokenClassification, BertConfig, BertForMaskedLM

from modeling_pmner import PMNERConfig, PMNERForTokenClassification
from modeling_pmner.modeling_pmner import resolve_label_word_ids

from fixtures import run_without_project, write_tiny_tokenizer
from model_tester import tester


SWITCHES = list(
    itertools.product([True, False], ["tcfm", "concat"], ["verbalizer", "linear"], [False, True])
)


@pytest.mark.parametrize("use_visual,fusion,head,verbalizer_trainable", SWITCHES)
@pytest.mark.parametrize("with_visual", [True, False])
def test_output_shapes_for_every_switch(use_visual, fusion, head, verbalizer_trainable, with_visual):
    config = tester.get_config(
        use_visual=use_visual, fusion=fusion, head=head, verbalizer_trainable=verbalizer_trainable
    )
    model = PMNERForTokenClassification(config).eval()
    inputs = tester.get_inputs(with_visual=with_visual)
    outputs = model(**inputs)
    assert outputs.logits.shape == (tester.batch_size, tester.seq_length, config.num_labels)
    assert outputs.loss.shape == () and torch.isfinite(outputs.loss)
    assert torch.isfinite(outputs.logits).all()
    base = model.pmner(**{k: v for k, v in inputs.items() if k != "labels"})
    assert base.last_hidden_state.shape == (tester.batch_size, tester.seq_length, 32)
    assert base.text_hidden_state.shape == (tester.batch_size, tester.seq_length, 32)
    if use_visual and with_visual:
        assert base.visual_hidden_state.shape == (tester.batch_size, tester.num_objects, 32)
    else:
        assert base.visual_hidden_state is None


def test_bioes_label_set_and_no_loss_without_labels():
    config = tester.get_config(tag_scheme="BIOES")
    assert config.num_labels == 17 and config.id2label[4] == "S-PER"
    model = PMNERForTokenClassification(config).eval()
    outputs = model(**tester.get_inputs(with_labels=False))
    assert outputs.loss is None
    assert outputs.logits.shape[-1] == 17


def test_text_only_inputs_and_hidden_states():
    model = PMNERForTokenClassification(tester.get_config()).eval()
    inputs = tester.get_inputs(with_visual=False, with_labels=False)
    del inputs["token_type_ids"], inputs["attention_mask"]
    outputs = model(**inputs, output_hidden_states=True)
    assert len(outputs.hidden_states) == 3  # embeddings + 2 layers
    assert outputs.logits.shape == (tester.batch_size, tester.seq_length, 9)


def test_no_objects_equals_no_image_for_tcfm():
    """With every object masked, TCFM adds nothing (V' = C = 0) and H = T: same as no visual input at all, at any
    weights (the fusion biases, zero at initialisation, are drawn at random as training would move them)."""
    model = PMNERForTokenClassification(tester.get_config()).eval()
    with torch.no_grad():
        for name, parameter in model.pmner.named_parameters():
            if name.startswith(("fusion.", "visual_self_attention.")) and name.endswith("bias"):
                parameter.normal_()
    inputs = tester.get_inputs(with_labels=False)
    inputs["visual_mask"] = torch.zeros_like(inputs["visual_mask"])
    with_empty = model(**inputs).logits
    inputs.pop("visual_features"), inputs.pop("visual_mask")
    without = model(**inputs).logits
    assert torch.isfinite(with_empty).all()
    torch.testing.assert_close(with_empty, without)


@pytest.mark.parametrize("fusion", ["tcfm", "concat"])
def test_masked_objects_and_padding_are_ignored(fusion):
    model = PMNERForTokenClassification(tester.get_config(fusion=fusion)).eval()
    inputs = tester.get_inputs(with_labels=False)
    reference = model(**inputs).logits
    changed = dict(inputs)
    changed["visual_features"] = inputs["visual_features"].clone()
    changed["visual_features"][~inputs["visual_mask"]] = 1e4  # masked objects: must not matter
    changed["input_ids"] = inputs["input_ids"].clone()
    changed["input_ids"][1, -3:] = 7  # padded text positions: must not matter for real tokens
    logits = model(**changed).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[real], reference[real])
    # and a real object does matter
    changed["visual_features"][0, 0] += 5.0
    assert not torch.allclose(model(**changed).logits[0], reference[0])


@pytest.mark.parametrize("use_visual,fusion,head,verbalizer_trainable", SWITCHES)
def test_gradients_reach_every_trainable_parameter(use_visual, fusion, head, verbalizer_trainable):
    config = tester.get_config(
        use_visual=use_visual, fusion=fusion, head=head, verbalizer_trainable=verbalizer_trainable
    )
    model = PMNERForTokenClassification(config).train()
    model(**tester.get_inputs()).loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert no_grad == []


def test_verbalizer_without_label_word_ids_uses_random_embeddings():
    config = tester.get_config(label_word_ids=False)
    model = PMNERForTokenClassification(config)
    assert model.verbalizer_head.label_embeddings is not None
    assert model.verbalizer_head.label_embeddings.std() > 0


def test_tied_verbalizer_reads_the_input_embeddings():
    config = tester.get_config()
    model = PMNERForTokenClassification(config).eval()
    head = model.verbalizer_head
    assert head.label_embeddings is None
    embeddings = model.get_input_embeddings()
    expected = torch.stack(
        [
            torch.stack([embeddings.weight[word].mean(0) for word in config.label_word_ids[tag]]).mean(0)
            for tag in config.id2label.values()
        ]
    )
    torch.testing.assert_close(head.label_embedding_matrix(embeddings), expected)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda x: x.update(visual_features=torch.randn(3, 4, 15)), "visual_features` has shape (3, 4, 15)"),
        (lambda x: x.update(visual_features=torch.randn(3, 6, 16), visual_mask=None), "more than max_objects=5"),
        (lambda x: x.update(visual_features=torch.randn(2, 4, 16)), "batch size 2"),
        (lambda x: x.update(visual_mask=torch.ones(3, 3)), "visual_mask` has shape (3, 3)"),
        (lambda x: x.update(attention_mask=torch.ones(2, 9)), "attention_mask` has shape (2, 9)"),
        (lambda x: x.update(labels=torch.zeros(3, 8, dtype=torch.long)), "labels` has shape (3, 8)"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(change, message):
    model = PMNERForTokenClassification(tester.get_config())
    inputs = tester.get_inputs()
    change(inputs)
    with pytest.raises(ValueError) as error:
        model(**inputs)
    assert message in str(error.value)
    assert "expected" in str(error.value)


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="fusion must be one of"):
        tester.get_config(fusion="sum")
    with pytest.raises(ValueError, match="fusion_num_heads=5 must divide"):
        PMNERConfig(text_config=tester.text_config(), fusion_num_heads=5)
    with pytest.raises(ValueError, match="no label words"):
        PMNERConfig(text_config=tester.text_config(), fusion_num_heads=4, verbalizer={"O": ["none"]})


def test_auto_classes_are_registered():
    config = AutoConfig.for_model("pmner", text_config=tester.text_config(), fusion_num_heads=4)
    assert isinstance(config, PMNERConfig)
    assert isinstance(AutoModelForTokenClassification.from_config(config), PMNERForTokenClassification)
    assert isinstance(AutoModel.from_config(config), PMNERForTokenClassification)


def test_from_text_pretrained_loads_encoder_and_mlm_head(tmp_path):
    """A tiny masked LM saved to disk stands for bert-base: encoder, MLM transform and label-word biases load."""
    text_folder = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    masked_lm = BertForMaskedLM(BertConfig(**{k: v for k, v in tester.text_config().items() if k != "model_type"}))
    with torch.no_grad():
        masked_lm.cls.predictions.bias.normal_()
    masked_lm.save_pretrained(text_folder)
    tokenizer = write_tiny_tokenizer(text_folder)

    model = PMNERForTokenClassification.from_text_pretrained(
        str(text_folder), fusion_num_heads=4, visual_feature_dim=16, tag_scheme="BIOES", verbalizer_trainable=True
    )
    assert model.config.label_word_ids == resolve_label_word_ids(model.config.verbalizer, tokenizer)
    encoder_state = masked_lm.bert.state_dict()
    for name, value in model.pmner.text_model.state_dict().items():
        torch.testing.assert_close(value, encoder_state[name])
    transform = masked_lm.cls.predictions.transform
    torch.testing.assert_close(model.verbalizer_head.dense.weight, transform.dense.weight)
    torch.testing.assert_close(model.verbalizer_head.LayerNorm.weight, transform.LayerNorm.weight)
    person = [piece for word in model.config.label_word_ids["S-PER"] for piece in word]
    torch.testing.assert_close(model.verbalizer_head.bias[4], masked_lm.cls.predictions.bias[person].mean())
    # trainable verbalizer: starts from the averaged input embeddings of its label words
    expected = torch.stack([masked_lm.bert.embeddings.word_embeddings.weight[w].mean(0) for w in model.config.label_word_ids["S-PER"]]).mean(0)
    torch.testing.assert_close(model.verbalizer_head.label_embeddings[4], expected)


def test_from_text_pretrained_offline_error_names_a_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="pass a local folder"):
        PMNERForTokenClassification.from_text_pretrained(str(tmp_path / "no-such-model"))


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModel, AutoModelForTokenClassification
    inputs = torch.load({inputs!r})
    results = {{}}
    for name, auto in (("token", AutoModelForTokenClassification), ("auto", AutoModel)):
        model = auto.from_pretrained({folder!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "PMNERForTokenClassification", type(model)
        assert "modeling_pmner" not in type(model).__module__.split(".")[0] or "transformers_modules" in type(model).__module__
        with torch.no_grad():
            results[name] = model(**inputs).logits.tolist()
        head = model.verbalizer_head
        embeddings = model.get_input_embeddings()
        results[name + "_tied"] = bool(head.tied) and torch.equal(
            head.label_embedding_matrix(embeddings),
            (embeddings.weight[head.label_word_index] * head.label_word_weight.unsqueeze(-1)).sum(1),
        )
        results[name + "_module"] = type(model).__module__
    model = AutoModelForTokenClassification.from_pretrained(
        {folder!r}, trust_remote_code=True, attn_implementation="sdpa"
    ).eval()
    results["sdpa"] = model.pmner.text_model.config._attn_implementation
    with torch.no_grad():
        outputs = model(**inputs, output_attentions=True, return_dict=False)
    results["tuple_length"] = len(outputs)
    with torch.no_grad():
        grounding = model(**inputs, output_attentions=True).text_to_object_attentions
    results["grounding_shape"] = list(grounding.shape)
    print(json.dumps(results))
    """
)


def test_remote_code_round_trip_in_a_fresh_process(tmp_path):
    model = PMNERForTokenClassification(tester.get_config()).eval()
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    files = sorted(os.listdir(saved))
    code = {"modeling_pmner.py", "configuration_pmner.py", "fusion_pmner.py", "verbalizer_pmner.py", "inputs_pmner.py"}
    assert {"config.json", "model.safetensors"} | code <= set(files)
    auto_map = json.loads((saved / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_pmner.PMNERConfig",
        "AutoModel": "modeling_pmner.PMNERForTokenClassification",
        "AutoModelForTokenClassification": "modeling_pmner.PMNERForTokenClassification",
    }
    elsewhere = tmp_path / "elsewhere" / "pmner-tiny"
    shutil.copytree(saved, elsewhere)
    inputs = tester.get_inputs(with_labels=False)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(**inputs).logits
    result = run_without_project(REMOTE_SCRIPT.format(inputs=str(tmp_path / "inputs.pt"), folder=str(elsewhere)), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("token", "auto"):
        assert results[name + "_module"].startswith("transformers_modules")
        torch.testing.assert_close(torch.tensor(results[name]), expected, atol=1e-5, rtol=0)
        assert results[name + "_tied"]
    assert results["sdpa"] == "sdpa"
    assert results["tuple_length"] == 7  # no labels: logits, encoder attentions, the 5 fusion attention weights
    assert results["grounding_shape"] == [tester.batch_size, 4, tester.seq_length, tester.num_objects]


def make_visual_task(num_examples, prototypes, generator):
    """Same text for every example; the tag of every word is decided by which of two prototype objects is shown."""
    tokens = torch.tensor([2, 20, 21, 22, 23, 3])  # [CLS] four words [SEP]
    kinds = torch.randint(0, 2, (num_examples,), generator=generator)
    features = prototypes[kinds].unsqueeze(1) + 0.3 * torch.randn(num_examples, 1, tester.visual_feature_dim, generator=generator)
    labels = torch.where(kinds == 0, 1, 3).unsqueeze(1).expand(-1, len(tokens)).clone()  # B-PER or B-LOC
    labels[:, 0] = labels[:, -1] = -100
    return {
        "input_ids": tokens.expand(num_examples, -1),
        "visual_features": features,
        "visual_mask": torch.ones(num_examples, 1, dtype=torch.bool),
        "labels": labels,
    }


@pytest.mark.parametrize("use_visual", [True, False])
def test_fusion_carries_visual_information(use_visual):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    prototypes = torch.randn(2, tester.visual_feature_dim, generator=generator) * 2
    train, test = make_visual_task(256, prototypes, generator), make_visual_task(128, prototypes, generator)
    model = PMNERForTokenClassification(tester.get_config(use_visual=use_visual)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(150):
        batch = {k: v[(step * 16) % 256 : (step * 16) % 256 + 16] for k, v in train.items()}
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predictions = model(**{k: v for k, v in test.items() if k != "labels"}).logits.argmax(-1)
    scored = test["labels"] != -100
    accuracy = (predictions[scored] == test["labels"][scored]).float().mean().item()
    if use_visual:
        assert accuracy > 0.95
    else:
        assert 0.3 < accuracy < 0.7  # the text is identical: chance between two tags
