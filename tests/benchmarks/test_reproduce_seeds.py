"""Seeds of the benchmark sweeps: `reproduce_paper.py --seeds` runs each row once per seed and reports mean ± std;
`text_only_experiments.py --seed-list` checks its seeds the same way; both write results.json beside the table."""

import json
import math
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

from fixtures import PROJECT, write_tiny_masked_lm, write_twitter_fixture


ENV = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
TRAIN = os.path.join(PROJECT, "train_pmner.py")

# Stands in for the launcher: records the train_pmner.py command it is given and writes the all_results.json that
# a finished run leaves, with scores that depend on --seed (so that the table's mean and std can be checked).
FAKE_LAUNCHER = textwrap.dedent(
    """
    import json, os, sys

    log, argv = sys.argv[1], sys.argv[2:]
    with open(log, "a") as handle:
        handle.write(json.dumps(argv) + "\\n")
    seed = int(argv[argv.index("--seed") + 1])
    folder = argv[argv.index("--output_dir") + 1]
    with open(os.path.join(folder, "all_results.json"), "w") as handle:
        json.dump(
            {"eval_f1": 0.60 + seed / 100, "predict_precision": 0.5, "predict_recall": 0.5,
             "predict_f1": 0.70 + seed / 100, "train_runtime": 10.0, "epoch": 1.0}, handle,
        )
    """
)


def script(name, *argv, cwd):
    command = [sys.executable, os.path.join(PROJECT, "benchmarks", name), *argv]
    env = dict(os.environ, HF_HOME=str(cwd / "hf-home"), **ENV)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def reproduce_paper(*argv, cwd):
    return script("reproduce_paper.py", *argv, cwd=cwd)


def commands_of(output: str) -> list[list[str]]:
    """The train_pmner.py commands a --dry-run printed, each from train_pmner.py on."""
    commands = [shlex.split(line) for line in output.splitlines() if TRAIN in line and not line.startswith("command:")]
    return [command[command.index(TRAIN) :] for command in commands]


def value_of(command: list[str], flag: str) -> str:
    """The flag's last value in the command (the one train_pmner.py's parser keeps)."""
    return command[len(command) - 1 - command[::-1].index(flag) + 1]


def table_rows(output: str, dataset: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in output.splitlines()
            if line.startswith(f"| {dataset} |")]


