"""`train_pmner.py` with auxiliary context: `--retrieval_context K` (the index and its encoder saved with the model,
used by the pipeline, the CLI and an evaluation of the folder) and `--context_file` (text made elsewhere, PGIM-style),
and the refusals."""

import json
import os
import subprocess
import sys

import pytest

from fixtures import PROJECT, write_training_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_training_workspace(tmp_path_factory.mktemp("context"), sizes=(32, 8, 8))


def train(workspace, output_dir, *extra, text_model=None):
    command = [
        sys.executable, os.path.join(PROJECT, "train_pmner.py"),
        "--dataset_name", "twitter2017", "--data_dir", str(workspace / "data"), "--text_only",
        "--text_model_name_or_path", str(text_model or workspace / "tiny-bert"), "--fusion_num_heads", "4",
        "--num_train_epochs", "2", "--learning_rate", "3e-3", "--max_seq_length", "48",
        "--use_cpu", "--seed", "7", "--output_dir", str(output_dir), "--report_to", "none", *extra,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(workspace / "datasets-cache"))
    return subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def retrieval_run(workspace):
    output_dir = workspace / "retrieval"
    result = train(workspace, output_dir, "--do_train", "--do_eval", "--do_predict", "--retrieval_context", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return output_dir


def test_retrieval_run_saves_its_index_and_says_so_in_the_card(retrieval_run):
    for name in ("retrieval_index.json", "retrieval_index.safetensors", "retrieval_encoder/model.safetensors",
                 "retrieval_encoder/config.json", "text_retrieval_context.py"):
        assert (retrieval_run / name).is_file(), name
    source = json.loads((retrieval_run / "processor_config.json").read_text())["context_source"]
    assert source["kind"] == "retrieval" and source["k"] == 2
    card = (retrieval_run / "README.md").read_text()
    assert "| auxiliary context | retrieval: the 2 nearest training tweets" in card
    record = json.loads((retrieval_run / "retrieval_index.json").read_text())
    assert record["size"] == 32 and record["k"] == 2


def test_published_files_include_the_retrieval_encoder(retrieval_run):
    from types import SimpleNamespace

    from training_pmner.publishing import publishable_files

    files = publishable_files(str(retrieval_run), SimpleNamespace(hub_include_test_predictions=False,
                                                                  hub_include_training_args=False))
    assert {"retrieval_index.json", "retrieval_index.safetensors", "retrieval_encoder/model.safetensors",
            "retrieval_encoder/tokenizer.json"} <= set(files)


def test_pipeline_of_the_folder_retrieves_from_its_saved_index(retrieval_run):
    from transformers import pipeline

    ner = pipeline("multimodal-ner", model=str(retrieval_run), trust_remote_code=True)
    assert ner.retrieval_index is not None and ner.retrieval_index.k == 2
    tweets = ["trump visits london today", "rt @user : google meets kawhi leonard"]
    retrieved = ner.retrieval_index.contexts([tweet.split() for tweet in tweets])
    assert all(" ; " in context and "(" in context for context in retrieved)
    automatic = ner(tweets, return_words=True)
    explicit = ner(tweets, context=retrieved, return_words=True)
    assert [r["words"] for r in automatic] == [r["words"] for r in explicit]
    encoding = ner.preprocess({"text": tweets[0]})["model_inputs"]
    assert int(encoding["token_type_ids"].sum()) > 0  # the retrieved context is in the row


def test_a_folder_whose_index_is_not_the_trained_one_is_refused(retrieval_run, tmp_path):
    import shutil

    from transformers import pipeline

    folder = tmp_path / "swapped"
    shutil.copytree(retrieval_run, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((folder / "processor_config.json").read_text())
    record = json.loads((folder / "retrieval_index.json").read_text())
    assert config["context_source"]["embeddings_sha256"] == record["embeddings_sha256"]
    config["context_source"]["embeddings_sha256"] = "0" * 64  # as if another run's index had replaced it
    (folder / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="is not the one this model was trained with"):
        pipeline("multimodal-ner", model=str(folder), trust_remote_code=True)


def test_evaluating_the_folder_reuses_its_index_and_scores_the_same(workspace, retrieval_run, tmp_path):
    result = train(workspace, tmp_path / "eval", "--do_eval", text_model=retrieval_run)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "Retrieval context from the index saved in" in result.stdout + result.stderr
    trained = json.loads((retrieval_run / "eval_results.json").read_text())
    again = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert again["eval_f1"] == pytest.approx(trained["eval_f1"], abs=1e-9)
    refused = train(workspace, tmp_path / "eval-k5", "--do_eval", "--retrieval_context", "5", text_model=retrieval_run)
    assert refused.returncode == 2 and "trained with --retrieval_context 2" in refused.stderr


def test_cli_takes_a_context_field_and_retrieves_without_one(retrieval_run, tmp_path):
    source = tmp_path / "tweets.jsonl"
    source.write_text(
        json.dumps({"text": "trump visits london", "context": "trump (person) is a politician"}) + "\n"
        + json.dumps({"text": "obama visits paris"}) + "\n"
        + json.dumps({"text": "x", "context": ["not", "a", "string"]}) + "\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "predict_pmner.cli", str(retrieval_run), str(source),
         "-o", str(tmp_path / "out.jsonl")],
        cwd=PROJECT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tweets.jsonl:3: error: 'context' must be a string or null, got list" in result.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["line"] for line in lines] == [1, 2]


def test_context_file_run_records_what_the_context_is(workspace, tmp_path):
    """PGIM-style: knowledge written elsewhere (here by hand) for some tweets, keyed by tweet id or image id."""
    knowledge = tmp_path / "knowledge.jsonl"
    knowledge.write_text(
        json.dumps({"id": "twitter2017-train-0", "context": "trump is a person ; london is a location"}) + "\n"
        + json.dumps({"image_id": "valid_0", "context": "google is an organization"}) + "\n"
    )
    result = train(workspace, tmp_path / "file", "--do_train", "--do_eval", "--context_file", str(knowledge),
                   "--context_description", "hand-written knowledge (PGIM-style)")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    source = json.loads((tmp_path / "file" / "processor_config.json").read_text())["context_source"]
    assert source == {"kind": "column", "description": "hand-written knowledge (PGIM-style)"}
    card = (tmp_path / "file" / "README.md").read_text()
    assert "hand-written knowledge (PGIM-style): give the same kind of text as `context` at inference" in card
    assert not (tmp_path / "file" / "retrieval_index.json").exists()
    # the folder keeps its kind of context: retrieval cannot be put on it
    refused = train(workspace, tmp_path / "eval-retrieval", "--do_eval", "--retrieval_context", "1",
                    text_model=tmp_path / "file")
    assert refused.returncode == 2 and "trained with auxiliary context (hand-written knowledge" in refused.stderr
    assert "--retrieval_context 1 would give it another kind of context" in refused.stderr


def test_a_run_without_retrieval_in_an_earlier_retrieval_folder_leaves_no_index(workspace, retrieval_run, tmp_path):
    """The earlier run's index (training tweets with their gold entities) is neither kept nor published beside a
    model trained without it."""
    import shutil

    folder = tmp_path / "reused"
    shutil.copytree(retrieval_run, folder, ignore=shutil.ignore_patterns("checkpoint-*"))  # a new run, not a resume
    assert (folder / "retrieval_index.json").exists() and (folder / "retrieval_encoder").is_dir()
    result = train(workspace, folder, "--do_train")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert not (folder / "retrieval_index.json").exists() and not (folder / "retrieval_index.safetensors").exists()
    assert not (folder / "retrieval_encoder").exists()
    assert json.loads((folder / "processor_config.json").read_text()).get("context_source") is None


def test_resuming_a_retrieval_checkpoint_with_other_context_is_refused(workspace, retrieval_run, tmp_path):
    """The Trainer would go on training a model on another input than the one it was trained with so far."""
    checkpoint = sorted(retrieval_run.glob("checkpoint-*"))[0]
    assert json.loads((checkpoint / "processor_config.json").read_text())["context_source"]["k"] == 2
    for extra, given in ((), "this run gives no context"), (("--retrieval_context", "1"), "this run gives retrieval "
                                                                                          "context (k=1"):
        result = train(workspace, tmp_path / "resumed", "--do_train", "--resume_from_checkpoint", str(checkpoint), *extra)
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert f"checkpoint {checkpoint} was trained with retrieval context (k=2" in result.stderr
        assert given in result.stderr
        assert not (tmp_path / "resumed" / "model.safetensors").exists()
    # the same context resumes
    result = train(workspace, tmp_path / "resumed", "--do_train", "--resume_from_checkpoint", str(checkpoint),
                   "--retrieval_context", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert (tmp_path / "resumed" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--retrieval_context", "2", "--context_file", "{missing}"], "--retrieval_context and --context_file both"),
        (["--context_file", "{missing}"], "--context_file '{missing}' is not a file"),
        (["--retrieval_context", "-1"], "--retrieval_context must be 0 (off)"),
        (["--retrieval_encoder", "x"], "--retrieval_encoder is the encoder of --retrieval_context K"),
        (["--retrieval_context", "1", "--retrieval_encoder", "{missing}"], "--retrieval_encoder '{missing}': cannot load"),
        (["--context_file", "{bad}"], "{bad}:2: invalid JSON"),
    ],
)
def test_context_arguments_are_refused_clearly(workspace, tmp_path, extra, message):
    missing, bad = str(tmp_path / "missing.jsonl"), str(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"id": "twitter2017-train-0", "context": "x"}\n{oops\n')
    extra = [value.format(missing=missing, bad=bad) for value in extra]
    result = train(workspace, tmp_path / "out", "--do_train", *extra)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message.format(missing=missing, bad=bad) in result.stderr
    assert not (tmp_path / "out").exists()
