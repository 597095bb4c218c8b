"""How the P-MNER processor turns word-tokenised tweets into model rows: [`PromptRows`], owned by
[`PMNERProcessor`] and built from its settings (tokenizer, template, prompt mode, `max_length`, `stride`, `overflow`,
tags).

Each sentence is first planned (its sub-word counts, whether its context fits, its word windows and the window that
predicts each word), then becomes rows (token mode: one per window; cloze mode: one per word), which are tokenised
together and aligned (word ids, prediction positions, labels), then padded.

This file is copied flat into saved processor folders (remote code): it imports its siblings only relatively.
"""

import copy
import warnings
from dataclasses import dataclass

import torch

from .text_label_alignment import align_row, tag_ids
from .text_prompt_template import PromptTemplate
from .text_windows import window_owner, word_windows


MAPPING_KEYS = ("sample_mapping", "word_ids", "prediction_word_index", "windows", "query_word")
# warnings point at the caller of PMNERProcessor.__call__ (warn <- plan step <- encode <- __call__ <- caller)
CALLER = 5


class TruncationWarning(UserWarning):
    """Issued when `overflow="truncate"` drops words of a sentence."""


def _fit(words: list[str], pieces: list[int], free: int) -> list[str] | None:
    """The longest first part of a context whose sub-words fit in `free` tokens (`None`: not one word fits)."""
    total = 0
    for count, length in enumerate(pieces):
        total += length
        if total > free:
            return words[:count] or None
    return words or None


def as_batch(words_or_batch) -> tuple[list[list[str]], bool]:
    """`(sentences as lists of words, whether one sentence was given)`."""
    if isinstance(words_or_batch, str):
        return [words_or_batch.split()], True
    items = list(words_or_batch)
    if all(isinstance(item, str) for item in items):
        return [items], True  # one pre-tokenised sentence (an empty list is one empty sentence)
    sentences = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            sentences.append(item.split())
        elif isinstance(item, (list, tuple)) and all(isinstance(word, str) for word in item):
            sentences.append(list(item))
        else:
            raise ValueError(
                f"sentence {index} is a {type(item).__name__}; expected a list of words (strings) or a string"
            )
    return sentences, False


@dataclass
class SentencePlan:
    """How one sentence becomes rows: its words (one the tokenizer cannot encode in a row is the unknown token),
    their sub-word counts, its windows, the window that predicts each kept word, its context and tag ids."""

    index: int
    words: list[str]
    counts: list[int]
    windows: list[tuple[int, int]]
    owners: list[int]
    context: list[str] | None
    context_pieces: list[int] | None
    tags: list[int] | None
    dropped: int


@dataclass
class PlannedRow:
    """One row before tokenisation: its words and their roles, its context words, and `predicted_at`, the sentence
    word predicted at the first sub-word of each role."""

    sample: int
    window: tuple[int, int]
    query: int | None
    words: list[str]
    roles: list
    context: list[str] | None
    predicted_at: dict
    tags: list[int] | None


