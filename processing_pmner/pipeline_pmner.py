"""The `multimodal-ner` pipeline of P-MNER: entities of a tweet (raw text or words) and its optional image.

    from transformers import pipeline
    ner = pipeline(model="path/or/hub-id", trust_remote_code=True)
    ner("Kawhi Leonard wins the fan vote ! #NBAAwards", image="photo.jpg")
    # [{'entity_group': 'PER', 'score': 0.98, 'word': 'Kawhi Leonard', 'start': 0, 'end': 13}, ...]

Raw text is split into words as the Twitter MNER benchmark is (see `tweet_tokenizer.py`), with character offsets;
the model predicts one tag per word (at its first sub-word); tweets longer than the model's `max_length` are cut into
overlapping windows by the processor and merged back, so every word is tagged.

A saved model folder gets the pipeline with `add_pipeline_to_folder(folder)` (or `PMNERPipeline.save_pretrained`):
it copies this file and `tweet_tokenizer.py` into the folder and records the task in `config.json`
(`custom_pipelines`), so that `pipeline(model=folder, trust_remote_code=True)` finds the task by itself.

This file is copied flat into saved model folders (remote code): it imports only torch, numpy, transformers and the
standard library, and its siblings `tweet_tokenizer.py` and `processing_pmner.py` (the tag-scheme helpers and the
processor/model label check) relatively.
"""

import copy
import json
import os
import warnings

import numpy as np
import torch
from transformers import AutoModelForTokenClassification, Pipeline
from transformers.dynamic_module_utils import custom_object_save
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging

from .processing_pmner import bio_to_bioes, bioes_to_bio, check_processor_matches_model, tag_parts
from .tweet_tokenizer import join_words, split_tweet


logger = logging.get_logger(__name__)

