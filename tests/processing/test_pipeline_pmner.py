"""The `multimodal-ner` pipeline: remote-code loading, word splitting with offsets, aggregation, long tweets, images."""

import json
import os
import shutil
import textwrap
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import PROJECT, run_without_project
from modeling_pmner import PMNERForTokenClassification
from pipeline_builders import TRICKY_TWEETS, build_model, build_processor, force_tag, image_file
from processing_pmner.pipeline_pmner import PMNERPipeline, TASK, add_pipeline_to_folder, register_pipeline
from processing_pmner.text_tweet_tokenizer import join_words, split_tweet
from training_pmner.twitter_mner import TwitterMNERConfig, read_twitter_conll


TWITTER2017 = os.path.join(PROJECT, "..", "shared", "data", "twitter2017", "train.txt")
# the tiny vocabulary spells a URL letter by letter: more sub-words than fit in max_length=32 (encoded as [UNK])
pytestmark = pytest.mark.filterwarnings("ignore:.*sub-words, more than fit in max_length")


_FORCED = {}


def forced_pipe(tiny, tag: str, tag_scheme: str = "BIO") -> PMNERPipeline:
    """A pipeline whose model predicts `tag` for every word (built once per tag)."""
    key = (tiny["text_model"], tag, tag_scheme)
    if key not in _FORCED:
        model = force_tag(build_model(tiny["text_model"], tag_scheme=tag_scheme), tag)
        _FORCED[key] = PMNERPipeline(model=model, processor=build_processor(tiny["text_model"], model), device="cpu")
    return _FORCED[key]


# ----------------------------------------------------------------------------------------------------------------------
# Loading from a saved folder in a process that cannot import the project
# ----------------------------------------------------------------------------------------------------------------------


ISOLATED_SCRIPT = textwrap.dedent(
    """
    import json, warnings
    from PIL import Image
    from transformers import pipeline

    result = {{}}
    ner = pipeline(model={folder!r}, trust_remote_code=True, device="cpu")  # task found in config.json
    result["task"] = ner.task
    result["class"] = type(ner).__module__ + "." + type(ner).__name__
    text = {text!r}
    result["text_only"] = ner(text)
    result["with_path"] = ner(text, image={image!r})
    result["with_pil"] = ner(text, image=Image.open({image!r}), aggregation_strategy="first")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result["bad_image"] = ner(text, image={bad_image!r})
    result["warnings"] = [str(warning.message) for warning in caught]
    named = pipeline("multimodal-ner", model={folder!r}, trust_remote_code=True, device="cpu")
    result["named_batch"] = named([text, {{"words": ["trump", "visits", "london"]}}, ""], batch_size=2)
    resaved = pipeline(model={resaved!r}, trust_remote_code=True, device="cpu")
    result["resaved"] = resaved(text)
    print("RESULT " + json.dumps(result))
    """
)


def test_pipeline_from_saved_folder_in_a_process_without_the_project(tiny, tmp_path):
    folder = tiny["folder"]
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    assert config["custom_pipelines"][TASK]["impl"] == "pipeline_pmner.PMNERPipeline"
    assert {"pipeline_pmner.py", "text_tweet_tokenizer.py", "processor_config.json"} <= set(os.listdir(folder))
    # PMNERPipeline.save_pretrained writes a folder that loads the same way (model, processor and code)
    resaved = tmp_path / "resaved"
    PMNERPipeline(model=tiny["model"], processor=tiny["processor"], device="cpu").save_pretrained(resaved)
    bad_image = tmp_path / "broken.jpg"
    bad_image.write_bytes(b"this is not a jpeg")
    text = TRICKY_TWEETS[0]
    script = ISOLATED_SCRIPT.format(
        folder=folder, text=text, image=image_file(tmp_path), bad_image=str(bad_image),
        resaved=str(resaved),
    )
    completed = run_without_project(script, tmp_path)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    result = json.loads(completed.stdout.split("RESULT ", 1)[1])
    assert result["task"] == TASK
    assert result["class"].startswith("transformers_modules.") and result["class"].endswith("PMNERPipeline")
    for key in ("text_only", "with_path", "with_pil", "bad_image", "resaved"):
        assert isinstance(result[key], list), key
        for entity in result[key]:
            assert set(entity) == {"entity_group", "score", "word", "start", "end"}
            assert text[entity["start"] : entity["end"]] == entity["word"]
            assert 0.0 <= entity["score"] <= 1.0
    assert any("broken.jpg" in message and "text-only" in message for message in result["warnings"])
    # an unreadable image answers like no image at all
    assert result["bad_image"] == result["text_only"]
    batch = result["named_batch"]
    assert len(batch) == 3 and batch[2] == []
    assert result["resaved"] == result["text_only"]


