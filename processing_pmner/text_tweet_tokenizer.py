"""Splits a raw tweet into words the way the Twitter-2015/2017 MNER data is tokenised, keeping character offsets.

The benchmark's CoNLL files (e.g. `twitter2017/train.txt`) split tweets as follows, and so does `split_tweet`:

- `#` and `@` are their own words: `#NBAAwards` -> `#`, `NBAAwards`; `@warriors` -> `@`, `warriors`;
- every punctuation mark and symbol is its own word, apostrophes and hyphens included: `It's` -> `It`, `'`, `s`;
  `all-time` -> `all`, `-`, `time`; `...` -> `.`, `.`, `.`; `&gt;` -> `&`, `gt`, `;`;
- every emoji code point is its own word, variation selectors and skin-tone modifiers included (`⚽️` -> `⚽`,
  `\\ufe0f`), as are zero-width spaces;
- numbers keep their inner `.`, `,` and `:` (`2.00`, `10,000`, `9:30`) and a comma right after them when a space
  follows (`May 21, 2016` -> `May`, `21,`, `2016`: 57 of 58 such commas in Twitter-2017); digits that start a word are split from the
  letters after them (`2nd` -> `2`, `nd`), while a word that starts with a letter or `_` keeps its digits and
  underscores (`Z100TheBeat`, `_HS_Soccer`, `luke_Miller1522`);
- letters of any script, with their combining marks (`Beyonce\\u0301`), stay together;
- emoticons such as `:)`, `:(`, `:-(`, `;D`, `:O`, `<3` stay one word;
- URLs (`https://...`, `www....`), absent from the benchmark (it removed them), stay one word, without trailing
  punctuation.

Every word comes with its `(start, end)` character offsets in the input: `text[start:end] == word`.

This file is copied flat into saved model folders (remote code): it imports only the standard library.
"""

import re
import unicodedata


__all__ = ["split_tweet", "join_words"]

_URL = re.compile(r"(?:[Hh][Tt][Tt][Pp][Ss]?://|[Ww][Ww][Ww]\.)\S+?(?=[.,;:!?)\]}'\"’”…]*(?:\s|$))")
# eyes, optional nose, mouth; not followed by a letter or digit (":pizza" is ":" + "pizza")
_EMOTICON = re.compile(r"(?:[:;=][\-o^']?[)(\]\[dDpPoO/\\|*]+|<3+)(?![^\W_])")
# a comma right after a number, before a space, stays with it ("May 21, 2016" -> "21,"), as in the data
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*(?:,(?=\s|$))?")
_VARIATION_SELECTORS = (0xFE00, 0xFE0F, 0xE0100, 0xE01EF)
_JOINERS = ("\u200c", "\u200d")


def _is_word_char(char: str) -> bool:
    """Letters, marks, numbers and connector punctuation (`_`), except emoji variation selectors."""
    code = ord(char)
    if _VARIATION_SELECTORS[0] <= code <= _VARIATION_SELECTORS[1]:
        return False
    if _VARIATION_SELECTORS[2] <= code <= _VARIATION_SELECTORS[3]:
        return False
    return unicodedata.category(char)[0] in "LMN" or unicodedata.category(char) == "Pc"


def _is_letter(char: str) -> bool:
    return unicodedata.category(char)[0] == "L"


def split_tweet(text: str) -> list[tuple[str, int, int]]:
    """The words of a raw tweet, each as `(word, start, end)` with `text[start:end] == word`.

    Args:
        text: the tweet as posted (any Unicode; whitespace of any kind separates words).

    Returns:
        The words in order; an empty list for an empty or all-whitespace text.
    """
    if not isinstance(text, str):
        raise TypeError(f"split_tweet expects a string, got {type(text).__name__}")
    words = []
    position, length = 0, len(text)
    while position < length:
        char = text[position]
        if char.isspace():
            position += 1
            continue
        end = None
        match = _URL.match(text, position)
        if match:
            end = match.end()
        elif char in ":;=<" and (position == 0 or not _is_word_char(text[position - 1])):
            match = _EMOTICON.match(text, position)
            if match:
                end = match.end()
        if end is None and char.isdecimal():
            end = _NUMBER.match(text, position).end()
        if end is None and _is_word_char(char):
            end = position + 1
            while end < length:
                current = text[end]
                if _is_word_char(current):
                    end += 1
                elif current in _JOINERS and end + 1 < length and _is_letter(text[end + 1]) and _is_letter(text[end - 1]):
                    end += 1  # ZWNJ / ZWJ inside a word (Persian, Indic scripts)
                else:
                    break
        if end is None:
            end = position + 1  # punctuation, symbol, emoji, modifier: one code point
        words.append((text[position:end], position, end))
        position = end
    return words


def join_words(words: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Pre-split words as one text (joined by single spaces) and each word's `(start, end)` in it."""
    spans, start = [], 0
    for index, word in enumerate(words):
        if not isinstance(word, str):
            raise TypeError(f"word {index} is a {type(word).__name__}; expected a string")
        spans.append((start, start + len(word)))
        start += len(word) + 1
    return " ".join(words), spans
