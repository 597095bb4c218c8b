"""How the `multimodal-ner` pipeline turns word tag probabilities into its outputs: entities (its
`aggregation_strategy`s; see `PMNERPipeline`'s docstring for what each does), the words of `return_words`, and the
entities `ignore_labels` leaves out.

This file is copied flat into saved model folders with the pipeline (remote code): it imports numpy, transformers'
logging and its sibling `processing_pmner.py` (the tag-scheme helpers) relatively.
"""

import numpy as np
from transformers.utils import logging

from .processing_pmner import bio_to_bioes, bioes_to_bio, tag_parts


logger = logging.get_logger(__name__)


AGGREGATION_STRATEGIES = ("none", "simple", "first", "max", "average")


def entity_types(labels: list[str]) -> tuple[list[str], np.ndarray]:
    """Entity types and the (labels, types) 0/1 matrix that sums tag probabilities into type probabilities."""
    types_ = []
    for label in labels:
        entity = tag_parts(label)[1]
        if entity is not None and entity not in types_:
            types_.append(entity)
    matrix = np.zeros((len(labels), len(types_)), dtype=np.float32)
    for row, label in enumerate(labels):
        entity = tag_parts(label)[1]
        if entity is not None:
            matrix[row, types_.index(entity)] = 1.0
    return types_, matrix


def _entity(item: dict, first: int, last: int, entity_type: str, score: float) -> dict:
    start, end = item["spans"][first][0], item["spans"][last][1]
    return {
        "entity_group": entity_type,
        "score": float(score),
        "word": item["text"][start:end],
        "start": int(start),
        "end": int(end),
    }


def aggregate_entities(
    labels: list[str],
    item: dict,
    scores: np.ndarray,
    aggregation_strategy: str,
    types: tuple | None = None,
    keep_outside: bool = False,
) -> list[dict]:
    """Entities of one tweet (`item` with `text` and the words' `spans`) from its word tag probabilities `scores`
    (words, labels); `types`: `entity_types(labels)` when already computed. `keep_outside`: words tagged `O` are
    returned too, as the token-classification pipeline does when `"O"` is not in its `ignore_labels`: each as
    `{"entity": "O", ...}` with `"none"`, else each run of them as one `{"entity_group": "O", ...}` (score: the mean
    of their `O` probabilities)."""
    if aggregation_strategy not in AGGREGATION_STRATEGIES:
        raise ValueError(f"aggregation_strategy must be one of {AGGREGATION_STRATEGIES}, got {aggregation_strategy!r}")
    best = scores.argmax(-1) if len(scores) else np.zeros(0, dtype=int)  # (words,)
    tags = [tag_parts(labels[int(label)]) for label in best]
    tag_scores = [float(scores[index, label]) for index, label in enumerate(best)]
    entities = _entities(labels, item, scores, aggregation_strategy, types, best, tags, tag_scores, keep_outside)
    if keep_outside and aggregation_strategy != "none":
        entities = _with_outside_runs(item, entities, tags, tag_scores)
    return entities


def _with_outside_runs(item: dict, entities: list[dict], tags: list, tag_scores: list[float]) -> list[dict]:
    """`entities` with each run of `O` words added as an `"O"` group, in text order."""
    runs, first = [], None
    for index, (prefix, _) in enumerate(tags + [(None, None)]):  # a sentinel closes the last run
        if prefix == "O" and first is None:
            first = index
        elif prefix != "O" and first is not None:
            runs.append(_entity(item, first, index - 1, "O", np.mean(tag_scores[first:index])))
            first = None
    # entities and O runs cover disjoint words: their starts order them
    return sorted(entities + runs, key=lambda entity: (entity["start"], entity["end"]))


