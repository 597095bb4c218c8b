"""Tests of the P-MNER processing: FRR image processor (image reading, detection/crop selection, torchvision builders,
local weights, dataset extraction with its cache, two processes) and the prompt-template processor (tag schemes,
token and cloze modes, windows, decoding, remote-code round trip). Offline, tiny models, real image files."""

import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, BertTokenizer

from modeling_pmner import PMNERConfig, PMNERForTokenClassification
from modeling_pmner.modeling_pmner import resolve_label_word_ids
from processing_pmner import (
    BadImageError,
    BadImageWarning,
    PMNERImageProcessor,
    PMNERProcessor,
    TruncationWarning,
    bio_to_bioes,
    bioes_to_bio,
    load_image,
    window_owner,
    word_windows,
)

from fixtures import run_without_project


WORDS = (
    "the word of is none begin inside end single person location organization miscellaneous other "
    "rt @user # : , . ! ? new york trump apple google obama london paris festival nba vote year "
    "a b c d e f g h i j k l m n o p q r s t u v w x y z"
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS))
VOCAB += [f"##{letter}" for letter in "abcdefghijklmnopqrstuvwxyz"]
BIO = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
BIOES = ["O"] + [f"{p}-{e}" for e in ("PER", "LOC", "ORG", "MISC") for p in "BIES"]
MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def tiny_tokenizer(folder=None) -> BertTokenizer:
    tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(VOCAB)})
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


class MeanColour(torch.nn.Module):
    """Backbone stand-in: a crop's mean normalised colour (N, 3, S, S) -> (N, 3); counts the crops it sees."""

    def __init__(self):
        super().__init__()
        self.crops_seen = 0

    def forward(self, crops):
        self.crops_seen += crops.shape[0]
        return crops.mean(dim=(2, 3))  # (N, 3)


def colour_of(feature: torch.Tensor) -> torch.Tensor:
    """Un-normalises a MeanColour feature to 0-255."""
    return (feature * STD + MEAN) * 255


class FixedDetector(torch.nn.Module):
    """Detector stand-in with the torchvision API: the same boxes and scores for every image."""

    def __init__(self, boxes, scores):
        super().__init__()
        self.boxes = torch.tensor(boxes, dtype=torch.float32)  # (K, 4)
        self.scores = torch.tensor(scores, dtype=torch.float32)  # (K,)

    def forward(self, images):
        return [
            {"boxes": self.boxes.clone(), "scores": self.scores.clone(), "labels": torch.ones(len(self.scores), dtype=torch.long)}
            for _ in images
        ]


def colour_processor(**settings) -> PMNERImageProcessor:
    defaults = dict(detector=None, backbone="resnet18", backbone_weights=None, crop_size=16, max_image_side=256)
    processor = PMNERImageProcessor(**{**defaults, **settings})
    processor.set_modules(backbone=MeanColour(), feature_dim=3)
    return processor


def solid(colour, size=(32, 24), mode="RGB"):
    return Image.new(mode, size, colour)


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


# ----------------------------------------------------------------------------------------------------------------------
# tag schemes and windows
# ----------------------------------------------------------------------------------------------------------------------


def test_bio_bioes_conversion_exact_both_ways():
    bio = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "I-LOC", "O", "B-ORG"]
    bioes = ["B-PER", "E-PER", "O", "S-LOC", "B-LOC", "I-LOC", "E-LOC", "O", "S-ORG"]
    assert bio_to_bioes(bio) == bioes
    assert bioes_to_bio(bioes) == bio
    generator = random.Random(0)
    for _ in range(300):
        tags, previous = [], "O"
        for _ in range(generator.randint(0, 12)):
            choice = generator.choice(["O", "B-PER", "B-LOC", "I"])
            tag = (f"I-{previous[2:]}" if previous != "O" else "O") if choice == "I" else choice
            tags.append(tag)
            previous = tag
        assert bioes_to_bio(bio_to_bioes(tags)) == tags
        converted = bio_to_bioes(tags)
        assert bio_to_bioes(bioes_to_bio(converted)) == converted
    # an I- that starts an entity is read as a beginning (conlleval)
    assert bio_to_bioes(["O", "I-PER", "I-PER", "I-LOC"]) == ["O", "B-PER", "E-PER", "S-LOC"]
    with pytest.raises(ValueError, match="X-PER"):
        bio_to_bioes(["X-PER"])


def test_word_windows_cover_every_word_once_with_overlap():
    counts = [1, 2, 1, 3, 1, 1, 2, 1, 1, 1, 2, 1]
    windows = word_windows(counts, budget=5, stride=2)
    assert windows[0][0] == 0 and windows[-1][1] == len(counts)
    for start, end in windows:
        assert sum(counts[start:end]) <= 5 and end > start
    for (_, end), (start, _) in zip(windows, windows[1:]):
        assert start < end  # overlap
    owners = [window_owner(windows, word, len(counts)) for word in range(len(counts))]
    for word, owner in enumerate(owners):
        assert windows[owner][0] <= word < windows[owner][1]
    assert owners == sorted(owners)


# ----------------------------------------------------------------------------------------------------------------------
# image reading
# ----------------------------------------------------------------------------------------------------------------------


