"""`pmner-predict`: tag tweets in bulk with a trained P-MNER model.

    pmner-predict MODEL tweets.jsonl -o entities.jsonl --image-dir images/ --batch-size 64 --device cuda
    pmner-predict MODEL twitter2017/test.txt -o predictions.conll --image-dir twitter2017_images \\
        --feature-cache-dir runs/t17/frr_cache

Input (`--input-format`, guessed from the extension, else from the first line):
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

Visual features: with `--feature-cache-dir` (e.g. the `frr_cache` folder written by `train_pmner.py`), tweets whose
key is in the cache of the model's FRR settings reuse the cached features; features computed for the others are
added to the cache (unless `--no-cache-write`). Without a cache, images are encoded batch by batch.

Errors: a line (or CoNLL tweet) that cannot be read or processed is reported on stderr as `FILE:LINE: error: ...`
and skipped; the run goes on. An unreadable image is reported as `FILE:LINE: warning: ...` and the tweet is tagged
from its text alone. A summary follows at the end. Exit status: 0 when at least one tweet was tagged (or the input
held none and nothing failed), 1 when every tweet failed (or, with `--strict`, when any failed), 2 for bad arguments
or an unusable model.
"""

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field


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
    record_id: object = None
    has_id: bool = False


@dataclass
class Summary:
    tagged: int = 0
    failed: list = field(default_factory=list)  # (line, message)
    bad_images: list = field(default_factory=list)  # (line, message)
    cached_features: int = 0
    computed_features: int = 0
    written_features: int = 0


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


