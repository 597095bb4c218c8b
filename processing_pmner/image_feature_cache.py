"""The FRR feature cache of P-MNER: `FRRFeatureCache`, its reads and writes, and the fill loop of concurrent writers.

`FRRFeatureCache` keeps features as safetensors shards under `<cache_dir>/frr-<fingerprint>[-fp16]/`
(`image_cache_shards.py`) and answers lookups from a compact index (`image_cache_index.py`: sorted 64-bit key hashes
plus int32 shard and row numbers, no Python object per key) with positioned reads of single rows: opening a cache of
a million images costs a few tens of MB whatever its size on disk. Shards appear by atomic rename. Writers filling
one cache at the same time claim each image before computing it, so that none is computed twice
(`image_feature_claims.py`); `image_dataset_features.py` extracts the features of a whole `datasets.Dataset` into the
cache.

Copied flat into saved processor folders (remote code): imports only torch, numpy, transformers and the standard
library at module level; safetensors sits in `try:`.
"""

import json
import os
import time
import uuid
from collections import OrderedDict

import numpy as np
import torch
from transformers.utils import logging

from .image_cache_index import _Index, key_hashes
from .image_cache_shards import (
    CACHE_FORMAT_VERSION, CorruptCacheShard, _normalise_dtype, _Shard, _shard_tensors, set_aside,
)
from .image_feature_claims import FeatureClaims, remove_dead_temporaries, writer_tag


try:
    from safetensors.torch import save_file as safetensors_save_file
except ImportError:  # safetensors is a dependency of transformers; kept optional for the remote-code check
    safetensors_save_file = None


logger = logging.get_logger(__name__)


