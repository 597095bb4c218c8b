"""Image decoding of P-MNER's FRR image processor: any image input (path, PIL image, array, tensor, bytes,
`{"path", "bytes"}` dict) to 8-bit RGB with its EXIF orientation applied, downscaled, with clear errors naming the
image; and content keys of images (sha1 of their bytes) for the feature cache.

Copied flat into saved processor folders (remote code): imports only numpy, torch and PIL.
"""

import hashlib
import io
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


# Pillow's own decompression-bomb limit (warning level); over it an image is refused unless max_image_pixels is raised.
DEFAULT_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)


class BadImageError(ValueError):
    """An image that is missing, empty or cannot be decoded; the message names the image."""


class BadImageWarning(UserWarning):
    """Issued (with `on_bad_image="blank"`) for each image that is processed as text-only."""


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



__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "BadImageError",
    "BadImageWarning",
    "array_to_pil",
    "content_key",
    "describe_image",
    "load_image",
    "to_rgb",
]
