"""FRR image processor of P-MNER (paper section 3.2).

A Faster R-CNN finds the objects of an image; the first `max_objects` detections whose score is above
`score_threshold` are cropped from the image and each crop goes through a ResNet whose pooled last convolution stage
(2048 values for ResNet-152) is that object's feature. The processor turns images (paths, PIL images, arrays, bytes)
into `visual_features` (batch, max_objects, feature_dim) and `visual_mask` (batch, max_objects), and extracts and
caches them for a whole `datasets.Dataset` (`extract_dataset_features`).

This file is copied flat into saved processor folders (remote code): it imports only torch, torchvision,
transformers, PIL and numpy at module level.
"""

import copy
import hashlib
import io
import json
import os
import uuid
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging


try:
    from safetensors.torch import load_file as safetensors_load_file
    from safetensors.torch import save_file as safetensors_save_file
except ImportError:  # safetensors is a dependency of transformers; kept optional for the remote-code check
    safetensors_load_file = safetensors_save_file = None

try:
    import datasets
except ImportError:
    datasets = None


logger = logging.get_logger(__name__)

BAD_IMAGE_POLICIES = ("blank", "error")
# Pillow's own decompression-bomb limit (warning level); over it an image is refused unless max_image_pixels is raised.
DEFAULT_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)
CACHE_FORMAT_VERSION = 1


class BadImageError(ValueError):
    """An image that is missing, empty or cannot be decoded; the message names the image."""


class BadImageWarning(UserWarning):
    """Issued (with `on_bad_image="blank"`) for each image that is processed as text-only."""


class PMNERImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    detector (`str`, *optional*, defaults to `"fasterrcnn_resnet50_fpn_v2"`):
        Name of a `torchvision.models.detection` builder. `None`: no detection, the whole image is the only object.
    detector_weights (`str`, *optional*, defaults to `"DEFAULT"`):
        `"DEFAULT"` or another weights name of the builder (COCO), `None` (random weights), or a local file
        (`.safetensors`, or a state dict read with `torch.load(weights_only=True)`).
    detector_kwargs (`dict`, *optional*):
        Extra arguments of the detector builder (e.g. `{"min_size": 512}`, `{"box_score_thresh": 0.0}`).
    backbone (`str`, *optional*, defaults to `"resnet152"`):
        Name of a torchvision classification builder with an `fc` head (ResNet family); the head is dropped and the
        pooled last stage is the object feature.
    backbone_weights (`str`, *optional*, defaults to `"DEFAULT"`):
        As `detector_weights`, for the backbone (ImageNet).
    score_threshold (`float`, *optional*, defaults to 0.95):
        A detection is kept when its score is strictly above this.
    max_objects (`int`, *optional*, defaults to 5):
        Objects per image (the output's second dimension).
    crop_size (`int`, *optional*):
        Side of the square each object crop is resized to. Defaults to the backbone weights' `crop_size` (224).
    add_whole_image (`bool`, *optional*, defaults to `True`):
        When fewer than `max_objects` detections pass, the whole image is added as one more object.
    on_bad_image (`str`, *optional*, defaults to `"blank"`):
        `"blank"`: a missing/unreadable image gives zero features and an all-false mask, with a `BadImageWarning`
        naming it (counted in `bad_image_count`). `"error"`: raise `BadImageError` naming it.
    max_image_side (`int`, *optional*, defaults to 1333):
        Images are decoded (JPEG draft mode) and downscaled to this longest side before detection and cropping.
    max_image_pixels (`int`, *optional*, defaults to 89478485):
        Decompression-bomb guard: an image with more pixels is refused (a bad image). `None` disables the guard.
    batch_size (`int`, *optional*, defaults to 8):
        Images per detector/backbone forward.
    """

    detector: str | None
    detector_weights: str | None
    detector_kwargs: dict | None
    backbone: str
    backbone_weights: str | None
    score_threshold: float
    max_objects: int
    crop_size: int | None
    add_whole_image: bool
    on_bad_image: str
    max_image_side: int | None
    max_image_pixels: int | None
    batch_size: int


SETTINGS = {
    "detector": "fasterrcnn_resnet50_fpn_v2",
    "detector_weights": "DEFAULT",
    "detector_kwargs": None,
    "backbone": "resnet152",
    "backbone_weights": "DEFAULT",
    "score_threshold": 0.95,
    "max_objects": 5,
    "crop_size": None,
    "add_whole_image": True,
    "on_bad_image": "blank",
    "max_image_side": 1333,
    "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS,
    "batch_size": 8,
}
# Settings that change the features (and hence the cache fingerprint).
FEATURE_SETTINGS = (
    "detector",
    "detector_weights",
    "detector_kwargs",
    "backbone",
    "backbone_weights",
    "score_threshold",
    "max_objects",
    "crop_size",
    "add_whole_image",
    "max_image_side",
)


# ----------------------------------------------------------------------------------------------------------------------
# Image loading
# ----------------------------------------------------------------------------------------------------------------------


def describe_image(image, index: int | None = None) -> str:
    """A short name of an image input for messages: its path where it has one."""
    suffix = "" if index is None else f" #{index}"
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, dict):
        if image.get("path"):
            return str(image["path"])
        if image.get("bytes") is not None:
            return f"<image bytes{suffix}, sha1 {hashlib.sha1(image['bytes']).hexdigest()[:12]}>"
        return f"<empty image dict{suffix}>"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<image bytes{suffix}, sha1 {hashlib.sha1(bytes(image)).hexdigest()[:12]}>"
    if isinstance(image, Image.Image):
        filename = getattr(image, "filename", None)
        return filename if filename else f"<PIL image{suffix} {image.mode} {image.size[0]}x{image.size[1]}>"
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return f"<{type(image).__name__}{suffix} shape {tuple(image.shape)}>"
    if image is None:
        return f"<no image{suffix}>"
    return f"<{type(image).__name__}{suffix}>"


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB: grayscale and palette are expanded, transparency is composited on
    white, CMYK/YCbCr/LAB are converted, and 16-bit or float data is rescaled to 0-255 (Pillow's own conversion
    would clip it)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image).astype(np.float64)  # (H, W)
        if mode.startswith("I;16"):
            array = array / 257.0
        elif mode == "I":
            peak = float(array.max(initial=0.0))
            array = array / 257.0 if 255.0 < peak <= 65535.0 else (array * 255.0 / peak if peak > 65535.0 else array)
        elif float(array.max(initial=0.0)) <= 1.0:
            array = array * 255.0
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)  # (H, W)
        return Image.fromarray(array, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def array_to_pil(array, name: str) -> Image.Image:
    """(H, W), (H, W, C) or (C, H, W) arrays of uint8, uint16, bool or float (0-1 or 0-255) to a PIL image."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.size == 0:
        raise BadImageError(f"Image {name} is an empty array of shape {array.shape}")
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]  # (H, W)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise BadImageError(
            f"Image {name} has shape {array.shape}; expected (H, W), (H, W, 3|4) or (3|4, H, W)"
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.round(array / 257.0)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise BadImageError(f"Image {name} holds NaN or infinite values")
        array = np.round(array * 255.0 if float(array.max(initial=0.0)) <= 1.0 else array)
    array = np.clip(array, 0, 255).astype(np.uint8)
    mode = "L" if array.ndim == 2 else ("RGB" if array.shape[-1] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def load_image(
    image,
    max_side: int | None = 1333,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    name: str | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Reads one image as 8-bit RGB with its EXIF orientation applied, downscaled to `max_side`.

    Args:
        image: a path, a PIL image, a numpy array / tensor, encoded bytes, or a `datasets.Image(decode=False)` dict
            (`{"path": ..., "bytes": ...}`).
        max_side: longest side after loading (JPEGs are decoded at a reduced scale with `Image.draft`).
        max_pixels: images with more pixels are refused (decompression-bomb guard); `None` disables it.
        name: how messages name the image (defaults to its path or a description).

    Returns:
        `(rgb_image, (width, height))`: the RGB image and the image's size after EXIF orientation, before any
        downscaling.

    Raises:
        BadImageError: missing, empty, truncated or undecodable image, or one over `max_pixels`; the message names it.
    """
    name = name or describe_image(image)
    opened_here = False
    if image is None:
        raise BadImageError(f"Image {name} is missing (None)")
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            image = image["bytes"]
        elif image.get("path"):
            image = image["path"]
        else:
            raise BadImageError(f"Image {name} has neither a path nor bytes")

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.exists(path):
            raise BadImageError(f"Image file {path} does not exist")
        if os.path.isdir(path):
            raise BadImageError(f"Image path {path} is a directory")
        if os.path.getsize(path) == 0:
            raise BadImageError(f"Image file {path} is empty (0 bytes)")
        pil = _open(path, name)
        opened_here = True
    elif isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise BadImageError(f"Image {name} is empty (0 bytes)")
        pil = _open(io.BytesIO(bytes(image)), name)
        opened_here = True
    elif isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        pil = array_to_pil(image, name)
    else:
        raise BadImageError(
            f"Image {name} is a {type(image).__name__}; expected a path, PIL image, numpy array, tensor, bytes or "
            "a {'path', 'bytes'} dict"
        )

    try:
        rgb, original_size = _decode(pil, name, max_side, max_pixels, opened_here)
        if opened_here and rgb is pil:
            rgb = rgb.copy()  # the opened file is closed below
        return rgb, original_size
    finally:
        if opened_here:
            pil.close()


def _decode(pil: Image.Image, name: str, max_side, max_pixels, opened_here: bool):
    width, height = pil.size
    if width == 0 or height == 0:
        raise BadImageError(f"Image {name} has size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise BadImageError(
            f"Image {name} has {width}x{height} = {width * height} pixels, over max_image_pixels={max_pixels} "
            "(decompression-bomb guard); raise max_image_pixels, or set it to None, to accept it"
        )
    original = pil
    try:
        orientation = pil.getexif().get(0x0112, 1)
        if opened_here and max_side is not None and pil.format == "JPEG" and max(width, height) > max_side:
            # decode at 1/2, 1/4 or 1/8 scale while the longest side stays at least max_side
            ratio = max_side / max(width, height)
            pil.draft(None, (max(1, int(width * ratio)), max(1, int(height * ratio))))
        pil.load()
        pil = ImageOps.exif_transpose(pil)
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise BadImageError(f"Image {name} could not be decoded: {type(error).__name__}: {error}") from error
    original_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    if max_side is not None and max(pil.size) > max_side:
        if pil is original:
            pil = pil.copy()  # never resize the caller's image in place
        pil.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return to_rgb(pil), original_size


def _open(source, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # the pixel limit is checked by load_image with its own message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source)
    except Image.DecompressionBombError as error:
        raise BadImageError(
            f"Image {name} was refused by Pillow as a decompression bomb ({error}); it is far over any sane size"
        ) from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise BadImageError(f"Image {name} is not a readable image: {type(error).__name__}: {error}") from error


# ----------------------------------------------------------------------------------------------------------------------
# Model building
# ----------------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------------
# Feature cache
# ----------------------------------------------------------------------------------------------------------------------


class FRRFeatureCache:
    """Keyed store of FRR features: `<cache_dir>/frr-<fingerprint>/shard-*.safetensors`.

    Each shard holds `visual_features` (N, max_objects, feature_dim), `visual_mask` (N, max_objects) and, in its
    metadata, the N keys. Shards are written atomically (temporary file + rename), one per process and run, so
    several processes can add to one cache. `fingerprint` identifies the extraction settings: a change of settings
    gives a new folder, never stale features.
    """

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: str, settings: dict | None = None):
        self.folder = os.path.join(os.fspath(cache_dir), f"frr-{fingerprint}")
        self.fingerprint = fingerprint
        self.settings = settings or {}
        self.features = None  # (N, max_objects, feature_dim) after load()
        self.masks = None  # (N, max_objects)
        self.index: dict[str, int] = {}

    def shard_files(self) -> list[str]:
        if not os.path.isdir(self.folder):
            return []
        return sorted(
            os.path.join(self.folder, name)
            for name in os.listdir(self.folder)
            if name.startswith("shard-") and name.endswith(".safetensors")
        )

    def load(self) -> "FRRFeatureCache":
        """Reads every shard; a key present in several shards keeps its first copy."""
        if safetensors_load_file is None:
            raise ImportError("the FRR feature cache needs `safetensors`")
        features, masks, index = [], [], {}
        offset = 0
        for path in self.shard_files():
            tensors = safetensors_load_file(path)
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:
                keys = json.loads(handle.metadata()["keys"])
            if len(keys) != tensors["visual_features"].shape[0]:
                raise ValueError(f"FRR cache shard {path} is inconsistent: {len(keys)} keys for "
                                 f"{tensors['visual_features'].shape[0]} rows; delete it")
            features.append(tensors["visual_features"])  # (n, max_objects, feature_dim)
            masks.append(tensors["visual_mask"].bool())  # (n, max_objects)
            for row, key in enumerate(keys):
                index.setdefault(key, offset + row)
            offset += len(keys)
        self.features = torch.cat(features) if features else None  # (N, max_objects, feature_dim)
        self.masks = torch.cat(masks) if masks else None  # (N, max_objects)
        self.index = index
        return self

    def __contains__(self, key) -> bool:
        return str(key) in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        """`(visual_features (max_objects, feature_dim), visual_mask (max_objects,))` of a key."""
        row = self.index[str(key)]
        return self.features[row], self.masks[row]

    def write_shard(self, keys: list[str], features: torch.Tensor, masks: torch.Tensor, rank: int = 0) -> str | None:
        """Writes one shard of `features` (n, max_objects, feature_dim) and `masks` (n, max_objects)."""
        if not keys:
            return None
        if safetensors_save_file is None:
            raise ImportError("the FRR feature cache needs `safetensors`")
        os.makedirs(self.folder, exist_ok=True)
        settings_file = os.path.join(self.folder, "settings.json")
        if not os.path.exists(settings_file):
            temporary = f"{settings_file}.{uuid.uuid4().hex}.tmp"
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(self.settings, handle, indent=2, sort_keys=True, default=str)
            os.replace(temporary, settings_file)
        name = f"shard-{os.getpid()}-rank{rank}-{uuid.uuid4().hex[:12]}.safetensors"
        path = os.path.join(self.folder, name)
        temporary = path + ".tmp"
        safetensors_save_file(
            {
                "visual_features": features.detach().to("cpu", torch.float32).contiguous(),  # (n, M, D)
                "visual_mask": masks.detach().to("cpu", torch.bool).contiguous(),  # (n, M)
            },
            temporary,
            metadata={"keys": json.dumps([str(key) for key in keys]), "format_version": str(CACHE_FORMAT_VERSION)},
        )
        os.replace(temporary, path)
        return path


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _file_sha1(path: str) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_key(source) -> str:
    """Key of an image by content (sha1 of its file or bytes), for datasets without an image-id column."""
    if isinstance(source, dict):
        source = source.get("bytes") if source.get("bytes") is not None else source.get("path")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            return f"unreadable:{path}"
        return "sha1:" + _file_sha1(path)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "sha1:" + hashlib.sha1(bytes(source)).hexdigest()
    if isinstance(source, Image.Image):
        return "sha1:" + hashlib.sha1(source.tobytes() + repr((source.mode, source.size)).encode()).hexdigest()
    if isinstance(source, (np.ndarray, torch.Tensor)):
        array = np.ascontiguousarray(source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source)
        return "sha1:" + hashlib.sha1(array.tobytes() + repr((array.dtype.str, array.shape)).encode()).hexdigest()
    if source is None:
        return "missing"
    raise TypeError(f"cannot key an image of type {type(source).__name__}")


# ----------------------------------------------------------------------------------------------------------------------
# The image processor
# ----------------------------------------------------------------------------------------------------------------------


class PMNERImageProcessor(BaseImageProcessor):
    r"""
    FRR visual feature extractor of P-MNER (section 3.2): Faster R-CNN objects, cropped and encoded by a ResNet.

    Calling it on images returns a [`BatchFeature`] with
    - `visual_features`: `(batch, max_objects, feature_dim)` float32, zeros where there is no object;
    - `visual_mask`: `(batch, max_objects)` bool, true for the slots holding an object;
    - `visual_boxes` (with `return_boxes=True`): `(batch, max_objects, 4)` boxes (x1, y1, x2, y2) in pixels of the
      image after EXIF orientation, before downscaling.

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
        backbone_weights: str | None = SETTINGS["backbone_weights"],
        score_threshold: float = SETTINGS["score_threshold"],
        max_objects: int = SETTINGS["max_objects"],
        crop_size: int | None = SETTINGS["crop_size"],
        add_whole_image: bool = SETTINGS["add_whole_image"],
        on_bad_image: str = SETTINGS["on_bad_image"],
        max_image_side: int | None = SETTINGS["max_image_side"],
        max_image_pixels: int | None = SETTINGS["max_image_pixels"],
        batch_size: int = SETTINGS["batch_size"],
        **kwargs,
    ):
        for unused in ("image_processor_type", "processor_class"):
            kwargs.pop(unused, None)
        super().__init__(**kwargs)
        self.detector = detector
        self.detector_weights = os.fspath(detector_weights) if isinstance(detector_weights, os.PathLike) else detector_weights
        self.detector_kwargs = dict(detector_kwargs) if detector_kwargs else None
        self.backbone = backbone
        self.backbone_weights = os.fspath(backbone_weights) if isinstance(backbone_weights, os.PathLike) else backbone_weights
        self.score_threshold = float(score_threshold)
        self.max_objects = int(max_objects)
        self.crop_size = None if crop_size is None else int(crop_size)
        self.add_whole_image = bool(add_whole_image)
        self.on_bad_image = on_bad_image
        self.max_image_side = None if max_image_side is None else int(max_image_side)
        self.max_image_pixels = None if max_image_pixels is None else int(max_image_pixels)
        self.batch_size = int(batch_size)
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

    def validate_settings(self):
        """Checks the settings; raises `ValueError` naming the one at fault."""
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {self.on_bad_image!r}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be at least 1, got {self.max_objects}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.detector is None and not self.add_whole_image:
            raise ValueError("detector=None needs add_whole_image=True (there would be no object at all)")
        if self.crop_size is not None and self.crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")
        if self.max_image_side is not None and self.max_image_side < 32:
            raise ValueError(f"max_image_side must be at least 32, got {self.max_image_side}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        output = {key: copy.deepcopy(value) for key, value in self.__dict__.items() if not key.startswith("_")}
        output["image_processor_type"] = self.__class__.__name__
        return output

    def __deepcopy__(self, memo):
        # ProcessorMixin.to_dict deep-copies its attributes: copy the settings, share the (read-only) models.
        clone = self.__class__(**{key: value for key, value in self.to_dict().items() if key != "image_processor_type"})
        clone.__dict__.update({key: value for key, value in self.__dict__.items() if key.startswith("_")})
        clone._bad_images = list(self._bad_images)
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

    # -- models --------------------------------------------------------------------------------------------------

    @property
    def feature_dim(self) -> int:
        """Width of one object feature (2048 for ResNet-152), known without building the models."""
        if self._feature_dim is None:
            self._feature_dim = backbone_feature_dim(self.backbone)
        return self._feature_dim

    @property
    def preprocessing(self) -> dict:
        """Crop size, interpolation, mean and std of the backbone input (from the weights' `transforms()`)."""
        if self._preprocessing is None:
            self._preprocessing = backbone_preprocessing(self.backbone, self.backbone_weights)
            if self.crop_size is not None:
                self._preprocessing["crop_size"] = self.crop_size
        return self._preprocessing

    @property
    def models_built(self) -> bool:
        return self._backbone_module is not None

    def set_modules(self, backbone: torch.nn.Module, feature_dim: int, detector: torch.nn.Module | None = None):
        """Uses ready modules instead of the torchvision builders named in the settings.

        `backbone` maps normalised crops (N, 3, crop_size, crop_size) to (N, feature_dim). `detector` follows the
        torchvision detection API in eval mode: a list of (3, H, W) float images in [0, 1] to a list of dicts with
        `boxes` (K, 4) and `scores` (K,). With `detector=None` and the `detector` setting not None, a detector is
        still built from the settings.
        """
        self._backbone_module = backbone.eval()
        self._feature_dim = int(feature_dim)
        if detector is not None:
            self._detector_module = detector.eval()
        self._injected = True
        self._models_device = None

    def load_models(self, device=None) -> "PMNERImageProcessor":
        """Builds the detector and backbone (if not done yet) and moves them to `device`."""
        device = torch.device(device) if device is not None else self.default_device()
        if self._backbone_module is None:
            self._backbone_module = build_backbone(self.backbone, self.backbone_weights)
        if self.detector is not None and self._detector_module is None:
            self._detector_module = build_detector(self.detector, self.detector_weights, self.detector_kwargs)
        if self._models_device != device:
            self._backbone_module.to(device)
            if self._detector_module is not None:
                self._detector_module.to(device)
            self._models_device = device
        return self

    @staticmethod
    def default_device() -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

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
            return_boxes: also return `visual_boxes` (batch, max_objects, 4).
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
        features, masks, boxes, _ = self.extract(images, names, device=device, batch_size=batch_size)
        data = {"visual_features": features, "visual_mask": masks}  # (B, M, D), (B, M)
        if return_boxes:
            data["visual_boxes"] = boxes  # (B, M, 4)
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
        self, images: list, names: list[str] | None = None, device=None, batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """`(features (B, M, D), masks (B, M), boxes (B, M, 4), bad_indices)` on the CPU for a list of images; bad
        images follow `on_bad_image` (their rows are zeros, their indices listed)."""
        names = names or [describe_image(image, index) for index, image in enumerate(images)]
        batch_size = batch_size or self.batch_size
        count = len(images)
        if count == 0:
            return (
                torch.zeros(0, self.max_objects, self.feature_dim),  # (0, M, D)
                torch.zeros(0, self.max_objects, dtype=torch.bool),  # (0, M)
                torch.zeros(0, self.max_objects, 4),  # (0, M, 4)
                [],
            )
        loaded = []  # (index, rgb image, original size)
        for index, (image, name) in enumerate(zip(images, names)):
            if image is None:
                continue  # no image on purpose (a text-only tweet): blank, no warning
            try:
                rgb, original_size = load_image(image, self.max_image_side, self.max_image_pixels, name=name)
            except BadImageError as error:
                self._bad_image(name, error)
                continue
            loaded.append((index, rgb, original_size))
        if loaded:
            self.load_models(device)
        bad = [index for index in range(count) if index not in {entry[0] for entry in loaded}]
        feature_dim = self.feature_dim
        features = torch.zeros(count, self.max_objects, feature_dim)  # (B, M, D)
        masks = torch.zeros(count, self.max_objects, dtype=torch.bool)  # (B, M)
        boxes = torch.zeros(count, self.max_objects, 4)  # (B, M, 4)
        for start in range(0, len(loaded), batch_size):
            chunk = loaded[start : start + batch_size]
            chunk_features, chunk_counts, chunk_boxes = self._forward([rgb for _, rgb, _ in chunk])
            offset = 0
            for (index, rgb, (width, height)), objects, image_boxes in zip(chunk, chunk_counts, chunk_boxes):
                features[index, :objects] = chunk_features[offset : offset + objects].float().cpu()  # (objects, D)
                masks[index, :objects] = True
                scale = torch.tensor([width / rgb.width, height / rgb.height] * 2)  # (4,)
                boxes[index, :objects] = image_boxes.cpu() * scale  # (objects, 4)
                offset += objects
        return features, masks, boxes, bad

    @torch.inference_mode()
    def _forward(self, rgb_images: list[Image.Image]) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
        """Detects, crops and encodes a chunk of RGB images; returns the crop features (N, D), objects per image and
        the boxes (objects, 4) of each image (pixels of the downscaled image)."""
        device = self._models_device
        preprocessing = self.preprocessing
        tensors = [
            torch.from_numpy(np.array(image)).permute(2, 0, 1).to(device)  # (3, H, W) uint8
            for image in rgb_images
        ]
        detections = self._detect(tensors)  # per image (k, 4), k <= max_objects
        mean = torch.tensor(preprocessing["mean"], device=device).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        std = torch.tensor(preprocessing["std"], device=device).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        size = preprocessing["crop_size"]
        crops, counts, all_boxes = [], [], []
        for tensor, image_boxes in zip(tensors, detections):
            height, width = tensor.shape[-2:]
            if self.add_whole_image and image_boxes.shape[0] < self.max_objects:
                whole = torch.tensor([[0.0, 0.0, float(width), float(height)]], device=device)  # (1, 4)
                image_boxes = torch.cat([image_boxes, whole])  # (k + 1, 4)
            for x1, y1, x2, y2 in image_boxes.tolist():
                left = min(max(int(np.floor(x1)), 0), width - 1)
                top = min(max(int(np.floor(y1)), 0), height - 1)
                right = max(min(int(np.ceil(x2)), width), left + 1)
                bottom = max(min(int(np.ceil(y2)), height), top + 1)
                crops.append(self._resize(tensor[:, top:bottom, left:right], size))  # (3, S, S) float in [0, 1]
            counts.append(image_boxes.shape[0])
            all_boxes.append(image_boxes)
        if not crops:
            return torch.zeros(0, self.feature_dim), counts, all_boxes
        batch = (torch.stack(crops) - mean) / std  # (N, 3, S, S)
        features = self._backbone_module(batch)  # (N, D)
        if features.dim() != 2 or features.shape != (batch.shape[0], self.feature_dim):
            raise ValueError(
                f"backbone {self.backbone!r} returned shape {tuple(features.shape)}; expected "
                f"({batch.shape[0]}, feature_dim={self.feature_dim})"
            )
        return features, counts, all_boxes

    def _resize(self, crop: torch.Tensor, size: int) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as tvF

        crop = crop.float().unsqueeze(0) / 255.0  # (1, 3, h, w)
        resized = tvF.resize(crop, [size, size], interpolation=self.preprocessing["interpolation"], antialias=True)
        return resized[0].clamp_(0.0, 1.0)  # (3, S, S)

    def _detect(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per image, the boxes (k, 4) of the first `max_objects` detections (by score) above `score_threshold`."""
        device = self._models_device
        if self._detector_module is None:
            return [torch.zeros(0, 4, device=device) for _ in tensors]
        inputs = [tensor.float() / 255.0 for tensor in tensors]  # each (3, H, W) in [0, 1] (ObjectDetection())
        outputs = self._detector_module(inputs)
        if len(outputs) != len(inputs):
            raise ValueError(f"detector {self.detector!r} returned {len(outputs)} results for {len(inputs)} images")
        kept = []
        for output in outputs:
            scores = output["scores"].to(device)  # (K,)
            boxes = output["boxes"].to(device, torch.float32)  # (K, 4)
            order = torch.sort(scores, descending=True, stable=True).indices  # (K,)
            scores, boxes = scores[order], boxes[order]
            boxes = boxes[scores > self.score_threshold][: self.max_objects]  # (k, 4)
            kept.append(boxes)
        return kept

    # -- datasets ------------------------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Hash of the settings that change the features (weights files by path, size and mtime; injected modules
        by their parameters)."""
        settings = {key: getattr(self, key) for key in FEATURE_SETTINGS}
        for key in ("detector_weights", "backbone_weights"):
            value = settings[key]
            if _is_weights_file(value) and os.path.isfile(value):
                stat = os.stat(value)
                settings[key] = [os.path.abspath(value), stat.st_size, stat.st_mtime_ns]
        settings["crop_size"] = self.preprocessing["crop_size"]
        if self._injected:
            digest = hashlib.sha1()
            for module in (self._backbone_module, self._detector_module):
                if module is None:
                    continue
                digest.update(type(module).__qualname__.encode())
                for name, tensor in module.state_dict().items():
                    digest.update(name.encode())
                    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            settings["injected_modules"] = digest.hexdigest()
        text = json.dumps(settings, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

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
    ):
        """Adds FRR features to a `datasets.Dataset`, computing each distinct image once and caching it.

        Images are keyed by `key_column` (e.g. the tweet's image id; tweets sharing an image are computed once) or,
        when the dataset has no such column or `key_column=None`, by the sha1 of the image file / bytes. Features
        are stored in `<cache_dir>/frr-<settings fingerprint>/` as safetensors shards; a second run (or another
        process) reads them instead of recomputing. Bad images (see `on_bad_image`) are never cached.

        Under `torch.distributed` (torchrun, accelerate) each process computes a disjoint share of the missing
        images and writes its own shard; after a barrier every process reads the whole cache. Call it on every
        process.

        Args:
            dataset: a `datasets.Dataset` whose `image_column` holds images (`datasets.Image`, paths or bytes).
            image_column: the column of images.
            key_column: the column of image ids, or `None` to key by content.
            cache_dir: where features are kept (default: `<HF datasets cache>/pmner-frr`).
            batch_size: images per forward (default: the `batch_size` setting).
            device: where the models run.
            progress: show a progress bar (on the main process only).

        Returns:
            The dataset with two more columns: `visual_features` (`Array2D` (max_objects, feature_dim) float32) and
            `visual_mask` (max_objects bools). Existing columns of those names are replaced.
        """
        if datasets is None:
            raise ImportError("extract_dataset_features needs the `datasets` package")
        if image_column not in dataset.column_names:
            raise ValueError(f"image_column={image_column!r} is not a column of the dataset: {dataset.column_names}")
        if key_column is not None and key_column not in dataset.column_names:
            logger.warning(
                f"key_column={key_column!r} is not a column of the dataset ({dataset.column_names}); images are "
                "keyed by the sha1 of their content"
            )
            key_column = None
        if cache_dir is None:
            cache_dir = os.path.join(datasets.config.HF_DATASETS_CACHE, "pmner-frr")
        rank, world_size = _distributed()
        raw = dataset
        if isinstance(dataset.features[image_column], datasets.Image):
            raw = dataset.cast_column(image_column, datasets.Image(decode=False))
        columns = [image_column] + ([key_column] if key_column is not None else [])
        raw = raw.select_columns(columns)

        # 1. key of every row; first row of each distinct key
        row_keys: list[str] = []
        first_row: dict[str, int] = {}
        for batch in raw.iter(batch_size=1000):
            sources = batch[image_column]
            keys = [str(key) for key in batch[key_column]] if key_column else [content_key(s) for s in sources]
            for key, source in zip(keys, sources):
                if key_column and source is None:
                    key = f"missing:{key}"
                first_row.setdefault(key, len(row_keys))
                row_keys.append(key)

        # 2. compute the missing keys (this process's share) and write a shard
        cache = self.feature_cache(cache_dir).load()
        pending = sorted(key for key in first_row if key not in cache)
        if world_size > 1:
            torch.distributed.barrier()  # every process has read the same cache state before anyone writes
        share = pending[rank::world_size]
        local_error = None
        try:
            self._extract_keys(raw, image_column, share, first_row, cache, rank, batch_size, device, progress)
        except Exception as error:  # re-raised below, after telling the other processes (no hang at the barrier)
            local_error = error
        if world_size > 1:
            errors = [None] * world_size
            torch.distributed.all_gather_object(errors, None if local_error is None else repr(local_error))
            if local_error is None and any(errors):
                failed = next(index for index, message in enumerate(errors) if message)
                raise RuntimeError(f"FRR feature extraction failed on process {failed}: {errors[failed]}")
        if local_error is not None:
            raise local_error
        if world_size > 1:
            torch.distributed.barrier()
        cache = self.feature_cache(cache_dir).load()

        # 3. add the columns
        feature_dim = cache.features.shape[-1] if cache.features is not None else self.feature_dim
        missing = sorted({key for key in row_keys if key not in cache})
        fingerprint_text = json.dumps(
            [getattr(dataset, "_fingerprint", ""), cache.fingerprint, len(cache), missing, image_column, key_column]
        )
        new_fingerprint = hashlib.sha256(fingerprint_text.encode()).hexdigest()[:32]
        rows = torch.tensor([cache.index.get(key, -1) for key in row_keys])  # (rows,)

        def add_features(batch, indices):
            positions = rows[indices]  # (b,)
            out_features = np.zeros((len(indices), self.max_objects, feature_dim), dtype=np.float32)  # (b, M, D)
            out_masks = np.zeros((len(indices), self.max_objects), dtype=bool)  # (b, M)
            present = positions >= 0
            if present.any():
                out_features[present.numpy()] = cache.features[positions[present]].numpy()  # (b', M, D)
                out_masks[present.numpy()] = cache.masks[positions[present]].numpy()  # (b', M)
            return {"visual_features": out_features, "visual_mask": out_masks}

        existing = [name for name in ("visual_features", "visual_mask") if name in dataset.column_names]
        base = dataset.remove_columns(existing) if existing else dataset
        features = base.features.copy()
        features["visual_features"] = datasets.Array2D(shape=(self.max_objects, feature_dim), dtype="float32")
        features["visual_mask"] = datasets.List(datasets.Value("bool"), length=self.max_objects)
        map_kwargs = dict(
            batched=True, with_indices=True, features=features, new_fingerprint=new_fingerprint,
            desc="Adding FRR features",
        )
        if world_size > 1 and rank != 0:
            torch.distributed.barrier()  # the main process writes the datasets cache first
        result = base.map(add_features, **map_kwargs)
        if world_size > 1 and rank == 0:
            torch.distributed.barrier()
        return result

    def _extract_keys(self, raw, image_column, keys, first_row, cache, rank, batch_size, device, progress):
        batch_size = batch_size or self.batch_size
        if not keys:
            return
        from transformers.utils.logging import tqdm

        done_keys, done_features, done_masks = [], [], []
        bar = tqdm(total=len(keys), desc="FRR features", unit="image", disable=not progress or rank != 0)
        try:
            for start in range(0, len(keys), batch_size):
                chunk = keys[start : start + batch_size]
                sources = raw[[first_row[key] for key in chunk]][image_column]
                names = [f"{describe_image(source)} (key {key})" for key, source in zip(chunk, sources)]
                features, masks, _, bad = self.extract(sources, names, device=device, batch_size=batch_size)
                for index, (key, feature, mask) in enumerate(zip(chunk, features, masks)):
                    if index in bad:
                        continue  # never cache a bad image: a fixed file is read again next time
                    done_keys.append(key)
                    done_features.append(feature)  # (M, D)
                    done_masks.append(mask)  # (M,)
                bar.update(len(chunk))
        finally:
            bar.close()
            if done_keys:  # what was computed is kept even when a later image raised
                cache.write_shard(done_keys, torch.stack(done_features), torch.stack(done_masks), rank=rank)


__all__ = [
    "BadImageError",
    "BadImageWarning",
    "FRRFeatureCache",
    "PMNERImageProcessor",
    "load_image",
    "to_rgb",
]
