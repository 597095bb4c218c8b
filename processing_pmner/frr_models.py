"""FRR networks of P-MNER (paper section 3.2): building the torchvision detector and backbone from their settings,
their weights, and the forward pass that detects, crops and encodes the objects of a batch of images.

Copied flat into saved processor folders (remote code): imports only torch, torchvision, numpy and PIL at module level
(torchvision lazily); safetensors sits in `try:`.
"""

import os

import numpy as np
import torch
from PIL import Image


try:
    from safetensors.torch import load_file as safetensors_load_file
except ImportError:  # safetensors is a dependency of transformers; kept optional for the remote-code check
    safetensors_load_file = None


def _weights_enum(builder_name: str):
    import torchvision

    try:
        return torchvision.models.get_model_weights(builder_name)
    except (ValueError, KeyError):
        return None


def _is_weights_file(weights) -> bool:
    return isinstance(weights, (str, os.PathLike)) and (
        os.path.sep in os.fspath(weights) or os.path.exists(os.fspath(weights))
    )


def _resolve_weights(builder_name: str, weights, setting: str):
    """`(torchvision_weights_or_None, local_file_or_None)` for a weights setting."""
    if weights is None:
        return None, None
    if _is_weights_file(weights):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{setting}={path!r}: no such weights file")
        return None, path
    enum = _weights_enum(builder_name)
    if enum is None:
        raise ValueError(f"{setting}={weights!r}: torchvision has no pretrained weights for {builder_name!r}")
    if weights == "DEFAULT":
        return enum.DEFAULT, None
    if weights in enum.__members__:
        return enum[weights], None
    raise ValueError(
        f"{setting}={weights!r} is neither a weights name of {builder_name} ({['DEFAULT', *enum.__members__]}) "
        "nor an existing file"
    )


def _read_state_dict(path: str, setting: str) -> dict:
    if path.endswith(".safetensors"):
        if safetensors_load_file is None:
            raise ImportError(f"{setting}={path!r} is a safetensors file but `safetensors` is not installed")
        state = safetensors_load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types (UnpicklingError, RuntimeError, ...); re-raised
            raise OSError(f"{setting}={path!r} could not be read as a state dict: {error}") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{setting}={path!r} holds a {type(state).__name__}, not a state dict")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


def _download_error(setting: str, weights, builder: str, error: Exception) -> OSError:
    return OSError(
        f"Could not load {setting}={weights!r} for {builder}: {error}\nOffline, download the weights elsewhere and "
        f"pass the local file instead ({setting}='/path/to/weights.pth' or .safetensors), or {setting}=None for "
        "random weights."
    )


def build_detector(name: str, weights, extra_kwargs: dict | None = None) -> torch.nn.Module:
    """A torchvision detection model in eval mode (`weights` as the `detector_weights` setting)."""
    import torchvision

    tv_weights, path = _resolve_weights(name, weights, "detector_weights")
    kwargs = dict(extra_kwargs or {})
    kwargs.setdefault("weights_backbone", None)  # never fetch ImageNet weights behind the user's back
    try:
        model = torchvision.models.get_model(name, weights=tv_weights, **kwargs)
    except (OSError, RuntimeError) as error:
        if tv_weights is None:
            raise
        raise _download_error("detector_weights", weights, name, error) from error
    if path is not None:
        state = _read_state_dict(path, "detector_weights")
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"detector_weights={path!r} does not fit {name}: {error}") from error
    return model.eval()


def build_backbone(name: str, weights) -> torch.nn.Module:
    """A torchvision classifier with its `fc` head replaced by identity: it maps crops (N, 3, S, S) to pooled
    features (N, feature_dim)."""
    import torchvision

    tv_weights, path = _resolve_weights(name, weights, "backbone_weights")
    try:
        model = torchvision.models.get_model(name, weights=tv_weights)
    except (OSError, RuntimeError) as error:
        if tv_weights is None:
            raise
        raise _download_error("backbone_weights", weights, name, error) from error
    if not isinstance(getattr(model, "fc", None), torch.nn.Linear):
        raise ValueError(f"backbone={name!r}: expected a torchvision classifier with an `fc` head (ResNet family)")
    model.fc = torch.nn.Identity()
    if path is not None:
        state = {key: value for key, value in _read_state_dict(path, "backbone_weights").items() if not key.startswith("fc.")}
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"backbone_weights={path!r} does not fit {name}: {error}") from error
    return model.eval()


