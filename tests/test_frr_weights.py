"""The FRR weights travel with the processor (issue 10, items 1-3): `save_pretrained` writes the detector and backbone
weights as safetensors with their origin and sha256, `from_pretrained` reads them back from the folder (or a Hub repo)
with no other download, bad folders fail naming the file, and the feature cache is keyed by the weights' checksum.

Small torchvision builders (resnet18, fasterrcnn_mobilenet_v3_large_320_fpn), random weights from seeds, tiny
images."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from fixtures import run_without_project, write_tiny_tokenizer
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoProcessor

from processing_pmner import PMNERImageProcessor, PMNERProcessor
from processing_pmner.frr_models import tensors_sha256


BACKBONE_FILE, DETECTOR_FILE = "frr_backbone.safetensors", "frr_detector.safetensors"


def small_processor(**settings) -> PMNERImageProcessor:
    defaults = dict(detector=None, backbone="resnet18", backbone_weights="random:1", crop_size=32, max_objects=2,
                    max_image_side=64)
    return PMNERImageProcessor(**{**defaults, **settings})


def with_detector(**settings) -> PMNERImageProcessor:
    defaults = dict(
        detector="fasterrcnn_mobilenet_v3_large_320_fpn", detector_weights="random:2",
        detector_kwargs={"min_size": 64, "max_size": 64, "box_score_thresh": 0.0}, score_threshold=0.0, max_objects=3,
    )
    return small_processor(**{**defaults, **settings})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frr-images")
    paths = []
    for index, colour in enumerate([(200, 30, 30), (20, 180, 220)]):
        image = Image.new("RGB", (48, 36), colour)
        ImageDraw.Draw(image).ellipse((8 + index * 6, 6, 30, 28), fill=(250, 250, 20))
        image.save(folder / f"shape{index}.jpg", quality=95)
        paths.append(str(folder / f"shape{index}.jpg"))
    return paths


def config_of(folder, name="preprocessor_config.json") -> dict:
    return json.loads((folder / name).read_text())


def test_weights_settings_are_normalised_at_construction_without_download():
    assert small_processor(backbone_weights="DEFAULT").backbone_weights == "ResNet18_Weights.IMAGENET1K_V1"
    assert small_processor(backbone_weights="IMAGENET1K_V1").backbone_weights == "ResNet18_Weights.IMAGENET1K_V1"
    assert small_processor(backbone_weights="ResNet18_Weights.DEFAULT").backbone_weights == "ResNet18_Weights.IMAGENET1K_V1"
    assert PMNERImageProcessor().backbone_weights == "ResNet152_Weights.IMAGENET1K_V2"  # the defaults, never DEFAULT
    assert PMNERImageProcessor().detector_weights == "FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1"
    assert small_processor(backbone_weights="random").backbone_weights == "random:0"
    with pytest.raises(ValueError, match="ResNet18_Weights weights, not ResNet152_Weights"):
        small_processor(backbone_weights="ResNet152_Weights.IMAGENET1K_V2")
    with pytest.raises(ValueError, match="'random:SEED' with an integer SEED"):
        small_processor(backbone_weights="random:abc")
    with pytest.raises(ValueError, match="frr_weights_dtype"):
        small_processor(frr_weights_dtype="int8")


def test_saved_config_records_origin_file_and_sha256(tmp_path):
    import torchvision

    torch.manual_seed(5)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "my-resnet.pth")
    from_file = small_processor(backbone_weights=str(tmp_path / "my-resnet.pth"))
    from_file.save_pretrained(tmp_path / "file")
    record = config_of(tmp_path / "file")["frr_weights"]
    assert config_of(tmp_path / "file")["backbone_weights"] == "file:my-resnet.pth"  # no local path in the folder
    assert record["backbone"]["origin"] == "file:my-resnet.pth" and record["dtype"] == "float32"
    saved = load_file(tmp_path / "file" / BACKBONE_FILE)
    assert record["backbone"]["sha256"] == tensors_sha256(saved) and "detector" not in record
    expected = {key: value for key, value in torch.load(tmp_path / "my-resnet.pth").items() if not key.startswith("fc.")}
    assert saved.keys() == expected.keys() and all(torch.equal(saved[key], expected[key]) for key in saved)

    seeded = with_detector()
    seeded.save_pretrained(tmp_path / "random")
    record = config_of(tmp_path / "random")["frr_weights"]
    assert record["backbone"]["origin"] == "random:1" and record["detector"]["origin"] == "random:2"
    assert record["detector"]["file"] == DETECTOR_FILE
    assert record["detector"]["sha256"] == tensors_sha256(load_file(tmp_path / "random" / DETECTOR_FILE))
    # the same seed builds the same weights, another seed other weights
    assert tensors_sha256(load_file(tmp_path / "random" / BACKBONE_FILE)) == tensors_sha256(
        small_processor(backbone_weights="random:1").load_models("cpu")._backbone_module.state_dict()
    )
    assert small_processor(backbone_weights="random:9").weights_sha256("backbone") != record["backbone"]["sha256"]

    # torchvision weights are recorded by their full name (offline here: the module the download would give is
    # put in place by hand, as load_models would)
    pretrained = small_processor(backbone_weights="DEFAULT")
    pretrained._backbone_module = small_processor().load_models("cpu")._backbone_module
    pretrained.save_pretrained(tmp_path / "torchvision")
    assert config_of(tmp_path / "torchvision")["backbone_weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert config_of(tmp_path / "torchvision")["frr_weights"]["backbone"]["origin"] == "ResNet18_Weights.IMAGENET1K_V1"


def test_save_then_load_gives_identical_features_with_a_detector(images, tmp_path):
    processor = with_detector()
    expected = processor(images, return_boxes=True)
    assert expected["visual_mask"].all()  # threshold 0: random detections fill every slot
    processor.save_pretrained(tmp_path / "saved")
    loaded = AutoImageProcessor.from_pretrained(tmp_path / "saved")
    assert not loaded.models_built  # still lazy
    assert loaded.to_dict() == processor.to_dict()
    output = loaded(images, return_boxes=True)
    for key in ("visual_features", "visual_mask", "visual_boxes"):
        assert torch.equal(output[key], expected[key]), key
    assert loaded.fingerprint() == processor.fingerprint()


REMOTE_SCRIPT = """
import json
from transformers import AutoProcessor
processor = AutoProcessor.from_pretrained({folder!r}, trust_remote_code=True)
image_processor = processor.image_processor
assert not image_processor.models_built
output = processor([["a", "b"], ["c"]], images={images!r})
print(json.dumps({{"class": type(image_processor).__module__, "features": output["visual_features"].tolist(),
                  "mask": output["visual_mask"].tolist(), "files": sorted(image_processor._weights_files)}}))
