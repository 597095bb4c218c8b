"""FRR networks of P-MNER (paper section 3.2) as an object: `FRRModels` belongs to a `PMNERImageProcessor` and holds
its detector and backbone, built lazily from the processor's settings (`image_frr_builders.py`) or read from the
weights files saved with them (`image_frr_weights.py`), injected with `set_modules`, saved with the processor and
hashed for the feature cache.

A folder's saved weights reach the networks through one path whatever loads the folder (`from_pretrained` of the
image processor or of `PMNERProcessor`, hence the Auto classes, the pipeline, the CLI and the demo): the settings are
built first (transformers may build them through `from_dict`, without the folder), then `attach` locates the files
that their `frr_weights` record lists; settings that record saved weights are never rebuilt from their origin.

This file re-exports the names of `image_frr_builders.py` and `image_frr_weights.py`, imported from here elsewhere.
Copied flat into saved processor folders (remote code): imports only torch and transformers at module level.
"""

import copy
import os

import torch

from .image_frr_builders import (
    FEATURE_LAYERS,
    backbone_feature_dim,
    backbone_feature_map,
    backbone_preprocessing,
    build_backbone,
    build_detector,
    has_resnet_stages,
    saved_origin,
    weights_origin,
)
from .image_frr_weights import (
    FRR_WEIGHTS_DTYPES,
    FRR_WEIGHTS_FILES,
    FRR_WEIGHTS_FORMAT,
    locate_frr_weights,
    read_weights_file,
    tensors_sha256,
    unattached_weights_message,
    write_weights_file,
)


