"""End-to-end runs of train_pmner.py on a tiny fixture (tiny BERT, generated images, random vision weights)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from fixtures import PROJECT, run_without_project, write_tiny_masked_lm, write_twitter_fixture, write_unrebuildable_weights


ENV = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def training_command(tmp_path, *extra, name="run", launcher=(sys.executable,), drop=()):
    command = [
        *launcher,
        os.path.join(PROJECT, "train_pmner.py"),
        "--dataset_name", "twitter2017",
        "--data_dir", str(tmp_path / "data"),
        "--text_model_name_or_path", str(tmp_path / "tiny-bert"),
        "--do_train", "--do_eval", "--do_predict",
        "--num_train_epochs", "3",
        "--learning_rate", "3e-3",
        "--per_device_train_batch_size", "8",
        "--fusion_num_heads", "4",
        "--logging_steps", "2",
        "--use_cpu",
        "--seed", "7",
        *extra,
    ]
    return [item for item in command if item not in drop]


def run_training(tmp_path, *extra, name="run", launcher=(sys.executable,), drop=()):
    output_dir = tmp_path / name
    command = training_command(tmp_path, "--output_dir", str(output_dir), *extra, launcher=launcher, drop=drop)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), **ENV)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return output_dir, result.stdout + result.stderr


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("train")
    write_tiny_masked_lm(tmp_path / "tiny-bert")
    write_twitter_fixture(tmp_path / "data", tmp_path / "images", sizes=(48, 16, 16), missing_images={"train_3"})
    write_unrebuildable_weights(tmp_path / "resnet18-frr.safetensors", seed=3)  # no setting rebuilds these
    return tmp_path


@pytest.fixture(scope="module")
def visual_run(workspace):
    return run_training(
        workspace,
        "--image_dir", str(workspace / "images"),
        "--detector", "none",
        "--backbone", "resnet18",
        "--backbone_weights", str(workspace / "resnet18-frr.safetensors"),
        "--tag_scheme", "BIOES",
        name="visual",
    )


def test_training_writes_every_output_and_learns(visual_run):
    output_dir, log = visual_run
    for name in (
        "all_results.json", "predict_report.txt", "test_predictions.conll", "README.md", "config.json",
        "model.safetensors", "modeling_pmner.py", "configuration_pmner.py", "processor_config.json",
        "processing_pmner.py", "image_processing_pmner.py", "tokenizer_config.json",
    ):
        assert (output_dir / name).is_file(), name
    results = json.loads((output_dir / "all_results.json").read_text())
    assert {"eval_f1", "predict_f1", "predict_precision", "predict_recall", "train_loss"} <= set(results)
    # what the FRR features hold (detector none: every given image is one whole-image object, no detection)
    assert results["visual_train_images_missing"] == 1 and results["visual_train_images_given"] == 47
    assert results["visual_train_mean_objects_per_image"] == 1.0
    assert results["visual_train_share_with_object_above_threshold"] == 0.0
    assert results["visual_train_whole_image_fallbacks"] == 47 and results["visual_test_images_given"] == 16
    for name in ("train_results.json", "eval_results.json", "predict_results.json"):
        assert (output_dir / name).is_file(), name
    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) >= 6 and sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses
    assert results["predict_f1"] > 0.5, results
    card = (output_dir / "README.md").read_text()
    assert "model-index" in card and f"{results['predict_f1'] * 100:.2f}" in card
    assert "Training WITHOUT images" not in log
    assert "epoch" in log and "trained in" in log and "F1" in log
    conll = (output_dir / "test_predictions.conll").read_text().strip().split("\n\n")
    assert len(conll) == 16 and all(block.startswith("IMGID:test_") for block in conll)


RELOAD_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForTokenClassification, AutoProcessor
    folder = {folder!r}
    model = AutoModelForTokenClassification.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    blocks = open(folder + "/test_predictions.conll").read().strip().split("\\n\\n")
    words = [[line.split("\\t")[0] for line in block.splitlines()[1:]] for block in blocks]
    images = [{images!r} + "/" + block.splitlines()[0][len("IMGID:"):] + ".jpg" for block in blocks]
    expected = [[line.split("\\t")[2] for line in block.splitlines()[1:]] for block in blocks]
    batch = processor(words, images=images)
    with torch.no_grad():
        logits = model(**{{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids", "visual_features", "visual_mask")}}).logits
    predicted = processor.post_process_token_classification(logits, batch)
    print(json.dumps({{"same": predicted == expected, "predicted": predicted[:3], "expected": expected[:3]}}))
    """
)


