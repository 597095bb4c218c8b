"""Speed features of the `multimodal-ner` pipeline: batching by length (order and results kept), int8 dynamic
quantisation (CPU only), and no tokenizer length warning for long tweets the windows cover."""

import copy
import json
import logging

import numpy as np
import pytest
import torch
from transformers import pipeline

from processing_pmner import pipeline_pmner
from processing_pmner.pipeline_pmner import PMNERPipeline, register_pipeline
from predict_pmner.cli import main as predict_main

from fixtures import write_tiny_masked_lm
from pipeline_builders import TRICKY_TWEETS, build_model, build_processor, force_tag, save_folder


pytestmark = pytest.mark.filterwarnings("ignore:.*sub-words, more than fit in max_length")

TWEETS = TRICKY_TWEETS + [
    "trump",
    " ".join(["london"] * 90),  # windows
    "kawhi leonard wins the fan vote",
    "",
    "nba # trump visits london again and again",
    "a b",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    text_model = write_tiny_masked_lm(root / "tiny-bert")
    model = build_model(text_model, use_visual=False)
    processor = build_processor(text_model, model)
    return {"root": root, "text_model": text_model, "model": model, "processor": processor}


@pytest.fixture(scope="module")
def pipe(tiny):
    return PMNERPipeline(model=tiny["model"], processor=tiny["processor"], device="cpu")


def word_tags(results):
    return [[word["tag"] for word in result["words"]] for result in results]


# ----------------------------------------------------------------------------------------------------------------------
# Batching by length
# ----------------------------------------------------------------------------------------------------------------------


def test_batches_are_formed_by_length_and_results_keep_the_input_order(pipe, monkeypatch):
    seen = []
    original = PMNERPipeline._run_batch

    def spy(self, batch, *params):
        seen.append([item["index"] for item in batch.items])
        return original(self, batch, *params)

    monkeypatch.setattr(PMNERPipeline, "_run_batch", spy)
    results = pipe(TWEETS, batch_size=3, return_words=True)
    assert [result["text"] for result in results] == [pipe._normalise(tweet, 0, False)["text"] for tweet in TWEETS]
    assert sorted(index for batch in seen for index in batch) == list(range(len(TWEETS)))
    items = [pipe._normalise(tweet, index, False) for index, tweet in enumerate(TWEETS)]
    lengths = [len(pipe.processor.tokenizer(item["words"], is_split_into_words=True)["input_ids"]) if item["words"] else 0 for item in items]
    order = [index for batch in seen for index in batch]
    assert [lengths[index] for index in order] == sorted(lengths)  # fewest sub-words first
    assert order != list(range(len(TWEETS)))  # the fixture's tweets are not already sorted


def test_bucketed_results_equal_unbucketed_ones(pipe, monkeypatch):
    bucketed = pipe(TWEETS, batch_size=4, return_words=True, aggregation_strategy="average")
    # all keys equal: the stable sort keeps the input order and the batches are consecutive tweets, as before
    monkeypatch.setattr(PMNERPipeline, "_length_keys", lambda self, items: [0] * len(items))
    plain = pipe(TWEETS, batch_size=4, return_words=True, aggregation_strategy="average")
    assert word_tags(bucketed) == word_tags(plain)
    for one, other in zip(bucketed, plain):
        assert one["text"] == other["text"]
        assert [(e["entity_group"], e["start"], e["end"], e["word"]) for e in one["entities"]] == [
            (e["entity_group"], e["start"], e["end"], e["word"]) for e in other["entities"]
        ]
        np.testing.assert_allclose(
            [word["score"] for word in one["words"]], [word["score"] for word in other["words"]], rtol=1e-5, atol=1e-6
        )


def test_streams_are_read_ahead_in_windows_and_stay_in_order(pipe, monkeypatch):
    monkeypatch.setattr(pipeline_pmner, "BUCKET_BATCHES", 2)  # windows of 2 * batch_size tweets
    tweets = TWEETS * 3
    expected = word_tags(pipe(tweets, batch_size=1, return_words=True))
    streamed = list(pipe((tweet for tweet in tweets), batch_size=2, return_words=True))
    assert word_tags(streamed) == expected
    assert [result["text"] for result in streamed] == [pipe._normalise(t, 0, False)["text"] for t in tweets]


def test_an_error_names_the_tweet_by_its_input_index(pipe):
    with pytest.raises(ValueError, match="tweet 7 is a int"):
        pipe(TWEETS[:7] + [5], batch_size=4)


# ----------------------------------------------------------------------------------------------------------------------
# int8 dynamic quantisation
# ----------------------------------------------------------------------------------------------------------------------


def test_int8_quantises_a_copy_and_keeps_the_tags(tiny):
    model = force_tag(build_model(tiny["text_model"], use_visual=False), "B-PER", bias=8.0)
    fp32 = PMNERPipeline(model=model, processor=tiny["processor"], device="cpu")
    engine = torch.backends.quantized.engine
    int8 = PMNERPipeline(model=model, processor=tiny["processor"], device="cpu", quantize="int8")
    assert torch.backends.quantized.engine == engine  # the process-wide setting is left as it was
    assert int8.quantize == "int8" and fp32.quantize is None
    quantized = {
        name for name, module in int8.model.named_modules() if isinstance(module, torch.ao.nn.quantized.dynamic.Linear)
    }
    width = model.config.text_config.intermediate_size
    feed_forward = {
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and width in (module.in_features, module.out_features)
    }
    assert quantized == feed_forward and len(feed_forward) == 2 * model.config.text_config.num_hidden_layers
    assert isinstance(int8.model.verbalizer_head.dense, torch.nn.Linear)  # the head stays in float
    assert any(type(module) is torch.nn.Linear for module in model.modules())  # the caller's model is untouched
    expected, got = fp32(TWEETS, batch_size=4, return_words=True), int8(TWEETS, batch_size=4, return_words=True)
    assert word_tags(got) == word_tags(expected)
    assert any(tag == "B-PER" for tags in word_tags(got) for tag in tags)


def test_int8_probabilities_stay_close_on_a_random_model(tiny, pipe):
    int8 = PMNERPipeline(model=tiny["model"], processor=tiny["processor"], device="cpu", quantize="int8")
    fp32_out = pipe(TWEETS, batch_size=4, return_words=True, output_scheme="model")
    int8_out = int8(TWEETS, batch_size=4, return_words=True, output_scheme="model")
    agree = [a == b for x, y in zip(word_tags(fp32_out), word_tags(int8_out)) for a, b in zip(x, y)]
    assert np.mean(agree) >= 0.9
    differences = [
        abs(a["score"] - b["score"])
        for x, y in zip(fp32_out, int8_out) for a, b in zip(x["words"], y["words"]) if a["tag"] == b["tag"]
    ]
    assert max(differences) < 0.05


def test_int8_refuses_unknown_values_and_non_cpu_devices(tiny):
    model, processor = tiny["model"], tiny["processor"]
    with pytest.raises(ValueError, match=r"quantize must be one of \('int8',\) or None, got 'int4'"):
        PMNERPipeline(model=model, processor=processor, device="cpu", quantize="int4")
    for device in ("cuda", "cuda:1", 0, torch.device("meta")):
        with pytest.raises(ValueError, match="quantize='int8' runs on CPU only"):
            PMNERPipeline(model=model, processor=processor, device=device, quantize="int8")
    with pytest.raises(ValueError, match="runs on CPU only"):
        pipeline_pmner.quantize_dynamic_int8(copy.deepcopy(model), "cuda")


def test_int8_through_the_pipeline_factory_and_the_cli(tiny, tmp_path, capsys):
    model = force_tag(build_model(tiny["text_model"], use_visual=False), "B-LOC", bias=8.0)
    folder = save_folder(tmp_path / "model", model, build_processor(tiny["text_model"], model))
    register_pipeline()
    ner = pipeline("multimodal-ner", model=folder, pipeline_class=PMNERPipeline, device="cpu", quantize="int8")
    assert ner.quantize == "int8"
    assert ner("trump visits london")[0]["entity_group"] == "LOC"

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": tweet}) + "\n" for tweet in ["trump visits london", "nba"]))
    outputs = {}
    for name, extra in (("fp32", []), ("int8", ["--quantize", "int8"])):
        target = tmp_path / f"{name}.jsonl"
        code = predict_main([folder, str(source), "-o", str(target), "--no-progress", "--device", "cpu"] + extra)
        assert code == 0, capsys.readouterr().err
        outputs[name] = [json.loads(line)["entities"] for line in target.read_text().splitlines()]
    assert [[e["word"] for e in row] for row in outputs["int8"]] == [[e["word"] for e in row] for row in outputs["fp32"]]
    assert outputs["int8"][0]

    code = predict_main([folder, str(source), "-o", str(tmp_path / "gpu.jsonl"), "--no-progress", "--device", "cuda",
                         "--quantize", "int8"])
    assert code == 2
    assert "runs on CPU only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_main([folder, str(source), "-o", str(tmp_path / "x.jsonl"), "--quantize", "int4"])


# ----------------------------------------------------------------------------------------------------------------------
# Long tweets: no tokenizer length warning
# ----------------------------------------------------------------------------------------------------------------------


def test_a_400_word_tweet_gives_no_sequence_length_warning(tiny, caplog):
    processor = build_processor(tiny["text_model"], tiny["model"])
    processor.tokenizer.model_max_length = 64  # the windows (max_length=32) fit it; the whole tweet does not
    ner = PMNERPipeline(model=tiny["model"], processor=processor, device="cpu")
    words = [("trump", "visits", "london", "#", "nba")[index % 5] for index in range(400)]
    message = "Token indices sequence length is longer"
    with caplog.at_level(logging.WARNING):
        result = ner(" ".join(words), return_words=True)
        quiet = [record.getMessage() for record in caplog.records]
        caplog.clear()
        # the tokenizer itself does warn for this tweet (the check above can fail), and still does after the call
        processor.tokenizer(words, is_split_into_words=True, add_special_tokens=False)
        loud = [record.getMessage() for record in caplog.records]
    assert not any(message in line for line in quiet)
    assert any(message in line for line in loud)
    assert [word["word"] for word in result["words"]] == words
    assert len(result["entities"]) <= len(words)
