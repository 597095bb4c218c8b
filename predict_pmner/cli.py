"""`pmner-predict`: tag tweets in bulk with a trained P-MNER model.

    pmner-predict MODEL tweets.jsonl -o entities.jsonl --image-dir images/ --batch-size 64 --device cuda
    pmner-predict MODEL twitter2017/test.txt -o predictions.conll --image-dir twitter2017_images \\
        --feature-cache-dir runs/t17/frr_cache
    torchrun --nproc_per_node 4 -m predict_pmner MODEL tweets.jsonl -o entities.jsonl

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
  `"tokens"` and `"tags"`; with `--grounding` each entity has a `"grounding"`: the FRR object its words attend to
  most, `{"slot", "box" [x1, y1, x2, y2] (original image pixels), "label", "score", "weight"}`, or `null` (see the
  pipeline's `return_grounding`; read from TCFM attention, not supervised). With `--grounding`, tweets with a
  readable image are encoded from it (the cache holds no boxes; new features are still added to it); a tweet
  known to the cache only by its `image_id` gets `"box"`, `"label"` and `"score"` `null`.
- CoNLL: `IMGID:<id>` (when known), then `token<TAB>gold<TAB>predicted` (`token<TAB>predicted` without gold tags).

The output never costs data: an output that is the input (same path, a symlink or a hard link to it, or the shell
redirection of stdout into it) is refused before anything is opened. A file output is written to `<output>.partial`
beside it and renamed onto `<output>` only when complete, so an interrupted run leaves an older `<output>` as it was.
After each batch the partial output is flushed and its progress (bytes, input records done, the settings of the run)
saved in `<output>.partial.json`; `--resume` continues an interrupted run from there (same input file and settings,
else a clear error; anything written after the last saved batch is cut off), and without `--resume` a left-over
partial output is an error rather than overwritten. Argument, input and output problems exit with status 2 before
the model loads.

Distributed (`torchrun --nproc_per_node N -m predict_pmner ...`, `accelerate launch -m ...`): RANK,
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
import itertools
import os
import signal
import sys
import threading
import time

from processing_pmner.pipeline_grounding import DEFAULT_GROUNDING_THRESHOLD
from .loading import load_pipeline  # noqa: F401  (the CLI's names stay importable from here)
from .output import (  # noqa: F401
    OutputWriter,
    Summary,
    UsageError,
    check_arguments,
    check_input,
    check_output,
    format_conll,
    format_jsonl,
    run_settings,
)
from .predictor import Predictor
from .processes import (  # noqa: F401
    Processes,
    batches_of,
    unstarted_processes_warning,
)
from .reading import (  # noqa: F401
    InputError,
    Record,
    count_records,
    open_input,
    read_conll,
    read_jsonl,
)


def one_line(message: str) -> str:
    """A message on one line: a traceback quoted inside it (transformers' pipeline quotes the errors of each model
    class it tried) is cut down to its last line, the error itself; the other lines are joined."""
    lines, skipping = [], False
    for line in str(message).splitlines():
        if line.strip().startswith("Traceback (most recent call last)"):
            skipping = True
            continue
        if skipping and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        skipping = False
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)


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
    parser.add_argument(
        "--quantize", choices=("int8",), default=None,
        help="int8 dynamic quantisation of the model's linear layers for CPU inference (faster, tags nearly "
        "unchanged); CPU only: without --device the CPU is used.",
    )
    parser.add_argument("--word-tags", action="store_true", help="JSONL output: add 'tokens' and 'tags'.")
    parser.add_argument(
        "--retrieval-index", default=None,
        help="Folder or Hub repo of the retrieval index to take context from (default: the one saved with a model "
        "trained with --retrieval_context). A JSONL line's own 'context' field is used as given.",
    )
    parser.add_argument(
        "--grounding", action="store_true",
        help="JSONL output: give each entity the FRR object (box, label, score, attention weight) that its words "
        "attend to most in TCFM, or null (read from attention, not supervised; visual models).",
    )
    parser.add_argument(
        "--grounding-threshold", type=float, default=DEFAULT_GROUNDING_THRESHOLD,
        help="With --grounding: how far above uniform attention (1/n over n objects) an entity's top weight must be: "
        "grounded when weight >= (1 + this) / n (default 0.25; 0 grounds every entity of an image with objects).",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="Run the code saved in the model folder instead of this package's classes.",
    )
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    parser.add_argument("--strict", action="store_true", help="Exit with status 1 if any tweet failed.")
    return parser


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
    warning = unstarted_processes_warning("pmner-predict", "-m predict_pmner ... --device cpu")
    if warning:
        print(warning, file=sys.stderr)
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
    if args.grounding and output_format != "jsonl":
        if processes.rank == 0:
            print("pmner-predict: error: --grounding needs JSONL output (--output-format jsonl)", file=sys.stderr)
        return 2
    processes.start()
    # one process: SIGTERM as Ctrl-C (processes of a launcher keep the default: one blocked in a collective would
    # not see the exception, and the launcher's SIGTERM must stop it)
    catch_term = processes.world == 1 and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if catch_term else None
    try:
        return predict(args, processes, input_format, output_format)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the partial output is kept (and said so) by `predict`
        return 130
    except BrokenPipeError:  # the reader of a FIFO (or of the standard output) went away
        print(f"pmner-predict: error: the reader of {args.output} closed it before the end", file=sys.stderr)
        return 1
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
            print(f"pmner-predict: error: {one_line(message)}", file=sys.stderr)
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
    device = processes.device(args.device, torch.cuda.is_available() and args.quantize is None)
    if args.quantize is not None and device is None:
        device = "cpu"  # int8 kernels are CPU kernels: the default device is the CPU (an explicit GPU is refused)
    if isinstance(device, str) and device.startswith("cuda:"):
        torch.cuda.set_device(device)
    try:
        pipe = load_pipeline(
            args.model, device, args.aggregation_strategy, args.trust_remote_code, args.quantize, args.retrieval_index
        )
        if getattr(pipe, "use_visual", False):  # FRR built, its saved weights checked, before any tweet is read
            pipe.processor.image_processor.load_models(pipe.device)
        failure = None
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
        except UsageError as refusal:  # a FIFO nobody reads
            failure = str(refusal)
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
    with open_input(args.input) as source:
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
                if writer.target is not None and writer.stream:
                    report(f"pmner-predict: interrupted: {summary.tagged} tweets were written to {args.output}")
                elif writer.target is not None:
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
