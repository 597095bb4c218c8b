"""The FRR weights travel with the processor: `save_pretrained` writes the detector and backbone weights as
safetensors with their origin and sha256, `from_pretrained` reads them back from the folder (or a Hub repo) with no
other download, bad folders fail naming the file, and the feature cache is keyed by the weights' checksum.

Small torchvision builders (resnet18, fasterrcnn_mobilenet_v3_large_320_fpn), random weights from seeds, tiny
images."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import AutoProcessor

from fixtures import run_without_project, write_tiny_tokenizer, write_unrebuildable_weights
from processing_pmner import PMNERImageProcessor, PMNERProcessor
from processing_pmner.image_frr_models import tensors_sha256


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


def unrebuildable_processor(folder, **settings) -> PMNERImageProcessor:
    """A processor whose backbone weights come from a perturbed file under `folder`: once saved and the file
    deleted, no setting can rebuild them."""
    return small_processor(backbone_weights=write_unrebuildable_weights(folder / "resnet18.safetensors", seed=3), **settings)


def test_save_then_load_gives_identical_features_with_a_detector(images, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    detector = "fasterrcnn_mobilenet_v3_large_320_fpn"
    processor = with_detector(
        backbone_weights=write_unrebuildable_weights(weights / "resnet18.safetensors", seed=3),
        detector_weights=write_unrebuildable_weights(weights / "detector.safetensors", detector, seed=4, weights_backbone=None),
    )
    expected = processor(images, return_boxes=True)
    assert expected["visual_mask"].all()  # threshold 0: random detections fill every slot
    processor.save_pretrained(tmp_path / "saved")
    shutil.rmtree(weights)  # the source files are gone: only the folder's own weights can do
    loaded = PMNERImageProcessor.from_pretrained(tmp_path / "saved")
    assert not loaded.models_built  # still lazy
    origins = {"backbone_weights": "file:resnet18.safetensors", "detector_weights": "file:detector.safetensors"}
    assert loaded.to_dict() == {**processor.to_dict(), **origins}  # the saved folder names no local path
    output = loaded(images, return_boxes=True)
    for key in ("visual_features", "visual_mask", "visual_boxes"):
        assert torch.equal(output[key], expected[key]), key
    assert loaded.fingerprint() == processor.fingerprint()


LOADERS_SCRIPT = """
import json, sys
import torchvision
from transformers import AutoImageProcessor, AutoProcessor

def no_download(*args, **kwargs):
    raise SystemExit("a torchvision download was attempted")
torchvision.models._api.WeightsEnum.get_state_dict = no_download
import torch.hub
torch.hub.load_state_dict_from_url = no_download

result = {{}}
auto = AutoProcessor.from_pretrained({folder!r}, trust_remote_code=True)
remote_class = type(auto)
loaders = {{
    "AutoProcessor": lambda: auto.image_processor,
    "PMNERProcessor.from_pretrained": lambda: remote_class.from_pretrained({folder!r}, trust_remote_code=True).image_processor,
    "PMNERImageProcessor.from_pretrained": lambda: type(auto.image_processor).from_pretrained({folder!r}),
    "AutoImageProcessor": lambda: AutoImageProcessor.from_pretrained({folder!r}, trust_remote_code=True),
}}
for name, load in loaders.items():
    image_processor = load()
    try:
        output = image_processor({images!r})
    except OSError as error:
        result[name] = {{"error": str(error)}}
        continue
    result[name] = {{"module": type(image_processor).__module__, "features": output["visual_features"].tolist(),
                     "files": sorted(image_processor._weights_files)}}
