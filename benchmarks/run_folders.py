"""Run folders of the benchmark sweeps (`text_only_experiments.py`, `reproduce_paper.py`).

Each folder records the settings it was started with in `experiment.json`, written before training, so that a
finished run is read back and an interrupted one resumed only for the same settings.
"""

import json
import os


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
