"""`pmner-predict`: tag tweets in bulk with a trained P-MNER model.

    pmner-predict MODEL tweets.jsonl -o entities.jsonl --image-dir images/ --batch-size 64 --device cuda
    pmner-predict MODEL twitter2017/test.txt -o predictions.conll --image-dir twitter2017_images \\
        --feature-cache-dir runs/t17/frr_cache
    torchrun --nproc_per_node 4 -m processing_pmner.predict_cli MODEL tweets.jsonl -o entities.jsonl

Input (`--input-format`, guessed from the extension, else from the first line; stdin needs it):
- JSONL: one object per line with `"text"` (a raw tweet) or `"words"`/`"tokens"` (pre-split words), and optionally
  `"image"` (a path; relative paths are read under `--image-dir` when given), `"image_id"` (the key of the tweet's
  features in the FRR cache; with `--image-dir` and no `"image"`, the image is `<image-dir>/<image_id><ext>`),
  `"id"` (copied to the output). Blank lines are skipped.
- CoNLL, the benchmark's format: `IMGID:<id>` lines, `token<TAB>tag` (or bare `token`) lines, a blank line after
  each tweet. The image is `<image-dir>/<IMGID><ext>`; its cache key is the IMGID.

Output (`--output-format`, default: JSONL for JSONL input, CoNLL for CoNLL input):
- JSONL: per tweet `{"line", "id"?, "image_id"?, "text", "entities": [{"entity_group", "score", "word", "start",
  "end"}]}`, offsets into `text` (for pre-split words: the words joined by single spaces); with `--word-tags` also
  `"tokens"` and `"tags"`.
- CoNLL: `IMGID:<id>` (when known), then `token<TAB>gold<TAB>predicted` (`token<TAB>predicted` without gold tags).

The output never costs data: an output that is the input (same path, a symlink or a hard link to it, or the shell
redirection of stdout into it) is refused before anything is opened. A file output is written to `<output>.partial`
beside it and renamed onto `<output>` only when complete, so an interrupted run leaves an older `<output>` as it was.
After each batch the partial output is flushed and its progress (bytes, input records done, the settings of the run)
saved in `<output>.partial.json`; `--resume` continues an interrupted run from there (same input file and settings,
else a clear error; anything written after the last saved batch is cut off), and without `--resume` a left-over
partial output is an error rather than overwritten. Argument, input and output problems exit with status 2 before
the model loads.

Distributed (`torchrun --nproc_per_node N -m processing_pmner.predict_cli ...`, `accelerate launch -m ...`): RANK,
WORLD_SIZE and LOCAL_RANK are read from the environment. Every process reads the input and cuts it into the same
batches as a single process would; batch k is tagged by process k mod N (on `cuda:LOCAL_RANK` when CUDA is available
and no `--device`, or a bare `cuda`, is given); each round the results are gathered (gloo, JSON over byte tensors) and
process 0 alone writes them in input order, so the output is the one of a single-process run, and prints the
messages and one summary with the per-process counts. Feature-cache shards are written by each process under their
own names. stdin cannot be split between processes.

Visual features: with `--feature-cache-dir` (e.g. the `frr_cache` folder written by `train_pmner.py`), tweets whose
key is in the cache of the model's FRR settings reuse the cached features; features computed for the others are
added to the cache (unless `--no-cache-write`). Without a cache, images are encoded batch by batch.

Errors: a line (or CoNLL tweet) that cannot be read or processed is reported on stderr as `FILE:LINE: error: ...`
and skipped; the run goes on. An unreadable image is reported as `FILE:LINE: warning: ...` and the tweet is tagged
from its text alone. A summary follows at the end. Exit status: 0 when at least one tweet was tagged (or the input
held none and nothing failed), 1 when every tweet failed (or, with `--strict`, when any failed), 2 for bad arguments,
an unusable input or output, or an unusable model, 130 when interrupted (Ctrl-C, or SIGTERM in a single process; the
partial output is kept for `--resume`; a killed process keeps it too, up to the last batch saved).
"""

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field


