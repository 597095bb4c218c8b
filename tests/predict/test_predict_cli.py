"""`pmner-predict`: JSONL and CoNLL in and out, bad lines reported with their numbers, the FRR feature cache."""

import json
import os
import subprocess
import sys

from fixtures import PROJECT
from predict_cli_runner import ENV, run_cli, write
from processing_pmner import FRRFeatureCache


def test_jsonl_with_a_malformed_line_is_reported_and_the_rest_processed(workspace, tmp_path, capsys):
    source = write(tmp_path / "tweets.jsonl", [
        json.dumps({"id": "a", "text": "RT @nba: Kawhi's #NBAAwards 😂"}),
        '{"id": "b", "text": "missing brace"',
        "",
        json.dumps({"id": "c", "words": ["trump", "visits", "london"], "image": "17_06_1.jpg"}),
        json.dumps({"id": "d", "text": 42}),
        json.dumps({"id": "e", "text": "hello  world", "image": "broken.jpg"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"id": "g", "text": ""}),
    ])
    output = tmp_path / "entities.jsonl"
    code, _, err = run_cli(
        ["--batch-size", "2", "--image-dir", workspace["images"], "--word-tags", "-o", output, workspace["model"], source],
        capsys,
    )
    assert code == 0, err
    assert f"{source}:2: error: invalid JSON" in err
    assert f"{source}:5: error: 'text' must be a string, got int" in err
    assert f"{source}:7: error: expected a JSON object, got list" in err
    assert f"{source}:6: warning:" in err and "broken.jpg" in err
    assert "4 tweets tagged" in err and "3 skipped" in err and "lines 2, 5, 7" in err
    assert "1 unreadable image(s)" in err
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [record["line"] for record in records] == [1, 4, 6, 8]
    assert [record["id"] for record in records] == ["a", "c", "e", "g"]
    first = records[0]
    assert first["tokens"] == ["RT", "@", "nba", ":", "Kawhi", "'", "s", "#", "NBAAwards", "😂"]
    assert first["tags"] == ["B-PER"] * 10
    for record in records:
        for entity in record["entities"]:
            assert record["text"][entity["start"] : entity["end"]] == entity["word"]
            assert entity["entity_group"] == "PER"
    assert records[1]["text"] == "trump visits london" and len(records[1]["entities"]) == 3
    assert records[3]["entities"] == [] and records[3]["tokens"] == []


def test_conll_in_conll_out_with_gold_and_a_reused_feature_cache(workspace, tmp_path, capsys):
    source = write(tmp_path / "test.txt", [
        "IMGID:17_06_1", "Kawhi\tB-PER", "Leonard\tI-PER", "wins\tO", "",
        "IMGID:17_06_2", "bad\tO\textra", "line\tO", "",
        "IMGID:17_06_2", "#\tO", "NBA\tB-ORG", "",
        "IMGID:no_image", "hello\tO", "",
    ])
    cache_dir = tmp_path / "frr_cache"
    output = tmp_path / "predictions.conll"
    arguments = ["--image-dir", workspace["images"], "--feature-cache-dir", cache_dir, "-o", output]
    code, _, err = run_cli(arguments + [workspace["model"], source], capsys)
    assert code == 0, err
    assert f"{source}:7: error: expected 'token<TAB>tag', found 3 tab-separated fields" in err
    assert f"{source}:14: warning:" in err and "no_image.jpg" in err
    assert "3 tweets tagged" in err and "2 computed, 2 added to the cache" in err
    assert output.read_text(encoding="utf-8") == (
        "IMGID:17_06_1\nKawhi\tB-PER\tB-PER\nLeonard\tI-PER\tB-PER\nwins\tO\tB-PER\n\n"
        "IMGID:17_06_2\n#\tO\tB-PER\nNBA\tB-ORG\tB-PER\n\n"
        "IMGID:no_image\nhello\tO\tB-PER\n\n"
    )
    (folder,) = [name for name in os.listdir(cache_dir) if name.startswith("frr-")]
    cache = FRRFeatureCache(cache_dir, folder[len("frr-"):]).load()
    assert sorted(cache.index) == ["17_06_1", "17_06_2"]
    assert cache.features.shape[1:] == (3, 512)
    # entries written by the CLI carry their detection counts (no detector: 0 before the whole-image filler)
    assert [cache.num_detections(key) for key in ("17_06_1", "17_06_2")] == [0, 0]

    # second run: every feature read from the cache (even with the images gone)
    code, _, err = run_cli(["--feature-cache-dir", cache_dir, "-o", output, workspace["model"], source], capsys)
    assert code == 0, err
    assert "feature cache: 2 images" in err and "visual features: 2 from cache, 0 computed" in err

    # JSONL output of CoNLL input
    code, _, err = run_cli(["--output-format", "jsonl", "-o", tmp_path / "out.jsonl", workspace["model"], source], capsys)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(record["line"], record["image_id"], record["text"]) for record in records] == [
        (1, "17_06_1", "Kawhi Leonard wins"), (10, "17_06_2", "# NBA"), (14, "no_image", "hello"),
    ]


def test_exit_status_when_nothing_can_be_processed(workspace, tmp_path, capsys):
    source = write(tmp_path / "bad.jsonl", ["{", json.dumps({"words": "not a list"})])
    code, _, err = run_cli([workspace["model"], source], capsys)
    assert code == 1
    assert "0 tweets tagged" in err and "2 skipped" in err
    assert f"{source}:2: error: 'words' must be a list of strings" in err
    # --strict: any failure fails the run
    mixed = write(tmp_path / "mixed.jsonl", ["{", json.dumps({"text": "fine"})])
    assert run_cli([workspace["model"], mixed, "-o", tmp_path / "o.jsonl"], capsys)[0] == 0
    assert run_cli([workspace["model"], mixed, "-o", tmp_path / "o.jsonl", "--strict"], capsys)[0] == 1
    # a line of invalid UTF-8 is one bad line, not the end of the run
    undecodable = tmp_path / "latin1.jsonl"
    undecodable.write_bytes(json.dumps({"text": "fine"}).encode() + b'\n{"text": "caf\xe9"}\n')
    code, _, err = run_cli([workspace["model"], undecodable, "-o", tmp_path / "o.jsonl"], capsys)
    assert code == 0 and f"{undecodable}:2: error: not valid UTF-8" in err and "1 tweets tagged" in err
    # bad arguments
    code, _, err = run_cli([workspace["model"], tmp_path / "missing.jsonl"], capsys)
    assert code == 2 and "missing.jsonl does not exist" in err
    code, _, err = run_cli([tmp_path / "no-model", mixed], capsys)
    assert code == 2 and "cannot load the model" in err and "no-model" in err


def test_console_script_in_a_subprocess_streams_stdin_to_stdout(workspace, tmp_path):
    lines = [json.dumps({"text": "kawhi wins"}), "not json", json.dumps({"text": "@nba #finals"})]
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), **ENV)
    completed = subprocess.run(
        [sys.executable, "-m", "predict_pmner.cli", workspace["model"], "-", "--input-format", "jsonl",
         "--device", "cpu", "--batch-size", "8", "--aggregation-strategy", "first"],
        input="\n".join(lines) + "\n", cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "<stdin>:2: error: invalid JSON" in completed.stderr
    assert "pmner-predict: 2 tweets tagged" in completed.stderr
    records = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [record["line"] for record in records] == [1, 3]
    assert [entity["word"] for entity in records[1]["entities"]] == ["@", "nba", "#", "finals"]

