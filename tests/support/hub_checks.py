"""Helpers of the tests against the test Hub (support/hub_server.py, the `hub_server` fixture): folder digests, the
result a fresh process prints, uploads, a local folder and its Hub repo compared in a process without the project,
and a URL where connections are refused."""

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import tempfile

import torch

from fixtures import run_without_project


def tree_digest(folder) -> dict:
    """`{relative path: sha256}` of every file under `folder`."""
    digest = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                digest[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return digest


def last_json(completed: subprocess.CompletedProcess) -> dict:
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, completed.stdout[-2000:] + completed.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def upload_model_folder(hub, folder, repo_id: str, private: bool = False):
    """Creates `repo_id` on the test Hub and uploads `folder` to it; returns the commit info."""
    api = hub.api()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload tiny P-MNER")


COMPARE_SCRIPT = """
import json, os, torch
from transformers import AutoModel, AutoModelForTokenClassification, AutoProcessor, pipeline

texts, image = {texts!r}, {image!r}

def run(source):
    result = {{}}
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    batch = processor([text.split() for text in texts], images=[image] * len(texts) if image else None)
    result["encoding"] = {{key: value.tolist() for key, value in batch.items() if hasattr(value, "tolist")}}
    inputs = {{key: value for key, value in batch.items() if key not in ("labels",)}}
    for name, auto in (("model", AutoModel), ("token_classification", AutoModelForTokenClassification)):
        model = auto.from_pretrained(source, trust_remote_code=True).eval()
        result[name + "_module"] = type(model).__module__
        with torch.no_grad():
            result[name] = model(**inputs).logits.tolist()
    ner = pipeline(model=source, trust_remote_code=True, device="cpu")
    result["pipeline_module"] = type(ner).__module__
    result["pipeline"] = [ner(text, image=image) if image else ner(text) for text in texts]
    result["pipeline_text_only"] = [ner(text) for text in texts]
    return result

local, hub = run({folder!r}), run({repo_id!r})
cache = os.path.join(os.environ["HF_HUB_CACHE"], "models--" + {repo_id!r}.replace("/", "--"))
print("RESULT " + json.dumps({{"local": local, "hub": hub, "cached": os.path.isdir(cache)}}))
"""


def compare_hub_and_local(hub, repo_id: str, folder, workdir, texts, image=None) -> dict:
    """Loads `folder` and the Hub repo `repo_id` in a fresh process that cannot import the project (empty HF_HOME,
    HF_ENDPOINT at `hub`) with the Auto classes and `pipeline(..., trust_remote_code=True)`; asserts they give the
    same encodings, logits and pipeline outputs, and that the repo was really fetched from the Hub."""
    workdir = tempfile.mkdtemp(prefix="fresh-process-", dir=str(workdir))
    home = os.path.join(workdir, "hf-home")  # empty, whatever other processes of the test have cached
    env = dict(hub.env(), HF_HOME=home, HF_HUB_CACHE=os.path.join(home, "hub"), HF_DATASETS_CACHE=os.path.join(home, "datasets"))
    script = COMPARE_SCRIPT.format(texts=list(texts), image=image, folder=str(folder), repo_id=repo_id)
    seen = len(hub.server.requests)
    result = last_json(run_without_project(script, workdir, env=env))
    requests = hub.server.requests[seen:]  # those of the fresh process
    local, remote = result["local"], result["hub"]
    assert result["cached"], "the repo was not downloaded into the empty HF_HOME"
    for key in ("model_module", "token_classification_module", "pipeline_module"):
        assert remote[key].startswith("transformers_modules"), remote[key]
    assert remote["encoding"] == local["encoding"]
    for key in ("model", "token_classification"):
        torch.testing.assert_close(torch.tensor(remote[key]), torch.tensor(local[key]), atol=0, rtol=0)
    assert remote["pipeline"] == local["pipeline"]
    assert remote["pipeline_text_only"] == local["pipeline_text_only"]
    assert any(request.startswith("GET /lfs/") for request in requests), "model.safetensors not fetched over LFS"
    assert any(f"/{repo_id}/resolve/" in request and request.endswith("config.json") for request in requests)
    return result


@contextlib.contextmanager
def closed_port_url():
    """An http URL on 127.0.0.1 where nothing listens: the port is bound (so no other process can take it) but not
    listening, so connections are refused, for as long as the context lasts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
