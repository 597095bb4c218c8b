"""The FRR readings of `feature_layer` (ResNet's pooled layer3 instead of layer4) and `grid_size` (the whole image as
g x g regions pooled from one feature map): features checked against the backbone's own modules run by hand, the
settings' checks, the cache fingerprint, save/load, and train_pmner.py's flags.

resnet18 with random weights from a seed (layer3: 256 channels, layer4: 512), small images and crops."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from fixtures import ENV, PROJECT, stderr_lines, write_training_workspace
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

from processing_pmner import PMNERImageProcessor
from processing_pmner.image_processing_pmner import GRID_CELL_LABEL


STEM_AND_STAGES = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]


def processor(**settings) -> PMNERImageProcessor:
    defaults = dict(detector=None, backbone="resnet18", backbone_weights="random:0", crop_size=64, max_objects=1)
    return PMNERImageProcessor(**{**defaults, **settings})


def noise_image(seed: int, size=(90, 60)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def images():
    return [noise_image(0), noise_image(1, size=(70, 84))]


def hand_crop(image: Image.Image, frr: PMNERImageProcessor) -> torch.Tensor:
    """The whole image as the backbone sees it: resized to the crop size, in [0, 1], normalised (1, 3, S, S)."""
    size = frr.preprocessing["crop_size"]
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().unsqueeze(0) / 255.0  # (1, 3, H, W)
    crop = tvF.resize(pixels, [size, size], interpolation=frr.preprocessing["interpolation"], antialias=True).clamp(0, 1)
    mean = torch.tensor(frr.preprocessing["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(frr.preprocessing["std"]).view(1, 3, 1, 1)
    return (crop - mean) / std


def hand_feature_map(frr: PMNERImageProcessor, crop: torch.Tensor, layer: str) -> torch.Tensor:
    """The backbone's modules run one by one up to `layer`: (1, C, h, w)."""
    backbone = frr.load_models("cpu")._backbone_module
    features = crop
    with torch.no_grad():
        for name in STEM_AND_STAGES[: STEM_AND_STAGES.index(layer) + 1]:
            features = getattr(backbone, name)(features)
    return features


