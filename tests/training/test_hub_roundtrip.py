"""Round trips through a real HTTP Hub (support/hub_server.py on 127.0.0.1): files, a tiny P-MNER model loaded by a
process that cannot import this project, and the Twitter MNER dataset read back with `load_dataset`. A tiny visual
P-MNER folder for them: `write_tiny_visual_pmner_folder(root)` (an unrebuildable FRR backbone saved in it)."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from fixtures import PROJECT, run_without_project, write_tiny_masked_lm, write_twitter_fixture, write_unrebuildable_weights
from hub_checks import closed_port_url, compare_hub_and_local, last_json, tree_digest, upload_model_folder


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------


DOWNLOAD_SCRIPT = """
import json
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError

result = {{}}
result["snapshot"] = snapshot_download({repo_id!r})
result["pinned"] = snapshot_download({repo_id!r}, revision={sha!r})
result["weights"] = hf_hub_download({repo_id!r}, "weights.safetensors")
result["config_main"] = open(hf_hub_download({repo_id!r}, "config.json")).read()
result["info_sha"] = HfApi().model_info({repo_id!r}).sha
try:
    HfApi(token=False).model_info({repo_id!r})
except RepositoryNotFoundError as err:
    result["anonymous"] = type(err).__name__
print("RESULT " + json.dumps(result))
"""


def test_upload_folder_then_download_in_a_fresh_process(hub_server, tmp_path):
    folder = tmp_path / "files"
    (folder / "nested").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}\n')
    (folder / "nested" / "notes.txt").write_text("small regular file\n")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "weights.safetensors").write_bytes(os.urandom(4096))  # LFS by its extension
    (folder / "big.dat").write_bytes(os.urandom(10 * 1024 * 1024 + 1))  # LFS by its size (> 10 MB)
    before = tree_digest(folder)
    commit = upload_model_folder(hub_server, folder, "user/files", private=True)
    assert tree_digest(folder) == before
    # a second commit on main: the first one stays readable by its sha
    hub_server.api().upload_file(path_or_fileobj=b'{"a": 2}\n', path_in_repo="config.json", repo_id="user/files")

    env = hub_server.env()
    result = last_json(run_without_project(DOWNLOAD_SCRIPT.format(repo_id="user/files", sha=commit.oid), tmp_path, env=env))
    assert result["info_sha"] != commit.oid and result["config_main"] == '{"a": 2}\n'
    pinned = tree_digest(result["pinned"])
    assert pinned.pop(".gitattributes")
    assert pinned == before
    latest = tree_digest(result["snapshot"])
    assert latest.pop(".gitattributes") and latest.pop("config.json") != before.pop("config.json")
    assert latest == before
    assert result["snapshot"].startswith(env["HF_HUB_CACHE"]) and result["pinned"].startswith(env["HF_HUB_CACHE"])
    with open(result["weights"], "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == before["weights.safetensors"]
    assert result["anonymous"] == "RepositoryNotFoundError"  # private: not readable without the token

    requests = hub_server.server.requests
    assert sum(request.startswith("PUT /upload/") for request in requests) == 2  # the two LFS files
    assert any(request == "POST /user/files.git/info/lfs/objects/batch" for request in requests)
    assert any(request.startswith("GET /lfs/") for request in requests)  # downloads follow the redirect


def request(hub, method, path, body=None, headers=None, token=None):
    """One raw HTTP request to the test Hub: (status, headers, body)."""
    import urllib.error
    import urllib.request

    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = path if path.startswith("http") else hub.url + path
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_hub_server_protocol_details(hub_server):
    create = json.dumps({"name": "proto", "organization": "user"}).encode()
    json_headers = {"Content-Type": "application/json"}
    status, headers, _ = request(hub_server, "POST", "/api/repos/create", create, json_headers)
    assert status == 401 and "needs a token" in headers["X-Error-Message"]
    status, headers, _ = request(hub_server, "POST", "/api/repos/create", create, json_headers, token="hf_wrong")
    assert status == 401 and headers["X-Error-Message"] == "Invalid credentials in Authorization header"
    other = json.dumps({"name": "proto", "organization": "someone-else"}).encode()
    assert request(hub_server, "POST", "/api/repos/create", other, json_headers, token=hub_server.token)[0] == 403
    assert request(hub_server, "POST", "/api/repos/create", create, json_headers, token=hub_server.token)[0] == 200
    assert request(hub_server, "POST", "/api/repos/create", create, json_headers, token=hub_server.token)[0] == 409

    commit = hub_server.api().upload_file(path_or_fileobj=b"0123456789", path_in_repo="digits.txt", repo_id="user/proto")
    resolve = "/user/proto/resolve/main/digits.txt"
    status, headers, body = request(hub_server, "GET", resolve, headers={"Range": "bytes=2-5"})
    assert (status, body, headers["Content-Range"]) == (206, b"2345", "bytes 2-5/10")
    assert request(hub_server, "GET", resolve, headers={"Range": "bytes=7-"})[2] == b"789"
    assert request(hub_server, "GET", resolve, headers={"Range": "bytes=10-"})[0] == 416
    status, headers, body = request(hub_server, "HEAD", f"/user/proto/resolve/{commit.oid}/digits.txt")
    assert status == 200 and headers["X-Repo-Commit"] == commit.oid and headers["Content-Length"] == "10" and body == b""
    status, headers, _ = request(hub_server, "HEAD", "/user/proto/resolve/main/missing.txt")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound" and headers["X-Repo-Commit"] == commit.oid
    assert request(hub_server, "GET", "/user/proto/resolve/0000000000000000000000000000000000000000/digits.txt")[1][
        "X-Error-Code"] == "RevisionNotFound"
    assert request(hub_server, "GET", "/api/models/user/nothing")[1]["X-Error-Code"] == "RepoNotFound"

    # an LFS file that was never uploaded cannot be committed; a commit needs a token
    ndjson = b"\n".join(json.dumps(line).encode() for line in [
        {"key": "header", "value": {"summary": "x"}},
        {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "a" * 64, "size": 3}},
    ])
    commit_url = "/api/models/user/proto/commit/main"
    assert request(hub_server, "POST", commit_url, ndjson, token=hub_server.token)[0] == 422
    assert request(hub_server, "POST", commit_url, ndjson)[0] == 401
    assert request(hub_server, "POST", commit_url, b"not json", token=hub_server.token)[0] == 400
    # an LFS upload URL is signed for one object and size
    status, _, body = request(hub_server, "POST", "/user/proto.git/info/lfs/objects/batch", json.dumps(
        {"operation": "upload", "objects": [{"oid": hashlib.sha256(b"abc").hexdigest(), "size": 3}]}).encode(),
        json_headers, token=hub_server.token)
    href = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
    assert href.startswith(hub_server.server.storage_url)
    assert request(hub_server, "PUT", href.replace("size=3", "size=4"), b"abcd")[0] == 403
    assert request(hub_server, "PUT", href, b"abd")[0] == 400
    assert request(hub_server, "PUT", href, b"abc")[0] == 200


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


def write_tiny_visual_pmner_folder(root, image=None):
    """A tiny visual P-MNER folder whose FRR backbone (resnet18, no detector) comes from a perturbed weights file that
    is deleted once saved: no setting rebuilds it, so the same features after a reload prove the folder's own
    `frr_backbone.safetensors` was read."""
    from transformers import AutoTokenizer

    from processing_pmner import PMNERImageProcessor, PMNERProcessor
    from pipeline_builders import build_model, save_folder

    text_model = write_tiny_masked_lm(root / "tiny-bert")
    model = build_model(text_model, use_visual=True)
    weights = write_unrebuildable_weights(root / "resnet18.safetensors", seed=6)
    image_processor = PMNERImageProcessor(
        detector=None, backbone="resnet18", backbone_weights=weights, crop_size=32, max_objects=3,
        frr_weights_dtype="bfloat16",
    )
    labels = [model.config.id2label[index] for index in range(model.config.num_labels)]
    processor = PMNERProcessor(image_processor, AutoTokenizer.from_pretrained(text_model), label_names=labels, max_length=32)
    expected = None if image is None else image_processor(image)["visual_features"]  # (1, objects, D)
    folder = save_folder(root / "tiny-visual-pmner", model, processor)
    os.remove(weights)
    return folder if image is None else (folder, expected)


def test_visual_model_round_trip_with_an_image(hub_server, tmp_path):
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    folder, expected = write_tiny_visual_pmner_folder(tmp_path, image=str(image))
    assert "frr_backbone.safetensors" in os.listdir(folder)
    before = tree_digest(folder)
    upload_model_folder(hub_server, folder, "user/tiny-visual")
    assert tree_digest(folder) == before
    texts = ["trump visits london today", "rt @user : apple meets obama"]
    result = compare_hub_and_local(hub_server, "user/tiny-visual", folder, tmp_path, texts, image=str(image))
    features = torch.tensor(result["hub"]["encoding"]["visual_features"])
    assert result["hub"]["encoding"]["visual_mask"][0][0]  # the image was used
    # bfloat16 weights: the features computed before saving, to the precision the folder keeps
    torch.testing.assert_close(features[0], expected[0], atol=0.05 * float(expected.abs().max()), rtol=0)
    assert any(f"/user/tiny-visual/resolve/" in r and r.endswith("frr_backbone.safetensors") for r in hub_server.server.requests)
    assert any(result["local"]["pipeline"]), "the tiny model predicts no entity at all: nothing compared"


# ----------------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------------


PUSH_SCRIPT = """
import json, hashlib, sys
import datasets
from training_pmner.twitter_mner import load_twitter_mner
from training_pmner.twitter_mner_hub import push_twitter_mner_to_hub
from huggingface_hub import HfApi, hf_hub_download

