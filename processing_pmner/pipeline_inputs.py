"""Inputs of the `multimodal-ner` pipeline: `image=` and `context=` merged into the inputs (`with_images`,
`with_contexts`), one input made into a plain dict (`normalise_input`), the contexts of a batch (`contexts_of`, with
the retrieval index of `load_retrieval_index`) and its visual features (`visual_inputs`: images through the FRR image
processor, or precomputed features). Each warning is given once per pipeline (`InputWarnings`, owned by it).

This file is copied flat into saved model folders with the pipeline (remote code): it imports torch, numpy,
transformers and its siblings `text_tweet_tokenizer.py` and `text_retrieval_context.py` relatively.
"""

import warnings

import numpy as np
import torch
from transformers.utils import logging

from .text_tweet_tokenizer import join_words, split_tweet


logger = logging.get_logger(__name__)

INPUT_KEYS = (
    "text", "words", "tokens", "image", "visual_features", "visual_mask", "visual_boxes", "visual_labels", "visual_scores",
    "context",
)
VISUAL_KEYS = INPUT_KEYS[3:9]


class InputTypeError(TypeError, ValueError):
    """A pipeline input (or an item of an iterable input) of a type the pipeline does not take. A `TypeError`, as in
    Python; also a `ValueError`, so that callers catching `ValueError` for bad inputs catch it too."""


EXPECTED_ITEM = "a str (a tweet), a dict with 'text' or 'words', or a list of words (with is_split_into_words=True)"


class InputWarnings:
    """The input warnings a pipeline has given, so that each is given once: `ignored_keys` holds the sets of unknown
    dict keys warned about, `once` logs a named warning the first time only."""

    def __init__(self):
        self.ignored_keys = set()
        self.given = set()

    def once(self, name: str, message: str) -> None:
        if name not in self.given:
            self.given.add(name)
            logger.warning(message)


def is_stream(inputs) -> bool:
    """Whether `inputs` is a source of several tweets other than a list or tuple: a generator, any iterable
    (`datasets.Dataset`, streaming `datasets.IterableDataset`, torch `IterableDataset`), or a sized indexable
    dataset (`KeyDataset`, a map-style torch `Dataset`). Raises a `TypeError` for what is neither a tweet nor
    such a source."""
    if isinstance(inputs, (str, dict, list, tuple)):
        return False
    if isinstance(inputs, (bytes, bytearray)) or not (
        hasattr(inputs, "__iter__") or (hasattr(inputs, "__len__") and hasattr(inputs, "__getitem__"))
    ):
        raise InputTypeError(
            f"the pipeline input is a {type(inputs).__name__}; expected {EXPECTED_ITEM}, or an iterable of these"
        )
    return True


def iterate_inputs(source):
    """The items of a stream (see `is_stream`), one by one: iterated when it can be (a `datasets.Dataset` reads its
    rows faster so), else indexed `0 ... len - 1`."""
    if hasattr(source, "__iter__"):
        yield from source
    else:
        for index in range(len(source)):
            yield source[index]


def with_images(inputs, image, batched: bool, is_split_into_words: bool):
    """`inputs` with `image=` given to the pipeline merged in: one image for one tweet, one (or `None`) per tweet for
    a list."""
    if batched:
        images = list(image) if isinstance(image, (list, tuple)) else None
        if images is None or len(images) != len(inputs):
            raise ValueError(
                f"image must be a list of one image (or None) per tweet: got {type(image).__name__} for "
                f"{len(inputs)} tweets"
            )
        return [
            _with_image(item, picture, index, is_split_into_words)
            for index, (item, picture) in enumerate(zip(inputs, images))
        ]
    if isinstance(inputs, (str, dict)):
        return _with_image(inputs, image, 0, is_split_into_words)
    raise ValueError("image= can be given with a tweet or a list of tweets, not with a dataset or generator")


