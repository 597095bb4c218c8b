"""Reading the input of `pmner-predict`: JSONL and CoNLL files (or stdin) to `Record`s, one per tweet, with an
`InputError` (its line and why) in place of each line or CoNLL tweet that cannot be read; the input format guessed
from the extension or the first line; the number of tweets of a file, for the progress bar.
"""

import contextlib
import json
import os
import sys
from dataclasses import dataclass


JSONL_EXTENSIONS = (".jsonl", ".json", ".ndjson")
CONLL_EXTENSIONS = (".txt", ".conll", ".tsv", ".bio")
IMGID_PREFIX = "IMGID:"


@dataclass
class Record:
    """One tweet of the input."""

    line: int
    text: str | None = None
    words: list | None = None
    gold: list | None = None
    image: str | None = None
    image_id: str | None = None
    context: str | None = None
    record_id: object = None
    has_id: bool = False


class InputError(ValueError):
    """A line of the input that cannot be read; the message says why."""


def open_input(path: str):
    """The input as bytes: each line is decoded on its own, so that one line of invalid UTF-8 is reported (with
    its number) instead of stopping the run."""
    if path == "-":
        return contextlib.nullcontext(sys.stdin.buffer)
    return open(path, "rb")


def decoded_lines(handle):
    """`(line number, text without the line break, or None if the line is not UTF-8, the decoding error)`."""
    for number, raw in enumerate(handle, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # byte order mark
        try:
            yield number, raw.decode("utf-8").rstrip("\n").rstrip("\r"), None
        except UnicodeDecodeError as error:
            yield number, None, f"not valid UTF-8 (byte {error.start}: {raw[error.start:error.start + 1]!r})"


def guess_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(JSONL_EXTENSIONS):
        return "jsonl"
    if lower.endswith(CONLL_EXTENSIONS):
        return "conll"
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        for line in handle:
            if line.strip():
                return "jsonl" if line.lstrip().startswith("{") else "conll"
    return "jsonl"


def _image_path(image: str | None, image_dir: str | None) -> str | None:
    if image is None:
        return None
    if image_dir and not os.path.isabs(image):
        return os.path.join(image_dir, image)
    return image


def read_jsonl(handle, image_dir: str | None, image_extension: str):
    """Yields `Record`s, or `InputError`s (with their line) for lines that cannot be read."""
    for number, line, decoding_error in decoded_lines(handle):
        if decoding_error is not None:
            yield InputError(f"{number}\t{decoding_error}")
            continue
        if not line.strip():
            continue
        try:
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"invalid JSON: {error.msg} (column {error.colno})") from error
            if not isinstance(data, dict):
                raise InputError(f"expected a JSON object, got {type(data).__name__}")
            text_keys = [key for key in ("text", "words", "tokens") if data.get(key) is not None]
            if len(text_keys) != 1:
                raise InputError(
                    f"needs exactly one of 'text', 'words' or 'tokens', found {text_keys or 'none'}"
                )
            record = Record(line=number)
            if text_keys[0] == "text":
                if not isinstance(data["text"], str):
                    raise InputError(f"'text' must be a string, got {type(data['text']).__name__}")
                record.text = data["text"]
            else:
                words = data[text_keys[0]]
                if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
                    raise InputError(f"'{text_keys[0]}' must be a list of strings")
                record.words = words
            image = data.get("image")
            if image is not None and not isinstance(image, str):
                raise InputError(f"'image' must be a path (string) or null, got {type(image).__name__}")
            image_id = data.get("image_id")
            if image_id is not None and not isinstance(image_id, (str, int)):
                raise InputError(f"'image_id' must be a string, got {type(image_id).__name__}")
            record.image_id = None if image_id is None else str(image_id)
            context = data.get("context")
            if context is not None and not isinstance(context, str):
                raise InputError(f"'context' must be a string or null, got {type(context).__name__}")
            record.context = context or None
            record.image = _image_path(image, image_dir)
            if record.image is None and record.image_id is not None and image_dir:
                record.image = os.path.join(image_dir, record.image_id + image_extension)
            if "id" in data:
                record.record_id, record.has_id = data["id"], True
        except InputError as error:
            yield InputError(f"{number}\t{error}")
            continue
        yield record


def read_conll(handle, image_dir: str | None, image_extension: str):
    """Yields `Record`s (one per tweet, `line` = its first line), or `InputError`s for tweets with a bad line."""
    current, problem = None, None

    def finish():
        if current is None:
            return None
        if problem is not None:
            return InputError(f"{problem[0]}\t{problem[1]}")
        if not current.words:
            return InputError(f"{current.line}\tIMGID:{current.image_id} has no token lines")
        gold = current.gold
        if all(tag is None for tag in gold):
            current.gold = None
        elif any(tag is None for tag in gold):
            return InputError(f"{current.line}\tsome token lines of this tweet have a tag and some do not")
        return current

    for number, line, decoding_error in decoded_lines(handle):
        if decoding_error is not None:
            if current is None:
                current = Record(line=number, words=[], gold=[])
            if problem is None:
                problem = (number, decoding_error)
            continue
        if line.startswith(IMGID_PREFIX) or not line.strip():
            result = finish()
            if result is not None:
                yield result
            current, problem = None, None
            if line.startswith(IMGID_PREFIX):
                image_id = line[len(IMGID_PREFIX):].strip()
                current = Record(line=number, words=[], gold=[], image_id=image_id or None)
                if not image_id:
                    problem = (number, "IMGID: without an image id")
                elif image_dir:
                    current.image = os.path.join(image_dir, image_id + image_extension)
            continue
        if current is None:
            current = Record(line=number, words=[], gold=[])
        fields = line.split("\t")
        if len(fields) > 2 and problem is None:
            problem = (number, f"expected 'token<TAB>tag', found {len(fields)} tab-separated fields: {line[:80]!r}")
        current.words.append(fields[0])
        current.gold.append(fields[1].strip() if len(fields) > 1 else None)
    result = finish()
    if result is not None:
        yield result


def count_records(path: str, input_format: str) -> int | None:
    """How many tweets the file holds (for the progress bar); `None` for stdin."""
    if path == "-":
        return None
    count, in_tweet = 0, False
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if input_format == "jsonl":
                count += bool(line.strip())
            elif line.startswith(IMGID_PREFIX) or not line.strip():
                count += line.startswith(IMGID_PREFIX)
                in_tweet = line.startswith(IMGID_PREFIX)
            elif not in_tweet:
                count += 1  # a tweet without IMGID line
                in_tweet = True
    return count