def _open_output(path: str):
    if path == "-":
        return contextlib.nullcontext(sys.stdout)
    return open(path, "w", encoding="utf-8", newline="")


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
    if path == "-":
        raise SystemExit("pmner-predict: reading stdin: pass --input-format jsonl or conll")
    with open(path, encoding="utf-8-sig") as handle:
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
    def __init__(self, pipe, args, input_name: str, summary: Summary, report):
        self.pipe = pipe
        self.args = args
        self.input_name = input_name
        self.summary = summary
        self.report = report
        self.use_visual = pipe.use_visual
        self.image_processor = pipe.processor.image_processor
        self.cache = None
        self.pending = ([], [], [])  # keys, features, masks waiting to be written to the cache
        self.written_keys = set()
        if args.feature_cache_dir and self.use_visual:
            self.cache = self.image_processor.feature_cache(args.feature_cache_dir).load()
            where = self.cache.folder
            if len(self.cache):
                self.report(f"feature cache: {len(self.cache)} images in {where}")
            else:
                self.report(
                    f"feature cache: nothing cached yet in {where} for this model's FRR settings; features are "
                    + ("computed and added to it" if not args.no_cache_write else "computed (--no-cache-write)")
                )
        elif args.feature_cache_dir:
            self.report("the model is text-only (use_visual=False): --feature-cache-dir and images are not used")

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
                self.summary.cached_features += 1
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
                self.summary.bad_images.append((line, message))
                self.report(f"{self.input_name}:{line}: warning: {message}; tagged from the text alone")
                continue
            result[index] = (features[row], masks[row])
            self.summary.computed_features += 1
            if self.cache is not None and key is not None and not self.args.no_cache_write and key not in self.written_keys:
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
        self.summary.written_features += len(unique)

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
    parser.add_argument("-o", "--output", default="-", help="Output file; '-' writes stdout.")
    parser.add_argument("--input-format", choices=("auto", "jsonl", "conll"), default="auto")
    parser.add_argument(
        "--output-format", choices=("auto", "jsonl", "conll"), default="auto",
        help="'auto': the input's format.",
    )
    parser.add_argument("--image-dir", default=None, help="Folder of the images (<IMGID><ext>, relative 'image' paths).")
    parser.add_argument("--image-extension", default=".jpg", help="Extension of <IMGID> image files.")
    parser.add_argument(
        "--feature-cache-dir", default=None,
        help="FRR feature cache (e.g. the frr_cache folder of train_pmner.py): cached features are reused.",
    )
    parser.add_argument("--no-cache-write", action="store_true", help="Do not add newly computed features to the cache.")
    parser.add_argument("--cache-flush-size", type=int, default=1024, help="New features per cache shard.")
    parser.add_argument("--batch-size", type=int, default=32, help="Tweets per forward pass.")
    parser.add_argument(
        "--device", default=None,
        help="'cpu', 'cuda', 'cuda:1', 'mps' or a GPU index; default: the first GPU if any, else the CPU.",
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print(f"pmner-predict: error: --batch-size must be at least 1, got {args.batch_size}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"pmner-predict: error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.cache_flush_size < 1:
        print(f"pmner-predict: error: --cache-flush-size must be at least 1, got {args.cache_flush_size}", file=sys.stderr)
        return 2
    if args.input != "-" and not os.path.isfile(args.input):
        print(f"pmner-predict: error: input file {args.input} does not exist", file=sys.stderr)
        return 2
    if args.image_dir and not os.path.isdir(args.image_dir):
        print(f"pmner-predict: error: --image-dir {args.image_dir} is not a folder", file=sys.stderr)
        return 2
    input_format = guess_format(args.input) if args.input_format == "auto" else args.input_format
    output_format = input_format if args.output_format == "auto" else args.output_format
    input_name = "<stdin>" if args.input == "-" else args.input

    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    if args.no_progress:
        transformers_logging.disable_progress_bar()

    def report(message: str):
        tqdm.write(message, file=sys.stderr)

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        pipe = load_pipeline(
            args.model, parse_device(args.device), args.aggregation_strategy, args.trust_remote_code
        )
    except Exception as error:  # reported with the model name; nothing can be tagged without it
        print(f"pmner-predict: error: cannot load the model {args.model!r}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2

    summary = Summary()
    predictor = Predictor(pipe, args, input_name, summary, report)
    reader = read_jsonl if input_format == "jsonl" else read_conll
    total = count_records(args.input, input_format) if not args.no_progress else None
    started = time.perf_counter()

    def fail(line: int, message: str):
        summary.failed.append((line, message))
        report(f"{input_name}:{line}: error: {message}")

    with _open_input(args.input) as source, _open_output(args.output) as sink:
        bar = tqdm(total=total, unit="tweet", desc="pmner-predict", disable=args.no_progress, file=sys.stderr)

        def process(batch: list[Record]):
            results = predictor.run(batch)
            for record, result in zip(batch, results):
                if isinstance(result, Exception):
                    fail(record.line, f"{type(result).__name__}: {result}")
                    continue
                if output_format == "jsonl":
                    sink.write(format_jsonl(record, result, args.word_tags))
                else:
                    sink.write(format_conll(record, result))
                summary.tagged += 1
            bar.update(len(batch))

        batch = []
        try:
            for entry in reader(source, args.image_dir, args.image_extension):
                if isinstance(entry, InputError):
                    line, _, message = str(entry).partition("\t")
                    fail(int(line), message)
                    bar.update(1)
                    continue
                batch.append(entry)
                if len(batch) == args.batch_size:
                    process(batch)
                    batch = []
            if batch:
                process(batch)
        finally:
            bar.close()
            if predictor.cache is not None and not args.no_cache_write:
                predictor.flush_cache()

    elapsed = time.perf_counter() - started
    parts = [f"{summary.tagged} tweets tagged in {elapsed:.1f} s"]
    if summary.failed:
        lines = ", ".join(str(line) for line, _ in summary.failed[:20]) + (" ..." if len(summary.failed) > 20 else "")
        parts.append(f"{len(summary.failed)} skipped (errors above; lines {lines})")
    if summary.bad_images:
        parts.append(f"{len(summary.bad_images)} unreadable image(s) (tweets tagged from their text alone)")
    if predictor.use_visual and (summary.cached_features or summary.computed_features):
        parts.append(
            f"visual features: {summary.cached_features} from cache, {summary.computed_features} computed"
            + (f", {summary.written_features} added to the cache" if summary.written_features else "")
        )
    print("pmner-predict: " + "; ".join(parts), file=sys.stderr)
    if summary.failed and (summary.tagged == 0 or args.strict):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
