"""The full-size rehearsal of the paper setting (`benchmarks/rehearse_paper.py`) at its smallest size: 1 tweet per
Twitter-2017 split with bert-base, Faster R-CNN R50-FPN v2 and ResNet-152 (random weights) on 1024x768 images,
through `train_pmner.py`, a reload in a fresh process without the project and the pipeline on one image. It takes
minutes on 2 CPU cores (bert-base and the detector are full size); the work folder (about 3 GB) is removed after.

Also: the script's argument checks and its data subset / images (cheap)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from fixtures import PROJECT
from PIL import Image


SCRIPT = os.path.join(PROJECT, "benchmarks", "rehearse_paper.py")
TWITTER2017 = os.path.normpath(os.path.join(PROJECT, "..", "shared", "data", "twitter2017"))
needs_twitter = pytest.mark.skipif(
    not os.path.isfile(os.path.join(TWITTER2017, "test.txt")), reason="Twitter-2017 text not available"
)

sys.path.insert(0, os.path.join(PROJECT, "benchmarks"))
import rehearse_paper  # noqa: E402


STAGES = (
    "build models",
    "write data",
    "train_pmner.py start-up",
    "FRR extraction",
    "encoding, Trainer set-up",
    "training epoch",
    "validation at the epoch's end",
    "save (checkpoint, best-model reload, final folder)",
    "evaluation (validation, best model)",
    "test prediction",
    "results, model card, exit",
    "reload in a fresh process",
    "pipeline on one image",
)


@needs_twitter
def test_rehearsal_smallest_size_end_to_end(tmp_path):
    work = tmp_path / "work"
    try:
        completed = subprocess.run(
            [sys.executable, SCRIPT, "--tweets", "1", "--output-dir", str(work), "--quiet"],
            capture_output=True, text=True, timeout=3600, cwd=tmp_path,
        )
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
        printed = completed.stdout

        # every stage is a table row with its seconds and peak RSS
        for stage in STAGES:
            row = re.search(r"^\| " + re.escape(stage) + r"[^|]*\| ([\d.]+) \| ([\d.]+) \(", printed, re.MULTILINE)
            assert row, f"no row for {stage!r} in:\n{printed}"
            assert float(row.group(1)) >= 0 and float(row.group(2)) > 0, row.group(0)
        assert re.search(r"FRR: 3 images in [\d.]+ s = [\d.]+ images/s", printed), printed
        assert re.search(r"training epoch \(bert-base, 1 tweets, batch 8\): [\d.]+ s", printed), printed

        report = json.loads((work / "rehearsal.json").read_text())
        assert len(report["stages"]) == len(STAGES)
        assert all(row["stage"].startswith(stage) for row, stage in zip(report["stages"], STAGES))
        assert all(row["seconds"] >= 0 and row["peak_rss_mib"] > 0 for row in report["stages"])
        assert report["frr_seconds"] > 0 and report["epoch_seconds"] > 0
        assert report["training_process_peak_rss_mib"] > 1000  # bert-base with AdamW and the FRR networks

        # the paper config was run: BIOES, TCFM, verbalizer, bert-base size, FRR with 5 objects on every image
        config = json.loads((work / "run" / "config.json").read_text())
        assert config["model_type"] == "pmner" and config["tag_scheme"] == "BIOES" and config["head"] == "verbalizer"
        assert config["fusion"] == "tcfm" and config["fusion_num_heads"] == 12
        assert config["text_config"]["hidden_size"] == 768 and config["text_config"]["num_hidden_layers"] == 12
        results = report["all_results"]
        for split in ("train", "validation", "test"):
            assert results[f"visual_{split}_images_given"] == 1
            assert results[f"visual_{split}_mean_objects_per_image"] == 5.0
        assert results["visual_test_share_with_object_above_threshold"] == 1.0
        for key in ("train_runtime", "eval_runtime", "predict_runtime", "eval_f1", "predict_f1"):
            assert isinstance(results[key], (int, float)), key
        sizes = report["sizes_mib"]
        assert sizes["run/model.safetensors"] > 400  # bert-base MLM + fusion layers, float32
        assert sizes["run/frr_detector.safetensors"] > 100 and sizes["run/frr_backbone.safetensors"] > 200

        # the folder reloaded as remote code in a process without the project, and the pipeline tagged the tweet
        pipeline = report["pipeline"]
        assert pipeline["pipeline_class"].startswith("transformers_modules.")
        assert pipeline["pipeline_class"].endswith("PMNERPipeline")
        assert pipeline["model_class"].endswith("PMNERForTokenClassification")
        assert pipeline["objects_in_image"] == [5]  # FRR ran on the image with the saved (confident) detector
        test_block = rehearse_paper.read_tweets(os.path.join(TWITTER2017, "test.txt"))[0]
        text = " ".join(line.split("\t")[0] for line in test_block[1:] if line.strip())
        # every word tagged (the random model's tags themselves mean nothing; its entities may be none)
        from processing_pmner.text_tweet_tokenizer import split_tweet

        assert len(pipeline["word_tags"]) == len(split_tweet(text)) > 0
        assert all(tag == "O" or tag.split("-", 1)[1] in {"PER", "LOC", "ORG", "MISC"} for tag in pipeline["word_tags"])
        entities = pipeline["entities"]
        labels = {"PER", "LOC", "ORG", "MISC"}
        for entity in entities:
            assert entity["entity_group"] in labels and 0.0 <= entity["score"] <= 1.0
            assert text[entity["start"] : entity["end"]] == entity["word"]
    finally:
        shutil.rmtree(work, ignore_errors=True)  # about 3 GB of weights and checkpoints


@needs_twitter
@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--tweets", "0"], "--tweets must be between 1 and"),
        (["--tweets", "100000"], "--tweets must be between 1 and"),
        ([], "--tweets N is required"),
        (["--tweets", "1", "--output-dir", os.path.join(PROJECT, "rehearsal")], "is inside the repository"),
        (["--tweets", "1", "--twitter-dir", "/nonexistent/twitter2017"], "no train.txt, valid.txt, test.txt there"),
    ],
)
def test_arguments_are_checked(arguments, message, capsys):
    with pytest.raises(SystemExit) as raised:
        rehearse_paper.parse_args(arguments)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


@needs_twitter
def test_output_dir_must_be_new_or_empty(tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "file").write_text("x")
    with pytest.raises(SystemExit):
        rehearse_paper.parse_args(["--tweets", "1", "--output-dir", str(tmp_path / "old")])
    assert "exists and is not an empty folder" in capsys.readouterr().err


@needs_twitter
def test_data_subset_and_images(tmp_path):
    info = rehearse_paper.write_data(str(tmp_path), TWITTER2017, 2)
    paths = rehearse_paper.input_paths(str(tmp_path))
    image_ids = []
    for name in rehearse_paper.SPLIT_FILES:
        written = rehearse_paper.read_tweets(os.path.join(paths["data"], name))
        source = rehearse_paper.read_tweets(os.path.join(TWITTER2017, name))[:2]
        assert [[line for line in block if line] for block in written] == [
            [line for line in block if line] for block in source
        ]
        image_ids += [block[0][len("IMGID:") :] for block in written]
    assert info["images"] == len(set(image_ids)) == 6
    for image_id in image_ids:
        with Image.open(os.path.join(paths["images"], f"{image_id}.jpg")) as image:
            assert image.format == "JPEG" and image.size == (1024, 768) and image.mode == "RGB"
    # seeded by the image id: the same image every time, different images for different ids
    first, second = (rehearse_paper.draw_image(image_id).tobytes() for image_id in image_ids[:2])
    assert rehearse_paper.draw_image(image_ids[0]).tobytes() == first != second
