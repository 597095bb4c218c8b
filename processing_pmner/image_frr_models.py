"""FRR networks of P-MNER (paper section 3.2): building the torchvision detector and backbone from their settings,
and their weights (origin, safetensors files saved with the processor, checksums). `FRRModelsMixin` gives
`PMNERImageProcessor` its model handling: lazy building, `set_modules`, saving and loading with the weights.

Weights settings (`detector_weights`, `backbone_weights`) take one of these forms, normalised at construction
(`weights_origin`) and recorded as the weights' origin when the processor is saved:
- a torchvision weights name: `"DEFAULT"`, a member (`"IMAGENET1K_V2"`) or the full name
  (`"ResNet152_Weights.IMAGENET1K_V2"`); always stored by its full name, so `DEFAULT` is resolved once;
- `"random"` or `"random:SEED"`: weights initialised from the seed (0 by default), built the same way every time;
- a local file (`.safetensors`, or a state dict read with `torch.load(weights_only=True)`); saved folders name it
  `"file:<basename>"`.
`None` is an error when weights are needed (it used to mean different random weights on every load).

`save_pretrained` writes the weights as `frr_detector.safetensors` / `frr_backbone.safetensors` (dtype
`frr_weights_dtype`) and records them in the processor config (`frr_weights`: file, origin, sha256 of the tensors);
`from_pretrained` reads them back from the folder or Hub repo (`locate_frr_weights`), checking the checksum when the
models are built.

Copied flat into saved processor folders (remote code): imports only torch and transformers at module level
(torchvision lazily); safetensors sits in `try:`.
"""

import hashlib
import json
import os
import struct

import torch


try:
    from safetensors.torch import load_file as safetensors_load_file
    from safetensors.torch import save_file as safetensors_save_file
except ImportError:  # safetensors is a dependency of transformers; kept optional for the remote-code check
    safetensors_load_file = safetensors_save_file = None


FRR_WEIGHTS_FILES = {"detector": "frr_detector.safetensors", "backbone": "frr_backbone.safetensors"}
FRR_WEIGHTS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FRR_WEIGHTS_FORMAT = 1
FILE_PREFIX = "file:"
# The ResNet stages whose pooled output can be the object feature (`feature_layer`), and the stem before them
FEATURE_LAYERS = ("layer3", "layer4")
RESNET_STEM = ["conv1", "bn1", "relu", "maxpool"]
RESNET_STAGES = ["layer1", "layer2", "layer3", "layer4"]
# from_pretrained arguments that locate files of a folder or Hub repo (passed on to `cached_file`)
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies", "subfolder")


# ----------------------------------------------------------------------------------------------------------------------
# Weights settings
# ----------------------------------------------------------------------------------------------------------------------


def _weights_enum(builder_name: str):
    import torchvision

    try:
        return torchvision.models.get_model_weights(builder_name)
    except (ValueError, KeyError):
        return None


def builder_exists(name: str) -> bool:
    """Whether torchvision has a model builder of that name (a registry lookup: nothing is built)."""
    import torchvision

    try:
        torchvision.models.get_model_builder(name)
    except ValueError:
        return False
    return True


def _is_weights_file(weights) -> bool:
    return isinstance(weights, (str, os.PathLike)) and (
        os.fspath(weights).startswith(FILE_PREFIX)
        or os.path.sep in os.fspath(weights)
        or os.path.exists(os.fspath(weights))
    )


def _random_seed(weights: str, setting: str) -> int | None:
    """The seed of `"random"` / `"random:SEED"` (0 for `"random"`), `None` for any other setting."""
    if weights == "random":
        return 0
    if not weights.startswith("random:"):
        return None
    try:
        return int(weights[len("random:") :])
    except ValueError:
        raise ValueError(f"{setting}={weights!r}: expected 'random' or 'random:SEED' with an integer SEED") from None


