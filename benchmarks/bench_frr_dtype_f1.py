#!/usr/bin/env python
"""What saving the FRR weights in bfloat16 / float16 costs in F1: one visual P-MNER trained with float32 FRR weights,
then the same trained folder with its FRR weights re-saved in each dtype, each evaluated on validation and test
(features recomputed from the re-saved weights; the text model is the same); and the float32 folder once more with
its features cached in float16 (`--feature_cache_dtype float16`).

    python benchmarks/bench_frr_dtype_f1.py --tweets 200                    # backbone only (whole-image feature)
    python benchmarks/bench_frr_dtype_f1.py --tweets 60 --detector          # + a confident Faster R-CNN (slow on CPU)

Data: the first N tweets of each Twitter-2017 split with a synthetic 1024x768 JPEG each (benchmarks/rehearse_paper.py
draws them); the text model is the offline MiniLM; FRR weights are random (`random:0`, or the rehearsal's confident
detector), so the images carry no real information and the F1 differences measure how much the weight precision
moves a trained model's predictions, not what pretrained weights would score. Prints a table.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from rehearse_paper import DEFAULT_TWITTER_DIR, build_models, input_paths, write_data


PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tweets", type=int, default=200, help="first N tweets of each split")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--detector", action="store_true", help="also run the (made confident) Faster R-CNN")
    parser.add_argument("--twitter-dir", default=DEFAULT_TWITTER_DIR)
    parser.add_argument("--work-dir", default=None, help="kept; default: a temporary folder, removed at the end")
    return parser.parse_args(argv)


def train_pmner(*argv, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
    command = [sys.executable, os.path.join(PROJECT, "train_pmner.py"), *argv]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"train_pmner.py failed ({' '.join(argv)}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def resave_frr_weights(source: str, target: str, dtype: str) -> None:
    """A copy of a trained folder whose FRR weights are saved in `dtype` (read from the folder's own files)."""
    from processing_pmner import PMNERProcessor

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoint-*", "frr_cache"))
    processor = PMNERProcessor.from_pretrained(target)
    processor.image_processor.frr_weights_dtype = dtype
    processor.image_processor.load_models("cpu")
    processor.save_pretrained(target)


def predictions(folder: str) -> list[str]:
    with open(os.path.join(folder, "test_predictions.conll")) as handle:
        return [line.split("\t")[2] for line in handle.read().splitlines() if "\t" in line]


def main(argv=None):
    args = parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="frr-dtype-f1-")
    os.makedirs(work, exist_ok=True)
    paths = input_paths(work)
    write_data(work, args.twitter_dir, args.tweets)
    frr = ["--backbone", "resnet152", "--add_whole_image", "true", "--max_objects", "5"]
    if args.detector:
        build_models(work, seed=0)  # writes the confident detector and a ResNet-152 (and a bert-base, unused)
        frr += ["--detector", "fasterrcnn_resnet50_fpn_v2", "--detector_weights", paths["detector"],
                "--backbone_weights", paths["backbone"]]
    else:
        frr += ["--detector", "none", "--backbone_weights", "random:0"]
    common = ["--dataset_name", "twitter2017", "--data_dir", paths["data"], "--image_dir", paths["images"],
              "--use_cpu", "--report_to", "none", "--per_device_eval_batch_size", "64", "--do_eval", "--do_predict"]
    trained = os.path.join(work, "trained-float32")
    if os.path.isfile(os.path.join(trained, "all_results.json")):
        print(f"reusing the trained model in {trained}")
    else:
        train_pmner(*common, *frr, "--text_model_name_or_path", "offline-minilm", "--do_train",
                "--num_train_epochs", str(args.epochs), "--per_device_train_batch_size", "32",
                    "--learning_rate", "1e-4", "--warmup_steps", "0.1", "--output_dir", trained, "--seed", "1",
                    cwd=work)

    rows, refused = [], []
    # (FRR weights dtype, feature cache dtype): each weights dtype with a float32 cache, then float16 features
    for dtype, cache_dtype in [(dtype, "float32") for dtype in DTYPES] + [("float32", "float16")]:
        folder = os.path.join(work, f"folder-{dtype}")
        if not os.path.isdir(folder):
            resave_frr_weights(trained, folder, dtype)
        evaluated = os.path.join(work, f"eval-{dtype}-cache-{cache_dtype}")
        shutil.rmtree(evaluated, ignore_errors=True)
        label = dtype if cache_dtype == "float32" else f"{dtype}, float16 feature cache"
        try:
            train_pmner(*common, "--text_model_name_or_path", folder, "--output_dir", evaluated,
                        "--feature_cache_dir", os.path.join(work, "cache"), "--feature_cache_dtype", cache_dtype,
                        cwd=work)
        except SystemExit as failure:  # e.g. random ResNet-152 features beyond float16's range: reported, not hidden
            reason = str(failure).strip().splitlines()[-1]
            refused.append(f"{label}: {reason}")
            continue
        with open(os.path.join(evaluated, "all_results.json")) as handle:
            results = json.load(handle)
        size = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder) if name.startswith("frr_"))
        rows.append((label, size / 2**20, results["eval_f1"] * 100, results["predict_f1"] * 100, predictions(evaluated)))

    reference = rows[0]
    print(f"\n## FRR weights dtype against float32 ({args.tweets} tweets per split, "
          f"{'Faster R-CNN + ' if args.detector else 'whole image, '}ResNet-152, random weights, MiniLM text)\n")
    print("| FRR weights | saved MiB | validation F1 | test F1 | test F1 - float32 | test tags changed |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype, size, eval_f1, test_f1, tags in rows:
        changed = sum(1 for ours, theirs in zip(tags, reference[4]) if ours != theirs)
        print(f"| {dtype} | {size:.1f} | {eval_f1:.2f} | {test_f1:.2f} | {test_f1 - reference[3]:+.2f} "
              f"| {changed} / {len(tags)} |")
    for line in refused:
        print(f"\nrefused: {line}")
    print(f"\nwork folder: {work}" + ("" if args.work_dir else " (removed)"))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
