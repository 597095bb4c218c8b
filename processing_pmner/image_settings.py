"""The settings of the P-MNER image processor, each declared once (`DECLARED_SETTINGS`: name, default, type, doc,
conversion, check, whether it changes the features), and what derives from the declarations: the defaults
(`SETTINGS`), the `__init__` keyword arguments' TypedDict and its doc (`settings_typed_dict`), the conversion and
validation of given values (`convert_settings`, `check_settings`), and the settings that make the features
(`FEATURE_SETTINGS`, `feature_settings`, `features_fingerprint`).

Copied flat into saved processor folders (remote code): imports only numpy and the siblings, relatively.
"""

import copy
import dataclasses
import hashlib
import json
import typing
from typing import Any, Callable

import numpy as np

from .image_frr_builders import FEATURE_LAYERS, has_resnet_stages, weights_origin
from .image_frr_weights import FRR_WEIGHTS_DTYPES
from .image_loading import DEFAULT_MAX_IMAGE_PIXELS


BAD_IMAGE_POLICIES = ("blank", "error")


def _as_given(value, settings: dict):
    return value


def _optional(convert: Callable) -> Callable:
    return lambda value, settings: None if value is None else convert(value)


def _plain(convert: Callable) -> Callable:
    return lambda value, settings: convert(value)


def _origin_of(builder_setting: str, setting: str) -> Callable:
    """Normalises a weights setting against the builder named by `builder_setting` (see `weights_origin`)."""
    return lambda value, settings: weights_origin(settings[builder_setting], value, setting)