def backbone_feature_dim(name: str) -> int:
    """Width of the backbone's pooled features, read from an architecture built on the meta device (no memory)."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None)
    fc = getattr(model, "fc", None)
    if not isinstance(fc, torch.nn.Linear):
        raise ValueError(f"backbone={name!r}: expected a torchvision classifier with an `fc` head (ResNet family)")
    return fc.in_features


def backbone_preprocessing(name: str, weights) -> dict:
    """Crop size, resize interpolation, mean and std from the weights' own `transforms()` (the builder's DEFAULT
    weights when the weights are random or a local file)."""
    import torchvision

    enum = _weights_enum(name)
    entry = None
    if enum is not None:
        entry = enum[weights] if isinstance(weights, str) and weights in enum.__members__ else enum.DEFAULT
    if entry is None:
        return {
            "crop_size": 224,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "interpolation": torchvision.transforms.InterpolationMode.BILINEAR,
        }
    transform = entry.transforms()
    return {
        "crop_size": int(transform.crop_size[0]),
        "mean": list(transform.mean),
        "std": list(transform.std),
        "interpolation": transform.interpolation,
    }



@torch.inference_mode()
def frr_forward(processor, rgb_images: list[Image.Image]) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
    """Detects, crops and encodes a chunk of RGB images; returns the crop features (N, D), objects per image and
    the boxes (objects, 4) of each image (pixels of the downscaled image). `processor` gives the settings and the
    built modules (`PMNERImageProcessor.load_models` has run)."""
    device = processor._models_device
    preprocessing = processor.preprocessing
    tensors = [
        torch.from_numpy(np.array(image)).permute(2, 0, 1).to(device)  # (3, H, W) uint8
        for image in rgb_images
    ]
    detections = _detect(processor, tensors)  # per image (k, 4), k <= max_objects
    mean = torch.tensor(preprocessing["mean"], device=device).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    std = torch.tensor(preprocessing["std"], device=device).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    size = preprocessing["crop_size"]
    crops, counts, all_boxes = [], [], []
    for tensor, image_boxes in zip(tensors, detections):
        height, width = tensor.shape[-2:]
        if processor.add_whole_image and image_boxes.shape[0] < processor.max_objects:
            whole = torch.tensor([[0.0, 0.0, float(width), float(height)]], device=device)  # (1, 4)
            image_boxes = torch.cat([image_boxes, whole])  # (k + 1, 4)
        for x1, y1, x2, y2 in image_boxes.tolist():
            left = min(max(int(np.floor(x1)), 0), width - 1)
            top = min(max(int(np.floor(y1)), 0), height - 1)
            right = max(min(int(np.ceil(x2)), width), left + 1)
            bottom = max(min(int(np.ceil(y2)), height), top + 1)
            crops.append(_resize(tensor[:, top:bottom, left:right], size, preprocessing["interpolation"]))  # (3, S, S) float in [0, 1]
        counts.append(image_boxes.shape[0])
        all_boxes.append(image_boxes)
    if not crops:
        return torch.zeros(0, processor.feature_dim), counts, all_boxes
    batch = (torch.stack(crops) - mean) / std  # (N, 3, S, S)
    features = processor._backbone_module(batch)  # (N, D)
    if features.dim() != 2 or features.shape != (batch.shape[0], processor.feature_dim):
        raise ValueError(
            f"backbone {processor.backbone!r} returned shape {tuple(features.shape)}; expected "
            f"({batch.shape[0]}, feature_dim={processor.feature_dim})"
        )
    return features, counts, all_boxes

def _resize(crop: torch.Tensor, size: int, interpolation) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as tvF

    crop = crop.float().unsqueeze(0) / 255.0  # (1, 3, h, w)
    resized = tvF.resize(crop, [size, size], interpolation=interpolation, antialias=True)
    return resized[0].clamp_(0.0, 1.0)  # (3, S, S)

def _detect(processor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per image, the boxes (k, 4) of the first `max_objects` detections (by score) above `score_threshold`."""
    device = processor._models_device
    if processor._detector_module is None:
        return [torch.zeros(0, 4, device=device) for _ in tensors]
    inputs = [tensor.float() / 255.0 for tensor in tensors]  # each (3, H, W) in [0, 1] (ObjectDetection())
    outputs = processor._detector_module(inputs)
    if len(outputs) != len(inputs):
        raise ValueError(f"detector {processor.detector!r} returned {len(outputs)} results for {len(inputs)} images")
    kept = []
    for output in outputs:
        scores = output["scores"].to(device)  # (K,)
        boxes = output["boxes"].to(device, torch.float32)  # (K, 4)
        order = torch.sort(scores, descending=True, stable=True).indices  # (K,)
        scores, boxes = scores[order], boxes[order]
        boxes = boxes[scores > processor.score_threshold][: processor.max_objects]  # (k, 4)
        kept.append(boxes)
    return kept

# -- datasets ------------------------------------------------------------------------------------------------


__all__ = ["backbone_feature_dim", "backbone_preprocessing", "build_backbone", "build_detector", "frr_forward"]
