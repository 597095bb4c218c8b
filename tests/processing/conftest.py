"""Fixtures shared by the processing tests: real image files of every kind, the tiny tokenizer, and a tiny pipeline
(model, processor and saved folder)."""

import io

import numpy as np
import pytest
from PIL import Image

from fixtures import write_tiny_masked_lm
from pipeline_builders import build_model, build_processor, save_folder
from processing_builders import solid, tiny_tokenizer
from processing_pmner.pipeline_pmner import PMNERPipeline


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Real files of every kind the processor meets."""
    folder = tmp_path_factory.mktemp("images")
    files = {}
    solid((200, 30, 30)).save(folder / "red.jpg", quality=95)
    files["jpeg"] = folder / "red.jpg"
    solid((30, 200, 30)).save(folder / "green.png")
    files["png"] = folder / "green.png"
    # 40x20: left half red, right half blue; EXIF orientation 6 (display rotated 90 degrees clockwise)
    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    rotated.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(folder / "rotated.jpg", exif=exif, quality=95)
    files["exif"] = folder / "rotated.jpg"
    solid(100, mode="L").save(folder / "gray.png")
    files["gray"] = folder / "gray.png"
    solid((10, 20, 30, 0), mode="RGBA").save(folder / "transparent.png")
    files["rgba"] = folder / "transparent.png"
    solid((0, 0, 0, 0), mode="CMYK").save(folder / "cmyk.jpg")  # no ink: white
    files["cmyk"] = folder / "cmyk.jpg"
    sixteen = np.full((24, 32), 32896, dtype=np.uint16)  # 128 in 8 bits
    sixteen[:, 16:] = 65535
    Image.fromarray(sixteen).save(folder / "sixteen.png")
    files["16bit"] = folder / "sixteen.png"
    palette = solid((0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(folder / "palette.png")
    files["palette"] = folder / "palette.png"
    noise = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    (folder / "truncated.jpg").write_bytes(data[: int(len(data) * 0.6)])  # headers intact, scan data cut
    files["truncated"] = folder / "truncated.jpg"
    (folder / "empty.jpg").write_bytes(b"")
    files["empty"] = folder / "empty.jpg"
    (folder / "text.jpg").write_text("this is not an image\n")
    files["text"] = folder / "text.jpg"
    files["missing"] = folder / "no-such-image.jpg"
    solid((250, 250, 0), size=(3000, 2000)).save(folder / "huge.jpg", quality=80)
    files["huge"] = folder / "huge.jpg"
    solid((0, 0, 0), size=(2000, 1500)).save(folder / "bomb.png")
    files["bomb"] = folder / "bomb.png"
    return files


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    text_model = write_tiny_masked_lm(root / "tiny-bert")
    model = build_model(text_model)
    processor = build_processor(text_model, model)
    folder = save_folder(root / "model", model, processor)
    return {"root": root, "text_model": text_model, "model": model, "processor": processor, "folder": folder}


@pytest.fixture(scope="module")
def random_pipe(tiny):
    return PMNERPipeline(model=tiny["model"], processor=tiny["processor"], device="cpu")
