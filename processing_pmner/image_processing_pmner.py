"""FRR image processor of P-MNER (paper section 3.2).

A Faster R-CNN finds the objects of an image; the first `max_objects` detections whose score is above
`score_threshold` are cropped from the image and each crop goes through a ResNet whose pooled last convolution stage
(2048 values for ResNet-152) is that object's feature. The processor turns images (paths, PIL images, arrays, bytes)
into `visual_features` (batch, max_objects, feature_dim) and `visual_mask` (batch, max_objects), and extracts and
caches them for a whole `datasets.Dataset` (`extract_dataset_features`).

Two settings give the paper's other readings of FRR: `feature_layer="layer3"` pools ResNet's third stage instead
(1024 values for ResNet-152, the R^1024 of section 3.2 that eq. 3 attends over), and `grid_size=g` (with
`detector=None`, `max_objects=g*g`) reads the whole image as a g x g grid of regions pooled from one feature map
(UMT's 7 x 7 ResNet grid), so that the fusion attends over regions of a whole-image "T+V" input.

The work is split by concern: `image_loading.py` decodes images, `image_frr_models.py` builds the FRR networks and
handles their weights (saved with the processor), `image_feature_cache.py` holds the feature cache, `image_feature_claims.py`
its concurrent writers and `image_dataset_features.py` the dataset extraction; this file holds the forward pass, the cache fingerprint and the processor, and re-exports the public
names of its siblings.

This file and its siblings are copied flat into saved processor folders (remote code): they import only torch,
torchvision, transformers, PIL and numpy at module level, and each other relatively.
"""

import copy
import hashlib
import json
import os
import warnings

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from .image_dataset_features import extract_dataset_features
from .image_feature_cache import FRRFeatureCache
from .image_frr_models import (
    FEATURE_LAYERS,
    FRR_WEIGHTS_DTYPES,
    FRRModelsMixin,
    _weights_enum,
    backbone_feature_map,
    has_resnet_stages,
    weights_origin,
)
from .image_loading import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadImageError,
    BadImageWarning,
    content_key,
    describe_image,
    load_image,
    to_rgb,
)


BAD_IMAGE_POLICIES = ("blank", "error")


class PMNERImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    detector (`str`, *optional*, defaults to `"fasterrcnn_resnet50_fpn_v2"`):
        Name of a `torchvision.models.detection` builder. `None`: no detection, the whole image is the only object.
    detector_weights (`str`, *optional*, defaults to `"DEFAULT"`):
        A torchvision weights name of the builder (`"DEFAULT"`, `"COCO_V1"` or the full
        `"FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1"`; stored by its full name, so `DEFAULT` is resolved at
        construction), `"random"` / `"random:SEED"` (weights initialised from the seed, 0 by default), or a local file
        (`.safetensors`, or a state dict read with `torch.load(weights_only=True)`). `None` is an error when the
        weights are needed (it no longer means random weights).
    detector_kwargs (`dict`, *optional*):
        Extra arguments of the detector builder (e.g. `{"min_size": 512}`, `{"box_score_thresh": 0.0}`).
    backbone (`str`, *optional*, defaults to `"resnet152"`):
        Name of a torchvision classification builder with an `fc` head (ResNet family); the head is dropped and the
        pooled last stage is the object feature. `feature_layer="layer3"` and `grid_size` need a ResNet (its stages).
    feature_layer (`str`, *optional*, defaults to `"layer4"`):
        The ResNet stage whose average-pooled output is the object feature: `"layer4"` (the last stage, 2048 values
        for ResNet-152) or `"layer3"` (1024 values for ResNet-152; 256 for ResNet-18, whose `"layer4"` gives 512).
        `feature_dim` follows it. The saved backbone weights are the whole network either way.
    grid_size (`int`, *optional*):
        `None`: objects as above. An integer g >= 1: the image is g x g grid regions instead; the whole image (resized
        as the whole-image object is) goes through the backbone once and its `feature_layer` map is average-pooled
        to g x g (adaptive pooling), each cell one object, row by row, all in the mask. Needs `detector=None` and
        `max_objects=g*g`. With `return_boxes`, a cell's box is its share of the image split evenly into g x g
        (label `GRID_CELL_LABEL`, score NaN). A grid finer than the feature map (e.g. 7 over ResNet's 7 x 7 `layer4`
        map of a 224 crop is exact; over a 2 x 2 map it repeats values) gives cells that share map positions.
    backbone_weights (`str`, *optional*, defaults to `"DEFAULT"`):
        As `detector_weights`, for the backbone (ImageNet).
    score_threshold (`float`, *optional*, defaults to 0.95):
        A detection is kept when its score is strictly above this.
    max_objects (`int`, *optional*, defaults to 5):
        Objects per image (the output's second dimension).
    crop_size (`int`, *optional*):
        Side of the square each object crop is resized to. Defaults to the backbone weights' `crop_size` (224).
    add_whole_image (`bool`, *optional*, defaults to `True`):
        When fewer than `max_objects` detections pass, the whole image is added as one more object. Not used with
        `grid_size` (the cells are the objects).
    on_bad_image (`str`, *optional*, defaults to `"blank"`):
        `"blank"`: a missing/unreadable image gives zero features and an all-false mask, with a `BadImageWarning`
        naming it (counted in `bad_image_count`). `"error"`: raise `BadImageError` naming it.
    max_image_side (`int`, *optional*, defaults to 1333):
        Images are decoded (JPEG draft mode) and downscaled to this longest side before detection and cropping.
    max_image_pixels (`int`, *optional*, defaults to 89478485):
        Decompression-bomb guard: an image with more pixels is refused (a bad image). `None` disables the guard.
    batch_size (`int`, *optional*, defaults to 8):
        Images per detector/backbone forward.
    save_frr_weights (`bool`, *optional*, defaults to `True`):
        `save_pretrained` writes the detector and backbone weights into the folder (`frr_detector.safetensors`,
        `frr_backbone.safetensors`), so that `from_pretrained` gives the same features with no other download.
        `False` for a text-only model (nothing visual to save): the folder holds the settings only.
    frr_weights_dtype (`str`, *optional*, defaults to `"float32"`):
        dtype of the saved FRR weights: `"float32"`, `"bfloat16"` or `"float16"` (half the size); loaded back as
        float32 for compute.
    frr_weights (`dict`, *optional*):
        Written by `save_pretrained`, not set by hand: per component (`detector`, `backbone`) the weights file, its
        origin (`"ResNet152_Weights.IMAGENET1K_V2"`, `"random:SEED"` or `"file:<basename>"`) and the sha256 of its
        tensors, checked when the models are built; plus the saved `dtype`.
    """

    detector: str | None
    detector_weights: str | None
    detector_kwargs: dict | None
    backbone: str
    feature_layer: str
    grid_size: int | None
    backbone_weights: str | None
    score_threshold: float
    max_objects: int
    crop_size: int | None
    add_whole_image: bool
    on_bad_image: str
    max_image_side: int | None
    max_image_pixels: int | None
    batch_size: int
    save_frr_weights: bool
    frr_weights_dtype: str


SETTINGS = {
    "detector": "fasterrcnn_resnet50_fpn_v2",
    "detector_weights": "DEFAULT",
    "detector_kwargs": None,
    "backbone": "resnet152",
    "feature_layer": "layer4",
    "grid_size": None,
    "backbone_weights": "DEFAULT",
    "score_threshold": 0.95,
    "max_objects": 5,
    "crop_size": None,
    "add_whole_image": True,
    "on_bad_image": "blank",
    "max_image_side": 1333,
    "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS,
    "batch_size": 8,
    "save_frr_weights": True,
    "frr_weights_dtype": "float32",
}


# Settings that change the features (and hence the cache fingerprint, with the weights' sha256).
FEATURE_SETTINGS = (
    "detector",
    "detector_kwargs",
    "backbone",
    "feature_layer",
    "grid_size",
    "score_threshold",
    "max_objects",
    "crop_size",
    "add_whole_image",
    "max_image_side",
)
# Feature settings added later, hashed only away from their default, so that the caches of earlier settings keep
# their fingerprint
FINGERPRINT_WHEN_SET = {"feature_layer": "layer4", "grid_size": None}


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
    if not processor._injected:
        settings["weights_sha256"] = frr_weights_sha256(processor)
    else:
        settings.update(detector_weights=processor.detector_weights, backbone_weights=processor.backbone_weights)
        digest = hashlib.sha1()
        for module in (processor._backbone_module, processor._detector_module):
            if module is None:
                continue
            digest.update(type(module).__qualname__.encode())
            for name, tensor in module.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        settings["injected_modules"] = digest.hexdigest()
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------------
# Forward pass
# ----------------------------------------------------------------------------------------------------------------------


# `visual_labels` of the slots that are not a detection: the whole-image filler, an empty slot, a grid cell
WHOLE_IMAGE_LABEL = -1
NO_OBJECT_LABEL = -2
GRID_CELL_LABEL = -3
WHOLE_IMAGE_NAME = "whole image"
GRID_CELL_NAME = "grid cell"


@torch.inference_mode()
def frr_forward(
    processor, rgb_images: list[Image.Image], return_detections: bool = False
) -> tuple:
    """Detects, crops and encodes a chunk of RGB images; returns the crop features (N, D), objects per image, the
    boxes (objects, 4) of each image (pixels of the downscaled image) and the detections per image above the
    threshold (objects without the whole-image filler). With `return_detections`, two more lists: per image the
    detector's labels (objects,) int64 (`WHOLE_IMAGE_LABEL` for the filler) and scores (objects,) float32 (NaN for
    the filler). `processor` gives the settings and the built modules (`PMNERImageProcessor.load_models` has run)."""
    device = processor._models_device
    preprocessing = processor.preprocessing
    tensors = [
        torch.from_numpy(np.array(image)).permute(2, 0, 1).to(device)  # (3, H, W) uint8
        for image in rgb_images
    ]
    detections, labels, scores = _detect(processor, tensors)  # per image (k, 4), (k,), (k,); k <= max_objects
    mean = torch.tensor(preprocessing["mean"], device=device).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    std = torch.tensor(preprocessing["std"], device=device).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    size = preprocessing["crop_size"]
    grid = processor.grid_size
    crops, counts, all_boxes, detected, all_labels, all_scores = [], [], [], [], [], []
    for tensor, image_boxes, image_labels, image_scores in zip(tensors, detections, labels, scores):
        height, width = tensor.shape[-2:]
        detected.append(image_boxes.shape[0])  # before the whole-image filler
        if grid is not None:  # one crop, the whole image, read as grid * grid cells (no detector)
            crops.append(_resize(tensor, size, preprocessing["interpolation"]))  # (3, S, S)
            cells = grid * grid
            image_boxes = grid_cell_boxes(width, height, grid).to(device)  # (g*g, 4)
            all_labels.append(torch.full((cells,), GRID_CELL_LABEL, dtype=torch.long))  # (g*g,)
            all_scores.append(torch.full((cells,), float("nan")))  # (g*g,)
            counts.append(cells)
            all_boxes.append(image_boxes)
            continue
        if processor.add_whole_image and image_boxes.shape[0] < processor.max_objects:
            whole = torch.tensor([[0.0, 0.0, float(width), float(height)]], device=device)  # (1, 4)
            image_boxes = torch.cat([image_boxes, whole])  # (k + 1, 4)
            image_labels = torch.cat([image_labels, torch.tensor([WHOLE_IMAGE_LABEL], device=device)])  # (k + 1,)
            image_scores = torch.cat([image_scores, torch.tensor([float("nan")], device=device)])  # (k + 1,)
        all_labels.append(image_labels.cpu())
        all_scores.append(image_scores.cpu())
        for x1, y1, x2, y2 in image_boxes.tolist():
            left = min(max(int(np.floor(x1)), 0), width - 1)
            top = min(max(int(np.floor(y1)), 0), height - 1)
            right = max(min(int(np.ceil(x2)), width), left + 1)
            bottom = max(min(int(np.ceil(y2)), height), top + 1)
            crops.append(_resize(tensor[:, top:bottom, left:right], size, preprocessing["interpolation"]))  # (3, S, S) float in [0, 1]
        counts.append(image_boxes.shape[0])
        all_boxes.append(image_boxes)
    extra = (all_labels, all_scores) if return_detections else ()
    if not crops:
        return (torch.zeros(0, processor.feature_dim), counts, all_boxes, detected) + extra
    batch = (torch.stack(crops) - mean) / std  # (N, 3, S, S)
    features = encode_crops(processor, batch)  # (N, D), or (N * g*g, D) with a grid
    rows = sum(counts)
    if features.dim() != 2 or features.shape != (rows, processor.feature_dim):
        raise ValueError(
            f"backbone {processor.backbone!r} returned shape {tuple(features.shape)}; expected "
            f"({rows}, feature_dim={processor.feature_dim})"
        )
    return (features, counts, all_boxes, detected) + extra


def encode_crops(processor, batch: torch.Tensor) -> torch.Tensor:
    """Features of normalised crops (N, 3, S, S): the backbone's own forward (pooled last stage) by default; with
    `feature_layer="layer3"` or a `grid_size`, the stage's map pooled to one vector per crop (N, D) or to g x g cells
    per crop, row-major (N * g*g, D)."""
    if processor.feature_layer == "layer4" and processor.grid_size is None:
        return processor._backbone_module(batch)  # (N, D)
    # section 3.2's object features in R^1024 are ResNet-152's layer3 pooled; UMT's grid pools to g x g regions
    feature_map = backbone_feature_map(processor._backbone_module, batch, processor.feature_layer, processor.backbone)  # (N, D, h, w)
    grid = processor.grid_size or 1
    pooled = torch.nn.functional.adaptive_avg_pool2d(feature_map, grid)  # (N, D, g, g)
    return pooled.flatten(2).transpose(1, 2).reshape(-1, feature_map.shape[1])  # (N * g*g, D)


def grid_cell_boxes(width: int, height: int, grid: int) -> torch.Tensor:
    """Pixel boxes (g*g, 4) of the image split evenly into g x g cells, row-major (x1, y1, x2, y2)."""
    edges_x = torch.linspace(0.0, float(width), grid + 1)  # (g + 1,)
    edges_y = torch.linspace(0.0, float(height), grid + 1)  # (g + 1,)
    rows, columns = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")  # (g, g) each
    rows, columns = rows.reshape(-1), columns.reshape(-1)  # (g*g,)
    return torch.stack([edges_x[columns], edges_y[rows], edges_x[columns + 1], edges_y[rows + 1]], dim=1)  # (g*g, 4)


def _resize(crop: torch.Tensor, size: int, interpolation) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as tvF

    crop = crop.float().unsqueeze(0) / 255.0  # (1, 3, h, w)
    resized = tvF.resize(crop, [size, size], interpolation=interpolation, antialias=True)
    return resized[0].clamp_(0.0, 1.0)  # (3, S, S)


def _detect(processor, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per image, the boxes (k, 4), labels (k,) and scores (k,) of the first `max_objects` detections (by score)
    above `score_threshold` (a detector whose results have no `labels` gives label 0)."""
    device = processor._models_device
    if processor._detector_module is None:
        empty = [torch.zeros(0, 4, device=device) for _ in tensors]
        return empty, [torch.zeros(0, dtype=torch.long, device=device) for _ in tensors], [
            torch.zeros(0, device=device) for _ in tensors
        ]
    inputs = [tensor.float() / 255.0 for tensor in tensors]  # each (3, H, W) in [0, 1] (ObjectDetection())
    outputs = processor._detector_module(inputs)
    if len(outputs) != len(inputs):
        raise ValueError(f"detector {processor.detector!r} returned {len(outputs)} results for {len(inputs)} images")
    kept, kept_labels, kept_scores = [], [], []
    for output in outputs:
        scores = output["scores"].to(device, torch.float32)  # (K,)
        boxes = output["boxes"].to(device, torch.float32)  # (K, 4)
        labels = output.get("labels")
        labels = torch.zeros_like(scores, dtype=torch.long) if labels is None else labels.to(device, torch.long)  # (K,)
        order = torch.sort(scores, descending=True, stable=True).indices  # (K,)
        scores, boxes, labels = scores[order], boxes[order], labels[order]
        passed = scores > processor.score_threshold  # (K,)
        kept.append(boxes[passed][: processor.max_objects])  # (k, 4)
        kept_labels.append(labels[passed][: processor.max_objects])  # (k,)
        kept_scores.append(scores[passed][: processor.max_objects])  # (k,)
    return kept, kept_labels, kept_scores


