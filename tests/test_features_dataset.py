"""Features datasets (training_pmner/features_dataset.py): FRR features exported from a training run's cache, pushed to
a Hub (tests/hub_server.py on 127.0.0.1) and trained from with `train_pmner.py --features_dataset` and no image
folder, giving the scores of the run from the images; datasets that do not fit the run are refused in one line."""

import json
import os
import re
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest

from fixtures import PROJECT, write_tiny_masked_lm, write_twitter_fixture


OFFLINE = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
# a tiny FRR: no detector (the whole image is the one object), a random ResNet-18 on 32-pixel crops, 2 object slots
FRR = ("--detector", "none", "--backbone", "resnet18", "--backbone_weights", "random:3", "--crop_size", "32",
       "--max_objects", "2")
SCORES = ("eval_f1", "eval_loss", "predict_f1", "predict_loss", "train_loss")


def command(workspace, output_dir, *extra):
    return [
        sys.executable, os.path.join(PROJECT, "train_pmner.py"),
        "--dataset_name", "twitter2017", "--data_dir", str(workspace / "data"),
        "--text_model_name_or_path", str(workspace / "tiny-bert"),
        "--do_train", "--do_eval", "--do_predict", "--num_train_epochs", "2", "--learning_rate", "3e-3",
        "--per_device_train_batch_size", "8", "--fusion_num_heads", "4", "--use_cpu", "--seed", "7",
        "--report_to", "none", "--output_dir", str(output_dir), *FRR, *extra,
    ]


