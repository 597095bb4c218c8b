#!/usr/bin/env python
"""A full-size rehearsal of the paper setting, offline: the OURS row of Table 3 at its real model and image sizes,
on the first N tweets of each Twitter-2017 split, with random weights (nothing is downloaded).

    python benchmarks/rehearse_paper.py --tweets 8                      # CPU, bf16 off
    python benchmarks/rehearse_paper.py --tweets 64 --device cuda       # GPU, bf16 where supported
    python benchmarks/rehearse_paper.py --tweets 2 --output-dir /tmp/rehearsal --keep

In a work folder outside the repository (temporary, removed at the end unless --keep; or --output-dir, kept):
1. a masked LM with bert-base's config (`BertConfig()`: 12 layers, hidden 768, vocab 30522), random weights, saved
   with the offline MiniLM's uncased WordPiece tokenizer (same 30522 vocab); Faster R-CNN R50-FPN v2 and ResNet-152
   (weights=None, weights_backbone=None) saved as .safetensors. Random detectors find nothing above 0.95, so the saved
   one is made confident on purpose: box classifier weights zeroed, bias of COCO class 1 ('person') = 10, so every
   proposal scores e^10 / (e^10 + 90) = 0.996; box regression zeroed (boxes = the random RPN's proposals). FRR then
   does the real compute, 5 crops per image through ResNet-152; the features mean nothing.
2. the first N tweets of each Twitter-2017 split (CoNLL, --twitter-dir) and a synthetic 1024x768 JPEG per tweet;
3. `train_pmner.py configs/paper-twitter2017.yaml ... --num_train_epochs 1`, as a user would (`--bf16 false
   --use_cpu true` on CPU; --do_train/--do_eval/--do_predict from the config); then, in a fresh process that cannot
   import this project, `pipeline(model=folder, trust_remote_code=True)` on one tweet with its image;
4. a table of seconds and peak memory per stage (exact RSS peak per process from `wait4`; per stage of the training
   process, RSS sampled every 0.1 s from /proc; on CUDA, nvidia-smi samples and `torch.cuda.max_memory_allocated`),
   FRR images/s, the epoch time and the saved files' sizes, also written to <work>/rehearsal.json.

Stages of the training process come from its own output: the `FRR features` progress bar (or the feature cache
folder appearing) to `FRR features of N tweets ready`; `epoch E trained in S s`; `***** <split> metrics *****`.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

# benchmarks/ is on sys.path (this script's folder); tests/benchmarks/test_rehearsal.py uses draw_image from here
from rehearsal_inputs import (  # noqa: F401
    CONFIDENT_CLASS, CONFIDENT_LOGIT, SPLIT_FILES, RehearsalError, build_models, draw_image, input_paths, read_tweets,
    write_data,
)


PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(PROJECT, "configs", "paper-twitter2017.yaml")
DEFAULT_TWITTER_DIR = os.path.normpath(os.path.join(PROJECT, "..", "shared", "data", "twitter2017"))
SAMPLE_EVERY_S = 0.1
PROJECT_MODULES = ("modeling_pmner", "processing_pmner", "training_pmner", "train_pmner")
RESULT_PREFIX = "REHEARSAL_RESULT "


# ----------------------------------------------------------------------------------------------------------------------
# Running a stage: output copied to a log with arrival times, RSS sampled, exact peak from wait4
# ----------------------------------------------------------------------------------------------------------------------


def read_status_kib(pid, field: str) -> int | None:
    """`VmRSS` / `VmHWM` of a process in KiB from /proc (None where there is no /proc or the process has exited)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):  # the process has exited: nothing more to sample
        return None
    return None