def test_dry_run_gives_each_row_one_command_per_seed(tmp_path):
    from train_pmner import parse_arguments

    result = reproduce_paper("--dry-run", "--seeds", "1,2", "--rows", "T+V,OURS", "--output-dir", str(tmp_path / "p"),
                             cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    commands = commands_of(result.stdout)
    assert len(commands) == 8  # 2 rows x 2 datasets x 2 seeds
    seen = {}
    for command in commands:
        model_args, data_args, training_args = parse_arguments(command[1:] + ["--use_cpu", "true"])
        seen[(data_args.dataset_name, model_args.fusion, training_args.seed)] = training_args.output_dir
    assert set(seen) == {(dataset, fusion, seed) for dataset in ("twitter2015", "twitter2017")
                         for fusion in ("concat", "tcfm") for seed in (1, 2)}
    assert len(set(seen.values())) == 8  # one folder per row, dataset and seed
    assert seen[("twitter2017", "tcfm", 2)] == str(tmp_path / "p" / "twitter2017-ours-seed2")

    # without --seeds: one run a row, the config's seed, the folder names of a single run
    single = commands_of(reproduce_paper("--dry-run", "--rows", "OURS", "--datasets", "twitter2017",
                                         "--output-dir", str(tmp_path / "p"), cwd=tmp_path).stdout)
    assert len(single) == 1 and "--seed" not in single[0]
    assert value_of(single[0], "--output_dir") == str(tmp_path / "p" / "twitter2017-ours")


def test_grid_rows_ask_for_a_7x7_grid_without_detector(tmp_path):
    from processing_pmner.image_processing_pmner import PMNERImageProcessor
    from train_pmner import parse_arguments

    result = reproduce_paper(
        "--dry-run", "--datasets", "twitter2017", "--rows", "T+V+grid,T+V+TCFM+grid,OURS", "--output-dir",
        str(tmp_path / "p"), "--", "--detector", "fasterrcnn_mobilenet_v3_large_320_fpn", "--max_objects", "5",
        "--feature_layer", "layer3", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    grid, grid_tcfm, ours = commands_of(result.stdout)
    for command, fusion in ((grid, "concat"), (grid_tcfm, "tcfm")):
        assert value_of(command, "--fusion") == fusion and value_of(command, "--head") == "linear"
        assert value_of(command, "--detector") == "none" and value_of(command, "--grid_size") == "7"
        assert value_of(command, "--max_objects") == "49" and value_of(command, "--add_whole_image") == "true"
        # train_pmner.py reads these settings, and the image processor accepts them together
        model_args, _, _ = parse_arguments(command[1:] + ["--use_cpu", "true"])
        assert (model_args.grid_size, model_args.feature_layer, model_args.max_objects) == (7, "layer3", 49)
        processor = PMNERImageProcessor(
            detector=None, grid_size=model_args.grid_size, max_objects=model_args.max_objects,
            add_whole_image=model_args.add_whole_image, feature_layer=model_args.feature_layer,
            backbone="resnet18", backbone_weights=None,
        )
        assert processor.grid_size == 7
    assert value_of(ours, "--detector") == "fasterrcnn_mobilenet_v3_large_320_fpn" and "--grid_size" not in ours
    assert value_of(ours, "--max_objects") == "5"
    assert all(value_of(command, "--feature_layer") == "layer3" for command in (grid, grid_tcfm, ours))
    assert len({value_of(command, "--output_dir") for command in (grid, grid_tcfm, ours)}) == 3
    refused = reproduce_paper("--dry-run", "--", "--grid_size", "5", cwd=tmp_path)
    assert refused.returncode == 2 and "['--grid_size'] after -- would change what a row is" in refused.stderr


def write_finished_run(command: list[str], results: dict) -> None:
    """A run folder as a finished train_pmner.py run leaves it for the sweep: the command it was started with
    (experiment.json, as run_folders.start_or_reuse records it) and its all_results.json."""
    folder = value_of(command, "--output_dir")
    os.makedirs(folder)
    with open(os.path.join(folder, "experiment.json"), "w") as handle:
        json.dump({"command": command}, handle)
    with open(os.path.join(folder, "all_results.json"), "w") as handle:
        json.dump(results, handle)


def test_seeds_read_back_finished_runs_run_the_missing_one_and_give_mean_and_std(tmp_path):
    (tmp_path / "fake_launcher.py").write_text(FAKE_LAUNCHER)
    log = tmp_path / "launched.jsonl"
    launcher = f"{shlex.quote(sys.executable)} {tmp_path / 'fake_launcher.py'} {log}"
    argv = ["--datasets", "twitter2017", "--rows", "OURS", "--seeds", "1,2,3", "--launcher", launcher,
            "--output-dir", str(tmp_path / "paper")]
    dry = reproduce_paper("--dry-run", *argv, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    commands = {int(value_of(command, "--seed")): command for command in commands_of(dry.stdout)}
    assert sorted(commands) == [1, 2, 3]
    # seeds 1 and 3 finished; the fake launcher gives seed 2 the scores 0.62 / 0.72
    write_finished_run(commands[1], {"eval_f1": 0.60, "predict_precision": 0.5, "predict_recall": 0.4,
                                     "predict_f1": 0.70, "train_runtime": 10.0, "epoch": 1.0})
    write_finished_run(commands[3], {"eval_f1": 0.69, "predict_precision": 0.5, "predict_recall": 0.6,
                                     "predict_f1": 0.75, "train_runtime": 30.0, "epoch": 1.0})

    result = reproduce_paper(*argv, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    launched = [json.loads(line) for line in log.read_text().splitlines()]
    assert launched == [commands[2]]  # only the missing seed ran, with its own command
    recorded = json.loads((tmp_path / "paper" / "twitter2017-ours-seed2" / "experiment.json").read_text())
    assert recorded == {"command": commands[2]}

    def mean_and_sample_std(values):
        mean = sum(values) / len(values)
        return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))

    test_mean, test_std = mean_and_sample_std([70, 72, 75])
    valid_mean, valid_std = mean_and_sample_std([60, 62, 69])
    [cells] = table_rows(result.stdout, "twitter2017")
    assert cells[1] == "OURS" and cells[2] == f"{valid_mean:.2f} ± {valid_std:.2f}"
    assert cells[5] == f"{test_mean:.2f} ± {test_std:.2f}" and cells[6] == "91.31"  # the paper's, beside ours
    assert cells[7] == "17" and cells[8] == "3" and cells[9] == "1: 70.00, 2: 72.00, 3: 75.00"

    saved = json.loads((tmp_path / "paper" / "results.json").read_text())
    [row] = saved["rows"]
    assert (row["dataset"], row["row"], row["n"], row["seeds"]) == ("twitter2017", "OURS", 3, [1, 2, 3])
    assert row["paper_test_f1"] == 91.31
    assert row["test_f1"]["values"] == pytest.approx([70, 72, 75])
    assert row["test_f1"]["mean"] == pytest.approx(test_mean) and row["test_f1"]["std"] == pytest.approx(test_std)
    assert row["validation_f1"]["std"] == pytest.approx(valid_std)
    assert row["test_recall"]["values"][2] == pytest.approx(60)

    # all three finished now: nothing runs again, the same table
    again = reproduce_paper(*argv, cwd=tmp_path)
    assert again.returncode == 0 and len(log.read_text().splitlines()) == 1
    assert table_rows(again.stdout, "twitter2017") == [cells]
    # a seed's folder is compared with that seed's full command: other arguments stop the sweep
    other = reproduce_paper(*argv, "--", "--learning_rate", "1e-5", cwd=tmp_path)
    assert other.returncode != 0 and "twitter2017-ours-seed1 was run with another command" in other.stderr


@pytest.mark.parametrize("seeds", ["a", "", "1,1", "-1", "1,,2", "4294967296"])
def test_bad_seeds_are_one_argument_error(tmp_path, seeds):
    result = reproduce_paper("--dry-run", "--seeds", seeds, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith("reproduce_paper.py: error: argument --seeds: ")


def test_seeds_and_a_seed_after_dashes_are_refused_together(tmp_path):
    for extra in (["--seed", "7"], ["--seed=7"]):
        result = reproduce_paper("--dry-run", "--seeds", "1,2", "--", *extra, cwd=tmp_path)
        assert result.returncode == 2 and result.stdout == ""
        assert "--seeds and --seed after -- both set the seed" in result.stderr.splitlines()[-1]
    assert reproduce_paper("--dry-run", "--", "--seed", "7", cwd=tmp_path).returncode == 0  # alone, it is the seed


def test_text_only_sweep_checks_its_seeds_and_writes_results(tmp_path):
    # the output folder cannot be created (its parent is a file): a seed check that let a value through fails fast
    # instead of starting a real sweep
    (tmp_path / "a-file").write_text("")
    for argv in (["--seed-list", "1,1"], ["--seed-list", "x"], ["--seeds", "0"], ["--seeds", "two"]):
        result = script("text_only_experiments.py", *argv, "--output-dir", str(tmp_path / "a-file" / "x"), cwd=tmp_path)
        assert result.returncode == 2 and result.stdout == "", result.stderr
        assert f"argument {argv[0]}: " in result.stderr.splitlines()[-1]

    # finished runs of seeds 4 and 5, with the settings the sweep records: read back, not run
    settings = {"dataset": "twitter2017", "arm": "prompt", "epochs": 2.0, "batch_size": 32, "learning_rate": 1e-4,
                "text_model": "offline-minilm", "max_train_samples": None, "max_eval_samples": None}
    for seed, (valid, test) in {4: (0.50, 0.60), 5: (0.54, 0.66)}.items():
        folder = tmp_path / "runs" / f"twitter2017-prompt-seed{seed}"
        folder.mkdir(parents=True)
        (folder / "experiment.json").write_text(json.dumps({**settings, "seed": seed}))
        (folder / "all_results.json").write_text(json.dumps({
            "eval_f1": valid, "predict_precision": 0.5, "predict_recall": 0.5, "predict_f1": test,
            "train_samples": 10, "train_runtime": 4.0, "epoch": 2.0, "predict_runtime": 1.0, "predict_samples": 10,
        }))
    result = script("text_only_experiments.py", "--datasets", "twitter2017", "--arms", "prompt", "--seed-list", "4,5",
                    "--output-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [row] = json.loads((tmp_path / "runs" / "results.json").read_text())["rows"]
    assert (row["dataset"], row["arm"], row["n"], row["seeds"]) == ("twitter2017", "prompt", 2, [4, 5])
    assert row["test_f1"]["values"] == pytest.approx([60, 66]) and row["test_f1"]["mean"] == pytest.approx(63)
    assert row["test_f1"]["std"] == pytest.approx(math.sqrt(18)) and row["validation_f1"]["mean"] == pytest.approx(52)
    assert "| twitter2017 | prompt | 52.00 ± 2.83 |" in result.stdout


def test_two_seeds_reach_train_pmner(tmp_path):
    """One row, two seeds, tiny models: each seed is its own run, trained with that seed."""
    write_tiny_masked_lm(tmp_path / "tiny-bert")
    write_twitter_fixture(tmp_path / "data", tmp_path / "images", sizes=(24, 8, 8))
    tiny = [
        "--data_dir", str(tmp_path / "data"), "--image_dir", str(tmp_path / "images"),
        "--text_model_name_or_path", str(tmp_path / "tiny-bert"), "--fusion_num_heads", "4",
        "--backbone", "resnet18", "--backbone_weights", "random",
        "--bf16", "false", "--use_cpu", "true", "--num_train_epochs", "1", "--learning_rate", "3e-3",
        "--per_device_train_batch_size", "4", "--logging_steps", "1",
    ]
    result = reproduce_paper("--datasets", "twitter2017", "--rows", "T+V", "--seeds", "3,4", "--output-dir",
                             str(tmp_path / "paper"), "--", *tiny, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    runs = {seed: json.loads((tmp_path / "paper" / f"twitter2017-t_v-seed{seed}" / "all_results.json").read_text())
            for seed in (3, 4)}
    assert runs[3]["train_loss"] != runs[4]["train_loss"]  # the seeds trained differently
    [row] = json.loads((tmp_path / "paper" / "results.json").read_text())["rows"]
    assert row["seeds"] == [3, 4]
    assert row["test_f1"]["values"] == pytest.approx([runs[seed]["predict_f1"] * 100 for seed in (3, 4)])
