"""The FRR image processor: image reading (modes, orientation, bad files), detection and crop selection, the
torchvision builders, local backbone weights, and dataset feature extraction with its cache, in one process and two.
Offline, tiny models, real image files."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from processing_pmner import BadImageError, BadImageWarning, PMNERImageProcessor, load_image

from processing_builders import MEAN, STD, FixedDetector, MeanColour, colour_of, colour_processor


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
    sys.path.insert(0, {support!r})
    from processing_builders import colour_processor
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
        support=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support"),
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
