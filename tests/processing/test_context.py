"""The auxiliary-context slot (processor, pipeline inputs, builder `context_file`, CLI field) and retrieval-augmented
context (`processing_pmner/text_retrieval_context.py`, `training_pmner/context.py`): never labelled, cut first, kept by
every window; no tweet retrieves itself or a tweet with its text; other splits retrieve training tweets only."""

import json
import random

import datasets
import pytest
import torch

from fixtures import write_tiny_masked_lm, write_twitter_fixture
from processing_builders import make_processor
from training_pmner.context_files import ContextFileError, read_context_file
from processing_pmner.text_retrieval_context import RetrievalIndex, SentenceEncoder, render_with_entities, text_key
from training_pmner.twitter_mner import load_twitter_mner
from tokenizer_fixtures import build_tokenizer


WORDS = "rt @user trump visits new york".split()
TAGS = ["O", "O", "B-PER", "O", "B-LOC", "I-LOC"]
CONTEXT = "obama london paris festival nba vote year apple google " * 3


# ----------------------------------------------------------------------------------------------------------------------
# processor
# ----------------------------------------------------------------------------------------------------------------------


def test_context_is_the_second_text_never_labelled_and_cut_first(tokenizer):
    processor = make_processor(tokenizer, max_length=40)
    plain = processor(WORDS, labels=TAGS, return_mapping=True)
    with_context = processor(WORDS, labels=TAGS, context=CONTEXT, return_mapping=True)
    tokens = tokenizer.convert_ids_to_tokens(with_context["input_ids"][0])
    first_sep = tokens.index("[SEP]")
    assert tokens[: first_sep + 1] == tokenizer.convert_ids_to_tokens(plain["input_ids"][0])  # tweet unchanged
    assert tokens[first_sep + 1] == "obama" and tokens[-1] == "[SEP]"
    assert len(tokens) == 40  # the context filled the row up to max_length and was cut there
    types = with_context["token_type_ids"][0].tolist()
    assert types[: first_sep + 1] == [0] * (first_sep + 1) and set(types[first_sep + 1 :]) == {1}
    labels = with_context["labels"][0].tolist()
    assert labels[: first_sep + 1] == plain["labels"][0].tolist() and set(labels[first_sep + 1 :]) == {-100}
    assert set(with_context["prediction_word_index"][0].tolist()[first_sep + 1 :]) == {-1}
    # the predictions are read back to the same words
    assert processor.post_process_token_classification(with_context["labels"].clamp(min=0), with_context) == [TAGS]


def test_no_context_and_empty_context_encode_as_before(tokenizer):
    processor = make_processor(tokenizer, max_length=40)
    plain = processor([WORDS, WORDS])
    for context in (None, [None, ""], ["", "   "]):
        again = processor([WORDS, WORDS], context=context)
        assert torch.equal(again["input_ids"], plain["input_ids"])
        assert torch.equal(again["token_type_ids"], plain["token_type_ids"])


def test_every_window_of_a_long_tweet_keeps_the_context_and_no_word_is_dropped(tokenizer):
    processor = make_processor(tokenizer, max_length=24, stride=2)
    words = ("a b c d e f g h i j k l m n o p q r s t u v w x y z " * 2).split()
    tags = ["O"] * len(words)
    tags[3] = "B-PER"
    encoding = processor(words, labels=tags, context="obama london paris", return_mapping=True)
    assert encoding["input_ids"].shape[0] > 1
    for row in range(encoding["input_ids"].shape[0]):
        tokens = tokenizer.convert_ids_to_tokens(encoding["input_ids"][row])
        assert "obama" in tokens, tokens  # each window holds (the start of) the context
        assert int(encoding["attention_mask"][row].sum()) <= 24
    predicted = sorted(
        word for row in encoding["prediction_word_index"].tolist() for word in row if word >= 0
    )
    assert predicted == list(range(len(words)))  # every word predicted exactly once
    assert processor.post_process_token_classification(encoding["labels"].clamp(min=0), encoding) == [tags]


