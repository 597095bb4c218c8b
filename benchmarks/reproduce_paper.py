#!/usr/bin/env python
"""The paper's setting and its Table 3 ablation rows, one command (needs the tweet images, the Hub and a GPU).

Each row is `train_pmner.py configs/paper-<dataset>.yaml` (bert-base-uncased, FRR with COCO Faster R-CNN and
ImageNet ResNet-152, 5 objects above 0.95, BIOES, batch 8, max length 128, bf16) with the row's model switches:

    T+V          --fusion concat --head linear --detector none --add_whole_image true  (whole-image ResNet feature)
    T+V+TCFM     --fusion tcfm   --head linear --detector none --add_whole_image true
    T+FRR+TCFM   --fusion tcfm   --head linear                   (FRR: the detected objects only, as the paper)
    OURS         --fusion tcfm   --head verbalizer               (the configs' defaults: P-MNER)

Extra rows, not in the paper: T+FRR+TCFM+whole and OURS+whole add the whole image as one more object when fewer
than 5 detections pass (`--add_whole_image true`), so tweets whose image has no confident COCO object keep a visual
input. T+V+grid and T+V+TCFM+grid replace the single whole-image feature of T+V and T+V+TCFM by the whole image as
a 7x7 grid of ResNet regions, no detector (the 49 cells fill all 49 object slots, so the whole-image filler that
`--detector none` asks for never adds an object). The --head linear rows read the plain tweet (the prompt template
belongs to the prompt head).

    T+V+grid       --fusion concat --head linear --detector none --grid_size 7 --max_objects 49 --add_whole_image true
    T+V+TCFM+grid  --fusion tcfm   --head linear --detector none --grid_size 7 --max_objects 49 --add_whole_image true

    python benchmarks/reproduce_paper.py                                   # 4 rows x 2 datasets, then the table
    python benchmarks/reproduce_paper.py --datasets twitter2017 --rows OURS
    python benchmarks/reproduce_paper.py --launcher "accelerate launch"    # through Accelerate (multi-GPU)
    python benchmarks/reproduce_paper.py --dry-run                         # print the commands only
    python benchmarks/reproduce_paper.py --rows OURS -- --seed 7           # after --: more train_pmner.py arguments
    python benchmarks/reproduce_paper.py --seeds 1,2,3                     # 3 runs a row: mean ± std over seeds
    python benchmarks/reproduce_paper.py --rows T+V+grid --output-dir outputs/paper-layer3 -- --feature_layer layer3

Without --seeds each row runs once with the config's seed (or `-- --seed N`), in `<output-dir>/<dataset>-<row>`.
With `--seeds 1,2,3` each row runs once per seed (`--seed N` passed to train_pmner.py) in
`<output-dir>/<dataset>-<row>-seedN`, and the table gives mean ± sample standard deviation over the seeds, with n and
the per-seed test F1; `--seeds` and `-- --seed` cannot be combined. The table's numbers, per-seed values included,
are also written to `<output-dir>/results.json` (replaced by each run of this script; rerunning it reads the
finished runs back at no cost). `-- --feature_layer layer3` passes ResNet's layer3 features (1024-d, the paper's
R^1024) to every row; give it its own --output-dir, since the folders' names do not say which layer they used.

Every run selects its model on validation and evaluates test once. Runs whose folder under --output-dir already
holds all_results.json are read back, not re-run, when they were run with the same command (recorded in its
experiment.json; a different one stops with an error). The rows of a dataset share one image-feature cache. The
table prints the paper's Table 3 numbers beside ours, marked as theirs. Runs start in the current folder, so
relative paths (the configs' `twitter2017_images`, `-- --image_dir imgs`) are read from there.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from run_folders import METRICS, mean_std, seed_list, seed_summary, start_or_reuse


PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# set by the rows and the script: arguments after -- may not name them (--detector may: it picks the FRR rows'
# detector, while the whole-image and grid rows keep --detector none; --max_objects may too: the grid rows set their
# own 49 last)
RESERVED = ("--fusion", "--head", "--output_dir", "--feature_cache_dir", "--add_whole_image", "--grid_size")

WHOLE_IMAGE_ONLY = ["--detector", "none", "--add_whole_image", "true"]
GRID_7X7 = ["--detector", "none", "--grid_size", "7", "--max_objects", "49", "--add_whole_image", "true"]
ROWS = {
    "T+V": ["--fusion", "concat", "--head", "linear", *WHOLE_IMAGE_ONLY],
    "T+V+TCFM": ["--fusion", "tcfm", "--head", "linear", *WHOLE_IMAGE_ONLY],
    "T+FRR+TCFM": ["--fusion", "tcfm", "--head", "linear", "--add_whole_image", "false"],
    "OURS": ["--fusion", "tcfm", "--head", "verbalizer", "--add_whole_image", "false"],
    "T+FRR+TCFM+whole": ["--fusion", "tcfm", "--head", "linear", "--add_whole_image", "true"],
    "OURS+whole": ["--fusion", "tcfm", "--head", "verbalizer", "--add_whole_image", "true"],
    "T+V+grid": ["--fusion", "concat", "--head", "linear", *GRID_7X7],
    "T+V+TCFM+grid": ["--fusion", "tcfm", "--head", "linear", *GRID_7X7],
}
PAPER_ROWS = ("T+V", "T+V+TCFM", "T+FRR+TCFM", "OURS")

# The paper's Table 3, test F1 (%), theirs: bert-base, images, GPU. (The table prints three numbers per dataset
# without a header; the last one is F1, matching Table 2's 79.43 / 91.31 for OURS.)
PAPER_F1 = {
    ("twitter2015", "T+V"): 72.31, ("twitter2017", "T+V"): 84.33,
    ("twitter2015", "T+V+TCFM"): 73.35, ("twitter2017", "T+V+TCFM"): 85.41,
    ("twitter2015", "T+FRR+TCFM"): 75.14, ("twitter2017", "T+FRR+TCFM"): 86.02,
    ("twitter2015", "OURS"): 79.43, ("twitter2017", "OURS"): 91.31,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="twitter2015,twitter2017")
    parser.add_argument(
        "--rows", default=",".join(PAPER_ROWS), help=f"comma list of {', '.join(ROWS)} (default: the paper's four)"
    )
    parser.add_argument(
        "--seeds", type=seed_list, default=None,
        help="comma list of seeds, e.g. 1,2,3: each row runs once per seed, the table gives mean ± std "
        "(default: one run with the config's seed)",
    )
    parser.add_argument("--launcher", default=shlex.quote(sys.executable), help='e.g. "accelerate launch"')
    parser.add_argument("--output-dir", default=os.path.join(PROJECT, "outputs", "paper"))
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    args = parser.parse_args(argv)
    reserved = [item for item in extra if item.split("=", 1)[0] in RESERVED]
    if reserved:
        parser.error(f"{reserved} after -- would change what a row is or where it is written; use --rows / --output-dir")
    if args.seeds is not None and any(item.split("=", 1)[0] == "--seed" for item in extra):
        parser.error("--seeds and --seed after -- both set the seed; give the seeds with --seeds only")
    args.extra = extra
    args.output_dir = os.path.abspath(args.output_dir)
    args.datasets = args.datasets.split(",")
    args.rows = args.rows.split(",")
    unknown = [row for row in args.rows if row not in ROWS] + [
        name for name in args.datasets if name not in ("twitter2015", "twitter2017")
    ]
    if unknown:
        parser.error(f"unknown rows or datasets {unknown}; rows: {list(ROWS)}, datasets: twitter2015, twitter2017")
    return args


def paper_f1(dataset: str, row: str) -> str:
    return f"{PAPER_F1[(dataset, row)]:.2f}" if (dataset, row) in PAPER_F1 else "(not in the paper)"


def row_folder(args, dataset, row, seed=None) -> str:
    """The run folder of `row` on `dataset`; one per seed (`...-seedN`) when --seeds is given."""
    name = f"{dataset}-{row.lower().replace('+', '_')}"
    return os.path.join(args.output_dir, name if seed is None else f"{name}-seed{seed}")


def row_command(args, dataset, row, seed=None) -> list[str]:
    return [
        *shlex.split(args.launcher),
        os.path.join(PROJECT, "train_pmner.py"),
        os.path.join(PROJECT, "configs", f"paper-{dataset}.yaml"),
        "--output_dir", row_folder(args, dataset, row, seed),
        "--feature_cache_dir", os.path.join(args.output_dir, f"frr_cache-{dataset}"),  # shared by the rows
        *args.extra,
        *([] if seed is None else ["--seed", str(seed)]),
        *ROWS[row],  # last, so that the row's switches win
    ]


def run_or_read(args, dataset, row, seed) -> dict:
    """The row's `all_results.json` for `seed`, training it first unless a run with this command has finished."""
    command = row_command(args, dataset, row, seed)
    folder = row_folder(args, dataset, row, seed)
    settings = {"command": command[command.index(os.path.join(PROJECT, "train_pmner.py")) :]}
    label = f"{dataset} {row}" + ("" if seed is None else f" seed {seed}")
    if not start_or_reuse(folder, settings):
        start = time.perf_counter()
        print(f"  {label}: {shlex.join(command)}", flush=True)
        subprocess.run(command, check=True)
        print(f"  {label}: {time.perf_counter() - start:.0f} s", flush=True)
    with open(os.path.join(folder, "all_results.json")) as handle:
        return json.load(handle)