def _with_image(item, image, index, split):
    if image is None:
        return item
    if isinstance(item, dict):
        if item.get("image") is not None or item.get("visual_features") is not None:
            raise ValueError(f"tweet {index} has an image (or visual_features) in its dict and in image=")
        return {**item, "image": image}
    if isinstance(item, str):
        return {"text": item, "image": image}
    if isinstance(item, (list, tuple)) and split:
        return {"words": list(item), "image": image}
    raise InputTypeError(f"tweet {index} is a {type(item).__name__}; expected {EXPECTED_ITEM}")


def with_contexts(inputs, context, batched: bool, is_split_into_words: bool):
    """`inputs` with `context=` given to the pipeline merged in: one text for one tweet, one (or `None`) per tweet
    for a list."""

    def one(item, text, index):
        if text is not None and not isinstance(text, str):
            raise ValueError(f"context of tweet {index} is a {type(text).__name__}; expected a str or None")
        if text is None:
            return item
        if isinstance(item, dict):
            if item.get("context") is not None:
                raise ValueError(f"tweet {index} has a context in its dict and in context=")
            return {**item, "context": text}
        if isinstance(item, str):
            return {"text": item, "context": text}
        if isinstance(item, (list, tuple)) and is_split_into_words:
            return {"words": list(item), "context": text}
        raise InputTypeError(f"tweet {index} is a {type(item).__name__}; expected {EXPECTED_ITEM}")

    if batched:
        if not isinstance(context, (list, tuple)) or len(context) != len(inputs):
            raise ValueError(
                f"context must be a list of one text (or None) per tweet: got {type(context).__name__} for "
                f"{len(inputs)} tweets"
            )
        return [one(item, text, index) for index, (item, text) in enumerate(zip(inputs, context))]
    if not isinstance(inputs, (str, dict)):
        raise ValueError("context= can be given with a tweet or a list of tweets, not with a dataset or generator")
    return one(inputs, context, 0)


def normalise_input(item, index: int, is_split_into_words: bool, warned: InputWarnings) -> dict:
    """`{"index", "text", "words", "spans", "context"}` and the visual inputs (`VISUAL_KEYS`) of one pipeline input;
    `warned`: the pipeline's input warnings (unknown keys are warned about once per set of keys)."""
    if isinstance(item, str):
        item = {"text": item}
    elif isinstance(item, (list, tuple)):
        if not is_split_into_words:
            raise ValueError(
                f"tweet {index} is a list; pass is_split_into_words=True for pre-split words, or a dict "
                '{"words": [...]}'
            )
        item = {"words": list(item)}
    elif not isinstance(item, dict):
        raise InputTypeError(f"tweet {index} is a {type(item).__name__}; expected {EXPECTED_ITEM}")
    unknown = tuple(sorted(set(item) - set(INPUT_KEYS)))
    if unknown and unknown not in warned.ignored_keys:
        # e.g. the id and tag columns of a dataset row; said once per set of keys, so that a typo is seen
        warned.ignored_keys.add(unknown)
        warnings.warn(
            f"keys {list(unknown)} of tweet {index} are not inputs of the multimodal-ner pipeline and are ignored "
            f"(inputs: {', '.join(INPUT_KEYS)})",
            UserWarning,
            stacklevel=2,
        )
    given = [key for key in ("text", "words", "tokens") if item.get(key) is not None]
    if len(given) != 1:
        raise ValueError(f"tweet {index} needs exactly one of 'text' or 'words' (or 'tokens'), got {given or 'none'}")
    if "text" in given:
        text = item["text"]
        if not isinstance(text, str):
            raise ValueError(f"tweet {index}: 'text' is a {type(text).__name__}; expected a str")
        split = split_tweet(text)
        words = [word for word, _, _ in split]
        spans = [(start, end) for _, start, end in split]
    else:
        words = item[given[0]]
        if isinstance(words, str) or not all(isinstance(word, str) for word in words):
            raise ValueError(f"tweet {index}: '{given[0]}' must be a list of strings")
        text, spans = join_words(list(words))
        words = list(words)
    if item.get("image") is not None and item.get("visual_features") is not None:
        raise ValueError(f"tweet {index} has both 'image' and 'visual_features'; give one")
    for key in ("visual_mask", "visual_boxes", "visual_labels", "visual_scores"):
        if item.get(key) is not None and item.get("visual_features") is None:
            raise ValueError(f"tweet {index} has '{key}' without 'visual_features'")
    context = item.get("context")
    if context is not None and not isinstance(context, str):
        raise ValueError(f"tweet {index}: 'context' is a {type(context).__name__}; expected a str (or None)")
    return {
        "index": index,
        "text": text,
        "words": words,
        "spans": spans,
        **{key: item.get(key) for key in VISUAL_KEYS},
        "context": context or None,
    }