def test_register_pipeline_enables_the_task_name_in_process(tiny):
    from transformers import pipeline

    register_pipeline()
    register_pipeline()  # idempotent
    # an in-memory model (no custom_pipelines in its config): the registry gives the class
    ner = pipeline(TASK, model=tiny["model"], processor=tiny["processor"], device="cpu")
    assert type(ner) is PMNERPipeline
    # a saved folder: its config names the remote code; this package's class is used with pipeline_class=
    local = pipeline(TASK, model=tiny["folder"], pipeline_class=PMNERPipeline, device="cpu")
    assert type(local) is PMNERPipeline and type(local.model) is PMNERForTokenClassification
    assert local("trump visits london") == ner("trump visits london")


# ----------------------------------------------------------------------------------------------------------------------
# Word splitting and offsets
# ----------------------------------------------------------------------------------------------------------------------


def test_split_tweet_follows_the_benchmark_style():
    def words(text):
        return [word for word, _, _ in split_tweet(text)]

    assert words("RT @Bundesliga_EN: #NBAAwards") == ["RT", "@", "Bundesliga_EN", ":", "#", "NBAAwards"]
    assert words("It's all-time!!") == ["It", "'", "s", "all", "-", "time", "!", "!"]
    assert words("⚽️👍🏼") == ["⚽", "\ufe0f", "👍", "🏼"]
    assert words("May 21, 2016 at 9:30 pm $4.99 10,000 2nd") == [
        "May", "21,", "2016", "at", "9:30", "pm", "$", "4.99", "10,000", "2", "nd",
    ]
    assert words("see https://t.co/Ab1?x=2). :) <3 :pizza") == [
        "see", "https://t.co/Ab1?x=2", ")", ".", ":)", "<3", ":", "pizza",
    ]
    assert words("Beyonce\u0301 Z100TheBeat _HS_Soccer &gt;") == ["Beyonce\u0301", "Z100TheBeat", "_HS_Soccer", "&", "gt", ";"]
    assert split_tweet("") == [] and split_tweet(" \t\n ") == []
    text, spans = join_words(["a", "", "bc"])
    assert text == "a  bc" and spans == [(0, 1), (2, 2), (3, 5)]


@pytest.mark.skipif(not os.path.isfile(TWITTER2017), reason="Twitter-2017 text not available")
def test_split_tweet_reproduces_the_twitter2017_tokenisation():
    config = TwitterMNERConfig(name="twitter2017")
    sentences = [tweet.tokens for tweet in read_twitter_conll(TWITTER2017, config.source_tags)]
    same = sum([word for word, _, _ in split_tweet(" ".join(tokens))] == tokens for tokens in sentences)
    assert same / len(sentences) > 0.99, f"{same} of {len(sentences)} tweets split as in the data"


@pytest.mark.parametrize("text", TRICKY_TWEETS)
def test_offsets_slice_back_to_every_word_and_entity(tiny, text):
    ner = forced_pipe(tiny, "B-PER")  # every word is its own PER entity
    result = ner(text, return_words=True)
    expected = split_tweet(text)
    assert [(word["word"], word["start"], word["end"]) for word in result["words"]] == expected
    assert all(word["tag"] == "B-PER" for word in result["words"])
    assert len(result["entities"]) == len(expected)
    for entity, (word, start, end) in zip(result["entities"], expected):
        assert entity["entity_group"] == "PER" and entity["score"] > 0.99
        assert (entity["start"], entity["end"]) == (start, end)
        assert text[entity["start"] : entity["end"]] == entity["word"] == word


def test_multi_word_entities_span_the_original_text(tiny):
    ner = forced_pipe(tiny, "I-LOC")  # one entity over all words, gaps included
    for text in TRICKY_TWEETS:
        (entity,) = ner(text)
        assert entity["entity_group"] == "LOC"
        assert entity["word"] == text.strip() == text[entity["start"] : entity["end"]]