def test_output_folder_reloads_with_remote_code_and_same_predictions(visual_run, workspace, tmp_path):
    output_dir, _ = visual_run
    elsewhere = tmp_path / "copied-model"
    shutil.copytree(output_dir, elsewhere, ignore=shutil.ignore_patterns("checkpoint-*", "frr_cache"))
    result = run_without_project(RELOAD_SCRIPT.format(folder=str(elsewhere), images=str(workspace / "images")), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["same"], outcome


def test_text_only_run_says_so(workspace):
    output_dir, log = run_training(workspace, "--text_only", "--num_train_epochs", "1", "--prompt_mode", "cloze",
                                   "--max_train_samples", "16", name="text-only")
    assert "Training WITHOUT images (--text_only was given)" in log
    results = json.loads((output_dir / "all_results.json").read_text())
    assert 0.0 <= results["predict_f1"] <= 1.0 and results["predict_samples"] == 16
    config = json.loads((output_dir / "config.json").read_text())
    assert config["use_visual"] is False


def test_one_and_two_processes_give_the_same_test_f1(visual_run, workspace):
    """Evaluating one trained folder with torchrun (2 CPU processes, gloo) gathers every prediction once."""
    trained, _ = visual_run
    common = ("--text_model_name_or_path", str(trained), "--do_train", "false", "--per_device_eval_batch_size", "3",
              "--image_dir", str(workspace / "images"), "--max_predict_samples", "13")
    one, _ = run_training(workspace, *common, name="eval-one")
    two, log = run_training(workspace, *common, name="eval-two",
                            launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"))
    assert "2 process(es) (distributed)" in log
    first = json.loads((one / "all_results.json").read_text())
    second = json.loads((two / "all_results.json").read_text())
    assert first["predict_samples"] == second["predict_samples"] == 13
    assert first["predict_f1"] == second["predict_f1"]
    assert first["eval_f1"] == second["eval_f1"]
    assert (one / "test_predictions.conll").read_text() == (two / "test_predictions.conll").read_text()


def test_resume_after_kill_mid_epoch_matches_an_uninterrupted_run(workspace):
    steps = ("--text_only", "--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--save_strategy", "steps",
             "--save_steps", "5", "--eval_strategy", "steps", "--eval_steps", "5", "--save_total_limit", "4")
    full, _ = run_training(workspace, *steps, name="uninterrupted")

    killed_dir = workspace / "killed"
    env = dict(os.environ, HF_HOME=str(workspace / "hf-home"), **ENV)
    command = training_command(workspace, "--output_dir", str(killed_dir), *steps)
    process = subprocess.Popen(command, cwd=workspace, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed_dir / "checkpoint-10"  # 12 steps an epoch: step 10 is inside the first epoch
    deadline = time.monotonic() + 300
    while not (checkpoint / "trainer_state.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.kill()
    process.wait()
    assert (checkpoint / "trainer_state.json").exists()
    assert not (killed_dir / "all_results.json").exists(), "the run finished before it was killed"

    resumed, log = run_training(workspace, *steps, "--resume_from_checkpoint", str(checkpoint), name="killed")
    expected = json.loads((full / "all_results.json").read_text())
    results = json.loads((resumed / "all_results.json").read_text())
    for key in ("eval_f1", "predict_f1", "eval_loss", "predict_loss", "best_epoch"):
        assert results[key] == pytest.approx(expected[key], abs=1e-6), key


# ----------------------------------------------------------------------------------------------------------------------
# Argument files: every shipped config parses, and command-line arguments after the file override it
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", sorted(os.listdir(os.path.join(PROJECT, "configs"))))
def test_shipped_configs_parse_and_command_line_overrides_them(config):
    from train_pmner import parse_arguments

    path = os.path.join(PROJECT, "configs", config)
    # --use_cpu: the paper configs ask for bf16, which TrainingArguments refuses on a machine without a GPU otherwise
    model_args, data_args, training_args = parse_arguments([path, "--use_cpu", "true"])
    assert data_args.dataset_name in ("twitter2015", "twitter2017") and training_args.do_train
    model_args, data_args, training_args = parse_arguments(
        [path, "--use_cpu", "true", "--fusion", "concat", "--head", "linear", "--num_train_epochs", "1",
         "--output_dir", "elsewhere", "--do_train", "false"]
    )
    assert (model_args.fusion, model_args.head, training_args.num_train_epochs) == ("concat", "linear", 1.0)
    assert training_args.output_dir == "elsewhere" and not training_args.do_train


def test_argument_file_errors_name_the_file(tmp_path):
    from train_pmner import parse_arguments

    typo = tmp_path / "typo.yaml"
    typo.write_text("dataset_name: twitter2017\nlearning_rte: 1.0e-4\noutput_dir: out\n")
    with pytest.raises(ValueError, match=r"typo\.yaml: unknown arguments \['learning_rte'\]"):
        parse_arguments([str(typo)])
    listing = tmp_path / "list.yaml"
    listing.write_text("- dataset_name\n- twitter2017\n")
    with pytest.raises(ValueError, match=r"list\.yaml: expected a mapping"):
        parse_arguments([str(listing)])
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"dataset_name": "twitter2015", "output_dir": "out", "use_cpu": True, "seed": 7}))
    model_args, data_args, training_args = parse_arguments([str(settings), "--seed", "3"])
    assert data_args.dataset_name == "twitter2015" and training_args.use_cpu and training_args.seed == 3


def test_argument_file_values_keep_their_types(tmp_path):
    from train_pmner import parse_arguments

    config = tmp_path / "typed.yaml"
    config.write_text(
        "dataset_name: twitter2015\noutput_dir: out\nuse_cpu: true\n"
        "detector: null\nsave_total_limit: null\nreport_to: []\nlearning_rate: 5e-5\nmax_train_samples: '16'\n"
        "lr_scheduler_kwargs: {power: 2.0}\n"
    )
    model_args, data_args, training_args = parse_arguments([str(config)])
    assert model_args.detector is None and training_args.save_total_limit is None  # null overrides a default
    assert training_args.report_to == [] and training_args.lr_scheduler_kwargs == {"power": 2.0}
    assert training_args.learning_rate == 5e-5 and data_args.max_train_samples == 16  # strings read like flags
    model_args, _, training_args = parse_arguments([str(config), "--detector", "none", "--save_total_limit", "1"])
    assert model_args.detector == "none" and training_args.save_total_limit == 1


def reproduce_paper(*argv, cwd, check=True):
    command = [sys.executable, os.path.join(PROJECT, "benchmarks", "reproduce_paper.py"), *argv]
    env = dict(os.environ, HF_HOME=str(cwd / "hf-home"), **ENV)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout if check else result


def test_reproduce_paper_commands_carry_each_table3_row(tmp_path):
    import shlex

    from train_pmner import parse_arguments

    output = reproduce_paper("--dry-run", "--output-dir", str(tmp_path / "paper"), "--", "--seed", "7", cwd=tmp_path)
    commands = [shlex.split(line) for line in output.splitlines() if "train_pmner.py" in line]
    assert len(commands) == 8  # 4 rows x 2 datasets
    seen = set()
    for command in commands:
        argv = command[command.index(os.path.join(PROJECT, "train_pmner.py")) + 1 :]
        model_args, data_args, training_args = parse_arguments(argv + ["--use_cpu", "true"])
        assert training_args.seed == 7 and model_args.text_model_name_or_path == "bert-base-uncased"
        assert model_args.tag_scheme == "BIOES" and training_args.bf16
        seen.add((data_args.dataset_name, model_args.fusion, model_args.head, model_args.detector, training_args.output_dir))
    assert {(fusion, head, detector) for _, fusion, head, detector, _ in seen} == {
        ("concat", "linear", "none"),
        ("tcfm", "linear", "none"),
        ("tcfm", "linear", "fasterrcnn_resnet50_fpn_v2"),
        ("tcfm", "verbalizer", "fasterrcnn_resnet50_fpn_v2"),
    }
    assert len({folder for *_, folder in seen}) == 8 and {dataset for dataset, *_ in seen} == {"twitter2015", "twitter2017"}


def test_reproduce_paper_runs_rows_and_prints_the_table(workspace, tmp_path):
    tiny = [
        "--data_dir", str(workspace / "data"), "--image_dir", str(workspace / "images"),
        "--text_model_name_or_path", str(workspace / "tiny-bert"), "--fusion_num_heads", "4",
        "--detector", "fasterrcnn_mobilenet_v3_large_320_fpn", "--detector_weights", "random",
        "--backbone", "resnet18", "--backbone_weights", "random",
        "--bf16", "false", "--use_cpu", "true", "--num_train_epochs", "1", "--learning_rate", "3e-3",
    ]
    output = reproduce_paper(
        "--datasets", "twitter2017", "--rows", "T+V,OURS", "--output-dir", str(tmp_path / "paper"), "--", *tiny,
        cwd=tmp_path,
    )
    table = [line.split(" | ") for line in output.splitlines() if line.startswith("| twitter2017 |")]
    assert [cells[1] for cells in table] == ["T+V", "OURS"]
    assert table[0][6] == "84.33" and table[1][6] == "91.31"  # the paper's, in their own column
    rows = (("t_v", "concat", "linear", None), ("ours", "tcfm", "verbalizer", "fasterrcnn_mobilenet_v3_large_320_fpn"))
    for cells, (row, fusion, head, detector) in zip(table, rows):
        folder = tmp_path / "paper" / f"twitter2017-{row}"
        processor = json.loads((folder / "processor_config.json").read_text())
        assert processor["image_processor"]["detector"] == detector  # the whole-image row keeps its own
        config = json.loads((folder / "config.json").read_text())
        assert (config["fusion"], config["head"], config["tag_scheme"]) == (fusion, head, "BIOES")
        results = json.loads((folder / "all_results.json").read_text())
        assert cells[5] == f"{results['predict_f1'] * 100:.2f}" and cells[2] == f"{results['eval_f1'] * 100:.2f}"
    assert os.listdir(tmp_path / "paper" / "frr_cache-twitter2017")  # one feature cache for both rows
    # finished rows are read back, not re-run
    again = reproduce_paper(
        "--datasets", "twitter2017", "--rows", "T+V,OURS", "--output-dir", str(tmp_path / "paper"), "--", *tiny,
        cwd=tmp_path,
    )
    assert "train_pmner.py" not in again.split("## Table 3")[0].split("\n", 1)[1]
    assert [line.split(" | ") for line in again.splitlines() if line.startswith("| twitter2017 |")] == table
    # ... but not when the command differs, and a row's own switches cannot be overridden after --
    other = reproduce_paper(
        "--datasets", "twitter2017", "--rows", "OURS", "--output-dir", str(tmp_path / "paper"), "--", *tiny,
        "--seed", "3", cwd=tmp_path, check=False,
    )
    assert other.returncode != 0 and "twitter2017-ours was run with another command" in other.stderr
    reserved = reproduce_paper("--rows", "OURS", "--dry-run", "--", "--head", "linear", cwd=tmp_path, check=False)
    assert reserved.returncode == 2 and "['--head'] after -- would change what a row is" in reserved.stderr


# ----------------------------------------------------------------------------------------------------------------------
# Runs that would silently produce an untrained model, or lose a user's file, are refused before any work
# ----------------------------------------------------------------------------------------------------------------------


def run_refused(tmp_path, argv, name="refused"):
    command = [sys.executable, os.path.join(PROJECT, "train_pmner.py"), *argv]
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), **ENV)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stderr


