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
standard library, and relatively its siblings (copied with it): `pipeline_parameters.py` (the options),
`pipeline_inputs.py` (input normalisation, contexts and visual features, with `text_tweet_tokenizer.py`),
`pipeline_batching.py` (batches of tweets of similar length), `pipeline_word_scores.py` (row predictions to word tag
probabilities), `pipeline_entities.py` (word tags to entities), `pipeline_grounding.py` (`return_grounding`),
`pipeline_quantization.py` (`quantize="int8"`) and `processing_pmner.py` (the processor/model label check).
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

from .pipeline_batching import BUCKET_BATCHES, TweetBatch, bucketed_results, subword_lengths
from .pipeline_entities import IgnoredLabels, aggregate_entities, entity_types, word_rows
from .pipeline_grounding import DEFAULT_GROUNDING_THRESHOLD, add_grounding, head_mean, item_objects, word_attentions
from .pipeline_inputs import (
    InputWarnings,
    contexts_of,
    is_stream,
    iterate_inputs,
    load_retrieval_index,
    normalise_input,
    visual_inputs,
    with_contexts,
    with_images,
)
from .pipeline_parameters import DEFAULT_IGNORE_LABELS, split_parameters
from .pipeline_quantization import QUANTIZE_OPTIONS, _check_cpu, feed_forward_linears, quantize_dynamic_int8
from .pipeline_word_scores import word_scores
from .processing_pmner import check_processor_matches_model


logger = logging.get_logger(__name__)

TASK = "multimodal-ner"
HANDLER_FILE = "handler.py"  # Inference Endpoints' custom handler, copied into saved folders
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
        source = getattr(self.processor, "context_source", None)
        self.retrieval_index = load_retrieval_index(retrieval_index, source, self.model)
        self.input_warnings = InputWarnings()
        self.entity_types, self.type_matrix = entity_types(self.labels)
        self.ignored_labels = IgnoredLabels(self.labels, self.entity_types)

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
        return split_parameters(
            aggregation_strategy, ignore_labels, return_words, output_scheme, is_split_into_words, return_grounding,
            grounding_threshold, **kwargs,
        )

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
            inputs = with_images(inputs, image, batched, split)
        if context is not None:
            inputs = with_contexts(inputs, context, batched, split)
        if streamed:
            # any other iterable (datasets.Dataset, streaming IterableDataset, KeyDataset, torch Dataset): a generator,
            # so that transformers streams it (results come back as an iterator, in input order)
            return super().__call__(iterate_inputs(inputs), **kwargs)
        if not batched:
            # transformers' `run_single`: `preprocess` takes one raw input, `postprocess` gives a list of one result
            return super().__call__(inputs, **kwargs)[0]
        return super().__call__(list(inputs), **kwargs) if inputs else []

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        """Streams results in input order: `batch_size * BUCKET_BATCHES` tweets are read ahead, sorted by length and
        cut into batches of `batch_size` tweets, each run by `run_single` (one processor call and one forward).

        transformers' own iterator preprocesses each input alone and batches consecutive inputs by collating their
        tensors; a P-MNER batch is encoded in one processor call (a long tweet gives several window rows) from
        tweets sorted by length, which its iterator cannot express."""
        if num_workers and num_workers > 1:
            raise ValueError(
                f"num_workers={num_workers}: the multimodal-ner pipeline encodes each batch in the calling process "
                "(images are read and encoded on the pipeline's device); use batch_size to batch"
            )
        split = preprocess_params.get("is_split_into_words", False)
        return bucketed_results(
            inputs,
            max(1, int(batch_size or 1)),
            BUCKET_BATCHES,
            normalise=lambda item, index: self._normalise(item, index, split),
            length_keys=self._length_keys,
            run_batch=lambda batch: self._run_batch(batch, preprocess_params, forward_params, postprocess_params),
        )

    def _length_keys(self, items: list[dict]) -> list[int]:
        """Each tweet's sort key: its sub-words (see `pipeline_batching.subword_lengths`)."""
        return subword_lengths(self.processor.tokenizer, items)

    def _run_batch(self, batch: TweetBatch, preprocess_params, forward_params, postprocess_params) -> list:
        """The results of a batch of tweets, in its order: `preprocess`, `forward` and `postprocess` once each."""
        return self.run_single(batch, preprocess_params, forward_params, postprocess_params)

    def get_inference_context(self):
        return torch.inference_mode

    # -- pre-processing ------------------------------------------------------------------------------------------

    def _normalise(self, item, index: int, is_split_into_words: bool) -> dict:
        """`{"index", "text", "words", "spans", "image", "visual_features", ...}` of one input."""
        return normalise_input(item, index, is_split_into_words, self.input_warnings)

    def preprocess(self, inputs, is_split_into_words: bool = False):
        """The model inputs of a `TweetBatch` (or of one raw input, as tweet 0), with what `postprocess` needs."""
        if isinstance(inputs, TweetBatch):
            items = list(inputs.items)
        else:
            items = [self._normalise(inputs, 0, is_split_into_words)]
        features, mask = visual_inputs(
            items, self.processor.image_processor, self.use_visual, self.device,
            getattr(self.model.config, "visual_feature_dim", None), self.input_warnings,
        )
        visual = {} if features is None else {"visual_features": features, "visual_mask": mask}
        contexts = contexts_of(
            items, self.retrieval_index, getattr(self.processor, "context_source", None), self.device,
            self.input_warnings,
        )
        encoding = self.processor([item["words"] for item in items], return_tensors="pt", context=contexts, **visual)
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
        """The result of each tweet of the batch, in its order."""
        meta = model_outputs["meta"]
        results = []
        attention = model_outputs["object_attention"].value if "object_attention" in model_outputs else None
        if return_grounding and attention is not None:
            attention = word_attentions(attention, meta.encoding.mapping, [len(item["words"]) for item in meta.items])
        ignored = self.ignored_labels.of(ignore_labels, aggregation_strategy)
        keep_outside = "O" not in ignored
        scores_of = word_scores(model_outputs["probabilities"], meta.encoding.mapping, meta.items, len(self.labels))
        for position, (item, scores) in enumerate(zip(meta.items, scores_of)):
            entities = self.aggregate(item, scores, aggregation_strategy, keep_outside=keep_outside)
            entities = self.ignored_labels.kept(entities, ignored)
            if return_grounding:
                add_grounding(
                    entities, item["spans"], None if attention is None else attention[position],
                    item.get("object_mask"), item_objects(item, self.processor.image_processor), grounding_threshold,
                )
            if return_words:
                words = word_rows(self.labels, item, scores, output_scheme)
                results.append({"text": item["text"], "entities": entities, "words": words})
            else:
                results.append(entities)
        return results

    def aggregate(self, item: dict, scores: np.ndarray, aggregation_strategy: str, keep_outside=False) -> list[dict]:
        """Entities of one tweet from its word tag probabilities `scores` (words, labels) (see
        `pipeline_entities.aggregate_entities`; `keep_outside`: `O` words and runs are returned too)."""
        types = (self.entity_types, self.type_matrix)
        return aggregate_entities(self.labels, item, scores, aggregation_strategy, types, keep_outside)

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