def test_repeated_words_get_their_own_offsets(tiny):
    ner = forced_pipe(tiny, "B-ORG")
    text = "nba nba  nba #nba"
    starts = [entity["start"] for entity in ner(text)]
    assert starts == [0, 4, 9, 13, 14]


def test_pre_split_words(tiny):
    ner = forced_pipe(tiny, "B-PER")
    words = ["Kawhi", "Leonard", "#", "NBA"]
    by_flag = ner(words, is_split_into_words=True)
    by_dict = ner({"words": words})
    assert by_flag == by_dict
    assert [entity["word"] for entity in by_flag] == words
    assert [(entity["start"], entity["end"]) for entity in by_flag] == [(0, 5), (6, 13), (14, 15), (16, 19)]
    batch = ner([words, ["a"]], is_split_into_words=True)
    assert len(batch) == 2 and batch[0] == by_flag


# ----------------------------------------------------------------------------------------------------------------------
# Coverage: long and empty tweets
# ----------------------------------------------------------------------------------------------------------------------


def test_a_1000_word_tweet_is_tagged_entirely(tiny):
    ner = forced_pipe(tiny, "B-MISC")
    words = [("trump", "visits", "london", "#", "nba")[index % 5] for index in range(1000)]
    text = " ".join(words)
    encoding = ner.processor(words)
    assert encoding["input_ids"].shape[0] > 20  # overlapping windows, not one truncated row
    assert encoding["input_ids"].shape[1] <= ner.processor.max_length
    result = ner(text, return_words=True)
    assert len(result["words"]) == 1000
    assert all(word["tag"] == "B-MISC" for word in result["words"])
    assert len(result["entities"]) == 1000
    assert result["entities"][-1]["end"] == len(text)


def test_empty_and_blank_text(random_pipe):
    assert random_pipe("") == []
    assert random_pipe("   \n\t ") == []
    assert random_pipe("", return_words=True) == {"text": "", "entities": [], "words": []}
    assert random_pipe({"words": []}) == []
    assert random_pipe([]) == []
    assert random_pipe(["", "trump", ""], batch_size=2)[0] == []


# ----------------------------------------------------------------------------------------------------------------------
# Batching, images, precomputed features
# ----------------------------------------------------------------------------------------------------------------------


def test_batches_give_the_same_results_as_single_calls(random_pipe):
    tweets = TRICKY_TWEETS + [" ".join(["london"] * 120)]
    single = [random_pipe(tweet, return_words=True) for tweet in tweets]
    batched = random_pipe(tweets, batch_size=3, return_words=True)
    assert len(batched) == len(single)
    for one, many in zip(single, batched):
        assert [word["tag"] for word in one["words"]] == [word["tag"] for word in many["words"]]
        np.testing.assert_allclose(
            [word["score"] for word in one["words"]], [word["score"] for word in many["words"]], rtol=1e-4, atol=1e-5
        )
    streamed = list(random_pipe((tweet for tweet in tweets), batch_size=4, return_words=True))
    assert [[w["tag"] for w in r["words"]] for r in streamed] == [[w["tag"] for w in r["words"]] for r in single]


def test_datasets_stream(random_pipe, tmp_path):
    import datasets
    from transformers.pipelines.pt_utils import KeyDataset

    rows = {"id": [1, 2, 3], "tokens": [["trump", "visits", "london"], ["hello"], []], "image": [image_file(tmp_path), None, None]}
    dataset = datasets.Dataset.from_dict(rows)
    expected = [random_pipe({"words": words, "image": image}) for words, image in zip(rows["tokens"], rows["image"])]
    with pytest.warns(UserWarning, match="keys \\['id'\\] of tweet 0 are not inputs"):
        streamed = random_pipe(dataset, batch_size=2)
        assert not isinstance(streamed, list)
        assert list(streamed) == expected
    text = datasets.Dataset.from_dict({"text": ["trump visits london", "hello"]})
    assert list(random_pipe(KeyDataset(text, "text"), batch_size=2)) == [random_pipe(t) for t in text["text"]]