def extract_images(
    processor, images: list, names: list[str] | None = None, device=None, batch_size: int | None = None,
    return_num_detections: bool = False, return_detections: bool = False,
) -> tuple:
    """`PMNERImageProcessor.extract`: loads the images (bad ones follow `on_bad_image`), runs the FRR forward pass
    in chunks of `batch_size` and scatters the objects into fixed-size tensors."""
    names = names or [describe_image(image, index) for index, image in enumerate(images)]
    batch_size = batch_size or processor.batch_size
    count = len(images)
    if count == 0:
        return (
            torch.zeros(0, processor.max_objects, processor.feature_dim),  # (0, M, D)
            torch.zeros(0, processor.max_objects, dtype=torch.bool),  # (0, M)
            torch.zeros(0, processor.max_objects, 4),  # (0, M, 4)
            [],
        ) + ((torch.zeros(0, dtype=torch.int32),) if return_num_detections else ()) + (
            (
                torch.full((0, processor.max_objects), NO_OBJECT_LABEL, dtype=torch.long),  # (0, M)
                torch.zeros(0, processor.max_objects),  # (0, M)
            )
            if return_detections
            else ()
        )
    loaded = []  # (index, rgb image, original size)
    for index, (image, name) in enumerate(zip(images, names)):
        if image is None:
            continue  # no image on purpose (a text-only tweet): blank, no warning
        try:
            rgb, original_size = load_image(image, processor.max_image_side, processor.max_image_pixels, name=name)
        except BadImageError as error:
            processor._bad_image(name, error)
            continue
        loaded.append((index, rgb, original_size))
    if loaded:
        processor.load_models(device)
    bad = [index for index in range(count) if index not in {entry[0] for entry in loaded}]
    feature_dim = processor.feature_dim
    features = torch.zeros(count, processor.max_objects, feature_dim)  # (B, M, D)
    masks = torch.zeros(count, processor.max_objects, dtype=torch.bool)  # (B, M)
    boxes = torch.zeros(count, processor.max_objects, 4)  # (B, M, 4)
    num_detections = torch.zeros(count, dtype=torch.int32)  # (B,)
    labels = torch.full((count, processor.max_objects), NO_OBJECT_LABEL, dtype=torch.long)  # (B, M)
    scores = torch.zeros(count, processor.max_objects)  # (B, M)
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start : start + batch_size]
        chunk_features, chunk_counts, chunk_boxes, chunk_detected, chunk_labels, chunk_scores = frr_forward(
            processor, [rgb for _, rgb, _ in chunk], return_detections=True
        )
        num_detections[[index for index, _, _ in chunk]] = torch.tensor(chunk_detected, dtype=torch.int32)
        offset = 0
        for (index, rgb, (width, height)), objects, image_boxes, image_labels, image_scores in zip(
            chunk, chunk_counts, chunk_boxes, chunk_labels, chunk_scores
        ):
            features[index, :objects] = chunk_features[offset : offset + objects].float().cpu()  # (objects, D)
            masks[index, :objects] = True
            scale = torch.tensor([width / rgb.width, height / rgb.height] * 2)  # (4,)
            boxes[index, :objects] = image_boxes.cpu() * scale  # (objects, 4)
            labels[index, :objects] = image_labels
            scores[index, :objects] = image_scores
            offset += objects
    return (
        (features, masks, boxes, bad)
        + ((num_detections,) if return_num_detections else ())
        + ((labels, scores) if return_detections else ())
    )


