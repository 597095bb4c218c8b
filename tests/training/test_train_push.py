"""`train_pmner.py --push_to_hub` end to end against a real HTTP Hub (support/hub_server.py on 127.0.0.1): what the
repository holds, a fresh process loading it back to the same predictions, and the refusals that keep a user's
files and the Hub clean."""

import json
import os
import secrets
import subprocess
import sys

import pytest
from PIL import Image

from fixtures import (
    PROJECT, write_tiny_masked_lm, write_training_workspace, write_twitter_fixture, write_unrebuildable_weights,
)
from hub_checks import closed_port_url, compare_hub_and_local, tree_digest


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_training_workspace(tmp_path_factory.mktemp("push"), sizes=(32, 8, 8), with_images=True)


def push_command(workspace, output_dir, *extra):
    return [
        sys.executable, os.path.join(PROJECT, "train_pmner.py"),
        "--dataset_name", "twitter2017", "--data_dir", str(workspace / "data"),
        "--image_dir", str(workspace / "images"), "--detector", "none", "--backbone", "resnet18",
        "--backbone_weights", "random:5", "--crop_size", "32", "--max_objects", "3",
        "--text_model_name_or_path", str(workspace / "tiny-bert"), "--fusion_num_heads", "4",
        "--do_train", "--do_eval", "--do_predict", "--num_train_epochs", "2", "--learning_rate", "3e-3",
        "--use_cpu", "--seed", "7", "--output_dir", str(output_dir), "--report_to", "none",
        "--push_to_hub", "--hub_model_id", "user/tiny", *extra,
    ]


