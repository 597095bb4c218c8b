"""The mapping from a P-MNER batch's rows and positions back to its sentences and words: as columns (to keep it
through `datasets.map`), read back from a batch or from those columns, and used to merge row predictions into one
value per word.

Copied flat into saved processor folders (remote code) with `processing_pmner.py`: imports nothing of this project.
"""

import numpy as np
import torch


def _as_list(values) -> list:
    if isinstance(values, (torch.Tensor, np.ndarray)):
        return values.tolist()
    return list(values)


def mapping_columns(mapping: dict, as_tensors: bool) -> dict:
    """`sample_mapping`, `word_ids` (-1 outside the sentence), `prediction_word_index` and `num_words` per row, as
    tensors or (unpadded rows, of their own lengths) as lists."""
    columns = {
        "sample_mapping": list(mapping["sample_mapping"]),  # (rows,)
        "word_ids": [[-1 if word is None else word for word in ids] for ids in mapping["word_ids"]],  # (rows, L)
        "prediction_word_index": [list(ids) for ids in mapping["prediction_word_index"]],  # (rows, L)
        "num_words": [mapping["num_words"][sample] for sample in mapping["sample_mapping"]],  # (rows,)
    }
    if not as_tensors:
        return columns
    return {key: torch.tensor(value, dtype=torch.long) for key, value in columns.items()}


def mapping_of(batch) -> dict:
    """The mapping of a batch: its `mapping`, or one read from the columns of `return_mapping=True`."""
    mapping = getattr(batch, "mapping", None)
    if mapping:
        return mapping
    keys = ("sample_mapping", "prediction_word_index", "num_words")
    if isinstance(batch, dict) and all(key in batch for key in keys):
        # lists, arrays, tensors or datasets columns
        samples = [int(sample) for sample in _as_list(batch["sample_mapping"])]
        num_words = [int(count) for count in _as_list(batch["num_words"])]
        per_sentence = {}
        for sample, count in zip(samples, num_words):
            per_sentence[sample] = count
        total = max(per_sentence) + 1 if per_sentence else 0
        return {
            "sample_mapping": samples,
            "prediction_word_index": [
                [int(word) for word in _as_list(row)] for row in _as_list(batch["prediction_word_index"])
            ],
            "num_words": [per_sentence.get(index, 0) for index in range(total)],
        }
    raise ValueError(
        "cannot map predictions back to words: pass the PMNERBatchFeature returned by the processor, or a dict "
        "with sample_mapping, prediction_word_index and num_words (return_mapping=True)"
    )


def merge_rows(predictions, mapping: dict, fill=None) -> list[list]:
    """Per sentence, per word, the row value (`predictions`: rows, length, ...) at the position that predicts it;
    `fill` for words without one."""
    if isinstance(predictions, torch.Tensor):
        predictions = predictions.detach().cpu().numpy()
    predictions = np.asarray(predictions)
    positions = mapping["prediction_word_index"]
    if predictions.shape[0] != len(positions):
        raise ValueError(f"predictions have {predictions.shape[0]} rows; the batch has {len(positions)}")
    merged = [[fill] * count for count in mapping["num_words"]]
    for row, (sample, row_positions) in enumerate(zip(mapping["sample_mapping"], positions)):
        if predictions.shape[1] < len(row_positions):
            raise ValueError(
                f"predictions have length {predictions.shape[1]}; the batch rows have {len(row_positions)}"
            )
        for position, word in enumerate(row_positions):
            if word >= 0:
                merged[sample][word] = predictions[row, position]
    return merged


__all__ = ["mapping_columns", "mapping_of", "merge_rows"]