TASK = "multimodal-ner"
QUANTIZE_OPTIONS = ("int8",)
# tweets read ahead and sorted by length before batching: little padding in each batch, results in input order
BUCKET_BATCHES = 64
LENGTH_WARNING = "sequence-length-is-longer-than-the-specified-maximum"
AGGREGATION_STRATEGIES = ("none", "simple", "first", "max", "average")
OUTPUT_SCHEMES = ("BIO", "BIOES", "model")
INPUT_KEYS = ("text", "words", "tokens", "image", "visual_features", "visual_mask")
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
    A `datasets.Dataset` (rows with `text` or `tokens`, and `image`) or a generator streams results; other keys of a
    dict (ids, gold tags) are ignored with a warning, once per set of keys.

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
        ignore_labels (`list[str]`, defaults to `[]`): entity types (e.g. `"MISC"`) to leave out of the output.
        return_words (`bool`, defaults to `False`): return `{"text", "entities", "words"}` with each word's
            `word`, `start`, `end`, `tag` (in `output_scheme`) and `score`, instead of the entity list.
        output_scheme (`str`, defaults to `"BIO"`): scheme of the word tags returned with `return_words`: `"BIO"`,
            `"BIOES"` or `"model"` (the model's own tags).

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

    def __init__(self, *args, quantize: str | None = None, **kwargs):
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
        self._warned_text_only = False
        self._ignored_keys = set()

    # -- parameters ----------------------------------------------------------------------------------------------

    def _sanitize_parameters(
        self,
        aggregation_strategy=None,
        ignore_labels=None,
        return_words=None,
        output_scheme=None,
        is_split_into_words=None,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(f"the multimodal-ner pipeline got unknown arguments {sorted(kwargs)}")
        preprocess, postprocess = {}, {}
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
            if isinstance(ignore_labels, str) or not all(isinstance(label, str) for label in ignore_labels):
                raise ValueError(f"ignore_labels must be a list of entity types, got {ignore_labels!r}")
            postprocess["ignore_labels"] = list(ignore_labels)
        if return_words is not None:
            postprocess["return_words"] = bool(return_words)
        if output_scheme is not None:
            if output_scheme not in OUTPUT_SCHEMES:
                raise ValueError(f"output_scheme must be one of {OUTPUT_SCHEMES}, got {output_scheme!r}")
            postprocess["output_scheme"] = output_scheme
        if is_split_into_words is not None:
            preprocess["is_split_into_words"] = bool(is_split_into_words)
        return preprocess, {}, postprocess

    # -- calling -------------------------------------------------------------------------------------------------

    def __call__(self, inputs, image=None, **kwargs):
        """Entities of one tweet or of a list of tweets.

        Args:
            inputs: a tweet (`str`, or a dict, see the class docstring) or a list of them; a `datasets.Dataset` or a
                generator streams results.
            image: with one tweet, its image (path, PIL image, ...); with a list, one image (or `None`) per tweet.

        Returns:
            Per tweet, a list of entities `{"entity_group", "score", "word", "start", "end"}`
            (`text[start:end] == word`), or the dict described under `return_words`.
        """
        split = kwargs.get("is_split_into_words", self._preprocess_params.get("is_split_into_words", False))
        if split and isinstance(inputs, (list, tuple)) and inputs and all(isinstance(word, str) for word in inputs):
            inputs = {"words": list(inputs)}  # one pre-split tweet
        batched = isinstance(inputs, (list, tuple))
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
        if batched:
            inputs = list(inputs)
            if not inputs:
                return []
        elif hasattr(inputs, "column_names") and hasattr(inputs, "__getitem__"):
            inputs = _rows(inputs)  # a datasets.Dataset: rows, streamed
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
        raise ValueError(
            f"tweet {index} is a {type(item).__name__}; expected a str, a dict, or a list of words with "
            "is_split_into_words=True"
        )

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

        if hasattr(inputs, "__len__") and hasattr(inputs, "__getitem__") and not isinstance(inputs, (list, tuple)):
            source = _rows(inputs)  # a torch / datasets Dataset, KeyDataset
        else:
            source = inputs
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
        """`{"text", "words", "spans", "image", "visual_features", "visual_mask"}` of one input."""
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
            raise ValueError(f"tweet {index} is a {type(item).__name__}; expected a str, a list of words or a dict")
        unknown = tuple(sorted(set(item) - set(INPUT_KEYS)))
        if unknown and unknown not in self._ignored_keys:
            # e.g. the id and tag columns of a dataset row; said once per set of keys, so that a typo is seen
            self._ignored_keys.add(unknown)
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
        if item.get("visual_mask") is not None and item.get("visual_features") is None:
            raise ValueError(f"tweet {index} has 'visual_mask' without 'visual_features'")
        return {
            "index": index,
            "text": text,
            "words": words,
            "spans": spans,
            "image": item.get("image"),
            "visual_features": item.get("visual_features"),
            "visual_mask": item.get("visual_mask"),
        }

    def _visual_inputs(self, items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(features (batch, objects, D), mask (batch, objects))`: images run through the FRR image processor,
        precomputed features used as given, zeros with an all-false mask for tweets without either."""
        image_processor = self.processor.image_processor
        if not self.use_visual:
            if not self._warned_text_only and any(
                item["image"] is not None or item["visual_features"] is not None for item in items
            ):
                logger.warning("this P-MNER model is text-only (use_visual=False): images are not used")
                self._warned_text_only = True
            return None, None
        per_item = [None] * len(items)
        with_image = [index for index, item in enumerate(items) if item["image"] is not None]
        if with_image:
            output = image_processor(
                [items[index]["image"] for index in with_image], return_tensors="pt", device=self.device
            )
            for row, index in enumerate(with_image):
                per_item[index] = (output["visual_features"][row], output["visual_mask"][row])  # (M, D), (M,)
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
        dims = {entry[0].shape[1] for entry in per_item if entry is not None}
        expected = getattr(self.model.config, "visual_feature_dim", None)
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
            encoding = self.processor([item["words"] for item in items], return_tensors="pt", **visual)
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

    def _forward(self, model_inputs):
        training = self.model.training
        if training:  # a model fresh from its constructor or a training loop: no dropout at inference
            self.model.eval()
        try:
            logits = self.model(**model_inputs["model_inputs"]).logits  # (rows, length, labels)
        finally:
            if training:
                self.model.train()
        probabilities = torch.softmax(logits.float(), dim=-1)  # (rows, length, labels)
        return {"probabilities": probabilities, "meta": model_inputs["meta"]}

    # -- post-processing -----------------------------------------------------------------------------------------

    def postprocess(
        self,
        model_outputs,
        aggregation_strategy: str = "simple",
        ignore_labels: list[str] | None = None,
        return_words: bool = False,
        output_scheme: str = "BIO",
    ) -> list:
        meta = model_outputs["meta"]
        results = []
        for item, scores in zip(meta.items, self._word_scores(model_outputs["probabilities"], meta)):
            entities = self.aggregate(item, scores, aggregation_strategy)
            if ignore_labels:
                entities = [
                    entity for entity in entities
                    if entity.get("entity_group", tag_parts(entity.get("entity", "O"))[1]) not in ignore_labels
                ]
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
        """Entity types and the (labels, types) 0/1 matrix that sums tag probabilities into type probabilities."""
        if not hasattr(self, "_type_matrix"):
            types_ = []
            for label in self.labels:
                entity = tag_parts(label)[1]
                if entity is not None and entity not in types_:
                    types_.append(entity)
            matrix = np.zeros((len(self.labels), len(types_)), dtype=np.float32)
            for row, label in enumerate(self.labels):
                entity = tag_parts(label)[1]
                if entity is not None:
                    matrix[row, types_.index(entity)] = 1.0
            self._entity_types, self._type_matrix = types_, matrix
        return self._entity_types, self._type_matrix

    def _entity(self, item: dict, first: int, last: int, entity_type: str, score: float) -> dict:
        start, end = item["spans"][first][0], item["spans"][last][1]
        return {
            "entity_group": entity_type,
            "score": float(score),
            "word": item["text"][start:end],
            "start": int(start),
            "end": int(end),
        }

    def aggregate(self, item: dict, scores: np.ndarray, aggregation_strategy: str) -> list[dict]:
        """Entities of one tweet from its word tag probabilities `scores` (words, labels)."""
        if aggregation_strategy not in AGGREGATION_STRATEGIES:
            raise ValueError(f"aggregation_strategy must be one of {AGGREGATION_STRATEGIES}, got {aggregation_strategy!r}")
        best = scores.argmax(-1) if len(scores) else np.zeros(0, dtype=int)  # (words,)
        tags = [tag_parts(self.labels[int(label)]) for label in best]
        tag_scores = [float(scores[index, label]) for index, label in enumerate(best)]
        if aggregation_strategy == "none":
            return [
                {
                    "entity": self.labels[int(best[index])],
                    "score": tag_scores[index],
                    "index": index,
                    "word": item["text"][item["spans"][index][0] : item["spans"][index][1]],
                    "start": int(item["spans"][index][0]),
                    "end": int(item["spans"][index][1]),
                }
                for index, (prefix, _) in enumerate(tags)
                if prefix != "O"
            ]
        entities = []
        if aggregation_strategy == "simple":
            group = None  # [first, last, type, scores]
            for index, (prefix, entity) in enumerate(tags):
                ended = group is not None and tag_parts(self.labels[int(best[group[1]])])[0] in ("E", "S")
                if prefix != "O" and group is not None and entity == group[2] and prefix in ("I", "E") and not ended:
                    group[1] = index
                    group[3].append(tag_scores[index])
                    continue
                if group is not None:
                    entities.append(self._entity(item, group[0], group[1], group[2], np.mean(group[3])))
                    group = None
                if prefix != "O":
                    group = [index, index, entity, [tag_scores[index]]]
            if group is not None:
                entities.append(self._entity(item, group[0], group[1], group[2], np.mean(group[3])))
            return entities

        # first / max / average: boundaries from the prefixes, then one type per entity
        types_, matrix = self._types()
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
            entities.append(self._entity(item, first, last, entity_type, score))
        return entities

    # -- saving --------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, **kwargs):
        """Saves the model, the processor and this pipeline's code, with `custom_pipelines` in `config.json`, so
        that `pipeline(model=save_directory, trust_remote_code=True)` gives this pipeline back."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory} is a file, not a folder")
        os.makedirs(save_directory, exist_ok=True)
        custom = dict(getattr(self.model.config, "custom_pipelines", None) or {})
        custom[TASK] = copy.deepcopy(CUSTOM_PIPELINE_ENTRY)
        self.model.config.custom_pipelines = custom
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory, **kwargs)
        add_pipeline_to_folder(save_directory)


def _rows(dataset):
    """The items of an indexable dataset, one by one."""
    for index in range(len(dataset)):
        yield dataset[index]


class _Batch:
    """Several inputs that `preprocess` encodes together; `offset` is the first one's index in the whole input;
    `normalised`: the items are already `PMNERPipeline._normalise`d (and carry their own index)."""

    def __init__(self, items: list, offset: int = 0, normalised: bool = False):
        self.items = items
        self.offset = offset
        self.normalised = normalised


def _check_cpu(device):
    device = torch.device("cpu" if device == -1 else device)
    if device.type != "cpu":
        raise ValueError(
            f"quantize='int8' runs on CPU only (dynamic int8 kernels are CPU kernels); the pipeline's device is "
            f"{device}: pass device='cpu' or leave quantize unset"
        )


def feed_forward_linears(model) -> list[str]:
    """Names of the text encoder's feed-forward `nn.Linear` layers: those to or from `intermediate_size` wide."""
    text_config = getattr(model.config, "text_config", None) or model.config
    width = getattr(text_config, "intermediate_size", None)
    return [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and width is not None and width in (module.in_features, module.out_features)
    ]


def quantize_dynamic_int8(model, device):
    """A copy of `model` whose text encoder's feed-forward `nn.Linear` layers compute with int8 weights (one scale
    per output channel) and dynamically quantised activations (`torch.ao.quantization.quantize_dynamic`).

    The feed-forward layers hold two thirds of the encoder's multiply-adds; the attention projections, the fusion
    layers and the prompt head stay in float, which keeps the tags nearly unchanged (on Twitter-2017 test, all
    linear layers in int8 lost 1.5 to 2.6 F1 points). CPU only: quantised kernels are CPU kernels."""
    _check_cpu(device)
    if torch.backends.quantized.engine == "none" or not torch.backends.quantized.supported_engines:
        raise RuntimeError("quantize='int8': this torch build has no quantized CPU engine")
    names = feed_forward_linears(model)
    if not names:
        raise ValueError(
            f"quantize='int8': no feed-forward linear layers (to or from intermediate_size) found in "
            f"{type(model).__name__}"
        )
    with warnings.catch_warnings():
        # torch marks its eager quantisation API as deprecated (in favour of torchao); it is what this build has
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*", category=UserWarning)
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        engine = torch.backends.quantized.engine
        try:
            # weights packed for oneDNN where available (the packed weights keep their kernels whatever the engine
            # later): on Twitter-2017 test 1.7x tweets/s of float and +0.3 F1, against 1.4x and -0.3 with x86
            if "onednn" in torch.backends.quantized.supported_engines:
                torch.backends.quantized.engine = "onednn"
            quantized = torch.ao.quantization.quantize_dynamic(
                model, {name: qconfig for name in names}, dtype=torch.qint8, inplace=False
            )
        finally:
            torch.backends.quantized.engine = engine
    return quantized.eval()


def register_pipeline():
    """Registers `multimodal-ner` with transformers in this process: `pipeline("multimodal-ner", model=folder)`
    then uses this class, and `PMNERPipeline.save_pretrained` knows its task."""
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is PMNERPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=PMNERPipeline, pt_model=AutoModelForTokenClassification, type="multimodal"
    )


def add_pipeline_to_folder(folder) -> list[str]:
    """Makes a saved P-MNER model folder pipeline-ready.

    Copies this file and its siblings (`tweet_tokenizer.py`, `processing_pmner.py` and what that imports) into
    `folder` and adds `custom_pipelines["multimodal-ner"]` to its `config.json`, so that `pipeline(model=folder, trust_remote_code=True)` (task found from the config) and
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
    custom = dict(config.get("custom_pipelines") or {})
    custom[TASK] = copy.deepcopy(CUSTOM_PIPELINE_ENTRY)
    config["custom_pipelines"] = custom
    temporary = f"{config_file}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, config_file)
    return written + [config_file]


__all__ = ["PMNERPipeline", "QUANTIZE_OPTIONS", "TASK", "add_pipeline_to_folder", "feed_forward_linears", "quantize_dynamic_int8", "register_pipeline"]