JSONL_EXTENSIONS = (".jsonl", ".json", ".ndjson")
CONLL_EXTENSIONS = (".txt", ".conll", ".tsv", ".bio")
IMGID_PREFIX = "IMGID:"
PARTIAL_SUFFIX = ".partial"
PROGRESS_SUFFIX = ".partial.json"
PROGRESS_VERSION = 1
# Arguments that change the output: a resumed run must use the same ones as the interrupted run.
OUTPUT_SETTINGS = (
    "model", "input_format", "output_format", "image_dir", "image_extension", "batch_size", "aggregation_strategy",
    "word_tags", "trust_remote_code",
)


class UsageError(Exception):
    """An argument, input or output that cannot be used: reported in one line, exit status 2."""


@dataclass
class Record:
    """One tweet of the input."""

    line: int
    text: str | None = None
    words: list | None = None
    gold: list | None = None
    image: str | None = None
    image_id: str | None = None
    record_id: object = None
    has_id: bool = False


@dataclass
class Summary:
    """What the run did (with `--resume`, the interrupted run included), as process 0 saves it in the progress file."""

    tagged: int = 0
    failed: int = 0
    failed_lines: list = field(default_factory=list)  # the first 20 lines that failed
    bad_images: int = 0
    entries: int = 0  # input records done (tweets and unreadable lines), in input order
    last_line: int = 0  # the line of the last of them
    resumed_tagged: int = 0  # tagged before the interruption

    def add(self, outcome: dict):
        self.tagged += outcome["tagged"]
        self.failed += len(outcome["failed"])
        self.failed_lines += outcome["failed"][: max(0, 20 - len(self.failed_lines))]
        self.bad_images += outcome["bad_images"]
        self.entries += outcome["entries"]
        self.last_line = max(self.last_line, outcome["last_line"])


class InputError(ValueError):
    """A line of the input that cannot be read; the message says why."""


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


def _open_input(path: str):
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


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


def load_pipeline(model: str, device: str | None, aggregation_strategy: str, trust_remote_code: bool):
    """The `multimodal-ner` pipeline of a P-MNER folder or Hub id, with this package's classes (or, with
    `trust_remote_code`, with the code saved in the folder)."""
    from transformers import pipeline

    if trust_remote_code:
        return pipeline(
            "multimodal-ner", model=model, device=device, trust_remote_code=True,
            aggregation_strategy=aggregation_strategy,
        )
    import modeling_pmner  # noqa: F401  (registers the P-MNER classes with the Auto classes)
    import processing_pmner  # noqa: F401

    from .pipeline_pmner import PMNERPipeline, register_pipeline

    register_pipeline()
    return pipeline(
        "multimodal-ner", model=model, device=device, pipeline_class=PMNERPipeline,
        aggregation_strategy=aggregation_strategy,
    )


def parse_device(value: str | None):
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------