def test_no_do_flag_is_refused_and_writes_nothing(workspace, tmp_path):
    argv = ["--dataset_name", "twitter2017", "--data_dir", str(workspace / "data"), "--text_only",
            "--text_model_name_or_path", str(workspace / "tiny-bert"), "--output_dir", str(tmp_path / "out")]
    message = run_refused(tmp_path, argv)
    assert "nothing to do: pass --do_train" in message and "--do_eval" in message and "--do_predict" in message
    assert not (tmp_path / "out").exists()
    # evaluating a masked LM that is not a trained P-MNER would score an untrained model
    message = run_refused(tmp_path, argv + ["--do_eval", "--do_predict"])
    assert "--do_eval/--do_predict without --do_train would score an untrained model" in message
    assert not (tmp_path / "out").exists()
    message = run_refused(tmp_path, argv + ["--do_train", "--max_train_samples", "0"])
    assert "--max_train_samples must be at least 1, got 0" in message
    message = run_refused(tmp_path, argv + ["--do_eval", "--push_to_hub", "--text_model_name_or_path", "x"])
    assert "score an untrained model" in message or "--push_to_hub needs --do_train" in message
    # paths that cannot be used are named before any work
    (tmp_path / "a-file").write_text("keep me")
    message = run_refused(tmp_path, argv + ["--do_train", "--output_dir", str(tmp_path / "a-file")])
    assert "exists and is not a folder" in message and (tmp_path / "a-file").read_text() == "keep me"
    message = run_refused(tmp_path, argv + ["--do_train", "--data_dir", str(tmp_path / "missing")])
    assert f"--data_dir '{tmp_path / 'missing'}' is not a folder" in message
    message = run_refused(tmp_path, [item for item in argv if item != "--text_only"]
                          + ["--do_train", "--image_dir", str(tmp_path / "no-images")])
    assert "--image_dir" in message and "is not a folder" in message
    message = run_refused(tmp_path, [str(tmp_path / "missing.yaml")])
    assert "missing.yaml: no such argument file" in message


