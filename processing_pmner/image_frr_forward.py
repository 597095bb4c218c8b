"""The FRR forward pass of P-MNER (paper section 3.2): a Faster R-CNN finds the objects of each image, the first
`max_objects` detections whose score is above `score_threshold` are cropped, and each crop goes through the ResNet
backbone, whose pooled stage `feature_layer` is that object's feature (or, with `grid_size`, the whole image's map
pooled to g x g cells). `extract_images` scatters the objects of a list of images into fixed-size tensors.

The functions take the image processor: its settings, and its networks (`processor.frr_models`, built by
`load_models`). Copied flat into saved processor folders (remote code): imports only torch, torchvision (lazily),
PIL and numpy at module level.
"""

import numpy as np
import torch
from PIL import Image

from .image_frr_builders import backbone_feature_map
from .image_loading import BadImageError, describe_image, load_image


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
    device = processor.frr_models.device
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
    backbone = processor.frr_models.backbone_module
    if processor.feature_layer == "layer4" and processor.grid_size is None:
        return backbone(batch)  # (N, D)
    # section 3.2's object features in R^1024 are ResNet-152's layer3 pooled; UMT's grid pools to g x g regions
    feature_map = backbone_feature_map(backbone, batch, processor.feature_layer, processor.backbone)  # (N, D, h, w)
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
    device, detector = processor.frr_models.device, processor.frr_models.detector_module
    if detector is None:
        empty = [torch.zeros(0, 4, device=device) for _ in tensors]
        return empty, [torch.zeros(0, dtype=torch.long, device=device) for _ in tensors], [
            torch.zeros(0, device=device) for _ in tensors
        ]
    inputs = [tensor.float() / 255.0 for tensor in tensors]  # each (3, H, W) in [0, 1] (ObjectDetection())
    outputs = detector(inputs)
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
