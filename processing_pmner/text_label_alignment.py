"""Word tags to ids, and the alignment of one tokenised row: which sentence word each token belongs to, which word is
predicted where, and the label of each token (the tag of the word predicted there, -100 elsewhere).

Copied flat into saved processor folders (remote code) with `processing_pmner.py`: imports its siblings only
relatively.
"""

import numpy as np
import torch

from .text_tag_schemes import convert_tags


def tag_ids(tags, num_words: int, sentence: int, label_names: list[str], tag_scheme: str) -> list[int]:
    """Ids in `label_names` of one sentence's tags (strings in BIO or BIOES, converted to `tag_scheme`, or ids)."""
    if isinstance(tags, (torch.Tensor, np.ndarray)):
        tags = tags.tolist()
    tags = list(tags)
    if len(tags) != num_words:
        raise ValueError(f"sentence {sentence} has {num_words} words but {len(tags)} labels")
    if all(isinstance(tag, (int, np.integer)) and not isinstance(tag, bool) for tag in tags):
        for tag in tags:
            if not 0 <= tag < len(label_names):
                raise ValueError(
                    f"sentence {sentence}: label id {tag} is not an id of label_names ({len(label_names)} tags)"
                )
        return [int(tag) for tag in tags]
    if not all(isinstance(tag, str) for tag in tags):
        raise ValueError(f"sentence {sentence}: labels must be all tag strings or all ids, got {tags}")
    try:
        converted = convert_tags(tags, tag_scheme)
    except ValueError as error:
        raise ValueError(f"sentence {sentence}: {error}") from error
    label2id = {name: index for index, name in enumerate(label_names)}
    unknown = sorted({(tag, new) for tag, new in zip(tags, converted) if new not in label2id})
    if unknown:
        described = [tag if tag == new else f"{tag} (as {new} in {tag_scheme})" for tag, new in unknown]
        raise ValueError(f"sentence {sentence}: tags {described} are not in label_names {label_names}")
    return [label2id[tag] for tag in converted]


def align_row(token_words: list, sequence_ids: list, roles: list, predicted_at: dict, tags: list[int] | None):
    """`(word_ids, prediction_word_index, labels)` of one row, one entry per token.

    `token_words` and `sequence_ids` are the tokenizer's per token (row word index, 0 for the prompt-wrapped
    sentence, 1 for the context); `roles` the role of each row word; `predicted_at` maps a role to the sentence word
    predicted at its first sub-word. `labels` is `None` without `tags`."""
    word_ids, prediction, labels = [], [], []
    previous = None
    for token_word, sequence in zip(token_words, sequence_ids):
        role = roles[token_word] if token_word is not None and sequence == 0 else None  # context: no role
        first = token_word is not None and token_word != previous
        previous = token_word
        word_ids.append(role if isinstance(role, int) else None)
        predicted = predicted_at.get(role, -1) if first else -1
        prediction.append(predicted)
        if tags is not None:
            labels.append(tags[predicted] if predicted >= 0 else -100)
    return word_ids, prediction, labels if tags is not None else None


__all__ = ["align_row", "tag_ids"]