def test_layer3_features_are_the_pooled_layer3_of_the_crop(images):
    layer3, layer4 = processor(feature_layer="layer3"), processor()
    assert (layer3.feature_dim, layer4.feature_dim) == (256, 512)
    assert processor(backbone="resnet152", backbone_weights="random", feature_layer="layer3").feature_dim == 1024
    features3 = layer3(images)["visual_features"]  # (2, 1, 256)
    features4 = layer4(images)["visual_features"]  # (2, 1, 512)
    assert features3.shape == (2, 1, 256) and features4.shape == (2, 1, 512)
    for row, image in enumerate(images):
        crop = hand_crop(image, layer3)
        expected3 = hand_feature_map(layer3, crop, "layer3").mean(dim=(2, 3))[0]  # (256,)
        with torch.no_grad():
            expected4 = layer4.load_models("cpu")._backbone_module(crop)[0]  # (512,): the model's own forward
        assert expected3.abs().sum() > 0
        torch.testing.assert_close(features3[row, 0], expected3, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(features4[row, 0], expected4, atol=1e-5, rtol=1e-4)


def test_grid_cells_are_the_adaptive_pool_of_the_feature_map(images):
    # layer4 of a 64 crop is 2 x 2: a 3 x 3 grid has overlapping bins, each the mean of its map rows/columns
    grid = processor(grid_size=3, max_objects=9)
    output = grid(images, return_boxes=True)
    assert output["visual_features"].shape == (2, 9, 512)
    assert output["visual_mask"].dtype == torch.bool and output["visual_mask"].all()
    for row, image in enumerate(images):
        feature_map = hand_feature_map(grid, hand_crop(image, grid), "layer4")[0]  # (512, h, w)
        height, width = feature_map.shape[1:]
        cells = []
        for r in range(3):
            for c in range(3):
                top, bottom = (r * height) // 3, math.ceil((r + 1) * height / 3)
                left, right = (c * width) // 3, math.ceil((c + 1) * width / 3)
                cells.append(feature_map[:, top:bottom, left:right].mean(dim=(1, 2)))
        torch.testing.assert_close(output["visual_features"][row], torch.stack(cells), atol=1e-5, rtol=1e-4)
    # the cells' boxes are the image split evenly, row-major, in the image's own pixels
    assert output["visual_boxes"][0].tolist() == [
        [0.0, 0.0, 30.0, 20.0], [30.0, 0.0, 60.0, 20.0], [60.0, 0.0, 90.0, 20.0],
        [0.0, 20.0, 30.0, 40.0], [30.0, 20.0, 60.0, 40.0], [60.0, 20.0, 90.0, 40.0],
        [0.0, 40.0, 30.0, 60.0], [30.0, 40.0, 60.0, 60.0], [60.0, 40.0, 90.0, 60.0],
    ]
    assert (output["visual_labels"] == GRID_CELL_LABEL).all() and torch.isnan(output["visual_scores"]).all()
    assert grid.label_name(GRID_CELL_LABEL) == "grid cell"


@pytest.mark.parametrize("layer", ["layer3", "layer4"])
def test_mean_of_grid_cells_is_the_pooled_whole_image(images, layer):
    # a 64 crop gives a 4 x 4 layer3 map and a 2 x 2 layer4 map: a 2 x 2 grid splits both evenly
    cells = processor(feature_layer=layer, grid_size=2, max_objects=4)(images)["visual_features"]  # (2, 4, D)
    whole = processor(feature_layer=layer)(images)["visual_features"]  # (2, 1, D)
    assert not torch.allclose(cells[:, 0], cells[:, 1])  # the cells are regions, not copies of the whole
    torch.testing.assert_close(cells.mean(dim=1), whole[:, 0], atol=1e-5, rtol=1e-4)


def test_fingerprint_follows_feature_layer_and_grid_size():
    fingerprints = {
        "layer4": processor(max_objects=4).fingerprint(),
        "layer3": processor(max_objects=4, feature_layer="layer3").fingerprint(),
        "grid": processor(max_objects=4, grid_size=2).fingerprint(),
        "grid layer3": processor(max_objects=4, grid_size=2, feature_layer="layer3").fingerprint(),
    }
    assert len(set(fingerprints.values())) == len(fingerprints), fingerprints
    assert processor(max_objects=4, feature_layer="layer3").fingerprint() == fingerprints["layer3"]


def test_fingerprints_of_earlier_settings_stay_as_they_were():
    # the values the code gave before feature_layer and grid_size existed: a new setting must leave them alone, or
    # every existing feature cache would be recomputed
    base = dict(detector=None, backbone="resnet18", backbone_weights="random:0")
    assert PMNERImageProcessor(**base).fingerprint() == "3877ce48eebf3570"
    varied = dict(base, crop_size=64, max_objects=3, score_threshold=0.5, max_image_side=640)
    assert PMNERImageProcessor(**varied).fingerprint() == "48043bdea932d51c"
    detector = dict(
        base, detector="fasterrcnn_mobilenet_v3_large_320_fpn", detector_weights="random:0",
        detector_kwargs={"min_size": 128}, add_whole_image=False,
    )
    assert PMNERImageProcessor(**detector).fingerprint() == "340c90b6df7a4d6c"


def test_a_grid_needs_no_whole_image_filler(images):
    # the cells are the objects: add_whole_image=False is accepted and changes nothing in the features
    without = processor(grid_size=2, max_objects=4, add_whole_image=False)(images)
    with_filler = processor(grid_size=2, max_objects=4)(images)
    assert without["visual_mask"].all()
    assert torch.equal(without["visual_features"], with_filler["visual_features"])
    with pytest.raises(ValueError, match=re.escape("detector=None needs add_whole_image=True")):
        processor(add_whole_image=False)


def test_save_and_load_keep_both_settings_and_the_features(images, tmp_path):
    frr = processor(feature_layer="layer3", grid_size=2, max_objects=4)
    expected = frr(images)["visual_features"]
    frr.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["feature_layer"] == "layer3" and saved["grid_size"] == 2
    loaded = PMNERImageProcessor.from_pretrained(tmp_path)
    assert (loaded.feature_layer, loaded.grid_size, loaded.feature_dim) == ("layer3", 2, 256)
    assert loaded.fingerprint() == frr.fingerprint()
    assert torch.equal(loaded(images)["visual_features"], expected)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(feature_layer="layer9"), "feature_layer must be one of ('layer3', 'layer4'), got 'layer9'"),
        (dict(grid_size=0), "grid_size must be None or an integer >= 1, got 0"),
        (dict(grid_size=2.5, max_objects=4), "grid_size must be None or an integer >= 1, got 2.5"),
        (dict(grid_size=3, max_objects=5), "grid_size=3 needs max_objects=9 (got 5) and detector=None (got None)"),
        (
            dict(grid_size=2, max_objects=4, detector="fasterrcnn_mobilenet_v3_large_320_fpn", detector_weights="random"),
            "grid_size=2 needs max_objects=4 (got 4) and detector=None (got 'fasterrcnn_mobilenet_v3_large_320_fpn')",
        ),
        (
            dict(backbone="regnet_y_400mf", grid_size=2, max_objects=4),
            "grid_size=2 reads the ResNet stages (layer1 .. layer4) of the backbone; backbone='regnet_y_400mf' has none",
        ),
        (
            dict(backbone="googlenet", feature_layer="layer3"),
            "feature_layer='layer3' reads the ResNet stages (layer1 .. layer4) of the backbone; backbone='googlenet' "
            "has none",
        ),
    ],
    ids=[
        "feature_layer", "grid_size zero", "grid_size float", "grid_size objects", "grid_size detector",
        "grid_size regnet", "feature_layer googlenet",
    ],
)
def test_bad_settings_name_the_setting(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        processor(**settings)


def test_an_injected_backbone_without_resnet_stages_is_refused_naming_feature_layer(images):
    frr = processor(feature_layer="layer3")
    frr.set_modules(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), feature_dim=3)
    with pytest.raises(ValueError, match=r"feature_layer='layer3' reads the ResNet stages .* has no \['conv1'"):
        frr(images)


