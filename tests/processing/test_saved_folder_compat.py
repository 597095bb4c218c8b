"""A model folder saved by older code (tests/support/old_folder.zip, written by tests/support/make_old_folder.py at
the commit named in old_folder_expected.json) still loads and predicts what that code predicted: with today's classes,
with the folder's own remote code in a process that cannot import this project, and once re-saved by today's code
(its remote code then today's, loaded the same way)."""

import json
import os
import zipfile

import pytest
import torch

from fixtures import PROJECT, run_without_project

SUPPORT = os.path.join(PROJECT, "tests", "support")
OLD_ZIP = os.path.join(SUPPORT, "old_folder.zip")
PHOTO = os.path.join(SUPPORT, "old_folder_photo.png")
with open(os.path.join(SUPPORT, "old_folder_expected.json"), encoding="utf-8") as _handle:
    EXPECTED = json.load(_handle)

REMOTE_SCRIPT = """
import json, torch
from transformers import AutoModel, AutoProcessor, pipeline
folder, texts, photo = {folder!r}, {texts!r}, {photo!r}
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
batch = processor([text.split() for text in texts], images=[photo] * len(texts))
with torch.no_grad():
    logits = model(**{{k: v for k, v in batch.items() if k != "labels"}}).logits
ner = pipeline(model=folder, trust_remote_code=True, device="cpu")
print("RESULT " + json.dumps({{
    "modules": [type(processor).__module__, type(model).__module__, type(ner).__module__],
    "visual_features": batch["visual_features"][0].tolist(), "logits": logits.tolist(),
    "pipeline_with_image": [ner(text, image=photo) for text in texts],
    "pipeline_text_only": [ner(text) for text in texts],
}}))
"""


def assert_same_predictions(result: dict) -> None:
    torch.testing.assert_close(torch.tensor(result["visual_features"]), torch.tensor(EXPECTED["visual_features"]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(result["logits"]), torch.tensor(EXPECTED["logits"]), atol=1e-5, rtol=1e-4)
    for key in ("pipeline_with_image", "pipeline_text_only"):
        assert len(result[key]) == len(EXPECTED[key])
        for got, want in zip(result[key], EXPECTED[key]):
            assert [{k: v for k, v in e.items() if k != "score"} for e in got] == [{k: v for k, v in e.items() if k != "score"} for e in want]
            assert [e["score"] for e in got] == pytest.approx([e["score"] for e in want], abs=1e-5)


@pytest.fixture(scope="module")
def old_folder(tmp_path_factory) -> str:
    """The old folder unzipped into a temporary folder (loading it never writes into the checked-in fixture)."""
    root = tmp_path_factory.mktemp("old")
    with zipfile.ZipFile(OLD_ZIP) as archive:
        archive.extractall(root)
    return str(root / "old_folder")


def test_the_fixture_predicts_entities_and_uses_the_image(old_folder):
    assert sum(len(found) for found in EXPECTED["pipeline_with_image"]) >= 5
    scores = [e["score"] for found in EXPECTED["pipeline_with_image"] for e in found]
    text_only = [e["score"] for found in EXPECTED["pipeline_text_only"] for e in found]
    assert scores != text_only, "the image changes nothing: the visual path would go unchecked"
    assert {"frr_backbone.safetensors", "processing_pmner.py", "image_processing_pmner.py"} <= set(os.listdir(old_folder))


def test_todays_classes_load_the_old_folder_and_predict_the_same(old_folder):
    from modeling_pmner import PMNERForTokenClassification
    from processing_pmner import PMNERProcessor
    from processing_pmner.pipeline_pmner import PMNERPipeline

    model = PMNERForTokenClassification.from_pretrained(old_folder).eval()
    processor = PMNERProcessor.from_pretrained(old_folder)
    texts = EXPECTED["texts"]
    batch = processor([text.split() for text in texts], images=[PHOTO] * len(texts))
    with torch.no_grad():
        logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    pipe = PMNERPipeline(model=model, processor=processor, device="cpu")
    assert_same_predictions({
        "visual_features": batch["visual_features"][0].tolist(), "logits": logits.tolist(),
        "pipeline_with_image": [pipe(text, image=PHOTO) for text in texts],
        "pipeline_text_only": [pipe(text) for text in texts],
    })


def remote_result(folder, cwd) -> dict:
    completed = run_without_project(
        REMOTE_SCRIPT.format(folder=str(folder), texts=EXPECTED["texts"], photo=PHOTO), cwd
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert all(module.startswith("transformers_modules") for module in result["modules"]), result["modules"]
    return result


def test_the_old_folder_runs_its_own_remote_code(old_folder, tmp_path):
    assert_same_predictions(remote_result(old_folder, tmp_path))


def test_the_old_folder_resaved_by_todays_code_travels_with_todays_remote_code(old_folder, tmp_path):
    from modeling_pmner import PMNERForTokenClassification
    from processing_pmner import PMNERProcessor
    from processing_pmner.pipeline_pmner import add_pipeline_to_folder

    folder = tmp_path / "resaved"
    PMNERForTokenClassification.from_pretrained(old_folder).save_pretrained(folder)
    PMNERProcessor.from_pretrained(old_folder).save_pretrained(folder)
    add_pipeline_to_folder(folder)
    here = {name for name in os.listdir(os.path.join(PROJECT, "processing_pmner")) if name.endswith(".py")}
    travelled = {name for name in os.listdir(folder) if name.endswith(".py")}
    assert {"processing_pmner.py", "image_processing_pmner.py", "pipeline_pmner.py", "modeling_pmner.py"} <= travelled
    assert travelled - {"configuration_pmner.py", "fusion_pmner.py", "inputs_pmner.py", "modeling_pmner.py", "verbalizer_pmner.py"} <= here
    assert_same_predictions(remote_result(folder, tmp_path))