"""


def test_save_then_load_in_a_fresh_process_without_the_project(images, tmp_path):
    import torchvision

    torch.manual_seed(3)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    image_processor = small_processor(backbone_weights=str(tmp_path / "resnet18.pth"))
    processor = PMNERProcessor(image_processor, write_tiny_tokenizer(tmp_path / "tokenizer"))
    expected = processor([["a", "b"], ["c"]], images=images)
    processor.save_pretrained(tmp_path / "saved")
    assert {BACKBONE_FILE, "frr_models.py", "image_loading.py", "feature_cache.py"} <= set(os.listdir(tmp_path / "saved"))
    folder = tmp_path / "elsewhere" / "model"
    shutil.copytree(tmp_path / "saved", folder)
    os.remove(tmp_path / "resnet18.pth")  # the user's file is gone: the folder alone must do

    result = run_without_project(REMOTE_SCRIPT.format(folder=str(folder), images=images), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["class"].startswith("transformers_modules") and remote["files"] == ["backbone"]
    assert remote["mask"] == expected["visual_mask"].tolist()
    np.testing.assert_array_equal(np.asarray(remote["features"], dtype=np.float32), expected["visual_features"].numpy())


def test_missing_truncated_or_altered_weights_fail_naming_the_file(images, tmp_path):
    small_processor().save_pretrained(tmp_path / "saved")

    missing = tmp_path / "missing"
    shutil.copytree(tmp_path / "saved", missing)
    os.remove(missing / BACKBONE_FILE)
    with pytest.raises(OSError, match=f"{BACKBONE_FILE} is missing from {missing}"):
        AutoImageProcessor.from_pretrained(missing)

    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "saved", truncated)
    data = (truncated / BACKBONE_FILE).read_bytes()
    (truncated / BACKBONE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=f"{truncated / BACKBONE_FILE} is truncated"):
        AutoImageProcessor.from_pretrained(truncated)

    altered = tmp_path / "altered"
    shutil.copytree(tmp_path / "saved", altered)
    data = bytearray((altered / BACKBONE_FILE).read_bytes())
    data[-3] ^= 0x55  # one byte of the last tensor: same size, other weights
    (altered / BACKBONE_FILE).write_bytes(bytes(data))
    loaded = AutoImageProcessor.from_pretrained(altered)  # cheap checks pass; the checksum is checked on first use
    with pytest.raises(ValueError, match=f"{altered / BACKBONE_FILE} has sha256 .* but the processor config records"):
        loaded(images[0])
    assert not loaded.models_built  # no fallback to other weights

    relabelled = tmp_path / "relabelled"
    shutil.copytree(tmp_path / "saved", relabelled)
    config = config_of(relabelled)
    config["frr_weights"]["backbone"]["sha256"] = "0" * 64
    (relabelled / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{relabelled / BACKBONE_FILE} has sha256"):
        AutoImageProcessor.from_pretrained(relabelled).load_models("cpu")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_load_as_float32_with_close_features(images, tmp_path, dtype):
    full = small_processor()
    full.save_pretrained(tmp_path / "float32")
    half = small_processor(frr_weights_dtype=dtype)
    half.save_pretrained(tmp_path / dtype)
    stored = load_file(tmp_path / dtype / BACKBONE_FILE)
    assert {str(tensor.dtype) for tensor in stored.values() if tensor.is_floating_point()} == {f"torch.{dtype}"}
    ratio = os.path.getsize(tmp_path / dtype / BACKBONE_FILE) / os.path.getsize(tmp_path / "float32" / BACKBONE_FILE)
    assert 0.49 < ratio < 0.51
    loaded = AutoImageProcessor.from_pretrained(tmp_path / dtype)
    assert config_of(tmp_path / dtype)["frr_weights"]["dtype"] == dtype
    expected = full(images)["visual_features"]
    output = loaded(images)["visual_features"]
    assert next(loaded._backbone_module.parameters()).dtype == torch.float32
    assert not torch.equal(output, expected)
    scale = expected.abs().max()
    assert (output - expected).abs().max() < 0.05 * scale
    # other stored weights, another cache
    assert loaded.fingerprint() != full.fingerprint()
    assert AutoImageProcessor.from_pretrained(tmp_path / "float32").fingerprint() == full.fingerprint()


def test_cache_fingerprint_follows_the_weights_checksum(images, tmp_path):
    import datasets

    first, second, again = (small_processor(backbone_weights=f"random:{seed}") for seed in (1, 2, 1))
    assert first.fingerprint() != second.fingerprint()
    assert first.fingerprint() == again.fingerprint()
    dataset = datasets.Dataset.from_dict({"image_id": ["a", "b"], "image": images})
    out_first = first.extract_dataset_features(dataset, cache_dir=tmp_path / "cache", progress=False)
    out_second = second.extract_dataset_features(dataset, cache_dir=tmp_path / "cache", progress=False)
    assert len(os.listdir(tmp_path / "cache")) == 2  # the second run never reads the first run's features
    assert not np.allclose(np.asarray(out_first["visual_features"]), np.asarray(out_second["visual_features"]))
    # the checksum is computed once per weights, not per call
    calls = []
    original = first._backbone_module.state_dict
    first._backbone_module.state_dict = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    first.fingerprint()
    first.fingerprint()
    assert calls == []


def test_text_only_processor_saves_no_weights_and_injected_modules_are_refused(tmp_path):
    text_only = PMNERProcessor(small_processor(save_frr_weights=False), write_tiny_tokenizer(tmp_path / "tokenizer"))
    text_only.save_pretrained(tmp_path / "text")
    files = set(os.listdir(tmp_path / "text"))
    assert not {BACKBONE_FILE, DETECTOR_FILE} & files
    assert config_of(tmp_path / "text", "processor_config.json")["image_processor"]["frr_weights"] is None
    loaded = AutoProcessor.from_pretrained(tmp_path / "text")
    assert not loaded.image_processor.models_built and loaded.image_processor._weights_files == {}

    injected = small_processor()
    injected.set_modules(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), feature_dim=3)
    with pytest.raises(ValueError, match="set_modules.*save_frr_weights=False"):
        injected.save_pretrained(tmp_path / "injected")


def test_none_weights_are_a_clear_error_pointing_at_random(images, tmp_path):
    processor = small_processor(backbone_weights=None)  # constructing is fine (e.g. a text-only model's settings)
    with pytest.raises(ValueError, match=r"backbone_weights=None: .*backbone_weights='random' \(or 'random:SEED'\)"):
        processor(images[0])
    with pytest.raises(ValueError, match="backbone_weights=None"):
        processor.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="detector_weights=None"):
        with_detector(detector_weights=None).load_models("cpu")
    assert not os.path.exists(tmp_path / "saved" / BACKBONE_FILE)
    # detector=None still means no detector: the whole image is the only object
    assert small_processor(detector=None)(images[0])["visual_mask"].tolist() == [[True, False]]


HUB_SCRIPT = """
import json, os
from transformers import AutoImageProcessor
result = {{}}
for name, revision in (("main", None), ("first", {first!r})):
    kwargs = {{"revision": revision}} if revision else {{}}
    processor = AutoImageProcessor.from_pretrained("user/frr", trust_remote_code=True, cache_dir={cache!r}, **kwargs)
    result[name] = {{"features": processor({images!r})["visual_features"].tolist(),
                    "files": {{k: os.path.relpath(v, {cache!r}) for k, v in processor._weights_files.items()}}}}
