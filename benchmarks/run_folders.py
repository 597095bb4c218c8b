"""Run folders of the benchmark sweeps (`text_only_experiments.py`, `reproduce_paper.py`), and their seeds.

Each folder records the settings it was started with in `experiment.json`, written before training, so that a
finished run is read back and an interrupted one resumed only for the same settings. `seed_list` reads a comma
list of seeds; `METRICS` names the scores the sweeps report; `seed_summary` gives the mean, sample standard deviation
and per-seed values of a metric.
"""

import argparse
import json
import os
import statistics


METRICS = {  # results.json name: all_results.json key
    "validation_f1": "eval_f1", "test_precision": "predict_precision", "test_recall": "predict_recall",
    "test_f1": "predict_f1",
}


def start_or_reuse(folder: str, settings: dict) -> bool:
    """Whether the run in `folder` has finished (its `all_results.json` exists). Otherwise records `settings` in
    `folder/experiment.json`, creating the folder, for the caller to start (or resume) the run.

    Stops with an error when the folder was started with other settings, or exists without `experiment.json`
    (its settings unknown: `train_pmner.py` would resume whatever checkpoints it holds)."""
    settings_file = os.path.join(folder, "experiment.json")
    if os.path.exists(settings_file):
        with open(settings_file) as handle:
            recorded = json.load(handle)
        if recorded != settings:
            raise SystemExit(
                f"{folder} was run with another command ({recorded}, not {settings}); "
                "pass another --output-dir or move it away"
            )
    elif os.path.exists(folder):
        raise SystemExit(f"{folder} exists without experiment.json (its settings are unknown); move it away")
    if os.path.exists(os.path.join(folder, "all_results.json")):
        return True
    os.makedirs(folder, exist_ok=True)
    with open(settings_file, "w") as handle:
        json.dump(settings, handle, indent=2)
    return False


def seed_list(text: str) -> list[int]:
    """Argparse type: a comma list of distinct seeds in [0, 2**32) (the range `train_pmner.py --seed` accepts)."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise argparse.ArgumentTypeError(f"expected a comma list of seeds such as 1,2,3, got {text!r}")
    seeds = []
    for item in items:
        try:
            seed = int(item)
        except ValueError:
            message = f"{item!r} is not an integer (expected a comma list such as 1,2,3)"
            raise argparse.ArgumentTypeError(message) from None
        if not 0 <= seed < 2**32:
            raise argparse.ArgumentTypeError(f"seed {seed} is outside [0, 2**32)")
        if seed in seeds:
            raise argparse.ArgumentTypeError(f"seed {seed} is given twice (each seed is one run)")
        seeds.append(seed)
    return seeds


def seed_summary(values: list[float]) -> dict:
    """`values` (one per seed) as {"mean", "std" (sample standard deviation; None for one value), "n", "values"}."""
    values = [float(value) for value in values]
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
        "values": values,
    }


def mean_std(summary: dict, scale: float = 100.0) -> str:
    """"mean ± std" of a `seed_summary`, times `scale`, two decimals; the value alone when there is one run."""
    if summary["std"] is None:
        return f"{summary['mean'] * scale:.2f}"
    return f"{summary['mean'] * scale:.2f} ± {summary['std'] * scale:.2f}"