def test_load_image_modes_orientation_and_size(image_files):
    image, size = load_image(image_files["exif"])
    assert image.mode == "RGB" and image.size == (20, 40) and size == (20, 40)
    top, bottom = np.asarray(image)[2, 10], np.asarray(image)[-3, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red on top after the rotation
    assert tuple(np.asarray(load_image(image_files["gray"])[0])[0, 0]) == (100, 100, 100)
    assert tuple(np.asarray(load_image(image_files["rgba"])[0])[0, 0]) == (255, 255, 255)  # transparent on white
    cmyk = np.asarray(load_image(image_files["cmyk"])[0])
    assert cmyk.shape == (24, 32, 3) and cmyk.min() > 240
    sixteen = np.asarray(load_image(image_files["16bit"])[0])
    assert tuple(sixteen[0, 0]) == (128, 128, 128) and tuple(sixteen[0, -1]) == (255, 255, 255)  # rescaled, not clipped
    assert tuple(np.asarray(load_image(image_files["palette"])[0])[0, 0]) == (0, 0, 255)
    huge, original = load_image(image_files["huge"], max_side=500)
    assert original == (3000, 2000) and max(huge.size) == 500
    with pytest.raises(BadImageError, match="bomb.png.*max_image_pixels=1000000"):
        load_image(image_files["bomb"], max_pixels=1_000_000)
    # arrays: HWC uint8, CHW float, uint16, grayscale, tensors; bytes and datasets dicts
    assert tuple(np.asarray(load_image(np.full((4, 5, 3), 7, np.uint8))[0])[0, 0]) == (7, 7, 7)
    assert tuple(np.asarray(load_image(np.full((3, 4, 5), 0.5, np.float32))[0])[0, 0]) == (128, 128, 128)
    assert tuple(np.asarray(load_image(np.full((4, 5), 65535, np.uint16))[0])[0, 0]) == (255, 255, 255)
    assert load_image(torch.zeros(3, 6, 7, dtype=torch.uint8))[0].size == (7, 6)
    data = image_files["png"].read_bytes()
    assert tuple(np.asarray(load_image(data)[0])[0, 0]) == (30, 200, 30)
    assert tuple(np.asarray(load_image({"path": None, "bytes": data})[0])[0, 0]) == (30, 200, 30)
    assert tuple(np.asarray(load_image({"path": str(image_files["png"]), "bytes": None})[0])[0, 0]) == (30, 200, 30)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated", "truncated.jpg could not be decoded"),
        ("empty", r"empty.jpg is empty \(0 bytes\)"),
        ("text", "text.jpg is not a readable image"),
        ("missing", "no-such-image.jpg does not exist"),
    ],
)
def test_bad_image_files_raise_naming_the_file(image_files, kind, message):
    with pytest.raises(BadImageError, match=message):
        load_image(image_files[kind])


def test_bad_images_blank_with_warning_and_counter_or_error(image_files):
    processor = colour_processor()
    images = [image_files["jpeg"], image_files["truncated"], None, image_files["empty"], image_files["text"],
              image_files["missing"], image_files["png"]]
    with pytest.warns(BadImageWarning) as caught:
        output = processor(images)
    messages = " ".join(str(warning.message) for warning in caught)
    for name in ("truncated.jpg", "empty.jpg", "text.jpg", "no-such-image.jpg"):
        assert name in messages
    assert processor.bad_image_count == 4 and len(caught) == 4  # None is a tweet without image: no warning
    assert output["visual_features"].shape == (7, 5, 3) and output["visual_mask"].dtype == torch.bool
    assert output["visual_mask"][:, 0].tolist() == [True, False, False, False, False, False, True]
    assert not output["visual_mask"][:, 1:].any() and output["visual_features"][1:6].abs().sum() == 0
    torch.testing.assert_close(colour_of(output["visual_features"][6, 0]), torch.tensor([30.0, 200.0, 30.0]), atol=1.5, rtol=0)
    processor.reset_bad_images()
    assert processor.bad_image_count == 0

    strict = colour_processor(on_bad_image="error")
    with pytest.raises(BadImageError, match="text.jpg"):
        strict([image_files["png"], image_files["text"]])
    with pytest.raises(ValueError, match="on_bad_image"):
        PMNERImageProcessor(on_bad_image="skip")


# ----------------------------------------------------------------------------------------------------------------------
# detection, crops, models
# ----------------------------------------------------------------------------------------------------------------------


def quadrant_image() -> Image.Image:
    image = Image.new("RGB", (64, 48), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 32, 24))
    image.paste((0, 255, 0), (32, 0, 64, 24))
    image.paste((0, 0, 255), (0, 24, 32, 48))
    image.paste((255, 255, 255), (32, 24, 64, 48))
    return image


QUADRANTS = [[0, 0, 32, 24], [32, 0, 64, 24], [0, 24, 32, 48], [32, 24, 64, 48]]


def test_first_objects_above_threshold_are_cropped_in_score_order():
    processor = colour_processor(detector="stand-in", max_objects=3)
    # scores: red 0.5 (below), green 0.97, blue 0.99, white 0.96 -> blue, green, white
    processor.set_modules(MeanColour(), 3, detector=FixedDetector(QUADRANTS, [0.5, 0.97, 0.99, 0.96]))
    output = processor(quadrant_image(), return_boxes=True)
    assert output["visual_mask"].tolist() == [[True, True, True]]
    colours = colour_of(output["visual_features"][0])  # (3, 3)
    torch.testing.assert_close(colours, torch.tensor([[0.0, 0.0, 255.0], [0.0, 255.0, 0.0], [255.0, 255.0, 255.0]]), atol=1.0, rtol=0)
    assert output["visual_boxes"][0].tolist() == [QUADRANTS[2], QUADRANTS[1], QUADRANTS[3]]