def _entities(labels, item, scores, aggregation_strategy, types, best, tags, tag_scores, keep_outside) -> list[dict]:
    if aggregation_strategy == "none":
        return [
            {
                "entity": labels[int(best[index])],
                "score": tag_scores[index],
                "index": index,
                "word": item["text"][item["spans"][index][0] : item["spans"][index][1]],
                "start": int(item["spans"][index][0]),
                "end": int(item["spans"][index][1]),
            }
            for index, (prefix, _) in enumerate(tags)
            if keep_outside or prefix != "O"
        ]
    entities = []
    if aggregation_strategy == "simple":
        group = None  # [first, last, type, scores]
        for index, (prefix, entity) in enumerate(tags):
            ended = group is not None and tag_parts(labels[int(best[group[1]])])[0] in ("E", "S")
            if prefix != "O" and group is not None and entity == group[2] and prefix in ("I", "E") and not ended:
                group[1] = index
                group[3].append(tag_scores[index])
                continue
            if group is not None:
                entities.append(_entity(item, group[0], group[1], group[2], np.mean(group[3])))
                group = None
            if prefix != "O":
                group = [index, index, entity, [tag_scores[index]]]
        if group is not None:
            entities.append(_entity(item, group[0], group[1], group[2], np.mean(group[3])))
        return entities

    # first / max / average: boundaries from the prefixes, then one type per entity
    types_, matrix = types if types is not None else entity_types(labels)
    type_probabilities = scores @ matrix if len(scores) else np.zeros((0, len(types_)))  # (words, types)
    spans, current = [], None
    for index, (prefix, _) in enumerate(tags):
        if prefix == "O":
            if current is not None:
                spans.append(current)
                current = None
            continue
        previous_ended = current is not None and tags[current[1]][0] in ("E", "S")
        if current is None or prefix in ("B", "S") or previous_ended:
            if current is not None:
                spans.append(current)
            current = [index, index]
        else:
            current[1] = index
    if current is not None:
        spans.append(current)
    for first, last in spans:
        words = range(first, last + 1)
        if aggregation_strategy == "first":
            entity_type = tags[first][1]
            score = type_probabilities[first, types_.index(entity_type)]
        elif aggregation_strategy == "max":
            decider = max(words, key=lambda word: tag_scores[word])
            entity_type = tags[decider][1]
            score = type_probabilities[decider, types_.index(entity_type)]
        else:
            averaged = type_probabilities[first : last + 1].mean(0)  # (types,)
            column = int(averaged.argmax())
            entity_type, score = types_[column], averaged[column]
        entities.append(_entity(item, first, last, entity_type, score))
    return entities


def word_rows(labels: list[str], item: dict, scores: np.ndarray, output_scheme: str) -> list[dict]:
    """Each word of a tweet with its `start`, `end`, best `tag` (in `output_scheme`: `"BIO"`, `"BIOES"` or `"model"`)
    and that tag's `score`, from its word tag probabilities `scores` (words, labels)."""
    best = scores.argmax(-1) if len(scores) else np.zeros(0, dtype=int)  # (words,)
    tags = [labels[int(label)] for label in best]
    if output_scheme == "BIO":
        tags = bioes_to_bio(tags)
    elif output_scheme == "BIOES":
        tags = bio_to_bioes(bioes_to_bio(tags))  # predicted BIOES made well-formed
    return [
        {"word": word, "start": start, "end": end, "tag": tag, "score": float(scores[index, best[index]])}
        for index, (word, (start, end), tag) in enumerate(zip(item["words"], item["spans"], tags))
    ]


class IgnoredLabels:
    """The `ignore_labels` of a model's outputs: which entities they leave out, each list checked (and warned about)
    once per aggregation strategy."""

    def __init__(self, labels: list[str], types: list[str]):
        self.labels = labels
        self.types = types
        # each tag's entity type (None for O): types leave out the words of aggregation "none"
        self.tag_types = {label: tag_parts(label)[1] for label in labels}
        self.checked = {}

    def of(self, ignore_labels, aggregation_strategy: str) -> frozenset:
        """`ignore_labels` as a set; warns once per labels and strategy about labels that can leave nothing out:
        neither `O`, a tag nor an entity type of the model, or a tag with a grouping strategy (groups are labelled
        by type, as in the token-classification pipeline)."""
        key = (tuple(ignore_labels), aggregation_strategy)
        known = self.checked.get(key)
        if known is not None:
            return known
        unknown = [label for label in ignore_labels if label != "O" and label not in set(self.types) | set(self.labels)]
        tags = [label for label in ignore_labels if label != "O" and label in self.labels]
        if unknown:
            logger.warning(
                f"ignore_labels {unknown} are neither tags nor entity types of this model (tags: {self.labels}); "
                "they leave nothing out"
            )
        if tags and aggregation_strategy != "none":
            logger.warning(
                f"ignore_labels {tags} are tags: they leave out words with aggregation_strategy='none' only; "
                f"entities grouped by {aggregation_strategy!r} are labelled by type (e.g. "
                f"{sorted({tag_parts(tag)[1] for tag in tags})}), give the types to leave them out"
            )
        self.checked[key] = frozenset(ignore_labels)
        return self.checked[key]

    def kept(self, entities: list[dict], ignored: frozenset) -> list[dict]:
        """The entities not left out, as in the token-classification pipeline: by a word's tag (`"none"`) or an
        entity's group; and, for `"none"`, by the word's entity type too."""
        if not ignored - {"O"}:  # "O" itself is left out by `aggregate_entities`
            return entities
        return [
            entity for entity in entities
            if entity.get("entity_group", entity.get("entity")) not in ignored
            and self.tag_types.get(entity.get("entity")) not in ignored
        ]


__all__ = ["AGGREGATION_STRATEGIES", "IgnoredLabels", "aggregate_entities", "entity_types", "word_rows"]