def _enum_entry(enum, weights: str, builder_name: str, setting: str):
    """The torchvision weights member that `weights` names: `DEFAULT`, a member name or `<Enum>.<member>`."""
    name = weights
    if "." in weights:
        enum_name, name = weights.split(".", 1)
        if enum_name != enum.__name__:
            raise ValueError(f"{setting}={weights!r}: {builder_name} takes {enum.__name__} weights, not {enum_name}")
    if name == "DEFAULT":
        return enum.DEFAULT
    if name in enum.__members__:
        return enum[name]
    raise ValueError(
        f"{setting}={weights!r} is neither a weights name of {builder_name} ({['DEFAULT', *enum.__members__]}), "
        "'random[:SEED]' nor an existing file"
    )


def missing_weights_error(setting: str) -> ValueError:
    return ValueError(
        f"{setting}=None: weights are needed. Pass {setting}='random' (or 'random:SEED') for random weights built "
        "from a seed (saved with the processor, so every load gives the same features), a torchvision weights name "
        f"such as 'DEFAULT', or a local weights file. ({setting}=None used to mean new random weights on every load.)"
    )


def weights_origin(builder_name: str | None, weights, setting: str):
    """Normalised weights setting, at construction (no download, no file read): the full torchvision name
    (`"ResNet152_Weights.IMAGENET1K_V2"`, never `DEFAULT`), `"random:SEED"`, or the file path as given. `None` and
    the names of builders torchvision does not know are kept as they are (checked when the models are built)."""
    if isinstance(weights, os.PathLike):
        return os.fspath(weights)
    if weights is None or builder_name is None:
        return weights
    if not isinstance(weights, str):
        raise TypeError(f"{setting} must be a string or a path, got {type(weights).__name__}")
    seed = _random_seed(weights, setting)
    if seed is not None:
        return f"random:{seed}"
    if _is_weights_file(weights):
        return weights
    enum = _weights_enum(builder_name)
    if enum is None:
        return weights
    entry = _enum_entry(enum, weights, builder_name, setting)
    return f"{enum.__name__}.{entry.name}"


def saved_origin(weights) -> str | None:
    """How a saved folder names the weights' origin: a local file by its basename (`"file:resnet152.safetensors"`),
    anything else as it is."""
    if isinstance(weights, str) and not weights.startswith(FILE_PREFIX) and _is_weights_file(weights):
        return FILE_PREFIX + os.path.basename(weights)
    return weights


def _resolve_weights(builder_name: str, weights, setting: str):
    """`(torchvision_weights_or_None, local_file_or_None, seed_or_None)` for a weights setting."""
    if weights is None:
        raise missing_weights_error(setting)
    seed = _random_seed(weights, setting) if isinstance(weights, str) else None
    if seed is not None:
        return None, None, seed
    if _is_weights_file(weights):
        path = os.fspath(weights)
        if path.startswith(FILE_PREFIX):
            # provenance recorded by save_pretrained, never a path: a file of that name wherever the user stands
            # is not the saved weights
            raise FileNotFoundError(
                f"{setting}={weights!r} records where saved weights came from; it is not a file to read. A folder "
                "saved with its FRR weights is loaded with PMNERProcessor / AutoProcessor / "
                "PMNERImageProcessor.from_pretrained, which read its frr_*.safetensors files"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{setting}={weights!r}: no such weights file")
        return None, path, None
    enum = _weights_enum(builder_name)
    if enum is None:
        raise ValueError(f"{setting}={weights!r}: torchvision has no pretrained weights for {builder_name!r}")
    return _enum_entry(enum, weights, builder_name, setting), None, None


def _read_state_dict(path: str, setting: str) -> dict:
    if path.endswith(".safetensors"):
        if safetensors_load_file is None:
            raise ImportError(f"{setting}={path!r} is a safetensors file but `safetensors` is not installed")
        try:
            state = safetensors_load_file(path)
        except Exception as error:  # safetensors raises its own SafetensorError; re-raised naming the file
            raise OSError(f"{setting}={path!r} could not be read as safetensors weights: {error}") from error
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
        f"pass the local file instead ({setting}='/path/to/weights.pth' or .safetensors), or {setting}='random' for "
        "random weights."
    )