class PromptRows:
    """Builds the rows of [`PMNERProcessor`] (see the module docstring); its settings are never changed in place."""

    def __init__(self, tokenizer, template: PromptTemplate, prompt_mode: str, max_length: int, stride: int,
                 overflow: str, label_names: list[str], tag_scheme: str):
        self.tokenizer = tokenizer
        self.template = template
        self.prompt_mode = prompt_mode
        self.max_length = max_length
        self.stride = stride
        self.overflow = overflow
        self.label_names = list(label_names)
        self.tag_scheme = tag_scheme
        self.template_tokens = self._template_tokens()

    def settings(self) -> tuple:
        """The arguments these rows were built from, in order."""
        return (self.tokenizer, self.template, self.prompt_mode, self.max_length, self.stride, self.overflow,
                self.label_names, self.tag_scheme)

    def __deepcopy__(self, memo):
        # ProcessorMixin.to_dict deep-copies the processor's attributes but not its tokenizer: share it, and the
        # settings (never changed in place)
        return copy.copy(self)

    # -- sizes ----------------------------------------------------------------------------------------------------

    def word_pieces(self, words: list[str]) -> list[list[int]]:
        """Sub-word ids of each word (as the tokenizer splits them in context, words separated by spaces)."""
        if not words:
            return []
        # a whole tweet longer than model_max_length is tokenised here to place its windows: no length warning
        encoding = self.tokenizer(list(words), is_split_into_words=True, add_special_tokens=False, verbose=False)
        pieces = [[] for _ in words]
        for token_id, word in zip(encoding["input_ids"], encoding.word_ids()):
            if word is not None:
                pieces[word].append(token_id)
        return pieces

    def _template_tokens(self) -> int:
        """Tokens of the template's literal text and mask (not `{sentence}`; `{word}` in token mode, as a mask)."""
        total = 0
        for element in self.template.elements:
            if element[0] == "text":
                total += sum(len(pieces) or 1 for pieces in self.word_pieces(element[1]))
            elif element[0] == "mask" or (element[0] == "word" and self.prompt_mode == "token"):
                total += 1
        return total

    @property
    def row_limit(self) -> int:
        return min(self.max_length, self.tokenizer.model_max_length or self.max_length)

    def budget(self, max_word_pieces: int, pair: bool = False) -> int:
        """Sentence tokens that fit in one row (`pair`: a row that also holds a context)."""
        budget = self.row_limit - self.tokenizer.num_special_tokens_to_add(pair=pair) - self.template_tokens
        if self.prompt_mode == "cloze":
            budget -= max_word_pieces
        return budget

    def context_words(self, context, batch_size: int, single: bool) -> list[list[str] | None]:
        """Per sentence, the context's words (at most as many as a row has tokens) or `None`."""
        if context is None:
            return [None] * batch_size
        if single and (isinstance(context, str) or context is None):
            context = [context]
        if isinstance(context, (str, bytes, dict)) or not hasattr(context, "__iter__"):
            raise ValueError(
                f"context must be a string (or None) per sentence, a list for a batch; got {type(context).__name__}"
            )
        context = list(context)  # a list, tuple, array or `datasets` column
        if len(context) != batch_size:
            raise ValueError(f"context has {len(context)} entries for {batch_size} sentences")
        contexts = []
        for index, text in enumerate(context):
            if text is not None and not isinstance(text, str):
                raise ValueError(f"context of sentence {index} is a {type(text).__name__}; expected a string or None")
            words = text.split() if text else []
            contexts.append(words[: self.row_limit] or None)  # every word takes at least one token
        return contexts

    # -- rows -----------------------------------------------------------------------------------------------------

    def encode(self, sentences: list[list[str]], labels, contexts=None) -> tuple[list[dict], dict]:
        """Every row (input ids, attention mask, token types, labels) and the mapping back to sentences and words."""
        contexts = contexts or [None] * len(sentences)
        planned, dropped = [], []
        for index, sentence in enumerate(sentences):
            tags = None
            if labels is not None:
                tags = tag_ids(labels[index], len(sentence), index, self.label_names, self.tag_scheme)
            plan = self._plan(index, sentence, contexts[index], tags)
            dropped.append(plan.dropped)
            planned += self._token_rows(plan) if self.prompt_mode == "token" else self._cloze_rows(plan)
        mapping = {key: [] for key in MAPPING_KEYS}
        mapping.update(num_words=[len(sentence) for sentence in sentences], num_dropped_words=dropped)
        rows = [self._aligned(row, *encoded, mapping) for row, encoded in zip(planned, self._tokenize(planned))]
        return rows, mapping

    def _plan(self, index: int, sentence: list[str], context, tags) -> SentencePlan:
        """The plan step: sub-word counts, the context kept or not, the windows and the window of each word."""
        words, counts = self._encodable(index, sentence, pair=context is not None)
        budget = self.budget(max(counts, default=0), pair=context is not None)
        if context is not None and sum(counts) > budget:
            # the pair's own separators (1-2 tokens) must not cost the tweet a word: a tweet that fits a row
            # alone, or one cut to one row anyway (overflow="truncate"), is encoded without its context
            alone = self.budget(max(counts, default=0), pair=False)
            if sum(counts) <= alone or self.overflow == "truncate":
                context, budget = None, alone
        context_pieces = None
        if context is not None:
            context_pieces = [len(pieces) or 1 for pieces in self.word_pieces(context)]
            if sum(counts) > budget and self.overflow == "window":
                # a tweet that needs windows: each window leaves up to half the row to the context
                budget -= min(sum(context_pieces), budget // 2)
        windows, dropped = self._windows(index, counts, budget)
        kept = windows[-1][1] if self.overflow == "truncate" else len(words)
        owners = [window_owner(windows, word, kept) for word in range(kept)]
        return SentencePlan(index, words, counts, windows, owners, context, context_pieces, tags, dropped)

    def _encodable(self, index: int, sentence: list[str], pair: bool) -> tuple[list[str], list[int]]:
        """The sentence's words and their sub-word counts; a word the tokenizer drops (e.g. a zero-width space) or
        one too long for a row (with a warning) is the unknown token, so it keeps a position."""
        base = self.budget(0, pair=pair)
        # a cloze row holds the queried word twice (in the sentence and in the template)
        limit = base if self.prompt_mode == "token" else base // 2
        words, counts = list(sentence), []
        for position, pieces in enumerate(self.word_pieces(words)):
            if pieces and len(pieces) > limit:
                warnings.warn(
                    f"sentence {index}, word {position} ({words[position][:40]!r}) has {len(pieces)} sub-words, "
                    f"more than fit in max_length={self.max_length}; it is encoded as {self.tokenizer.unk_token}",
                    TruncationWarning,
                    stacklevel=CALLER,
                )
            if not pieces or len(pieces) > limit:
                words[position], pieces = self.tokenizer.unk_token, [self.tokenizer.unk_token_id]
            counts.append(len(pieces))
        return words, counts

    def _windows(self, index: int, counts: list[int], budget: int) -> tuple[list[tuple[int, int]], int]:
        """`(windows, dropped word count)`: all windows, or the first one only with `overflow="truncate"`."""
        windows = word_windows(counts, budget, self.stride)
        if self.overflow != "truncate" or len(windows) == 1:
            return windows, 0
        dropped = len(counts) - windows[0][1]
        warnings.warn(
            f"sentence {index} does not fit in max_length={self.max_length}: its last {dropped} of "
            f"{len(counts)} words are dropped (overflow='truncate'; use overflow='window' to keep them)",
            TruncationWarning,
            stacklevel=CALLER,
        )
        return windows[:1], dropped

    def _token_rows(self, plan: SentencePlan) -> list[PlannedRow]:
        """Token mode: one row per window, each word predicted at its first sub-word in the window that owns it."""
        rows = []
        for number, window in enumerate(plan.windows):
            words, roles = self.template.row_words(plan.words, window, None, self.tokenizer.mask_token)
            predicted_at = {word: word for word in range(*window) if plan.owners[word] == number}
            context = self._row_context(plan, window, query_tokens=0)
            rows.append(PlannedRow(plan.index, window, None, words, roles, context, predicted_at, plan.tags))
        return rows

    def _cloze_rows(self, plan: SentencePlan) -> list[PlannedRow]:
        """Cloze mode: one row per word, in the window that owns it, predicted at the mask."""
        rows = []
        for word, owner in enumerate(plan.owners):
            window = plan.windows[owner]
            words, roles = self.template.row_words(plan.words, window, word, self.tokenizer.mask_token)
            context = self._row_context(plan, window, query_tokens=plan.counts[word])
            rows.append(PlannedRow(plan.index, window, word, words, roles, context, {"mask": word}, plan.tags))
        return rows

    def _row_context(self, plan: SentencePlan, window: tuple[int, int], query_tokens: int) -> list[str] | None:
        """The first words of the sentence's context that fit beside the row's sentence words (and query)."""
        if plan.context is None:
            return None
        free = self.budget(0, pair=True) - sum(plan.counts[window[0] : window[1]]) - query_tokens
        return _fit(plan.context, plan.context_pieces, free)

    def _tokenize(self, rows: list[PlannedRow]) -> list[tuple]:
        """Per row, `(encoding, index in it)`: rows without context in one call, rows with one as text pairs in
        another, the context truncated (`only_second`) to what the row leaves free."""
        # S = (s_0, ..., s_n+1) of section 3.1: the wrapped words between the tokenizer's special tokens
        encoded = [None] * len(rows)
        plain = [number for number, row in enumerate(rows) if row.context is None]
        paired = [number for number, row in enumerate(rows) if row.context is not None]
        if plain:
            encoding = self.tokenizer(
                [rows[number].words for number in plain], is_split_into_words=True, add_special_tokens=True,
                truncation=False,
            )
            for position, number in enumerate(plain):
                encoded[number] = (encoding, position)
        if paired:
            encoding = self.tokenizer(
                [rows[number].words for number in paired],
                [rows[number].context for number in paired],
                is_split_into_words=True,
                add_special_tokens=True,
                truncation="only_second",
                max_length=self.row_limit,
            )
            for position, number in enumerate(paired):
                encoded[number] = (encoding, position)
        return encoded

    def _aligned(self, row: PlannedRow, encoding, position: int, mapping: dict) -> dict:
        """The model inputs and labels of one tokenised row; its word ids, prediction positions, window and query
        are appended to `mapping`."""
        input_ids = encoding["input_ids"][position]
        if len(input_ids) > self.row_limit:
            raise RuntimeError(
                f"sentence {row.sample}: a row has {len(input_ids)} tokens, over max_length={self.max_length}; the "
                "tokenizer splits words differently in context than alone"
            )
        word_ids, prediction, labels = align_row(
            encoding.word_ids(position), encoding.sequence_ids(position), row.roles, row.predicted_at, row.tags
        )
        entry = {"input_ids": input_ids, "attention_mask": [1] * len(input_ids)}
        if "token_type_ids" in encoding:
            entry["token_type_ids"] = encoding["token_type_ids"][position]
        if labels is not None:
            entry["labels"] = labels
        for key, value in zip(MAPPING_KEYS, (row.sample, word_ids, prediction, row.window, row.query)):
            mapping[key].append(value)
        return entry

    def pad(self, rows: list[dict], padding: str, mapping: dict, with_labels: bool) -> dict:
        """Pads the rows (and the per-position lists of `mapping`, so positions match the tensors); with
        `"do_not_pad"`, returns the rows as lists of their own lengths. No rows (cloze mode, empty sentences) still
        give every key, with zero rows."""
        if rows:
            keys = [key for key in ("input_ids", "attention_mask", "token_type_ids", "labels") if key in rows[0]]
        else:
            keys = ["input_ids", "attention_mask"]
            keys += ["token_type_ids"] if "token_type_ids" in self.tokenizer.model_input_names else []
            keys += ["labels"] if with_labels else []
        if padding == "do_not_pad":
            return {key: [row[key] for row in rows] for key in keys}
        longest = max((len(row["input_ids"]) for row in rows), default=0)
        length = self.max_length if padding == "max_length" else longest
        pad_values = {
            "input_ids": self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0,
            "attention_mask": 0,
            "token_type_ids": self.tokenizer.pad_token_type_id,
            "labels": -100,
        }
        left = self.tokenizer.padding_side == "left"
        data = {}
        for key in keys:
            value = pad_values[key]
            padded = []
            for row in rows:
                fill = [value] * (length - len(row[key]))
                padded.append(fill + row[key] if left else row[key] + fill)
            data[key] = torch.tensor(padded, dtype=torch.long).reshape(len(rows), length)  # (rows, L)
        for key, value in (("word_ids", None), ("prediction_word_index", -1)):
            mapping[key] = [
                [value] * (length - len(ids)) + ids if left else ids + [value] * (length - len(ids))
                for ids in mapping[key]
            ]
        return data


__all__ = ["PromptRows", "TruncationWarning", "as_batch"]
