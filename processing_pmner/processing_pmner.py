"""P-MNER processor: the prompt-template tokenizer (paper section 3.1) with the FRR image processor (section 3.2).

The sentence is wrapped in the template "<sentence> , the word of <word> is <mask> ." and the masked LM predicts
tags through the verbalizer. Two prompt modes use the same model:

- `"token"` (default): one row per tweet. The template follows the sentence (its `{word}` and `{mask}` slots are mask
  tokens) and every word is predicted at its own first sub-word; template tokens get the label -100.
- `"cloze"`: the paper's literal form, one row per word, "<sentence> , the word of <word> is [MASK] .", predicted at
  the mask position.

An optional auxiliary text per tweet (`context`: retrieved neighbours, a caption, LLM-written knowledge) follows the
prompt-wrapped tweet as the second text of a pair (separated as the tokenizer separates a pair). It is never
labelled, counts in the length budget and is cut first: the tweet's words are never dropped for it (a tweet that
fits a row alone leaves the context what remains). A tweet too long for one row is windowed with up to half of each
row kept for the context, so every window holds the context's first words.

Sentences longer than `max_length` are split into overlapping word windows (`overflow="window"`, default) whose
predictions are merged back to one tag per word, or cut with a warning and a count of dropped words
(`overflow="truncate"`). Nothing is cut silently.

The rows themselves (plan, windows, context, padding) are built by `PromptRows` (`text_prompt_rows.py`), which the
processor owns; the template is parsed in `text_prompt_template.py`, tags are turned into ids and aligned to sub-words
in `text_label_alignment.py`, the tag schemes and the processor/model label check live in `text_tag_schemes.py`, the
word-start spaces of byte-level BPE tokenizers in `text_word_start_spaces.py`, the windows in `text_windows.py`, the
row-to-word mapping in `text_row_mapping.py`; their public names are re-exported here. This file is copied flat into
saved processor folders (remote code) with those siblings: it imports them only relatively.
"""

import json
import os
from types import SimpleNamespace

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

from .image_frr_models import save_with_frr_weights
from .image_frr_weights import hub_kwargs_of, resolve_revision_once
from .image_processing_pmner import PMNERImageProcessor
from .text_prompt_rows import PromptRows, TruncationWarning, as_batch
from .text_prompt_template import DEFAULT_PROMPT_TEMPLATE, PromptTemplate
from .text_row_mapping import mapping_columns, mapping_of, merge_rows
from .text_windows import window_owner, word_windows
from .text_tag_schemes import (
    _split_tag,
    bio_to_bioes,
    bioes_to_bio,
    check_processor_matches_model,
    convert_tags,
    tag_parts,
    tag_scheme_of,
)
from .text_word_start_spaces import PROBE_WORDS, split_words_match_running_text, with_word_start_spaces


logger = logging.get_logger(__name__)

PROMPT_MODES = ("token", "cloze")
OVERFLOW_MODES = ("window", "truncate")
DEFAULT_LABEL_NAMES = ["O"] + [f"{p}-{e}" for e in ("PER", "LOC", "ORG", "MISC") for p in ("B", "I")]


def _as_float_tensor(values, name: str) -> torch.Tensor:
    """A float32 tensor from a tensor, a numpy array or (nested) lists of numbers or arrays."""
    if isinstance(values, torch.Tensor):
        return values.detach().float()
    if isinstance(values, (list, tuple)) and values and all(isinstance(value, torch.Tensor) for value in values):
        values = [value.detach().cpu().numpy() for value in values]
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{name} must be numbers of one shape (a tensor, a numpy array or nested lists); could not convert a "
            f"{type(values).__name__}: {error}"
        ) from error
    return torch.from_numpy(array)