def _get_model(name: str, weights, setting: str, state: dict | None, **kwargs) -> torch.nn.Module:
    """`torchvision.models.get_model` for a weights setting, or the bare architecture when `state` (the tensors
    of a saved folder) will be assigned to it; random weights are drawn from their seed without touching the global
    random state."""
    import torchvision

    if state is not None:
        with torch.device("meta"):  # no memory, no random init: every tensor comes from `state`
            return torchvision.models.get_model(name, weights=None, **kwargs)
    tv_weights, _, seed = _resolve_weights(name, weights, setting)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torchvision.models.get_model(name, weights=None, **kwargs)
    try:
        return torchvision.models.get_model(name, weights=tv_weights, **kwargs)
    except (OSError, RuntimeError) as error:
        if tv_weights is None:
            raise
        raise _download_error(setting, weights, name, error) from error


def _load_state(model: torch.nn.Module, state: dict, name: str, source: str, assign: bool) -> None:
    try:
        model.load_state_dict(state, assign=assign)
    except RuntimeError as error:
        raise ValueError(f"{source} does not fit {name}: {error}") from error
    left = [key for key, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise ValueError(f"{source} does not fit {name}: no values for {left[:5]}")


def build_detector(name: str, weights, extra_kwargs: dict | None = None, state: dict | None = None) -> torch.nn.Module:
    """A torchvision detection model in eval mode (`weights` as the `detector_weights` setting; `state`: the
    verified tensors of a saved folder, used instead)."""
    kwargs = dict(extra_kwargs or {})
    kwargs.setdefault("weights_backbone", None)  # never fetch ImageNet weights behind the user's back
    model = _get_model(name, weights, "detector_weights", state, **kwargs)
    if state is not None:
        _load_state(model, state, name, "the saved detector weights", assign=True)
    else:
        _, path, _ = _resolve_weights(name, weights, "detector_weights")
        if path is not None:
            _load_state(model, _read_state_dict(path, "detector_weights"), name, f"detector_weights={path!r}", False)
    return model.eval()


def build_backbone(name: str, weights, state: dict | None = None) -> torch.nn.Module:
    """A torchvision classifier with its `fc` head replaced by identity: it maps crops (N, 3, S, S) to pooled
    features (N, feature_dim). `state`: the verified tensors of a saved folder, used instead of `weights`."""
    model = _get_model(name, weights, "backbone_weights", state)
    if not isinstance(getattr(model, "fc", None), torch.nn.Linear):
        raise ValueError(f"backbone={name!r}: expected a torchvision classifier with an `fc` head (ResNet family)")
    model.fc = torch.nn.Identity()
    if state is not None:
        _load_state(model, state, name, "the saved backbone weights", assign=True)
    else:
        _, path, _ = _resolve_weights(name, weights, "backbone_weights")
        if path is not None:
            file_state = _read_state_dict(path, "backbone_weights")
            state = {key: value for key, value in file_state.items() if not key.startswith("fc.")}
            _load_state(model, state, name, f"backbone_weights={path!r}", assign=False)
    return model.eval()


def check_detector_kwargs(name: str, kwargs: dict) -> None:
    """Builds the detector's architecture on the meta device (no weights, no memory) with `kwargs`: a `TypeError`
    naming an argument the builder does not take, a `ValueError` for a builder torchvision does not know."""
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as error:
        raise ValueError(f"detector={name!r}: {error}") from None
    with torch.device("meta"):
        try:
            model = builder(weights=None, weights_backbone=None, **kwargs)
        except TypeError as error:
            raise TypeError(f"the builder {name} does not take these arguments: {error}") from None
    # torchvision's detection models take **kwargs and drop the names they do not know: check them against the
    # named parameters of the builder, the model's classes and its transform's
    import inspect

    known = set(inspect.signature(builder).parameters)
    for owner in [*type(model).__mro__, type(getattr(model, "transform", None))]:
        init = owner.__dict__.get("__init__")
        if init is not None:
            known |= set(inspect.signature(init).parameters)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"the builder {name} does not take the argument(s) {unknown}")


