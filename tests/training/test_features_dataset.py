"""Features datasets (training_pmner/features_dataset.py): FRR features exported from a training run's cache, pushed to
a Hub (support/hub_server.py on 127.0.0.1) and trained from with `train_pmner.py --features_dataset` and no image
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
    from training_pmner.twitter_mner import load_twitter_mner
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


def test_training_from_float16_features_says_so(workspace, local_export, tmp_path, caplog):
    import logging
    import types

    from processing_pmner import PMNERImageProcessor
    from training_pmner.twitter_mner import load_twitter_mner
    from training_pmner.features_dataset import attach_features_dataset, build_features_dataset, save_features_dataset

    processor = PMNERImageProcessor.from_pretrained(str(workspace / "from-images"))
    data = load_twitter_mner("twitter2017", data_dir=str(workspace / "data"), cache_dir=str(tmp_path / "data-cache"))
    half, metadata = build_features_dataset(processor, data, workspace / "cache", features_dtype="float16",
                                            datasets_cache_dir=str(tmp_path / "export-cache"))
    save_features_dataset(half, metadata, tmp_path / "half")
    config = types.SimpleNamespace(visual_feature_dim=512, max_objects=2)
    said = []
    for source in (local_export, tmp_path / "half"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="training_pmner.features_dataset"):
            attached = attach_features_dataset(data, str(source), processor, config)
        said.append([record.getMessage() for record in caplog.records if "float16" in record.getMessage()])
    assert said[0] == []  # float32 features: nothing to say
    assert len(said[1]) == 1 and f"--features_dataset {str(tmp_path / 'half')!r} holds float16 features" in said[1][0]
    assert attached["test"].features["visual_features"] == datasets.Array2D(shape=(2, 512), dtype="float32")


def cache_only_export_error(result):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " export: error: " in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def test_cache_only_export_from_a_cache_folder_that_does_not_exist_is_refused(workspace, local_export, tmp_path):
    (existing,) = [name for name in os.listdir(workspace / "cache") if name.startswith("frr-")]
    # another --cache_dtype: the float16 folder of the same settings was never written
    error = cache_only_export_error(export(workspace, "--feature_cache_dir", str(workspace / "cache"), "--cache_dtype",
                                           "float16", "--output_dir", str(tmp_path / "half")))
    wanted = os.path.join(str(workspace / "cache"), f"{existing}-fp16")
    assert f"the FRR cache folder {wanted} (" in error and "--cache_dtype float16) does not exist" in error, error
    assert f"{workspace / 'cache'} holds {existing}." in error, error
    # another --feature_cache_dir: no FRR cache in it at all
    (tmp_path / "other-cache").mkdir()
    error = cache_only_export_error(export(workspace, "--feature_cache_dir", str(tmp_path / "other-cache"),
                                           "--output_dir", str(tmp_path / "other")))
    assert f"the FRR cache folder {os.path.join(str(tmp_path / 'other-cache'), existing)} (" in error, error
    assert f"{tmp_path / 'other-cache'} holds no FRR cache folder (frr-*)" in error, error
    assert not os.path.exists(tmp_path / "half") and not os.path.exists(tmp_path / "other")


def test_cache_only_export_of_ids_the_cache_lacks(workspace, tmp_path, caplog):
    import logging

    from processing_pmner import PMNERImageProcessor
    from training_pmner.twitter_mner import load_twitter_mner
    from training_pmner.features_dataset import FeaturesDatasetError, build_features_dataset

    processor = PMNERImageProcessor.from_pretrained(str(workspace / "from-images"))
    data = load_twitter_mner("twitter2017", data_dir=str(workspace / "data"), cache_dir=str(tmp_path / "data-cache"))

    def renamed(which):
        return datasets.DatasetDict({
            split: dataset.map(lambda row: {"image_id": "other_" + row["image_id"] if which(row) else row["image_id"]})
            for split, dataset in data.items()
        })

    # some ids not cached (train_3's image was missing in training): exported without features, counted and named
    # in a warning
    some = renamed(lambda row: row["image_id"] in ("test_1", "test_4"))
    with caplog.at_level(logging.WARNING, logger="training_pmner.features_dataset"):
        exported, metadata = build_features_dataset(processor, some, workspace / "cache", progress=False,
                                                    datasets_cache_dir=str(tmp_path / "export-cache"))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("3 image ids are not in the FRR cache "), warnings
    assert warnings[0].endswith("e.g. train_3, other_test_1, other_test_4"), warnings[0]
    rows = {row["image_id"]: row for row in exported["test"]}
    assert not rows["other_test_1"]["image_found"] and not any(rows["other_test_1"]["visual_mask"])
    assert rows["test_0"]["image_found"] and metadata["splits"]["test"]["images_found"] == 6

    # none of the ids cached: refused, naming the folder that was read
    folder = processor.feature_cache(workspace / "cache").folder
    with pytest.raises(FeaturesDatasetError) as error:
        build_features_dataset(processor, renamed(lambda row: True), workspace / "cache", progress=False,
                               datasets_cache_dir=str(tmp_path / "export-cache"))
    assert f"the FRR cache folder {folder} (" in str(error.value), error.value
    assert f"holds none of the data's 40 image ids ({len(processor.feature_cache(workspace / 'cache').load())} " \
        "images cached there)" in str(error.value), error.value


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


@pytest.mark.parametrize("flag, value, message", [
    ("--image_dir", "<tmp>", "--features_dataset and --image_dir both say where the visual input comes from"),
    ("--text_only", None, "--features_dataset and --text_only both say where the visual input comes from"),
    ("--feature_cache_dir", "<tmp>", "--feature_cache_dir caches the features extracted from --image_dir; --features_dataset"),
    # given, even at its default value: it would be ignored
    ("--feature_cache_dtype", "float32", "--feature_cache_dtype is the dtype of the cache of features extracted from "
     "--image_dir; --features_dataset brings its features in its own dtype: drop --feature_cache_dtype"),
])
def test_a_features_dataset_is_the_run_s_only_visual_input(tmp_path, flag, value, message):
    from training_pmner.argument_checks import check_arguments
    from training_pmner.arguments import ArgumentsError, parse_arguments

    value = [] if value is None else [str(tmp_path) if value == "<tmp>" else value]
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


def minimal_metadata():
    return {"format": "pmner-frr-features", "feature_settings": {}, "weights_sha256": {}, "feature_dim": 4,
            "max_objects": 2}


def small_features(rows, max_objects=2, feature_dim=4, num_detections=1):
    features = datasets.Features({
        "image_id": datasets.Value("string"),
        "image_found": datasets.Value("bool"),
        "visual_features": datasets.Array2D(shape=(max_objects, feature_dim), dtype="float32"),
        "visual_mask": datasets.List(datasets.Value("bool"), length=max_objects),
        "num_detections": datasets.Value("int32"),
    })
    return datasets.Dataset.from_dict({
        "image_id": [f"img_{row}" for row in range(rows)],
        "image_found": [True] * rows,
        "visual_features": np.ones((rows, max_objects, feature_dim), dtype=np.float32),
        "visual_mask": [[True] + [False] * (max_objects - 1)] * rows,
        "num_detections": [num_detections] * rows,
    }, features=features)


def break_arrow_file(folder):
    (arrow,) = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                if name.endswith(".arrow")]
    with open(arrow, "r+b") as handle:
        handle.truncate(64)


def write_bad_parquet(folder):
    os.makedirs(folder / "data")
    (folder / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 this is no parquet file")


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_a_features_dataset_whose_data_cannot_be_read_is_refused_in_one_line(tmp_path, layout):
    from training_pmner.features_dataset import FeaturesDatasetError, load_features_dataset

    folder = tmp_path / "features"
    if layout == "save_to_disk":
        datasets.DatasetDict(train=small_features(3)).save_to_disk(str(folder))
        break_arrow_file(folder)
    else:
        write_bad_parquet(folder)
    (folder / "pmner_features.json").write_text(json.dumps(minimal_metadata()))
    with pytest.raises(FeaturesDatasetError) as error:
        load_features_dataset(str(folder), cache_dir=str(tmp_path / "hf-cache"))
    message = str(error.value)
    assert message.startswith(f"--features_dataset {str(folder)!r} has pmner_features.json but its data cannot be "
                              "read: "), message
    assert "\n" not in message


def test_detection_counts_are_read_without_the_features(tmp_path):
    import tracemalloc

    import processing_pmner.image_dataset_features  # noqa: F401  (imported before measuring: its imports are no data)
    from training_pmner.features_dataset import features_dataset_columns

    rows, width = 300, 4096
    features = small_features(rows, feature_dim=width)  # 300 x 2 x 4096 float32: 9.8 MB of features
    raw = datasets.DatasetDict(train=datasets.Dataset.from_dict({"image_id": ["img_7"], "tokens": [["a"]]}))
    metadata = {**minimal_metadata(), "feature_dim": width}
    tracemalloc.start()
    try:
        result = features_dataset_columns(raw, datasets.DatasetDict(train=features), metadata, "features")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result["train"]["visual_num_detections"][:] == [1]  # the counts were read (and are all known)
    assert peak < rows * 2 * width * 4 / 4, f"{peak / 1e6:.1f} MB held to add one tweet's features"


def test_feature_columns_replace_the_columns_they_add():
    from processing_pmner.image_dataset_features import feature_columns

    dataset = datasets.Dataset.from_dict({"tokens": [["a"]], "visual_mask": [[True]], "image_found": [False],
                                          "visual_num_detections": [3]})
    base, features = feature_columns(dataset, 2, 8, with_counts=False, extra={"image_found": datasets.Value("bool")})
    assert base.column_names == ["tokens"]
    assert features == datasets.Features({
        "tokens": dataset.features["tokens"],
        "visual_features": datasets.Array2D(shape=(2, 8), dtype="float32"),
        "visual_mask": datasets.List(datasets.Value("bool"), length=2),
        "image_found": datasets.Value("bool"),
    })
    base, features = feature_columns(dataset, 2, 8, with_counts=True)
    assert base.column_names == ["tokens", "image_found"]
    assert list(features) == ["tokens", "image_found", "visual_features", "visual_mask", "visual_num_detections"]
    assert features["visual_num_detections"] == datasets.Value("int32")