class Predictor:
    """Tags batches of records with the pipeline, with visual features from the FRR cache when it has them."""

    def __init__(self, pipe, args, report):
        self.pipe = pipe
        self.args = args
        self.bad_images = []  # (line, message) since the last `take_bad_images`
        self.cached_features = self.computed_features = self.written_features = 0
        self.use_visual = pipe.use_visual
        self.image_processor = pipe.processor.image_processor
        self.cache = None
        self.pending = ([], [], [])  # keys, features, masks waiting to be written to the cache
        self.written_keys = set()
        if args.feature_cache_dir and self.use_visual:
            self.cache = self.image_processor.feature_cache(args.feature_cache_dir).load()
            where = self.cache.folder
            if len(self.cache):
                report(f"feature cache: {len(self.cache)} images in {where}")
            else:
                report(
                    f"feature cache: nothing cached yet in {where} for this model's FRR settings; features are "
                    + ("computed and added to it" if not args.no_cache_write else "computed (--no-cache-write)")
                )
        elif args.feature_cache_dir:
            report("the model is text-only (use_visual=False): --feature-cache-dir and images are not used")

    def cache_key(self, record: Record) -> str | None:
        if record.image_id is not None:
            return record.image_id
        if record.image is not None and os.path.isfile(record.image):
            from .image_processing_pmner import content_key

            return content_key(record.image)
        return None

    def visual_inputs(self, records: list[Record]) -> list:
        """Per record `(features (M, D), mask (M,))` or `None` (no image, or an unreadable one)."""
        result = [None] * len(records)
        if not self.use_visual:
            return result
        to_compute = []
        for index, record in enumerate(records):
            key = self.cache_key(record) if self.cache is not None else None
            if key is not None and key in self.cache:
                result[index] = self.cache.get(key)
                self.cached_features += 1
            elif record.image is not None:
                to_compute.append((index, key))
        if not to_compute:
            return result
        from .image_processing_pmner import BadImageWarning

        images = [records[index].image for index, _ in to_compute]
        names = [records[index].image for index, _ in to_compute]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BadImageWarning)
            features, masks, _, bad = self.image_processor.extract(images, names, device=self.pipe.device)
        for warning in caught:
            if not issubclass(warning.category, BadImageWarning):
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        bad = set(bad)
        messages = {name: message for name, message in self.image_processor.bad_images}
        self.image_processor.reset_bad_images()
        for row, (index, key) in enumerate(to_compute):
            line = records[index].line
            if row in bad:
                message = messages.get(names[row], f"image {records[index].image} could not be read")
                self.bad_images.append((line, message))
                continue
            result[index] = (features[row], masks[row])
            self.computed_features += 1
            writable = self.cache is not None and key is not None and not self.args.no_cache_write
            if writable and key not in self.written_keys:
                self.pending[0].append(key)
                self.pending[1].append(features[row])
                self.pending[2].append(masks[row])
        if len(self.pending[0]) >= self.args.cache_flush_size:
            self.flush_cache()
        return result

    def flush_cache(self):
        """Writes the features computed since the last flush as one cache shard. They are not kept in memory: a
        later tweet with the same key (a repeated image) is encoded again, and not written twice."""
        keys, features, masks = self.pending
        self.pending = ([], [], [])
        unique = {}
        for key, feature, mask in zip(keys, features, masks):
            if key not in self.written_keys:
                unique.setdefault(key, (feature, mask))
        if not unique:
            return
        import torch

        self.cache.write_shard(
            list(unique),
            torch.stack([value[0] for value in unique.values()]),  # (n, M, D)
            torch.stack([value[1] for value in unique.values()]),  # (n, M)
        )
        self.written_keys.update(unique)
        self.written_features += len(unique)

    def take_bad_images(self) -> list:
        taken, self.bad_images = self.bad_images, []
        return taken

    def pipeline_item(self, record: Record, visual) -> dict:
        item = {"text": record.text} if record.text is not None else {"words": record.words}
        if visual is not None:
            item["visual_features"], item["visual_mask"] = visual
        return item

    def run(self, records: list[Record]) -> list:
        """Per record, the pipeline's result (`{"text", "entities", "words"}`), or an exception for a record
        that failed. A failing batch is retried one record at a time to find the failing lines."""
        try:
            visual = self.visual_inputs(records)
            items = [self.pipeline_item(record, entry) for record, entry in zip(records, visual)]
            return self.pipe(items, batch_size=len(items), return_words=True)
        except Exception as error:  # isolated below, record by record; each failure is reported with its line
            if len(records) == 1:
                return [error]
            return [self.run([record])[0] for record in records]


def format_jsonl(record: Record, result: dict, word_tags: bool) -> str:
    output = {"line": record.line}
    if record.has_id:
        output["id"] = record.record_id
    if record.image_id is not None:
        output["image_id"] = record.image_id
    output["text"] = result["text"]
    output["entities"] = result["entities"]
    if word_tags:
        output["tokens"] = [word["word"] for word in result["words"]]
        output["tags"] = [word["tag"] for word in result["words"]]
    return json.dumps(output, ensure_ascii=False) + "\n"