def test_output_folder_may_not_be_an_input(visual_run, workspace, tmp_path):
    trained, _ = visual_run
    before = {name: (trained / name).read_bytes() for name in ("README.md", "all_results.json", "model.safetensors")}
    message = run_refused(tmp_path, ["--dataset_name", "twitter2017", "--data_dir", str(workspace / "data"),
                                     "--image_dir", str(workspace / "images"), "--text_model_name_or_path", str(trained),
                                     "--do_eval", "--output_dir", str(trained)])
    assert "is the same folder as --text_model_name_or_path" in message
    assert {name: (trained / name).read_bytes() for name in before} == before
    message = run_refused(tmp_path, ["--dataset_name", "twitter2017", "--data_dir", str(workspace / "data"),
                                     "--text_only", "--text_model_name_or_path", str(workspace / "tiny-bert"),
                                     "--do_train", "--output_dir", str(workspace / "data")])
    assert "is the same folder as --data_dir" in message


@pytest.mark.parametrize(
    "line, message",
    [
        ("learning_rate: true", "learning_rate: expected a number, got True"),
        ("num_train_epochs: [1, 2]", "num_train_epochs: expected a number, got [1, 2]"),
        ("max_train_samples: 3.7", "max_train_samples: expected an integer, got 3.7"),
        ("per_device_train_batch_size: 8.5", "per_device_train_batch_size: expected an integer, got 8.5"),
        ("do_train: 1", "do_train: expected true or false, got 1"),
        ("learning_rate: fast", "learning_rate: 'fast' is not valid here"),
        ("lr_scheduler_type: sideways", "lr_scheduler_type: expected one of ['linear', 'cosine'"),
        ("seed: null", "seed: expected a value (null is not allowed here)"),
    ],
)
def test_argument_file_values_are_checked_like_flags(tmp_path, line, message):
    from train_pmner import ArgumentsError, parse_arguments

    config = tmp_path / "bad.yaml"
    config.write_text(f"dataset_name: twitter2017\noutput_dir: out\nuse_cpu: true\n{line}\n")
    with pytest.raises(ArgumentsError) as error:
        parse_arguments([str(config)])
    assert str(error.value).startswith(f"{config}: ") and message in str(error.value), str(error.value)