def test_whole_image_added_when_fewer_objects_pass_and_boxes_in_original_pixels():
    processor = colour_processor(detector="stand-in", max_objects=3, max_image_side=32)
    processor.set_modules(MeanColour(), 3, detector=FixedDetector([[0, 0, 16, 12]], [0.999]))  # red quadrant (downscaled)
    output = processor([quadrant_image()], return_boxes=True)
    assert output["visual_mask"].tolist() == [[True, True, False]]
    colours = colour_of(output["visual_features"][0, :2])
    torch.testing.assert_close(colours[0], torch.tensor([255.0, 0.0, 0.0]), atol=8.0, rtol=0)  # downscaling blurs edges
    torch.testing.assert_close(colours[1], torch.tensor([127.5, 127.5, 127.5]), atol=3.0, rtol=0)  # whole image
    assert output["visual_boxes"][0, :2].tolist() == [[0, 0, 32, 24], [0, 0, 64, 48]]  # original pixels

    without = colour_processor(detector="stand-in", add_whole_image=False)
    without.set_modules(MeanColour(), 3, detector=FixedDetector(QUADRANTS, [0.1, 0.2, 0.3, 0.4]))
    assert not without(quadrant_image())["visual_mask"].any()
    with pytest.raises(ValueError, match="add_whole_image"):
        PMNERImageProcessor(detector=None, add_whole_image=False)


def test_real_torchvision_builders_are_lazy_and_give_the_right_shapes(image_files, tmp_path):
    processor = PMNERImageProcessor(
        detector="fasterrcnn_mobilenet_v3_large_320_fpn",
        detector_weights="random:0",
        detector_kwargs={"min_size": 96, "max_size": 128, "box_score_thresh": 0.0},
        score_threshold=0.0,
        backbone="resnet18",
        backbone_weights="random:0",
        crop_size=32,
        max_objects=4,
        max_image_side=128,
    )
    assert not processor.models_built and processor.feature_dim == 512  # derived without building
    processor.save_pretrained(tmp_path)
    loaded = PMNERImageProcessor.from_pretrained(tmp_path)
    assert not loaded.models_built
    assert loaded.to_dict() == processor.to_dict()
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is PMNERImageProcessor
    torch.manual_seed(0)
    output = loaded([image_files["jpeg"], image_files["exif"]], device="cpu")
    assert loaded.models_built
    assert output["visual_features"].shape == (2, 4, 512) and output["visual_mask"].shape == (2, 4)
    assert output["visual_mask"].all()  # threshold 0: random detections fill every slot
    assert torch.isfinite(output["visual_features"]).all()


def test_backbone_weights_from_local_files(image_files, tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    save_file({key: value.contiguous() for key, value in reference.state_dict().items()}, tmp_path / "resnet18.safetensors")
    outputs = []
    for name in ("resnet18.pth", "resnet18.safetensors"):
        processor = PMNERImageProcessor(detector=None, backbone="resnet18", backbone_weights=str(tmp_path / name), crop_size=32)
        outputs.append(processor(image_files["png"])["visual_features"])
    torch.testing.assert_close(outputs[0], outputs[1])
    reference.fc = torch.nn.Identity()
    crop = torch.nn.functional.interpolate(
        torch.tensor([30.0, 200.0, 30.0]).view(1, 3, 1, 1).expand(1, 3, 32, 32) / 255, size=32
    )
    with torch.no_grad():
        expected = reference((crop - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1))  # (1, 512)
    torch.testing.assert_close(outputs[0][0, 0], expected[0], atol=1e-4, rtol=1e-4)

    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "resnet34.pth")
    wrong = PMNERImageProcessor(detector=None, backbone="resnet18", backbone_weights=str(tmp_path / "resnet34.pth"))
    with pytest.raises(ValueError, match="resnet34.pth"):
        wrong(image_files["png"])
    with pytest.raises(ValueError, match="backbone_weights='IMAGENET9'"):
        PMNERImageProcessor(detector=None, backbone="resnet18", backbone_weights="IMAGENET9")(image_files["png"])


# ----------------------------------------------------------------------------------------------------------------------
# datasets extraction and cache
# ----------------------------------------------------------------------------------------------------------------------