@pytest.mark.parametrize("overflow", ["truncate", "window"])
def test_a_tweet_that_fills_a_row_alone_loses_no_word_to_its_context(tokenizer, overflow):
    """The pair's separators cost 1-2 tokens: a tweet that fits one row alone but not beside them is encoded
    without its context (no word dropped, no extra window); a longer one in truncate mode too."""
    processor = make_processor(tokenizer, max_length=24, overflow=overflow)
    words = "a b c d e f g h i j k l m n o p q r s t u v w x y z".split()
    fits = max(n for n in range(1, len(words)) if processor(words[:n], return_mapping=True)["input_ids"].shape[0] == 1
               and processor(words[:n], return_mapping=True).mapping["num_dropped_words"] == [0])
    plain = processor(words[:fits], return_mapping=True)
    with_context = processor(words[:fits], context="obama london", return_mapping=True)
    assert with_context["input_ids"].tolist() == plain["input_ids"].tolist()
    assert with_context.mapping["num_dropped_words"] == [0]
    # one word fewer leaves room for the separators: the context is kept (cut to what fits)
    shorter = processor(words[: fits - 3], context="obama london", return_mapping=True)
    assert shorter["input_ids"].shape[0] == 1 and "obama" in tokenizer.convert_ids_to_tokens(shorter["input_ids"][0])
    if overflow == "truncate":  # too long for a row anyway: the same words are kept as without context
        long_plain = processor(words, return_mapping=True)
        long_context = processor(words, context="obama london", return_mapping=True)
        assert long_context.mapping["num_dropped_words"] == long_plain.mapping["num_dropped_words"]


def test_context_in_cloze_mode_and_a_batch_with_and_without(tokenizer):
    processor = make_processor(tokenizer, max_length=40, prompt_mode="cloze")
    encoding = processor([WORDS, WORDS], labels=[TAGS, TAGS], context=["obama london", None], return_mapping=True)
    samples = encoding.mapping["sample_mapping"]
    for row, sample in enumerate(samples):
        tokens = tokenizer.convert_ids_to_tokens(encoding["input_ids"][row])
        assert ("obama" in tokens) == (sample == 0)
    assert processor.post_process_token_classification(encoding["labels"].clamp(min=0), encoding) == [TAGS, TAGS]


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
def test_context_with_other_tokenizer_families(family):
    from processing_pmner.image_processing_pmner import PMNERImageProcessor
    from processing_pmner.processing_pmner import PMNERProcessor

    tokenizer = build_tokenizer(family)
    processor = PMNERProcessor(PMNERImageProcessor(frr_weights="random:0"), tokenizer, max_length=30)
    plain = processor(WORDS, labels=TAGS)
    encoding = processor(WORDS, labels=TAGS, context="obama visits london and paris festival " * 4)
    length = int(plain["attention_mask"][0].sum())
    assert encoding["input_ids"].shape[1] <= 30 and encoding["input_ids"].shape[1] > length
    assert encoding["labels"][0, :length].tolist() == plain["labels"][0, :length].tolist()
    assert set(encoding["labels"][0, length:].tolist()) == {-100}


def test_context_column_of_a_dataset_is_taken_as_is(tokenizer):
    processor = make_processor(tokenizer, max_length=40)
    column = datasets.Dataset.from_dict({"context": ["obama london", None]})["context"]
    from_column = processor([WORDS, WORDS], context=column)
    from_list = processor([WORDS, WORDS], context=["obama london", None])
    assert torch.equal(from_column["input_ids"], from_list["input_ids"])


def test_bad_context_arguments_are_refused(tokenizer):
    processor = make_processor(tokenizer)
    with pytest.raises(ValueError, match="context has 1 entries for 2 sentences"):
        processor([WORDS, WORDS], context=["x"])
    with pytest.raises(ValueError, match="context of sentence 1 is a int"):
        processor([WORDS, WORDS], context=["x", 3])
    with pytest.raises(ValueError, match="context must be a string"):
        processor([WORDS, WORDS], context="one string for a batch")


# ----------------------------------------------------------------------------------------------------------------------
# retrieval
# ----------------------------------------------------------------------------------------------------------------------


def test_render_marks_gold_entities():
    assert render_with_entities(["Kawhi", "Leonard", "wins", "MVP"], ["B-PER", "I-PER", "O", "B-MISC"]) == (
        "Kawhi Leonard (person) wins MVP (miscellaneous)"
    )
    assert render_with_entities(["New", "York", "Knicks"], ["B-LOC", "B-ORG", "I-ORG"]) == (
        "New (location) York Knicks (organization)"
    )
    assert render_with_entities(["a", "b", "c"], ["S-PER", "B-LOC", "E-LOC"]) == "a (person) b c (location)"
    assert render_with_entities(["x", "y"], ["I-ORG", "I-ORG"]) == "x y (organization)"  # an entity opened by I-


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    folder = write_tiny_masked_lm(tmp_path_factory.mktemp("encoder") / "tiny-bert")
    return SentenceEncoder.from_pretrained(folder)


