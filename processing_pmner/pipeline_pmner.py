"""The `multimodal-ner` pipeline of P-MNER: entities of a tweet (raw text or words) and its optional image.

    from transformers import pipeline
    ner = pipeline(model="path/or/hub-id", trust_remote_code=True)
    ner("Kawhi Leonard wins the fan vote ! #NBAAwards", image="photo.jpg")
    # [{'entity_group': 'PER', 'score': 0.98, 'word': 'Kawhi Leonard', 'start': 0, 'end': 13}, ...]

Raw text is split into words as the Twitter MNER benchmark is (see `text_tweet_tokenizer.py`), with character offsets;
the model predicts one tag per word (at its first sub-word); tweets longer than the model's `max_length` are cut into
overlapping windows by the processor and merged back, so every word is tagged.

A saved model folder gets the pipeline with `add_pipeline_to_folder(folder)` (or `PMNERPipeline.save_pretrained`):
it copies this file and `text_tweet_tokenizer.py` into the folder and records the task in `config.json`
(`custom_pipelines`), so that `pipeline(model=folder, trust_remote_code=True)` finds the task by itself. Only
`multimodal-ner` is recorded: transformers infers the task only from a `custom_pipelines` of one entry (see
`custom_pipelines`); `PMNERConfig.from_pretrained` leads `token-classification` and `ner` to this pipeline when a
`pipeline()` call asks for them.

This file is copied flat into saved model folders (remote code): it imports only torch, numpy, transformers and the
standard library, and relatively its siblings (copied with it): `pipeline_inputs.py` (input normalisation and visual
features, with `text_tweet_tokenizer.py`), `pipeline_entities.py` (word tags to entities), `pipeline_grounding.py`
(`return_grounding`), `pipeline_quantization.py` (`quantize="int8"`) and `processing_pmner.py` (the tag-scheme helpers
and the processor/model label check).
"""

import copy
import json
import os
import shutil

import numpy as np
import torch
from transformers import AutoModelForTokenClassification, Pipeline
from transformers.dynamic_module_utils import custom_object_save
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging

from .pipeline_entities import AGGREGATION_STRATEGIES, aggregate_entities, entity_types
from .pipeline_grounding import (
    DEFAULT_GROUNDING_THRESHOLD,
    add_grounding,
    check_grounding_threshold,
    head_mean,
    slot_objects,
    word_attentions,
)
from .pipeline_inputs import (  # noqa: F401  (INPUT_KEYS re-exported)
    EXPECTED_ITEM,
    INPUT_KEYS,
    InputTypeError,
    contexts_of,
    is_stream,
    iterate_inputs,
    load_retrieval_index,
    normalise_input,
    visual_inputs,
)
from .processing_pmner import bio_to_bioes, bioes_to_bio, check_processor_matches_model, tag_parts
from .pipeline_quantization import QUANTIZE_OPTIONS, _check_cpu, feed_forward_linears, quantize_dynamic_int8


logger = logging.get_logger(__name__)

TASK = "multimodal-ner"
HANDLER_FILE = "handler.py"  # Inference Endpoints' custom handler, copied into saved folders
# tweets read ahead and sorted by length before batching: little padding in each batch, results in input order
BUCKET_BATCHES = 64
LENGTH_WARNING = "sequence-length-is-longer-than-the-specified-maximum"
OUTPUT_SCHEMES = ("BIO", "BIOES", "model")
DEFAULT_IGNORE_LABELS = ("O",)  # as in transformers' token-classification pipeline
DEFAULT_IGNORE_LABELS_SET = frozenset(DEFAULT_IGNORE_LABELS)
CUSTOM_PIPELINE_ENTRY = {
    "impl": "pipeline_pmner.PMNERPipeline",
    "pt": ["AutoModelForTokenClassification"],
    "type": "multimodal",
}


class _Passthrough:
    """Holds what `forward` must hand to `postprocess` untouched (no device moves, no recursion into lists)."""

    def __init__(self, **values):
        self.__dict__.update(values)


