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

The work is split by concern: `image_settings.py` declares the settings, `image_loading.py` decodes images,
`image_frr_models.py` holds the FRR networks (`FRRModels`, built by `image_frr_builders.py`, their weights saved with
the processor by `image_frr_weights.py`), `image_frr_forward.py` runs them, `image_feature_cache.py` holds the feature
cache, `image_feature_claims.py` its concurrent writers and `image_dataset_features.py` the dataset extraction; this
file holds the processor and re-exports the public names of its siblings.

This file and its siblings are copied flat into saved processor folders (remote code): they import only torch,
torchvision, transformers, PIL and numpy at module level, and each other relatively.
"""

import copy
import os
import warnings
from typing import Unpack

import numpy as np
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from .image_dataset_features import extract_dataset_features
from .image_feature_cache import FRRFeatureCache
from .image_frr_builders import _weights_enum
from .image_frr_forward import (
    GRID_CELL_LABEL,
    GRID_CELL_NAME,
    NO_OBJECT_LABEL,
    WHOLE_IMAGE_LABEL,
    WHOLE_IMAGE_NAME,
    extract_images,
)
from .image_frr_models import FRRModels
from .image_frr_weights import hub_kwargs_of, resolve_revision_once
from .image_loading import (
    BadImageError,
    BadImageWarning,
    describe_image,
    load_image,
    to_rgb,
)
from .image_settings import (
    DECLARED_NAMES,
    SETTINGS,
    check_settings,
    convert_settings,
    features_fingerprint,
    settings_typed_dict,
)


# The keyword arguments: transformers' `ImagesKwargs` and the settings (documented in `image_settings.py`)
PMNERImageProcessorKwargs = settings_typed_dict("PMNERImageProcessorKwargs", ImagesKwargs, __name__)


class PMNERImageProcessor(BaseImageProcessor):
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

    def __init__(self, **kwargs: Unpack[PMNERImageProcessorKwargs]):
        for unused in ("image_processor_type", "processor_class"):
            kwargs.pop(unused, None)
        given = {name: kwargs.pop(name) for name in list(kwargs) if name in DECLARED_NAMES}
        super().__init__(**kwargs)  # other names are kept as attributes, as transformers does
        for name, value in convert_settings(given).items():
            setattr(self, name, value)
        self._reset_runtime()
        self.validate_settings()

    # -- settings -------------------------------------------------------------------------------------------------

    def _reset_runtime(self):
        # Runtime state: never saved (names start with "_"), rebuilt lazily.
        self._frr_models = FRRModels(self)
        self._bad_images = []

    def validate_settings(self):
        """Checks the settings; raises `ValueError` naming the one at fault."""
        check_settings(self)

    def to_dict(self) -> dict:
        output = {key: copy.deepcopy(value) for key, value in self.__dict__.items() if not key.startswith("_")}
        output.update(self._frr_models.save_overrides)
        output["image_processor_type"] = self.__class__.__name__
        return output

    def __deepcopy__(self, memo):
        # ProcessorMixin.to_dict deep-copies its attributes: copy the settings, share the (read-only) models.
        clone = self.__class__(**{key: value for key, value in self.to_dict().items() if key != "image_processor_type"})
        clone.__dict__.update({key: value for key, value in self.__dict__.items() if key.startswith("_")})
        clone._bad_images = list(self._bad_images)
        clone._frr_models = self._frr_models.copy_for(clone)
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

    # -- FRR networks (`FRRModels`) ------------------------------------------------------------------------------

    @property
    def frr_models(self) -> FRRModels:
        """The detector and backbone that these settings name (built lazily)."""
        return self._frr_models

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Saves the settings and, with `save_frr_weights`, the detector and backbone weights (see `frr_weights`)."""
        return self._frr_models.save(self, super().save_pretrained, save_directory, push_to_hub, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Loads the settings and locates the FRR weights files saved with them (nothing is built yet)."""
        kwargs = resolve_revision_once(pretrained_model_name_or_path, kwargs)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        processor = loaded[0] if isinstance(loaded, tuple) else loaded
        processor.attach_frr_weights(pretrained_model_name_or_path, **hub_kwargs_of(kwargs))
        return loaded

    def attach_frr_weights(self, pretrained_model_name_or_path, **hub_kwargs) -> "PMNERImageProcessor":
        """Uses the FRR weights files that `frr_weights` lists, from a folder or Hub repo (`hub_kwargs`: `cache_dir`,
        `revision`, `token`, `local_files_only`, ...); a missing or truncated file raises `OSError` naming it."""
        self._frr_models.attach(pretrained_model_name_or_path, **hub_kwargs)
        return self

    def weights_sha256(self, component: str) -> str:
        """sha256 of the `"backbone"` or `"detector"` weights in use (see `FRRModels.weights_sha256`)."""
        return self._frr_models.weights_sha256(component)

    @property
    def feature_dim(self) -> int:
        """Width of one object feature at `feature_layer` (ResNet-152: 2048 for `"layer4"`, 1024 for `"layer3"`),
        known without building the models."""
        return self._frr_models.feature_dim

    @property
    def preprocessing(self) -> dict:
        """Crop size, interpolation, mean and std of the backbone input (from the weights' `transforms()`)."""
        return self._frr_models.preprocessing

    @property
    def models_built(self) -> bool:
        return self._frr_models.built

    def set_modules(self, backbone: torch.nn.Module, feature_dim: int, detector: torch.nn.Module | None = None):
        """Uses ready modules instead of the torchvision builders named in the settings: `backbone` maps normalised
        crops to features, `detector` follows torchvision's detection API (see `FRRModels.inject`)."""
        self._frr_models.inject(backbone, feature_dim, detector)

    def load_models(self, device=None) -> "PMNERImageProcessor":
        """Builds the detector and backbone (if not done yet) and moves them to `device`."""
        self._frr_models.load(device)
        return self

    default_device = staticmethod(FRRModels.default_device)

    # the networks and located files under the names that tests and benchmarks reach them by
    _backbone_module = property(
        lambda self: self._frr_models.backbone_module,
        lambda self, module: setattr(self._frr_models, "backbone_module", module),
    )
    _detector_module = property(
        lambda self: self._frr_models.detector_module,
        lambda self, module: setattr(self._frr_models, "detector_module", module),
    )
    _weights_files = property(lambda self: self._frr_models.weights_files)

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
        if self.detector is None or self._frr_models.injected:
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
        `cache_dtype`: "float32" or "float16"); see `image_dataset_features.extract_dataset_features` for the arguments.
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
    "describe_image",
    "load_image",
    "to_rgb",
]
