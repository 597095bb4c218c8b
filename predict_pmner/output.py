"""Where the output of `pmner-predict` goes, and the checks made before the model loads: arguments, input and
output that cannot be used (`UsageError`, exit status 2), an output that would destroy the input, and the progress
of an interrupted run for `--resume`; `OutputWriter` writes `<output>.partial` and renames it when complete;
`format_jsonl` / `format_conll` write one tagged record.
"""

import errno
import json
import os
import shutil
import stat
import sys
from dataclasses import dataclass, field

from processing_pmner.pipeline_grounding import check_grounding_threshold
from .reading import IMGID_PREFIX, Record, guess_format


PARTIAL_SUFFIX = ".partial"
PROGRESS_SUFFIX = ".partial.json"
PROGRESS_VERSION = 1
# Arguments that change the output: a resumed run must use the same ones as the interrupted run.
OUTPUT_SETTINGS = (
    "model", "input_format", "output_format", "image_dir", "image_extension", "batch_size", "aggregation_strategy",
    "word_tags", "trust_remote_code", "quantize", "grounding", "grounding_threshold",
)


class UsageError(Exception):
    """An argument, input or output that cannot be used: reported in one line, exit status 2."""


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


def check_arguments(args):
    for name in ("batch_size", "threads", "cache_flush_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.image_dir and not os.path.isdir(args.image_dir):
        raise UsageError(f"--image-dir {args.image_dir} is not a folder")
    if args.feature_cache_dir and os.path.exists(args.feature_cache_dir) and not os.path.isdir(args.feature_cache_dir):
        raise UsageError(f"--feature-cache-dir {args.feature_cache_dir} is a file, not a folder")
    threshold = getattr(args, "grounding_threshold", None)
    if threshold is not None:
        try:
            check_grounding_threshold(threshold, "--grounding-threshold")
        except ValueError as error:
            raise UsageError(str(error)) from None


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


STREAM_KINDS = ("character device", "FIFO")


def special_file_kind(path: str) -> str | None:
    """What an existing output path is when it is not a regular file or folder ("character device", "FIFO",
    "socket", "block device"); `None` otherwise."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, kind in ((stat.S_ISCHR, "character device"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return None


def open_stream(path: str):
    """A character device or FIFO opened for writing; a FIFO nobody reads is refused instead of waiting forever."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as error:
        if error.errno == errno.ENXIO:
            raise UsageError(f"output {path} is a FIFO that nobody reads: start its reader first") from None
        raise UsageError(f"cannot write the output {path}: {error.strerror}") from None
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "wb")


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
    kind = special_file_kind(args.output)  # os.stat follows links: /dev/stdout into a pipe is a FIFO
    target = output_target(args.output)
    if kind is not None:
        if kind not in STREAM_KINDS:
            raise UsageError(f"output {args.output} is a {kind}; pass a regular file, a character device or a FIFO")
        if args.resume:
            raise UsageError(f"--resume needs a regular output file: {args.output} is a {kind}, written as a stream")
        return None  # written to directly, as a stream: never replaced by a renamed file
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
        self.stream = False
        if self.target is None:
            return
        self.stream = special_file_kind(output) in STREAM_KINDS  # the path as given: /dev/stdout is followed
        if self.stream:  # a device or FIFO is written directly: no partial file, nothing to rename or resume
            self.handle = open_stream(output)
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
        if self.stream:
            return
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
        if self.stream:
            self.handle.close()
            return
        os.fsync(self.handle.fileno())
        self.handle.close()
        if os.path.exists(self.target):
            shutil.copymode(self.target, self.partial)  # the new output keeps the permissions of the one it replaces
        os.replace(self.partial, self.target)
        os.remove(self.progress_file)

    def close(self):
        if self.handle is not None:
            self.handle.close()


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