def has_resnet_stages(name: str) -> bool:
    """Whether the torchvision builder `name` gives a ResNet (its stem and `layer1` .. `layer4` stages, which
    `feature_layer` and `grid_size` read), from the class the builder returns: nothing is built (some architectures,
    RegNet among them, cannot be built on the meta device). `True` for a name torchvision does not know (the
    builder's own error comes when it is used)."""
    import typing

    import torchvision
    from torchvision.models.resnet import ResNet

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        return True
    try:
        returned = typing.get_type_hints(builder).get("return")
    except (NameError, TypeError):  # an annotation that does not resolve: left to the forward's own check
        return True
    return isinstance(returned, type) and issubclass(returned, ResNet)


def backbone_feature_dim(name: str, feature_layer: str = "layer4") -> int:
    """Width of the backbone's pooled features at `feature_layer`, read from an architecture built on the meta device
    (no memory): `fc.in_features` for `"layer4"`, the channels of a meta forward through the stages otherwise."""
    import torchvision

    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(name, weights=None)
    except (NotImplementedError, RuntimeError):  # some initialisations (RegNet's) copy data: built for real once
        model = torchvision.models.get_model(name, weights=None)
    fc = getattr(model, "fc", None)
    if not isinstance(fc, torch.nn.Linear):
        raise ValueError(f"backbone={name!r}: expected a torchvision classifier with an `fc` head (ResNet family)")
    if feature_layer == "layer4":
        return fc.in_features
    crops = torch.empty(1, 3, 64, 64, device="meta")  # (1, 3, S, S)
    return backbone_feature_map(model.eval(), crops, feature_layer, name).shape[1]


def backbone_feature_map(backbone: torch.nn.Module, crops: torch.Tensor, feature_layer: str, name: str = "backbone"):
    """The feature map (N, C, h, w) of normalised crops (N, 3, S, S) after the ResNet stage `feature_layer`
    (`"layer3"` or `"layer4"`): the stem and the stages up to it, run one by one (nothing after it)."""
    if feature_layer not in FEATURE_LAYERS:
        raise ValueError(f"feature_layer must be one of {FEATURE_LAYERS}, got {feature_layer!r}")
    stages = RESNET_STEM + RESNET_STAGES[: RESNET_STAGES.index(feature_layer) + 1]
    missing = [stage for stage in stages if not isinstance(getattr(backbone, stage, None), torch.nn.Module)]
    if missing:
        raise ValueError(
            f"feature_layer={feature_layer!r} reads the ResNet stages {stages}; the {name} module "
            f"({type(backbone).__name__}) has no {missing}"
        )
    features = crops
    for stage in stages:
        features = getattr(backbone, stage)(features)
    return features  # (N, C, h, w)


def backbone_preprocessing(name: str, weights) -> dict:
    """Crop size, resize interpolation, mean and std from the weights' own `transforms()` (the builder's DEFAULT
    weights when the weights are random, a local file or `None`)."""
    import torchvision

    enum = _weights_enum(name)
    entry = None
    if enum is not None:
        entry = enum.DEFAULT
        if isinstance(weights, str) and _random_seed(weights, "weights") is None and not _is_weights_file(weights):
            entry = _enum_entry(enum, weights, name, "backbone_weights")
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
# FRR weights saved with the processor
# ----------------------------------------------------------------------------------------------------------------------