def test_extract_dataset_features_computes_each_image_once_and_reads_the_cache(image_files, tmp_path):
    import datasets

    rows = {
        "image_id": ["red", "green", "red", "gray", "broken", "green"],
        "image": [str(image_files[k]) for k in ("jpeg", "png", "jpeg", "gray", "text", "png")],
        "words": [["a"], ["b"], ["c"], ["d"], ["e"], ["f"]],
    }
    dataset = datasets.Dataset.from_dict(rows)
    processor = colour_processor(batch_size=2)
    with pytest.warns(BadImageWarning, match="text.jpg"):
        result = processor.extract_dataset_features(dataset, cache_dir=tmp_path / "cache", progress=False)
    assert processor._backbone_module.crops_seen == 3  # red, green, gray: once each; the broken one not at all
    assert result.column_names == ["image_id", "image", "words", "visual_features", "visual_mask"]
    table = result.with_format("torch")[:]
    features, masks = table["visual_features"], table["visual_mask"]  # (6, 5, 3), (6, 5)
    assert features.shape == (6, 5, 3) and masks.shape == (6, 5)
    assert masks[:, 0].tolist() == [True, True, True, True, False, True] and not masks[:, 1:].any()
    torch.testing.assert_close(features[0], features[2])
    torch.testing.assert_close(colour_of(features[1, 0]), torch.tensor([30.0, 200.0, 30.0]), atol=1.5, rtol=0)
    direct = processor([image_files["gray"]])["visual_features"][0]
    torch.testing.assert_close(features[3], direct)

    again = colour_processor()
    with pytest.warns(BadImageWarning, match="text.jpg"):  # bad images are not cached: tried again, warned again
        second = again.extract_dataset_features(dataset, cache_dir=tmp_path / "cache", progress=False)
    assert again._backbone_module.crops_seen == 0
    assert np.array_equal(np.asarray(second[:]["visual_features"]), np.asarray(result[:]["visual_features"]))
    assert len(processor.feature_cache(tmp_path / "cache").load()) == 3

    # datasets.Image column, keyed by content: two files with the same bytes are one image
    shutil.copy(image_files["png"], tmp_path / "green-copy.png")
    images = datasets.Dataset.from_dict(
        {"image": [str(image_files["png"]), str(tmp_path / "green-copy.png"), str(image_files["exif"])]}
    ).cast_column("image", datasets.Image())
    third = colour_processor()
    out = third.extract_dataset_features(images, key_column=None, cache_dir=tmp_path / "cache2", progress=False)
    assert third._backbone_module.crops_seen == 2
    assert np.asarray(out[:]["visual_mask"])[:, 0].all()
    # other settings, other cache folder
    assert colour_processor(max_objects=4).fingerprint() != colour_processor().fingerprint()


DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch, datasets
    sys.path.insert(0, {tests!r})
    from test_processing_pmner import colour_processor
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    dataset = datasets.Dataset.from_dict({{"image_id": {ids!r}, "image": {paths!r}}})
    processor = colour_processor(batch_size=1)
    result = processor.extract_dataset_features(dataset, cache_dir={cache!r}, progress=False)
    with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as handle:
        json.dump({{"crops": processor._backbone_module.crops_seen,
                   "features": result.with_format("numpy")[:]["visual_features"].tolist()}}, handle)
    torch.distributed.destroy_process_group()
    """
)


def test_extraction_under_two_processes_splits_images_into_one_cache(image_files, tmp_path):
    kinds = ["jpeg", "png", "gray", "rgba", "cmyk", "palette", "jpeg"]
    script = DISTRIBUTED_SCRIPT.format(
        tests=os.path.dirname(os.path.abspath(__file__)),
        ids=kinds,
        paths=[str(image_files[kind]) for kind in kinds],
        cache=str(tmp_path / "cache"),
        out=str(tmp_path),
    )
    (tmp_path / "extract.py").write_text(script)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   HF_DATASETS_CACHE=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
        processes.append(subprocess.Popen([sys.executable, str(tmp_path / "extract.py")], env=env, cwd=tmp_path,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert sorted(result["crops"] for result in results) == [3, 3]  # six distinct images, three each
    assert results[0]["features"] == results[1]["features"]
    shards = os.listdir(next((tmp_path / "cache").iterdir()))
    assert sum(name.startswith("shard-") for name in shards) == 2
    single = colour_processor()(
        [image_files[kind] for kind in kinds]
    )["visual_features"]
    np.testing.assert_allclose(np.asarray(results[0]["features"]), single.numpy(), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# the processor
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def make_processor(tokenizer, **kwargs) -> PMNERProcessor:
    return PMNERProcessor(colour_processor(), tokenizer, **kwargs)


def tiny_model(label_names, feature_dim=3):
    config = PMNERConfig(
        text_config=dict(model_type="bert", vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=4, intermediate_size=37, max_position_embeddings=128),
        visual_feature_dim=feature_dim, max_objects=5, fusion_num_heads=4, fusion_intermediate_size=40,
        id2label=dict(enumerate(label_names)), tag_scheme="BIOES" if "S-PER" in label_names else "BIO",
    )
    config.label_word_ids = resolve_label_word_ids(config.verbalizer, tiny_tokenizer())
    torch.manual_seed(0)
    return PMNERForTokenClassification(config).eval()


def one_hot_logits(batch, num_labels):
    labels = batch["labels"]  # (rows, L)
    logits = torch.zeros(*labels.shape, num_labels)  # (rows, L, labels)
    logits.scatter_(-1, labels.clamp(min=0).unsqueeze(-1), 1.0)
    return logits


SENTENCES = [["trump", "vote", "new", "yorks"], ["rt", "@user", ":", "obama", "!"], ["paris"]]
TAGS = [["B-PER", "O", "B-LOC", "I-LOC"], ["O", "O", "O", "B-PER", "O"], ["B-LOC"]]


def test_token_mode_aligns_labels_to_first_sub_words_and_runs_the_model(tokenizer, image_files):
    processor = make_processor(tokenizer, label_names=BIOES)
    batch = processor(SENTENCES, images=[image_files["jpeg"], None, image_files["png"]], labels=TAGS)
    assert set(batch.keys()) == {"input_ids", "attention_mask", "token_type_ids", "visual_features", "visual_mask", "labels"}
    length = batch["input_ids"].shape[1]
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert tokens[:15] == ["[CLS]", "trump", "vote", "new", "york", "##s", ",", "the", "word", "of", "[MASK]", "is",
                      "[MASK]", ".", "[SEP]"]
    ids = {name: index for index, name in enumerate(BIOES)}
    assert batch["labels"][0].tolist() == [-100, ids["S-PER"], 0, ids["B-LOC"], ids["E-LOC"]] + [-100] * (length - 5)
    assert batch.word_ids(0)[:7] == [None, 0, 1, 2, 3, 3, None]
    assert batch["visual_mask"][:, 0].tolist() == [True, False, True]  # whole-image object; no image: text only
    assert batch["attention_mask"][2].sum() == 11 and batch["labels"][2, 11:].eq(-100).all()
    model = tiny_model(BIOES)
    with torch.no_grad():
        output = model(**batch)
    assert output.logits.shape == (3, length, len(BIOES)) and torch.isfinite(output.loss)
    tags = processor.post_process_token_classification(output, batch)
    assert [len(sentence) for sentence in tags] == [4, 5, 1]
    assert processor.post_process_token_classification(one_hot_logits(batch, len(BIOES)), batch) == TAGS
    assert processor.post_process_token_classification(batch["labels"].clamp(min=0), batch, output_scheme="BIOES")[0] == [
        "S-PER", "O", "B-LOC", "E-LOC"]

    # ids pass through; precomputed features pass through; nothing gives zeros with a false mask
    id_batch = processor(SENTENCES[0], labels=[ids[t] for t in ["S-PER", "O", "B-LOC", "E-LOC"]])
    assert id_batch["labels"].tolist() == batch["labels"][:1, :15].tolist()
    assert id_batch["visual_features"].shape == (1, 5, 3) and not id_batch["visual_mask"].any()
    features = torch.randn(3, 2, 3)
    passed = processor(SENTENCES, visual_features=features, visual_mask=torch.tensor([[1, 0], [1, 1], [0, 0]]))
    torch.testing.assert_close(passed["visual_features"], features)
    assert passed["visual_mask"].tolist() == [[True, False], [True, True], [False, False]]
    with pytest.raises(ValueError, match="B-FOOD"):
        processor(SENTENCES[0], labels=["B-FOOD", "O", "O", "O"])
    with pytest.raises(ValueError, match="4 words but 3 labels"):
        processor(SENTENCES[0], labels=["O", "O", "O"])
    with pytest.raises(ValueError, match="either `images` or precomputed"):
        processor(SENTENCES[0], images=image_files["png"], visual_features=torch.zeros(1, 5, 3))


def test_cloze_mode_one_query_per_word_predicted_at_the_mask(tokenizer):
    processor = make_processor(tokenizer, prompt_mode="cloze", label_names=BIO)
    batch = processor(SENTENCES, labels=TAGS)
    assert batch["input_ids"].shape[0] == 4 + 5 + 1
    assert batch.sample_mapping == [0] * 4 + [1] * 5 + [2]
    assert batch.mapping["query_word"] == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0]
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][3])
    assert tokens[: tokens.index("[SEP]") + 1] == ["[CLS]", "trump", "vote", "new", "york", "##s", ",", "the", "word",
                                                    "of", "york", "##s", "is", "[MASK]", ".", "[SEP]"]
    labelled = batch["labels"] != -100  # (rows, L)
    assert labelled.sum(1).tolist() == [1] * 10
    mask_id = tokenizer.mask_token_id
    assert (batch["input_ids"][labelled] == mask_id).all()
    assert batch["labels"][3, 13].item() == BIO.index("I-LOC")
    assert processor.post_process_token_classification(one_hot_logits(batch, len(BIO)), batch) == TAGS
    model = tiny_model(BIO)
    with torch.no_grad():
        output = model(**batch)
    assert len(processor.post_process_token_classification(output.logits, batch)[1]) == 5
    with pytest.raises(ValueError, match="cloze"):
        make_processor(tokenizer, prompt_mode="cloze", prompt_template="{sentence} is {mask}")


@pytest.mark.parametrize("mode", ["token", "cloze"])
def test_long_sentences_become_windows_and_merge_back(tokenizer, mode):
    generator = random.Random(3)
    vocabulary = ["new", "york", "trump", "apple", "google", "vote", "year", "festival", "yorks", "nba"]
    words = [generator.choice(vocabulary) for _ in range(37)]
    bio = bioes_to_bio(bio_to_bioes([generator.choice(["O", "B-PER", "I-PER", "B-LOC"]) for _ in words]))
    processor = make_processor(tokenizer, prompt_mode=mode, label_names=BIOES, max_length=24, stride=3)
    batch = processor([words, ["paris"]], labels=[bio, ["B-LOC"]], return_mapping=True)
    assert batch["input_ids"].shape[1] <= 24
    assert batch.num_dropped_words == [0, 0]
    windows = [window for window, sample in zip(batch.mapping["windows"], batch.sample_mapping) if sample == 0]
    assert len(set(windows)) > 1
    # every word is predicted in exactly one row, with its label
    predicted = batch["prediction_word_index"][batch["sample_mapping"] == 0]  # (rows0, L)
    assert sorted(predicted[predicted >= 0].tolist()) == list(range(len(words)))
    assert (batch["labels"] != -100).sum().item() == len(words) + 1
    assert processor.post_process_token_classification(one_hot_logits(batch, len(BIOES)), batch) == [bio, ["B-LOC"]]
    # the keys kept by return_mapping are enough to decode (e.g. after datasets.map)
    as_dict = {key: batch[key] for key in ("sample_mapping", "prediction_word_index", "num_words")}
    assert processor.post_process_token_classification(one_hot_logits(batch, len(BIOES)), as_dict) == [bio, ["B-LOC"]]


def test_truncation_reports_dropped_words(tokenizer):
    processor = make_processor(tokenizer, label_names=BIO, max_length=20, overflow="truncate")
    words = ["new"] * 30
    with pytest.warns(TruncationWarning, match=r"sentence 0 .* last 20 of 30 words are dropped"):
        batch = processor([words], labels=[["B-LOC"] + ["I-LOC"] * 29])
    assert batch.num_dropped_words == [20]  # 2 special + 8 template tokens leave 10
    assert batch["input_ids"].shape == (1, 20)
    tags = processor.post_process_token_classification(one_hot_logits(batch, len(BIO)), batch)
    assert tags[0] == ["B-LOC"] + ["I-LOC"] * 9 + ["O"] * 20
    with pytest.raises(ValueError, match="max_length=8 leaves no room"):
        make_processor(tokenizer, max_length=8)


def test_left_padding_keeps_the_mapping_aligned(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    processor = make_processor(tokenizer, label_names=BIO)
    batch = processor(SENTENCES, labels=TAGS)
    assert batch["attention_mask"][2, 0] == 0
    assert processor.post_process_token_classification(one_hot_logits(batch, len(BIO)), batch) == TAGS


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained({folder!r}, trust_remote_code=True)
    assert "transformers_modules" in type(processor).__module__, type(processor).__module__
    assert not processor.image_processor.models_built
    batch = processor({sentences!r}, images={images!r}, labels={tags!r})
    result = {{key: value.tolist() for key, value in batch.items()}}
    result["decoded"] = processor.post_process_token_classification(batch["labels"].clamp(min=0), batch)
    print(json.dumps(result))
    """
)


