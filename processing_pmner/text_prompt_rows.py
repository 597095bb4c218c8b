"""How the P-MNER processor turns word-tokenised tweets into model rows: the prompt template around each tweet (or
each window of a long one), the optional context as the second text of a pair, sub-word labels and prediction
positions, and padding. A mixin of [`PMNERProcessor`], which holds the settings (tokenizer, template, prompt mode,
`max_length`, `stride`, `overflow`).

This file is copied flat into saved processor folders (remote code): it imports its siblings only relatively.
"""

import warnings

import numpy as np
import torch

from .text_windows import window_owner, word_windows
from .text_tag_schemes import convert_tags


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


class PromptRowsMixin:
    """Row building of [`PMNERProcessor`] (see the module docstring)."""

    # -- tokenisation helpers -----------------------------------------------------------------------------------

    def _word_pieces(self, words: list[str]) -> list[list[int]]:
        """Sub-word ids of each word (as the tokenizer splits them in context, words separated by spaces)."""
        if not words:
            return []
        encoding = self.tokenizer(list(words), is_split_into_words=True, add_special_tokens=False)
        pieces = [[] for _ in words]
        for token_id, word in zip(encoding["input_ids"], encoding.word_ids()):
            if word is not None:
                pieces[word].append(token_id)
        return pieces

    def _template_pieces(self) -> int:
        """Tokens of the template's literal text and mask (not `{word}`, not `{sentence}`)."""
        total = 0
        for element in self._template:
            if element[0] == "text":
                total += sum(len(pieces) or 1 for pieces in self._word_pieces(element[1]))
            elif element[0] == "mask":
                total += 1
            elif element[0] == "word" and self.prompt_mode == "token":
                total += 1
        return total

    def _row_limit(self) -> int:
        return min(self.max_length, self.tokenizer.model_max_length or self.max_length)

    def _budget(self, max_word_pieces: int, pair: bool = False) -> int:
        """Sentence tokens that fit in one row (`pair`: a row that also holds a context)."""
        budget = self._row_limit() - self.tokenizer.num_special_tokens_to_add(pair=pair) - self._template_pieces()
        if self.prompt_mode == "cloze":
            budget -= max_word_pieces
        return budget

    def _row_words(self, sentence: list[str], window: tuple[int, int], query: int | None) -> tuple[list[str], list]:
        """The words of one row and, for each, its role: a sentence word index, "mask", "query" or None."""
        words, roles = [], []
        mask = self.tokenizer.mask_token
        for element in self._template:
            kind = element[0]
            if kind == "text":
                words += element[1]
                roles += [None] * len(element[1])
            elif kind == "sentence":
                words += sentence[window[0] : window[1]]
                roles += list(range(window[0], window[1]))
            elif kind == "mask":
                words.append(mask)
                roles.append("mask")
            elif kind == "word":
                words.append(sentence[query] if query is not None else mask)
                roles.append("query" if query is not None else None)
        return words, roles

    @staticmethod
    def _as_batch(words_or_batch) -> tuple[list[list[str]], bool]:
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

    def _contexts(self, context, batch_size: int, single: bool) -> list[list[str] | None]:
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
            contexts.append(words[: self._row_limit()] or None)  # every word takes at least one token
        return contexts

    def _label_ids(self, tags, num_words: int, sentence: int) -> list[int]:
        if isinstance(tags, (torch.Tensor, np.ndarray)):
            tags = tags.tolist()
        tags = list(tags)
        if len(tags) != num_words:
            raise ValueError(f"sentence {sentence} has {num_words} words but {len(tags)} labels")
        if all(isinstance(tag, (int, np.integer)) and not isinstance(tag, bool) for tag in tags):
            for tag in tags:
                if not 0 <= tag < len(self.label_names):
                    raise ValueError(
                        f"sentence {sentence}: label id {tag} is not an id of label_names ({len(self.label_names)} tags)"
                    )
            return [int(tag) for tag in tags]
        if not all(isinstance(tag, str) for tag in tags):
            raise ValueError(f"sentence {sentence}: labels must be all tag strings or all ids, got {tags}")
        try:
            converted = convert_tags(tags, self.tag_scheme)
        except ValueError as error:
            raise ValueError(f"sentence {sentence}: {error}") from error
        unknown = sorted({(tag, new) for tag, new in zip(tags, converted) if new not in self.label2id})
        if unknown:
            described = [tag if tag == new else f"{tag} (as {new} in {self.tag_scheme})" for tag, new in unknown]
            raise ValueError(f"sentence {sentence}: tags {described} are not in label_names {self.label_names}")
        return [self.label2id[tag] for tag in converted]

    def _encode_rows(self, sentences: list[list[str]], labels, contexts=None) -> tuple[list[dict], dict]:
        """Builds every row (input ids, roles, labels, prediction positions) and the mapping."""
        contexts = contexts or [None] * len(sentences)
        mapping = {
            "sample_mapping": [], "word_ids": [], "prediction_word_index": [], "windows": [], "query_word": [],
            "num_words": [len(sentence) for sentence in sentences], "num_dropped_words": [],
        }
        row_words, row_roles, row_meta, row_contexts = [], [], [], []
        unk = self.tokenizer.unk_token
        for index, sentence in enumerate(sentences):
            sentence = list(sentence)
            tag_ids = self._label_ids(labels[index], len(sentence), index) if labels is not None else None
            pieces = self._word_pieces(sentence)
            base = self._budget(max_word_pieces=0, pair=contexts[index] is not None)
            # a cloze row holds the queried word twice (in the sentence and in the template)
            limit = base if self.prompt_mode == "token" else base // 2
            for position, word_pieces in enumerate(pieces):
                if not word_pieces:
                    sentence[position] = unk  # a word the tokenizer drops (e.g. a zero-width space) keeps a position
                    pieces[position] = [self.tokenizer.unk_token_id]
                elif len(word_pieces) > limit:
                    warnings.warn(
                        f"sentence {index}, word {position} ({sentence[position][:40]!r}) has {len(word_pieces)} "
                        f"sub-words, more than fit in max_length={self.max_length}; it is encoded as {unk}",
                        TruncationWarning,
                        stacklevel=3,
                    )
                    sentence[position] = unk
                    pieces[position] = [self.tokenizer.unk_token_id]
            max_pieces = max((len(p) for p in pieces), default=0)
            budget = base - max_pieces if self.prompt_mode == "cloze" else base
            counts = [len(p) for p in pieces]
            context = contexts[index]
            if context is not None and sum(counts) > budget:
                # the pair's own separators (1-2 tokens) must not cost the tweet a word: a tweet that fits a row
                # alone, or one cut to one row anyway (overflow="truncate"), is encoded without its context
                alone = self._budget(max_word_pieces=0, pair=False)
                alone = alone - max_pieces if self.prompt_mode == "cloze" else alone
                if sum(counts) <= alone or self.overflow == "truncate":
                    context, budget = None, alone
            context_pieces = None
            if context is not None:
                context_pieces = [len(p) or 1 for p in self._word_pieces(context)]
                taken = self._row_limit() - self.tokenizer.num_special_tokens_to_add(pair=True) - self._template_pieces()
                if sum(counts) > budget and self.overflow == "window":
                    # a tweet that needs windows: each window leaves up to half the row to the context
                    budget -= min(sum(context_pieces), budget // 2)
            windows = word_windows(counts, budget, self.stride)
            dropped = 0
            if self.overflow == "truncate" and len(windows) > 1:
                windows = windows[:1]
                dropped = len(sentence) - windows[0][1]
                warnings.warn(
                    f"sentence {index} does not fit in max_length={self.max_length}: its last {dropped} of "
                    f"{len(sentence)} words are dropped (overflow='truncate'; use overflow='window' to keep them)",
                    TruncationWarning,
                    stacklevel=3,
                )
            mapping["num_dropped_words"].append(dropped)
            kept = windows[-1][1] if self.overflow == "truncate" else len(sentence)
            owners = [window_owner(windows, word, kept) for word in range(kept)]
            if self.prompt_mode == "token":
                for window_index, window in enumerate(windows):
                    words, roles = self._row_words(sentence, window, None)
                    row_words.append(words)
                    row_roles.append(roles)
                    row_meta.append((index, window, None, window_index, owners, tag_ids))
                    if context_pieces is not None:
                        free = taken - sum(counts[window[0] : window[1]])
                        row_contexts.append(_fit(context, context_pieces, free))
                    else:
                        row_contexts.append(None)
            else:
                for word in range(kept):
                    window = windows[owners[word]]
                    words, roles = self._row_words(sentence, window, word)
                    row_words.append(words)
                    row_roles.append(roles)
                    row_meta.append((index, window, word, owners[word], owners, tag_ids))
                    if context_pieces is not None:
                        free = taken - sum(counts[window[0] : window[1]]) - counts[word]
                        row_contexts.append(_fit(context, context_pieces, free))
                    else:
                        row_contexts.append(None)

        rows = []
        encoded = self._tokenize_rows(row_words, row_contexts)
        for row, (words, roles, meta) in enumerate(zip(row_words, row_roles, row_meta)):
            sample, window, query, window_index, owners, tag_ids = meta
            encoding, position = encoded[row]
            input_ids = encoding["input_ids"][position]
            if len(input_ids) > self._row_limit():
                raise RuntimeError(
                    f"sentence {sample}: a row has {len(input_ids)} tokens, over max_length={self.max_length}; the "
                    "tokenizer splits words differently in context than alone"
                )
            word_ids, prediction, row_labels = [], [], []
            previous = None
            for token_word, sequence in zip(encoding.word_ids(position), encoding.sequence_ids(position)):
                role = roles[token_word] if token_word is not None and sequence == 0 else None  # context: no role
                first = token_word is not None and token_word != previous
                previous = token_word
                sentence_word = role if isinstance(role, int) else None
                word_ids.append(sentence_word)
                predicted = -1
                if self.prompt_mode == "token" and sentence_word is not None and first:
                    if owners[sentence_word] == window_index:
                        predicted = sentence_word
                elif self.prompt_mode == "cloze" and role == "mask" and first:
                    predicted = query
                prediction.append(predicted)
                if tag_ids is not None:
                    row_labels.append(tag_ids[predicted] if predicted >= 0 else -100)
            entry = {"input_ids": input_ids, "attention_mask": [1] * len(input_ids)}
            if "token_type_ids" in encoding:
                entry["token_type_ids"] = encoding["token_type_ids"][position]
            if tag_ids is not None:
                entry["labels"] = row_labels
            rows.append(entry)
            mapping["sample_mapping"].append(sample)
            mapping["word_ids"].append(word_ids)
            mapping["prediction_word_index"].append(prediction)
            mapping["windows"].append(window)
            mapping["query_word"].append(query)
        return rows, mapping

    def _tokenize_rows(self, row_words: list[list[str]], row_contexts: list) -> list[tuple]:
        """Per row, `(encoding, index in it)`: rows without context in one call, rows with one as text pairs in
        another, the context truncated (`only_second`) to what the row leaves free."""
        encoded = [None] * len(row_words)
        plain = [row for row, context in enumerate(row_contexts) if context is None]
        paired = [row for row, context in enumerate(row_contexts) if context is not None]
        if plain:
            encoding = self.tokenizer(
                [row_words[row] for row in plain], is_split_into_words=True, add_special_tokens=True, truncation=False
            )
            for position, row in enumerate(plain):
                encoded[row] = (encoding, position)
        if paired:
            encoding = self.tokenizer(
                [row_words[row] for row in paired],
                [row_contexts[row] for row in paired],
                is_split_into_words=True,
                add_special_tokens=True,
                truncation="only_second",
                max_length=self._row_limit(),
            )
            for position, row in enumerate(paired):
                encoded[row] = (encoding, position)
        return encoded

    def _pad(self, rows: list[dict], padding: str, mapping: dict, with_labels: bool) -> dict:
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