def format_conll(record: Record, result: dict) -> str:
    lines = []
    if record.image_id is not None:
        lines.append(f"{IMGID_PREFIX}{record.image_id}")
    elif record.has_id:
        lines.append(f"{IMGID_PREFIX}{record.record_id}")
    tokens = record.words if record.words is not None else [word["word"] for word in result["words"]]
    tags = [word["tag"] for word in result["words"]]
    if len(tokens) != len(tags):
        raise RuntimeError(f"line {record.line}: {len(tokens)} tokens but {len(tags)} predicted tags")
    for index, (token, tag) in enumerate(zip(tokens, tags)):
        if record.gold is not None:
            lines.append(f"{token}\t{record.gold[index]}\t{tag}")
        else:
            lines.append(f"{token}\t{tag}")
    return "\n".join(lines) + "\n\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pmner-predict",
        description="Tag tweets (JSONL or CoNLL) with a trained P-MNER model; writes entities (JSONL) or CoNLL "
        "predictions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", help="A P-MNER model folder (written by train_pmner.py) or Hub id.")
    parser.add_argument("input", help="Input file (JSONL or CoNLL); '-' reads stdin.")
    parser.add_argument(
        "-o", "--output", default="-",
        help="Output file ('-': stdout), written as <output>.partial and renamed when complete; never the input.",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="Continue the interrupted run that left <output>.partial (same input and settings).",
    )
    parser.add_argument("--input-format", choices=("auto", "jsonl", "conll"), default="auto")
    parser.add_argument(
        "--output-format", choices=("auto", "jsonl", "conll"), default="auto",
        help="'auto': the input's format.",
    )
    parser.add_argument(
        "--image-dir", default=None, help="Folder of the images (<IMGID><ext>, relative 'image' paths)."
    )
    parser.add_argument("--image-extension", default=".jpg", help="Extension of <IMGID> image files.")
    parser.add_argument(
        "--feature-cache-dir", default=None,
        help="FRR feature cache (e.g. the frr_cache folder of train_pmner.py): cached features are reused.",
    )
    parser.add_argument(
        "--no-cache-write", action="store_true", help="Do not add newly computed features to the cache."
    )
    parser.add_argument("--cache-flush-size", type=int, default=1024, help="New features per cache shard.")
    parser.add_argument("--batch-size", type=int, default=32, help="Tweets per forward pass.")
    parser.add_argument(
        "--device", default=None,
        help="'cpu', 'cuda', 'cuda:1', 'mps' or a GPU index; default: the first GPU if any, else the CPU "
        "(distributed: cuda:LOCAL_RANK if CUDA is available, also for 'cuda').",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: torch's choice). On a CPU shared with other jobs, fewer threads than busy "
        "cores avoids OpenMP spinning.",
    )
    parser.add_argument(
        "--aggregation-strategy", choices=("simple", "first", "max", "average"), default="simple",
        help="How word tags become entities (see the pipeline's documentation).",
    )
    parser.add_argument("--word-tags", action="store_true", help="JSONL output: add 'tokens' and 'tags'.")
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="Run the code saved in the model folder instead of this package's classes.",
    )
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    parser.add_argument("--strict", action="store_true", help="Exit with status 1 if any tweet failed.")
    return parser



# ----------------------------------------------------------------------------------------------------------------------
# Checks before the model loads, and where the output goes
# ----------------------------------------------------------------------------------------------------------------------