class PMNERImageProcessor(FRRModelsMixin, BaseImageProcessor):
    r"""
    FRR visual feature extractor of P-MNER (section 3.2): Faster R-CNN objects, cropped and encoded by a ResNet.

    Calling it on images returns a [`BatchFeature`] with
    - `visual_features`: `(batch, max_objects, feature_dim)` float32, zeros where there is no object;
    - `visual_mask`: `(batch, max_objects)` bool, true for the slots holding an object;
    - `visual_boxes` (with `return_boxes=True`): `(batch, max_objects, 4)` boxes (x1, y1, x2, y2) in pixels of the
      image after EXIF orientation, before downscaling; with them `visual_labels` `(batch, max_objects)` int64, the
      detector's class index of each slot (`WHOLE_IMAGE_LABEL` = -1 for the whole-image filler, `NO_OBJECT_LABEL`
      = -2 for an empty slot, `GRID_CELL_LABEL` = -3 for a cell of `grid_size`; `label_name` gives the name: COCO
      category names for torchvision's COCO detectors) and `visual_scores` `(batch, max_objects)` float32, its
      detection score (NaN for the whole-image filler and grid cells, 0 for an empty slot).

    The torch models are built on first use (never at construction or `from_pretrained`). `set_modules` injects
    ready modules instead (tests, custom extractors).

    Args: see [`PMNERImageProcessorKwargs`]; every setting is saved with the processor.

    Default for `add_whole_image` (True): most MNER systems use a global image feature; many tweet images (memes,
    screenshots, scenery) have no COCO object above 0.95, and without it such tweets would lose their image
    entirely. The whole image takes the first free slot after the detections, so an image with `max_objects`
    confident detections is exactly the paper's FRR.
    """

    valid_kwargs = PMNERImageProcessorKwargs
    model_input_names = ["visual_features", "visual_mask"]

    def __init__(
        self,
        detector: str | None = SETTINGS["detector"],
        detector_weights: str | None = SETTINGS["detector_weights"],
        detector_kwargs: dict | None = SETTINGS["detector_kwargs"],
        backbone: str = SETTINGS["backbone"],
        feature_layer: str = SETTINGS["feature_layer"],
        grid_size: int | None = SETTINGS["grid_size"],
        backbone_weights: str | None = SETTINGS["backbone_weights"],
        score_threshold: float = SETTINGS["score_threshold"],
        max_objects: int = SETTINGS["max_objects"],
        crop_size: int | None = SETTINGS["crop_size"],
        add_whole_image: bool = SETTINGS["add_whole_image"],
        on_bad_image: str = SETTINGS["on_bad_image"],
        max_image_side: int | None = SETTINGS["max_image_side"],
        max_image_pixels: int | None = SETTINGS["max_image_pixels"],
        batch_size: int = SETTINGS["batch_size"],
        save_frr_weights: bool = SETTINGS["save_frr_weights"],
        frr_weights_dtype: str = SETTINGS["frr_weights_dtype"],
        frr_weights: dict | None = None,
        **kwargs,
    ):
        for unused in ("image_processor_type", "processor_class"):
            kwargs.pop(unused, None)
        super().__init__(**kwargs)
        self.detector = detector
        self.detector_weights = weights_origin(detector, detector_weights, "detector_weights")
        self.detector_kwargs = dict(detector_kwargs) if detector_kwargs else None
        self.backbone = backbone
        self.feature_layer = feature_layer
        self.grid_size = int(grid_size) if isinstance(grid_size, np.integer) else grid_size
        self.backbone_weights = weights_origin(backbone, backbone_weights, "backbone_weights")
        self.score_threshold = float(score_threshold)
        self.max_objects = int(max_objects)
        self.crop_size = None if crop_size is None else int(crop_size)
        self.add_whole_image = bool(add_whole_image)
        self.on_bad_image = on_bad_image
        self.max_image_side = None if max_image_side is None else int(max_image_side)
        self.max_image_pixels = None if max_image_pixels is None else int(max_image_pixels)
        self.batch_size = int(batch_size)
        self.save_frr_weights = bool(save_frr_weights)
        self.frr_weights_dtype = frr_weights_dtype
        self.frr_weights = copy.deepcopy(frr_weights) if frr_weights else None
        self._reset_runtime()
        self.validate_settings()

    # -- settings -------------------------------------------------------------------------------------------------

    def _reset_runtime(self):
        # Runtime state: never saved (names start with "_"), rebuilt lazily.
        self._detector_module = None
        self._backbone_module = None
        self._injected = False
        self._models_device = None
        self._feature_dim = None
        self._preprocessing = None
        self._bad_images = []
        self._weights_files = {}  # component -> local FRR weights file of the folder this was loaded from
        self._weights_sha256 = {}  # component -> sha256 of the weights in use, computed once
        self._save_overrides = {}  # settings as a saved folder names them, during save_pretrained only

    def validate_settings(self):
        """Checks the settings; raises `ValueError` naming the one at fault."""
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {self.on_bad_image!r}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be at least 1, got {self.max_objects}")
        if self.feature_layer not in FEATURE_LAYERS:
            raise ValueError(f"feature_layer must be one of {FEATURE_LAYERS}, got {self.feature_layer!r}")
        if self.grid_size is not None:
            if isinstance(self.grid_size, bool) or not isinstance(self.grid_size, int) or self.grid_size < 1:
                raise ValueError(f"grid_size must be None or an integer >= 1, got {self.grid_size!r}")
            if self.detector is not None or self.max_objects != self.grid_size**2:
                raise ValueError(
                    f"grid_size={self.grid_size} needs max_objects={self.grid_size**2} (got {self.max_objects}) and "
                    f"detector=None (got {self.detector!r}): the grid cells are the objects"
                )
        reads_stages = [f"feature_layer={self.feature_layer!r}"] if self.feature_layer != "layer4" else []
        reads_stages += [f"grid_size={self.grid_size}"] if self.grid_size is not None else []
        if reads_stages and not has_resnet_stages(self.backbone):
            raise ValueError(
                f"{' and '.join(reads_stages)} {'reads' if len(reads_stages) == 1 else 'read'} the ResNet stages "
                "(layer1 .. layer4) of the backbone; "
                f"backbone={self.backbone!r} has none: use a ResNet (resnet18 .. resnet152, resnext*, wide_resnet*)"
            )
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.detector is None and not self.add_whole_image and self.grid_size is None:  # a grid's cells are objects
            raise ValueError("detector=None needs add_whole_image=True (there would be no object at all)")
        if self.crop_size is not None and self.crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")
        if self.max_image_side is not None and self.max_image_side < 32:
            raise ValueError(f"max_image_side must be at least 32, got {self.max_image_side}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.frr_weights_dtype not in FRR_WEIGHTS_DTYPES:
            raise ValueError(f"frr_weights_dtype must be one of {list(FRR_WEIGHTS_DTYPES)}, got {self.frr_weights_dtype!r}")

    def to_dict(self) -> dict:
        output = {key: copy.deepcopy(value) for key, value in self.__dict__.items() if not key.startswith("_")}
        output.update(self._save_overrides)
        output["image_processor_type"] = self.__class__.__name__
        return output

    def __deepcopy__(self, memo):
        # ProcessorMixin.to_dict deep-copies its attributes: copy the settings, share the (read-only) models.
        clone = self.__class__(**{key: value for key, value in self.to_dict().items() if key != "image_processor_type"})
        clone.__dict__.update({key: value for key, value in self.__dict__.items() if key.startswith("_")})
        clone._bad_images = list(self._bad_images)
        clone._weights_files, clone._weights_sha256 = dict(self._weights_files), dict(self._weights_sha256)
        return clone

    @property
    def settings(self) -> dict:
        return {key: getattr(self, key) for key in SETTINGS}

    # -- bad images ----------------------------------------------------------------------------------------------

    @property
    def bad_image_count(self) -> int:
        """How many images were processed as text-only (`on_bad_image="blank"`) since the last reset."""
        return len(self._bad_images)

    @property
    def bad_images(self) -> list[tuple[str, str]]:
        """`(image name, reason)` of each image processed as text-only since the last reset."""
        return list(self._bad_images)

    def reset_bad_images(self):
        self._bad_images = []

    def _bad_image(self, name: str, error: BadImageError):
        if self.on_bad_image == "error":
            raise error
        self._bad_images.append((name, str(error)))
        warnings.warn(
            f"{error}. on_bad_image='blank': this sample is processed text-only (all-false visual_mask).",
            BadImageWarning,
            stacklevel=3,
        )

    # -- extraction ----------------------------------------------------------------------------------------------

    def preprocess(
        self,
        images,
        device=None,
        batch_size: int | None = None,
        return_tensors: str | None = "pt",
        return_boxes: bool = False,
        image_names: list[str] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """FRR features of one image or a list of images.

        Args:
            images: one image or a list (paths, PIL images, arrays, tensors, bytes, `{"path", "bytes"}` dicts,
                `None` for a tweet without image: zero features, all-false mask, no warning).
            device: where the models run (default: CUDA when available, else CPU).
            batch_size: images per forward (default: the `batch_size` setting).
            return_tensors: `"pt"` (default), `"np"` or `None` (lists).
            return_boxes: also return `visual_boxes` (batch, max_objects, 4), `visual_labels` and `visual_scores`
                (batch, max_objects) (see the class docstring).
            image_names: names used in messages (default: paths / descriptions).

        Returns:
            [`BatchFeature`] with `visual_features` (batch, max_objects, feature_dim) and `visual_mask`
            (batch, max_objects).
        """
        if kwargs:
            raise TypeError(f"PMNERImageProcessor got unexpected arguments {sorted(kwargs)}")
        images = self._as_list(images)
        if image_names is not None and len(image_names) != len(images):
            raise ValueError(f"image_names has {len(image_names)} names for {len(images)} images")
        names = image_names or [describe_image(image, index) for index, image in enumerate(images)]
        features, masks, boxes, _, labels, scores = self.extract(
            images, names, device=device, batch_size=batch_size, return_detections=True
        )
        data = {"visual_features": features, "visual_mask": masks}  # (B, M, D), (B, M)
        if return_boxes:
            data.update(visual_boxes=boxes, visual_labels=labels, visual_scores=scores)  # (B, M, 4), (B, M), (B, M)
        if return_tensors in (None, "np"):
            data = {key: value.numpy() for key, value in data.items()}
            if return_tensors is None:
                data = {key: value.tolist() for key, value in data.items()}
            return BatchFeature(data)
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        return BatchFeature(data)

    @staticmethod
    def _as_list(images) -> list:
        if isinstance(images, (list, tuple)):
            return list(images)
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            return list(images)  # (B, C, H, W) -> B images
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return list(images)
        return [images]

    def extract(
        self, images: list, names: list[str] | None = None, device=None, batch_size: int | None = None,
        return_num_detections: bool = False, return_detections: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """`(features (B, M, D), masks (B, M), boxes (B, M, 4), bad_indices)` on the CPU for a list of images; bad
        images follow `on_bad_image` (their rows are zeros, their indices listed). With `return_num_detections`, a
        fifth value: detections above the threshold per image (B,) int32, before the whole-image filler. With
        `return_detections`, two values more (last): the slots' detector labels (B, M) int64 and scores (B, M)
        float32, as `visual_labels` / `visual_scores` (see the class docstring)."""
        return extract_images(self, images, names, device, batch_size, return_num_detections, return_detections)

    def label_name(self, label: int) -> str | None:
        """The name of a `visual_labels` value: `"whole image"` for the filler, `"grid cell"` for a cell of
        `grid_size`, `None` for an empty slot, the
        detector's category name where its torchvision weights name them (COCO for the default detector, random
        weights included, as long as `detector_kwargs` keep its 91 classes), else `"class <index>"`."""
        label = int(label)
        if label == NO_OBJECT_LABEL:
            return None
        if label == WHOLE_IMAGE_LABEL:
            return WHOLE_IMAGE_NAME
        if label == GRID_CELL_LABEL:
            return GRID_CELL_NAME
        categories = self.detection_categories()
        if categories is not None and 0 <= label < len(categories):
            return categories[label]
        return f"class {label}"

    def detection_categories(self) -> list[str] | None:
        """The detector's category names (index = label), or `None` when unknown (no detector, an injected one, a
        detector built with another `num_classes`, or a builder whose weights carry no category list)."""
        if self.detector is None or self._injected:
            return None
        if not hasattr(self, "_categories"):
            self._categories = None
            enum = _weights_enum(self.detector)
            members = list(enum) if enum is not None else []
            categories = members[0].meta.get("categories") if members else None
            wanted = (self.detector_kwargs or {}).get("num_classes")
            if categories and (wanted is None or int(wanted) == len(categories)):
                self._categories = list(categories)
        return self._categories

    # -- datasets ------------------------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Hash of the settings that change the features and of the weights in use (see `features_fingerprint`)."""
        return features_fingerprint(self)

    def feature_cache(self, cache_dir: str | os.PathLike) -> FRRFeatureCache:
        """The keyed feature store of these settings under `cache_dir` (not yet loaded)."""
        return FRRFeatureCache(cache_dir, self.fingerprint(), settings=self.settings)

    def extract_dataset_features(
        self,
        dataset,
        image_column: str = "image",
        key_column: str | None = "image_id",
        cache_dir: str | os.PathLike | None = None,
        batch_size: int | None = None,
        device=None,
        progress: bool = True,
        cache_dtype: str = "float32",
        add_num_detections: bool = False,
    ):
        """Adds FRR features to a `datasets.Dataset`, computing each distinct image once and caching it (in
        `cache_dtype`: "float32" or "float16"); see `dataset_features.extract_dataset_features` for the arguments.
        Returns the dataset with `visual_features` (`Array2D` (max_objects, feature_dim) float32) and `visual_mask`
        (max_objects bools) columns, and with `add_num_detections` `visual_num_detections` (int32)."""
        return extract_dataset_features(
            self, dataset, image_column=image_column, key_column=key_column, cache_dir=cache_dir,
            batch_size=batch_size, device=device, progress=progress, cache_dtype=cache_dtype,
            add_num_detections=add_num_detections,
        )


__all__ = [
    "BadImageError",
    "BadImageWarning",
    "FRRFeatureCache",
    "GRID_CELL_LABEL",
    "NO_OBJECT_LABEL",
    "PMNERImageProcessor",
    "WHOLE_IMAGE_LABEL",
    "content_key",
    "describe_image",
    "load_image",
    "to_rgb",
]