def test_results_files_and_do_predict_is_honoured(workspace):
    # a first run predicts test; a second one into the same folder does not, and no earlier result survives it
    first, _ = run_training(workspace, "--text_only", "--num_train_epochs", "1", "--max_train_samples", "16",
                            name="no-predict")
    assert (first / "predict_results.json").is_file() and (first / "test_predictions.conll").is_file()
    output_dir, log = run_training(workspace, "--text_only", "--num_train_epochs", "1", "--max_train_samples", "16",
                                   name="no-predict", drop=("--do_predict",))
    for name in ("train_results.json", "eval_results.json", "all_results.json", "trainer_state.json", "README.md"):
        assert (output_dir / name).is_file(), name
    for name in ("predict_results.json", "test_predictions.conll", "predict_report.txt"):
        assert not (output_dir / name).exists(), name
    results = json.loads((output_dir / "all_results.json").read_text())
    assert "eval_f1" in results and not any(key.startswith("predict_") for key in results)
    card = (output_dir / "README.md").read_text()
    assert "split: validation" in card and "test not evaluated in this run" in card
    assert "test not evaluated" in log


def test_evaluating_a_trained_folder_says_it_was_not_trained_here(visual_run, workspace):
    trained, _ = visual_run
    output_dir, _ = run_training(workspace, "--text_model_name_or_path", str(trained), "--do_train", "false",
                                 "--image_dir", str(workspace / "images"), "--max_predict_samples", "5",
                                 name="eval-only")
    card = (output_dir / "README.md").read_text()
    assert "**not trained in this run**" in card and f"trained P-MNER model `{trained.name}`" in card
    assert str(trained) not in card  # named by its base name: the card names no folder of this machine
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / "train_results.json").exists()
    assert json.loads((output_dir / "predict_results.json").read_text())["predict_samples"] == 5
    # a trained folder keeps its own switches
    message = run_refused(workspace, training_command(workspace, "--text_model_name_or_path", str(trained),
                                                      "--text_only", "--tag_scheme", "BIO", "--output_dir",
                                                      str(workspace / "switch"))[2:])
    assert "is a trained P-MNER with tag_scheme='BIOES'" in message and "--tag_scheme BIO" in message
    # and its own FRR settings (an explicit setting equal to the folder's passes the check)
    message = run_refused(workspace, training_command(workspace, "--text_model_name_or_path", str(trained),
                                                      "--image_dir", str(workspace / "images"), "--detector", "none",
                                                      "--feature_layer", "layer3", "--output_dir",
                                                      str(workspace / "frr-switch"))[2:])
    assert "has a processor with feature_layer='layer4'" in message and "--feature_layer layer3" in message
    assert "detector" not in message.split("has a processor with")[1].split("--feature_layer")[0]