def corpus(size=60, seed=0):
    """Tweets with many exact (and case-only) duplicates, as real Twitter data has retweets."""
    rng = random.Random(seed)
    people, places = ["trump", "obama", "kawhi"], ["london", "paris", "york"]
    tweets = []
    for _ in range(size):
        words = [rng.choice(people), "visits", rng.choice(places)]
        if rng.random() < 0.3:
            words = [word.upper() for word in words]
        tweets.append((words, ["B-PER", "O", "B-LOC"]))
    return tweets


def test_search_never_returns_the_query_itself_or_its_text(encoder):
    train = corpus()
    index = RetrievalIndex.build(encoder, [w for w, _ in train], [t for _, t in train], k=3)
    embeddings = index.embeddings
    keys = [text_key(words) for words, _ in train]
    assert len(set(keys)) < len(keys) - 10  # the fixture has identical texts (also up to case)
    neighbours = index.search(embeddings, keys, own_rows=list(range(len(train))))
    for row, found in enumerate(neighbours):
        assert row not in found
        assert all(keys[other] != keys[row] for other in found), (row, found)
        assert len(found) == len(set(found)) <= 3
    # a query with text from outside the index, and one whose text is in it
    queries = [["trump", "visits", "london"], ["Someone", "new"]]
    found = index.search(encoder.encode([" ".join(q) for q in queries]), [text_key(q) for q in queries])
    assert all(keys[other] != "trump visits london" for other in found[0]) and len(found[1]) == 3


def test_fewer_neighbours_than_k_when_the_index_is_small(encoder):
    train = [(["a", "b"], ["O", "O"]), (["A", "B"], ["O", "O"]), (["c"], ["O"])]
    index = RetrievalIndex.build(encoder, [w for w, _ in train], [t for _, t in train], k=5)
    found = index.search(index.embeddings, [text_key(w) for w, _ in train], [0, 1, 2])
    assert found[0] == [2] and found[1] == [2] and sorted(found[2]) == [0, 1]


def test_faiss_backend_finds_the_same_neighbours(encoder):
    pytest.importorskip("faiss")
    train = corpus(80, seed=1)
    exact = RetrievalIndex.build(encoder, [w for w, _ in train], [t for _, t in train], k=3)
    flat = RetrievalIndex(encoder, exact.embeddings, exact.texts, exact.keys, k=3, backend="faiss")
    keys = [text_key(w) for w, _ in train]
    own = list(range(len(train)))
    for row, (a, b) in enumerate(zip(exact.search(exact.embeddings, keys, own), flat.search(exact.embeddings, keys, own))):
        assert len(a) == len(b) == 3 and row not in b and all(keys[other] != keys[row] for other in b)
        scores = exact.embeddings[row] @ exact.embeddings.T  # ties (identical embeddings) may come in any order
        assert torch.allclose(scores[a], scores[b], atol=1e-5), (row, a, b)


def test_index_saves_and_loads_back_to_the_same_contexts(encoder, tmp_path):
    train = corpus(30, seed=2)
    index = RetrievalIndex.build(encoder, [w for w, _ in train], [t for _, t in train], k=2)
    written = index.save_pretrained(tmp_path / "model")
    assert "retrieval_encoder/model.safetensors" in written and "retrieval_index.safetensors" in written
    loaded = RetrievalIndex.from_pretrained(str(tmp_path / "model"))
    queries = [["obama", "visits", "york", "today"], ["kawhi", "in", "paris"]]
    assert loaded.contexts(queries) == index.contexts(queries)
    assert " ; " in loaded.contexts(queries)[0] and "(person)" in loaded.contexts(queries)[0]
    # altered embeddings are refused, naming the file
    from safetensors.torch import save_file

    save_file({"embeddings": index.embeddings * 2}, str(tmp_path / "model" / "retrieval_index.safetensors"))
    with pytest.raises(ValueError, match="retrieval_index.safetensors does not match"):
        RetrievalIndex.from_pretrained(str(tmp_path / "model"))
    with pytest.raises(OSError, match="has no retrieval index"):
        RetrievalIndex.from_pretrained(str(tmp_path))


