"""Entity grounding of P-MNER: which FRR object (detected box) each predicted entity attends to most.

P-MNER has no grounding supervision: nothing in training tells a word which object it names. TCFM's text-to-object
attention (V' = MH(T, V) of eq. 8, `text_to_object_attentions`, one softmax over the image's objects per text token
and head) is what the fused features actually read from each object, so the grounding reported here is a reading of
that attention, not a trained prediction:

- a word's attention over the objects is the head mean of `text_to_object_attentions` at the sub-word that predicts
  the word's tag (its first sub-word, in the window that owns it), so it sums to 1 over the image's objects;
- an entity's attention is the mean of its words' attentions (every word counts equally);
- the entity is grounded to the object with the highest attention, with that attention as `weight`, unless the image
  has no object (no image, an unreadable one, a text-only or T+V-concat model: no attention) or the weight is not
  clearly above uniform attention: with n objects, uniform attention gives each 1/n, and the entity is grounded only
  when `weight >= (1 + threshold) / n` (then `None`). The bar is relative because the top weight of a softmax over n
  objects is never below 1/n: with 2 or 3 objects any fixed bar under 1/2 or 1/3 would ground every entity, and an
  image with a single object (for example only the whole-image filler, when the detector found nothing) has
  attention 1 on it whatever the text says, so it grounds nothing unless `threshold` is 0.

This file is copied flat into saved model folders with the pipeline (remote code): it imports only torch, numpy
and the standard library.
"""

import math

import numpy as np
import torch


# How far above uniform (1/n over n objects) the top weight must be: 0.25 asks for 25 % more than uniform (5
# objects: 0.25, 3: 0.417, 2: 0.625; 1: never). 0 grounds every entity of an image with objects.
DEFAULT_GROUNDING_THRESHOLD = 0.25


def check_grounding_threshold(value, name: str = "grounding_threshold") -> float:
    """`value` as a float, or `ValueError` naming `name` when it is not a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be a number >= 0 (how far above uniform attention, 1/n over n objects, the chosen object's "
            f"weight must be: grounded when weight >= (1 + {name}) / n), got {value!r}"
        )
    return float(value)


def required_weight(threshold: float, num_objects: int) -> float:
    """The lowest weight that grounds an entity in an image with `num_objects` objects."""
    return (1.0 + threshold) / num_objects


def head_mean(text_to_object: torch.Tensor) -> np.ndarray:
    """`text_to_object_attentions` (rows, heads, length, objects) averaged over heads: (rows, length, objects)."""
    if text_to_object.dim() != 4:
        raise ValueError(
            f"text_to_object_attentions has shape {tuple(text_to_object.shape)}; expected (rows, heads, length, objects)"
        )
    return text_to_object.float().mean(1).cpu().numpy()


def word_attentions(attention: np.ndarray, mapping: dict, num_words: list[int]) -> list[np.ndarray]:
    """Per tweet, its words' attention over the objects (words, objects), read where each word's tag is predicted.

    Args:
        attention: (rows, length, objects), e.g. `head_mean(...)`.
        mapping: the processor's `mapping` (`prediction_word_index` (rows, length), `sample_mapping` (rows,)).
        num_words: word count of each tweet of the batch.
    """
    positions = np.asarray(mapping["prediction_word_index"], dtype=np.int64)  # (rows, length)
    samples = [int(sample) for sample in mapping["sample_mapping"]]  # (rows,)
    if positions.shape[0] != attention.shape[0] or positions.shape[1] > attention.shape[1]:
        raise ValueError(
            f"attention of {tuple(attention.shape[:2])} (rows, length) for a batch of {tuple(positions.shape)}"
        )
    result = [np.zeros((count, attention.shape[2]), dtype=np.float32) for count in num_words]
    rows, columns = np.nonzero(positions >= 0)
    for row, column in zip(rows.tolist(), columns.tolist()):
        result[samples[row]][positions[row, column]] = attention[row, column]
    return result


def entity_words(entity: dict, spans: list[tuple[int, int]]) -> list[int]:
    """Indices of the words inside an entity's character span `[start, end)`."""
    return [index for index, (start, end) in enumerate(spans) if start >= entity["start"] and end <= entity["end"]]