def test_resuming_another_kind_of_model_is_refused(workspace):
    steps = ("--text_only", "--num_train_epochs", "1", "--max_train_samples", "16")
    first, _ = run_training(workspace, *steps, name="resume-kind")
    checkpoint = next(first.glob("checkpoint-*"))
    message = run_refused(workspace, training_command(workspace, *steps, "--tag_scheme", "BIOES", "--head", "linear",
                                                      "--resume_from_checkpoint", str(checkpoint),
                                                      "--output_dir", str(workspace / "resume-other"))[2:])
    assert f"checkpoint {checkpoint} holds a model with" in message
    assert "head='verbalizer'" in message and "head='linear'" in message
    assert "tag_scheme='BIO'" in message and "tag_scheme='BIOES'" in message


def test_linear_head_reads_the_plain_tweet_and_other_types_can_be_kept(workspace, tmp_path):
    data = tmp_path / "data2015"
    data.mkdir()
    for split in ("train", "valid", "test"):
        text = (workspace / "data" / f"{split}.txt").read_text()
        (data / f"{split}.txt").write_text(text.replace("-MISC", "-OTHER"))
    output_dir, _ = run_training(workspace, "--text_only", "--num_train_epochs", "1", "--head", "linear",
                                 "--dataset_name", "twitter2015", "--data_dir", str(data), "--other_as_misc", "false",
                                 name="linear-other")
    processor = json.loads((output_dir / "processor_config.json").read_text())
    assert processor["prompt_template"] == "{sentence}"
    config = json.loads((output_dir / "config.json").read_text())
    assert "B-OTHER" in config["id2label"].values() and "B-MISC" not in config["id2label"].values()
    assert "OTHER" in (output_dir / "predict_report.txt").read_text() or "OTHER_f1" in (output_dir / "all_results.json").read_text()