# -- train_pmner.py ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_training_workspace(tmp_path_factory.mktemp("feature-layers"), sizes=(8, 4, 4), with_images=True)


def run_train(workspace, name, *extra):
    command = [
        sys.executable, os.path.join(PROJECT, "train_pmner.py"),
        "--dataset_name", "twitter2017", "--data_dir", str(workspace / "data"),
        "--text_model_name_or_path", str(workspace / "tiny-bert"), "--fusion_num_heads", "4",
        "--do_train", "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--use_cpu",
        "--report_to", "none", "--output_dir", str(workspace / name),
        "--image_dir", str(workspace / "images"), "--detector", "none", "--backbone", "resnet18",
        "--backbone_weights", "random:0", "--crop_size", "64", *extra,
    ]
    env = dict(os.environ, HF_HOME=str(workspace / "hf-home"), OMP_NUM_THREADS="1", **ENV)
    return subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--feature_layer", "layer9"], "feature_layer must be one of ('layer3', 'layer4'), got 'layer9'"),
        (["--grid_size", "2"], "grid_size=2 needs max_objects=4 (got 5) and detector=None (got None): the grid cells "
                               "are the objects"),
        (
            ["--backbone", "regnet_y_400mf", "--grid_size", "2", "--max_objects", "4"],
            "grid_size=2 reads the ResNet stages (layer1 .. layer4) of the backbone; backbone='regnet_y_400mf' has "
            "none: use a ResNet (resnet18 .. resnet152, resnext*, wide_resnet*)",
        ),
    ],
    ids=["feature_layer", "grid_size", "grid_size non-ResNet backbone"],
)
def test_train_pmner_refuses_bad_flags_in_one_line(workspace, flags, message):
    result = run_train(workspace, "refused", *flags)
    assert result.returncode == 2, result.stderr[-3000:]
    assert stderr_lines(result.stderr) == [f"train_pmner.py: error: {message}"], result.stderr[-3000:]


def test_train_pmner_grid_run_gives_the_model_the_layer_width(workspace):
    result = run_train(workspace, "grid", "--feature_layer", "layer3", "--grid_size", "2", "--max_objects", "4")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    config = json.loads((workspace / "grid" / "config.json").read_text())
    assert config["visual_feature_dim"] == 256 and config["max_objects"] == 4
    saved = json.loads((workspace / "grid" / "processor_config.json").read_text())["image_processor"]
    assert saved["feature_layer"] == "layer3" and saved["grid_size"] == 2
    # a grid has no detector: its statistics count cells, never detections or whole-image fallbacks
    results = json.loads((workspace / "grid" / "all_results.json").read_text())
    assert results["visual_train_grid_cells"] == 4 and results["visual_train_mean_objects_per_image"] == 4
    assert not [key for key in results if "share_with_object" in key or "whole_image_fallbacks" in key], results
    assert "no object detected" not in result.stderr
    card = (workspace / "grid" / "README.md").read_text()
    assert "detector: none (the whole image as a 2 x 2 grid of regions)" in card
    assert "no detector: the whole image as a 2 x 2 grid (4 regions)" in card and "the only object" not in card


def test_train_pmner_resume_keeps_the_checkpoint_features(workspace):
    first = run_train(workspace, "resume", "--max_objects", "4", "--save_strategy", "epoch")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    checkpoint = workspace / "resume" / "checkpoint-1"
    assert (checkpoint / "processor_config.json").is_file()
    # same width and object count (the model fits), other features: refused before any training
    refused = run_train(workspace, "resume", "--grid_size", "2", "--max_objects", "4", "--num_train_epochs", "2")
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-4000:]
    assert stderr_lines(refused.stderr) == [
        f"train_pmner.py: error: checkpoint {checkpoint} was trained on the features of grid_size=None; this run asks "
        "for grid_size=2 (use the same FRR settings, or another --output_dir to start over)"
    ]
    refused = run_train(workspace, "resume", "--max_objects", "4", "--num_train_epochs", "2", "--crop_size", "32")
    assert refused.returncode == 2 and "crop_size=64; this run asks for crop_size=32" in refused.stderr
    # the same settings resume
    resumed = run_train(workspace, "resume", "--max_objects", "4", "--num_train_epochs", "2")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert (workspace / "resume" / "checkpoint-2").is_dir()


def test_a_backbone_that_cannot_be_sized_on_the_meta_device_still_gives_its_pooled_features(images):
    # RegNet's initialisation copies data, which the meta device refuses: its width is read from a real build
    frr = PMNERImageProcessor(detector=None, backbone="regnet_y_400mf", backbone_weights="random:0")
    assert frr.feature_dim == 440
    assert frr(images[:1])["visual_features"].shape == (1, frr.max_objects, 440)
