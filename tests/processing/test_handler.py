"""The Inference Endpoints handler a saved model folder carries (`handler.py`), run where the project is not
importable, as an endpoint runs it."""

import base64
import json
import os
import textwrap

import pytest
from PIL import Image

from fixtures import run_without_project, write_tiny_masked_lm
from pipeline_builders import build_model, build_processor, image_file, save_folder
from processing_pmner.pipeline_pmner import PMNERPipeline


HANDLER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {folder!r})  # an endpoint imports handler.py from the repository's root
    from handler import EndpointHandler

    handler = EndpointHandler({folder!r})
    words = {{"return_words": True}}
    requests = {requests!r}
    result = {{"class": type(handler.pipeline).__module__ + "." + type(handler.pipeline).__name__}}
    for name, request in requests.items():
        result[name] = handler(request)
    print("RESULT " + json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("handler")
    text_model = write_tiny_masked_lm(root / "tiny-bert")
    model = build_model(text_model, seed=3)
    processor = build_processor(text_model, model)
    return {"root": root, "model": model, "processor": processor, "folder": save_folder(root / "model", model, processor)}


def test_handler_answers_like_the_pipeline_with_and_without_an_image(saved, tmp_path):
    folder = saved["folder"]
    assert os.path.isfile(os.path.join(folder, "handler.py"))
    photo = image_file(tmp_path, color=(20, 160, 220))
    encoded = base64.b64encode(open(photo, "rb").read()).decode("ascii")
    text = "trump visits london today"
    requests = {
        "text": {"inputs": text, "parameters": {"return_words": True}},
        "image": {"inputs": text, "image": encoded, "parameters": {"return_words": True}},
        "words": {"inputs": ["trump", "visits", "london", "today"], "image": encoded, "parameters": {"return_words": True}},
        "entities": {"inputs": text, "image": encoded},
        "no_inputs": {"image": encoded},
        "bad_base64": {"inputs": text, "image": "not base64 at all!"},
        "not_an_image": {"inputs": text, "image": base64.b64encode(b"plain text, no image").decode()},
        "unknown_parameter": {"inputs": text, "parameters": {"temperature": 0.5}},
        "parameters_not_an_object": {"inputs": text, "parameters": "aggregation_strategy=first"},
        "bad_parameter_value": {"inputs": text, "parameters": {"aggregation_strategy": "loudest"}},
        "unknown_key": {"inputs": text, "images": encoded},
        "number_inputs": {"inputs": 42},
    }
    completed = run_without_project(HANDLER_SCRIPT.format(folder=folder, requests=requests), tmp_path)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    assert "Traceback" not in completed.stderr
    result = json.loads(completed.stdout.split("RESULT ", 1)[1])
    assert result["class"].startswith("transformers_modules.") and result["class"].endswith("PMNERPipeline")

    pipe = PMNERPipeline(model=saved["model"], processor=saved["processor"], device="cpu")
    expected_text = pipe(text, return_words=True)
    expected_image = pipe(text, image=Image.open(photo).convert("RGB"), return_words=True)
    scores = lambda answer: [word["score"] for word in answer["words"]]  # noqa: E731
    assert scores(result["text"]) == pytest.approx(scores(expected_text), rel=1e-4)
    assert scores(result["image"]) == pytest.approx(scores(expected_image), rel=1e-4)
    assert scores(result["image"]) != pytest.approx(scores(result["text"]), rel=1e-4)  # the image was used
    assert scores(result["words"]) == pytest.approx(scores(expected_image), rel=1e-4)  # words: the same tweet
    assert result["entities"] == json.loads(json.dumps(pipe(text, image=Image.open(photo).convert("RGB"))))

    errors = {name: result[name] for name in requests if name not in ("text", "image", "words", "entities")}
    for name, answer in errors.items():
        assert set(answer) == {"error"}, (name, answer)
    assert '"inputs"' in errors["no_inputs"]["error"]
    assert "base64" in errors["bad_base64"]["error"]
    assert "not a readable image" in errors["not_an_image"]["error"]
    assert "temperature" in errors["unknown_parameter"]["error"] and "aggregation_strategy" in errors["unknown_parameter"]["error"]
    assert "loudest" in errors["bad_parameter_value"]["error"]
    assert "images" in errors["unknown_key"]["error"]
    assert '"parameters" must be a JSON object' in errors["parameters_not_an_object"]["error"]
    assert "int" in errors["number_inputs"]["error"]
