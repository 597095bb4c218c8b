"""Words given one by one (`is_split_into_words=True`) encoded as in running text.

Byte-level BPE tokenizers (RoBERTa, GPT-2, ...) without `add_prefix_space=True` encode every word as if it began the
text; `with_word_start_spaces` gives them the word-start space they had in pretraining.

Copied flat into saved processor folders (remote code) with `processing_pmner.py`: imports only transformers.
"""

import copy
import json

from transformers.utils import logging


logger = logging.get_logger(__name__)

# a probe whose words after the first must get the same sub-words alone as in running text
PROBE_WORDS = ("RT", "Kawhi", "Leonard", "wins", "the", "#NBAAwards", "vote", "in", "2017", "!")


def split_words_match_running_text(tokenizer, words=PROBE_WORDS) -> bool:
    """Whether `tokenizer(words, is_split_into_words=True)` gives the words after the first the ids they get in
    `tokenizer(" ".join(words))`. Byte-level BPE tokenizers (RoBERTa, GPT-2) without `add_prefix_space=True` do not:
    each word is then encoded as if it began the text ("Leonard" as `Le onar d` instead of `ĠLeonard`)."""
    split = tokenizer(list(words), is_split_into_words=True, add_special_tokens=False)
    rest = [token for token, word in zip(split["input_ids"], split.word_ids()) if word is not None and word > 0]
    running = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    first = tokenizer(words[0], add_special_tokens=False)["input_ids"]
    return running[: len(first)] == first and running[len(first) :] == rest


def _prefix_space_settings(settings):
    """The backend component (JSON) with a word-start space on every word: ByteLevel `add_prefix_space`, Metaspace
    `prepend_scheme="always"`; `(settings, changed)`."""
    if isinstance(settings, list):
        changed = False
        items = []
        for item in settings:
            item, item_changed = _prefix_space_settings(item)
            items.append(item)
            changed |= item_changed
        return items, changed
    if not isinstance(settings, dict):
        return settings, False
    settings, changed = dict(settings), False
    if settings.get("type") in ("ByteLevel", "RobertaProcessing") and settings.get("add_prefix_space") is False:
        settings["add_prefix_space"] = True
        changed = True
    if settings.get("type") == "Metaspace" and settings.get("prepend_scheme") == "never":
        settings["prepend_scheme"] = "always"
        changed = True
    for key in ("pretokenizers", "processors", "decoders"):
        if key in settings:
            settings[key], inner = _prefix_space_settings(settings[key])
            changed |= inner
    return settings, changed


def with_word_start_spaces(tokenizer):
    """`tokenizer` when it already encodes words given one by one (`is_split_into_words=True`) as in running text;
    otherwise a copy with `add_prefix_space=True` (byte-level BPE: RoBERTa, Longformer, DeBERTa v1, GPT-2), whose
    backend pre-tokenizer gives every word its word-start space. The copy saves `add_prefix_space: true` in
    `tokenizer_config.json` and `tokenizer.json`, so `AutoTokenizer` / `AutoProcessor.from_pretrained` reload it
    so. WordPiece (BERT, DistilBERT, ELECTRA) and SentencePiece (XLM-R, "▁") tokenizers are returned unchanged."""
    if split_words_match_running_text(tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    changed = False
    if backend is not None:
        settings = json.loads(backend.to_str())
        fixed = dict(settings)
        for key in ("pre_tokenizer", "post_processor", "decoder"):
            fixed[key], key_changed = _prefix_space_settings(settings.get(key))
            changed |= key_changed
    if changed:
        rebuilt = type(backend).from_str(json.dumps(fixed))
        tokenizer = copy.deepcopy(tokenizer)
        backend = tokenizer.backend_tokenizer
        for key in ("pre_tokenizer", "post_processor", "decoder"):
            if fixed.get(key) is not None:
                setattr(backend, key, getattr(rebuilt, key))
        tokenizer.add_prefix_space = True
        tokenizer.init_kwargs["add_prefix_space"] = True
    if not split_words_match_running_text(tokenizer):
        logger.warning(
            f"the tokenizer {type(tokenizer).__name__} encodes words given one by one differently from running text "
            f"(probe {list(PROBE_WORDS)}), and P-MNER could not set it right (no ByteLevel or Metaspace pre-tokenizer to "
            "give a word-start space): the encoder sees other sub-words than in pretraining"
        )
    return tokenizer



__all__ = ["PROBE_WORDS", "split_words_match_running_text", "with_word_start_spaces"]