def _at_least(name: str, low: int) -> Callable:
    return lambda value: None if value is None or value >= low else f"{name} must be at least {low}, got {value}"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One image-processor setting. `convert(value, settings converted so far)` gives the stored value; `check(value)`
    gives the message of the `ValueError` for an invalid one (`None`: valid)."""

    name: str
    default: Any
    type: Any
    doc: str
    convert: Callable = _as_given
    check: Callable | None = None
    feature: bool = False  # changes the features: hashed in the cache fingerprint
    hashed_when_set: bool = False  # a feature setting added later: hashed only away from its default
    keyword: bool = True  # False: written by save_pretrained, not set by hand (not in SETTINGS nor the kwargs)

    def header(self) -> str:
        kind = [arg for arg in typing.get_args(self.type) if arg is not type(None)] or [self.type]
        default = self.default
        if isinstance(default, (str, bool)):
            default = f"`{json.dumps(default) if isinstance(default, str) else default}`"
        defaults = "" if default is None else f", defaults to {default}"
        return f"{self.name} (`{kind[0].__name__}`, *optional*{defaults}):"


DECLARED_SETTINGS = (
    Setting(
        "detector", "fasterrcnn_resnet50_fpn_v2", str | None,
        """Name of a `torchvision.models.detection` builder. `None`: no detection, the whole image is the only
        object.""",
        feature=True,
    ),
    Setting(
        "detector_weights", "DEFAULT", str | None,
        """A torchvision weights name of the builder (`"DEFAULT"`, `"COCO_V1"` or the full
        `"FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1"`; stored by its full name, so `DEFAULT` is resolved at
        construction), `"random"` / `"random:SEED"` (weights initialised from the seed, 0 by default), or a local file
        (`.safetensors`, or a state dict read with `torch.load(weights_only=True)`). `None` is an error when the
        weights are needed.""",
        convert=_origin_of("detector", "detector_weights"),
    ),
    Setting(
        "detector_kwargs", None, dict | None,
        """Extra arguments of the detector builder (e.g. `{"min_size": 512}`, `{"box_score_thresh": 0.0}`).""",
        convert=lambda value, settings: dict(value) if value else None,
        feature=True,
    ),
    Setting(
        "backbone", "resnet152", str,
        """Name of a torchvision classification builder with an `fc` head (ResNet family); the head is dropped and
        the pooled last stage is the object feature. `feature_layer="layer3"` and `grid_size` need a ResNet (its
        stages).""",
        feature=True,
    ),
    Setting(
        "feature_layer", "layer4", str,
        """The ResNet stage whose average-pooled output is the object feature: `"layer4"` (the last stage, 2048 values
        for ResNet-152) or `"layer3"` (1024 values for ResNet-152; 256 for ResNet-18, whose `"layer4"` gives 512).
        `feature_dim` follows it. The saved backbone weights are the whole network either way.""",
        check=lambda value: (
            None if value in FEATURE_LAYERS else f"feature_layer must be one of {FEATURE_LAYERS}, got {value!r}"
        ),
        feature=True,
        hashed_when_set=True,
    ),
    Setting(
        "grid_size", None, int | None,
        """`None`: objects as above. An integer g >= 1: the image is g x g grid regions instead; the whole image
        (resized as the whole-image object is) goes through the backbone once and its `feature_layer` map is
        average-pooled to g x g (adaptive pooling), each cell one object, row by row, all in the mask. Needs
        `detector=None` and `max_objects=g*g`. With `return_boxes`, a cell's box is its share of the image split
        evenly into g x g (label `GRID_CELL_LABEL`, score NaN). A grid finer than the feature map (e.g. 7 over
        ResNet's 7 x 7 `layer4` map of a 224 crop is exact; over a 2 x 2 map it repeats values) gives cells that
        share map positions.""",
        convert=lambda value, settings: int(value) if isinstance(value, np.integer) else value,
        check=lambda value: (
            None if value is None or (not isinstance(value, bool) and isinstance(value, int) and value >= 1)
            else f"grid_size must be None or an integer >= 1, got {value!r}"
        ),
        feature=True,
        hashed_when_set=True,
    ),
    Setting(
        "backbone_weights", "DEFAULT", str | None,
        """As `detector_weights`, for the backbone (ImageNet).""",
        convert=_origin_of("backbone", "backbone_weights"),
    ),
    Setting(
        "score_threshold", 0.95, float,
        """A detection is kept when its score is strictly above this.""",
        convert=_plain(float),
        check=lambda value: None if 0.0 <= value <= 1.0 else f"score_threshold must be in [0, 1], got {value}",
        feature=True,
    ),
    Setting(
        "max_objects", 5, int,
        """Objects per image (the output's second dimension).""",
        convert=_plain(int),
        check=_at_least("max_objects", 1),
        feature=True,
    ),
    Setting(
        "crop_size", None, int | None,
        """Side of the square each object crop is resized to. Defaults to the backbone weights' `crop_size` (224).""",
        convert=_optional(int),
        check=lambda value: None if value is None or value >= 1 else f"crop_size must be positive, got {value}",
        feature=True,
    ),
    Setting(
        "add_whole_image", True, bool,
        """When fewer than `max_objects` detections pass, the whole image is added as one more object. Not used with
        `grid_size` (the cells are the objects).""",
        convert=_plain(bool),
        feature=True,
    ),
    Setting(
        "on_bad_image", "blank", str,
        """`"blank"`: a missing/unreadable image gives zero features and an all-false mask, with a `BadImageWarning`
        naming it (counted in `bad_image_count`). `"error"`: raise `BadImageError` naming it.""",
        check=lambda value: (
            None if value in BAD_IMAGE_POLICIES else f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {value!r}"
        ),
    ),
    Setting(
        "max_image_side", 1333, int | None,
        """Images are decoded (JPEG draft mode) and downscaled to this longest side before detection and cropping.""",
        convert=_optional(int),
        check=_at_least("max_image_side", 32),
        feature=True,
    ),
    Setting(
        "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS, int | None,
        """Decompression-bomb guard: an image with more pixels is refused (a bad image). `None` disables the guard.""",
        convert=_optional(int),
    ),
    Setting(
        "batch_size", 8, int,
        """Images per detector/backbone forward.""",
        convert=_plain(int),
        check=_at_least("batch_size", 1),
    ),
    Setting(
        "save_frr_weights", True, bool,
        """`save_pretrained` writes the detector and backbone weights into the folder (`frr_detector.safetensors`,
        `frr_backbone.safetensors`), so that `from_pretrained` gives the same features with no other download.
        `False` for a text-only model (nothing visual to save): the folder holds the settings only.""",
        convert=_plain(bool),
    ),
    Setting(
        "frr_weights_dtype", "float32", str,
        """dtype of the saved FRR weights: `"float32"`, `"bfloat16"` or `"float16"` (half the size); loaded back as
        float32 for compute.""",
        check=lambda value: (
            None if value in FRR_WEIGHTS_DTYPES
            else f"frr_weights_dtype must be one of {list(FRR_WEIGHTS_DTYPES)}, got {value!r}"
        ),
    ),
    Setting(
        "frr_weights", None, dict | None,
        """Written by `save_pretrained`, not set by hand: per component (`detector`, `backbone`) the weights file, its
        origin (`"ResNet152_Weights.IMAGENET1K_V2"`, `"random:SEED"` or `"file:<basename>"`) and the sha256 of its
        tensors, checked when the models are built; plus the saved `dtype`.""",
        convert=lambda value, settings: copy.deepcopy(value) if value else None,
        keyword=False,
    ),
)
DECLARED_NAMES = {setting.name for setting in DECLARED_SETTINGS}
# The settings set by hand and their defaults
SETTINGS = {setting.name: setting.default for setting in DECLARED_SETTINGS if setting.keyword}
# Settings that change the features (and hence the cache fingerprint, with the weights' sha256)
FEATURE_SETTINGS = tuple(setting.name for setting in DECLARED_SETTINGS if setting.feature)
# Feature settings added later, hashed only away from their default, so that the caches of earlier settings keep
# their fingerprint
FINGERPRINT_WHEN_SET = {setting.name: setting.default for setting in DECLARED_SETTINGS if setting.hashed_when_set}


