"""Tests of the Twitter MNER builder on small fixtures written to tmp dirs (offline), plus one check of
the real files when /work/shared/data is there."""

import logging
import os
from pathlib import Path

import datasets
import pytest
from PIL import Image

from training_pmner.twitter_mner import (
    LABELS,
    LABELS_WITH_OTHER,
    TwitterMNER,
    TwitterMNERDownloadError,
    TwitterMNERFormatError,
    count_missing_images,
    load_twitter_mner,
    read_twitter_conll,
)
from training_pmner.twitter_mner_hub import export_to_parquet, push_twitter_mner_to_hub


REAL_DATA = Path("/work/shared/data")

# Twitter-2015 style: OTHER type, an entity starting with I- (test), a whitespace-only token (valid).
TWITTER2015 = {
    "train.txt": (
        "IMGID:1001\nRT\tO\n@Obama\tB-PER\nin\tO\nParis\tB-LOC\n\n"
        "IMGID:1002\nSuper\tB-OTHER\nBowl\tI-OTHER\ntonight\tO\n\n"
        "IMGID:1003\nApple\tB-ORG\nstore\tO\n"
    ),
    "valid.txt": "IMGID:2001\nhello\tO\n\xa0\tO\nLondon\tB-LOC\n\nIMGID:2002\nNBA\tB-ORG\n",
    "test.txt": "IMGID:3001\nthe\tO\nYork\tI-LOC\nKnicks\tB-ORG\n\nIMGID:3002\nGrammys\tI-OTHER\n\n",
}
TWITTER2017 = {
    "train.txt": (
        "IMGID:17_06_1\nDonald\tB-PER\nTrump\tI-PER\nat\tO\nCNN\tB-ORG\n\n"
        "IMGID:O_2\nCannes\tB-MISC\nFestival\tI-MISC\n\n"
        "IMGID:16_05_3\nmy\tO\ncat\tO\n\n"
    ),
    "valid.txt": "IMGID:17_06_4\nNew\tB-LOC\nYork\tI-LOC\n\n",
    "test.txt": "IMGID:O_5\nNHL\tB-ORG\ndraft\tO\n\nIMGID:O_6\nEU\tB-LOC\n\n",
}
IMAGES_2017 = ["17_06_1", "16_05_3", "17_06_4", "O_5"]  # O_2 and O_6 are missing