def tensors_sha256(state: dict) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order (the checksum saved in `frr_weights`)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(tensor.dtype).replace("torch.", ""), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_weights_file(state: dict, path: str, dtype: torch.dtype) -> str:
    """Writes `state` as safetensors (floating tensors in `dtype`) through a temporary file; returns its sha256."""
    if safetensors_save_file is None:
        raise ImportError("saving FRR weights needs `safetensors`")
    tensors = {
        name: (tensor.detach().to("cpu", dtype) if tensor.is_floating_point() else tensor.detach().to("cpu")).contiguous()
        for name, tensor in state.items()
    }
    checksum = tensors_sha256(tensors)
    temporary = f"{path}.{os.getpid()}.tmp"
    safetensors_save_file(tensors, temporary, metadata={"format": "pt", "sha256": checksum})
    os.replace(temporary, path)
    return checksum


def check_weights_file(path: str) -> None:
    """Cheap check that a safetensors file is complete (its header and size agree); raises `OSError` naming it."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        header_size = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if header_size is None or 8 + header_size > size:
            raise OSError(f"FRR weights file {path} is truncated ({size} bytes): save the processor again")
        try:
            header = json.loads(handle.read(header_size))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise OSError(f"FRR weights file {path} is not a valid safetensors file: {error}") from error
    if 8 + header_size + end != size:
        raise OSError(
            f"FRR weights file {path} is truncated or damaged: {size} bytes where its header describes "
            f"{8 + header_size + end}; save the processor again"
        )


def read_weights_file(path: str, sha256: str) -> dict:
    """The tensors of a saved FRR weights file as float32, after checking them against the recorded sha256."""
    if safetensors_load_file is None:
        raise ImportError(f"reading the FRR weights file {path} needs `safetensors`")
    check_weights_file(path)
    try:
        state = safetensors_load_file(path)
    except Exception as error:  # safetensors raises its own SafetensorError; re-raised naming the file
        raise OSError(f"FRR weights file {path} could not be read: {error}") from error
    actual = tensors_sha256(state)
    if actual != sha256:
        raise ValueError(
            f"FRR weights file {path} has sha256 {actual}, but the processor config records {sha256}: the file was "
            "altered or belongs to another save; save the processor again"
        )
    return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in state.items()}


def locate_frr_weights(path_or_repo, record: dict, **hub_kwargs) -> dict[str, str]:
    """Local paths of the FRR weights files that `record` (a saved `frr_weights`) lists, from a folder or a Hub repo
    (downloaded into the Hub cache; `hub_kwargs` as `from_pretrained`'s). A missing or truncated file raises
    `OSError` naming it; nothing else is downloaded."""
    from transformers.utils import cached_file

    files = {}
    for component in FRR_WEIGHTS_FILES:
        entry = record.get(component)
        if not entry:
            continue
        filename = entry.get("file")
        if not isinstance(filename, str) or os.path.basename(filename) != filename or not entry.get("sha256"):
            raise ValueError(f"frr_weights[{component!r}] = {entry!r}: expected a file name and a sha256")
        try:
            path = cached_file(os.fspath(path_or_repo), filename, **hub_kwargs)
        except OSError as error:
            raise OSError(
                f"FRR weights file {filename} is missing from {os.fspath(path_or_repo)} (its processor config lists it "
                f"with sha256 {entry['sha256']}): {error}"
            ) from error
        if path is None:
            raise OSError(f"FRR weights file {filename} is missing from {os.fspath(path_or_repo)}")
        check_weights_file(path)
        files[component] = path
    return files


def unattached_weights_message(component: str, entry: dict) -> str:
    return (
        f"these image-processor settings record saved {component} weights ({entry.get('file')}, sha256 "
        f"{entry.get('sha256')}), but no folder was given to read them from, so no features are computed (the "
        f"recorded origin {entry.get('origin')!r} is provenance, never rebuilt). This happens when the settings are "
        "loaded without their folder, e.g. by AutoImageProcessor.from_pretrained on transformers releases that build "
        "image processors through from_dict. Load the folder with AutoProcessor.from_pretrained(folder) (its "
        "image_processor), PMNERImageProcessor.from_pretrained(folder), or call "
        "image_processor.attach_frr_weights(folder)"
    )


def resolve_revision_once(pretrained_model_name_or_path, kwargs: dict) -> dict:
    """`kwargs` with `revision` resolved to a commit of a Hub repo, so that the settings and the weights files come
    from the same state of the repo (as transformers resolves it for a processor's parts); unchanged for a folder."""
    revision = kwargs.get("revision")
    if revision is None or os.path.isdir(os.fspath(pretrained_model_name_or_path)):
        return kwargs
    try:
        from transformers.utils.hub import resolve_revision
    except ImportError:  # older transformers: cached_file resolves the branch on each call
        return kwargs
    resolved = resolve_revision(
        os.fspath(pretrained_model_name_or_path), revision, token=kwargs.get("token"),
        local_files_only=bool(kwargs.get("local_files_only")), cache_dir=kwargs.get("cache_dir"),
    )
    return {**kwargs, "revision": resolved}


def hub_kwargs_of(kwargs: dict) -> dict:
    """The `from_pretrained` arguments that locate files of a folder or Hub repo, for `cached_file`."""
    return {key: kwargs[key] for key in HUB_KWARGS if kwargs.get(key) is not None}


def write_frr_weights(processor, folder: str) -> dict | None:
    """Writes the detector and backbone weights of `processor` into `folder` (building the models if needed) and
    returns the record saved as its `frr_weights`; `None` when `save_frr_weights` is off."""
    if not processor.save_frr_weights:
        return None
    if processor._injected:
        raise ValueError(
            "this image processor uses modules given to set_modules, which cannot be rebuilt from saved weights; "
            "set save_frr_weights=False to save its settings only"
        )
    processor.load_models(processor._models_device)
    dtype_name = processor.frr_weights_dtype
    record = {"format": FRR_WEIGHTS_FORMAT, "dtype": dtype_name}
    parts = [("backbone", processor._backbone_module, processor.backbone_weights)]
    if processor.detector is not None:
        parts.append(("detector", processor._detector_module, processor.detector_weights))
    for component, module, weights in parts:
        filename = FRR_WEIGHTS_FILES[component]
        checksum = write_weights_file(module.state_dict(), os.path.join(folder, filename), FRR_WEIGHTS_DTYPES[dtype_name])
        record[component] = {"file": filename, "origin": saved_origin(weights), "sha256": checksum}
    return record


def save_with_frr_weights(owner, image_processor, parent_save, save_directory, push_to_hub: bool = False, **kwargs):
    """`save_pretrained` of `owner` (the image processor or a `PMNERProcessor` holding it) with the FRR weights:
    writes the weights files, then `parent_save` (transformers' own `save_pretrained` of `owner`) writes the config
    that records them; with `push_to_hub`, all of them are uploaded in one commit (as transformers does)."""
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
    record = write_frr_weights(image_processor, save_directory)
    if record is not None and not image_processor._weights_files:
        # a processor built from settings now has saved weights; one loaded from a folder keeps its own record and
        # located files (it goes on using the weights it had, whatever dtype or switch this save used)
        image_processor.frr_weights = record
    image_processor._save_overrides = {
        "frr_weights": record,
        "detector_weights": saved_origin(image_processor.detector_weights),
        "backbone_weights": saved_origin(image_processor.backbone_weights),
    }
    try:
        files = parent_save(save_directory)
    finally:
        image_processor._save_overrides = {}
    if push_to_hub:
        owner._upload_modified_files(
            save_directory, repo_id, timestamps, commit_message=commit_message, token=kwargs.get("token")
        )
    return files




# ----------------------------------------------------------------------------------------------------------------------
# The processor's models
# ----------------------------------------------------------------------------------------------------------------------


class FRRModelsMixin:
    """The FRR networks of `PMNERImageProcessor`: built lazily from the settings (or read from the weights files
    saved with them), injected with `set_modules`, saved with the processor and hashed for the feature cache."""

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Saves the settings and, with `save_frr_weights`, the detector and backbone weights (see `frr_weights`)."""
        return save_with_frr_weights(self, self, super().save_pretrained, save_directory, push_to_hub, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Loads the settings and locates the FRR weights files saved with them (nothing is built yet)."""
        kwargs = resolve_revision_once(pretrained_model_name_or_path, kwargs)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        processor = loaded[0] if isinstance(loaded, tuple) else loaded
        processor.attach_frr_weights(pretrained_model_name_or_path, **hub_kwargs_of(kwargs))
        return loaded

    def attach_frr_weights(self, pretrained_model_name_or_path, **hub_kwargs) -> "FRRModelsMixin":
        """Uses the FRR weights files that `frr_weights` lists, from a folder or Hub repo (`hub_kwargs`: `cache_dir`,
        `revision`, `token`, `local_files_only`, ...); a missing or truncated file raises `OSError` naming it."""
        if self.frr_weights:
            self._weights_files = locate_frr_weights(pretrained_model_name_or_path, self.frr_weights, **hub_kwargs)
            self._detector_module = self._backbone_module = None
            self._weights_sha256 = {}
        return self

    def weights_sha256(self, component: str) -> str:
        """sha256 of the `"backbone"` or `"detector"` weights in use (builds the models once if they are not read
        from a saved folder); kept, so the cache fingerprint never hashes ~400 MB twice."""
        if component not in self._weights_sha256:
            if component in self._weights_files:
                self._weights_sha256[component] = self.frr_weights[component]["sha256"]
            else:
                self.load_models(self._models_device)
                module = self._backbone_module if component == "backbone" else self._detector_module
                self._weights_sha256[component] = tensors_sha256(module.state_dict())
        return self._weights_sha256[component]

    def _saved_state(self, component: str) -> dict | None:
        """The verified tensors of the saved weights file of `component`; `None` when the settings record no saved
        weights for it (a fresh processor: built from its weights setting). Settings that record saved weights are
        never rebuilt from their origin: without the located file this is an error naming it."""
        entry = (self.frr_weights or {}).get(component)
        if not entry:
            return None
        path = self._weights_files.get(component)
        if path is None:
            raise OSError(unattached_weights_message(component, entry))
        return read_weights_file(path, entry["sha256"])

    @property
    def feature_dim(self) -> int:
        """Width of one object feature at `feature_layer` (ResNet-152: 2048 for `"layer4"`, 1024 for `"layer3"`),
        known without building the models."""
        if self._feature_dim is None:
            self._feature_dim = backbone_feature_dim(self.backbone, self.feature_layer)
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

        `backbone` maps normalised crops (N, 3, crop_size, crop_size) to (N, feature_dim); with `feature_layer="layer3"`
        or a `grid_size` its stages are run one by one (a torchvision ResNet: `conv1` ... `layer4`) and `feature_dim`
        is the width of the stage `feature_layer`. `detector` follows the
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

    def load_models(self, device=None) -> "FRRModelsMixin":
        """Builds the detector and backbone (if not done yet) and moves them to `device`."""
        device = torch.device(device) if device is not None else self.default_device()
        if self._backbone_module is None:
            self._backbone_module = build_backbone(self.backbone, self.backbone_weights, self._saved_state("backbone"))
        if self.detector is not None and self._detector_module is None:
            state = self._saved_state("detector")
            self._detector_module = build_detector(self.detector, self.detector_weights, self.detector_kwargs, state)
        if self._models_device != device:
            self._backbone_module.to(device)
            if self._detector_module is not None:
                self._detector_module.to(device)
            self._models_device = device
        return self

    @staticmethod
    def default_device() -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


__all__ = [
    "FRRModelsMixin",
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