def _visual_inputs(image_processor, batch_size, single, images, visual_features, visual_mask, image_kwargs):
    """`(features (batch, objects, D), mask (batch, objects))` from images, precomputed features or nothing."""
    if images is not None and visual_features is not None:
        raise ValueError("pass either `images` or precomputed `visual_features`, not both")
    if images is not None:
        if single and not (isinstance(images, (list, tuple)) and len(images) == 1):
            images = [images]
        images = list(images)
        if len(images) != batch_size:
            raise ValueError(f"images has {len(images)} entries for {batch_size} sentences")
        output = image_processor(images, return_tensors="pt", **(image_kwargs or {}))
        return output["visual_features"], output["visual_mask"]
    if visual_features is not None:
        features = _as_float_tensor(visual_features, "visual_features")
        if single and features.dim() == 2:
            features = features.unsqueeze(0)  # (1, objects, D)
        if features.dim() != 3 or features.shape[0] != batch_size:
            raise ValueError(
                f"visual_features has shape {tuple(features.shape)}; expected (batch={batch_size}, objects, dim)"
            )
        finite = torch.isfinite(features).flatten(1).all(dim=1)  # (batch,)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            raise ValueError(
                f"visual_features of sentence(s) {bad[:10]} (row index in this batch) hold NaN or infinite "
                "values; the model would give NaN logits. Re-extract those images' features"
            )
        if visual_mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool)  # (batch, objects)
        else:
            mask = torch.as_tensor(np.asarray(visual_mask) if isinstance(visual_mask, list) else visual_mask).bool()
            if single and mask.dim() == 1:
                mask = mask.unsqueeze(0)  # (1, objects)
            if mask.shape != features.shape[:2]:
                raise ValueError(
                    f"visual_mask has shape {tuple(mask.shape)}; expected {tuple(features.shape[:2])}"
                )
        return features, mask
    if visual_mask is not None:
        raise ValueError("visual_mask was given without visual_features")
    objects, dim = image_processor.max_objects, image_processor.feature_dim
    return (
        torch.zeros(batch_size, objects, dim),  # (batch, objects, D): no image
        torch.zeros(batch_size, objects, dtype=torch.bool),  # (batch, objects)
    )


def _model_config_beside(pretrained_model_name_or_path, hub_kwargs: dict) -> tuple[str, SimpleNamespace | None]:
    """`(where, config)`: the P-MNER model config (`config.json` with `model_type` "pmner") saved in the same folder
    or Hub repo as a processor, as a namespace with its `id2label` and `tag_scheme`; `None` when there is none (a
    processor saved alone, another model type, or a Hub file not reachable offline)."""
    from transformers.utils import cached_file

    location = os.fspath(pretrained_model_name_or_path)
    path = cached_file(location, "config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if path is None:
        return location, None
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"config.json of {location} ({path}) cannot be read as JSON: {error}") from error
    if not isinstance(config, dict) or config.get("model_type") != "pmner":
        return location, None
    if not isinstance(config.get("id2label"), dict):
        logger.warning(
            f"config.json of {location} is a P-MNER model config without an id2label mapping (written by hand?): the "
            "processor's label_names are not checked against the model's tags at load"
        )
        return location, None
    return location, SimpleNamespace(
        num_labels=len(config["id2label"]), id2label=config["id2label"], tag_scheme=config.get("tag_scheme")
    )


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")  # what a P-MNER processor saves its tokenizer as