def check_arguments(args):
    for name in ("batch_size", "threads", "cache_flush_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.image_dir and not os.path.isdir(args.image_dir):
        raise UsageError(f"--image-dir {args.image_dir} is not a folder")
    if args.feature_cache_dir and os.path.exists(args.feature_cache_dir) and not os.path.isdir(args.feature_cache_dir):
        raise UsageError(f"--feature-cache-dir {args.feature_cache_dir} is a file, not a folder")


def check_input(args, world: int) -> str:
    """The input's format; `UsageError` for an input that cannot be read (nothing is read from a pipe here)."""
    if args.input != "-":
        if os.path.isdir(args.input):
            raise UsageError(f"input {args.input} is a folder; pass a JSONL or CoNLL file")
        if not os.path.exists(args.input):
            raise UsageError(f"input file {args.input} does not exist")
        if not os.access(args.input, os.R_OK):
            raise UsageError(f"input file {args.input} is not readable")
        if os.path.isfile(args.input):
            return guess_format(args.input) if args.input_format == "auto" else args.input_format
    stream = "stdin" if args.input == "-" else f"{args.input} (not a regular file)"
    if args.input_format == "auto":
        raise UsageError(f"reading {stream}: pass --input-format jsonl or conll")
    if world > 1:
        raise UsageError(f"{stream} cannot be split between {world} processes: pass an input file")
    if args.resume:
        raise UsageError(f"--resume needs an input file: {stream} cannot be checked against the interrupted run")
    return args.input_format


def _stream_stat(stream):
    """`os.stat_result` of the file behind a standard stream, `None` for one without a file descriptor."""
    try:
        return os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # an in-memory stream (pytest's capture): it is no file on disk
        return None


def output_target(output: str) -> str:
    """The file the output replaces: for a symlink, the file it points to (the link then shows the new output)."""
    return os.path.realpath(output) if os.path.islink(output) else output


def run_settings(args, input_format: str, output_format: str) -> dict:
    """The input file and the arguments that shape the output, as the progress file keeps them."""
    stat = os.stat(args.input)
    settings = {"input": os.path.abspath(args.input), "input_size": stat.st_size, "input_mtime_ns": stat.st_mtime_ns}
    settings.update({name: getattr(args, name) for name in OUTPUT_SETTINGS})
    settings.update(input_format=input_format, output_format=output_format)
    for name in ("model", "image_dir"):
        if settings[name] is not None and os.path.exists(settings[name]):
            settings[name] = os.path.abspath(settings[name])
    return settings


def check_output(args, input_format: str, output_format: str) -> dict | None:
    """Refuses an output that would lose data or cannot be written (opening nothing); with `--resume`, the progress
    of the interrupted run."""
    if args.output == "-":
        if args.resume:
            raise UsageError("--resume needs an output file (-o FILE): the standard output cannot be resumed")
        stdout = _stream_stat(sys.stdout)
        if args.input != "-" and stdout is not None and os.path.samestat(stdout, os.stat(args.input)):
            raise UsageError(f"the standard output goes into the input file {args.input}, which would destroy it")
        return None
    target = output_target(args.output)
    if os.path.exists(target):
        if args.input == "-":
            stdin = _stream_stat(sys.stdin)
            same = stdin is not None and os.path.samestat(stdin, os.stat(target))
        else:
            same = os.path.samefile(args.input, target)  # the same path, another spelling, a hard link
        if same:
            raise UsageError(f"output {args.output} is the input file, which writing it would destroy; pass another -o")
        if os.path.isdir(target):
            example = os.path.join(args.output, "predictions")
            raise UsageError(f"output {args.output} is a folder; pass a file name (e.g. -o {example})")
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        problem = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise UsageError(f"the folder of output {args.output} ({folder}) {problem}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write in the folder of output {args.output} ({folder})")
    partial, progress_file = target + PARTIAL_SUFFIX, target + PROGRESS_SUFFIX
    if args.input != "-" and os.path.exists(partial) and os.path.samefile(args.input, partial):
        raise UsageError(f"the partial output {partial} would be the input file; pass another -o")
    if not args.resume:
        if os.path.exists(partial):
            raise UsageError(
                f"{partial} is left from an interrupted run: pass --resume to continue it, or delete it to start afresh"
            )
        return None
    if not os.path.exists(partial):
        raise UsageError(f"--resume: there is no {partial} to continue (the last run finished, or never started)")
    try:
        with open(progress_file, encoding="utf-8") as handle:
            progress = json.load(handle)
    except (OSError, ValueError) as error:
        message = f"--resume: cannot read {progress_file} ({error}); delete {partial} to start afresh"
        raise UsageError(message) from error
    keys = {"version", "settings", "bytes", *Summary.__dataclass_fields__}
    if not (isinstance(progress, dict) and progress.get("version") == PROGRESS_VERSION and keys <= progress.keys()):
        raise UsageError(
            f"--resume: {progress_file} is not a progress file of this version; delete {partial} to start afresh"
        )
    settings = run_settings(args, input_format, output_format)
    differences = [
        f"{name}: {progress['settings'].get(name)!r} then, {value!r} now" for name, value in settings.items()
        if progress["settings"].get(name) != value
    ]
    if differences:
        raise UsageError(
            f"--resume: the interrupted run had other settings or input ({'; '.join(differences)}); run it as it was, "
            f"or delete {partial} to start afresh"
        )
    if os.path.getsize(partial) < progress["bytes"]:
        raise UsageError(
            f"--resume: {partial} is shorter than the {progress['bytes']} bytes {progress_file} records; delete it to "
            "start afresh"
        )
    return progress


class OutputWriter:
    """Process 0's output: the standard output, or `<output>.partial`, renamed onto the output when complete, with
    the run's progress saved in `<output>.partial.json` after each round of batches."""

    def __init__(self, output: str, settings: dict, progress: dict | None):
        self.target = None if output == "-" else output_target(output)
        self.progress = progress or {"version": PROGRESS_VERSION, "settings": settings, "bytes": 0}
        self.handle = None
        if self.target is None:
            return
        self.partial, self.progress_file = self.target + PARTIAL_SUFFIX, self.target + PROGRESS_SUFFIX
        if progress is None:
            self.handle = open(self.partial, "xb")  # "x": never over another run's partial output
        else:
            self.handle = open(self.partial, "r+b")
            self.handle.truncate(progress["bytes"])  # what was written after the last saved progress goes
            self.handle.seek(progress["bytes"])
        self.save(Summary(**{name: progress[name] for name in Summary.__dataclass_fields__}) if progress else Summary())

    def write(self, text: str):
        if self.handle is None:
            sys.stdout.write(text)
        else:
            self.handle.write(text.encode("utf-8"))

    def save(self, summary: Summary):
        """Flushes what was written and records it (with `summary`) as the point `--resume` starts from."""
        if self.handle is None:
            sys.stdout.flush()
            return
        self.handle.flush()
        self.progress.update(vars(summary), bytes=self.handle.tell())
        temporary = self.progress_file + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(self.progress, handle, indent=1)
        os.replace(temporary, self.progress_file)

    def finish(self):
        if self.handle is None:
            sys.stdout.flush()
            return
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        if os.path.exists(self.target):
            shutil.copymode(self.target, self.partial)  # the new output keeps the permissions of the one it replaces
        os.replace(self.partial, self.target)
        os.remove(self.progress_file)

    def close(self):
        if self.handle is not None:
            self.handle.close()


# ----------------------------------------------------------------------------------------------------------------------
# Processes (torchrun / accelerate launch)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Processes:
    """This process's place among those started by `torchrun` or `accelerate launch` (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: object = None
    started_group: bool = False

    @classmethod
    def from_environment(cls, environ=os.environ) -> "Processes":
        values = {name: environ.get(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        try:
            world, rank = int(values["WORLD_SIZE"] or 1), int(values["RANK"] or 0)
            local_rank = int(values["LOCAL_RANK"] or rank)
        except ValueError as error:
            raise UsageError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {values}") from error
        if world < 1 or not 0 <= rank < world or local_rank < 0:
            raise UsageError(f"RANK, WORLD_SIZE and LOCAL_RANK must satisfy 0 <= RANK < WORLD_SIZE, got {values}")
        return cls(rank=rank, world=world, local_rank=local_rank)

    def device(self, device: str | None, cuda_available: bool):
        """One GPU per process: `cuda:LOCAL_RANK` for no `--device` (or a bare `cuda`) when CUDA is available."""
        if self.world > 1 and cuda_available and device in (None, "cuda"):
            return f"cuda:{self.local_rank}"
        return parse_device(device)

    def start(self):
        if self.world == 1:
            return
        import torch.distributed as distributed

        if not distributed.is_initialized():
            distributed.init_process_group("gloo")  # MASTER_ADDR / MASTER_PORT from the launcher
            self.started_group = True
        else:
            self.group = distributed.new_group(backend="gloo")  # CPU tensors, whatever the caller's backend
        if distributed.get_world_size() != self.world:
            raise RuntimeError(f"WORLD_SIZE is {self.world} but the process group has {distributed.get_world_size()}")

    def stop(self):
        if self.started_group:
            import torch.distributed as distributed

            distributed.destroy_process_group()

    def gather(self, value) -> list:
        """`value` of every process, in rank order, on every process: JSON in byte tensors (nothing unpickled)."""
        if self.world == 1:
            return [value]
        import torch
        import torch.distributed as distributed

        payload = torch.frombuffer(bytearray(json.dumps(value).encode("utf-8")), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        distributed.all_gather(sizes, torch.tensor([payload.numel()]), group=self.group)
        longest = max(int(size) for size in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: payload.numel()] = payload
        buffers = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world)]
        distributed.all_gather(buffers, padded, group=self.group)
        return [json.loads(buffer[: int(size)].numpy().tobytes()) for buffer, size in zip(buffers, sizes)]


def batches_of(entries, batch_size: int):
    """The input cut into batches of `batch_size` records (the unreadable entries among them ride along): the same
    batches in one process or many, so that every tweet is tagged in the same company (same padding, same numbers)."""
    batch, records = [], 0
    for entry in entries:
        batch.append(entry)
        if isinstance(entry, Record):
            records += 1
            if records == batch_size:
                yield batch
                batch, records = [], 0
    if batch:
        yield batch


def tag_batch(predictor: Predictor, batch: list, input_name: str, output_format: str, word_tags: bool) -> dict:
    """The output text of one batch and its messages in input order, as plain data (sent between processes)."""
    records = [entry for entry in batch if isinstance(entry, Record)]
    results = iter(predictor.run(records) if records else [])
    texts, failed, lines = [], [], []
    bad_images = predictor.take_bad_images()
    messages = [
        (line, f"{input_name}:{line}: warning: {message}; tagged from the text alone") for line, message in bad_images
    ]
    for entry in batch:
        if isinstance(entry, InputError):
            line, _, message = str(entry).partition("\t")
            failed.append((int(line), message))
            lines.append(int(line))
            continue
        lines.append(entry.line)
        result = next(results)
        if not isinstance(result, Exception):
            try:
                jsonl = output_format == "jsonl"
                texts.append(format_jsonl(entry, result, word_tags) if jsonl else format_conll(entry, result))
                continue
            except Exception as error:  # a result that cannot be written: reported with its line below
                result = error
        failed.append((entry.line, f"{type(result).__name__}: {result}"))
    messages += [(line, f"{input_name}:{line}: error: {message}") for line, message in failed]
    messages.sort(key=lambda message: message[0])  # stable: input order
    return {
        "text": "".join(texts), "tagged": len(texts), "failed": [line for line, _ in failed],
        "bad_images": len(bad_images), "messages": [message for _, message in messages], "entries": len(batch),
        "last_line": max(lines, default=0),
    }


def summary_line(summary: Summary, per_process: list[int], elapsed: float, features: tuple[int, int, int]) -> str:
    parts = [f"{summary.tagged} tweets tagged in {elapsed:.1f} s"]
    if len(per_process) > 1:
        counts = ", ".join(f"process {process}: {count}" for process, count in enumerate(per_process))
        parts[0] += f" by {len(per_process)} processes ({counts})"
    if summary.resumed_tagged:
        parts[0] += f" ({summary.resumed_tagged} of them before the interrupted run was resumed)"
    if summary.failed:
        more = " ..." if summary.failed > len(summary.failed_lines) else ""
        lines = ", ".join(map(str, summary.failed_lines)) + more
        parts.append(f"{summary.failed} skipped (errors above; lines {lines})")
    if summary.bad_images:
        parts.append(f"{summary.bad_images} unreadable image(s) (tweets tagged from their text alone)")
    cached, computed, written = features
    if cached or computed:
        added = f", {written} added to the cache" if written else ""
        parts.append(f"visual features: {cached} from cache, {computed} computed{added}")
    return "pmner-predict: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    processes = None
    try:
        processes = Processes.from_environment()
        check_arguments(args)
        input_format = check_input(args, processes.world)
    except UsageError as error:
        if processes is None or processes.rank == 0:
            print(f"pmner-predict: error: {error}", file=sys.stderr)
        return 2
    output_format = input_format if args.output_format == "auto" else args.output_format
    processes.start()
    # one process: SIGTERM as Ctrl-C (processes of a launcher keep the default: one blocked in a collective would
    # not see the exception, and the launcher's SIGTERM must stop it)
    catch_term = processes.world == 1 and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if catch_term else None
    try:
        return predict(args, processes, input_format, output_format)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the partial output is kept (and said so) by `predict`
        return 130
    finally:
        if catch_term:
            signal.signal(signal.SIGTERM, previous)
        processes.stop()


def _interrupt(signum, frame):
    """SIGTERM (`kill`) ends a single-process run as Ctrl-C does: new features are written to the cache and the
    partial output is closed after the last batch written."""
    raise KeyboardInterrupt(f"signal {signum}")


def predict(args, processes: Processes, input_format: str, output_format: str) -> int:
    rank = processes.rank

    def error(message: str) -> int:
        if rank == 0:
            print(f"pmner-predict: error: {message}", file=sys.stderr)
        return 2

    problem = progress = None
    if rank == 0:
        try:
            progress = check_output(args, input_format, output_format)
        except UsageError as refusal:
            problem = str(refusal)
    problem, progress = processes.gather([problem, progress])[0]  # process 0's verdict, on every process
    if problem:
        return error(problem)

    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    if args.no_progress or rank != 0:
        transformers_logging.disable_progress_bar()

    def report(message: str):
        if rank == 0:
            tqdm.write(message, file=sys.stderr)

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = processes.device(args.device, torch.cuda.is_available())
    if isinstance(device, str) and device.startswith("cuda:"):
        torch.cuda.set_device(device)
    try:
        pipe, failure = load_pipeline(args.model, device, args.aggregation_strategy, args.trust_remote_code), None
    except Exception as load_error:  # reported below with the model name; nothing can be tagged without it
        pipe, failure = None, f"{type(load_error).__name__}: {load_error}"
    failures = [(process, failure) for process, failure in enumerate(processes.gather(failure)) if failure]
    if failures:
        where = f" (process {failures[0][0]})" if processes.world > 1 else ""
        return error(f"cannot load the model {args.model!r}{where}: {failures[0][1]}")

    predictor = Predictor(pipe, args, report)
    writer, failure = None, None
    if rank == 0:
        try:
            settings = run_settings(args, input_format, output_format) if os.path.isfile(args.input) else None
            writer = OutputWriter(args.output, settings, progress)
        except OSError as open_error:  # e.g. another run created the partial output since the check
            failure = f"cannot write the output {args.output}: {open_error}"
    failure = processes.gather(failure)[0]
    if failure:
        return error(failure)

    summary = Summary(**{name: progress[name] for name in Summary.__dataclass_fields__}) if progress else Summary()
    summary.resumed_tagged = summary.tagged
    per_process = [0] * processes.world
    input_name = "<stdin>" if args.input == "-" else args.input
    reader = read_jsonl if input_format == "jsonl" else read_conll
    if progress:
        report(f"pmner-predict: resuming after input line {summary.last_line} ({summary.tagged} tweets already "
               "written)")
    counted = not args.no_progress and rank == 0 and args.input != "-" and os.path.isfile(args.input)
    total = count_records(args.input, input_format) if counted else None
    started = time.perf_counter()
    with _open_input(args.input) as source:
        entries = itertools.islice(reader(source, args.image_dir, args.image_extension), summary.entries, None)
        batches = batches_of(entries, args.batch_size)
        bar = tqdm(
            total=total, initial=summary.entries, unit="tweet", desc="pmner-predict",
            disable=args.no_progress or rank != 0, file=sys.stderr,
        )
        complete = False
        try:
            while True:
                round_batches = list(itertools.islice(batches, processes.world))  # batch k goes to process k mod N
                if not round_batches:
                    break
                mine = round_batches[rank] if rank < len(round_batches) else None
                outcome = tag_batch(predictor, mine, input_name, output_format, args.word_tags) if mine else None
                for process, outcome in enumerate(processes.gather(outcome)[: len(round_batches)]):
                    summary.add(outcome)
                    per_process[process] += outcome["tagged"]
                    for message in outcome["messages"]:
                        report(message)
                    if writer is not None:
                        writer.write(outcome["text"])
                if writer is not None:
                    writer.save(summary)
                bar.update(sum(len(batch) for batch in round_batches))
            complete = True
        finally:
            bar.close()
            if predictor.cache is not None and not args.no_cache_write:
                predictor.flush_cache()
            if writer is not None and complete:
                writer.finish()
            elif writer is not None:
                writer.close()
                if writer.target is not None:
                    report(
                        f"pmner-predict: interrupted: the {summary.tagged} tweets done are kept in {writer.partial} "
                        f"({args.output} is as it was); run the same command with --resume to continue"
                    )
    cached, computed, written = (
        sum(counts) for counts in zip(*processes.gather(
            [predictor.cached_features, predictor.computed_features, predictor.written_features]
        ))
    )
    if rank == 0:
        features = (cached, computed, written) if predictor.use_visual else (0, 0, 0)
        print(summary_line(summary, per_process, time.perf_counter() - started, features), file=sys.stderr)
    if summary.failed and (summary.tagged == 0 or args.strict):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