def test_a_processor_with_other_labels_than_its_model_is_refused(visual_run, workspace, tmp_path):
    trained, _ = visual_run
    edited = tmp_path / "edited"
    shutil.copytree(trained, edited, ignore=shutil.ignore_patterns("checkpoint-*", "frr_cache"))
    config = json.loads((edited / "processor_config.json").read_text())
    config["label_names"] = config["label_names"][:5]
    (edited / "processor_config.json").write_text(json.dumps(config))
    message = run_refused(tmp_path, ["--dataset_name", "twitter2017", "--data_dir", str(workspace / "data"),
                                     "--image_dir", str(workspace / "images"), "--text_model_name_or_path", str(edited),
                                     "--do_eval", "--output_dir", str(tmp_path / "out")])
    assert f"{edited}: the processor's label_names (5 tags)" in message and "config.id2label (17 tags)" in message


def test_published_card_hides_the_token_and_parsing_sees_aliases(tmp_path):
    from train_pmner import ArgumentsError, check_same_model, parse_arguments
    from training_pmner.publishing import redacted_argv, redacted_file_text

    assert redacted_argv(["--hub_token", "hf_abc", "--seed", "3", "--hub-token=hf_def"]) == [
        "--hub_token", "<redacted>", "--seed", "3", "--hub-token=<redacted>"]
    assert "hf_abc" not in redacted_file_text("seed: 3\nhub_token: hf_abc\n")
    assert "hf_abc" not in redacted_file_text('{"seed": 3, "hub_token": "hf_abc"}')
    assert redacted_argv(["--token", "hf_abc", "--token=hf_def"]) == ["--token", "<redacted>", "--token=<redacted>"]
    assert "hf_abc" not in redacted_file_text("token: hf_abc\n") and "hf_abc" not in redacted_file_text('{"token": "hf_abc"}')
    # dash aliases and abbreviations count as given: --do-train is a request to train
    _, _, training_args = parse_arguments(["--do-train", "--tag_s", "BIOES", "--output_dir", "out", "--use_cpu"])
    assert {"do_train", "tag_scheme"} <= training_args.explicit_arguments
    # TrainingArguments' own refusals are argument errors (exit 2), not tracebacks
    with pytest.raises(ArgumentsError, match="eval_strategy|save_strategy|load_best_model_at_end"):
        parse_arguments(["--do_train", "--output_dir", "out", "--use_cpu", "--eval_strategy", "no"])
    # a checkpoint with other fusion heads or another text model is another model
    saved = {"head": "verbalizer", "tag_scheme": "BIO", "fusion": "tcfm", "use_visual": True, "fusion_num_heads": 12,
             "id2label": {"0": "O"}, "text_config": {"model_type": "bert", "hidden_size": 768}}
    with pytest.raises(ArgumentsError, match="fusion_num_heads=12.*fusion_num_heads=4"):
        check_same_model("checkpoint-1", saved, dict(saved, fusion_num_heads=4))
    with pytest.raises(ArgumentsError, match="text_model="):
        check_same_model("checkpoint-1", saved, dict(saved, text_config={"model_type": "roberta", "hidden_size": 768}))


