"""FRR weights files saved with the P-MNER image processor: `save_pretrained` writes the detector and backbone weights
as `frr_detector.safetensors` / `frr_backbone.safetensors` (dtype `frr_weights_dtype`) and records them in the
processor config (`frr_weights`: file, origin, sha256 of the tensors); `from_pretrained` locates them in the folder or
Hub repo (`locate_frr_weights`) and they are checked against the recorded sha256 when read (`read_weights_file`).

Copied flat into saved processor folders (remote code): imports only torch and transformers at module level;
safetensors sits in `try:`.
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
# from_pretrained arguments that locate files of a folder or Hub repo (passed on to `cached_file`)
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies", "subfolder")


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