def run(argv, cwd, env=None, home=None):
    environment = dict(os.environ, HF_HOME=str(home or os.path.join(cwd, "hf-home")), **OFFLINE)
    environment.update(env or {})
    return subprocess.run(argv, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


def succeeded(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def export(workspace, *extra, env=None):
    argv = [sys.executable, "-m", "training_pmner.features_dataset", "export", "--processor",
            str(workspace / "from-images"), "--data_dir", str(workspace / "data"), *extra]
    return run(argv, PROJECT, env=env, home=workspace / "hf-home")


def results(folder) -> dict:
    with open(os.path.join(folder, "all_results.json")) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    write_tiny_masked_lm(root / "tiny-bert")
    write_twitter_fixture(root / "data", root / "images", sizes=(24, 8, 8), missing_images={"train_3"})
    # the run from the images, its FRR features cached where the export reads them
    succeeded(run(command(root, root / "from-images", "--image_dir", str(root / "images"), "--feature_cache_dir",
                          str(root / "cache")), root))
    return root


@pytest.fixture(scope="module")
def local_export(workspace):
    """The features exported to a folder from the training run's cache alone (no image folder)."""
    succeeded(export(workspace, "--feature_cache_dir", str(workspace / "cache"), "--output_dir",
                     str(workspace / "features")))
    return workspace / "features"


def test_features_from_the_hub_train_to_the_scores_of_the_images(workspace, local_export, hub_server, tmp_path):
    # exported through a fresh cache from the images, pushed as Parquet with its card and settings
    pushed = succeeded(export(workspace, "--image_dir", str(workspace / "images"), "--feature_cache_dir",
                              str(tmp_path / "fresh-cache"), "--push_to_hub", "user/t17-frr", env=hub_server.env()))
    assert "pushed the features dataset" in pushed.stdout
    api = hub_server.api()
    files = set(api.list_repo_files("user/t17-frr", repo_type="dataset"))
    assert {"README.md", "pmner_features.json"} <= files and any(path.endswith(".parquet") for path in files)
    with open(api.hf_hub_download("user/t17-frr", "pmner_features.json", repo_type="dataset")) as handle:
        metadata = json.load(handle)
    with open(local_export / "pmner_features.json") as handle:
        local_metadata = json.load(handle)
    sha256 = metadata["weights_sha256"]["backbone"]
    assert re.fullmatch(r"[0-9a-f]{64}", sha256) and metadata["feature_dim"] == 512 and metadata["max_objects"] == 2
    assert metadata["feature_settings"]["crop_size"] == 32 and metadata["feature_settings"]["detector"] is None
    assert metadata["splits"]["train"] == {"images": 24, "images_found": 23, "images_with_features": 23}
    # the export from the images (fresh cache) and the one from the training run's cache record the same FRR
    assert metadata == local_metadata
    with open(api.hf_hub_download("user/t17-frr", "README.md", repo_type="dataset")) as handle:
        card = handle.read()
    for part in ("pmner_features:", f"{sha256}", "feature_dim: 512", "configs:", "dataset_info:", "Feature width: **512**",
                 "| `crop_size` | `32` |", "boxes, labels and scores are not kept"):
        assert part in card, part

    # trained from the Hub dataset, with no image folder: the scores of the run from the images, exactly
    from_hub = tmp_path / "from-hub"
    succeeded(run(command(workspace, from_hub, "--features_dataset", "user/t17-frr"), tmp_path, env=hub_server.env()))
    expected, got = results(workspace / "from-images"), results(from_hub)
    assert {key: got[key] for key in SCORES} == {key: expected[key] for key in SCORES}
    visual = sorted(key for key in expected if key.startswith("visual_"))
    assert visual and {key: got.get(key) for key in visual} == {key: expected[key] for key in visual}
    assert got["visual_train_images_missing"] == 1  # train_3 has no image: read as text-only both ways


def test_local_export_holds_the_cached_features(workspace, local_export):
    from processing_pmner import PMNERImageProcessor

    exported = datasets.load_from_disk(str(local_export))
    assert set(exported) == {"train", "validation", "test"}
    train = exported["train"]
    assert train.features["visual_features"] == datasets.Array2D(shape=(2, 512), dtype="float32")
    assert train.column_names == ["image_id", "image_found", "visual_features", "visual_mask", "num_detections"]
    rows = {row["image_id"]: row for row in train}
    assert not rows["train_3"]["image_found"] and not any(rows["train_3"]["visual_mask"])
    processor = PMNERImageProcessor.from_pretrained(str(workspace / "from-images"))
    cache = processor.feature_cache(workspace / "cache").load()
    features, masks = cache.get("train_0")
    np.testing.assert_array_equal(np.asarray(rows["train_0"]["visual_features"], dtype=np.float32), features.numpy())
    assert rows["train_0"]["visual_mask"] == masks.tolist() == [True, False]


def test_float16_export_rounds_the_cached_features(workspace, local_export, tmp_path):
    from processing_pmner import PMNERImageProcessor
    from processing_pmner.twitter_mner import load_twitter_mner
    from training_pmner.features_dataset import build_features_dataset

    processor = PMNERImageProcessor.from_pretrained(str(workspace / "from-images"))
    data = load_twitter_mner("twitter2017", data_dir=str(workspace / "data"), cache_dir=str(tmp_path / "data-cache"))
    half, metadata = build_features_dataset(processor, data, workspace / "cache", features_dtype="float16",
                                            datasets_cache_dir=str(tmp_path / "export-cache"))
    assert metadata["features_dtype"] == "float16"
    assert half["test"].features["visual_features"] == datasets.Array2D(shape=(2, 512), dtype="float16")
    full = datasets.load_from_disk(str(local_export))["test"].with_format("numpy")[:]["visual_features"]  # (8, 2, 512)
    rounded = half["test"].with_format("numpy")[:]["visual_features"]
    assert "halffloat" in str(half["test"].data.table.schema.field("visual_features").type.storage_type)
    assert full[:, 0].any() and not np.array_equal(full.astype(np.float16).astype(np.float32), full)
    np.testing.assert_array_equal(rounded, full.astype(np.float16))  # stored as float16, read back as float32


def edited_copy(source, target, edit):
    """A copy of the features dataset at `source` with `edit(split dataset)` applied to each split."""
    exported = datasets.load_from_disk(str(source))
    datasets.DatasetDict({split: edit(dataset) for split, dataset in exported.items()}).save_to_disk(str(target))
    shutil.copy(source / "pmner_features.json", target / "pmner_features.json")
    return target


def narrow(dataset):
    return dataset.map(
        lambda row: {"visual_features": np.asarray(row["visual_features"])[:, :8]},
        features=datasets.Features({**dataset.features, "visual_features": datasets.Array2D(shape=(2, 8), dtype="float32")}),
    )


REFUSALS = {
    "missing_field": (lambda dataset: dataset.remove_columns("visual_mask"), (),
                      ["split 'train' has no field 'visual_mask'"]),
    "other_width": (narrow, (), ["field visual_features has feature width 8", "the model's visual_feature_dim is 512"]),
    "missing_ids": (lambda dataset: dataset.filter(lambda row: row["image_id"] not in ("test_5", "valid_2")), (),
                    ["has no features for 2 image ids of the data, e.g. test_5, valid_2"]),
    "other_settings": (lambda dataset: dataset, ("--backbone_weights", "random:4", "--crop_size", "48"),
                       ["crop_size 32 in the dataset, 48 in this run", "backbone weights sha256 {sha256} in the dataset, "]),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_features_dataset_that_does_not_fit_the_run_is_refused_in_one_line(workspace, local_export, tmp_path, case):
    edit, flags, parts = REFUSALS[case]
    folder = edited_copy(local_export, tmp_path / "features", edit)
    result = run(command(workspace, tmp_path / "out", "--features_dataset", str(folder), *flags), tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("train_pmner.py: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    with open(local_export / "pmner_features.json") as handle:
        sha256 = json.load(handle)["weights_sha256"]["backbone"]
    for part in parts:
        assert part.format(sha256=sha256) in errors[0], errors[0]
    if case == "other_settings":  # both weights named: the dataset's and this run's (another 64-hex sha256)
        assert re.search(rf"{sha256} in the dataset, (?!{sha256})[0-9a-f]{{64}} in this run", errors[0]), errors[0]
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


@pytest.mark.parametrize("flag, message", [
    ("--image_dir", "--features_dataset and --image_dir both say where the visual input comes from"),
    ("--text_only", "--features_dataset and --text_only both say where the visual input comes from"),
    ("--feature_cache_dir", "--feature_cache_dir caches the features extracted from --image_dir; --features_dataset"),
])
def test_a_features_dataset_is_the_run_s_only_visual_input(tmp_path, flag, message):
    from training_pmner.arguments import ArgumentsError, check_arguments, parse_arguments

    value = [] if flag == "--text_only" else [str(tmp_path)]
    model_args, data_args, training_args = parse_arguments(
        ["--features_dataset", "user/features", "--do_train", "--output_dir", str(tmp_path / "out"), flag, *value]
    )
    with pytest.raises(ArgumentsError, match=re.escape(message)):
        check_arguments(model_args, data_args, training_args, resumes_trained_folder=False)
    model_args, data_args, training_args = parse_arguments(
        ["--features_dataset", "user/features", "--do_train", "--output_dir", str(tmp_path / "out")]
    )
    check_arguments(model_args, data_args, training_args, resumes_trained_folder=False)  # alone, it is accepted


def test_console_script_is_the_export_command(capsys):
    import importlib
    import tomllib

    with open(os.path.join(PROJECT, "pyproject.toml"), "rb") as handle:
        target = tomllib.load(handle)["project"]["scripts"]["pmner-export-features"]
    module, function = target.split(":")
    with pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(module), function)(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--feature_cache_dir" in out and "--push_to_hub" in out and "--features_dtype" in out