@pytest.mark.parametrize("mode", ["token", "cloze"])
def test_save_and_load_with_remote_code_in_a_fresh_process(image_files, tmp_path, mode):
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    image_processor = PMNERImageProcessor(
        detector=None, backbone="resnet18", backbone_weights=str(tmp_path / "resnet18.pth"), crop_size=32, max_objects=3
    )
    processor = PMNERProcessor(image_processor, tiny_tokenizer(), prompt_mode=mode, label_names=BIOES, max_length=40)
    saved = tmp_path / "saved"
    processor.save_pretrained(saved)
    files = set(os.listdir(saved))
    siblings = {"text_tag_schemes.py", "text_word_start_spaces.py", "text_windows.py"}  # imported by processing_pmner.py
    assert {"processor_config.json", "processing_pmner.py", "image_processing_pmner.py"} | siblings <= files
    config = json.loads((saved / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_pmner.PMNERProcessor"
    assert config["prompt_mode"] == mode and config["label_names"] == BIOES and config["image_processor"]["max_objects"] == 3

    local = AutoProcessor.from_pretrained(saved)  # registered classes, this process
    assert type(local) is PMNERProcessor and local.label_names == BIOES

    elsewhere = tmp_path / "elsewhere" / "pmner-processor"
    shutil.copytree(saved, elsewhere)
    images = [str(image_files["jpeg"]), str(image_files["exif"]), None]
    expected = processor(SENTENCES, images=images, labels=TAGS)
    os.remove(tmp_path / "resnet18.pth")  # the source file is gone (it was in the remote process's working folder)
    script = REMOTE_SCRIPT.format(folder=str(elsewhere), sentences=SENTENCES, images=images, tags=TAGS)
    result = run_without_project(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels", "visual_mask"):
        assert remote[key] == expected[key].tolist(), key
    np.testing.assert_allclose(np.asarray(remote["visual_features"]), expected["visual_features"].numpy(), atol=1e-5)
    assert remote["decoded"] == TAGS


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("mode", ["token", "cloze"])
def test_no_padding_gives_each_row_its_own_length(side, mode):
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = side
    processor = make_processor(tokenizer, label_names=BIOES, prompt_mode=mode, max_length=20, stride=1)
    sentences = SENTENCES + [["new"] * 15]
    tags = TAGS + [["O"] * 14 + ["B-LOC"]]
    padded = processor(sentences, labels=tags, return_tensors=None, return_mapping=True)
    unpadded = processor(sentences, labels=tags, return_tensors=None, padding=False, return_mapping=True)
    lengths = [sum(mask) for mask in padded["attention_mask"]]
    assert len(set(lengths)) > 1 and [len(row) for row in unpadded["input_ids"]] == lengths
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels", "word_ids", "prediction_word_index"):
        expected = [
            row[len(row) - length :] if side == "left" else row[:length] for row, length in zip(padded[key], lengths)
        ]
        assert unpadded[key] == expected, key
    for key in ("sample_mapping", "num_words", "visual_features", "visual_mask"):
        assert unpadded[key] == padded[key], key
    with pytest.raises(ValueError, match=r"padding=False \('do_not_pad'\) leaves rows of different lengths.*return_tensors=None"):
        processor(sentences, padding=False)
    with pytest.raises(ValueError, match="padding must be"):
        processor(sentences, padding="shortest")


@pytest.mark.parametrize("padding", ["longest", False])
def test_a_cloze_batch_of_empty_tweets_keeps_every_column(padding):
    processor = make_processor(tiny_tokenizer(), label_names=BIO, prompt_mode="cloze")
    tensors = "pt" if padding == "longest" else None
    batch = processor([[], []], labels=[[], []], padding=padding, return_tensors=tensors, return_mapping=True)
    expected = {"input_ids", "attention_mask", "token_type_ids", "labels", "visual_features", "visual_mask",
                "sample_mapping", "word_ids", "prediction_word_index", "num_words"}
    assert set(batch) == expected  # datasets.map needs the same columns from every batch
    assert all(len(batch[key]) == 0 for key in expected)
    if tensors == "pt":
        assert batch["input_ids"].shape == (0, 0)
        assert processor.post_process_token_classification(torch.zeros(0, 0, len(BIO)), batch) == [[], []]


def test_mapping_survives_datasets_map_and_decodes_from_columns(tokenizer):
    import datasets

    processor = make_processor(tokenizer, label_names=BIOES, max_length=20, stride=1)
    raw = datasets.Dataset.from_dict({"tokens": SENTENCES + [["new"] * 15], "tags": TAGS + [["O"] * 14 + ["B-LOC"]]})

    def encode(batch, indices):
        encoding = dict(processor(batch["tokens"], labels=batch["tags"], return_tensors=None, return_mapping=True))
        encoding["sample_mapping"] = [indices[sample] for sample in encoding["sample_mapping"]]
        return encoding

    encoded = raw.map(encode, batched=True, batch_size=2, with_indices=True, remove_columns=raw.column_names)
    assert len(encoded) > len(raw)  # the long sentence became windows
    width = max(len(row) for row in encoded["input_ids"])
    labels = torch.tensor([row + [-100] * (width - len(row)) for row in encoded["labels"]])  # (rows, width)
    mapping = {
        "sample_mapping": encoded["sample_mapping"],
        "prediction_word_index": [row + [-1] * (width - len(row)) for row in encoded["prediction_word_index"]],
        "num_words": encoded["num_words"],
    }
    assert processor.post_process_token_classification(labels.clamp(min=0), mapping) == raw["tags"][:]


# ----------------------------------------------------------------------------------------------------------------------
# Processor and model: the same tags; visual features checked; words encoded as in running text
# ----------------------------------------------------------------------------------------------------------------------


def test_processor_and_model_with_other_labels_or_scheme_raise_naming_both(tokenizer):
    from types import SimpleNamespace

    from processing_pmner.processing_pmner import check_processor_matches_model

    processor = make_processor(tokenizer, label_names=BIO)
    check_processor_matches_model(processor, tiny_model(BIO).config)  # the same: no error
    with pytest.raises(ValueError) as caught:
        check_processor_matches_model(processor, tiny_model(BIOES).config)
    message = str(caught.value)
    assert str(BIO) in message and str(BIOES) in message and "9 tags" in message and "17 tags" in message
    assert "tag scheme BIO differs from the model's BIOES" in message
    reordered = ["O"] + BIO[3:] + BIO[1:3]  # same tags, other ids
    with pytest.raises(ValueError, match="differ from the model's config.id2label"):
        check_processor_matches_model(make_processor(tokenizer, label_names=reordered), tiny_model(BIO).config)
    # a config whose scheme says BIOES over BIO tags (edited by hand): the scheme alone is named
    edited = SimpleNamespace(num_labels=len(BIO), id2label=dict(enumerate(BIO)), tag_scheme="BIOES")
    with pytest.raises(ValueError, match="tag scheme BIO differs from the model's BIOES") as caught:
        check_processor_matches_model(processor, edited)
    assert "differ from the model's config.id2label" not in str(caught.value)


REFUSED_SCRIPT = textwrap.dedent(
    """
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained({matching!r}, trust_remote_code=True)
    assert "transformers_modules" in type(processor).__module__, type(processor).__module__
    print("MATCHING", processor.label_names)
    try:
        AutoProcessor.from_pretrained({edited!r}, trust_remote_code=True)
    except ValueError as error:
        print("REFUSED", error)
    """
)


def saved_model_and_edited_processor(tokenizer, tmp_path):
    """A folder with a 9-tag model and its processor, and a copy whose processor_config.json has 5 of the tags."""
    saved = tmp_path / "saved"
    tiny_model(BIO).save_pretrained(saved)
    PMNERProcessor(colour_processor(save_frr_weights=False), tokenizer, label_names=BIO).save_pretrained(saved)
    edited = tmp_path / "edited"
    shutil.copytree(saved, edited)
    settings = json.loads((edited / "processor_config.json").read_text())
    settings["label_names"] = BIO[:5]
    (edited / "processor_config.json").write_text(json.dumps(settings))
    return saved, edited


def test_a_saved_processor_with_other_labels_than_the_model_beside_it_is_refused_at_load(tokenizer, tmp_path):
    saved, edited = saved_model_and_edited_processor(tokenizer, tmp_path)
    assert AutoProcessor.from_pretrained(saved).label_names == BIO  # the same tags: loads
    for load in (AutoProcessor.from_pretrained, PMNERProcessor.from_pretrained):
        with pytest.raises(ValueError) as caught:
            load(edited)
        message = str(caught.value)
        assert f"label_names (5 tags) {BIO[:5]}" in message and f"config.id2label (9 tags) {BIO}" in message
        assert str(edited) in message
    # remote code in a process without this project (a Hub user's): refused the same way
    result = run_without_project(REFUSED_SCRIPT.format(matching=str(saved), edited=str(edited)), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"MATCHING {BIO}" in result.stdout
    refused = [line for line in result.stdout.splitlines() if line.startswith("REFUSED")]
    assert refused and f"label_names (5 tags) {BIO[:5]}" in refused[0] and f"(9 tags) {BIO}" in refused[0]
    # beside another model type (or no model at all) there is nothing to compare with: it loads
    (edited / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert PMNERProcessor.from_pretrained(edited).label_names == BIO[:5]
    (edited / "config.json").unlink()
    assert PMNERProcessor.from_pretrained(edited).label_names == BIO[:5]


def test_a_hub_repo_whose_processor_has_other_labels_than_its_model_is_refused_at_load(tokenizer, tmp_path, hub_server):
    saved, edited = saved_model_and_edited_processor(tokenizer, tmp_path)
    api = hub_server.api()
    for folder in (saved, edited):
        api.create_repo(f"user/{folder.name}")
        api.upload_folder(folder_path=str(folder), repo_id=f"user/{folder.name}")
    script = REFUSED_SCRIPT.format(matching="user/saved", edited="user/edited")
    result = run_without_project(script, tmp_path, env=hub_server.env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"MATCHING {BIO}" in result.stdout
    refused = [line for line in result.stdout.splitlines() if line.startswith("REFUSED")]
    assert refused and f"label_names (5 tags) {BIO[:5]}" in refused[0] and f"(9 tags) {BIO}" in refused[0]
    assert "config.json of user/edited" in refused[0]


def test_visual_features_from_numpy_and_lists_and_non_finite_rows_refused(tokenizer):
    processor = make_processor(tokenizer)
    features = np.random.default_rng(0).normal(size=(3, 2, 4))  # float64 (batch, objects, D)
    expected = torch.from_numpy(features).float()
    sentences = [["trump"], ["paris", "vote"], ["obama"]]
    for given in (features, list(features), [row.tolist() for row in features], expected.double()):
        batch = processor(sentences, visual_features=given, visual_mask=np.ones((3, 2), dtype=bool))
        assert batch["visual_features"].dtype == torch.float32
        assert torch.allclose(batch["visual_features"], expected)
    single = processor(["trump", "vote"], visual_features=features[0])
    assert torch.allclose(single["visual_features"][0], expected[0])
    for bad in (np.nan, np.inf, -np.inf):
        broken = features.copy()
        broken[1, 1, 2] = bad
        with pytest.raises(ValueError, match=r"visual_features of sentence\(s\) \[1\].*NaN or infinite"):
            processor(sentences, visual_features=broken)
    with pytest.raises(ValueError, match="visual_features must be numbers of one shape"):
        processor(sentences[:2], visual_features=[[[1.0, 2.0]], [[1.0]]])


def test_sentencepiece_without_prefix_space_is_set_right_and_unfixable_tokenizers_warn(caplog, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from processing_pmner.processing_pmner import split_words_match_running_text
    from tokenizer_fixtures import train_unigram

    # Metaspace with prepend_scheme="never": words given one by one lose their "▁" (running text keeps it, from the
    # space before the word); the processor restores it
    backend = Tokenizer(models.Unigram(train_unigram(), unk_id=3))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", mask_token="<mask>", pad_token="<pad>"
    )
    assert not split_words_match_running_text(tokenizer)
    processor = PMNERProcessor(colour_processor(), tokenizer)
    assert split_words_match_running_text(processor.tokenizer)
    assert processor.tokenizer.backend_tokenizer.pre_tokenizer.prepend_scheme == "always"
    assert tokenizer.backend_tokenizer.pre_tokenizer.prepend_scheme == "never"  # the caller's is not changed
    processor.tokenizer.save_pretrained(tmp_path)
    assert split_words_match_running_text(AutoTokenizer.from_pretrained(tmp_path))
    # a tokenizer that joins words in running text (no pre-tokenizer) cannot be set right: said, not hidden
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "[MASK]": 1, "[PAD]": 2}, unk_token="[UNK]"))
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", mask_token="[MASK]", pad_token="[PAD]")
    with caplog.at_level("WARNING"):
        processor = PMNERProcessor(colour_processor(), plain)
    assert "encodes words given one by one differently from running text" in caplog.text
    assert processor.tokenizer is plain
