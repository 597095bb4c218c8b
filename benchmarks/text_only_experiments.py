#!/usr/bin/env python
"""Text-only accuracy experiments on the real Twitter benchmarks with the offline MiniLM encoder.

For each dataset and seed, trains P-MNER's prompt head and the plain linear token classifier on the same encoder,
data and budget (one `train_pmner.py` run each, model selected on validation, test evaluated once), then prints
mean and standard deviation of test F1. `--variants` adds the switches that exist only here (prompt mode, tag
scheme, trainable verbalizer), each compared with the default prompt head on the same seeds.

    python benchmarks/text_only_experiments.py                               # both datasets, 3 seeds: ~1 h
    python benchmarks/text_only_experiments.py --datasets twitter2017 --seeds 1                    # ~10 min
    python benchmarks/text_only_experiments.py --seed-list 4,5                # seeds 4 and 5 instead of 1..3
    python benchmarks/text_only_experiments.py --variants bioes,trainable     # ~1 h more on 2 CPU cores
    python benchmarks/text_only_experiments.py --datasets twitter2017 --variants cloze \\
        --max-train-samples 200 --max-eval-samples 200                     # ~45 min

Cloze mode asks one question per word (about 16 rows per Twitter-2017 tweet, each twice as long), so a full cloze
run takes hours on a CPU; `--max-train-samples` / `--max-eval-samples` train and select every arm on the same
first N tweets (test stays whole) and name its folders `...-trainN-valM-...`.

Each run writes its folder under --output-dir (default outputs/experiments); runs whose all_results.json already
exists are read back instead of re-run, so an interrupted sweep continues where it stopped (an interrupted run
resumes from its last checkpoint). A run folder whose settings (experiment.json, written before training) differ
from the requested ones stops the sweep with an error instead of being reused or resumed. The table's numbers, with
the per-seed values, are also written to `<output-dir>/results.json` (replaced by each sweep; rerunning a sweep reads
its finished runs back).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from run_folders import METRICS, seed_list, seed_summary, start_or_reuse


PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARMS = {
    "linear": ["--head", "linear"],
    "prompt": ["--head", "verbalizer"],
    "cloze": ["--head", "verbalizer", "--prompt_mode", "cloze"],
    "bioes": ["--head", "verbalizer", "--tag_scheme", "BIOES"],
    "trainable": ["--head", "verbalizer", "--verbalizer_trainable"],
    "retrieval1": ["--head", "verbalizer", "--retrieval_context", "1"],
    "retrieval3": ["--head", "verbalizer", "--retrieval_context", "3"],
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="twitter2017,twitter2015")
    parser.add_argument("--seeds", type=seed_count, default=3, help="run seeds 1..N (default 3)")
    parser.add_argument(
        "--seed-list", type=seed_list, default=None,
        help="comma list of seeds to run instead of 1..--seeds (e.g. 2,3 to add seeds to a finished seed 1)",
    )
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--text-model", default="offline-minilm")
    parser.add_argument("--variants", default="", help="comma list of extra arms: cloze, bioes, trainable, retrieval1, retrieval3")
    parser.add_argument(
        "--order", choices=("arm", "seed"), default="arm",
        help="'seed': every arm of seed 1, then of seed 2, ... (a cut-short sweep still compares the arms on the "
        "seeds it finished)",
    )
    parser.add_argument("--arms", default=None, help="comma list of the arms to run instead of prompt, linear and --variants")
    parser.add_argument("--max-train-samples", type=int, default=None, help="train on the first N tweets only")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="select on the first N validation tweets")
    parser.add_argument("--output-dir", default=os.path.join(PROJECT, "outputs", "experiments"))
    args = parser.parse_args()
    args.output_dir = os.path.abspath(args.output_dir)
    args.seed_values = args.seed_list if args.seed_list is not None else list(range(1, args.seeds + 1))
    return args


def seed_count(text: str) -> int:
    """Argparse type of --seeds: a number of seeds, at least 1."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seeds (runs seeds 1..N), got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 seed, got {count}")
    return count


