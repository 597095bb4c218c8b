"""The FRR feature cache of P-MNER and the extraction of FRR features for a whole `datasets.Dataset`.

`FRRFeatureCache` keeps features as safetensors shards under `<cache_dir>/frr-<fingerprint>/`;
`extract_dataset_features` computes each distinct image of a dataset once (split between processes under
`torch.distributed`) and adds the features as columns.

Copied flat into saved processor folders (remote code): imports only torch, numpy and transformers at module level;
safetensors and datasets sit in `try:`.
"""

import hashlib
import json
import os
import uuid

import numpy as np
import torch
from transformers.utils import logging

from .image_loading import content_key, describe_image


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

CACHE_FORMAT_VERSION = 1


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



def extract_dataset_features(
    processor,
    dataset,
    image_column: str = "image",
    key_column: str | None = "image_id",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    device=None,
    progress: bool = True,
):
    """Adds the FRR features of `processor` (a `PMNERImageProcessor`) to a `datasets.Dataset`, computing each distinct
    image once and caching it (`PMNERImageProcessor.extract_dataset_features` calls this).

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
    cache = processor.feature_cache(cache_dir).load()
    pending = sorted(key for key in first_row if key not in cache)
    if world_size > 1:
        torch.distributed.barrier()  # every process has read the same cache state before anyone writes
    share = pending[rank::world_size]
    local_error = None
    try:
        _extract_keys(processor, raw, image_column, share, first_row, cache, rank, batch_size, device, progress)
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
    cache = processor.feature_cache(cache_dir).load()

    # 3. add the columns
    feature_dim = cache.features.shape[-1] if cache.features is not None else processor.feature_dim
    missing = sorted({key for key in row_keys if key not in cache})
    fingerprint_text = json.dumps(
        [getattr(dataset, "_fingerprint", ""), cache.fingerprint, len(cache), missing, image_column, key_column]
    )
    new_fingerprint = hashlib.sha256(fingerprint_text.encode()).hexdigest()[:32]
    rows = torch.tensor([cache.index.get(key, -1) for key in row_keys])  # (rows,)

    def add_features(batch, indices):
        positions = rows[indices]  # (b,)
        out_features = np.zeros((len(indices), processor.max_objects, feature_dim), dtype=np.float32)  # (b, M, D)
        out_masks = np.zeros((len(indices), processor.max_objects), dtype=bool)  # (b, M)
        present = positions >= 0
        if present.any():
            out_features[present.numpy()] = cache.features[positions[present]].numpy()  # (b', M, D)
            out_masks[present.numpy()] = cache.masks[positions[present]].numpy()  # (b', M)
        return {"visual_features": out_features, "visual_mask": out_masks}

    existing = [name for name in ("visual_features", "visual_mask") if name in dataset.column_names]
    base = dataset.remove_columns(existing) if existing else dataset
    features = base.features.copy()
    features["visual_features"] = datasets.Array2D(shape=(processor.max_objects, feature_dim), dtype="float32")
    features["visual_mask"] = datasets.List(datasets.Value("bool"), length=processor.max_objects)
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

def _extract_keys(processor, raw, image_column, keys, first_row, cache, rank, batch_size, device, progress):
    batch_size = batch_size or processor.batch_size
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
            features, masks, _, bad = processor.extract(sources, names, device=device, batch_size=batch_size)
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


__all__ = ["FRRFeatureCache", "extract_dataset_features"]