def _require_tokenizer_files(pretrained_model_name_or_path, hub_kwargs: dict) -> None:
    """A saved processor's tokenizer files must all be there: without `tokenizer.json`, transformers builds a
    tokenizer of a few special tokens and every word becomes the unknown token, with no error."""
    from transformers.utils import cached_file

    location = os.fspath(pretrained_model_name_or_path)
    missing = [
        name for name in TOKENIZER_FILES
        if cached_file(location, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs) is None
    ]
    if missing:
        raise OSError(
            f"{location} has no {' or '.join(missing)}: the processor's tokenizer cannot be loaded (it would turn "
            "every word into the unknown token). Copy the folder whole, or save the processor again"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


class PMNERBatchFeature(BatchFeature):
    """A [`BatchFeature`] whose keys are the model inputs (so `model(**batch)` works), with `mapping`: what maps
    rows and positions back to the input sentences and words.

    `mapping` keys (one entry per row unless said):
    - `sample_mapping`: the input sentence of each row.
    - `word_ids`: per position, the sentence word it belongs to (`None` for special, template and padding tokens).
    - `prediction_word_index`: per position, the word predicted there (`-1` elsewhere): the first sub-word of each
      word in the window that owns it (token mode), or the mask position (cloze mode).
    - `windows`: the `(start, end)` word range of the sentence in each row.
    - `query_word`: the queried word (cloze mode), else `None`.
    - `num_words` (per sentence): word count of each input sentence.
    - `num_dropped_words` (per sentence): words cut by `overflow="truncate"` (always 0 with windows).
    """

    def __init__(self, data=None, tensor_type=None, mapping: dict | None = None):
        super().__init__(data, tensor_type=tensor_type)
        self.mapping = mapping or {}

    def __getstate__(self):
        return {"data": self.data, "mapping": self.mapping}

    def __setstate__(self, state):
        self.data = state["data"]
        self.mapping = state.get("mapping", {})

    def word_ids(self, row: int = 0) -> list:
        """Sentence word index of each position of `row` (`None` outside the sentence)."""
        return list(self.mapping["word_ids"][row])

    @property
    def num_dropped_words(self) -> list[int]:
        return list(self.mapping["num_dropped_words"])

    @property
    def sample_mapping(self) -> list[int]:
        return list(self.mapping["sample_mapping"])


# ----------------------------------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------------------------------


class PMNERProcessor(ProcessorMixin):
    r"""
    Processor of P-MNER: wraps word-tokenised tweets in the prompt template, tokenises them with the masked LM's
    tokenizer, aligns word tags to sub-words and adds the FRR visual features of the tweets' images.

    Args:
        image_processor ([`PMNERImageProcessor`], *optional*):
            The FRR image processor; a default one (built lazily) when omitted.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The masked LM's tokenizer (needs a mask token).
        prompt_template (`str`, defaults to `"{sentence} , the word of {word} is {mask} ."`):
            The template of section 3.1 with the fields `{sentence}`, `{word}` and `{mask}` (each at most once;
            `{sentence}` is required, `{word}` and `{mask}` are required in cloze mode). Literal text is split on
            spaces into words.
        prompt_mode (`str`, defaults to `"token"`):
            `"token"` (one row per tweet, every word predicted at its own position) or `"cloze"` (one row per word,
            predicted at the mask: about 15x the rows, and behind token mode at the same number of training steps
            in the README's runs).
        label_names (`list[str]`, *optional*):
            The model's tags in id order (`list(config.id2label.values())`); their scheme (BIO, or BIOES when E-/S-
            tags are present) is the processor's. Defaults to BIO over PER, LOC, ORG, MISC.
        max_length (`int`, defaults to 128):
            Longest row in tokens, special tokens and template included.
        stride (`int`, defaults to 16):
            Words shared by consecutive windows of a sentence longer than `max_length`.
        overflow (`str`, defaults to `"window"`):
            `"window"`: long sentences become several overlapping rows, all words predicted. `"truncate"`: the
            words that do not fit are dropped, with a `TruncationWarning` and `num_dropped_words` in the mapping.
        context_source (`dict`, *optional*):
            What auxiliary context the model was trained with, e.g. `{"kind": "retrieval", "k": 3, ...}` or
            `{"kind": "column", "description": ...}`; `None` (default) for none. A record for users, the model card
            and the pipeline (which retrieves from the saved index when the kind is `"retrieval"`); the processor
            encodes whatever `context` it is given.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        prompt_mode: str = "token",
        label_names: list[str] | None = None,
        max_length: int = 128,
        stride: int = 16,
        overflow: str = "window",
        context_source: dict | None = None,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("PMNERProcessor needs a `tokenizer` (the masked LM's)")
        if image_processor is None:
            image_processor = PMNERImageProcessor()
        # byte-level BPE: every word with its word-start space, as in running text (Ġ); saved with the tokenizer
        tokenizer = with_word_start_spaces(tokenizer)
        super().__init__(image_processor, tokenizer, **kwargs)
        self.prompt_template = prompt_template
        self.prompt_mode = prompt_mode
        self.label_names = list(label_names) if label_names is not None else list(DEFAULT_LABEL_NAMES)
        self.max_length = int(max_length)
        self.stride = int(stride)
        self.overflow = overflow
        self.context_source = dict(context_source) if context_source else None
        self._template = PromptTemplate(prompt_template)
        self._validate()

    @property
    def prompt_rows(self) -> PromptRows:
        """The row builder of the current settings, built again when one of them changed (the pipeline sets
        `overflow`, a deep copy has its own tokenizer)."""
        settings = (self.tokenizer, self._template, self.prompt_mode, self.max_length, self.stride, self.overflow,
                    self.label_names, self.tag_scheme)
        rows = self.__dict__.get("_prompt_rows")
        if rows is None or rows.settings() != settings:  # the tokenizer and the template compare by identity
            rows = self._prompt_rows = PromptRows(*settings)
        return rows

    # -- settings -------------------------------------------------------------------------------------------------

    def _validate(self):
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {self.prompt_mode!r}")
        if self.overflow not in OVERFLOW_MODES:
            raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {self.overflow!r}")
        if self.stride < 0:
            raise ValueError(f"stride must be at least 0, got {self.stride}")
        if self.tokenizer.mask_token is None:
            raise ValueError(f"the tokenizer {type(self.tokenizer).__name__} has no mask token")
        if self.prompt_mode == "cloze" and not {"word", "mask"} <= self._template.fields:
            raise ValueError(
                f"prompt_mode='cloze' needs the fields {{word}} and {{mask}} in prompt_template={self.prompt_template!r}"
            )
        if "O" not in self.label_names:
            raise ValueError(f"label_names must contain 'O', got {self.label_names}")
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"label_names has duplicates: {self.label_names}")
        for index, name in enumerate(self.label_names):
            _split_tag(name, index, "BIOES")
        self.label2id = {name: index for index, name in enumerate(self.label_names)}
        self.tag_scheme = tag_scheme_of(self.label_names)
        budget = self.prompt_rows.budget(max_word_pieces=1)
        if budget < 1:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for the sentence: the special tokens and the template "
                f"{self.prompt_template!r} already take {self.max_length - budget + 1} tokens"
            )

    @property
    def model_input_names(self) -> list[str]:
        names = [name for name in self.tokenizer.model_input_names if name in ("input_ids", "token_type_ids", "attention_mask")]
        return names + list(self.image_processor.model_input_names)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Loads a saved processor (folder or Hub repo). When the same folder or repo holds a P-MNER model
        (`config.json` with `model_type` "pmner"), a processor whose tags or tag scheme differ from the model's is
        refused with a `ValueError` naming both: the model's logits would be read as other tags.

        The FRR weights files saved with the image processor (`frr_weights`) are located here, in the folder or Hub
        repo at the same revision as the settings, whatever route transformers takes to build the image processor
        (its own `from_pretrained`, or `from_dict` from the nested settings); an `image_processor` passed in is used
        as it is."""
        # ProcessorMixin.from_pretrained's positional parameters, after the path
        kwargs = {**dict(zip(("cache_dir", "force_download", "local_files_only", "token", "revision"), args)), **kwargs}
        kwargs = resolve_revision_once(pretrained_model_name_or_path, kwargs)
        given_image_processor = kwargs.get("image_processor") is not None
        hub_kwargs = hub_kwargs_of(kwargs)
        if kwargs.get("tokenizer") is None:
            _require_tokenizer_files(pretrained_model_name_or_path, hub_kwargs)
        loaded = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        processor = loaded[0] if isinstance(loaded, tuple) else loaded
        if not given_image_processor and hasattr(processor.image_processor, "attach_frr_weights"):
            processor.image_processor.attach_frr_weights(pretrained_model_name_or_path, **hub_kwargs)
        location, model_config = _model_config_beside(pretrained_model_name_or_path, hub_kwargs)
        if model_config is not None:
            try:
                check_processor_matches_model(processor, model_config)
            except ValueError as error:
                raise ValueError(f"{error} (processor_config.json and config.json of {location})") from error
        return loaded

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Saves the processor and, with the image processor's `save_frr_weights`, its detector and backbone weights
        (`frr_detector.safetensors`, `frr_backbone.safetensors`), which `from_pretrained` reads back."""
        return save_with_frr_weights(
            self, self.image_processor, super().save_pretrained, save_directory, push_to_hub, **kwargs
        )

    # -- main call -----------------------------------------------------------------------------------------------

    def __call__(
        self,
        words_or_batch=None,
        images=None,
        labels=None,
        visual_features=None,
        visual_mask=None,
        return_tensors: str | None = "pt",
        padding: bool | str = "longest",
        return_mapping: bool = False,
        image_kwargs: dict | None = None,
        context=None,
        **kwargs,
    ) -> PMNERBatchFeature:
        """Encodes word-tokenised sentences (with their images or precomputed features, and their tags).

        Args:
            words_or_batch: one sentence as a list of words (or a string, split on spaces), or a list of them.
            images: one image per sentence (anything [`PMNERImageProcessor`] reads; `None` for no image).
            labels: per sentence, one tag per word: tag strings in BIO or BIOES (converted to the processor's
                scheme) or ids of `label_names`.
            visual_features: precomputed features (batch, objects, feature_dim) instead of `images`.
            visual_mask: their mask (batch, objects); all true when omitted.
            return_tensors: `"pt"` (default), `"np"` or `None` (lists).
            padding: `"longest"` (default, or `True`), `"max_length"`, or `False` / `"do_not_pad"`: rows keep their own
                lengths (needs `return_tensors=None`; for `datasets.map`, leaving padding to the data collator).
            return_mapping: also put `sample_mapping`, `word_ids`, `prediction_word_index` (rows, length; -1 where
                none) and `num_words` in the returned data (e.g. to keep them through `datasets.map`).
            image_kwargs: arguments of the image processor call (e.g. `{"device": "cuda"}`).
            context: an auxiliary text per sentence (a string, or `None` / `""` for none; a list for a batch), put
                after the prompt-wrapped sentence as the second text of a pair, never labelled, and cut first when
                the row is over `max_length`.

        Returns:
            [`PMNERBatchFeature`] with `input_ids`, `attention_mask`, `token_type_ids` (when the tokenizer has them),
            `visual_features` (rows, objects, feature_dim), `visual_mask` (rows, objects) and, with labels, `labels`
            (rows, length) with -100 where no tag is predicted; its `mapping` maps rows back to sentences and words.
        """
        if kwargs:
            raise TypeError(f"PMNERProcessor got unexpected arguments {sorted(kwargs)}")
        if words_or_batch is None:
            raise ValueError("PMNERProcessor needs the words of at least one sentence")
        sentences, single = as_batch(words_or_batch)
        if labels is not None:
            labels = [labels] if single else list(labels)
            if len(labels) != len(sentences):
                raise ValueError(f"labels has {len(labels)} entries for {len(sentences)} sentences")
        if padding is True or padding is False:
            padding = "longest" if padding else "do_not_pad"
        if padding not in ("longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be 'longest' (True), 'max_length' or 'do_not_pad' (False), got {padding!r}")
        if padding == "do_not_pad" and return_tensors is not None:
            raise ValueError(
                f"padding=False ('do_not_pad') leaves rows of different lengths, which "
                f"return_tensors={return_tensors!r} cannot hold: pass return_tensors=None"
            )

        prompt_rows = self.prompt_rows
        contexts = prompt_rows.context_words(context, len(sentences), single)
        rows, mapping = prompt_rows.encode(sentences, labels, contexts)
        visual = _visual_inputs(
            self.image_processor, len(sentences), single, images, visual_features, visual_mask, image_kwargs
        )
        data = prompt_rows.pad(rows, padding, mapping, with_labels=labels is not None)
        row_samples = torch.tensor(mapping["sample_mapping"], dtype=torch.long)  # (rows,)
        data["visual_features"] = visual[0][row_samples]  # (rows, objects, D)
        data["visual_mask"] = visual[1][row_samples]  # (rows, objects)
        if return_mapping:
            data.update(mapping_columns(mapping, as_tensors=padding != "do_not_pad"))
        if return_tensors == "np":
            data = {key: value.numpy() for key, value in data.items()}
        elif return_tensors is None:
            data = {key: value.tolist() if isinstance(value, torch.Tensor) else value for key, value in data.items()}
        elif return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        return PMNERBatchFeature(data, mapping=mapping)

    # -- decoding ------------------------------------------------------------------------------------------------

    def merge_window_predictions(self, predictions, batch, fill=None) -> list[list]:
        """Per input sentence, per word, the row value at the position that predicts it.

        `predictions` is (rows, length, ...) (ids, logits or probabilities). Each word is read in exactly one row:
        the window where it has most context (token mode) or its cloze query. Words without a prediction (dropped
        by truncation) get `fill`.
        """
        return merge_rows(predictions, mapping_of(batch), fill)

    def post_process_token_classification(self, predictions, batch, output_scheme: str = "BIO") -> list[list[str]]:
        """Per input sentence, one tag per word.

        Args:
            predictions: the model's logits (rows, length, num_labels) (or its output, with `.logits`), or predicted
                ids (rows, length).
            batch: what the processor returned for those rows ([`PMNERBatchFeature`], or a dict made with
                `return_mapping=True`).
            output_scheme: `"BIO"` (default) or `"BIOES"`.

        Words dropped by `overflow="truncate"` are tagged "O" (their count is in `batch.num_dropped_words`).
        """
        if hasattr(predictions, "logits"):
            predictions = predictions.logits
        if isinstance(predictions, torch.Tensor):
            predictions = predictions.detach().cpu().numpy()
        predictions = np.asarray(predictions)
        if predictions.ndim == 3:
            predictions = predictions.argmax(-1)  # (rows, length)
        if predictions.ndim != 2:
            raise ValueError(f"predictions have shape {predictions.shape}; expected (rows, length[, num_labels])")
        merged = self.merge_window_predictions(predictions, batch, fill=self.label2id["O"])
        tags = [[self.label_names[int(label)] for label in sentence] for sentence in merged]
        if output_scheme == "BIO":
            return [bioes_to_bio(sentence) if self.tag_scheme == "BIOES" else sentence for sentence in tags]
        if output_scheme == "BIOES":
            return [bio_to_bioes(sentence) if self.tag_scheme == "BIO" else sentence for sentence in tags]
        raise ValueError(f"output_scheme must be 'BIO' or 'BIOES', got {output_scheme!r}")

    def extract_dataset_features(self, dataset, **kwargs):
        """[`PMNERImageProcessor.extract_dataset_features`] of the image processor."""
        return self.image_processor.extract_dataset_features(dataset, **kwargs)


__all__ = [
    "PMNERBatchFeature",
    "PMNERProcessor",
    "PROBE_WORDS",
    "TruncationWarning",
    "bio_to_bioes",
    "bioes_to_bio",
    "check_processor_matches_model",
    "convert_tags",
    "split_words_match_running_text",
    "tag_parts",
    "tag_scheme_of",
    "window_owner",
    "with_word_start_spaces",
    "word_windows",
]
