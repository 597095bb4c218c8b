"""run_ner.py's arguments in train_pmner.py: the --model_name_or_path alias, Hub loading arguments (revision, cache,
token, remote code), CoNLL files in place of a data folder, the tokenisation's workers and cache, --help groups, and
launches that start fewer processes than asked."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from fixtures import PROJECT, TINY_BERT, write_tiny_masked_lm, write_tiny_tokenizer, write_twitter_fixture


ENV = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
SCRIPT = os.path.join(PROJECT, "train_pmner.py")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("run-ner-flags")
    write_tiny_masked_lm(root / "tiny-bert")
    write_twitter_fixture(root / "data", root / "images", sizes=(16, 4, 6))
    files = root / "files"  # the same tweets under names no data folder would have
    files.mkdir()
    for source, target in (("train.txt", "tweets-train.conll"), ("valid.txt", "dev.conll"), ("test.txt", "t.conll")):
        shutil.copy(root / "data" / source, files / target)
    return root


def common_args(*extra):
    return ["--fusion_num_heads", "4", "--do_train", "--num_train_epochs", "1", "--use_cpu", "--report_to", "none",
            "--per_device_train_batch_size", "8", *extra]


def test_help_groups_the_arguments_as_run_ner_does():
    from train_pmner import parse_arguments  # noqa: F401  (the script's parser, as --help prints it)
    from training_pmner.arguments import build_parser

    text = build_parser().format_help()
    groups = {name: text.index(f"\n{name}:\n") for name in ("ModelArguments", "DataTrainingArguments", "TrainingArguments")}
    assert groups["ModelArguments"] < groups["DataTrainingArguments"] < groups["TrainingArguments"]

    def group_of(option):
        position = text.index(option, text.index("\n\n"))  # after the usage lines
        return max((start, name) for name, start in groups.items() if start < position)[1]

    for option in ("--model_name_or_path", "--cache_dir", "--model_revision", "--token", "--trust_remote_code"):
        assert group_of(option) == "ModelArguments", option
    for option in ("--train_file", "--validation_file", "--test_file", "--preprocessing_num_workers",
                   "--overwrite_cache", "--max_train_samples"):
        assert group_of(option) == "DataTrainingArguments", option
    assert group_of("--learning_rate") == "TrainingArguments"
    assert "refused: --task_name" in " ".join(text.split())


def test_model_name_or_path_is_the_text_model_also_in_argument_files(tmp_path):
    from training_pmner.arguments import ArgumentsError, parse_arguments

    model_args, _, training_args = parse_arguments(["--model_name_or_path", "some/model", "--output_dir", str(tmp_path)])
    assert model_args.text_model_name_or_path == "some/model"
    assert "text_model_name_or_path" in training_args.explicit_arguments
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: other/model\nmodel_revision: v2\n")
    model_args, _, training_args = parse_arguments([str(config), "--output_dir", str(tmp_path)])
    assert (model_args.text_model_name_or_path, model_args.model_revision) == ("other/model", "v2")
    assert "text_model_name_or_path" in training_args.explicit_arguments
    config.write_text("model_name_or_path: a/model\ntext_model_name_or_path: b/model\n")
    with pytest.raises(ArgumentsError, match="model_name_or_path and text_model_name_or_path are the same argument"):
        parse_arguments([str(config), "--output_dir", str(tmp_path)])
    config.write_text("token: hf_secret\n")  # allowed: the card shows the file with the value redacted
    assert parse_arguments([str(config), "--output_dir", str(tmp_path)])[0].token == "hf_secret"
    config.write_text("label_all_tokens: true\n")
    with pytest.raises(ArgumentsError, match="run.yaml: --label_all_tokens is a run_ner.py argument"):
        parse_arguments([str(config), "--output_dir", str(tmp_path)])


def test_trust_remote_code_reaches_the_text_model_loads(workspace, monkeypatch):
    import train_pmner
    from training_pmner.arguments import parse_arguments

    calls = []

    class Stop(Exception):
        pass

    def record(name):
        def from_pretrained(path, **kwargs):
            calls.append((name, path, kwargs))
            if name == "tokenizer":
                raise Stop
            return object()
        return from_pretrained

    monkeypatch.setattr(train_pmner.AutoConfig, "from_pretrained", record("config"))
    monkeypatch.setattr(train_pmner.AutoTokenizer, "from_pretrained", record("tokenizer"))
    for flag, expected in ((["--trust_remote_code"], True), ([], False)):
        calls.clear()
        model_args, _, _ = parse_arguments([*flag, "--output_dir", str(workspace / "unused")])
        with pytest.raises(Stop):
            train_pmner.build_model_and_processor(model_args, set(), str(workspace / "tiny-bert"), False, False, ["PER"])
        assert [(name, kwargs) for name, _, kwargs in calls] == [
            ("config", {"trust_remote_code": expected}), ("tokenizer", {"trust_remote_code": expected})
        ]


def train(workspace, name, *extra):
    result = subprocess.run(
        [sys.executable, SCRIPT, "--model_name_or_path", str(workspace / "tiny-bert"), *common_args(*extra),
         "--output_dir", str(workspace / "runs" / name)],
        cwd=workspace, env=dict(os.environ, HF_HOME=str(workspace / "hf-home"), **ENV), capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return workspace / "runs" / name, result.stdout + result.stderr


def file_args(workspace):
    files = workspace / "files"
    return ["--train_file", str(files / "tweets-train.conll"), "--validation_file", str(files / "dev.conll"),
            "--test_file", str(files / "t.conll")]


def test_train_validation_and_test_files_with_images(workspace):
    output, _ = train(
        workspace, "files", *file_args(workspace), "--do_predict", "--image_dir", str(workspace / "images"),
        "--detector", "none", "--backbone", "resnet18", "--backbone_weights", "random:1", "--crop_size", "32",
    )
    results = json.loads((output / "all_results.json").read_text())
    assert results["train_samples"] == 16 and results["predict_samples"] == 6
    assert results["visual_train_images_given"] == 16 and results["visual_test_images_given"] == 6
    assert json.loads((output / "config.json").read_text())["use_visual"] is True
    predictions = (output / "test_predictions.conll").read_text()
    assert predictions.startswith("IMGID:test_0\n") and predictions.count("IMGID:") == 6


def test_tokenisation_workers_and_overwrite_cache(workspace):
    """A second run reads the encodings cached by the first; --overwrite_cache encodes again, here in the
    --preprocessing_num_workers processes (datasets' progress bars say how many)."""
    encoded = re.compile(r"Encoding (train|validation|test) \(token prompts\)( \(num_proc=\d+\))?")
    text_only = ("--data_dir", str(workspace / "data"), "--text_only")
    _, first = train(workspace, "cache-first", *text_only)
    assert {match.group(1) for match in encoded.finditer(first)} == {"train", "validation", "test"}
    _, second = train(workspace, "cache-second", *text_only)
    assert not encoded.search(second)
    _, third = train(workspace, "cache-overwritten", *text_only, "--overwrite_cache", "--preprocessing_num_workers", "2")
    assert {match.groups() for match in encoded.finditer(third)} == {
        (split, " (num_proc=2)") for split in ("train", "validation", "test")
    }


def write_masked_lm(folder, layers: int) -> str:
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(**{**TINY_BERT, "num_hidden_layers": layers})).save_pretrained(folder)
    write_tiny_tokenizer(folder)
    return str(folder)