def _open_files_limit() -> int:
    """Shard files one cache keeps open for reads (least recently used closed first): an eighth of the process's
    soft limit on open files, between 64 and 1024 (1,000 shards hold a million entries; reopening a shard file
    costs more than reading a row from the page cache)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # no `resource` module (Windows)
        return 64
    return 1024 if soft == resource.RLIM_INFINITY else max(64, min(1024, soft // 8))


_OPEN_FILES = _open_files_limit()


def _write_settings(folder: str, settings: dict, dtype: str):
    """`settings.json` of a cache folder, for people reading it (written once)."""
    settings_file = os.path.join(folder, "settings.json")
    if not os.path.exists(settings_file):
        temporary = f"{settings_file}.{uuid.uuid4().hex}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump({**settings, "cache_dtype": dtype}, handle, indent=2, sort_keys=True, default=str)
        os.replace(temporary, settings_file)


def _save_shard(folder: str, tensors: dict[str, torch.Tensor], metadata: dict, rank: int) -> str:
    """Saves a new shard in `folder` by atomic rename of a synced temporary file; returns its path."""
    tag = writer_tag()
    name = f"shard-{tag}-rank{rank}-{uuid.uuid4().hex[:12]}.safetensors"
    path = os.path.join(folder, name)
    temporary = os.path.join(folder, f".tmp-{tag}-{uuid.uuid4().hex[:12]}")  # never listed as a shard
    try:
        safetensors_save_file(tensors, temporary, metadata=metadata)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


class FRRFeatureCache:
    """Keyed store of FRR features: `<cache_dir>/frr-<fingerprint>[-fp16]/shard-*.safetensors`.

    Each shard holds `visual_features` (N, max_objects, feature_dim) in the cache's dtype, `visual_mask`
    (N, max_objects), `num_detections` (N,) (detections above the threshold before the whole-image filler; -1 when
    unknown) and, in its metadata, the N keys. `fingerprint` identifies the extraction settings and `dtype`
    ("float32" or "float16") the storage: each pair is its own folder, so settings or dtypes never mix. Reads return
    float32 whatever the storage.

    `load()` (or `refresh()`) indexes the shards without reading their features; `get`/`get_many` read single rows.
    Shards are written atomically (temporary file + rename; readers ignore temporary files). `fill` computes missing
    keys with claims, so that concurrent writers never compute a key twice and a killed writer's keys are taken over.

    Args:
        cache_dir: the folder holding every cache.
        fingerprint: the extraction settings' fingerprint (`PMNERImageProcessor.fingerprint()`).
        settings: written to `settings.json` in the folder, for people reading it.
        dtype: "float32" (default) or "float16" (half the disk, features rounded to 11 significant bits).
        claim_timeout: seconds after which a claim of a process on another host is taken to be stale (default:
            never; claims of this host's processes are stale as soon as the process is gone).
    """

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: str, settings: dict | None = None, dtype="float32",
                 claim_timeout: float | None = None):
        self.cache_dir = os.fspath(cache_dir)
        self.dtype = _normalise_dtype(dtype)
        suffix = "" if self.dtype == "float32" else "-fp16"
        self.folder = os.path.join(self.cache_dir, f"frr-{fingerprint}{suffix}")
        self.fingerprint = fingerprint
        self.settings = settings or {}
        self.claim_timeout = claim_timeout
        self._index = _Index()
        self._shards: dict[int, _Shard] = {}  # shard number -> header, read on first use
        self._files: OrderedDict[int, int] = OrderedDict()  # shard number -> open descriptor
        self._claims = None

    def with_dtype(self, dtype) -> "FRRFeatureCache":
        """The cache of the same settings stored in `dtype` (another folder)."""
        return FRRFeatureCache(self.cache_dir, self.fingerprint, self.settings, dtype, self.claim_timeout)

    # -- index ---------------------------------------------------------------------------------------------------

    def shard_files(self) -> list[str]:
        """Complete shards (temporary files of writers, finished or killed, are never listed)."""
        if not os.path.isdir(self.folder):
            return []
        return sorted(
            os.path.join(self.folder, name)
            for name in os.listdir(self.folder)
            if name.startswith("shard-") and name.endswith(".safetensors")
        )

    @property
    def index_file(self) -> str:
        return os.path.join(self.folder, "index.npz")

    def load(self) -> "FRRFeatureCache":
        """Indexes every shard (reading the saved index, then the headers of shards it does not cover) and saves the
        index when it grew. No feature is read."""
        return self.refresh(save=True)

    def refresh(self, save: bool = False) -> "FRRFeatureCache":
        """Adds the shards written since the last look (by this or other processes) to the index."""
        names = [os.path.basename(path) for path in self.shard_files()]
        present = set(names)
        if not self._index.names and os.path.isfile(self.index_file):
            saved = _Index.read_saved(self.index_file, present)
            if saved is not None:
                self._reset(saved)
        if not set(self._index.names) <= present:
            logger.warning(f"shards of the FRR cache {self.folder} were deleted; indexing it again")
            self._reset(_Index())
        known = set(self._index.names)
        new = [name for name in names if name not in known]
        hashes, opened = [], []
        for name in list(new):
            try:
                shard = _Shard(os.path.join(self.folder, name), self.dtype)
                shard_keys = shard.keys()
            except ValueError as error:  # truncated or foreign: its keys are computed again where images are at hand
                set_aside(os.path.join(self.folder, name), str(error))
                new.remove(name)
                continue
            hashes.append(key_hashes(shard_keys))
            shard.metadata.pop("keys", None)  # the index has them; a header is kept per shard, its keys are not
            opened.append(shard)
        first_new = len(self._index.names)
        self._index.add(new, hashes, self._key_of)
        self._shards.update({first_new + offset: shard for offset, shard in enumerate(opened)})
        if new and save:
            try:
                self._index.save(self.index_file)
            except OSError as error:  # a read-only cache still works, only opening it again is slower
                logger.warning(f"could not save the FRR cache index {self.index_file}: {error}")
        return self

    def _reset(self, index: _Index):
        self.close()
        self._index, self._shards = index, {}

    def _shard(self, number: int) -> _Shard:
        shard = self._shards.get(number)
        if shard is None:
            path = os.path.join(self.folder, self._index.names[number])
            try:
                shard = self._shards[number] = _Shard(path, self.dtype)
            except FileNotFoundError as error:  # set aside by another reader since this index was read
                raise CorruptCacheShard(path, "no longer in the cache") from error
            except ValueError as error:  # truncated since the index was saved
                set_aside(path, str(error))
                raise CorruptCacheShard(path, str(error)) from error
            shard.metadata.pop("keys", None)  # the index has them; a header is kept per shard, its keys are not
        return shard

    def _key_of(self, number: int, row: int) -> str:
        return _Shard(os.path.join(self.folder, self._index.names[number])).keys()[row]

    def _fd(self, number: int) -> int:
        fd = self._files.pop(number, None)
        if fd is None:
            path = self._shard(number).path
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except FileNotFoundError as error:  # set aside (or deleted) by another process since it was indexed
                raise CorruptCacheShard(path, "no longer in the cache") from error
            if len(self._files) >= _OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
        self._files[number] = fd
        return fd

    def close(self):
        """Closes the shard files kept open for reading (reopened on the next read)."""
        while self._files:
            os.close(self._files.popitem()[1])

    def __del__(self):
        if getattr(self, "_files", None):
            self.close()

    # -- reading -------------------------------------------------------------------------------------------------

    def positions(self, keys) -> np.ndarray:
        """Index positions (-1 where absent) of `keys`."""
        return self._index.lookup(key_hashes(keys))

    def __contains__(self, key) -> bool:
        return bool(self.positions([key])[0] >= 0)

    def __len__(self) -> int:
        return len(self._index)

    def keys(self):
        """Every key, shard by shard (read from the shards' headers)."""
        for number, name in enumerate(self._index.names):
            keys = _Shard(os.path.join(self.folder, name)).keys()
            positions = self.positions(keys)
            for row, (key, position) in enumerate(zip(keys, positions)):
                if self._index.shards[position] == number and self._index.rows[position] == row:
                    yield key  # the copy the index kept

    @property
    def index(self) -> "_KeyView":
        """Mapping key -> index position (what `features`/`masks` take)."""
        return _KeyView(self)

    @property
    def features(self) -> "_RowView | None":
        """`visual_features` rows by index position, read on indexing: `cache.features[positions]` (n, M, D)."""
        return _RowView(self, "visual_features") if len(self) else None

    @property
    def masks(self) -> "_RowView | None":
        return _RowView(self, "visual_mask") if len(self) else None

    def _by_shard(self, positions):
        """Per shard holding some of index `positions`: `(shard, descriptor, where in positions, rows ascending)`."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"FRR cache positions out of range [0, {len(self)})")
        shard_numbers, rows = self._index.shards[positions], self._index.rows[positions]
        for number in np.unique(shard_numbers):
            selected = np.flatnonzero(shard_numbers == number)
            order = np.argsort(rows[selected], kind="stable")
            yield self._shard(int(number)), self._fd(int(number)), selected[order], rows[selected][order]

    def read_positions(self, positions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(features (n, M, D) float32, masks (n, M) bool, num_detections (n,) int32)` at index `positions`."""
        count = len(np.asarray(positions).reshape(-1))
        features = masks = None
        detections = np.full(count, -1, dtype=np.int32)  # (n,)
        for shard, fd, selected, shard_rows in self._by_shard(positions):
            part = shard.read(fd, "visual_features", shard_rows)  # (k, M, D) in the storage dtype
            part_masks, checksums = shard.read_masks(fd, shard_rows)  # (k, M), (k,) or None
            part_detections = shard.read(fd, "num_detections", shard_rows) if "num_detections" in shard.tensors else None
            shard.verify(part, part_masks, checksums)
            if features is None:
                features = np.empty((count,) + part.shape[1:], dtype=np.float32)  # (n, M, D)
                masks = np.empty((count, part.shape[1]), dtype=bool)  # (n, M)
            features[selected] = part
            masks[selected] = part_masks
            if part_detections is not None:
                detections[selected] = part_detections
        if features is None:
            return torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.int32)
        return torch.from_numpy(features), torch.from_numpy(masks), torch.from_numpy(detections)

    def num_detections_at(self, positions) -> np.ndarray:
        """`num_detections` (n,) int32 at index `positions` (-1 where not stored), reading nothing else."""
        detections = np.full(len(np.asarray(positions).reshape(-1)), -1, dtype=np.int32)  # (n,)
        for shard, fd, selected, shard_rows in self._by_shard(positions):
            if "num_detections" in shard.tensors:
                detections[selected] = shard.read(fd, "num_detections", shard_rows)
        return detections

    def get_many(self, keys) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(features (n, M, D) float32, masks (n, M), num_detections (n,))` of `keys`; a missing key raises
        `KeyError`."""
        keys = [str(key) for key in keys]
        positions = self.positions(keys)
        if len(positions) and positions.min() < 0:
            raise KeyError(f"not in the FRR cache {self.folder}: {keys[int(np.argmin(positions))]!r}")
        return self.read_positions(positions)

    def _locate(self, key) -> tuple[int, int]:
        """`(shard number, row)` of one key."""
        position = self._index.locate(key)
        if position < 0:
            raise KeyError(f"not in the FRR cache {self.folder}: {key!r}")
        return int(self._index.shards[position]), int(self._index.rows[position])

    def get(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        """`(visual_features (max_objects, feature_dim) float32, visual_mask (max_objects,))` of a key; a missing key
        raises `KeyError`."""
        number, row = self._locate(key)
        shard, fd = self._shard(number), self._fd(number)
        if shard.checked:
            stored, mask = shard.read_checked_row(fd, row)  # (M, D) in the storage dtype, (M,)
        else:  # a shard written before checksums
            stored, mask = shard.read_row(fd, "visual_features", row), shard.read_row(fd, "visual_mask", row)
        return torch.from_numpy(stored).float(), torch.from_numpy(mask)

    def num_detections(self, key) -> int:
        """Detections above the threshold before the whole-image filler (-1: written without the count)."""
        number, row = self._locate(key)
        shard = self._shard(number)
        if "num_detections" not in shard.tensors:
            return -1
        return int(shard.read_row(self._fd(number), "num_detections", row))

    # -- writing -------------------------------------------------------------------------------------------------

    def write_shard(self, keys: list[str], features: torch.Tensor, masks: torch.Tensor, rank: int = 0,
                    num_detections: torch.Tensor | list[int] | None = None) -> str | None:
        """Writes one shard of `features` (n, max_objects, feature_dim), `masks` (n, max_objects) and
        `num_detections` (n,) (None: unknown, stored as -1), atomically; returns its path."""
        if not keys:
            return None
        if safetensors_save_file is None:
            raise ImportError("the FRR feature cache needs `safetensors`")
        tensors = _shard_tensors(len(keys), features, masks, num_detections, self.dtype)
        os.makedirs(self.folder, exist_ok=True)
        _write_settings(self.folder, self.settings, self.dtype)
        metadata = {"keys": json.dumps([str(key) for key in keys]), "format_version": str(CACHE_FORMAT_VERSION),
                    "dtype": self.dtype}
        return _save_shard(self.folder, tensors, metadata, rank)

    def remove_dead_temporaries(self) -> int:
        """Deletes the temporary files that writers of this host left when they were killed; returns how many."""
        return remove_dead_temporaries(self.folder)

    @property
    def claims(self) -> FeatureClaims:
        if self._claims is None or self._claims.pid != os.getpid():
            self._claims = FeatureClaims(self.folder, self.claim_timeout)
        return self._claims

    def fill(self, keys, compute, batch_size: int = 8, shard_size: int = 256, poll_interval: float = 0.5,
             progress=None) -> int:
        """Computes the `keys` missing from the cache and writes them, each key once among all the processes filling
        this folder at the same time; waits for the keys other processes are computing. Returns how many keys this
        process computed.

        `compute(keys)` returns `(done_keys, features (n, M, D), masks (n, M), num_detections (n,))` for the keys it
        could compute (those left out, e.g. unreadable images, are not cached and their claims are released).
        Results are written every `shard_size` keys: a killed process loses at most that many, and its claims are
        taken over by the next process that meets them. `progress(n)` is called as keys are settled.
        """
        return _Fill(self, compute, batch_size, shard_size, poll_interval, progress).run(keys)




class _Fill:
    """One `FRRFeatureCache.fill`: claims the missing keys batch by batch, computes those it holds, writes them every
    `shard_size` keys, then waits for the keys other processes hold (computing those whose owner gave up)."""

    def __init__(self, cache: FRRFeatureCache, compute, batch_size: int, shard_size: int, poll_interval: float,
                 progress):
        self.cache, self.compute, self.progress = cache, compute, progress
        self.batch_size, self.shard_size, self.poll_interval = batch_size, shard_size, poll_interval
        self.claims = None
        self.computed = 0  # keys this process computed
        self.last_report = None
        self.buffer = ([], [], [], [])  # keys, features, masks, num_detections computed and not yet written

    def run(self, keys) -> int:
        """Fills the cache with `keys`; returns how many keys this process computed."""
        cache = self.cache
        os.makedirs(cache.folder, exist_ok=True)
        cache.remove_dead_temporaries()
        self.claims = cache.claims
        cache.refresh()
        keys = list(dict.fromkeys(str(key) for key in keys))
        todo = [key for key, position in zip(keys, cache.positions(keys)) if position < 0]
        if self.progress and len(keys) > len(todo):
            self.progress(len(keys) - len(todo))
        self.last_report = time.monotonic()
        while todo:
            try:
                waiting = self._compute(todo)
            finally:
                self._flush()  # what was computed is kept even when a later key raised
            todo = self._wait(waiting)
        cache.refresh(save=True)
        return self.computed

    def _compute(self, todo: list[str]) -> list[str]:
        """Claims and computes `todo`, batch by batch; returns the keys other processes hold."""
        cache, claims, waiting = self.cache, self.claims, []
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            mine = [key for key in chunk if claims.claim(key)]
            cache.refresh()  # a key finished elsewhere since we looked: its shard is listed before its claim goes
            finished = {key for key in mine if key in cache}
            claims.release(finished)
            mine = [key for key in mine if key not in finished]
            waiting += [key for key in chunk if key not in mine and key not in finished]
            if mine:
                try:
                    done, features, masks, detections = self.compute(mine)
                except BaseException:
                    claims.release(mine)
                    raise
                self.computed += len(mine)
                claims.release(set(mine) - set(done))  # not computable (bad image): not cached
                for part, values in zip(self.buffer, (done, features, masks, detections)):
                    part.extend(values)
                if len(self.buffer[0]) >= self.shard_size:
                    self._flush()
            if self.progress:
                self.progress(len(mine) + len(finished))
        return waiting

    def _wait(self, waiting: list[str]) -> list[str]:
        """Waits until each of `waiting` is in the cache or no longer held; returns those to compute here."""
        cache, claims, todo = self.cache, self.claims, []
        while waiting and not todo:
            busy = {key for key in waiting if claims.held_by_other(key)}  # before refresh: see the shard first
            cache.refresh()
            present = {key for key, position in zip(waiting, cache.positions(waiting)) if position >= 0}
            todo = [key for key in waiting if key not in busy and key not in present]  # owner gone or gave up
            if self.progress and present:
                self.progress(len(present))
            waiting = [key for key in waiting if key in busy and key not in present]
            if waiting and not todo:
                if time.monotonic() - self.last_report > 30:
                    logger.warning(
                        f"waiting for {len(waiting)} FRR features that other processes are computing (claims in "
                        f"{claims.folder})"
                    )
                    self.last_report = time.monotonic()
                time.sleep(self.poll_interval)
        return todo

    def _flush(self):
        keys, features, masks, detections = self.buffer
        if keys:
            self.cache.write_shard(
                list(keys), torch.stack(features), torch.stack(masks), num_detections=list(detections)
            )
            self.claims.release(keys)  # after the rename: a waiting process sees the shard before the claim disappears
        for part in self.buffer:
            part.clear()

class _KeyView:
    """Read-only mapping of a cache's keys to their index positions (no Python object per key is kept)."""

    def __init__(self, cache: FRRFeatureCache):
        self.cache = cache

    def get(self, key, default=None):
        position = int(self.cache.positions([key])[0])
        return default if position < 0 else position

    def __getitem__(self, key) -> int:
        position = self.get(key, -1)
        if position < 0:
            raise KeyError(key)
        return position

    def __contains__(self, key) -> bool:
        return key in self.cache

    def __iter__(self):
        return self.cache.keys()

    def __len__(self) -> int:
        return len(self.cache)


class _RowView:
    """`cache.features` / `cache.masks`: rows read on indexing by index position."""

    def __init__(self, cache: FRRFeatureCache, name: str):
        self.cache, self.name = cache, name

    @property
    def shape(self) -> torch.Size:
        shard = self.cache._shard(0)
        return torch.Size((len(self.cache),) + shard.tensors[self.name][1][1:])

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, positions):
        single = isinstance(positions, (int, np.integer)) or (torch.is_tensor(positions) and positions.dim() == 0)
        positions = np.asarray(positions.cpu() if torch.is_tensor(positions) else positions, dtype=np.int64)
        features, masks, _ = self.cache.read_positions(positions.reshape(-1))
        values = features if self.name == "visual_features" else masks
        return values[0] if single else values


__all__ = ["CorruptCacheShard", "FRRFeatureCache", "key_hashes"]