def ground_entity(
    words: list[int],
    attention: np.ndarray,
    object_mask,
    objects: list[dict | None] | None = None,
    threshold: float = DEFAULT_GROUNDING_THRESHOLD,
) -> dict | None:
    """The object an entity attends to most, or `None`.

    Args:
        words: the entity's word indices.
        attention: the tweet's word attentions (words, objects).
        object_mask: (objects,) true for the slots holding an object.
        objects: per slot, `{"box", "label", "score"}` (box x1, y1, x2, y2 in the original image's pixels) or `None`
            where unknown (precomputed features given without boxes).
        threshold: an entity is grounded when its highest attention is at least `(1 + threshold) / n`, n the
            objects present (`required_weight`).

    Returns:
        `{"slot", "box", "label", "score", "weight"}` or `None` (no object, no word, or weight below the bar).
    """
    mask = np.asarray(object_mask, dtype=bool)[: attention.shape[1]] if attention.ndim == 2 else np.zeros(0, bool)
    if not words or not mask.any():
        return None
    weights = attention[words].mean(0)[: len(mask)]  # (objects,): mean over the entity's words
    weights = np.where(mask, weights, -np.inf)
    slot = int(np.argmax(weights))
    weight = float(weights[slot])
    # a float32 softmax can fall a hair under exactly uniform (threshold 0): a tolerance of 1e-6
    if not math.isfinite(weight) or weight < required_weight(threshold, int(mask.sum())) - 1e-6:
        return None
    found = objects[slot] if objects is not None and slot < len(objects) and objects[slot] is not None else {}
    return {
        "slot": slot,
        "box": found.get("box"),
        "label": found.get("label"),
        "score": found.get("score"),
        "weight": weight,
    }


def slot_objects(boxes, labels, scores, mask, label_name) -> list[dict | None]:
    """Per slot, `{"box": [x1, y1, x2, y2], "label", "score"}` (rounded to 0.1 pixel; `score` `None` for the
    whole-image filler, which has none) or `None` for an empty slot; `label_name` maps a label index to its name
    (labels given as names are kept)."""
    objects = []
    boxes = torch.as_tensor(boxes, dtype=torch.float32).tolist()
    if labels is None:
        labels = [None] * len(boxes)
    elif not (isinstance(labels, (list, tuple)) and any(isinstance(label, str) for label in labels)):
        labels = torch.as_tensor(labels).tolist()  # indices; names (str) are kept as given
    scores = torch.as_tensor(scores, dtype=torch.float32).tolist() if scores is not None else [None] * len(boxes)
    for box, label, score, present in zip(boxes, labels, scores, torch.as_tensor(mask).bool().tolist()):
        if not present:
            objects.append(None)
            continue
        objects.append(
            {
                "box": [round(float(value), 1) for value in box],
                "label": label if label is None or isinstance(label, str) else label_name(int(label)),
                "score": None if score is None or not math.isfinite(score) else round(float(score), 4),
            }
        )
    return objects


def item_objects(item: dict, image_processor) -> list[dict | None] | None:
    """Per object slot of a pipeline tweet, its `{"box", "label", "score"}` (or `None`), when known (see
    `slot_objects`); labels named by `image_processor`."""
    if item.get("objects") is None or item.get("object_mask") is None:
        return None
    boxes, labels, scores = item["objects"]

    def label_name(label):
        return image_processor.label_name(label) if hasattr(image_processor, "label_name") else str(label)

    return slot_objects(boxes, labels, scores, item["object_mask"], label_name)


def add_grounding(
    entities: list[dict],
    spans: list[tuple[int, int]],
    attention: np.ndarray | None,
    object_mask,
    objects: list[dict | None] | None,
    threshold: float = DEFAULT_GROUNDING_THRESHOLD,
) -> list[dict]:
    """Sets `entity["grounding"]` on each entity (see `ground_entity`); `attention` `None` (no object attention:
    text-only model, T+V concatenation) grounds nothing."""
    for entity in entities:
        if attention is None or object_mask is None:
            entity["grounding"] = None
        else:
            entity["grounding"] = ground_entity(entity_words(entity, spans), attention, object_mask, objects, threshold)
    return entities


__all__ = [
    "DEFAULT_GROUNDING_THRESHOLD",
    "add_grounding",
    "check_grounding_threshold",
    "entity_words",
    "ground_entity",
    "head_mean",
    "item_objects",
    "required_weight",
    "slot_objects",
    "word_attentions",
]
