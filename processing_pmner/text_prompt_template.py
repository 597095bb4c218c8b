"""The prompt template of P-MNER (paper section 3.1), "<sentence> , the word of <word> is <mask> .": its parsing and
the words it wraps around a sentence.

Copied flat into saved processor folders (remote code) with `processing_pmner.py`: imports nothing of this project.
"""

import string


DEFAULT_PROMPT_TEMPLATE = "{sentence} , the word of {word} is {mask} ."
TEMPLATE_FIELDS = ("sentence", "word", "mask")


class PromptTemplate:
    """A parsed prompt template: `elements` in order, each `("text", words)` for literal text (split on spaces) or
    `(field,)` for `{sentence}`, `{word}` or `{mask}` (each at most once; `{sentence}` is required)."""

    def __init__(self, template: str):
        self.template = template
        self.elements = self._parse(template)

    @property
    def fields(self) -> set[str]:
        return {element[0] for element in self.elements if element[0] != "text"}

    @staticmethod
    def _parse(template: str) -> list[tuple]:
        elements, seen = [], []
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as error:
            raise ValueError(f"prompt_template={template!r} is not a valid template: {error}") from error
        for literal, field, spec, conversion in parsed:
            if literal.strip():
                elements.append(("text", literal.split()))
            if field is None:
                continue
            if field not in TEMPLATE_FIELDS or spec or conversion:
                raise ValueError(f"prompt_template={template!r}: unknown field {{{field}}}; use {TEMPLATE_FIELDS}")
            if field in seen:
                raise ValueError(f"prompt_template={template!r}: the field {{{field}}} appears twice")
            seen.append(field)
            elements.append((field,))
        if "sentence" not in seen:
            raise ValueError(f"prompt_template={template!r} has no {{sentence}} field")
        return elements

    def row_words(self, sentence: list[str], window: tuple[int, int], query: int | None, mask: str) -> tuple:
        """The words of one row (the sentence wrapped in the template, section 3.1) and, for each, its role: a
        sentence word index, "mask", "query" or None.

        `{word}` is the queried word (cloze mode) or, with no query (token mode), a second mask token."""
        words, roles = [], []
        for element in self.elements:
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


__all__ = ["DEFAULT_PROMPT_TEMPLATE", "PromptTemplate", "TEMPLATE_FIELDS"]
