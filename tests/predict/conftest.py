"""Fixtures shared by the `pmner-predict` tests: a workspace with a tiny saved model that tags every word B-PER, and
an image folder with two photos and a broken file."""

import pytest
from PIL import Image

from fixtures import write_tiny_masked_lm
from pipeline_builders import build_model, build_processor, force_tag, save_folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    text_model = write_tiny_masked_lm(root / "tiny-bert")
    model = force_tag(build_model(text_model), "B-PER")  # every word a PER entity: outputs are predictable
    folder = save_folder(root / "model", model, build_processor(text_model, model))
    images = root / "images"
    images.mkdir()
    for name, color in (("17_06_1", (250, 0, 0)), ("17_06_2", (0, 250, 0))):
        Image.new("RGB", (64, 48), color).save(images / f"{name}.jpg")
    (images / "broken.jpg").write_bytes(b"not an image")
    return {"root": root, "model": folder, "images": str(images)}