class PMNERPipeline(Pipeline):
    r"""
    Multimodal named entity recognition with P-MNER: the entities of tweets, with or without their images.

    Inputs (one, or a list for a batch):
    - a raw tweet `str` (split into words like the training data, offsets kept), with `image=` a path, a PIL image
      (anything the FRR image processor reads) or `None`;
    - a dict with `"text"` (a raw tweet) or `"words"` (pre-split words; `"tokens"` is accepted too), and optionally
      `"image"`, or precomputed FRR `"visual_features"` (objects, feature_dim) with `"visual_mask"` (objects,);
    - with `is_split_into_words=True`, a list of words is one tweet (a list of lists is a batch). Offsets then refer
      to the words joined by single spaces, which is also the returned `text`.
    Any other iterable streams results (an iterator, in input order, batched as lists are): a generator, a
    `datasets.Dataset` or a streaming `datasets.IterableDataset` (rows with `text` or `tokens`, and `image`), a
    `KeyDataset`, a torch `Dataset`. Other keys of a dict (ids, gold tags) are ignored with a warning, once per set of
    keys. An input (or an item of an iterable) of any other type is a `TypeError` naming its type and position.

    Parameters (at creation or per call):
        aggregation_strategy (`str`, defaults to `"simple"`): how word tags become entities, as in the
            token-classification pipeline but over words (the model predicts one tag per word, at its first
            sub-word):
            - `"none"`: every word not tagged `O`, as `{"entity": tag, "score", "index" (word index), "word",
              "start", "end"}`.
            - `"simple"`: consecutive words of one type are grouped unless a word starts a new entity (`B-`/`S-`,
              or the previous one ended it with `E-`/`S-`); `score` is the mean of the words' tag probabilities.
            - `"first"`, `"max"`, `"average"`: entity boundaries come from the tag prefixes alone (a `B-`/`S-` or a
              tagged word after `O` starts an entity, `I-`/`E-` words continue it whatever their type), so an
              entity never splits on a type disagreement; its type is then that of its first word (`"first"`), of
              its most confident word (`"max"`), or the type with the highest probability averaged over its words
              (`"average"`). `score` is the probability of that type, read in the deciding word (`"first"`,
              `"max"`) or averaged over the words (`"average"`); a type's probability is the sum of its tags'.
        ignore_labels (`list[str]`, defaults to `["O"]`): labels to leave out of the output, as in the
            token-classification pipeline: an entity is left out when its group (`entity_group`, an entity type) or,
            with `"none"`, its tag (`entity`, e.g. `"B-ORG"`) is listed; with `"none"` a word is also left out when
            its entity type is (`"ORG"` leaves out `B-ORG` and `I-ORG` words). Without `"O"` in the list, the words
            tagged `O` are returned too: each one with `"none"`, each run of them as an `"O"` group otherwise.
            Tags given with a grouping strategy leave nothing out (a warning says so): give their type.
        return_words (`bool`, defaults to `False`): return `{"text", "entities", "words"}` with each word's
            `word`, `start`, `end`, `tag` (in `output_scheme`) and `score`, instead of the entity list.
        output_scheme (`str`, defaults to `"BIO"`): scheme of the word tags returned with `return_words`: `"BIO"`,
            `"BIOES"` or `"model"` (the model's own tags).
        return_grounding (`bool`, defaults to `False`): give each entity a `"grounding"`: the FRR object that TCFM's
            text-to-object attention of its words points to most, `{"slot", "box" (x1, y1, x2, y2 in the original
            image's pixels), "label" (detector category, or "whole image"), "score" (detector score), "weight"
            (attention)}`, or `None` (no object, or weight not clearly above uniform, see `grounding_threshold`). It is read from attention:
            the model has no grounding supervision (see `pipeline_grounding.py`). For precomputed `visual_features`,
            give `visual_boxes` (objects, 4), `visual_labels` and `visual_scores` (objects,) to get boxes; without
            them `box`, `label` and `score` are `None`.
        grounding_threshold (`float`, defaults to 0.25): how far above uniform attention an entity's top weight
            must be: with n objects it is grounded when `weight >= (1 + grounding_threshold) / n` (5 objects: 0.25;
            2: 0.625; one object: never, unless 0). 0 grounds every entity of an image with objects.

    Batches (`batch_size=` at creation or call) are encoded together: one processor call and one forward per batch
    of tweets (long tweets add window rows). Unreadable images give a `BadImageWarning` naming them and the tweet is
    tagged from its text alone (the image processor's `on_bad_image="blank"`). Within a call, up to
    `batch_size * 64` tweets are read ahead and batched by length (tweets of similar length together, so rows are
    padded little); results come back in input order and equal those of unsorted batches.

    `quantize="int8"` (at creation only) runs the text encoder's feed-forward `nn.Linear` layers with int8 weights
    (`torch.ao.quantization.quantize_dynamic`, see `quantize_dynamic_int8`; CPU only): faster on CPU, tags nearly
    unchanged. The model passed in is left as it is (a quantised copy is used).
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, *args, quantize: str | None = None, retrieval_index=None, **kwargs):
        if quantize is not None:
            if quantize not in QUANTIZE_OPTIONS:
                raise ValueError(f"quantize must be one of {QUANTIZE_OPTIONS} or None, got {quantize!r}")
            if kwargs.get("device") is not None:  # refused before the model is moved there
                device = kwargs["device"]
                _check_cpu(f"cuda:{device}" if isinstance(device, int) and device >= 0 else device)
        super().__init__(*args, **kwargs)
        self.quantize = quantize
        if quantize is not None:
            self.model = quantize_dynamic_int8(self.model, self.device)
        if self.processor is None:
            raise ValueError(
                "the multimodal-ner pipeline needs the P-MNER processor: save it in the model folder "
                "(processor.save_pretrained(folder)) or pass processor=PMNERProcessor(...)"
            )
        for name in ("post_process_token_classification", "merge_window_predictions", "label_names"):
            if not hasattr(self.processor, name):
                raise TypeError(f"processor {type(self.processor).__name__} is not a P-MNER processor (no `{name}`)")
        check_processor_matches_model(self.processor, self.model.config)
        self.labels = [self.model.config.id2label[index] for index in range(self.model.config.num_labels)]
        if getattr(self.processor, "overflow", "window") != "window":
            logger.warning(
                f"the processor has overflow={self.processor.overflow!r}; the pipeline uses overflow='window' so "
                "that every word of a long tweet is tagged"
            )
            self.processor = copy.copy(self.processor)
            self.processor.overflow = "window"
        self.use_visual = bool(getattr(self.model.config, "use_visual", True))
        # a model trained with --retrieval_context retrieves each tweet's context from its saved training index
        self.retrieval_index = load_retrieval_index(self, retrieval_index)
        self._warned_text_only = False
        self._ignored_keys = set()
        self._checked_ignore_labels = {}
        # each tag's entity type (None for O): ignore_labels types leave out the words of aggregation "none"
        self._tag_types = {label: tag_parts(label)[1] for label in self.labels}

    # -- parameters ----------------------------------------------------------------------------------------------

    def _sanitize_parameters(
        self,
        aggregation_strategy=None,
        ignore_labels=None,
        return_words=None,
        output_scheme=None,
        is_split_into_words=None,
        return_grounding=None,
        grounding_threshold=None,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(f"the multimodal-ner pipeline got unknown arguments {sorted(kwargs)}")
        preprocess, forward, postprocess = {}, {}, {}
        if return_grounding is not None:
            forward["return_grounding"] = postprocess["return_grounding"] = bool(return_grounding)
        if grounding_threshold is not None:
            postprocess["grounding_threshold"] = check_grounding_threshold(grounding_threshold)
        if aggregation_strategy is not None:
            strategy = str(aggregation_strategy).lower()
            if hasattr(aggregation_strategy, "value"):  # transformers' AggregationStrategy enum
                strategy = str(aggregation_strategy.value).lower()
            if strategy not in AGGREGATION_STRATEGIES:
                raise ValueError(
                    f"aggregation_strategy must be one of {AGGREGATION_STRATEGIES}, got {aggregation_strategy!r}"
                )
            postprocess["aggregation_strategy"] = strategy
        if ignore_labels is not None:
            if (
                isinstance(ignore_labels, (str, bytes, dict))
                or not hasattr(ignore_labels, "__iter__")
                or not all(isinstance(label, str) for label in ignore_labels)
            ):
                raise ValueError(f"ignore_labels must be a list of tags or entity types, got {ignore_labels!r}")
            postprocess["ignore_labels"] = tuple(ignore_labels)
        if return_words is not None:
            postprocess["return_words"] = bool(return_words)
        if output_scheme is not None:
            if output_scheme not in OUTPUT_SCHEMES:
                raise ValueError(f"output_scheme must be one of {OUTPUT_SCHEMES}, got {output_scheme!r}")
            postprocess["output_scheme"] = output_scheme
        if is_split_into_words is not None:
            preprocess["is_split_into_words"] = bool(is_split_into_words)
        return preprocess, forward, postprocess

    # -- calling -------------------------------------------------------------------------------------------------

    def __call__(self, inputs, image=None, context=None, **kwargs):
        """Entities of one tweet or of a list of tweets.

        Args:
            inputs: a tweet (`str`, or a dict, see the class docstring) or a list of them; any other iterable of
                them (a generator, a `datasets.Dataset` or `IterableDataset`, a `KeyDataset`) streams results.
            image: with one tweet, its image (path, PIL image, ...); with a list, one image (or `None`) per tweet.
            context: with one tweet, its auxiliary text (`str`); with a list, one (or `None`) per tweet. Without it,
                a model trained with retrieval context retrieves it from its saved training index.

        Returns:
            Per tweet, a list of entities `{"entity_group", "score", "word", "start", "end"}`
            (`text[start:end] == word`), or the dict described under `return_words`.
        """
        split = kwargs.get("is_split_into_words", self._preprocess_params.get("is_split_into_words", False))
        if split and isinstance(inputs, (list, tuple)) and inputs and all(isinstance(word, str) for word in inputs):
            inputs = {"words": list(inputs)}  # one pre-split tweet
        batched = isinstance(inputs, (list, tuple))
        streamed = is_stream(inputs)  # a TypeError for an input that is neither a tweet nor a source of tweets
        if image is not None:
            if batched:
                images = list(image) if isinstance(image, (list, tuple)) else None
                if images is None or len(images) != len(inputs):
                    raise ValueError(
                        f"image must be a list of one image (or None) per tweet: got {type(image).__name__} for "
                        f"{len(inputs)} tweets"
                    )
                inputs = [
                    self._with_image(item, picture, index, split)
                    for index, (item, picture) in enumerate(zip(inputs, images))
                ]
            elif isinstance(inputs, (str, dict)):
                inputs = self._with_image(inputs, image, 0, split)
            else:
                raise ValueError("image= can be given with a tweet or a list of tweets, not with a dataset or generator")
        if context is not None:
            inputs = self._with_context(inputs, context, batched, split)
        if batched:
            inputs = list(inputs)
            if not inputs:
                return []
        elif streamed:
            # any other iterable (datasets.Dataset, streaming IterableDataset, KeyDataset, torch Dataset): a generator,
            # so that transformers streams it (results come back as an iterator, in input order)
            inputs = iterate_inputs(inputs)
        return super().__call__(inputs, **kwargs)

    @staticmethod
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

    @staticmethod
    def _with_context(inputs, context, batched: bool, split: bool):
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
            if isinstance(item, (list, tuple)) and split:
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

    def run_single(self, inputs, preprocess_params, forward_params, postprocess_params):
        model_inputs = self.preprocess(inputs, **preprocess_params)
        model_outputs = self.forward(model_inputs, **forward_params)
        return self.postprocess(model_outputs, **postprocess_params)[0]

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        """Streams results in input order: `batch_size * BUCKET_BATCHES` tweets are read ahead, sorted by length and
        cut into batches of `batch_size` tweets (one processor call and one forward per batch)."""
        if num_workers and num_workers > 1:
            raise ValueError(
                f"num_workers={num_workers}: the multimodal-ner pipeline encodes each batch in the calling process "
                "(images are read and encoded on the pipeline's device); use batch_size to batch"
            )
        batch_size = max(1, int(batch_size or 1))

        source = inputs if isinstance(inputs, (list, tuple)) else iterate_inputs(inputs)
        params = (preprocess_params, forward_params, postprocess_params)

        def generate():
            window, offset = [], 0
            for item in source:
                window.append(item)
                if len(window) == batch_size * BUCKET_BATCHES:
                    yield from self._run_window(window, offset, batch_size, *params)
                    window, offset = [], offset + len(window)
            if window:
                yield from self._run_window(window, offset, batch_size, *params)

        return generate()

    def _run_window(self, window, offset, batch_size, preprocess_params, forward_params, postprocess_params):
        """Results of `window` (tweets `offset`...) in its order, computed in batches of tweets of similar length."""
        split = preprocess_params.get("is_split_into_words", False)
        items = [self._normalise(item, offset + index, split) for index, item in enumerate(window)]
        lengths = self._length_keys(items)
        order = sorted(range(len(items)), key=lambda index: lengths[index])
        results = [None] * len(items)
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            batch = _Batch([items[index] for index in chosen], normalised=True)
            for index, result in zip(chosen, self._run_batch(batch, preprocess_params, forward_params, postprocess_params)):
                results[index] = result
        return results

    def _length_keys(self, items: list[dict]) -> list[int]:
        """Sub-words of each tweet (one batched tokenizer call, no special tokens): the sort key that puts tweets of
        similar row length in one batch."""
        filled = [index for index, item in enumerate(items) if item["words"]]
        lengths = [0] * len(items)
        if filled:
            encoded = self.processor.tokenizer(
                [items[index]["words"] for index in filled], is_split_into_words=True, add_special_tokens=False,
                verbose=False,  # long tweets are windowed: no length warning
            )
            for index, ids in zip(filled, encoded["input_ids"]):
                lengths[index] = len(ids)
        return lengths

    def _run_batch(self, batch, preprocess_params, forward_params, postprocess_params):
        model_inputs = self.preprocess(batch, **preprocess_params)
        model_outputs = self.forward(model_inputs, **forward_params)
        return self.postprocess(model_outputs, **postprocess_params)

    def get_inference_context(self):
        return torch.inference_mode

    # -- pre-processing ------------------------------------------------------------------------------------------

    def _normalise(self, item, index: int, is_split_into_words: bool) -> dict:
        """`{"index", "text", "words", "spans", "image", "visual_features", ...}` of one input."""
        return normalise_input(item, index, is_split_into_words, self._ignored_keys)

    def _visual_inputs(self, items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(features (batch, objects, D), mask (batch, objects))` of a batch (see `pipeline_inputs.visual_inputs`)."""
        return visual_inputs(self, items)

    def preprocess(self, inputs, is_split_into_words: bool = False):
        if isinstance(inputs, _Batch) and inputs.normalised:
            items = list(inputs.items)
        else:
            raw = list(inputs.items) if isinstance(inputs, _Batch) else [inputs]
            offset = inputs.offset if isinstance(inputs, _Batch) else 0
            items = [self._normalise(item, offset + index, is_split_into_words) for index, item in enumerate(raw)]
        features, mask = self._visual_inputs(items)
        visual = {} if features is None else {"visual_features": features, "visual_mask": mask}
        tokenizer = self.processor.tokenizer
        flags = getattr(tokenizer, "deprecation_warnings", None)
        already = flags.get(LENGTH_WARNING) if isinstance(flags, dict) else None
        try:
            # the processor tokenises whole tweets to place its windows, and the tokenizer warns that a long one
            # exceeds model_max_length; the windows fit it, so the warning is marked as given for this call only
            if isinstance(flags, dict):
                flags[LENGTH_WARNING] = True
            encoding = self.processor(
                [item["words"] for item in items], return_tensors="pt", context=contexts_of(self, items), **visual
            )
        finally:
            if isinstance(flags, dict):
                if already is None:
                    flags.pop(LENGTH_WARNING, None)
                else:
                    flags[LENGTH_WARNING] = already
        model_inputs = {key: encoding[key] for key in self._model_input_names(encoding)}
        return {"model_inputs": model_inputs, "meta": _Passthrough(encoding=encoding, items=items)}

    def _model_input_names(self, encoding) -> list[str]:
        names = ["input_ids", "attention_mask", "token_type_ids"]
        if self.use_visual:
            names += ["visual_features", "visual_mask"]
        return [name for name in names if name in encoding]

    # -- model ---------------------------------------------------------------------------------------------------

    def _forward(self, model_inputs, return_grounding: bool = False):
        training = self.model.training
        if training:  # a model fresh from its constructor or a training loop: no dropout at inference
            self.model.eval()
        grounding = return_grounding and "visual_features" in model_inputs["model_inputs"]
        try:
            # TCFM's attention only: the text encoder keeps its attention kernel (sdpa) and its outputs
            fusion = {"output_fusion_attentions": True} if grounding else {}
            outputs = self.model(**model_inputs["model_inputs"], **fusion)
        finally:
            if training:
                self.model.train()
        probabilities = torch.softmax(outputs.logits.float(), dim=-1)  # (rows, length, labels)
        attention = getattr(outputs, "text_to_object_attentions", None) if grounding else None
        # the head mean of TCFM's text-to-object attention (rows, length, objects); None without objects attended
        attention = None if attention is None else head_mean(attention)
        return {"probabilities": probabilities, "meta": model_inputs["meta"], "object_attention": _Passthrough(value=attention)}

    # -- post-processing -----------------------------------------------------------------------------------------

    def postprocess(
        self,
        model_outputs,
        aggregation_strategy: str = "simple",
        ignore_labels: tuple[str, ...] = DEFAULT_IGNORE_LABELS,
        return_words: bool = False,
        output_scheme: str = "BIO",
        return_grounding: bool = False,
        grounding_threshold: float = DEFAULT_GROUNDING_THRESHOLD,
    ) -> list:
        meta = model_outputs["meta"]
        results = []
        attention = model_outputs["object_attention"].value if "object_attention" in model_outputs else None
        if return_grounding and attention is not None:
            attention = word_attentions(attention, meta.encoding.mapping, [len(item["words"]) for item in meta.items])
        ignored = self._ignored_labels(ignore_labels, aggregation_strategy)
        keep_outside = "O" not in ignored
        for position, (item, scores) in enumerate(zip(meta.items, self._word_scores(model_outputs["probabilities"], meta))):
            entities = self.aggregate(item, scores, aggregation_strategy, keep_outside=keep_outside)
            if ignored - DEFAULT_IGNORE_LABELS_SET:  # "O" itself is left out by `aggregate`
                # as in the token-classification pipeline: a word's tag ("none") or an entity's group; and, for
                # "none", the word's entity type too
                entities = [
                    entity for entity in entities
                    if entity.get("entity_group", entity.get("entity")) not in ignored
                    and self._tag_types.get(entity.get("entity")) not in ignored
                ]
            if return_grounding:
                add_grounding(
                    entities, item["spans"], None if attention is None else attention[position],
                    item.get("object_mask"), self._objects(item), grounding_threshold,
                )
            if return_words:
                results.append(
                    {"text": item["text"], "entities": entities, "words": self._word_rows(item, scores, output_scheme)}
                )
            else:
                results.append(entities)
        return results

    def _word_scores(self, probabilities: torch.Tensor, meta) -> list[np.ndarray]:
        """Per tweet, its words' tag probabilities (words, labels), each read at the one row position that predicts
        the word (the processor's mapping), gathered at once for the whole batch."""
        mapping = meta.encoding.mapping
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
        flat = np.zeros((total, len(self.labels)), dtype=np.float32)  # (all words, labels)
        flat[slots.numpy()] = probabilities[rows, columns].float().cpu().numpy()
        bad = torch.nonzero(found != 1).flatten()
        if len(bad):
            tweet = int(torch.searchsorted(starts, bad[0], right=True)) - 1
            wrong = (bad[(bad >= starts[tweet]) & (bad < starts[tweet] + counts[tweet])] - starts[tweet]).tolist()
            raise RuntimeError(
                f"tweet {meta.items[tweet]['index']}: words {wrong[:10]} got {int(found[bad[0]])} predictions from the "
                "processor's rows (expected exactly one)"
            )
        return np.split(flat, starts[1:].numpy()) if len(counts) else []

    def _objects(self, item: dict) -> list | None:
        """Per object slot of a tweet, its `{"box", "label", "score"}` (or `None`), when known."""
        if item.get("objects") is None or item.get("object_mask") is None:
            return None
        boxes, labels, scores = item["objects"]
        image_processor = self.processor.image_processor

        def label_name(label):
            return image_processor.label_name(label) if hasattr(image_processor, "label_name") else str(label)

        return slot_objects(boxes, labels, scores, item["object_mask"], label_name)

    def _word_rows(self, item: dict, scores: np.ndarray, output_scheme: str) -> list[dict]:
        best = scores.argmax(-1) if len(scores) else np.zeros(0, dtype=int)  # (words,)
        tags = [self.labels[int(label)] for label in best]
        if output_scheme == "BIO":
            tags = bioes_to_bio(tags)
        elif output_scheme == "BIOES":
            tags = bio_to_bioes(bioes_to_bio(tags))  # predicted BIOES made well-formed
        return [
            {"word": word, "start": start, "end": end, "tag": tag, "score": float(scores[index, best[index]])}
            for index, (word, (start, end), tag) in enumerate(zip(item["words"], item["spans"], tags))
        ]

    def _types(self) -> tuple[list[str], np.ndarray]:
        """Entity types and the (labels, types) matrix summing tag into type probabilities (computed once)."""
        if not hasattr(self, "_type_matrix"):
            self._entity_types, self._type_matrix = entity_types(self.labels)
        return self._entity_types, self._type_matrix

    def aggregate(
        self, item: dict, scores: np.ndarray, aggregation_strategy: str, keep_outside: bool = False
    ) -> list[dict]:
        """Entities of one tweet from its word tag probabilities `scores` (words, labels) (see
        `entity_aggregation.aggregate_entities`; `keep_outside`: `O` words and runs are returned too)."""
        return aggregate_entities(self.labels, item, scores, aggregation_strategy, self._types(), keep_outside)

    def _ignored_labels(self, ignore_labels, aggregation_strategy: str) -> frozenset:
        """`ignore_labels` as a set; warns once per labels and strategy about labels that can leave nothing out:
        neither `O`, a tag nor an entity type of the model, or a tag with a grouping strategy (groups are labelled
        by type, as in the token-classification pipeline)."""
        key = (tuple(ignore_labels), aggregation_strategy)
        known = self._checked_ignore_labels.get(key)
        if known is not None:
            return known
        types_ = set(self._types()[0])
        unknown = [label for label in ignore_labels if label != "O" and label not in types_ | set(self.labels)]
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
        self._checked_ignore_labels[key] = frozenset(ignore_labels)
        return self._checked_ignore_labels[key]

    # -- saving --------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, **kwargs):
        """Saves the model, the processor and this pipeline's code, with `custom_pipelines` in `config.json`, so
        that `pipeline(model=save_directory, trust_remote_code=True)` gives this pipeline back."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory} is a file, not a folder")
        os.makedirs(save_directory, exist_ok=True)
        existing = getattr(self.model.config, "custom_pipelines", None)
        # add_pipeline_to_folder (below) warns about other pipelines
        self.model.config.custom_pipelines = custom_pipelines(existing, save_directory, warn=False)
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory, **kwargs)
        if self.retrieval_index is not None:
            self.retrieval_index.save_pretrained(save_directory)  # the folder retrieves as this pipeline does
        add_pipeline_to_folder(save_directory)


class _Batch:
    """Several inputs that `preprocess` encodes together; `offset` is the first one's index in the whole input;
    `normalised`: the items are already `PMNERPipeline._normalise`d (and carry their own index)."""

    def __init__(self, items: list, offset: int = 0, normalised: bool = False):
        self.items = items
        self.offset = offset
        self.normalised = normalised


def register_pipeline():
    """Registers `multimodal-ner` with transformers in this process: `pipeline("multimodal-ner", model=folder)`
    then uses this class, and `PMNERPipeline.save_pretrained` knows its task."""
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is PMNERPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=PMNERPipeline, pt_model=AutoModelForTokenClassification, type="multimodal"
    )


def custom_pipelines(existing: dict | None, folder, warn: bool = True) -> dict:
    """The `custom_pipelines` of a saved P-MNER config: this pipeline under `multimodal-ner` only.

    One entry, because `pipeline(model=folder, trust_remote_code=True)` (no task) reads the task from
    `custom_pipelines` only when it holds exactly one; so this pipeline is not also registered as
    `token-classification` (an entry of this pipeline under another name is dropped). Entries of other pipelines
    are kept, with a warning: `pipeline()` then needs the task named.
    """
    custom = {
        name: entry for name, entry in (existing or {}).items()
        if name != TASK and not (isinstance(entry, dict) and entry.get("impl") == CUSTOM_PIPELINE_ENTRY["impl"])
    }
    if custom and warn:
        logger.warning(
            f"{folder}: config.json registers other pipelines too ({sorted(custom)}): "
            f"pipeline(model=...) then needs task={TASK!r}"
        )
    custom[TASK] = copy.deepcopy(CUSTOM_PIPELINE_ENTRY)
    return custom


def add_pipeline_to_folder(folder) -> list[str]:
    """Makes a saved P-MNER model folder pipeline-ready.

    Copies this file and its siblings (`text_tweet_tokenizer.py`, `processing_pmner.py` and what that imports) into
    `folder`, with `handler.py` (the Inference Endpoints handler), and sets `custom_pipelines` (see `custom_pipelines`) in its `config.json`, so that
    `pipeline(model=folder, trust_remote_code=True)` (task found from the config) and
    `pipeline("multimodal-ner", model=folder, trust_remote_code=True)` work. Safe to call again.

    Returns:
        The files written.
    """
    folder = os.fspath(folder)
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} does not exist: save the model in {folder} first")
    with open(config_file, encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("model_type") != "pmner":
        raise ValueError(f"{config_file} is not a P-MNER config (model_type={config.get('model_type')!r})")
    if not os.path.isfile(os.path.join(folder, "processor_config.json")):
        logger.warning(
            f"{folder} has no processor_config.json: save the processor there too "
            "(processor.save_pretrained(folder)), the pipeline needs it"
        )
    written = [str(path) for path in custom_object_save(PMNERPipeline, folder)]
    handler = os.path.join(os.path.dirname(os.path.abspath(__file__)), HANDLER_FILE)
    if os.path.isfile(handler):  # absent where this file runs as remote code: a saved folder keeps its own copy
        shutil.copyfile(handler, os.path.join(folder, HANDLER_FILE))
        written.append(os.path.join(folder, HANDLER_FILE))
    config["custom_pipelines"] = custom_pipelines(config.get("custom_pipelines"), folder)
    temporary = f"{config_file}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, config_file)
    return written + [config_file]


__all__ = [
    "PMNERPipeline", "QUANTIZE_OPTIONS", "TASK", "add_pipeline_to_folder", "custom_pipelines", "feed_forward_linears",
    "quantize_dynamic_int8", "register_pipeline",
]