def run(command, env, cwd):
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_trained_model_is_pushed_whole_and_loads_back_the_same(hub_server, workspace, tmp_path):
    env = hub_server.process_env()
    # random FRR weights are not published unless asked for; refused before the repository is created
    refused = run(push_command(workspace, tmp_path / "refused"), env, tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "random FRR weights (backbone_weights)" in refused.stderr and "--hub_allow_random_frr_weights" in refused.stderr
    assert ("model", "user/tiny") not in hub_server.server.store.repos

    output_dir = tmp_path / "run"
    result = run(push_command(workspace, output_dir, "--hub_allow_random_frr_weights", "--hub_private_repo", "true",
                              "--hub_strategy", "every_save"), env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    api = hub_server.api()
    files = set(api.list_repo_files("user/tiny"))
    for name in ("model.safetensors", "config.json", "modeling_pmner.py", "processor_config.json",
                 "processing_pmner.py", "image_processing_pmner.py", "frr_backbone.safetensors", "README.md",
                 "all_results.json", "predict_results.json", "predict_report.txt", "tokenizer.json"):
        assert name in files, (name, sorted(files))
    assert "test_predictions.conll" not in files and "training_args.bin" not in files
    assert not any(name.startswith(("checkpoint-", "frr_cache", "last-checkpoint")) for name in files), files
    assert api.model_info("user/tiny").private is True
    commits = [commit.message for commit in hub_server.server.store.repos[("model", "user/tiny")].commits.values()]
    assert any("Training in progress" in title for title in commits), commits  # every_save pushed during training
    card = open(api.hf_hub_download("user/tiny", "README.md")).read()
    assert "pipeline(model=\"user/tiny\", trust_remote_code=True)" in card and "image=" in card
    assert "frr_backbone" in card or "sha256" in card
    assert "random:5" in card and "train_pmner.py" in card and "Twitter's (X's) terms" in card

    image = tmp_path / "photo.jpg"
    Image.new("RGB", (80, 60), (20, 160, 90)).save(image)
    texts = ["trump visits london today", "rt @user : google meets kawhi leonard"]
    outcome = compare_hub_and_local(hub_server, "user/tiny", output_dir, tmp_path, texts, image=str(image))
    assert outcome["hub"]["encoding"]["visual_mask"][0][0], "the image was not used"


def test_a_push_publishes_no_local_path_and_frr_weights_that_load_without_their_source(hub_server, tmp_path):
    # every input under a folder whose name appears nowhere else: the published files must not contain it
    private = tmp_path / f"private-{secrets.token_hex(8)}"
    write_tiny_masked_lm(private / "tiny-bert")
    write_twitter_fixture(private / "data", private / "images", sizes=(16, 4, 4))
    weights = write_unrebuildable_weights(private / "my-resnet18.safetensors", seed=11)
    (private / "run.yaml").write_text(f"image_dir: {private / 'images'}\nlearning_rate: 0.003\n")
    output_dir = private / "out"
    command = [
        sys.executable, os.path.join(PROJECT, "train_pmner.py"), str(private / "run.yaml"),
        "--dataset_name", "twitter2017", "--data_dir", str(private / "data"),
        "--detector", "none", "--backbone", "resnet18", "--backbone_weights", weights, "--crop_size", "32",
        "--max_objects", "2", "--text_model_name_or_path", str(private / "tiny-bert"), "--fusion_num_heads", "4",
        "--do_train", "--do_eval", "--num_train_epochs", "2", "--use_cpu", "--seed", "3",
        f"--output_dir={output_dir}", "--report_to", "none", "--push_to_hub", "--hub_model_id", "user/paths",
    ]
    result = run(command, hub_server.process_env(), tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    os.remove(weights)  # only the published frr_backbone.safetensors can give the features now
    api = hub_server.api()
    published = {name: open(api.hf_hub_download("user/paths", name, cache_dir=str(tmp_path / "dl")), "rb").read()
                 for name in api.list_repo_files("user/paths")}
    leaking = sorted(name for name, data in published.items() if private.name.encode() in data)
    assert not leaking, leaking
    card = published["README.md"].decode()
    assert "--backbone_weights my-resnet18.safetensors" in card and "--output_dir=." in card and "run.yaml" in card
    assert "image_dir: images" in card and "paths: inside the output folder relative to it" in card
    results = json.loads(published["all_results.json"])
    assert results["best_model_checkpoint"].startswith("checkpoint-")
    assert json.loads(published["config.json"])["text_config"]["_name_or_path"] == "tiny-bert"

    image = tmp_path / "photo.jpg"
    Image.new("RGB", (80, 60), (20, 160, 90)).save(image)
    outcome = compare_hub_and_local(hub_server, "user/paths", output_dir, tmp_path, ["trump visits london"], image=str(image))
    assert outcome["hub"]["encoding"]["visual_mask"][0][0], "the image was not used"


def test_push_without_credentials_or_hub_fails_clearly_before_training(hub_server, workspace, tmp_path):
    output_dir = tmp_path / "no-token"
    result = run(push_command(workspace, output_dir, "--hub_allow_random_frr_weights"),
                 hub_server.process_env(token=False), tmp_path)
    assert result.returncode != 0 and "needs a Hugging Face token with write access" in result.stderr, result.stderr[-3000:]
    assert not (output_dir / "model.safetensors").exists()

    # an existing output folder (a finished run) is left exactly as it was
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "all_results.json").write_text(json.dumps({"predict_f1": 0.5}))
    before = tree_digest(kept)
    with closed_port_url() as url:
        env = dict(hub_server.process_env(), HF_ENDPOINT=url)
        result = run(push_command(workspace, kept, "--hub_allow_random_frr_weights"), env, tmp_path)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "could not reach the Hub" in result.stderr and url in result.stderr, result.stderr[-3000:]
    assert tree_digest(kept) == before


PUSH_DATASET = """
from training_pmner.twitter_mner import load_twitter_mner
from training_pmner.twitter_mner_hub import push_twitter_mner_to_hub
data = load_twitter_mner("twitter2017", data_dir={data!r}, cache_dir={cache!r})
push_twitter_mner_to_hub(data, "user/twitter-mner", "twitter2017")
"""


def test_training_from_a_hub_dataset_names_it_and_the_base_model_in_the_card(hub_server, workspace, tmp_path):
    env = hub_server.process_env()
    script = PUSH_DATASET.format(data=str(workspace / "data"), cache=str(tmp_path / "cache"))
    pushed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    # a local copy of a Hub model: its config names the Hub id it came from
    text_model = tmp_path / "bert-copy"
    write_tiny_masked_lm(text_model)
    config = json.loads((text_model / "config.json").read_text())
    (text_model / "config.json").write_text(json.dumps(dict(config, _name_or_path="prajjwal1/bert-tiny")))
    output_dir = tmp_path / "from-hub-data"
    command = [
        sys.executable, os.path.join(PROJECT, "train_pmner.py"),
        "--dataset_name", "user/twitter-mner", "--dataset_config_name", "twitter2017", "--text_only",
        "--text_model_name_or_path", str(text_model), "--fusion_num_heads", "4", "--do_train", "--do_eval",
        "--do_predict", "--num_train_epochs", "1", "--use_cpu", "--output_dir", str(output_dir), "--report_to", "none",
    ]
    result = run(command, env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    card = (output_dir / "README.md").read_text()
    header = card.split("---")[1]
    assert "datasets:\n- user/twitter-mner" in header and "base_model: prajjwal1/bert-tiny" in header, header
    assert json.loads((output_dir / "predict_results.json").read_text())["predict_samples"] == 8
