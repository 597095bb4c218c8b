#!/usr/bin/env python
"""One short check of P-MNER on a CUDA machine that reaches no network (under 8 minutes on one H100), or the same
steps on the CPU at tiny size (`--dry-run`, about a minute). Run it through benchmarks/gpu_check.sh, which first
installs the carried wheels (see below).

Steps (one markdown table at the end: step, setting, result, seconds):
  0. build models     a masked LM from its config (BERT-base defaults: 12 layers, 768 hidden; random weights) with
                      a WordPiece tokenizer over a generated vocabulary, and a saved P-MNER folder on it whose
                      processor has the FRR settings of step 3 (what steps 4 and 5 load)
  1. CUDA tests       pytest -m cuda over the test files that use the marker (skipped without CUDA)
  2a/2b. training     bf16 training steps (autocast; forward, backward, AdamW) of the linear-head baseline (text
                      only) and of P-MNER (TCFM + verbalizer, 5 objects): steps/s and peak memory
                      (benchmarks/bench_model.py's step)
  3. FRR features     PMNERImageProcessor end to end (read, decode, detect, crop, ResNet) on synthetic 640x480 JPEGs,
                      batched: images/s. Real size: fasterrcnn_resnet50_fpn_v2 + resnet152, random weights,
                      score threshold 0 (every image gives max_objects crops, the heaviest case)
  4. pipeline         the multimodal-ner pipeline (PMNERPipeline), raw tweets in, entities out, batched: tweets/s
  5. pmner-predict    `torchrun --standalone --nproc_per_node 1 -m predict_pmner` on a JSONL of
                      tweets (every fourth with an image): tweets/s over the whole command, model loading included

    python benchmarks/gpu_check.py                      # on the CUDA machine (after --install-wheels)
    python benchmarks/gpu_check.py --dry-run            # CPU, tiny sizes
    python benchmarks/gpu_check.py --prepare-wheels benchmarks/gpu_wheels   # here, with the registry
    python benchmarks/gpu_check.py --install-wheels benchmarks/gpu_wheels --site /tmp/pmner-site   # there

Wheels: the GPU machine brings torch, torchvision, transformers, safetensors, tokenizers, pyyaml and huggingface-hub
of its own versions. `--prepare-wheels DIR` follows the project's dependencies (pyproject.toml) and their
requirements through this environment's installed metadata, skipping those seven, and downloads a wheel of every
pure-Python one at the version installed here (datasets, evaluate, accelerate, seqeval, dill, multiprocess, ...; a
package published only as a source archive, such as seqeval, is built into a wheel). Compiled ones (numpy, pandas,
pyarrow, ...) are not carried: they are listed in DIR/manifest.json and must be on the GPU machine already.
`--install-wheels DIR --site SITE` (there, offline) installs into SITE, with pip's `--no-index --no-deps`, each
carried package that is missing or whose version does not meet pyproject.toml, then checks every dependency.

Exit status: 0 when every step passed; 1 when a step failed (its row says FAILED, and the last stderr line names the
failed steps); 2 for bad arguments or an unusable environment (no CUDA without --dry-run, a dependency missing).
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types


PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [PROJECT, os.path.join(PROJECT, "benchmarks")]
# benchmarks/ is on sys.path from here; wheel_plan is imported from gpu_check by tests/benchmarks/test_gpu_check.py
from gpu_check_wheels import (  # noqa: E402, F401
    GPU_PROVIDED, UsageError, install_wheels, installed_version, prepare_wheels, wheel_plan,
)

REPORTED = GPU_PROVIDED + ("datasets", "evaluate", "accelerate", "seqeval", "pillow", "numpy", "pyarrow", "pandas")
STEPS = {
    "build": "0. build models",
    "tests": "1. CUDA tests",
    "train": "2. training",  # rows 2a and 2b
    "frr": "3. FRR features",
    "pipeline": "4. pipeline",
    "predict": "5. torchrun pmner-predict",
}
ENV = dict(
    HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1",
)


# ----------------------------------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------------------------------


WORDS = (
    "rt new post festival vote year the today visits meets in at with and of to for is a on this my we you fan wins "
    "game night live music city world team season first last great love trump obama kawhi leonard london paris york "
    "nba apple google berlin madrid league cup final star club photo video news breaking tonight week show"
).split()
TEMPLATE_WORDS = "the word of is none begin inside end single person location organization miscellaneous other".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_text_model(folder: str, size: dict, seed: int = 0) -> str:
    """A BERT masked LM of `size` (random weights) and a WordPiece tokenizer whose vocabulary is the generated
    words, characters and `##` pieces, padded with [unusedN] to the config's vocab_size."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    characters = list("abcdefghijklmnopqrstuvwxyz0123456789") + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    vocab = SPECIALS + sorted(set(WORDS + TEMPLATE_WORDS)) + characters + [f"##{c}" for c in characters]
    config = BertConfig(**size)
    vocab += [f"[unused{index}]" for index in range(config.vocab_size - len(vocab))]
    torch.manual_seed(seed)
    BertForMaskedLM(config).save_pretrained(folder)
    BertTokenizer(vocab={token: index for index, token in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
    return folder


def tweets(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names = ["Kawhi Leonard", "Trump", "London", "NBA", "Apple", "@user", "#NBAAwards", "Paris", "Google"]
    return [
        " ".join(rng.choice(WORDS + names) for _ in range(rng.randint(8, 30))).replace("rt", "RT", 1)
        for _ in range(count)
    ]


def frr_settings(plan) -> dict:
    return dict(
        detector=plan.detector, detector_weights="random:0", detector_kwargs={"box_score_thresh": 0.0},
        backbone=plan.backbone, backbone_weights="random:0", score_threshold=0.0, max_objects=plan.objects,
        batch_size=plan.frr_batch,
    )


def feature_dim(backbone: str) -> int:
    return 512 if backbone in ("resnet18", "resnet34") else 2048


def synchronize(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def reset_memory(device):
    import gc

    import torch

    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device) -> str:
    import resource

    import torch

    if str(device).startswith("cuda"):
        return f"peak CUDA {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return f"peak RSS of the process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


# ----------------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------------


def build_step(plan, state) -> str:
    import torch

    from modeling_pmner import PMNERForTokenClassification
    from processing_pmner import PMNERImageProcessor, PMNERProcessor
    from processing_pmner.pipeline_pmner import add_pipeline_to_folder
    from transformers import AutoTokenizer

    state["text_model"] = write_text_model(os.path.join(state["workdir"], "text-model"), plan.text_size)
    torch.manual_seed(0)
    model = PMNERForTokenClassification.from_text_pretrained(
        state["text_model"], visual_feature_dim=feature_dim(plan.backbone), max_objects=plan.objects,
        fusion_num_heads=plan.text_size.get("num_attention_heads", 12),
    )
    image_processor = PMNERImageProcessor(**frr_settings(plan))
    labels = [model.config.id2label[index] for index in range(model.config.num_labels)]
    processor = PMNERProcessor(
        image_processor, AutoTokenizer.from_pretrained(state["text_model"]), label_names=labels,
        max_length=plan.length,
    )
    folder = os.path.join(state["workdir"], "pmner-model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    add_pipeline_to_folder(folder)
    state["model_folder"] = folder
    layers, hidden = model.config.text_config.num_hidden_layers, model.config.text_config.hidden_size
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters (encoder {layers}x{hidden})"


def cuda_test_files() -> list[str]:
    """The test files, in every folder under tests/, that mark tests `cuda`."""
    tests = os.path.join(PROJECT, "tests")
    return sorted(
        os.path.join(root, name) for root, _, names in os.walk(tests) for name in names
        if name.startswith("test_") and name.endswith(".py")
        and "pytest.mark.cuda" in open(os.path.join(root, name), encoding="utf-8").read()
    )


def cuda_tests_step(plan, state) -> str:
    import torch

    files = cuda_test_files()
    if not files:
        raise RuntimeError("no test file uses pytest.mark.cuda")
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rs", *files],
        cwd=PROJECT, env=dict(os.environ, **ENV), capture_output=True, text=True, timeout=plan.test_timeout,
    )
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", completed.stdout)}
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-6000:] + completed.stderr[-3000:])
        raise RuntimeError(f"pytest -m cuda exited with {completed.returncode}: {counts}")
    passed, skipped = counts.get("passed", 0), counts.get("skipped", 0)
    if torch.cuda.is_available() and (skipped or not passed):
        sys.stderr.write(completed.stdout[-6000:])
        raise RuntimeError(f"CUDA is available but {skipped} CUDA test(s) were skipped, {passed} passed")
    note = "" if torch.cuda.is_available() else " (no CUDA here)"
    return f"{passed} passed, {skipped} skipped{note}, in {len(files)} file(s)"


CONFIGURATIONS = {
    "2a. training, baseline": ("linear head, text only", dict(head="linear", use_visual=False)),
    "2b. training, P-MNER": ("TCFM + verbalizer, {objects} objects", dict(head="verbalizer", use_visual=True, fusion="tcfm")),
}


def training_rows(plan, state, add_row):
    import torch

    import bench_model

    timing = types.SimpleNamespace(device=plan.device, dtype="bfloat16", warmup=plan.warmup, repeats=plan.repeats)
    baseline = None
    for label, (setting, switches) in CONFIGURATIONS.items():
        def measure(switches=switches):
            nonlocal baseline
            reset_memory(plan.device)
            torch.manual_seed(0)
            model = bench_model.build_model(
                state["text_model"], visual_feature_dim=feature_dim(plan.backbone), max_objects=plan.objects,
                fusion_num_heads=plan.text_size.get("num_attention_heads", 12), **switches,
            ).to(plan.device)
            batch = bench_model.make_batch(
                model, plan.train_batch, plan.length, plan.objects, plan.device, torch.Generator().manual_seed(0)
            )
            seconds = bench_model.train_step_time(model, batch, timing)
            memory = peak_memory(plan.device)
            del model, batch
            text = f"{1 / seconds:.2f} steps/s ({plan.train_batch * plan.length / seconds:,.0f} tokens/s), {memory}"
            if baseline is None:
                baseline = seconds
            else:
                text += f", step {seconds / baseline:.2f}x baseline"
            return text

        setting = setting.format(objects=plan.objects)
        add_row(label, f"bf16 autocast, {setting}, batch {plan.train_batch} x {plan.length}, median of "
                       f"{plan.repeats} steps", measure)


def frr_step(plan, state) -> str:
    import bench_frr

    from processing_pmner import PMNERImageProcessor

    folder = os.path.join(state["workdir"], "images")
    os.makedirs(folder, exist_ok=True)
    state["images"] = folder
    paths = bench_frr.synthetic_images(folder, plan.frr_images)
    processor = PMNERImageProcessor(**frr_settings(plan))
    processor.load_models(plan.device)
    processor(paths[: plan.frr_batch], device=plan.device)  # warm-up: allocator, kernels
    synchronize(plan.device)
    start = time.perf_counter()
    output = processor(paths, device=plan.device, batch_size=plan.frr_batch)
    synchronize(plan.device)
    seconds = time.perf_counter() - start
    objects = int(output["visual_mask"].sum())
    if tuple(output["visual_features"].shape) != (len(paths), plan.objects, feature_dim(plan.backbone)):
        raise RuntimeError(f"unexpected features {tuple(output['visual_features'].shape)}")
    del processor
    reset_memory(plan.device)
    return f"{len(paths) / seconds:.1f} images/s ({len(paths)} images, {objects} objects, {seconds:.2f} s)"


def pipeline_step(plan, state) -> str:
    from modeling_pmner import PMNERForTokenClassification
    from processing_pmner import PMNERProcessor
    from processing_pmner.pipeline_pmner import PMNERPipeline

    model = PMNERForTokenClassification.from_pretrained(state["model_folder"])
    processor = PMNERProcessor.from_pretrained(state["model_folder"])
    pipe = PMNERPipeline(model=model, processor=processor, device=plan.device)
    texts = tweets(plan.pipeline_tweets, seed=1)
    pipe(texts[: plan.pipeline_batch], batch_size=plan.pipeline_batch)  # warm-up
    synchronize(plan.device)
    start = time.perf_counter()
    results = pipe(texts, batch_size=plan.pipeline_batch)
    synchronize(plan.device)
    seconds = time.perf_counter() - start
    if len(results) != len(texts):
        raise RuntimeError(f"{len(results)} results for {len(texts)} tweets")
    entities = sum(len(result) for result in results)
    del pipe, model
    reset_memory(plan.device)
    return (f"{len(texts) / seconds:.1f} tweets/s ({len(texts)} tweets without image, batch {plan.pipeline_batch}, "
            f"{entities} entities)")


def predict_step(plan, state) -> str:
    texts = tweets(plan.predict_tweets, seed=2)
    images = sorted(os.listdir(state["images"])) if state.get("images") else []
    source = os.path.join(state["workdir"], "tweets.jsonl")
    with open(source, "w", encoding="utf-8") as handle:
        for index, text in enumerate(texts):
            record = {"id": index, "text": text}
            if images and index % 4 == 0:
                record["image"] = images[(index // 4) % len(images)]
            handle.write(json.dumps(record) + "\n")
    output = os.path.join(state["workdir"], "entities.jsonl")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launcher = [torchrun] if os.path.isfile(torchrun) else [sys.executable, "-m", "torch.distributed.run"]
    command = [
        *launcher, "--standalone", "--nproc_per_node", "1", "-m", "predict_pmner.cli",
        state["model_folder"], source, "-o", output, "--batch-size", str(plan.pipeline_batch),
        "--device", plan.device, "--no-progress",
    ] + (["--image-dir", state["images"]] if images else [])
    start = time.perf_counter()
    completed = subprocess.run(
        command, cwd=PROJECT, env=dict(os.environ, **ENV), capture_output=True, text=True, timeout=plan.test_timeout
    )
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-4000:])
        raise RuntimeError(f"torchrun pmner-predict exited with {completed.returncode}")
    with open(output, encoding="utf-8") as handle:
        written = sum(1 for line in handle if line.strip())
    if written != len(texts) or f"{len(texts)} tweets tagged" not in completed.stderr:
        sys.stderr.write(completed.stderr[-4000:])
        raise RuntimeError(f"{written} records written for {len(texts)} tweets")
    with_images = sum(1 for index in range(len(texts)) if images and index % 4 == 0)
    tagged = re.search(r"(\d+) tweets tagged in ([\d.]+) s", completed.stderr)
    rate = f"{int(tagged[1]) / max(float(tagged[2]), 0.05):.1f} tweets/s tagging, " if tagged else ""
    return (f"{rate}{len(texts) / seconds:.1f} tweets/s over the whole command, model loading included "
            f"({len(texts)} tweets, {with_images} with an image)")


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------


def make_plan(args) -> types.SimpleNamespace:
    if args.dry_run:
        plan = dict(
            device="cpu", text_size=dict(vocab_size=1200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=37, max_position_embeddings=160),
            length=32, train_batch=4, warmup=1, repeats=2, objects=5,
            detector="fasterrcnn_mobilenet_v3_large_320_fpn", backbone="resnet18", frr_images=4, frr_batch=2,
            pipeline_tweets=16, pipeline_batch=8, predict_tweets=12, test_timeout=300,
        )
    else:
        plan = dict(
            device="cuda", text_size={},  # BertConfig defaults: bert-base (12 layers, 768 hidden, vocabulary 30522)
            length=128, train_batch=32, warmup=3, repeats=10, objects=5,
            detector="fasterrcnn_resnet50_fpn_v2", backbone="resnet152", frr_images=128, frr_batch=16,
            pipeline_tweets=2048, pipeline_batch=64, predict_tweets=1024, test_timeout=300,
        )
    for name in ("detector", "backbone"):
        if getattr(args, name):
            plan[name] = getattr(args, name)
    return types.SimpleNamespace(**plan)


def versions() -> str:
    import platform

    import torch

    parts = [f"python {platform.python_version()}"]
    parts += [f"{name} {installed_version(name) or 'missing'}" for name in REPORTED]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return ", ".join(parts) + f"; torch CUDA {torch.version.cuda}, {device}, CPU cores {os.cpu_count()}"


def run_steps(args) -> int:
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise UsageError("no CUDA device here: run on the GPU machine, or pass --dry-run for the CPU check")
    chosen = args.steps.split(",") if args.steps else list(STEPS)
    unknown = [name for name in chosen if name not in STEPS]
    if unknown:
        raise UsageError(f"--steps: unknown {unknown}; choose from {','.join(STEPS)}")
    plan = make_plan(args)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.update(ENV)
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(versions(), flush=True)
    rows, failed = [], []
    state = {"workdir": tempfile.mkdtemp(prefix="pmner-gpu-check-")}

    def add_row(label, setting, function):
        print(f"[{time.strftime('%H:%M:%S')}] {label}: {setting}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            result = function()
        except Exception as error:  # noqa: BLE001  (every step is reported; the exit status says one failed)
            traceback.print_exc()
            result = f"FAILED: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            failed.append(label)
        rows.append((label, setting, result.replace("|", "/"), time.perf_counter() - start))

    size = "BERT-base (BertConfig defaults)" if not plan.text_size else "tiny BERT (2 x 32)"
    total = time.perf_counter()
    try:
        # steps 2a/2b, 4 and 5 need the models of step 0, 5 also the images of step 3
        if {"build", "train", "pipeline", "predict"} & set(chosen):
            add_row(STEPS["build"], f"{size}, random weights; FRR {plan.detector} + {plan.backbone}",
                    lambda: build_step(plan, state))
        if "tests" in chosen:
            add_row(STEPS["tests"], "pytest -m cuda", lambda: cuda_tests_step(plan, state))
        if "train" in chosen:
            training_rows(plan, state, add_row)
        if "frr" in chosen or "predict" in chosen:
            add_row(STEPS["frr"], f"{plan.detector} + {plan.backbone}, random weights, {plan.frr_images} synthetic "
                                  f"640x480 JPEGs, batch {plan.frr_batch}, {plan.objects} objects", lambda: frr_step(plan, state))
        if "pipeline" in chosen:
            add_row(STEPS["pipeline"], f"{size}, {plan.device}, float32", lambda: pipeline_step(plan, state))
        if "predict" in chosen:
            add_row(STEPS["predict"], f"--nproc_per_node 1, --device {plan.device}, batch {plan.pipeline_batch}",
                    lambda: predict_step(plan, state))
    finally:
        shutil.rmtree(state["workdir"], ignore_errors=True)
    print(f"\n{'dry run on the CPU (tiny sizes)' if args.dry_run else 'CUDA'}: {len(rows)} rows in "
          f"{time.perf_counter() - total:.0f} s\n")
    print("| step | setting | result | seconds |")
    print("|---|---|---|---:|")
    for label, setting, result, seconds in rows:
        print(f"| {label} | {setting} | {result} | {seconds:.1f} |")
    sys.stdout.flush()
    if failed:
        print(f"gpu_check: FAILED steps: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny size")
    parser.add_argument("--steps", default=None, help=f"comma-separated subset of {','.join(STEPS)} (default: all)")
    parser.add_argument("--detector", default=None, help="FRR detector of step 3 instead of the default")
    parser.add_argument("--backbone", default=None, help="FRR backbone of step 3 instead of the default")
    parser.add_argument("--prepare-wheels", metavar="DIR", default=None, help="download the wheels to carry into DIR")
    parser.add_argument("--python-version", default="3.12", help="--prepare-wheels: the GPU machine's Python")
    parser.add_argument("--install-wheels", metavar="DIR", default=None, help="install the needed carried wheels")
    parser.add_argument("--site", default=os.path.join(tempfile.gettempdir(), "pmner-gpu-site"),
                        help="--install-wheels: the folder they are installed into (put it on PYTHONPATH)")
    args = parser.parse_args(argv)
    try:
        if args.prepare_wheels:
            return prepare_wheels(os.path.abspath(args.prepare_wheels), args.python_version)
        if args.install_wheels:
            return install_wheels(os.path.abspath(args.install_wheels), os.path.abspath(args.site))
        return run_steps(args)
    except UsageError as error:
        print(f"gpu_check: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