def test_images_and_precomputed_features_change_the_prediction(random_pipe, tmp_path):
    text = "trump visits london today"
    plain = random_pipe(text, return_words=True)["words"]
    torch.manual_seed(1)
    features = torch.randn(3, 512) * 5
    with_features = random_pipe({"text": text, "visual_features": features}, return_words=True)["words"]
    assert [w["score"] for w in plain] != [w["score"] for w in with_features]
    masked = random_pipe(
        {"text": text, "visual_features": features, "visual_mask": [False, False, False]}, return_words=True
    )["words"]
    np.testing.assert_allclose([w["score"] for w in masked], [w["score"] for w in plain], rtol=1e-5)
    with_image = random_pipe(text, image=image_file(tmp_path), return_words=True)["words"]
    assert len(with_image) == 4
    mixed = random_pipe(
        [text, {"text": text, "visual_features": features}, text], image=[None, None, Image.new("RGB", (40, 40))],
        batch_size=3, return_words=True,
    )
    assert [w["score"] for w in mixed[0]["words"]] == pytest.approx([w["score"] for w in plain], rel=1e-4)
    assert [w["score"] for w in mixed[1]["words"]] == pytest.approx([w["score"] for w in with_features], rel=1e-4)
    with pytest.raises(ValueError, match="tweet 0: visual_features has shape"):
        random_pipe({"text": text, "visual_features": torch.zeros(3)})
    with pytest.raises(ValueError, match="visual_feature_dim=512"):
        random_pipe({"text": text, "visual_features": torch.zeros(3, 7)})