def write_files(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return folder


def write_images(folder: Path, image_ids, size=(8, 6)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image_id in enumerate(image_ids):
        Image.new("RGB", size, color=(10 * index, 100, 200)).save(folder / f"{image_id}.jpg")
    return folder


def build(tmp_path, name, data_dir, **kwargs):
    builder = TwitterMNER(config_name=name, data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"), **kwargs)
    builder.download_and_prepare()
    return builder, builder.as_dataset()


def tag_names(dataset, row):
    return dataset.features["ner_tags"].feature.int2str(row["ner_tags"])


def test_twitter2017_features_images_and_stats(tmp_path, caplog):
    data_dir = write_files(tmp_path / "twitter2017", TWITTER2017)
    image_dir = write_images(tmp_path / "images", IMAGES_2017)
    datasets.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            builder, dataset = build(tmp_path, "twitter2017", data_dir, image_dir=str(image_dir))
    finally:
        datasets.utils.logging.disable_propagation()

    assert {split: len(ds) for split, ds in dataset.items()} == {"train": 3, "validation": 1, "test": 2}
    features = dataset["train"].features
    assert features["ner_tags"].feature.names == LABELS
    assert isinstance(features["image"], datasets.Image)
    assert features["tokens"] == datasets.List(datasets.Value("string"))
    first = dataset["train"][0]
    assert first["id"] == "twitter2017-train-0" and first["image_id"] == "17_06_1"
    assert first["tokens"] == ["Donald", "Trump", "at", "CNN"]
    assert tag_names(dataset["train"], first) == ["B-PER", "I-PER", "O", "B-ORG"]
    assert first["image"].size == (8, 6)  # decoded lazily from the path
    assert dataset["train"][1]["image"] is None  # O_2.jpg is missing
    paths = dataset["train"].cast_column("image", datasets.Image(decode=False))["image"]
    assert paths[0]["path"] == str(image_dir / "17_06_1.jpg") and paths[0]["bytes"] is None

    stats = builder.split_stats
    assert (stats["train"].num_tweets, stats["train"].num_tokens) == (3, 8)
    assert (stats["train"].num_images, stats["train"].num_missing_images) == (2, 1)
    assert stats["train"].missing_image_examples == [f"O_2: {image_dir / 'O_2.jpg'}"]
    assert (stats["test"].num_images, stats["test"].num_missing_images) == (1, 1)
    assert count_missing_images(dataset) == {"train": 1, "validation": 0, "test": 1}
    messages = [record.getMessage() for record in caplog.records]
    assert any("1 of 3 images missing" in message and "O_2" in message for message in messages)


def test_twitter2015_other_as_misc_and_i_without_b_kept(tmp_path):
    data_dir = write_files(tmp_path / "twitter2015", TWITTER2015)
    _, misc = build(tmp_path, "twitter2015", data_dir)
    assert misc["train"].features["ner_tags"].feature.names == LABELS
    assert tag_names(misc["train"], misc["train"][1]) == ["B-MISC", "I-MISC", "O"]
    # I- without B- kept as written (not repaired to B-).
    assert tag_names(misc["test"], misc["test"][0]) == ["O", "I-LOC", "B-ORG"]
    assert tag_names(misc["test"], misc["test"][1]) == ["I-MISC"]
    assert count_missing_images(misc) == {"train": 3, "validation": 2, "test": 2}  # no image_dir

    _, other = build(tmp_path, "twitter2015", data_dir, other_as_misc=False)
    assert other["train"].features["ner_tags"].feature.names == LABELS_WITH_OTHER
    assert tag_names(other["train"], other["train"][1]) == ["B-OTHER", "I-OTHER", "O"]
    assert tag_names(other["test"], other["test"][1]) == ["I-OTHER"]
    # The same class ids either way: only the names differ.
    assert other["train"]["ner_tags"] == misc["train"]["ner_tags"]


def test_blank_token_replaced_with_warning_or_rejected(tmp_path):
    data_dir = write_files(tmp_path / "twitter2015", TWITTER2015)
    builder, dataset = build(tmp_path, "twitter2015", data_dir)
    assert dataset["validation"][0]["tokens"] == ["hello", "_", "London"]
    stats = builder.split_stats["validation"]
    assert stats.num_repaired_tokens == 1 and "line 3" in stats.repaired_token_examples[0]

    with pytest.raises(TwitterMNERFormatError, match=r"valid\.txt, line 3: empty or whitespace-only token"):
        build(tmp_path, "twitter2015", data_dir, blank_token_policy="error")


def test_ids_are_deterministic_and_data_dir_parent_accepted(tmp_path):
    write_files(tmp_path / "data" / "twitter2017", TWITTER2017)
    a = TwitterMNER(config_name="twitter2017", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "c1"))
    a.download_and_prepare()
    b = TwitterMNER(config_name="twitter2017", data_dir=str(tmp_path / "data" / "twitter2017"), cache_dir=str(tmp_path / "c2"))
    b.download_and_prepare()
    first, second = a.as_dataset(), b.as_dataset()
    for split in ("train", "validation", "test"):
        assert first[split]["id"] == second[split]["id"]
        assert first[split].to_list() == second[split].to_list()
    assert first["test"]["id"] == ["twitter2017-test-0", "twitter2017-test-1"]
    assert first["train"]["image_id"] == ["17_06_1", "O_2", "16_05_3"]


def test_load_helper_and_crlf(tmp_path):
    crlf = {name: text.replace("\n", "\r\n") for name, text in TWITTER2017.items()}
    data_dir = write_files(tmp_path / "twitter2017", crlf)
    dataset = load_twitter_mner("twitter2017", data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"))
    assert isinstance(dataset, datasets.DatasetDict) and list(dataset) == ["train", "validation", "test"]
    assert dataset["train"][0]["tokens"] == ["Donald", "Trump", "at", "CNN"]


def test_verify_images_treats_unreadable_as_missing(tmp_path):
    data_dir = write_files(tmp_path / "twitter2017", TWITTER2017)
    image_dir = write_images(tmp_path / "images", IMAGES_2017)
    (image_dir / "17_06_1.jpg").write_bytes(b"not a jpeg")
    builder, dataset = build(tmp_path, "twitter2017", data_dir, image_dir=str(image_dir), verify_images=True)
    assert dataset["train"][0]["image"] is None
    assert builder.split_stats["train"].num_missing_images == 2


BAD_FILES = [
    ("IMGID:1\nhello O\n", 2, "found no tab"),
    ("IMGID:1\nhello\tB-FOO\n", 2, "unknown tag 'B-FOO'"),
    ("IMGID:1\nhello\tB-OTHER\n", 2, "unknown tag 'B-OTHER'"),  # OTHER is Twitter-2015's type
    ("hello\tO\nIMGID:1\nx\tO\n", 1, "token line before any IMGID: line"),
    ("IMGID:1\nx\tO\n\ny\tO\n", 4, "after a blank line, without an IMGID: line"),
    ("IMGID:1\n\nIMGID:2\nx\tO\n", 1, "IMGID:1 has no token lines"),
    ("IMGID:1\nx\tO\n\nIMGID:2\n\n", 4, "IMGID:2 has no token lines"),
    ("IMGID:\nx\tO\n", 1, "needs an image id"),
    ("IMGID:../etc\nx\tO\n", 1, "needs an image id"),
    ("IMGID:1\nto\tken\tO\n", 2, "exactly one tab"),
    ("IMGID:1\nx\rx\tO\n", 2, "carriage return inside a line"),
    ("\n\n", 0, "no tweets found"),
    (b"IMGID:1\nok\tO\nbad\xff\tO\n", 3, "cannot decode bytes"),
]


@pytest.mark.parametrize("content, line, reason", BAD_FILES)
def test_malformed_file_names_file_and_line(tmp_path, content, line, reason):
    files = dict(TWITTER2017, **{"valid.txt": content})
    data_dir = write_files(tmp_path / "twitter2017", files)
    with pytest.raises(TwitterMNERFormatError) as info:
        build(tmp_path, "twitter2017", data_dir)
    message = str(info.value)
    assert f"{data_dir / 'valid.txt'}, line {line}: " in message
    assert reason in message
    assert info.value.line_number == line


def test_reader_accounts_for_every_tweet(tmp_path):
    path = write_files(tmp_path, {"f.txt": "\n\nIMGID:1\na\tO\nIMGID:2\nb\tB-PER\n\n\n\nIMGID:3\nc\tO\n"}) / "f.txt"
    tweets = read_twitter_conll(str(path), ["O", "B-PER", "I-PER"])
    assert [(t.image_id, t.tokens, t.tags, t.line_number) for t in tweets] == [
        ("1", ["a"], ["O"], 3),
        ("2", ["b"], ["B-PER"], 5),
        ("3", ["c"], ["O"], 10),
    ]


def test_missing_data_dir_files(tmp_path):
    data_dir = write_files(tmp_path / "twitter2017", {"train.txt": TWITTER2017["train.txt"]})
    with pytest.raises(FileNotFoundError, match="missing there: valid.txt, test.txt"):
        build(tmp_path, "twitter2017", data_dir)


def test_download_failure_asks_for_data_dir(tmp_path):
    # An unreachable source (nothing listens on port 9) fails like being offline.
    builder = TwitterMNER(
        config_name="twitter2015", cache_dir=str(tmp_path / "cache"), base_url="http://127.0.0.1:9/data"
    )
    with pytest.raises(TwitterMNERDownloadError, match=r"pass data_dir=") as info:
        builder.download_and_prepare()
    assert "twitter2015" in str(info.value) and isinstance(info.value.__cause__, OSError)


def test_offline_mode_asks_for_data_dir(tmp_path, monkeypatch):
    # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: the default source is not even tried.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    builder = TwitterMNER(config_name="twitter2017", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(TwitterMNERDownloadError) as info:
        builder.download_and_prepare()
    message = str(info.value)
    assert "raw.githubusercontent.com/jefferyYu/UMT/master/data/twitter2017/" in message
    assert "pass data_dir=" in message and "train.txt, valid.txt, test.txt" in message


def test_parquet_export_round_trip_with_embedded_images(tmp_path):
    data_dir = write_files(tmp_path / "twitter2017", TWITTER2017)
    image_dir = write_images(tmp_path / "images", IMAGES_2017)
    _, dataset = build(tmp_path, "twitter2017", data_dir, image_dir=str(image_dir))
    _, dataset2015 = build(tmp_path, "twitter2015", write_files(tmp_path / "twitter2015", TWITTER2015), other_as_misc=False)
    hub = tmp_path / "hub"
    written = export_to_parquet(dataset, hub, "twitter2017")
    export_to_parquet(dataset2015, hub, "twitter2015")
    assert sorted(os.path.basename(path) for path in written) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
        "validation-00000-of-00001.parquet",
    ]
    readme = (hub / "README.md").read_text()
    assert "config_name: twitter2015" in readme and "config_name: twitter2017" in readme

    # The images must come from the Parquet bytes, not from the original files.
    for path in image_dir.iterdir():
        path.unlink()
    image_dir.rmdir()
    loaded = datasets.load_dataset(str(hub), "twitter2017", cache_dir=str(tmp_path / "cache2"))
    assert list(loaded) == ["train", "validation", "test"]
    assert loaded["train"].features == dataset["train"].features
    for split in loaded:
        assert loaded[split]["id"] == dataset[split]["id"]
        assert loaded[split]["tokens"] == dataset[split]["tokens"]
        assert loaded[split]["ner_tags"] == dataset[split]["ner_tags"]
    first = loaded["train"][0]["image"]
    assert first.size == (8, 6) and first.mode == "RGB"
    assert loaded["train"][1]["image"] is None
    raw = loaded["train"].cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert raw["bytes"] and raw["bytes"][:2] == b"\xff\xd8"  # JPEG bytes embedded

    other = datasets.load_dataset(str(hub), "twitter2015", cache_dir=str(tmp_path / "cache2"))
    assert other["train"].features["ner_tags"].feature.names == LABELS_WITH_OTHER
    assert other["test"]["tokens"] == dataset2015["test"]["tokens"]


def test_dataset_card_describes_features_splits_license_and_citation(tmp_path):
    # push_twitter_mner_to_hub uploads this same card (checked against a real HTTP Hub in test_hub_roundtrip.py)
    from huggingface_hub import DatasetCard

    data_dir = write_files(tmp_path / "twitter2017", TWITTER2017)
    _, dataset = build(tmp_path, "twitter2017", data_dir, image_dir=str(write_images(tmp_path / "images", IMAGES_2017)))
    export_to_parquet(dataset, tmp_path / "hub", "twitter2017")
    card = DatasetCard.load(tmp_path / "hub" / "README.md")
    info = card.data.to_dict()["dataset_info"]
    assert info["config_name"] == "twitter2017"
    assert {split["name"]: split["num_examples"] for split in info["splits"]} == {"train": 3, "validation": 1, "test": 2}
    features = {feature["name"]: feature for feature in info["features"]}
    assert list(features) == ["id", "image_id", "tokens", "ner_tags", "image"]
    names = features["ner_tags"]["list"]["class_label"]["names"]
    assert [names[str(index)] for index in range(len(LABELS))] == LABELS
    assert card.data.to_dict()["configs"] == [
        {"config_name": "twitter2017", "data_files": [
            {"split": split, "path": f"twitter2017/{split}-*"} for split in ("train", "validation", "test")
        ]}
    ]
    assert card.data.task_categories == ["token-classification"]
    for part in ("Twitter-2017 (Lu et al., 2018) 3373/723/723", "accepting the terms set by Twitter",
                 "```bibtex", "@inproceedings{zhang2018adaptive", "https://github.com/jefferyYu/UMT"):
        assert part in card.text, part


@pytest.mark.parametrize(
    "splits, config_name, message",
    [({}, "twitter2017", "no split to push"), ({"train": None}, "twitter/2017", "plain folder name")],
)
def test_push_rejects_bad_arguments_before_any_request(tmp_path, splits, config_name, message):
    data_dir = write_files(tmp_path / "twitter2017", TWITTER2017)
    _, dataset = build(tmp_path, "twitter2017", data_dir)
    dataset_dict = datasets.DatasetDict({split: dataset[split] for split in splits})
    # the endpoint is never contacted: no token, no server
    with pytest.raises(ValueError, match=message):
        push_twitter_mner_to_hub(dataset_dict, "user/twitter-mner", config_name, token="unused")


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="real Twitter MNER files not available")
@pytest.mark.parametrize(
    "name, sizes",
    [("twitter2017", {"train": 3373, "validation": 723, "test": 723}), ("twitter2015", {"train": 4000, "validation": 1000, "test": 3257})],
)
def test_real_files_split_sizes(tmp_path, name, sizes):
    builder, dataset = build(tmp_path, name, REAL_DATA)
    assert {split: len(ds) for split, ds in dataset.items()} == sizes
    assert dataset["train"].features["ner_tags"].feature.names == LABELS
    for split, stats in builder.split_stats.items():
        assert stats.num_tweets == sizes[split]
    if name == "twitter2015":  # one no-break-space token in valid.txt
        assert builder.split_stats["validation"].num_repaired_tokens == 1
