"""Building the FRR networks of P-MNER (paper section 3.2) from their settings: the torchvision detector and backbone,
their weights settings, and what the backbone gives (feature width, stage maps, input preprocessing).

Weights settings (`detector_weights`, `backbone_weights`) take one of these forms, normalised at construction
(`weights_origin`) and recorded as the weights' origin when the processor is saved:
- a torchvision weights name: `"DEFAULT"`, a member (`"IMAGENET1K_V2"`) or the full name
  (`"ResNet152_Weights.IMAGENET1K_V2"`); always stored by its full name, so `DEFAULT` is resolved once;
- `"random"` or `"random:SEED"`: weights initialised from the seed (0 by default), built the same way every time;
- a local file (`.safetensors`, or a state dict read with `torch.load(weights_only=True)`); saved folders name it
  `"file:<basename>"`.
`None` is an error when weights are needed.

Copied flat into saved processor folders (remote code): imports only torch at module level (torchvision lazily);
safetensors sits in `try:`.
"""

import os

import torch


try:
    from safetensors.torch import load_file as safetensors_load_file
except ImportError:  # safetensors is a dependency of transformers; kept optional for the remote-code check
    safetensors_load_file = None


FILE_PREFIX = "file:"
# The ResNet stages whose pooled output can be the object feature (`feature_layer`), and the stem before them
FEATURE_LAYERS = ("layer3", "layer4")
RESNET_STEM = ["conv1", "bn1", "relu", "maxpool"]
RESNET_STAGES = ["layer1", "layer2", "layer3", "layer4"]


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
