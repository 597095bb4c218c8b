"""Each word's tag probabilities, read from the model's rows: the `multimodal-ner` pipeline predicts one tag per word,
at the one row position the processor's mapping names for it (long tweets span several window rows).

This file is copied flat into saved model folders with the pipeline (remote code): it imports only torch and numpy.
"""

import numpy as np
import torch


def word_scores(probabilities: torch.Tensor, mapping: dict, items: list[dict], num_labels: int) -> list[np.ndarray]:
    """Per tweet, its words' tag probabilities (words, labels), each read at the one row position that predicts the
    word, gathered at once for the whole batch.

    Args:
        probabilities: (rows, length, labels), the batch's tag probabilities.
        mapping: the processor's `prediction_word_index` (rows, length), `sample_mapping` (rows,) and `num_words`
            (tweets,).
        items: the batch's normalised tweets (their `index` names a tweet in errors).
        num_labels: the model's labels.
    """
    positions = torch.as_tensor(mapping["prediction_word_index"], dtype=torch.long)  # (rows, length)
    if positions.shape[0] != probabilities.shape[0] or positions.shape[1] > probabilities.shape[1]:
        raise RuntimeError(
            f"the model gave {tuple(probabilities.shape[:2])} (rows, length) for a batch of {tuple(positions.shape)}"
        )
    rows, columns = torch.nonzero(positions >= 0, as_tuple=True)  # (predictions,) each
    samples = torch.as_tensor(mapping["sample_mapping"], dtype=torch.long)[rows]  # (predictions,)
    words = positions[rows, columns]  # (predictions,)
    counts = torch.as_tensor(mapping["num_words"], dtype=torch.long)  # (tweets,)
    starts = torch.cumsum(counts, 0) - counts  # (tweets,): first word's slot in the flat (all words) order
    slots = starts[samples] + words  # (predictions,)
    total = int(counts.sum())
    found = torch.bincount(slots, minlength=total) if len(slots) else torch.zeros(total, dtype=torch.long)
    flat = np.zeros((total, num_labels), dtype=np.float32)  # (all words, labels)
    flat[slots.numpy()] = probabilities[rows, columns].float().cpu().numpy()
    bad = torch.nonzero(found != 1).flatten()
    if len(bad):
        tweet = int(torch.searchsorted(starts, bad[0], right=True)) - 1
        wrong = (bad[(bad >= starts[tweet]) & (bad < starts[tweet] + counts[tweet])] - starts[tweet]).tolist()
        raise RuntimeError(
            f"tweet {items[tweet]['index']}: words {wrong[:10]} got {int(found[bad[0]])} predictions from the "
            "processor's rows (expected exactly one)"
        )
    return np.split(flat, starts[1:].numpy()) if len(counts) else []


__all__ = ["word_scores"]