def test_an_unreadable_image_warns_and_still_answers(random_pipe, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")
    text = "trump visits london"
    with pytest.warns(UserWarning, match="broken.jpg"):
        answer = random_pipe(text, image=str(broken))
    assert answer == random_pipe(text)
    with pytest.warns(UserWarning, match="does not exist"):
        assert len(random_pipe([text, text], image=[str(tmp_path / "missing.jpg"), None])) == 2


def test_text_only_model_ignores_images(tiny, tmp_path):
    model = build_model(tiny["text_model"], use_visual=False)
    ner = PMNERPipeline(model=model, processor=build_processor(tiny["text_model"], model), device="cpu")
    assert ner("trump visits london", image=image_file(tmp_path)) == ner("trump visits london")


def test_input_errors_name_the_problem(random_pipe):
    with pytest.warns(UserWarning, match="keys \\['caption'\\] of tweet 0 are not inputs"):
        assert random_pipe({"text": "a b", "caption": "b"}) == random_pipe("a b")
    with pytest.raises(ValueError, match="exactly one of 'text' or 'words'"):
        random_pipe({"text": "a", "words": ["a"]})
    with pytest.raises(ValueError, match="is_split_into_words=True"):
        random_pipe([["a", "b"]])
    with pytest.raises(ValueError, match="one image \\(or None\\) per tweet"):
        random_pipe(["a", "b"], image=["x.jpg"])
    with pytest.raises(ValueError, match="tweet 4: 'text' is a int"):  # numbered in the whole input
        random_pipe(["a", "b", "c", "d", {"text": 5}], batch_size=2)
    with pytest.raises(ValueError, match="aggregation_strategy must be one of"):
        random_pipe("a", aggregation_strategy="longest")
    with pytest.raises(TypeError, match="unknown arguments \\['stride'\\]"):
        random_pipe("a", stride=3)
    width = random_pipe.model.config.visual_feature_dim
    features = np.zeros((2, width), dtype=np.float64)
    features[1, 0] = np.nan
    with pytest.raises(ValueError, match="tweet 3: visual_features hold NaN or infinite values"):
        random_pipe(["a", "b", "c", {"text": "d", "visual_features": features}], batch_size=2)


def test_a_processor_with_other_labels_than_the_model_fails_at_construction(tiny, tmp_path):
    from transformers import pipeline

    folder = tmp_path / "edited"
    shutil.copytree(tiny["folder"], folder)
    settings = json.loads((folder / "processor_config.json").read_text())
    model_labels = list(settings["label_names"])
    settings["label_names"] = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    (folder / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError) as caught:
        pipeline(TASK, model=str(folder), pipeline_class=PMNERPipeline, device="cpu")
    message = str(caught.value)
    assert "processor's label_names (5 tags) ['O', 'B-PER', 'I-PER', 'B-LOC', 'I-LOC']" in message
    assert f"model's config.id2label (9 tags) {model_labels}" in message
    # the BIOES processor of a BIOES model beside this BIO model: both label lists and both schemes named
    bioes = forced_pipe(tiny, "S-PER", tag_scheme="BIOES").processor
    with pytest.raises(ValueError, match="tag scheme BIOES differs from the model's BIO"):
        PMNERPipeline(model=tiny["model"], processor=bioes, device="cpu")


# ----------------------------------------------------------------------------------------------------------------------
# Aggregation strategies (word level)
# ----------------------------------------------------------------------------------------------------------------------


def word_scores(labels: list[str], rows: list[dict]) -> np.ndarray:
    """(words, labels) probabilities from `{tag: probability}` rows (the rest spread over the other tags)."""
    scores = np.zeros((len(rows), len(labels)), dtype=np.float32)
    for index, row in enumerate(rows):
        rest = (1.0 - sum(row.values())) / (len(labels) - len(row))
        scores[index] = rest
        for tag, value in row.items():
            scores[index, labels.index(tag)] = value
    return scores


def split_item(text: str) -> dict:
    """A tweet as the pipeline's postprocessing sees it: text, words and their character spans."""
    split = split_tweet(text)
    return {"text": text, "words": [w for w, _, _ in split], "spans": [(s, e) for _, s, e in split]}


def test_aggregation_strategies_mirror_the_token_classification_pipeline(random_pipe):
    labels = random_pipe.labels
    text = "Kawhi Leonard Lakers fan in LA LA"
    item = split_item(text)
    scores = word_scores(labels, [
        {"B-PER": 0.9},
        {"I-PER": 0.6, "I-ORG": 0.3},
        {"I-ORG": 0.95},  # type disagreement inside one entity
        {"O": 0.9},
        {"O": 0.9},
        {"B-LOC": 0.8},
        {"B-LOC": 0.7},  # two B- in a row: two entities
    ])

    def summary(strategy):
        return [
            (entity["entity_group"], entity["word"], pytest.approx(entity["score"], abs=1e-5))
            for entity in random_pipe.aggregate(item, scores, strategy)
        ]

    assert summary("simple") == [
        ("PER", "Kawhi Leonard", (0.9 + 0.6) / 2), ("ORG", "Lakers", 0.95), ("LOC", "LA", 0.8), ("LOC", "LA", 0.7),
    ]

    def rest(row):  # probability of each tag not named in a row
        return (1.0 - sum(row)) / (len(labels) - len(row))

    # first: the first word decides the type; score = P(PER) in that word (B-PER + I-PER)
    assert summary("first")[0] == ("PER", "Kawhi Leonard Lakers", 0.9 + rest([0.9]))
    # max: the most confident word (Lakers, I-ORG 0.95) decides
    assert summary("max")[0] == ("ORG", "Kawhi Leonard Lakers", 0.95 + rest([0.95]))
    # average: P(type) averaged over the words
    per = np.mean([0.9 + rest([0.9]), 0.6 + rest([0.6, 0.3]), 2 * rest([0.95])])
    org = np.mean([2 * rest([0.9]), 0.3 + rest([0.6, 0.3]), 0.95 + rest([0.95])])
    assert summary("average")[0] == ("ORG" if org > per else "PER", "Kawhi Leonard Lakers", max(per, org))
    assert [entity[1] for entity in summary("first")[1:]] == ["LA", "LA"]
    none = random_pipe.aggregate(item, scores, "none")
    assert [(entity["entity"], entity["index"], entity["word"]) for entity in none] == [
        ("B-PER", 0, "Kawhi"), ("I-PER", 1, "Leonard"), ("I-ORG", 2, "Lakers"), ("B-LOC", 5, "LA"), ("B-LOC", 6, "LA"),
    ]
    assert random_pipe.aggregate(item, scores[:0], "simple") == []


def test_bioes_models_group_by_their_prefixes(tiny):
    ner = forced_pipe(tiny, "S-PER", tag_scheme="BIOES")
    labels = ner.labels
    assert "S-PER" in labels
    result = ner("kawhi leonard", return_words=True)
    assert [entity["word"] for entity in result["entities"]] == ["kawhi", "leonard"]  # S- ends each entity
    assert [word["tag"] for word in result["words"]] == ["B-PER", "B-PER"]  # output_scheme="BIO"
    assert [word["tag"] for word in ner("kawhi leonard", return_words=True, output_scheme="model")["words"]] == [
        "S-PER", "S-PER",
    ]
    text = "a b c d"
    item = split_item(text)
    scores = word_scores(labels, [{"B-LOC": 0.9}, {"E-LOC": 0.9}, {"I-LOC": 0.9}, {"E-ORG": 0.9}])
    assert [(e["entity_group"], e["word"]) for e in ner.aggregate(item, scores, "simple")] == [
        ("LOC", "a b"), ("LOC", "c"), ("ORG", "d"),
    ]
    assert [(e["entity_group"], e["word"]) for e in ner.aggregate(item, scores, "first")] == [
        ("LOC", "a b"), ("LOC", "c d"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        words = ner(text, return_words=True, output_scheme="BIOES")["words"]
    assert [word["tag"] for word in words] == ["S-PER"] * 4


def test_ignore_labels_follow_the_token_classification_pipeline(tiny, caplog):
    ner = forced_pipe(tiny, "B-MISC")
    assert [entity["entity_group"] for entity in ner("a b")] == ["MISC", "MISC"]  # default ["O"]
    assert ner("a b", ignore_labels=["MISC"]) == []  # an entity type
    assert ner("a b", ignore_labels=("O", "MISC")) == []
    assert len(ner("a b", ignore_labels=["PER"])) == 2
    # aggregation "none": tags leave out words, as in transformers; so does their type
    assert ner("a b", aggregation_strategy="none", ignore_labels=["B-MISC"]) == []
    assert ner("a b", aggregation_strategy="none", ignore_labels=["MISC"]) == []
    assert [word["entity"] for word in ner("a b", aggregation_strategy="none", ignore_labels=["I-MISC"])] == [
        "B-MISC", "B-MISC",
    ]
    # a tag with a grouping strategy leaves nothing out (groups are labelled by type): said once
    with caplog.at_level("WARNING"):
        assert len(ner("a b", ignore_labels=["B-MISC"])) == 2
        assert len(ner("a b c", ignore_labels=["B-MISC"])) == 3
    assert caplog.text.count("ignore_labels ['B-MISC'] are tags") == 1 and "['MISC']" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        ner("a b", ignore_labels=["O", "PERSON"])
    assert "ignore_labels ['PERSON'] are neither tags nor entity types of this model" in caplog.text
    with pytest.raises(ValueError, match="ignore_labels must be a list"):
        ner("a b", ignore_labels="MISC")

    # without "O" in ignore_labels, words tagged O come back as in transformers: one by one ("none"), else by runs
    outside = forced_pipe(tiny, "O")
    assert outside("a b  c") == [] == outside("a b  c", ignore_labels=["O"])
    (group,) = outside("a b  c", ignore_labels=[])
    assert (group["entity_group"], group["word"], group["start"], group["end"]) == ("O", "a b  c", 0, 6)
    assert group["score"] > 0.99
    words = outside("a b  c", aggregation_strategy="none", ignore_labels=["PER"])
    assert [(word["entity"], word["index"], word["word"], word["start"]) for word in words] == [
        ("O", 0, "a", 0), ("O", 1, "b", 2), ("O", 2, "c", 5),
    ]


def test_outside_runs_are_placed_between_the_entities(random_pipe):
    labels = random_pipe.labels
    text = "Kawhi Leonard Lakers fan in LA LA"
    item = split_item(text)
    scores = word_scores(labels, [
        {"O": 0.8}, {"B-PER": 0.9}, {"I-PER": 0.6, "I-ORG": 0.3}, {"O": 0.9}, {"O": 0.7}, {"B-LOC": 0.8}, {"O": 0.6},
    ])

    def summary(strategy):
        return [
            (entity.get("entity_group", entity.get("entity")), entity["word"], pytest.approx(entity["score"], abs=1e-5))
            for entity in random_pipe.aggregate(item, scores, strategy, keep_outside=True)
        ]

    expected = [("O", "Kawhi", 0.8), ("PER", "Leonard Lakers", 0.75), ("O", "fan in", 0.8), ("LOC", "LA", 0.8),
                ("O", "LA", 0.6)]
    assert summary("simple") == expected
    assert [entry[:2] for entry in summary("first")] == [entry[:2] for entry in expected]
    assert [entry[0] for entry in summary("none")] == ["O", "B-PER", "I-PER", "O", "O", "B-LOC", "O"]
    # the default leaves them out
    assert [entity["entity_group"] for entity in random_pipe.aggregate(item, scores, "simple")] == ["PER", "LOC"]


# ----------------------------------------------------------------------------------------------------------------------
# Task names: what transformers' pipeline() gives for a saved P-MNER folder
# ----------------------------------------------------------------------------------------------------------------------


def test_the_folder_registers_one_task_that_pipeline_finds_alone(tiny):
    from transformers import pipeline

    config = json.loads(open(os.path.join(tiny["folder"], "config.json")).read())
    # one entry: with two, pipeline(model=folder) (no task) would refuse to choose
    assert list(config["custom_pipelines"]) == [TASK]
    for task in (None, TASK):
        ner = pipeline(task, model=tiny["folder"], trust_remote_code=True, device="cpu")
        assert type(ner).__name__ == "PMNERPipeline" and ner.task == TASK, task
        assert ner("trump visits london") == PMNERPipeline(
            model=tiny["model"], processor=tiny["processor"], device="cpu"
        )("trump visits london")


TASK_NAMES_SCRIPT = textwrap.dedent(
    """
    import json, os
    from transformers import pipeline

    result = {{}}
    for task in ("token-classification", "ner", "multimodal-ner", None):
        ner = pipeline(task, model={folder!r}, trust_remote_code=True, device="cpu")
        result[str(task)] = {{"class": type(ner).__name__, "answer": ner("trump visits london", image={image!r})}}
        if task == "token-classification":  # a model saved from it keeps one pipeline task
            ner.model.save_pretrained({resaved!r})
            result["resaved"] = json.load(open(os.path.join({resaved!r}, "config.json")))["custom_pipelines"]
    print("RESULT " + json.dumps(result))
    """
)


def test_the_token_classification_task_names_give_the_pmner_pipeline(tiny, tmp_path):
    # a Hub user's process (remote code): the saved config routes transformers' task names to its own pipeline
    photo = image_file(tmp_path)
    script = TASK_NAMES_SCRIPT.format(folder=tiny["folder"], image=photo, resaved=str(tmp_path / "resaved"))
    completed = run_without_project(script, tmp_path)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(completed.stdout.split("RESULT ", 1)[1])
    expected = PMNERPipeline(model=tiny["model"], processor=tiny["processor"], device="cpu")("trump visits london", image=photo)
    for task in ("token-classification", "ner", TASK, "None"):
        assert result[task]["class"] == "PMNERPipeline", task
        assert [entity["word"] for entity in result[task]["answer"]] == [entity["word"] for entity in expected], task
        assert [e["score"] for e in result[task]["answer"]] == pytest.approx([e["score"] for e in expected], rel=1e-4)
    assert list(result["resaved"]) == [TASK]


def test_saving_again_repairs_custom_pipelines(tiny, tmp_path, caplog):
    from transformers import pipeline

    folder = tmp_path / "two-entries"
    shutil.copytree(tiny["folder"], folder)
    config = json.loads((folder / "config.json").read_text())
    entry = config["custom_pipelines"][TASK]
    # this pipeline under a second name (breaks task=None) is dropped; another project's pipeline is kept, with a warning
    config["custom_pipelines"] = {TASK: entry, "token-classification": entry, "other-task": {"impl": "other.Pipe"}}
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"):
        add_pipeline_to_folder(folder)
    assert "registers other pipelines too (['other-task'])" in caplog.text
    assert json.loads((folder / "config.json").read_text())["custom_pipelines"] == {
        TASK: entry, "other-task": {"impl": "other.Pipe"},
    }
    del config["custom_pipelines"]["other-task"]
    (folder / "config.json").write_text(json.dumps(config))
    add_pipeline_to_folder(folder)
    assert list(json.loads((folder / "config.json").read_text())["custom_pipelines"]) == [TASK]
    assert type(pipeline(model=str(folder), trust_remote_code=True, device="cpu")).__name__ == "PMNERPipeline"