def seed_after_dashes(extra: list[str]):
    """The value of `--seed` among the arguments after -- (an int when it reads as one), or None."""
    for index, item in enumerate(extra):
        if item == "--seed" and index + 1 < len(extra):
            value = extra[index + 1]
        elif item.startswith("--seed="):
            value = item.split("=", 1)[1]
        else:
            continue
        return int(value) if value.lstrip("-").isdigit() else value
    return None


def aggregate(args, dataset, row, runs: list[tuple]) -> dict:
    """One row of the table over its seeds: `runs` holds (seed, all_results.json) pairs, seed None for the one run
    without --seeds; scores in %."""
    entry = {
        "dataset": dataset,
        "row": row,
        "paper_test_f1": PAPER_F1.get((dataset, row)),
        "n": len(runs),
        # without --seeds: the seed given after --, or null for the config's
        "seeds": [seed_after_dashes(args.extra) if seed is None else seed for seed, _ in runs],
        "folders": [row_folder(args, dataset, row, seed) for seed, _ in runs],
    }
    for name, key in METRICS.items():
        entry[name] = seed_summary([result[key] * 100 for _, result in runs])
    per_epoch = [result["train_runtime"] / result["epoch"] for _, result in runs if result.get("epoch")]
    entry["seconds_per_epoch"] = seed_summary(per_epoch)["mean"] if per_epoch else None
    return entry


