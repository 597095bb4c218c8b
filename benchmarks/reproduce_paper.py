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
input. The --head linear rows read the plain tweet (the prompt template belongs to the prompt head).

    python benchmarks/reproduce_paper.py                                   # 4 rows x 2 datasets, then the table
    python benchmarks/reproduce_paper.py --datasets twitter2017 --rows OURS
    python benchmarks/reproduce_paper.py --launcher "accelerate launch"    # through Accelerate (multi-GPU)
    python benchmarks/reproduce_paper.py --dry-run                         # print the commands only
    python benchmarks/reproduce_paper.py --rows OURS -- --seed 7           # after --: more train_pmner.py arguments

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

from run_folders import start_or_reuse


PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# set by the rows and the script: arguments after -- may not name them (--detector may: it picks the FRR rows'
# detector, while the whole-image rows keep --detector none)
RESERVED = ("--fusion", "--head", "--output_dir", "--feature_cache_dir", "--add_whole_image")

WHOLE_IMAGE_ONLY = ["--detector", "none", "--add_whole_image", "true"]
ROWS = {
    "T+V": ["--fusion", "concat", "--head", "linear", *WHOLE_IMAGE_ONLY],
    "T+V+TCFM": ["--fusion", "tcfm", "--head", "linear", *WHOLE_IMAGE_ONLY],
    "T+FRR+TCFM": ["--fusion", "tcfm", "--head", "linear", "--add_whole_image", "false"],
    "OURS": ["--fusion", "tcfm", "--head", "verbalizer", "--add_whole_image", "false"],
    "T+FRR+TCFM+whole": ["--fusion", "tcfm", "--head", "linear", "--add_whole_image", "true"],
    "OURS+whole": ["--fusion", "tcfm", "--head", "verbalizer", "--add_whole_image", "true"],
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


def row_folder(args, dataset, row) -> str:
    return os.path.join(args.output_dir, f"{dataset}-{row.lower().replace('+', '_')}")


def row_command(args, dataset, row) -> list[str]:
    return [
        *shlex.split(args.launcher),
        os.path.join(PROJECT, "train_pmner.py"),
        os.path.join(PROJECT, "configs", f"paper-{dataset}.yaml"),
        "--output_dir", row_folder(args, dataset, row),
        "--feature_cache_dir", os.path.join(args.output_dir, f"frr_cache-{dataset}"),  # shared by the rows
        *args.extra,
        *ROWS[row],  # last, so that the row's switches win
    ]


def main(argv=None):
    args = parse_args(argv)
    print(f"command: python {shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])}")
    results = {}
    for dataset in args.datasets:
        for row in args.rows:
            command = row_command(args, dataset, row)
            if args.dry_run:
                print(shlex.join(command))
                continue
            folder = row_folder(args, dataset, row)
            settings = {"command": command[command.index(os.path.join(PROJECT, "train_pmner.py")) :]}
            if not start_or_reuse(folder, settings):
                start = time.perf_counter()
                print(f"  {dataset} {row}: {shlex.join(command)}", flush=True)
                subprocess.run(command, check=True)
                print(f"  {dataset} {row}: {time.perf_counter() - start:.0f} s", flush=True)
            with open(os.path.join(folder, "all_results.json")) as handle:
                results[(dataset, row)] = json.load(handle)
    if args.dry_run:
        return

    print("\n## Table 3 rows: test scores (%) of the model chosen on validation\n")
    print(
        "| dataset | row | validation F1 | test P | test R | test F1 | paper test F1 (theirs) "
        "| s per epoch (training + validation) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (dataset, row), result in results.items():
        per_epoch = result["train_runtime"] / result["epoch"] if result.get("epoch") else float("nan")
        print(
            f"| {dataset} | {row} | {result['eval_f1'] * 100:.2f} | {result['predict_precision'] * 100:.2f} "
            f"| {result['predict_recall'] * 100:.2f} | {result['predict_f1'] * 100:.2f} "
            f"| {paper_f1(dataset, row)} | {per_epoch:.0f} |"
        )


if __name__ == "__main__":
    main()
