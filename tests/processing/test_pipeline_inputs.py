"""What the `multimodal-ner` pipeline takes, as transformers' pipelines do: lists, tuples, generators, `datasets`
datasets (streaming ones too, without `len`), `KeyDataset`, torch datasets; batched, results in input order. Anything
else is a `TypeError` naming the item's type and position."""

import json

import pytest
import torch


# tweets of different lengths: batching by length reorders them inside a window
TEXTS = [
    "trump visits london today with the nba champions",
    "hello",
    "",
    "kawhi leonard wins the fan vote",
    "london",
    "a b c d e f g h i j k l",
    "rt @ nba : # london",
]


class MapStyle(torch.utils.data.Dataset):
    """A map-style torch dataset: `__len__` and `__getitem__`, no `__iter__`."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


class Streamed(torch.utils.data.IterableDataset):
    """A torch iterable dataset: `__iter__` only."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def test_every_kind_of_iterable_gives_the_results_in_input_order(random_pipe, tmp_path):
    import datasets
    from transformers.pipelines.pt_utils import KeyDataset

    table = datasets.Dataset.from_dict({"text": TEXTS})
    rows = tmp_path / "tweets.jsonl"
    rows.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    # a streaming split read from files, as load_dataset(..., streaming=True) gives: no len
    streaming = datasets.load_dataset("json", data_files=str(rows), split="train", streaming=True)
    assert isinstance(streaming, datasets.IterableDataset)
    with pytest.raises(TypeError):
        len(streaming)
    sources = {
        "tuple": lambda: tuple(TEXTS),
        "generator": lambda: (text for text in TEXTS),
        "map": lambda: map(str, TEXTS),
        "Dataset": lambda: table,
        "KeyDataset": lambda: KeyDataset(table, "text"),
        "IterableDataset (files)": lambda: streaming,
        "IterableDataset (in memory)": lambda: table.to_iterable_dataset(num_shards=2),
        "torch map-style Dataset": lambda: MapStyle(list(TEXTS)),
        "torch IterableDataset": lambda: Streamed(list(TEXTS)),
    }
    single = [random_pipe(text, return_words=True) for text in TEXTS]
    for batch_size in (1, 3):
        expected = random_pipe(list(TEXTS), batch_size=batch_size, return_words=True)
        # in input order: each result is its own tweet's
        assert [result["text"] for result in expected] == TEXTS
        assert [[word["tag"] for word in result["words"]] for result in expected] == [
            [word["tag"] for word in result["words"]] for result in single
        ]
        for name, source in sources.items():
            results = random_pipe(source(), batch_size=batch_size, return_words=True)
            if name == "tuple":
                assert isinstance(results, list)
            else:
                assert not isinstance(results, list), f"{name}: results come as they are computed"
            assert list(results) == expected, f"{name}, batch_size={batch_size}"


def test_dataset_rows_of_words_and_key_datasets_of_words(random_pipe):
    import datasets
    from transformers.pipelines.pt_utils import KeyDataset

    words = [["trump", "visits", "london"], ["hello"], []]
    expected = [random_pipe({"words": tweet}) for tweet in words]
    table = datasets.Dataset.from_dict({"tokens": words, "ner_tags": [[0, 0, 0], [0], []]})
    with pytest.warns(UserWarning, match="keys \\['ner_tags'\\] of tweet 0 are not inputs"):
        assert list(random_pipe(table.to_iterable_dataset(), batch_size=2)) == expected
    assert list(random_pipe(KeyDataset(table, "tokens"), is_split_into_words=True, batch_size=2)) == expected


def test_a_stream_is_read_one_window_at_a_time(random_pipe):
    from processing_pmner.pipeline_pmner import BUCKET_BATCHES

    pulled = []

    def tweets():
        for index in range(3 * BUCKET_BATCHES):
            pulled.append(index)
            yield "trump visits london" if index % 2 else "hello"

    results = random_pipe(tweets(), batch_size=1)
    first = next(iter(results))
    assert first == random_pipe("hello")
    assert len(pulled) <= BUCKET_BATCHES + 1  # one window read ahead, not the whole stream
    assert len(list(results)) == 3 * BUCKET_BATCHES - 1


def test_bad_inputs_are_type_errors_naming_the_type_and_position(random_pipe):
    with pytest.raises(TypeError, match="the pipeline input is a int; expected a str"):
        random_pipe(5)
    with pytest.raises(TypeError, match="the pipeline input is a bytes"):
        random_pipe(b"trump visits london")
    with pytest.raises(TypeError, match="the pipeline input is a NoneType"):
        random_pipe(None)
    with pytest.raises(TypeError, match="tweet 1 is a int; expected a str \\(a tweet\\), a dict with 'text'"):
        random_pipe(["a", 5])
    with pytest.raises(TypeError, match="tweet 4 is a float"):  # numbered in the whole stream, past the first batch
        list(random_pipe((item for item in ["a", "b", "c", "d", 4.5]), batch_size=2))
    with pytest.raises(TypeError, match="tweet 1 is a set"):
        random_pipe(["a", {"b"}], image=[None, None])
    with pytest.raises(TypeError, match="tweet 1 is a int"):
        random_pipe(["a", 7], context=[None, "some context"])
    with pytest.raises(ValueError, match="tweet 1 is a int"):  # the TypeError is a ValueError too, for callers catching that
        random_pipe(["a", 7])
    # words without is_split_into_words stay a ValueError saying what to pass
    with pytest.raises(ValueError, match="is_split_into_words=True"):
        random_pipe([["a", "b"]])
    # a stream cannot take per-tweet images or contexts
    with pytest.raises(ValueError, match="not with a dataset or generator"):
        random_pipe(iter(["a"]), image=[None])