def print_table(entries: list[dict]) -> None:
    print("\n## Table 3 rows: test scores (%) of the model chosen on validation (mean ± sample std over seeds)\n")
    print(
        "| dataset | row | validation F1 | test P | test R | test F1 | paper test F1 (theirs) "
        "| s per epoch (training + validation) | n | test F1 per seed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for entry in entries:
        scores = " | ".join(mean_std(entry[name], scale=1) for name in METRICS)
        per_epoch = "n/a" if entry["seconds_per_epoch"] is None else f"{entry['seconds_per_epoch']:.0f}"
        per_seed = ", ".join(
            f"{'config seed' if seed is None else seed}: {value:.2f}"
            for seed, value in zip(entry["seeds"], entry["test_f1"]["values"])
        )
        print(
            f"| {entry['dataset']} | {entry['row']} | {scores} | {paper_f1(entry['dataset'], entry['row'])} "
            f"| {per_epoch} | {entry['n']} | {per_seed} |"
        )


def main(argv=None):
    args = parse_args(argv)
    invocation = f"python {shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])}"
    print(f"command: {invocation}")
    seeds = args.seeds or [None]
    if args.dry_run:
        for dataset in args.datasets:
            for row in args.rows:
                for seed in seeds:
                    print(shlex.join(row_command(args, dataset, row, seed)))
        return
    entries = []
    for dataset in args.datasets:
        for row in args.rows:
            runs = [(seed, run_or_read(args, dataset, row, seed)) for seed in seeds]
            entries.append(aggregate(args, dataset, row, runs))
    print_table(entries)
    results_file = os.path.join(args.output_dir, "results.json")
    with open(results_file, "w") as handle:
        json.dump({"command": invocation, "unit": "%", "rows": entries}, handle, indent=2)
    print(f"\nresults: {results_file}")


if __name__ == "__main__":
    main()