def settings_typed_dict(name: str, base: type, module: str) -> type:
    """The TypedDict of the keyword arguments: `base`'s (transformers' `ImagesKwargs`) and the settings set by hand,
    documented from their declarations (as a `class name(base, total=False)` statement would make it)."""
    doc = "".join(f"\n    {setting.header()}\n        {setting.doc}" for setting in DECLARED_SETTINGS) + "\n    "
    annotations = {setting.name: setting.type for setting in DECLARED_SETTINGS if setting.keyword}
    namespace = {"__annotations__": annotations, "__doc__": doc, "__module__": module}
    return type(base)(name, (base,), namespace, total=False)


def convert_settings(given: dict) -> dict:
    """The stored value of every declared setting, in declaration order: given or default, converted."""
    settings = {}
    for setting in DECLARED_SETTINGS:
        settings[setting.name] = setting.convert(given.get(setting.name, setting.default), settings)
    return settings


def _grid_cells_are_objects(processor) -> str | None:
    grid = processor.grid_size
    if grid is not None and (processor.detector is not None or processor.max_objects != grid**2):
        return (
            f"grid_size={grid} needs max_objects={grid**2} (got {processor.max_objects}) and "
            f"detector=None (got {processor.detector!r}): the grid cells are the objects"
        )
    return None


def _stages_are_resnet(processor) -> str | None:
    reads_stages = [f"feature_layer={processor.feature_layer!r}"] if processor.feature_layer != "layer4" else []
    reads_stages += [f"grid_size={processor.grid_size}"] if processor.grid_size is not None else []
    if reads_stages and not has_resnet_stages(processor.backbone):
        return (
            f"{' and '.join(reads_stages)} {'reads' if len(reads_stages) == 1 else 'read'} the ResNet stages "
            "(layer1 .. layer4) of the backbone; "
            f"backbone={processor.backbone!r} has none: use a ResNet (resnet18 .. resnet152, resnext*, wide_resnet*)"
        )
    return None


def _some_object(processor) -> str | None:
    if processor.detector is None and not processor.add_whole_image and processor.grid_size is None:  # a grid: cells
        return "detector=None needs add_whole_image=True (there would be no object at all)"
    return None


# Checks of several settings together, after each setting's own check
COMBINED_CHECKS = (_grid_cells_are_objects, _stages_are_resnet, _some_object)


def check_settings(processor) -> None:
    """Checks the settings of `processor`; raises `ValueError` naming the one at fault."""
    for setting in DECLARED_SETTINGS:
        message = setting.check(getattr(processor, setting.name)) if setting.check is not None else None
        if message is not None:
            raise ValueError(message)
    for check in COMBINED_CHECKS:
        message = check(processor)
        if message is not None:
            raise ValueError(message)


# ----------------------------------------------------------------------------------------------------------------------
# The settings that make the features
# ----------------------------------------------------------------------------------------------------------------------


def feature_settings(processor) -> dict:
    """The settings that change the features (`FEATURE_SETTINGS`), `crop_size` as resolved from the backbone."""
    settings = {key: getattr(processor, key) for key in FEATURE_SETTINGS}
    settings["crop_size"] = processor.preprocessing["crop_size"]
    return settings


def frr_weights_sha256(processor) -> dict:
    """The sha256 of the FRR weights in use, per network (`backbone`, and `detector` when there is one)."""
    components = ["backbone"] + (["detector"] if processor.detector is not None else [])
    return {component: processor.weights_sha256(component) for component in components}


def features_fingerprint(processor) -> str:
    """Cache fingerprint of an image processor: hash of the settings that change the features, with the sha256 of
    the weights in use (not their name, path or mtime; computed once per weights); injected modules by their
    parameters."""
    settings = feature_settings(processor)
    for key, default in FINGERPRINT_WHEN_SET.items():
        if settings[key] == default:
            del settings[key]
    models = processor.frr_models
    if not models.injected:
        settings["weights_sha256"] = frr_weights_sha256(processor)
    else:
        settings.update(detector_weights=processor.detector_weights, backbone_weights=processor.backbone_weights)
        digest = hashlib.sha1()
        for module in (models.backbone_module, models.detector_module):
            if module is None:
                continue
            digest.update(type(module).__qualname__.encode())
            for name, tensor in module.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        settings["injected_modules"] = digest.hexdigest()
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