def visual_inputs(
    items: list[dict], image_processor, use_visual: bool, device, expected_dim: int | None, warned: InputWarnings
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(features (batch, objects, D), mask (batch, objects))`: images run through the FRR `image_processor` (on
    `device`), precomputed features used as given, zeros with an all-false mask for tweets without either; `(None,
    None)` for a text-only model (`use_visual` false). `expected_dim`: the model's `visual_feature_dim`, if known.
    Sets each item's `object_mask` (M,) and, where known, `objects` (boxes (M, 4), labels (M,), scores (M,)), for
    grounding."""
    if not use_visual:
        if any(item["image"] is not None or item["visual_features"] is not None for item in items):
            warned.once("text_only", "this P-MNER model is text-only (use_visual=False): images are not used")
        return None, None
    per_item = [None] * len(items)
    with_image = [index for index, item in enumerate(items) if item["image"] is not None]
    if with_image:
        output = image_processor(
            [items[index]["image"] for index in with_image], return_tensors="pt", device=device,
            return_boxes=True,
        )
        for row, index in enumerate(with_image):
            per_item[index] = (output["visual_features"][row], output["visual_mask"][row])  # (M, D), (M,)
            # the objects' boxes, detector labels and scores, for grounding: (M, 4), (M,), (M,)
            items[index]["objects"] = tuple(output[key][row] for key in ("visual_boxes", "visual_labels", "visual_scores"))
    for index, item in enumerate(items):
        if item["visual_features"] is None:
            continue
        value = item["visual_features"]
        if isinstance(value, torch.Tensor):
            features = value.detach().float().cpu()
        else:
            features = torch.as_tensor(np.asarray(value, dtype=np.float32))
        if features.dim() != 2:
            raise ValueError(
                f"tweet {item['index']}: visual_features has shape {tuple(features.shape)}; expected "
                "(objects, feature_dim)"
            )
        if not bool(torch.isfinite(features).all()):
            raise ValueError(f"tweet {item['index']}: visual_features hold NaN or infinite values")
        if item["visual_mask"] is None:
            mask = torch.ones(features.shape[0], dtype=torch.bool)
        else:
            value = item["visual_mask"]
            mask = value.detach().cpu().bool() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value)).bool()
            if mask.shape != features.shape[:1]:
                raise ValueError(
                    f"tweet {item['index']}: visual_mask has shape {tuple(mask.shape)}; expected "
                    f"({features.shape[0]},)"
                )
        per_item[index] = (features, mask)
        if item["visual_boxes"] is not None:
            item["objects"] = (item["visual_boxes"], item["visual_labels"], item["visual_scores"])
    for index, entry in enumerate(per_item):
        if entry is not None:
            items[index]["object_mask"] = entry[1]  # (M,)
    dims = {entry[0].shape[1] for entry in per_item if entry is not None}
    expected = expected_dim
    if len(dims) > 1 or (dims and expected is not None and dims != {expected}):
        raise ValueError(
            f"visual features of width {sorted(dims)} in one batch; the model expects visual_feature_dim={expected}"
        )
    # the model's width when known: no torchvision import for a batch of text-only tweets
    dim = dims.pop() if dims else (expected if expected is not None else image_processor.feature_dim)
    objects = max([entry[0].shape[0] for entry in per_item if entry is not None] + [image_processor.max_objects])
    features = torch.zeros(len(items), objects, dim)  # (batch, objects, D)
    mask = torch.zeros(len(items), objects, dtype=torch.bool)  # (batch, objects)
    for index, entry in enumerate(per_item):
        if entry is not None:
            count = entry[0].shape[0]
            features[index, :count] = entry[0].float().cpu()
            mask[index, :count] = entry[1].cpu()
    return features, mask


def load_retrieval_index(retrieval_index, context_source: dict | None, model):
    """The index the pipeline retrieves context from: `retrieval_index` (a `RetrievalIndex`, or a folder / Hub repo
    holding one), else the one saved with `model` when it was trained with `--retrieval_context` (the processor's
    `context_source`); `None` for other models."""
    from .text_retrieval_context import RetrievalIndex

    source = context_source or {}
    if isinstance(retrieval_index, RetrievalIndex) or retrieval_index is not None:
        index = retrieval_index if isinstance(retrieval_index, RetrievalIndex) else RetrievalIndex.from_pretrained(str(retrieval_index))
        if source.get("kind") == "retrieval" and source.get("k") not in (None, index.k):
            logger.warning(
                f"retrieval_index has k={index.k}; the model was trained with k={source.get('k')} neighbours: it "
                "expects at inference what it was trained with"
            )
        return index
    if source.get("kind") != "retrieval":
        return None
    location = getattr(model, "name_or_path", None)
    if not location:
        raise ValueError(
            "this model was trained with retrieval context, but where it was loaded from is unknown: pass "
            "retrieval_index=<folder or Hub repo with retrieval_index.json>"
        )
    # a Hub model: the index of the very commit the model was loaded from (None for a local folder)
    revision = getattr(model.config, "_commit_hash", None)
    index = RetrievalIndex.from_pretrained(location, revision=revision)
    expected = source.get("embeddings_sha256")
    if expected is not None and index.record()["embeddings_sha256"] != expected:
        raise ValueError(
            f"the retrieval index in {location} is not the one this model was trained with (embeddings sha256 "
            f"differs from processor_config.json's context_source): save the model and its index again, or pass "
            "retrieval_index="
        )
    return index


def contexts_of(
    items: list[dict], retrieval_index, context_source: dict | None, device, warned: InputWarnings
) -> list | None:
    """The context of each tweet: its own `context`, else (with a `retrieval_index`) its retrieved neighbours;
    `None` when no tweet has any. `context_source`: the processor's, that of a model trained with context."""
    contexts = [item["context"] for item in items]
    missing = [row for row, context in enumerate(contexts) if context is None and items[row]["words"]]
    if retrieval_index is not None and missing:
        retrieved = retrieval_index.contexts([items[row]["words"] for row in missing], device=device)
        for row, context in zip(missing, retrieved):
            contexts[row] = context
    given = any(item["context"] is not None for item in items)
    if not context_source and given:
        warned.once(
            "unexpected_context", "this model was trained without auxiliary context; the `context` given is used anyway"
        )
    if context_source and missing and retrieval_index is None:
        warned.once(
            "no_context",
            f"this model was trained with auxiliary context ({context_source.get('description')}); tweets without "
            "`context` are tagged from the tweet alone",
        )
    return contexts if any(context is not None for context in contexts) else None


__all__ = [
    "INPUT_KEYS", "InputTypeError", "InputWarnings", "contexts_of", "is_stream", "iterate_inputs",
    "load_retrieval_index", "normalise_input", "visual_inputs", "with_contexts", "with_images",
]
