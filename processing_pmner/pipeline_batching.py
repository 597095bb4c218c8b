"""Length-bucketed batching of the `multimodal-ner` pipeline: tweets are read ahead in windows of
`batch_size * BUCKET_BATCHES`, sorted by length and cut into batches of `batch_size`, so that each batch's rows are
padded little; the results come back in input order and equal those of unsorted batches.

This file is copied flat into saved model folders with the pipeline (remote code): it imports only the standard
library.
"""

from itertools import islice


# batches of tweets read ahead and sorted by length together
BUCKET_BATCHES = 64


class TweetBatch:
    """Normalised tweets (each dict carrying its input `index`) that `PMNERPipeline.preprocess` encodes together."""

    def __init__(self, items: list[dict]):
        self.items = items


def subword_lengths(tokenizer, items: list[dict]) -> list[int]:
    """Sub-words of each tweet (one batched tokenizer call, no special tokens): the sort key that puts tweets of
    similar row length in one batch."""
    filled = [index for index, item in enumerate(items) if item["words"]]
    lengths = [0] * len(items)
    if filled:
        encoded = tokenizer(
            [items[index]["words"] for index in filled], is_split_into_words=True, add_special_tokens=False,
            verbose=False,  # long tweets are windowed: no length warning
        )
        for index, ids in zip(filled, encoded["input_ids"]):
            lengths[index] = len(ids)
    return lengths


def bucketed_results(source, batch_size: int, window_batches: int, normalise, length_keys, run_batch):
    """Yields the results of the tweets of `source`, in its order, computed in batches of tweets of similar length.

    Args:
        source: an iterable of pipeline inputs, read one window (`batch_size * window_batches` tweets) at a time.
        normalise: `normalise(item, index)`, the normalised dict of the input at `index` in the whole source.
        length_keys: `length_keys(items)`, each normalised tweet's sort key.
        run_batch: `run_batch(TweetBatch)`, the list of the batch's results, in its order.
    """
    source = iter(source)
    offset = 0
    while True:
        window = list(islice(source, batch_size * window_batches))
        if not window:
            return
        items = [normalise(item, offset + index) for index, item in enumerate(window)]
        lengths = length_keys(items) if len(items) > 1 else [0]  # one tweet: nothing to sort
        order = sorted(range(len(items)), key=lambda index: lengths[index])  # stable: ties keep the input order
        results = [None] * len(items)
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            for index, result in zip(chosen, run_batch(TweetBatch([items[index] for index in chosen]))):
                results[index] = result
        yield from results
        offset += len(window)


__all__ = ["BUCKET_BATCHES", "TweetBatch", "bucketed_results", "subword_lengths"]
