"""Writes `tests/support/old_folder.zip`: a tiny visual P-MNER model folder saved by the code of the commit that ran
this script (its remote code included, zipped so that the old code is never edited, linted or run in place), with
`old_folder_expected.json`, what that code predicted for it. `tests/processing/test_saved_folder_compat.py` loads
the folder with today's code and checks the same predictions.

Run from the repository root, once, by the code whose format is to be kept: `python tests/support/make_old_folder.py`.
The folder is small: a 2-layer BERT of width 32 and a ShuffleNetV2 x0.5 backbone (its 0.34 M weights in bfloat16),
no detector (the whole image is the one object)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # tests/, where fixtures.py was when this ran
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from fixtures import write_tiny_masked_lm, write_unrebuildable_weights  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from modeling_pmner import PMNERForTokenClassification  # noqa: E402
from processing_pmner import PMNERImageProcessor, PMNERProcessor  # noqa: E402
from processing_pmner.pipeline_pmner import PMNERPipeline, add_pipeline_to_folder  # noqa: E402

FOLDER = os.path.join(HERE, "old_folder")  # zipped into old_folder.zip, then removed
TEXTS = ["trump visits london today", "rt @user : apple meets obama in paris", "the nba festival vote"]


def image(path: str) -> str:
    picture = Image.new("RGB", (40, 30), (200, 30, 30))
    for x in range(10, 30):
        for y in range(5, 20):
            picture.putpixel((x, y), (20, 40 + 5 * y, 220 - 4 * x))
    picture.save(path)
    return path


def predictions(pipe, processor, model, photo) -> dict:
    batch = processor([text.split() for text in TEXTS], images=[photo] * len(TEXTS))
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits
    return {
        "texts": TEXTS,
        "image": os.path.basename(photo),
        "visual_features": batch["visual_features"][0].tolist(),
        "logits": logits.tolist(),
        "pipeline_with_image": [pipe(text, image=photo) for text in TEXTS],
        "pipeline_text_only": [pipe(text) for text in TEXTS],
    }


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    shutil.rmtree(FOLDER, ignore_errors=True)
    with tempfile.TemporaryDirectory() as scratch:
        text_model = write_tiny_masked_lm(os.path.join(scratch, "tiny-bert"), seed=3)
        weights = write_unrebuildable_weights(os.path.join(scratch, "shufflenet.safetensors"), builder="shufflenet_v2_x0_5", seed=5)
        torch.manual_seed(7)
        model = PMNERForTokenClassification.from_text_pretrained(
            text_model, fusion_num_heads=4, visual_feature_dim=1024, max_objects=2,
        ).eval()
        image_processor = PMNERImageProcessor(
            detector=None, backbone="shufflenet_v2_x0_5", backbone_weights=weights, crop_size=32, max_objects=2,
            frr_weights_dtype="bfloat16",
        )
        labels = [model.config.id2label[index] for index in range(model.config.num_labels)]
        processor = PMNERProcessor(image_processor, AutoTokenizer.from_pretrained(text_model), label_names=labels, max_length=32)
        model.save_pretrained(FOLDER)
        processor.save_pretrained(FOLDER)
        add_pipeline_to_folder(FOLDER)
    # predictions of the saved folder as this commit's classes read it back (bfloat16 FRR weights included)
    model = PMNERForTokenClassification.from_pretrained(FOLDER).eval()
    processor = PMNERProcessor.from_pretrained(FOLDER)
    pipe = PMNERPipeline(model=model, processor=processor, device="cpu")
    photo = image(os.path.join(HERE, "old_folder_photo.png"))
    expected = predictions(pipe, processor, model, photo)
    expected["written_by_commit"] = commit
    with open(os.path.join(HERE, "old_folder_expected.json"), "w", encoding="utf-8") as handle:
        json.dump(expected, handle, indent=1)
        handle.write("\n")
    entities = sum(len(found) for found in expected["pipeline_with_image"])
    names = sorted(os.listdir(FOLDER))
    with zipfile.ZipFile(FOLDER + ".zip", "w", zipfile.ZIP_DEFLATED) as archive:
        for name in names:  # fixed dates and modes: the same folder gives the same zip
            info = zipfile.ZipInfo(f"old_folder/{name}", date_time=(2026, 12, 7, 0, 0, 0))
            info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
            with open(os.path.join(FOLDER, name), "rb") as handle:
                archive.writestr(info, handle.read())
    shutil.rmtree(FOLDER)
    print(f"{FOLDER}.zip: {names}; {entities} entities predicted with the image")


if __name__ == "__main__":
    main()