def test_a_private_hub_model_at_a_revision_into_cache_dir(hub_server, workspace, tmp_path):
    """A private Hub repository with two revisions: --model_revision picks the first (one layer; main has three),
    --cache_dir holds its snapshot, --token is the only credential; the model records the Hub id."""
    api = hub_server.api()
    api.create_repo("user/tiny-mlm", private=True)
    first = api.upload_folder(folder_path=write_masked_lm(tmp_path / "one-layer", 1), repo_id="user/tiny-mlm").oid
    api.upload_folder(folder_path=write_masked_lm(tmp_path / "three-layers", 3), repo_id="user/tiny-mlm")
    cache = tmp_path / "model-cache"
    output = tmp_path / "hub-run"

    def train(*extra):
        return subprocess.run(
            [sys.executable, SCRIPT, "--data_dir", str(workspace / "data"), "--text_only", *common_args(*extra),
             "--output_dir", str(output)],
            cwd=tmp_path, env=hub_server.process_env(token=False), capture_output=True, text=True, timeout=600,
        )

    refused = train("--model_name_or_path", "user/tiny-mlm", "--model_revision", first)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "train_pmner.py: error: --text_model_name_or_path 'user/tiny-mlm' (revision"
    ), refused.stderr[-3000:]
    result = train("--model_name_or_path", "user/tiny-mlm", "--model_revision", first, "--cache_dir", str(cache),
                   "--token", hub_server.token)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    text_config = json.loads((output / "config.json").read_text())["text_config"]
    assert text_config["num_hidden_layers"] == 1 and text_config["_name_or_path"] == "user/tiny-mlm"
    assert (cache / "models--user--tiny-mlm" / "snapshots" / first / "model.safetensors").is_file()
    assert not os.path.exists(os.path.join(hub_server.home, "hub", "models--user--tiny-mlm"))
    requests = [request for request in hub_server.server.requests if "/resolve/" in request and "tiny-mlm" in request]
    assert requests and all(f"/resolve/{first}/" in request for request in requests), requests