def test_dataset_contexts_come_from_training_tweets_only_never_the_tweet_itself(encoder, tmp_path):
    from training_pmner.context import add_retrieved_context, build_training_index

    train = corpus(40, seed=3)
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    features = datasets.Features(
        {"tokens": datasets.List(datasets.Value("string")), "ner_tags": datasets.List(datasets.ClassLabel(names=names))}
    )

    def split(rows):
        return datasets.Dataset.from_dict(
            {"tokens": [w for w, _ in rows], "ner_tags": [[names.index(t) for t in tags] for _, tags in rows]},
            features=features,
        )

    # validation and test tweets: some with the text of training tweets, some with words no training tweet has
    other = [(["kawhi", "visits", "london"], ["B-PER", "O", "B-LOC"]), (["zzz", "qqq"], ["O", "O"]),
             ([word.upper() for word in train[0][0]], train[0][1])]  # a training tweet's text in capitals
    raw = datasets.DatasetDict({"train": split(train), "validation": split(other), "test": split(other[::-1])})
    index = build_training_index(raw, encoder, 3, "cpu")
    add_retrieved_context(raw, index, "cpu", trained_here=True)
    keys_of = {}  # rendered training tweet -> the text keys (casefolded words) of the training tweets it renders
    for w, t in train:
        keys_of.setdefault(render_with_entities(w, t), set()).add(text_key(w))
    for name in raw:
        for row in raw[name]:
            parts = row["context"].split(" ; ")
            assert 1 <= len(parts) <= 3 and all(part in keys_of for part in parts), (name, row)  # training tweets
            own = text_key(row["tokens"])
            assert all(own not in keys_of[part] for part in parts), (name, row)  # never its own text, in any case
    # the embedding and context columns are cached under a fingerprint: the same call gives the same column
    again = datasets.DatasetDict({"train": split(train), "validation": split(other), "test": split(other[::-1])})
    add_retrieved_context(again, index, "cpu", trained_here=True)
    assert again["validation"]["context"] == raw["validation"]["context"]


# ----------------------------------------------------------------------------------------------------------------------
# context from a file (PGIM-style text made elsewhere)
# ----------------------------------------------------------------------------------------------------------------------


def test_builder_reads_context_from_jsonl_and_parquet(tmp_path):
    write_twitter_fixture(tmp_path / "data", sizes=(6, 3, 3))
    rows = [
        {"id": "twitter2017-train-0", "context": "Knowledge: trump is a politician."},
        {"image_id": "valid_1", "context": "A photo of a stadium."},
        {"id": "twitter2017-test-2", "context": None},
    ]
    (tmp_path / "ctx.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": r.get("id"), "image_id": r.get("image_id"), "context": r["context"]}
                                         for r in rows]), tmp_path / "ctx.parquet")
    for name in ("ctx.jsonl", "ctx.parquet"):
        data = load_twitter_mner("twitter2017", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"),
                                 context_file=str(tmp_path / name))
        assert data["train"]["context"][:2] == ["Knowledge: trump is a politician.", None]
        assert data["validation"]["context"] == [None, "A photo of a stadium.", None]
        assert data["test"]["context"] == [None, None, None]
    plain = load_twitter_mner("twitter2017", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert "context" not in plain["train"].column_names
    # a changed file is a new dataset, not the cached one
    (tmp_path / "ctx.jsonl").write_text(json.dumps({"id": "twitter2017-train-0", "context": "changed"}) + "\n")
    data = load_twitter_mner("twitter2017", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"),
                             context_file=str(tmp_path / "ctx.jsonl"))
    assert data["train"]["context"][0] == "changed"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"id": "a", "context": "x"}', "{not json"], r"ctx.jsonl:2: invalid JSON"),
        (['{"id": "a"}'], r"line 1: no 'context' field"),
        (['{"context": "x"}'], r"line 1: needs 'id' or 'image_id'"),
        (['{"id": "a", "context": 3}'], r"line 1: 'context' must be a string or null"),
        (['{"id": "a", "context": "x"}', '{"id": "a", "context": "y"}'], r"line 2: id 'a' already has a context \(line 1\)"),
    ],
)
def test_bad_context_files_name_the_file_and_line(tmp_path, lines, message):
    path = tmp_path / "ctx.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ContextFileError, match=message):
        read_context_file(str(path))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        read_context_file(str(tmp_path / "missing.jsonl"))