print("RESULT " + json.dumps(result))
"""


def run_loaders(folder, images, cwd, env=None) -> dict:
    result = run_without_project(LOADERS_SCRIPT.format(folder=str(folder), images=images), cwd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])


def check_loaders(remote: dict, expected: torch.Tensor):
    """Every loader gives the features computed before saving; `AutoImageProcessor`, which transformers 5.25 and
    later build from the settings alone (`from_dict`, no folder), gives them too or refuses naming the weights file,
    never other features."""
    for name, outcome in remote.items():
        if name == "AutoImageProcessor" and "error" in outcome:
            assert BACKBONE_FILE in outcome["error"] and "AutoProcessor.from_pretrained(folder)" in outcome["error"]
            continue
        assert "error" not in outcome, (name, outcome)
        assert outcome["module"].startswith("transformers_modules"), name
        assert "backbone" in outcome["files"], name
        np.testing.assert_array_equal(np.asarray(outcome["features"], dtype=np.float32), expected.numpy(), err_msg=name)


def test_every_loader_in_a_fresh_process_reads_the_folder_weights_and_ignores_a_decoy(images, tmp_path):
    (tmp_path / "weights").mkdir()
    image_processor = unrebuildable_processor(tmp_path / "weights")
    processor = PMNERProcessor(image_processor, write_tiny_tokenizer(tmp_path / "tokenizer"))
    expected = processor([["a", "b"], ["c"]], images=images)["visual_features"]
    processor.save_pretrained(tmp_path / "saved")
    assert {BACKBONE_FILE, "image_frr_models.py", "image_loading.py", "image_feature_cache.py"} <= set(os.listdir(tmp_path / "saved"))
    record = config_of(tmp_path / "saved", "processor_config.json")["image_processor"]
    assert record["backbone_weights"] == "file:resnet18.safetensors"
    folder = tmp_path / "elsewhere" / "model"
    shutil.copytree(tmp_path / "saved", folder)
    shutil.rmtree(tmp_path / "weights")  # the user's file is gone: the folder alone must do
    # a decoy of the recorded origin's name where the user stands: never read
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    write_unrebuildable_weights(decoy / "resnet18.safetensors", seed=8)
    check_loaders(run_loaders(folder, images, decoy), expected)


def test_a_torchvision_origin_is_never_downloaded_on_load(images, tmp_path):
    # the origin names torchvision's ImageNet weights; the module in use (put in place by hand, as load_models would
    # after a download) holds other weights: on load, only the saved file may give the features
    pretrained = small_processor(backbone_weights="DEFAULT")
    file = write_unrebuildable_weights(tmp_path / "weights.safetensors", seed=5)
    pretrained._backbone_module = small_processor(backbone_weights=file).load_models("cpu")._backbone_module
    processor = PMNERProcessor(pretrained, write_tiny_tokenizer(tmp_path / "tokenizer"))
    expected = processor([["a", "b"], ["c"]], images=images)["visual_features"]
    processor.save_pretrained(tmp_path / "saved")
    os.remove(file)
    assert config_of(tmp_path / "saved", "processor_config.json")["image_processor"]["backbone_weights"] == (
        "ResNet18_Weights.IMAGENET1K_V1"
    )
    check_loaders(run_loaders(tmp_path / "saved", images, tmp_path, env={"HF_HUB_OFFLINE": "1"}), expected)


def damaged_folders(tmp_path) -> dict:
    """A saved processor folder (tokenizer included) and copies damaged in each way a download or a hand can."""
    processor = PMNERProcessor(small_processor(), write_tiny_tokenizer(tmp_path / "tokenizer"))
    processor.save_pretrained(tmp_path / "saved")
    folders = {}

    def copy(name):
        folders[name] = tmp_path / name
        shutil.copytree(tmp_path / "saved", folders[name])
        return folders[name]

    def edit_record(folder, change):
        config = config_of(folder, "processor_config.json")
        change(config["image_processor"])
        (folder / "processor_config.json").write_text(json.dumps(config))

    os.remove(copy("missing") / BACKBONE_FILE)
    data = (tmp_path / "saved" / BACKBONE_FILE).read_bytes()
    (copy("truncated") / BACKBONE_FILE).write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[-3] ^= 0x55  # one byte of the last tensor: same size, other weights
    (copy("flipped") / BACKBONE_FILE).write_bytes(bytes(flipped))
    edit_record(copy("other-sha256"), lambda record: record["frr_weights"]["backbone"].update(sha256="0" * 64))
    edit_record(copy("path-parts"), lambda record: record["frr_weights"]["backbone"].update(file="../../etc/passwd"))
    return folders


DAMAGE_MESSAGES = {
    "missing": f"{BACKBONE_FILE} is missing from",
    "truncated": f"{BACKBONE_FILE} is truncated",
    "flipped": f"{BACKBONE_FILE} has sha256 .* but the processor config records",
    "other-sha256": f"{BACKBONE_FILE} has sha256 .* but the processor config records",
    "path-parts": r"frr_weights\['backbone'\] = .*expected a file name",
}


@pytest.mark.parametrize("loader", ["PMNERImageProcessor", "AutoProcessor", "PMNERProcessor"])
def test_damaged_weights_fail_naming_the_file_from_every_loader(images, tmp_path, loader):
    load = {
        "PMNERImageProcessor": PMNERImageProcessor.from_pretrained,
        "AutoProcessor": lambda folder: AutoProcessor.from_pretrained(folder).image_processor,
        "PMNERProcessor": lambda folder: PMNERProcessor.from_pretrained(folder).image_processor,
    }[loader]
    for name, folder in damaged_folders(tmp_path).items():
        with pytest.raises((OSError, ValueError), match=DAMAGE_MESSAGES[name]):
            load(folder)(images[0])  # at load (cheap checks) or at the first image (the checksum)


def test_a_file_origin_is_provenance_never_a_path(images, tmp_path, monkeypatch):
    # settings that name a file origin but record no saved weights (edited by hand): an error, not a decoy read
    monkeypatch.chdir(tmp_path)
    write_unrebuildable_weights(tmp_path / "resnet18.safetensors", seed=8)
    with pytest.raises(FileNotFoundError, match="records where saved weights came from; it is not a file to read"):
        small_processor(backbone_weights="file:resnet18.safetensors")(images[0])
    # settings with a record but no folder (as transformers' from_dict builds them): refused, never rebuilt
    saved = small_processor()
    saved.save_pretrained(tmp_path / "saved")
    settings = {key: value for key, value in config_of(tmp_path / "saved").items() if key != "image_processor_type"}
    unattached = PMNERImageProcessor.from_dict(settings)
    with pytest.raises(OSError, match=f"record saved backbone weights \\({BACKBONE_FILE}.*attach_frr_weights"):
        unattached(images[0])
    assert torch.equal(
        unattached.attach_frr_weights(tmp_path / "saved")(images)["visual_features"], saved(images)["visual_features"]
    )


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
    loaded = PMNERImageProcessor.from_pretrained(tmp_path / dtype)
    assert config_of(tmp_path / dtype)["frr_weights"]["dtype"] == dtype
    expected = full(images)["visual_features"]
    output = loaded(images)["visual_features"]
    assert next(loaded._backbone_module.parameters()).dtype == torch.float32
    assert not torch.equal(output, expected)
    scale = expected.abs().max()
    assert (output - expected).abs().max() < 0.05 * scale
    # other stored weights, another cache
    assert loaded.fingerprint() != full.fingerprint()
    assert PMNERImageProcessor.from_pretrained(tmp_path / "float32").fingerprint() == full.fingerprint()


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
from transformers import AutoProcessor
result = {{}}
for name, revision in (("main", None), ("first", {first!r})):
    kwargs = {{"revision": revision}} if revision else {{}}
    processor = AutoProcessor.from_pretrained("user/frr", trust_remote_code=True, cache_dir={cache!r}, **kwargs).image_processor
    result[name] = {{"features": processor({images!r})["visual_features"].tolist(),
                    "files": {{k: os.path.relpath(v, {cache!r}) for k, v in processor._weights_files.items()}}}}
print("RESULT " + json.dumps(result))
"""


def test_weights_come_from_the_hub_repo_at_the_requested_revision(hub_server, images, tmp_path):
    expected = {}
    commits = {}
    tokenizer = write_tiny_tokenizer(tmp_path / "tokenizer")
    for seed in (1, 2):
        weights = write_unrebuildable_weights(tmp_path / "resnet18.safetensors", seed=seed)
        processor = PMNERProcessor(small_processor(backbone_weights=weights), tokenizer)
        expected[seed] = processor.image_processor(images)["visual_features"]
        processor.save_pretrained(tmp_path / f"seed{seed}")
        os.remove(weights)
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