def test_the_token_is_not_published_in_the_card(hub_server, workspace, tmp_path):
    """The command line in the model card hides --token as it hides --hub_token."""
    output = tmp_path / "card-run"
    result = subprocess.run(
        [sys.executable, SCRIPT, "--data_dir", str(workspace / "data"), "--text_only",
         *common_args("--model_name_or_path", str(workspace / "tiny-bert"), "--token", "hf_secret_value"),
         "--output_dir", str(output)],
        cwd=tmp_path, env=dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), **ENV), capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    card = (output / "README.md").read_text()
    assert "--token <redacted>" in card and "hf_secret_value" not in card


def launch_env(tmp_path) -> dict:
    return dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1", **ENV)


def test_accelerate_launch_cpu_with_two_processes_warns_and_names_the_working_command(workspace, tmp_path):
    """`accelerate launch --num_processes 2 --cpu` starts one process: train_pmner.py says so on one line, naming the
    command that starts two; that command, run on a tiny model, trains with 2 processes."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    arguments = ["--data_dir", str(workspace / "data"), "--text_only", "--model_name_or_path",
                 str(workspace / "tiny-bert"), *common_args()]
    one = subprocess.run(
        [accelerate, "launch", "--num_processes", "2", "--cpu", SCRIPT, *arguments, "--output_dir",
         str(tmp_path / "one")], cwd=tmp_path, env=launch_env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    warnings = [line for line in one.stderr.splitlines() if "started only this one" in line]
    assert len(warnings) == 1 and warnings[0].startswith("train_pmner.py: warning: `accelerate launch` was asked for 2")
    assert "`accelerate launch --multi_gpu --num_processes 2 train_pmner.py ... --use_cpu`" in warnings[0]
    assert "`torchrun --nproc_per_node 2 train_pmner.py ... --use_cpu`" in warnings[0]
    assert "1 process(es)" in one.stdout + one.stderr
    two = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", SCRIPT, *arguments, "--output_dir",
         str(tmp_path / "two")], cwd=tmp_path, env=launch_env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es) (distributed)" in two.stdout + two.stderr
    assert "started only this one" not in two.stderr
    assert (tmp_path / "two" / "model.safetensors").is_file()


def test_an_unreachable_hub_is_one_argument_error(monkeypatch):
    """A connection error of the Hub's HTTP client (not an OSError in huggingface_hub 2.x) names the model."""
    from types import SimpleNamespace

    import train_pmner
    from training_pmner.twitter_mner_hub import hub_transport_errors

    connect_error = next(error for error in hub_transport_errors() if error.__name__ == "TransportError")

    def unreachable(name, **kwargs):
        raise connect_error("[Errno 111] Connection refused")

    monkeypatch.setattr(train_pmner, "download_text_model", unreachable)
    model_args = SimpleNamespace(text_model_name_or_path="user/x", model_revision="main", cache_dir=None, token=None)
    training_args = SimpleNamespace(main_process_first=lambda desc: contextlib.nullcontext())
    with pytest.raises(train_pmner.ArgumentsError, match="'user/x' is neither a local folder nor a Hub model .*Connection refused"):
        train_pmner.download_hub_model(model_args, training_args)