def gpu_memory_mib(pid: int) -> int | None:
    """GPU memory nvidia-smi reports for `pid` (None when it has none or nvidia-smi is missing)."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    output = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout
    for line in output.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return int(parts[1])
    return None


class StageRun:
    """Runs one command to completion: its output (stdout and stderr together) goes to `log_path`, its lines (split
    at newlines and carriage returns, so progress bars count) are kept with their arrival time, its RSS is sampled;
    `peak_rss_mib` is the exact peak of the process from `wait4`."""

    def __init__(self, name: str, command: list[str], log_path: str, env: dict, cwd: str, gpu: bool = False,
                 watch_path: str | None = None, echo: bool = True):
        self.name, self.command, self.log_path = name, command, log_path
        self.events: list[tuple[float, str]] = []  # (seconds since start, text)
        self.rss: list[tuple[float, int]] = []  # (seconds since start, KiB)
        self.gpu: list[tuple[float, int]] = []  # (seconds since start, MiB)
        self.watch_path, self.watch_seen = watch_path, None
        self.echo = echo
        self._run(env, cwd, gpu)

    def _run(self, env, cwd, gpu):
        with open(self.log_path, "wb") as log:
            self.start = time.perf_counter()
            process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
            done = threading.Event()
            reader = threading.Thread(target=self._read, args=(process.stdout, log), daemon=True)
            sampler = threading.Thread(target=self._sample, args=(process.pid, done, gpu), daemon=True)
            reader.start()
            sampler.start()
            _, status, usage = os.wait4(process.pid, 0)
            self.seconds = time.perf_counter() - self.start
            process.returncode = os.waitstatus_to_exitcode(status)
            done.set()
            reader.join()
            sampler.join()
        self.returncode = process.returncode
        self.peak_rss_mib = usage.ru_maxrss / 1024  # Linux: KiB
        if self.returncode != 0:
            with open(self.log_path, errors="replace") as handle:
                tail = handle.read()[-4000:]
            raise RehearsalError(
                f"stage {self.name!r} failed (exit {self.returncode}): {shlex.join(self.command)}\n"
                f"log: {self.log_path}\n...{tail}"
            )

    def _read(self, stream, log):
        pending = b""
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                break
            log.write(chunk)
            log.flush()
            now = time.perf_counter() - self.start
            pieces = re.split(rb"[\r\n]", pending + chunk)
            pending = pieces.pop()
            for piece in pieces:
                text = piece.decode("utf-8", "replace")
                if text.strip():
                    self.events.append((now, text))
            if self.echo and b"\n" in chunk:
                lines = chunk.split(b"\n")
                for line in lines[:-1]:
                    last = line.split(b"\r")[-1].decode("utf-8", "replace")
                    if last.strip():
                        print(f"    | {last}", flush=True)
        if pending.strip():
            self.events.append((time.perf_counter() - self.start, pending.decode("utf-8", "replace")))

    def _sample(self, pid, done, gpu):
        last_gpu = -1.0
        while not done.is_set():
            now = time.perf_counter() - self.start
            rss = read_status_kib(pid, "VmRSS")
            if rss is not None:
                self.rss.append((now, rss))
            if self.watch_path and self.watch_seen is None and os.path.exists(self.watch_path):
                self.watch_seen = now
            if gpu and now - last_gpu >= 1.0:
                last_gpu = now
                used = gpu_memory_mib(pid)
                if used is not None:
                    self.gpu.append((now, used))
            done.wait(SAMPLE_EVERY_S)

    def first(self, pattern: str, after: float = 0.0, required: bool = True):
        """`(time, match)` of the first output piece at or after `after` matching `pattern`."""
        for when, text in self.events:
            if when >= after:
                match = re.search(pattern, text)
                if match:
                    return when, match
        if required:
            raise RehearsalError(f"stage {self.name!r}: no output matching {pattern!r} in {self.log_path}")
        return None, None

    def peak_between(self, start: float, end: float) -> tuple[float | None, float | None]:
        """Peak sampled RSS and GPU memory (MiB) in [start, end] (the last sample before `start` when none falls
        inside: the stage was shorter than the sampling period)."""

        def peak(samples, scale):
            inside = [value for when, value in samples if start <= when <= end]
            if not inside:
                inside = [value for when, value in samples if when <= start][-1:]
            return max(inside) / scale if inside else None

        return peak(self.rss, 1024), peak(self.gpu, 1)


# ----------------------------------------------------------------------------------------------------------------------
# The fresh process without the project: reload and pipeline
# ----------------------------------------------------------------------------------------------------------------------


WITHOUT_PROJECT = """
import sys as _sys
_sys.meta_path[:] = [f for f in _sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
_sys.path[:] = [p for p in _sys.path if p not in ("", ".", {project!r})]
_sys.path_hooks[:] = [h for h in _sys.path_hooks if "editable" not in repr(h).lower()]
_sys.path_importer_cache.clear()
for _name in {modules!r}:
    try:
        __import__(_name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"the project ({{_name}}) is importable in the remote-code process")
"""

RELOAD_SCRIPT = """
import json, time

def status_mib(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

result = {{}}
start = time.perf_counter()
import torch
from transformers import pipeline

ner = pipeline(model={folder!r}, trust_remote_code=True, device={device!r})
result["reload_s"] = time.perf_counter() - start
result["reload_peak_rss_mib"] = status_mib("VmHWM")
result["pipeline_class"] = type(ner).__module__ + "." + type(ner).__name__
result["model_class"] = type(ner.model).__module__ + "." + type(ner.model).__name__
gpu = torch.cuda.is_available() and {device!r} != "cpu"
if gpu:
    result["reload_peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
image_processor = ner.processor.image_processor
extract, objects = image_processor.extract, []

def recording_extract(*args, **kwargs):  # counts the objects FRR finds in the pipeline's own call
    output = extract(*args, **kwargs)
    objects.append(int(output[1].sum()))  # visual_mask (images, max_objects)
    return output

image_processor.extract = recording_extract
start = time.perf_counter()
output = ner({text!r}, image={image!r}, return_words=True)
result["pipeline_s"] = time.perf_counter() - start
output = output[0] if isinstance(output, list) else output
entities = output["entities"]
result["word_tags"] = [row["tag"] for row in output["words"]]
result["pipeline_peak_rss_mib"] = status_mib("VmHWM")
if gpu:
    result["pipeline_peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
result["entities"] = [{{key: (float(value) if key == "score" else value) for key, value in entity.items()}}
                      for entity in entities]
result["objects_in_image"] = objects
print({prefix!r} + json.dumps(result))
"""


def remote_code_env(work: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=os.path.join(work, "hf-home-remote"), PYTHONNOUSERSITE="1")
    return env


# ----------------------------------------------------------------------------------------------------------------------
# The rehearsal
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tweets", type=int, help="first N tweets of each Twitter-2017 split (required)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--output-dir", help="work folder (kept; must not exist or be empty, outside the repository)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--twitter-dir", default=DEFAULT_TWITTER_DIR, help="Twitter-2017 CoNLL folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--quiet", action="store_true", help="do not echo the stages' output")
    parser.add_argument("--stage", choices=("models", "data"), help=argparse.SUPPRESS)  # internal: one stage
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        return args
    if args.tweets is None:
        parser.error("--tweets N is required")
    twitter_dir = os.path.abspath(args.twitter_dir)
    missing = [name for name in SPLIT_FILES if not os.path.isfile(os.path.join(twitter_dir, name))]
    if missing:
        parser.error(f"--twitter-dir {twitter_dir}: no {', '.join(missing)} there (the Twitter-2017 CoNLL files)")
    args.twitter_dir = twitter_dir
    smallest = min(len(read_tweets(os.path.join(twitter_dir, name))) for name in SPLIT_FILES)
    if not 1 <= args.tweets <= smallest:
        parser.error(f"--tweets must be between 1 and {smallest} (the smallest split), got {args.tweets}")
    if args.output_dir:
        output = os.path.abspath(args.output_dir)
        if output == PROJECT or output.startswith(PROJECT + os.sep):
            parser.error(f"--output-dir {output} is inside the repository: the tweets must not be written there")
        if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
            parser.error(f"--output-dir {output} exists and is not an empty folder: choose a new one")
        args.output_dir = output
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():  # does not create a CUDA context
            parser.error("--device cuda: torch sees no CUDA device")
    return args


def child_env(work: str) -> dict:
    env = dict(os.environ)
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)  # the FRR progress bar marks the start of extraction
    env.update(
        HF_HOME=os.path.join(work, "hf-home"), HF_DATASETS_CACHE=os.path.join(work, "hf-home", "datasets"),
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def size_mib(path: str) -> float:
    if os.path.isfile(path):
        return os.path.getsize(path) / 2**20
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
    return total / 2**20


def training_command(paths: dict, device: str) -> list[str]:
    command = [
        sys.executable, os.path.join(PROJECT, "train_pmner.py"), CONFIG,
        "--text_model_name_or_path", paths["text_model"], "--data_dir", paths["data"], "--image_dir", paths["images"],
        "--detector_weights", paths["detector"], "--backbone_weights", paths["backbone"],
        "--num_train_epochs", "1", "--output_dir", paths["run"],
        # the config's 10 % warm-up would make every step of a few-tweet run a warm-up step at learning rate 0
        "--warmup_steps", "0",
    ]
    if device == "cpu":
        return command + ["--bf16", "false", "--use_cpu", "true"]
    # asked in a child process, so that this one holds no CUDA context during the measurements
    query = [sys.executable, "-c", "import torch; print(torch.cuda.is_bf16_supported())"]
    supported = subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip() == "True"
    return command + ["--bf16", "true" if supported else "false"]


def training_stages(run: StageRun) -> tuple[list[dict], float, float]:
    """The stages of the training process from its output: rows, the logged epoch time, FRR seconds."""
    frr_bar, _ = run.first(r"FRR features(?! of)", required=False)
    starts = [value for value in (frr_bar, run.watch_seen) if value is not None]
    if not starts:
        raise RehearsalError(f"no start of FRR extraction (progress bar or feature cache folder) in {run.log_path}")
    frr_start = min(starts)
    frr_end, _ = run.first(r"FRR features of \d+ tweets ready", after=frr_start)
    epoch_line, match = run.first(r"epoch [\d.]+ trained in ([\d.]+) s", after=frr_end)
    epoch_s = float(match.group(1))
    validated, _ = run.first(r"validation P [\d.]+ R [\d.]+ F1", after=epoch_line)
    trained, _ = run.first(r"\*\*\*\*\* train metrics \*\*\*\*\*", after=validated)
    evaluated, _ = run.first(r"\*\*\*\*\* eval metrics \*\*\*\*\*", after=trained)
    predicted, _ = run.first(r"\*\*\*\*\* predict metrics \*\*\*\*\*", after=evaluated)
    bounds = [
        ("train_pmner.py start-up (imports, data, bert-base load)", 0.0, frr_start),
        ("FRR extraction", frr_start, frr_end),
        ("encoding, Trainer set-up", frr_end, epoch_line - epoch_s),
        ("training epoch", epoch_line - epoch_s, epoch_line),
        ("validation at the epoch's end", epoch_line, validated),
        ("save (checkpoint, best-model reload, final folder)", validated, trained),
        ("evaluation (validation, best model)", trained, evaluated),
        ("test prediction", evaluated, predicted),
        ("results, model card, exit", predicted, run.seconds),
    ]
    rows = [stage_row(name, end - start, *run.peak_between(start, end), "sampled") for name, start, end in bounds]
    return rows, epoch_s, frr_end - frr_start


def stage_row(name: str, seconds: float, rss_mib, gpu_mib, memory: str) -> dict:
    return {"stage": name, "seconds": seconds, "peak_rss_mib": rss_mib, "peak_gpu_mib": gpu_mib, "memory": memory}


def rehearse(args, work: str) -> dict:
    paths = input_paths(work)
    os.makedirs(paths["logs"], exist_ok=True)
    env = child_env(work)
    gpu = args.device == "cuda"
    me = [sys.executable, os.path.abspath(__file__), "--work", work]

    def stage(name, command, log, **kwargs):
        print(f"[rehearsal] {name} (log: {os.path.join(paths['logs'], log)})", flush=True)
        return StageRun(name, command, os.path.join(paths["logs"], log), env, work, echo=not args.quiet, **kwargs)

    rows = []
    models = stage("build models", [*me, "--stage", "models", "--seed", str(args.seed)], "models.log")
    rows.append(stage_row("build models (bert-base MLM, Faster R-CNN v2, ResNet-152; saved)", models.seconds,
                          models.peak_rss_mib, None, "exact"))
    data = stage("write images", [*me, "--stage", "data", "--tweets", str(args.tweets), "--twitter-dir",
                                  args.twitter_dir], "data.log")
    _, match = data.first(r"^images (\d+)$")
    images = int(match.group(1))
    rows.append(stage_row(f"write data ({args.tweets} tweets x 3 splits, {images} JPEGs 1024x768)", data.seconds,
                          data.peak_rss_mib, None, "exact"))

    command = training_command(paths, args.device)
    train = stage("train_pmner.py", command, "train.log", gpu=gpu, watch_path=os.path.join(paths["run"], "frr_cache"))
    train_rows, epoch_s, frr_s = training_stages(train)
    rows += train_rows
    with open(os.path.join(paths["run"], "all_results.json")) as handle:
        all_results = json.load(handle)

    test_block = read_tweets(os.path.join(paths["data"], "test.txt"))[0]
    text = " ".join(line.split("\t")[0] for line in test_block[1:] if line.strip())
    image = os.path.join(paths["images"], test_block[0][len("IMGID:") :].strip() + ".jpg")
    device = "cuda" if gpu else "cpu"
    script = WITHOUT_PROJECT.format(project=PROJECT, modules=PROJECT_MODULES) + RELOAD_SCRIPT.format(
        folder=paths["run"], device=device, text=text, image=image, prefix=RESULT_PREFIX)
    remote_env = remote_code_env(work)
    remote_env.update({key: env[key] for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "PYTHONUNBUFFERED")})
    print("[rehearsal] reload + pipeline in a fresh process without the project", flush=True)
    remote = StageRun("reload in a fresh process", [sys.executable, "-c", script],
                      os.path.join(paths["logs"], "reload.log"), remote_env, work, echo=not args.quiet)
    _, match = remote.first("^" + re.escape(RESULT_PREFIX) + r"(.*)$")
    pipeline_result = json.loads(match.group(1))
    for name, key in (("reload in a fresh process (pipeline(model=folder, trust_remote_code=True))", "reload"),
                      ("pipeline on one image (first call: FRR models built from the folder)", "pipeline")):
        rows.append(stage_row(name, pipeline_result[f"{key}_s"], pipeline_result[f"{key}_peak_rss_mib"],
                              pipeline_result.get(f"{key}_peak_gpu_mib"), "process so far"))

    run_files = {name: os.path.join(paths["run"], name)
                 for name in ("model.safetensors", "frr_detector.safetensors", "frr_backbone.safetensors")}
    checkpoints = [name for name in sorted(os.listdir(paths["run"])) if name.startswith("checkpoint-")]
    sizes = {
        **{f"run/{name}": size_mib(path) for name, path in run_files.items() if os.path.exists(path)},
        "run folder (with checkpoints and FRR cache)": size_mib(paths["run"]),
        **{f"run/{name}": size_mib(os.path.join(paths["run"], name)) for name in checkpoints},
        "input: bert-base folder": size_mib(paths["text_model"]),
        "input: detector file": size_mib(paths["detector"]),
        "input: backbone file": size_mib(paths["backbone"]),
    }
    return {
        "command": shlex.join(["python", *sys.argv]),
        "training_command": shlex.join(command),
        "device": args.device,
        "tweets_per_split": args.tweets,
        "images": images,
        "stages": rows,
        "training_process_peak_rss_mib": train.peak_rss_mib,
        "reload_process_peak_rss_mib": remote.peak_rss_mib,
        "frr_seconds": frr_s,
        "frr_images_per_s": images / frr_s if frr_s > 0 else None,
        "epoch_seconds": epoch_s,
        "all_results": all_results,
        "pipeline": pipeline_result,
        "sizes_mib": sizes,
        "cpus": os.cpu_count(),
        "load_average_1min": {"start": args.load_at_start, "end": os.getloadavg()[0]},
    }


def print_report(report: dict, work: str) -> None:
    def number(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    print(f"\n## Rehearsal of the paper setting: {report['tweets_per_split']} tweets per split, device "
          f"{report['device']}, {report['cpus']} CPUs (1-min load average {report['load_average_1min']['start']:.2f} "
          f"at start, {report['load_average_1min']['end']:.2f} at end)\n")
    print("| stage | seconds | peak RSS (MiB) | peak GPU memory (MiB) |")
    print("|---|---|---|---|")
    for row in report["stages"]:
        print(f"| {row['stage']} | {number(row['seconds'])} | {number(row['peak_rss_mib'], 0)} ({row['memory']}) "
              f"| {number(row['peak_gpu_mib'], 0)} |")
    total = sum(row["seconds"] for row in report["stages"])
    print(f"| total | {total:.1f} | | |\n")
    results = report["all_results"]
    print(f"FRR: {report['images']} images in {report['frr_seconds']:.1f} s = {number(report['frr_images_per_s'], 3)} "
          "images/s (Faster R-CNN R50-FPN v2, then 5 crops per image through ResNet-152)")
    print(f"training epoch (bert-base, {report['tweets_per_split']} tweets, batch 8): {report['epoch_seconds']:.1f} s "
          f"(train_pmner.py log); Trainer: train_runtime {results.get('train_runtime')} s (epoch + validation + "
          f"checkpoint), eval_runtime {results.get('eval_runtime')} s, predict_runtime {results.get('predict_runtime')} s")
    print(f"peak RSS of the training process (exact, wait4): {report['training_process_peak_rss_mib']:.0f} MiB; of the "
          f"fresh reload process: {report['reload_process_peak_rss_mib']:.0f} MiB")
    stats = {key: value for key, value in results.items() if key.startswith("visual_test_")}
    print(f"visual statistics (test split): {stats}")
    pipeline_result = report["pipeline"]
    print(f"fresh process: {pipeline_result['pipeline_class']}; objects FRR found in the pipeline's image: "
          f"{pipeline_result['objects_in_image']}; entities: "
          f"{pipeline_result['entities']}")
    print("\n| file | MiB |\n|---|---|")
    for name, value in report["sizes_mib"].items():
        print(f"| {name} | {value:.1f} |")
    print(
        "\nAll weights are random: the scores mean nothing. The saved detector is made confident on purpose (box "
        f"classifier zeroed, bias of COCO class {CONFIDENT_CLASS} = {CONFIDENT_LOGIT:g}: every proposal scores 0.996; "
        "box regression zeroed), so FRR keeps 5 objects per image and the compute is the paper setting's."
    )
    print(f"work folder: {work}")


def main(argv=None):
    args = parse_args(argv)
    if args.stage == "models":
        build_models(args.work, args.seed)
        print("models saved")
        return
    if args.stage == "data":
        print(f"images {write_data(args.work, args.twitter_dir, args.tweets)['images']}")
        return
    args.load_at_start = os.getloadavg()[0]
    temporary = args.output_dir is None
    work = tempfile.mkdtemp(prefix="pmner-rehearsal-") if temporary else args.output_dir
    os.makedirs(work, exist_ok=True)
    try:
        report = rehearse(args, work)
    except RehearsalError as error:
        print(f"rehearse_paper.py: error: {error}\n(work folder kept: {work})", file=sys.stderr)
        sys.exit(1)
    with open(os.path.join(work, "rehearsal.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    print_report(report, work)
    if temporary and not args.keep:
        shutil.rmtree(work)
        print("(temporary work folder removed; --keep keeps it)")


if __name__ == "__main__":
    main()
