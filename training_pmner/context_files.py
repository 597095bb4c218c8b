"""Auxiliary context made elsewhere (image captions, LLM-written knowledge as in PGIM, retrieved passages), read from
a JSONL or Parquet file into the Twitter MNER builder's `context` column.

Each record has a `context` (a string, or null for none) and the tweet it belongs to: `id` (the dataset's id,
`"twitter2017-train-0"`) or `image_id` (the tweet's IMGID, e.g. `"16_05_01_6"`). A tweet takes the record of its id
first, else the one of its image id; a tweet with neither has no context.
"""

import hashlib
import json
import os


CONTEXT_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class ContextFileError(ValueError):
    """A context file that cannot be read; the message names the file and the line (or row)."""


def file_sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _records(path: str):
    """`(where, record)` pairs: `where` is "line N" (JSONL) or "row N" (Parquet)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow's own errors, re-raised naming the file
            raise ContextFileError(f"{path}: not a readable Parquet file ({type(error).__name__}: {error})") from error
        for row, record in enumerate(table.to_pylist(), start=1):
            yield f"row {row}", record
        return
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ContextFileError(f"{path}:{number}: not UTF-8 text ({error.reason} at byte {error.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ContextFileError(f"{path}:{number}: invalid JSON: {error.msg} (column {error.colno})") from error
            yield f"line {number}", record


def read_context_file(path: str) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """`(by_id, by_image_id)`: the context of each tweet id and of each image id in the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"context_file={path!r} is not a file")
    if not path.endswith(CONTEXT_FILE_SUFFIXES):
        raise ContextFileError(f"context_file={path!r}: expected a {', '.join(CONTEXT_FILE_SUFFIXES)} file")
    by_id, by_image_id, seen = {}, {}, {}
    for where, record in _records(path):
        if not isinstance(record, dict):
            raise ContextFileError(f"{path} {where}: expected an object, got {type(record).__name__}")
        if "context" not in record:
            raise ContextFileError(f"{path} {where}: no 'context' field (fields: {sorted(record)})")
        context = record["context"]
        if context is not None and not isinstance(context, str):
            raise ContextFileError(f"{path} {where}: 'context' must be a string or null, got {type(context).__name__}")
        keys = [(name, record.get(name)) for name in ("id", "image_id") if record.get(name) is not None]
        if not keys:
            raise ContextFileError(f"{path} {where}: needs 'id' or 'image_id' to say which tweet it belongs to")
        for name, value in keys:
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ContextFileError(f"{path} {where}: '{name}' must be a string, got {type(value).__name__}")
            value = str(value)
            if (name, value) in seen:
                raise ContextFileError(f"{path} {where}: {name} {value!r} already has a context ({seen[name, value]})")
            seen[name, value] = where
            (by_id if name == "id" else by_image_id)[value] = context or None
    return by_id, by_image_id