data = load_twitter_mner("twitter2017", data_dir={data!r}, image_dir={images!r}, cache_dir={cache!r})
first = push_twitter_mner_to_hub(data, "user/twitter-mner", "twitter2017", private=True)
first_files = sorted(HfApi().list_repo_files("user/twitter-mner", repo_type="dataset"))
second = push_twitter_mner_to_hub(data, "user/twitter-mner", "twitter2017", max_shard_size={shard!r})
other = push_twitter_mner_to_hub(datasets.DatasetDict(train=data["train"].select(range(3))), "user/twitter-mner", "other")
result = {{"files": sorted(HfApi().list_repo_files("user/twitter-mner", repo_type="dataset")), "first_files": first_files,
          "commits": [first.oid, second.oid, other.oid]}}
result["card"] = open(hf_hub_download("user/twitter-mner", "README.md", repo_type="dataset")).read()
for streaming in (False, True):
    loaded = datasets.load_dataset("user/twitter-mner", "twitter2017", streaming=streaming)
    rows = {{}}
    for split in loaded:
        rows[split] = []
        for row in loaded[split]:
            image = row.pop("image")
            row["image"] = None if image is None else [image.size, image.mode, hashlib.sha256(image.tobytes()).hexdigest()]
            rows[split].append(row)
    result["streaming" if streaming else "map"] = rows
    result["features_" + str(streaming)] = loaded["train"].features.to_dict()
