"""Extraction of the FRR features of a whole `datasets.Dataset` (`PMNERImageProcessor.extract_dataset_features`).

Each distinct image (by image id, or by the sha1 of its content) is computed once into the processor's
`FRRFeatureCache`, split between processes under `torch.distributed`, and the features are added as columns read
from the cache.

Copied flat into saved processor folders (remote code): imports only torch, numpy, transformers and the standard
library at module level; datasets sits in `try:`.
"""

import hashlib
import json
import os

import numpy as np
import torch
from transformers.utils import logging

from .image_cache_shards import CorruptCacheShard, _normalise_dtype
from .image_loading import content_key, describe_image


try:
    import datasets
except ImportError:
    datasets = None


logger = logging.get_logger(__name__)


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
    cache_dtype="float32",
    add_num_detections: bool = False,
):
    """Adds the FRR features of `processor` (a `PMNERImageProcessor`) to a `datasets.Dataset`, computing each distinct
    image once and caching it (`PMNERImageProcessor.extract_dataset_features` calls this).

    Images are keyed by `key_column` (e.g. the tweet's image id; tweets sharing an image are computed once) or,
    when the dataset has no such column or `key_column=None`, by the sha1 of the image file / bytes. Features
    are stored in `<cache_dir>/frr-<settings fingerprint>[-fp16]/` as safetensors shards; a second run (or another
    process, even one running at the same time) reads them instead of recomputing. Bad images (see `on_bad_image`)
    are never cached.

    Under `torch.distributed` (torchrun, accelerate) each process computes a disjoint share of the missing
    images and writes its own shards; after a barrier every process reads the whole cache. Call it on every
    process. Separate jobs sharing a cache folder claim images before computing them (see `FRRFeatureCache.fill`).

    Args:
        dataset: a `datasets.Dataset` whose `image_column` holds images (`datasets.Image`, paths or bytes).
        image_column: the column of images.
        key_column: the column of image ids, or `None` to key by content.
        cache_dir: where features are kept (default: `<HF datasets cache>/pmner-frr`).
        batch_size: images per forward (default: the `batch_size` setting).
        device: where the models run.
        progress: show a progress bar (on the main process only).
        cache_dtype: `"float32"` or `"float16"` storage of the cached features (columns are float32 either way).
        add_num_detections: also add `visual_num_detections`.

    Returns:
        The dataset with more columns: `visual_features` (`Array2D` (max_objects, feature_dim) float32),
        `visual_mask` (max_objects bools) and, with `add_num_detections`, `visual_num_detections` (int32: detections
        above the threshold before the whole-image filler; 0 without features or detector, e.g. for `grid_size`
        cells, which are stored like objects, boxes apart: nothing here stores boxes), left out (with a warning) when part
        of the cache was written without the counts (by an older version or `write_shard` without them). Existing
        columns of those names are replaced.
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
    cache_dtype = _normalise_dtype(cache_dtype)
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

    # 2. compute the missing keys (this process's share) and write shards
    cache = processor.feature_cache(cache_dir).with_dtype(cache_dtype).load()
    distinct = list(first_row)
    pending = sorted(key for key, position in zip(distinct, cache.positions(distinct)) if position < 0)
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
    cache.refresh()

    # 3. add the columns
    for attempt in range(3):
        positions = torch.from_numpy(cache.positions(row_keys))  # (rows,) index position or -1
        try:
            with_counts = _with_counts(cache, positions, add_num_detections)
            break
        except CorruptCacheShard:  # set aside with a warning: its images are at hand, computed again
            cache.close()
            cache = processor.feature_cache(cache_dir).with_dtype(cache_dtype).load()
            pending = sorted(key for key, position in zip(distinct, cache.positions(distinct)) if position < 0)
            _extract_keys(processor, raw, image_column, pending, first_row, cache, rank, batch_size, device, progress)
            cache.refresh()
    else:
        raise RuntimeError(f"the FRR cache {cache.folder} kept failing its checksums after recomputing: delete it")
    feature_dim = cache.features.shape[-1] if len(cache) else processor.feature_dim
    missing = sorted({key for key, position in zip(row_keys, positions.tolist()) if position < 0})
    fingerprint_text = json.dumps(
        [getattr(dataset, "_fingerprint", ""), cache.folder, len(cache), missing, image_column, key_column,
         with_counts]
    )
    new_fingerprint = hashlib.sha256(fingerprint_text.encode()).hexdigest()[:32]

    def add_features(batch, indices):
        rows = positions[indices]  # (b,)
        out_features = np.zeros((len(indices), processor.max_objects, feature_dim), dtype=np.float32)  # (b, M, D)
        out_masks = np.zeros((len(indices), processor.max_objects), dtype=bool)  # (b, M)
        out_counts = np.zeros(len(indices), dtype=np.int32)  # (b,)
        present = (rows >= 0).numpy()
        if present.any():
            try:
                features, masks, counts = cache.read_positions(rows[present].numpy())  # (b', M, D), (b', M), (b',)
            except CorruptCacheShard:  # set aside with a warning: these images are at hand, computed again
                wanted = [index for index, keep in zip(indices, present) if keep]
                features, masks, counts = _recompute(processor, raw, image_column, wanted, row_keys, cache, device)
            out_features[present], out_masks[present], out_counts[present] = features, masks, counts
        output = {"visual_features": out_features, "visual_mask": out_masks}
        if with_counts:
            output["visual_num_detections"] = out_counts
        return output

    base, features = feature_columns(dataset, processor.max_objects, feature_dim, with_counts)
    map_kwargs = dict(
        batched=True, with_indices=True, features=features, new_fingerprint=new_fingerprint,
        desc="Adding FRR features",
    )
    if world_size > 1 and rank != 0:
        torch.distributed.barrier()  # the main process writes the datasets cache first
    result = base.map(add_features, **map_kwargs)
    if world_size > 1 and rank == 0:
        torch.distributed.barrier()
    cache.close()
    return result


def feature_columns(dataset, max_objects: int, feature_dim: int, with_counts: bool, extra: dict | None = None):
    """`(base, features)` for adding FRR feature columns to `dataset` with `base.map(..., features=features)`: `base` is
    `dataset` without its columns of the names added (they are replaced), `features` its features plus
    `visual_features` (`Array2D` (max_objects, feature_dim) float32), `visual_mask` (max_objects bools), with
    `with_counts` `visual_num_detections` (int32), and the `extra` columns (name: `datasets` feature)."""
    added = {
        "visual_features": datasets.Array2D(shape=(max_objects, feature_dim), dtype="float32"),
        "visual_mask": datasets.List(datasets.Value("bool"), length=max_objects),
    }
    if with_counts:
        added["visual_num_detections"] = datasets.Value("int32")
    added.update(extra or {})
    replaced = ("visual_features", "visual_mask", "visual_num_detections", *(extra or {}))
    existing = [name for name in replaced if name in dataset.column_names]
    base = dataset.remove_columns(existing) if existing else dataset
    features = base.features.copy()
    features.update(added)
    return base, features


def _with_counts(cache, positions, wanted: bool) -> bool:
    """Whether every cached row of `positions` has its detection count (`wanted` off: no)."""
    for start in range(0, len(positions) if wanted else 0, 4096):  # counts are tiny: check every one is known
        part = positions[start : start + 4096]
        present = part[part >= 0]
        if len(present) and (cache.num_detections_at(present.numpy()) < 0).any():
            logger.warning(f"part of the FRR cache {cache.folder} has no detection counts (written by an older "
                           "version): the dataset gets no visual_num_detections column")
            return False
    return wanted


def _recompute(processor, raw, image_column, indices, row_keys, cache, device):
    """Features of the dataset rows `indices`, computed from their images and written to the cache again (for rows
    whose cached copy was found corrupt); an image that cannot be read gives zeros, as it does on a first pass."""
    keys = [row_keys[index] for index in indices]
    features, masks, detections, kept = _extract_rows(processor, raw, image_column, list(indices), keys, device)
    if kept:
        cache.write_shard([keys[row] for row in kept], features[kept], masks[kept], num_detections=detections[kept])
    return features.numpy(), masks.numpy(), detections.numpy()


def _extract_rows(processor, raw, image_column, rows, keys, device, batch_size=None):
    """`(features (b, M, D), masks (b, M), detections (b,), kept)` of the images of dataset `rows` (named by their
    cache `keys` in messages); `kept` lists the rows whose image could be read (a bad image is never cached)."""
    sources = raw[rows][image_column]
    names = [f"{describe_image(source)} (key {key})" for key, source in zip(keys, sources)]
    features, masks, _, bad, detections = processor.extract(
        sources, names, device=device, batch_size=batch_size, return_num_detections=True
    )  # (b, M, D), (b, M), bad indices, (b,)
    bad = set(bad)
    return features, masks, detections, [index for index in range(len(keys)) if index not in bad]


def _extract_keys(processor, raw, image_column, keys, first_row, cache, rank, batch_size, device, progress):
    """Computes `keys` into `cache` through `FRRFeatureCache.fill` (claims: keys another process is computing are
    waited for, not computed again)."""
    batch_size = batch_size or processor.batch_size
    if not keys:
        return
    from transformers.utils.logging import tqdm

    def compute(chunk):
        rows = [first_row[key] for key in chunk]
        features, masks, detections, kept = _extract_rows(processor, raw, image_column, rows, chunk, device, batch_size)
        return [chunk[index] for index in kept], features[kept], masks[kept], detections[kept]

    bar = tqdm(total=len(keys), desc="FRR features", unit="image", disable=not progress or rank != 0)
    try:
        cache.fill(keys, compute, batch_size=batch_size, progress=bar.update)
    finally:
        bar.close()


__all__ = ["extract_dataset_features", "feature_columns"]