def test_an_output_folder_with_other_files_is_refused(workspace, tmp_path):
    folder = tmp_path / "my-project"
    folder.mkdir()
    (folder / "README.md").write_text("my own readme")
    message = run_refused(tmp_path, ["--dataset_name", "twitter2017", "--data_dir", str(workspace / "data"),
                                     "--text_only", "--text_model_name_or_path", str(workspace / "tiny-bert"),
                                     "--do_train", "--output_dir", str(folder)])
    assert "is not empty and holds no earlier train_pmner.py run" in message
    assert (folder / "README.md").read_text() == "my own readme"


def run_failing(workspace, tmp_path, *extra):
    command = training_command(workspace, "--output_dir", str(tmp_path / "refused"), *extra)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), **ENV)
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


DETECTOR_RUN = (
    "--detector", "fasterrcnn_mobilenet_v3_large_320_fpn", "--detector_weights", "random:1",
    "--backbone", "resnet18", "--backbone_weights", "random:3", "--crop_size", "32", "--max_objects", "2",
    "--num_train_epochs", "1",
)


def test_a_detector_that_finds_nothing_is_never_a_silent_text_only_run(workspace, tmp_path):
    # a random detector at the paper's threshold detects nothing: the run warns, and the card says so
    images = ("--image_dir", str(workspace / "images"))
    output_dir, log = run_training(workspace, *images, *DETECTOR_RUN, name=f"{tmp_path.name}-nothing")
    assert "train_pmner.py: warning: 100.0% of the 47 training images have no object detected above score_threshold=0.95" in log
    card = (output_dir / "README.md").read_text()
    assert "0.0% of the 47 training images have an object above the threshold; 47 use the whole-image fallback" in card
    assert "**warning**: 100.0% have no detected object" in card
    # --require_objects makes it an error; --detector_kwargs reaches the builder, so that the same detector finds
    # objects once torchvision's own 0.05 floor is lifted
    refused = run_failing(workspace, tmp_path, *images, *DETECTOR_RUN, "--require_objects")
    assert refused.returncode == 2 and "--require_objects: 100.0% of the 47 training images" in refused.stderr
    assert "Traceback" not in refused.stderr
    found, log = run_training(
        workspace, *images, *DETECTOR_RUN, "--score_threshold", "0", "--detector_kwargs", '{"box_score_thresh": 0.0}',
        "--require_objects", name=f"{tmp_path.name}-found",
    )
    assert "have no object detected" not in log
    results = json.loads((found / "all_results.json").read_text())
    assert results["visual_train_share_with_object_above_threshold"] == 1.0
    saved = json.loads((found / "processor_config.json").read_text())["image_processor"]
    assert saved["detector_kwargs"] == {"box_score_thresh": 0.0}