print("RESULT " + json.dumps(result))
"""


def rows_with_decoded_images(dataset_dict) -> dict:
    rows = {}
    for split, dataset in dataset_dict.items():
        rows[split] = []
        for row in dataset:
            image = row.pop("image")
            row["image"] = None if image is None else [list(image.size), image.mode, hashlib.sha256(image.tobytes()).hexdigest()]
            rows[split].append(row)
    return rows


def test_twitter_mner_push_and_load_dataset(hub_server, tmp_path):
    from training_pmner.twitter_mner import load_twitter_mner

    data_dir, image_dir = tmp_path / "twitter2017", tmp_path / "images"
    write_twitter_fixture(data_dir, image_dir, sizes=(8, 3, 3), missing_images=("valid_1",))
    before = tree_digest(tmp_path)
    shard = 1000  # bytes (of the table before images are embedded): the second push writes the train split as several
    # shards, replacing the single first one
    script = PUSH_SCRIPT.format(data=str(data_dir), images=str(image_dir), cache=str(tmp_path / "push-cache"), shard=shard)
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=PROJECT, env=hub_server.process_env(),
        capture_output=True, text=True, timeout=300,
    )
    result = last_json(completed)
    assert {path: digest for path, digest in tree_digest(tmp_path).items() if not path.startswith("push-cache")} == before

    local = load_twitter_mner("twitter2017", data_dir=str(data_dir), image_dir=str(image_dir), cache_dir=str(tmp_path / "c"))
    shards = lambda files: sorted(path for path in files if path.endswith(".parquet"))  # noqa: E731
    assert shards(result["first_files"]) == [f"twitter2017/{split}-00000-of-00001.parquet" for split in ("test", "train", "validation")]
    train = [path for path in shards(result["files"]) if path.startswith("twitter2017/train-")]
    assert len(train) >= 2 and all(path.endswith(f"-of-{len(train):05d}.parquet") for path in train)  # the single first shard was replaced
    assert set(result["files"]) == set(shards(result["files"])) | {"README.md", ".gitattributes"}
    assert "other/train-00000-of-00001.parquet" in result["files"] and len(set(result["commits"])) == 3
    # the card keeps its description, license note and citation, and lists both configs
    card = result["card"]
    for part in ("Twitter multimodal NER", "dataset_info:", "splits:", "num_examples: 8", "terms set by Twitter",
                 "@inproceedings{lu2018visual", "config_name: twitter2017", "path: twitter2017/train-*",
                 "config_name: other", "path: other/train-*"):
        assert part in card, part

    expected = rows_with_decoded_images(local)
    assert expected["validation"][1]["image"] is None and expected["train"][0]["image"] is not None
    for mode in ("map", "streaming"):
        assert json.loads(json.dumps(expected)) == result[mode], mode
    assert result["features_False"] == local["train"].features.to_dict()


FAIL_SCRIPT = """
import json
from training_pmner.twitter_mner import load_twitter_mner
from training_pmner.twitter_mner_hub import TwitterMNERHubError, push_twitter_mner_to_hub