def run(args, dataset, arm, seed) -> dict:
    subset = f"-train{args.max_train_samples}" if args.max_train_samples else ""
    subset += f"-val{args.max_eval_samples}" if args.max_eval_samples else ""
    output_dir = os.path.join(args.output_dir, f"{dataset}-{arm}{subset}-seed{seed}")
    settings = {
        "dataset": dataset, "arm": arm, "seed": seed, "epochs": args.epochs, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "text_model": args.text_model, "max_train_samples": args.max_train_samples,
        "max_eval_samples": args.max_eval_samples,
    }
    if not start_or_reuse(output_dir, settings):
        command = [
            sys.executable, os.path.join(PROJECT, "train_pmner.py"),
            "--dataset_name", dataset, "--data_dir", "auto", "--text_only",
            "--text_model_name_or_path", args.text_model,
            "--output_dir", output_dir,
            "--do_train", "--do_eval", "--do_predict",
            "--num_train_epochs", str(args.epochs),
            "--per_device_train_batch_size", str(args.batch_size),
            "--per_device_eval_batch_size", "64",
            "--learning_rate", str(args.learning_rate),
            "--warmup_steps", "0.1",
            "--seed", str(seed),
            "--save_total_limit", "1",
            "--use_cpu",
            "--disable_tqdm", "true",
            *ARMS[arm],
        ]
        if args.max_train_samples:
            command += ["--max_train_samples", str(args.max_train_samples)]
        if args.max_eval_samples:
            command += ["--max_eval_samples", str(args.max_eval_samples)]
        start = time.perf_counter()
        with open(output_dir + ".log", "a") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT)
        print(f"  {dataset} {arm} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    with open(os.path.join(output_dir, "all_results.json")) as handle:
        return json.load(handle)


def summary(values):
    """"mean ± std" in %, the spread 0.00 for one run."""
    stats = seed_summary(values)
    return f"{stats['mean'] * 100:.2f} ± {(stats['std'] or 0.0) * 100:.2f}"


def main():
    args = parse_args()
    arms = ["prompt", "linear"] + [arm for arm in args.variants.split(",") if arm]
    if args.arms:
        arms = [arm for arm in args.arms.split(",") if arm]
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(ARMS)}")
    print(f"command: python {' '.join(sys.argv)}")
    table = {}
    for dataset in args.datasets.split(","):
        pairs = [(arm, seed) for arm in arms for seed in args.seed_values]
        if args.order == "seed":
            pairs.sort(key=lambda pair: pair[1])
        for arm in arms:
            table[(dataset, arm)] = []
        for arm, seed in pairs:
            table[(dataset, arm)].append(run(args, dataset, arm, seed))

    subset = f", first {args.max_train_samples} training tweets" if args.max_train_samples else ""
    subset += f", first {args.max_eval_samples} validation tweets" if args.max_eval_samples else ""
    print(
        f"\n## Text-only test F1 (%), MiniLM-L6, {args.epochs:g} epochs, batch {args.batch_size}, lr {args.learning_rate:g}"
        f"{subset}, seeds {', '.join(map(str, args.seed_values))} (mean ± std; model chosen on validation)\n"
    )
    print(
        "| dataset | arm | validation F1 | test P | test R | test F1 | per-seed test F1 | train tweets "
        "| training run (s, incl. validation) | per epoch (s) | test prediction (ms per tweet) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (dataset, arm), runs in table.items():
        per_seed = ", ".join(f"{r['predict_f1'] * 100:.2f}" for r in runs)
        print(
            f"| {dataset} | {arm} | {summary([r['eval_f1'] for r in runs])} "
            f"| {summary([r['predict_precision'] for r in runs])} | {summary([r['predict_recall'] for r in runs])} "
            f"| {summary([r['predict_f1'] for r in runs])} | {per_seed} | {runs[0]['train_samples']} "
            f"| {statistics.mean(r['train_runtime'] for r in runs):.0f} "
            f"| {statistics.mean(r['train_runtime'] / r['epoch'] for r in runs):.0f} "
            f"| {statistics.mean(1000 * r['predict_runtime'] / r['predict_samples'] for r in runs):.1f} |"
        )
    rows = [
        {
            "dataset": dataset, "arm": arm, "n": len(runs), "seeds": args.seed_values,
            **{name: seed_summary([r[key] * 100 for r in runs]) for name, key in METRICS.items()},
        }
        for (dataset, arm), runs in table.items()
    ]
    results_file = os.path.join(args.output_dir, "results.json")
    with open(results_file, "w") as handle:
        json.dump({"command": f"python {' '.join(sys.argv)}", "unit": "%", "rows": rows}, handle, indent=2)
    print(f"\nresults: {results_file}")


if __name__ == "__main__":
    main()