print("RESULT " + json.dumps(result))
"""


def test_weights_come_from_the_hub_repo_at_the_requested_revision(hub_server, images, tmp_path):
    expected = {}
    commits = {}
    for seed in (1, 2):
        processor = small_processor(backbone_weights=f"random:{seed}")
        expected[seed] = processor(images)["visual_features"]
        processor.save_pretrained(tmp_path / f"seed{seed}")
        api = hub_server.api()
        api.create_repo("user/frr", exist_ok=True)
        commits[seed] = api.upload_folder(folder_path=str(tmp_path / f"seed{seed}"), repo_id="user/frr").oid
    cache = str(tmp_path / "cache")
    script = HUB_SCRIPT.format(first=commits[1], cache=cache, images=images)
    result = run_without_project(script, tmp_path, env=hub_server.env())
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads([line for line in result.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    np.testing.assert_array_equal(np.asarray(remote["main"]["features"], dtype=np.float32), expected[2].numpy())
    np.testing.assert_array_equal(np.asarray(remote["first"]["features"], dtype=np.float32), expected[1].numpy())
    assert remote["main"]["files"]["backbone"].endswith(BACKBONE_FILE)
    assert commits[1] in remote["first"]["files"]["backbone"]  # the snapshot of that revision, in cache_dir
    resolved = [request for request in hub_server.server.requests if BACKBONE_FILE in request]
    assert any(f"/resolve/{commits[1]}/" in request for request in resolved)