data = load_twitter_mner("twitter2017", data_dir={data!r}, image_dir={images!r}, cache_dir={cache!r})
result = {{}}
for name, token in {tokens!r}:
    try:
        push_twitter_mner_to_hub(data, "user/twitter-mner", "twitter2017", token=token)
        result[name] = "pushed"
    except TwitterMNERHubError as err:
        result[name] = str(err)
print("RESULT " + json.dumps(result))
"""


@pytest.mark.parametrize("case", ["credentials", "endpoint"])
def test_twitter_mner_push_failures_are_clear_and_touch_nothing(hub_server, tmp_path, case):
    data_dir, image_dir = tmp_path / "twitter2017", tmp_path / "images"
    write_twitter_fixture(data_dir, image_dir, sizes=(4, 2, 2))
    env = hub_server.process_env(token=case == "endpoint")
    tokens = [("no_token", None), ("bad_token", "hf_not_a_token")] if case == "credentials" else [("closed_port", None)]
    before = tree_digest(tmp_path)
    script = FAIL_SCRIPT.format(data=str(data_dir), images=str(image_dir), cache=str(tmp_path / "cache"), tokens=tokens)
    with closed_port_url() as closed:
        if case == "endpoint":
            env["HF_ENDPOINT"] = closed
        completed = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)], cwd=PROJECT, env=env, capture_output=True, text=True,
            timeout=300,
        )
    result = last_json(completed)
    assert {path: digest for path, digest in tree_digest(tmp_path).items() if not path.startswith("cache")} == before
    if case == "credentials":
        assert "user/twitter-mner" in result["no_token"] and "no Hub token" in result["no_token"]
        assert "HF_TOKEN" in result["no_token"] and hub_server.url in result["no_token"]
        assert "HTTP 401" in result["bad_token"] and "Invalid credentials" in result["bad_token"]
        assert "token" in result["bad_token"].split("HTTP 401", 1)[1]
        assert hub_server.server.store.repos == {}  # nothing was created
    else:
        assert result["closed_port"].startswith("Cannot reach the Hub") and env["HF_ENDPOINT"] in result["closed_port"]
        assert "ConnectError" in result["closed_port"] and "nothing was uploaded" in result["closed_port"]