class FRRModels:
    """The detector and backbone that an image processor's settings name. Runtime state only (never saved with the
    settings): a new one comes with new settings, and `attach` starts it over on the weights files of a folder."""

    def __init__(self, settings):
        self.settings = settings  # the image processor whose settings name the networks
        self.detector_module = None
        self.backbone_module = None
        self.injected = False
        self.device = None
        self._feature_dim = None
        self._preprocessing = None
        self.weights_files = {}  # component -> local FRR weights file of the folder the settings were loaded from
        self._weights_sha256 = {}  # component -> sha256 of the weights in use, computed once
        self.save_overrides = {}  # settings as a saved folder names them, during `save` only

    def copy_for(self, settings) -> "FRRModels":
        """The same (read-only, shared) networks for a copy of the settings."""
        clone = copy.copy(self)
        clone.settings = settings
        clone.weights_files, clone._weights_sha256 = dict(self.weights_files), dict(self._weights_sha256)
        return clone

    # -- saved weights -------------------------------------------------------------------------------------------

    def attach(self, pretrained_model_name_or_path, **hub_kwargs) -> None:
        """Uses the FRR weights files that the settings' `frr_weights` lists, from a folder or Hub repo."""
        record = self.settings.frr_weights
        if record:
            self.weights_files = locate_frr_weights(pretrained_model_name_or_path, record, **hub_kwargs)
            self.detector_module = self.backbone_module = None
            self._weights_sha256 = {}

    def saved_state(self, component: str) -> dict | None:
        """The verified tensors of the saved weights file of `component`; `None` when the settings record no saved
        weights for it (a fresh processor: built from its weights setting). Settings that record saved weights are
        never rebuilt from their origin: without the located file this is an error naming it."""
        entry = (self.settings.frr_weights or {}).get(component)
        if not entry:
            return None
        path = self.weights_files.get(component)
        if path is None:
            raise OSError(unattached_weights_message(component, entry))
        return read_weights_file(path, entry["sha256"])

    def weights_sha256(self, component: str) -> str:
        """sha256 of the `"backbone"` or `"detector"` weights in use (builds the models once if they are not read
        from a saved folder); kept, so the cache fingerprint never hashes ~400 MB twice."""
        if component not in self._weights_sha256:
            if component in self.weights_files:
                self._weights_sha256[component] = self.settings.frr_weights[component]["sha256"]
            else:
                self.load(self.device)
                module = self.backbone_module if component == "backbone" else self.detector_module
                self._weights_sha256[component] = tensors_sha256(module.state_dict())
        return self._weights_sha256[component]

    # -- networks ------------------------------------------------------------------------------------------------

    @property
    def feature_dim(self) -> int:
        """Width of one object feature at `feature_layer`, known without building the models."""
        if self._feature_dim is None:
            self._feature_dim = backbone_feature_dim(self.settings.backbone, self.settings.feature_layer)
        return self._feature_dim

    @property
    def preprocessing(self) -> dict:
        """Crop size, interpolation, mean and std of the backbone input (from the weights' `transforms()`)."""
        if self._preprocessing is None:
            self._preprocessing = backbone_preprocessing(self.settings.backbone, self.settings.backbone_weights)
            if self.settings.crop_size is not None:
                self._preprocessing["crop_size"] = self.settings.crop_size
        return self._preprocessing

    @property
    def built(self) -> bool:
        return self.backbone_module is not None

    def inject(self, backbone: torch.nn.Module, feature_dim: int, detector: torch.nn.Module | None = None) -> None:
        """Uses ready modules instead of the torchvision builders named in the settings.

        `backbone` maps normalised crops (N, 3, crop_size, crop_size) to (N, feature_dim); with `feature_layer="layer3"`
        or a `grid_size` its stages are run one by one (a torchvision ResNet: `conv1` ... `layer4`) and `feature_dim`
        is the width of the stage `feature_layer`. `detector` follows the torchvision detection API in eval mode: a
        list of (3, H, W) float images in [0, 1] to a list of dicts with `boxes` (K, 4) and `scores` (K,). With
        `detector=None` and the `detector` setting not None, a detector is still built from the settings.
        """
        self.backbone_module = backbone.eval()
        self._feature_dim = int(feature_dim)
        if detector is not None:
            self.detector_module = detector.eval()
        self.injected = True
        self.device = None

    def load(self, device=None) -> None:
        """Builds the detector and backbone (if not done yet) and moves them to `device`."""
        settings = self.settings
        device = torch.device(device) if device is not None else self.default_device()
        if self.backbone_module is None:
            state = self.saved_state("backbone")
            self.backbone_module = build_backbone(settings.backbone, settings.backbone_weights, state)
        if settings.detector is not None and self.detector_module is None:
            state = self.saved_state("detector")
            self.detector_module = build_detector(
                settings.detector, settings.detector_weights, settings.detector_kwargs, state
            )
        if self.device != device:
            self.backbone_module.to(device)
            if self.detector_module is not None:
                self.detector_module.to(device)
            self.device = device

    @staticmethod
    def default_device() -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # -- saving --------------------------------------------------------------------------------------------------

    def write(self, folder: str) -> dict | None:
        """Writes the detector and backbone weights into `folder` (building the models if needed) and returns the
        record saved as the settings' `frr_weights`; `None` when `save_frr_weights` is off."""
        settings = self.settings
        if not settings.save_frr_weights:
            return None
        if self.injected:
            raise ValueError(
                "this image processor uses modules given to set_modules, which cannot be rebuilt from saved weights; "
                "set save_frr_weights=False to save its settings only"
            )
        self.load(self.device)
        dtype_name = settings.frr_weights_dtype
        record = {"format": FRR_WEIGHTS_FORMAT, "dtype": dtype_name}
        parts = [("backbone", self.backbone_module, settings.backbone_weights)]
        if settings.detector is not None:
            parts.append(("detector", self.detector_module, settings.detector_weights))
        for component, module, weights in parts:
            filename = FRR_WEIGHTS_FILES[component]
            path = os.path.join(folder, filename)
            checksum = write_weights_file(module.state_dict(), path, FRR_WEIGHTS_DTYPES[dtype_name])
            record[component] = {"file": filename, "origin": saved_origin(weights), "sha256": checksum}
        return record

    def save(self, owner, parent_save, save_directory, push_to_hub: bool = False, **kwargs):
        """`save_pretrained` of `owner` (the image processor or a `PMNERProcessor` holding it) with the FRR weights:
        writes the weights files, then `parent_save` (transformers' own `save_pretrained` of `owner`) writes the
        config that records them; with `push_to_hub`, all of them are uploaded in one commit (as transformers does)."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained: {save_directory} is a file, not a folder")
        os.makedirs(save_directory, exist_ok=True)
        if push_to_hub:
            from transformers.utils.hub import hf_api

            commit_message = kwargs.pop("commit_message", None)
            repo_id = kwargs.pop("repo_id", save_directory.split(os.path.sep)[-1])
            repo_id = hf_api().create_repo(repo_id, exist_ok=True, **kwargs).repo_id
            timestamps = owner._get_files_timestamps(save_directory)
        record = self.write(save_directory)
        settings = self.settings
        if record is not None and not self.weights_files:
            # settings built by hand record the weights just saved; settings loaded from a folder keep their record and
            # located files (they go on using the weights they had, whatever dtype or switch this save used)
            settings.frr_weights = record
        self.save_overrides = {
            "frr_weights": record,
            "detector_weights": saved_origin(settings.detector_weights),
            "backbone_weights": saved_origin(settings.backbone_weights),
        }
        try:
            files = parent_save(save_directory)
        finally:
            self.save_overrides = {}
        if push_to_hub:
            owner._upload_modified_files(
                save_directory, repo_id, timestamps, commit_message=commit_message, token=kwargs.get("token")
            )
        return files


def write_frr_weights(processor, folder: str) -> dict | None:
    """Writes the detector and backbone weights of `processor` into `folder` (see `FRRModels.write`)."""
    return processor.frr_models.write(folder)


def save_with_frr_weights(owner, image_processor, parent_save, save_directory, push_to_hub: bool = False, **kwargs):
    """`save_pretrained` of `owner` with the FRR weights of `image_processor` (see `FRRModels.save`)."""
    return image_processor.frr_models.save(owner, parent_save, save_directory, push_to_hub, **kwargs)


__all__ = [
    "FRRModels",
    "FRR_WEIGHTS_DTYPES",
    "FRR_WEIGHTS_FILES",
    "FEATURE_LAYERS",
    "backbone_feature_dim",
    "backbone_feature_map",
    "backbone_preprocessing",
    "build_backbone",
    "has_resnet_stages",
    "build_detector",
    "locate_frr_weights",
    "read_weights_file",
    "save_with_frr_weights",
    "tensors_sha256",
    "weights_origin",
]
