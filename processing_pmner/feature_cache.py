"""The FRR feature cache of P-MNER and the extraction of FRR features for a whole `datasets.Dataset`.

`FRRFeatureCache` keeps features as safetensors shards under `<cache_dir>/frr-<fingerprint>[-fp16]/` and answers
lookups from a compact index (sorted 64-bit key hashes plus int32 shard and row numbers, no Python object per key)
with positioned reads of single rows: opening a cache of a million images costs a few tens of MB whatever its size
on disk. Writers claim each image before computing it (one claim file per key, taken over when its owner is dead),
so processes filling one cache at the same time never compute an image twice; shards appear by atomic rename.
`extract_dataset_features` computes each distinct image of a dataset once (split between processes under
`torch.distributed`) and adds the features as columns.

Copied flat into saved processor folders (remote code): imports only torch, numpy, transformers and the standard
library at module level; safetensors, datasets and fcntl sit in `try:`.
"""

import hashlib
import json
import os
import socket
import struct
import time
import uuid
import zipfile
from collections import OrderedDict

import numpy as np
import torch
from transformers.utils import logging

from .image_loading import content_key, describe_image


try:
    from safetensors.torch import save_file as safetensors_save_file
except ImportError:  # safetensors is a dependency of transformers; kept optional for the remote-code check
    safetensors_save_file = None

try:
    import datasets
except ImportError:
    datasets = None

try:
    import fcntl
except ImportError:  # not on Windows: stale-claim takeover is then not serialised between processes
    fcntl = None


logger = logging.get_logger(__name__)

CACHE_FORMAT_VERSION = 2  # 1: float32 features and masks only; 2: adds `num_detections` and the `dtype` metadata
CACHE_DTYPES = {"float32": ("F32", torch.float32), "float16": ("F16", torch.float16)}
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BOOL": np.bool_, "I32": np.int32, "I64": np.int64}
_MAX_HEADER_BYTES = 256 * 2**20
_OPEN_FILES = 64  # shard files kept open for reads (least recently used closed first)


def _normalise_dtype(dtype) -> str:
    name = {torch.float32: "float32", torch.float16: "float16"}.get(dtype, str(dtype).replace("torch.", ""))
    name = {"fp32": "float32", "fp16": "float16", "half": "float16", "float": "float32"}.get(name, name)
    if name not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
    return name


def key_hashes(keys) -> np.ndarray:
    """64-bit BLAKE2b hashes (uint64) of string keys."""
    digests = b"".join(hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest() for key in keys)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def _pread(fd: int, size: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # platforms without pread (Windows): reads are not shared between threads
    return os.read(fd, size)


# ----------------------------------------------------------------------------------------------------------------------
# Shards, read by positioned reads (no mapping: read rows never count towards the reader's memory)
# ----------------------------------------------------------------------------------------------------------------------


class _Shard:
    """The header of one safetensors shard: per tensor its numpy dtype, shape and absolute byte offset."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError(f"FRR cache shard {path} is truncated (no safetensors header); delete it")
            (header_size,) = struct.unpack("<Q", head)
            if header_size > min(file_size - 8, _MAX_HEADER_BYTES):
                raise ValueError(f"FRR cache shard {path} is truncated or not a safetensors file; delete it")
            try:
                header = json.loads(handle.read(header_size))
            except ValueError as error:
                raise ValueError(f"FRR cache shard {path} has an unreadable header ({error}); delete it") from error
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors = {}  # name -> (numpy dtype, shape, absolute offset, safetensors dtype)
        self.row_bytes = {}
        for name, info in header.items():
            dtype = _NUMPY_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ValueError(f"FRR cache shard {path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            shape = tuple(int(size) for size in info["shape"])
            begin, end = (int(offset) for offset in info["data_offsets"])
            if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize or 8 + header_size + end > file_size:
                raise ValueError(f"FRR cache shard {path} is truncated (tensor {name!r}); delete it")
            self.tensors[name] = (dtype, shape, 8 + header_size + begin, info["dtype"])
            self.row_bytes[name] = (end - begin) // max(shape[0], 1) if shape else 0
        if "visual_features" not in self.tensors or "visual_mask" not in self.tensors:
            raise ValueError(f"FRR cache shard {path} lacks visual_features or visual_mask; delete it")
        self.rows = self.tensors["visual_features"][1][0]
        for name in ("visual_mask", "num_detections"):
            if name in self.tensors and self.tensors[name][1][0] != self.rows:
                raise ValueError(f"FRR cache shard {path} is inconsistent: {name} has a different row count; delete it")
        self.feature_dtype = self.tensors["visual_features"][3]

    def keys(self) -> list[str]:
        keys = json.loads(self.metadata.get("keys", "null") or "null")
        if not isinstance(keys, list) or len(keys) != self.rows:
            raise ValueError(
                f"FRR cache shard {self.path} is inconsistent: {len(keys) if isinstance(keys, list) else 'no'} keys "
                f"for {self.rows} rows; delete it"
            )
        return [str(key) for key in keys]

    def read_row(self, fd: int, name: str, row: int) -> np.ndarray:
        """Row `row` of tensor `name`: shape[1:]."""
        dtype, shape, start, _ = self.tensors[name]
        row_bytes = self.row_bytes[name]
        buffer = bytearray(row_bytes)  # read into directly: the array owns writable memory, no copy
        if hasattr(os, "preadv"):
            size = os.preadv(fd, [buffer], start + row * row_bytes)
        else:
            data = _pread(fd, row_bytes, start + row * row_bytes)
            size, buffer[: len(data)] = len(data), data
        if size != row_bytes:
            raise ValueError(f"FRR cache shard {self.path} is truncated (reading {name}); delete it")
        return np.frombuffer(buffer, dtype=dtype).reshape(shape[1:])

    def read(self, fd: int, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (sorted ascending) of tensor `name`: (len(rows), *shape[1:]); runs of consecutive rows are
        one read."""
        dtype, shape, start, _ = self.tensors[name]
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        out = np.empty((len(rows), row_bytes), dtype=np.uint8)  # (n, row_bytes)
        first = 0
        while first < len(rows):
            last = first
            while last + 1 < len(rows) and rows[last + 1] == rows[last] + 1:
                last += 1
            size = (last - first + 1) * row_bytes
            data = _pread(fd, size, start + int(rows[first]) * row_bytes)
            if len(data) != size:
                raise ValueError(f"FRR cache shard {self.path} is truncated (reading {name}); delete it")
            out[first : last + 1] = np.frombuffer(data, dtype=np.uint8).reshape(-1, row_bytes)
            first = last + 1
        return out.view(dtype).reshape((len(rows),) + shape[1:])


class _Index:
    """key -> (shard, row) as three arrays sorted by 64-bit key hash: 16 bytes per key, no Python object per key."""

    def __init__(self):
        self.hashes = np.zeros(0, dtype=np.uint64)  # (N,) sorted
        self.shards = np.zeros(0, dtype=np.int32)  # (N,)
        self.rows = np.zeros(0, dtype=np.int32)  # (N,)
        self.names: list[str] = []  # shard file names, by shard number

    def __len__(self) -> int:
        return len(self.hashes)

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """Index positions (-1 where absent) of `hashes` (n,)."""
        positions = np.searchsorted(self.hashes, hashes)  # (n,)
        clipped = np.minimum(positions, max(len(self.hashes) - 1, 0))
        found = (positions < len(self.hashes)) & (self.hashes[clipped] == hashes) if len(self.hashes) else positions < 0
        return np.where(found, positions, -1)

    def add(self, names: list[str], hashes: list[np.ndarray], key_of) -> None:
        """Adds shards `names`, row i of shard `names[j]` having hash `hashes[j][i]`, in one merge; a key already
        indexed keeps its first copy. `key_of(shard, row)` names a key, to tell a repeated key from a collision."""
        if not names:
            return
        first_new = len(self.names)
        self.names.extend(names)
        all_hashes = np.concatenate([self.hashes, *hashes])
        all_shards = np.concatenate(
            [self.shards] + [np.full(len(part), first_new + j, dtype=np.int32) for j, part in enumerate(hashes)]
        )
        all_rows = np.concatenate([self.rows] + [np.arange(len(part), dtype=np.int32) for part in hashes])
        order = np.argsort(all_hashes, kind="stable")  # earlier entries first among equal hashes
        all_hashes, all_shards, all_rows = all_hashes[order], all_shards[order], all_rows[order]
        repeated = np.flatnonzero(all_hashes[1:] == all_hashes[:-1]) + 1  # positions of later copies
        for position in repeated:
            first = position - 1
            while first > 0 and all_hashes[first - 1] == all_hashes[position]:
                first -= 1
            kept, dropped = key_of(all_shards[first], all_rows[first]), key_of(all_shards[position], all_rows[position])
            if kept != dropped:
                raise ValueError(f"FRR cache keys {kept!r} and {dropped!r} have the same 64-bit hash; use other keys")
        keep = np.ones(len(all_hashes), dtype=bool)
        keep[repeated] = False
        self.hashes, self.shards, self.rows = all_hashes[keep], all_shards[keep], all_rows[keep]

    def save(self, path: str) -> None:
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(temporary, "wb") as handle:
            np.savez(
                handle, hashes=self.hashes, shards=self.shards, rows=self.rows,
                names=np.array(self.names, dtype=str), version=np.array(CACHE_FORMAT_VERSION),
            )
        os.replace(temporary, path)

    @classmethod
    def read(cls, path: str) -> "_Index":
        with np.load(path, allow_pickle=False) as data:
            if int(data["version"]) != CACHE_FORMAT_VERSION:
                raise ValueError(f"index format {int(data['version'])}")
            index = cls()
            index.hashes, index.shards, index.rows = data["hashes"], data["shards"], data["rows"]
            index.names = [str(name) for name in data["names"]]
        if not (len(index.hashes) == len(index.shards) == len(index.rows)) or np.any(index.hashes[1:] <= index.hashes[:-1]):
            raise ValueError("index arrays are inconsistent")
        return index


# ----------------------------------------------------------------------------------------------------------------------
# Claims: one file per key, created atomically, naming its owner
# ----------------------------------------------------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """Start time of a process (Linux /proc), to tell a live owner from a reused pid; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]  # a zombie is dead; field 22 of stat is the start time


def _process_alive(pid: int, start: str | None) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate the process on Windows: never take over a claim there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    if os.path.isdir("/proc"):
        now = _process_start(pid)
        return now is not None and (start is None or now == start)
    return True


class _Claims:
    """`<folder>/claims/<sha1 of key>.claim`, created with O_CREAT|O_EXCL, holding the owner's host, pid and start
    time. A claim whose owner is a dead process of this host is stale and is taken over (under a lock, so that only
    one process takes it)."""

    def __init__(self, folder: str, claim_timeout: float | None = None):
        self.folder = os.path.join(folder, "claims")
        self.claim_timeout = claim_timeout
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.owner = {"host": self.host, "pid": self.pid, "start": _process_start(self.pid)}

    def path(self, key: str) -> str:
        return os.path.join(self.folder, hashlib.sha1(key.encode("utf-8")).hexdigest() + ".claim")

    def _create(self, key: str) -> bool:
        try:
            fd = os.open(self.path(key), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps({**self.owner, "key": key, "time": time.time()}).encode("utf-8"))
        finally:
            os.close(fd)
        return True

    def read(self, key: str) -> tuple[dict, float] | None:
        """`(owner, modification time)` of the claim on `key`, or None when there is none."""
        try:
            with open(self.path(key), "rb") as handle:
                text, mtime = handle.read(), os.fstat(handle.fileno()).st_mtime
        except FileNotFoundError:
            return None
        try:
            owner = json.loads(text)
        except ValueError:
            owner = {}  # created but not yet written, or its writer died in between
        return owner, mtime

    def is_stale(self, owner: dict, mtime: float) -> bool:
        if not owner.get("host"):
            return time.time() - mtime > 60  # never written: its creator died between create and write
        if owner["host"] == self.host and isinstance(owner.get("pid"), int):
            return not _process_alive(owner["pid"], owner.get("start"))
        return self.claim_timeout is not None and time.time() - mtime > self.claim_timeout

    def is_ours(self, owner: dict) -> bool:
        return owner.get("host") == self.host and owner.get("pid") == self.pid

    def claim(self, key: str) -> bool:
        """True when this process now owns `key` (claimed anew, or taken over from a dead owner)."""
        os.makedirs(self.folder, exist_ok=True)
        if self._create(key):
            return True
        seen = self.read(key)
        if seen is None:
            return self._create(key)  # released meanwhile
        if self.is_ours(seen[0]):
            return True
        if not self.is_stale(*seen):
            return False
        with self._takeover_lock():
            now = self.read(key)  # under the lock nobody else takes it over; its dead owner cannot change it
            if now is not None and now[0] == seen[0] and self.is_stale(*now):
                logger.warning(
                    f"taking over the FRR cache claim on {key!r} from pid {seen[0].get('pid')} on "
                    f"{seen[0].get('host')!r}, which is gone"
                )
                os.unlink(self.path(key))
            elif now is not None:
                return False
        return self._create(key)

    def held_by_other(self, key: str) -> bool:
        seen = self.read(key)
        return seen is not None and not self.is_ours(seen[0]) and not self.is_stale(*seen)

    def release(self, keys) -> None:
        for key in keys:
            seen = self.read(key)
            if seen is not None and self.is_ours(seen[0]):
                os.unlink(self.path(key))

    def _takeover_lock(self):
        class Lock:
            def __enter__(lock):
                lock.handle = open(os.path.join(self.folder, "takeover.lock"), "a")
                if fcntl is not None:
                    fcntl.flock(lock.handle, fcntl.LOCK_EX)  # released by the kernel if this process dies

            def __exit__(lock, *exc):
                lock.handle.close()  # closing releases the flock

        return Lock()


# ----------------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------------


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

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        fingerprint: str,
        settings: dict | None = None,
        dtype="float32",
        claim_timeout: float | None = None,
    ):
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
            try:
                saved = _Index.read(self.index_file)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:  # derived data: rebuilt
                logger.warning(f"FRR cache index {self.index_file} is unreadable ({error}); rebuilding it from the shards")
            else:
                if set(saved.names) <= present:
                    self._reset(saved)
                else:
                    logger.warning(f"FRR cache index {self.index_file} names deleted shards; rebuilding it")
        if not set(self._index.names) <= present:
            logger.warning(f"shards of the FRR cache {self.folder} were deleted; indexing it again")
            self._reset(_Index())
        known = set(self._index.names)
        new = [name for name in names if name not in known]
        hashes, opened = [], []
        for name in new:
            shard = self._open_shard(name)
            hashes.append(key_hashes(shard.keys()))
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

    def _open_shard(self, name: str) -> _Shard:
        shard = _Shard(os.path.join(self.folder, name))
        if shard.feature_dtype != CACHE_DTYPES[self.dtype][0]:
            raise ValueError(
                f"FRR cache shard {shard.path} holds {shard.feature_dtype} features in a {self.dtype} cache; delete it"
            )
        return shard

    def _shard(self, number: int) -> _Shard:
        shard = self._shards.get(number)
        if shard is None:
            shard = self._shards[number] = self._open_shard(self._index.names[number])
            shard.metadata.pop("keys", None)  # the index has them; a header is kept per shard, its keys are not
        return shard

    def _key_of(self, number: int, row: int) -> str:
        return _Shard(os.path.join(self.folder, self._index.names[number])).keys()[row]

    def _fd(self, number: int) -> int:
        fd = self._files.pop(number, None)
        if fd is None:
            fd = os.open(self._shard(number).path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
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
            part = shard.read(fd, "visual_features", shard_rows)  # (k, M, D)
            if features is None:
                features = np.empty((count,) + part.shape[1:], dtype=np.float32)  # (n, M, D)
                masks = np.empty((count, part.shape[1]), dtype=bool)  # (n, M)
            features[selected] = part
            masks[selected] = shard.read(fd, "visual_mask", shard_rows)
            if "num_detections" in shard.tensors:
                detections[selected] = shard.read(fd, "num_detections", shard_rows)
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
        """`(shard number, row)` of one key (the single-key path: no array built per call)."""
        digest = hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest()
        wanted = np.uint64(int.from_bytes(digest, "little"))
        hashes = self._index.hashes
        position = int(hashes.searchsorted(wanted))
        if position == len(hashes) or hashes[position] != wanted:
            raise KeyError(f"not in the FRR cache {self.folder}: {key!r}")
        return int(self._index.shards[position]), int(self._index.rows[position])

    def get(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        """`(visual_features (max_objects, feature_dim) float32, visual_mask (max_objects,))` of a key; a missing key
        raises `KeyError`."""
        number, row = self._locate(key)
        shard, fd = self._shard(number), self._fd(number)
        features = torch.from_numpy(shard.read_row(fd, "visual_features", row)).float()  # (M, D)
        return features, torch.from_numpy(shard.read_row(fd, "visual_mask", row))  # (M,)

    def num_detections(self, key) -> int:
        """Detections above the threshold before the whole-image filler (-1: written without the count)."""
        number, row = self._locate(key)
        shard = self._shard(number)
        if "num_detections" not in shard.tensors:
            return -1
        return int(shard.read_row(self._fd(number), "num_detections", row))

    # -- writing -------------------------------------------------------------------------------------------------

    def write_shard(
        self,
        keys: list[str],
        features: torch.Tensor,
        masks: torch.Tensor,
        rank: int = 0,
        num_detections: torch.Tensor | list[int] | None = None,
    ) -> str | None:
        """Writes one shard of `features` (n, max_objects, feature_dim), `masks` (n, max_objects) and
        `num_detections` (n,) (None: unknown, stored as -1), atomically; returns its path."""
        if not keys:
            return None
        if safetensors_save_file is None:
            raise ImportError("the FRR feature cache needs `safetensors`")
        count = len(keys)
        if features.shape[0] != count or masks.shape[0] != count:
            raise ValueError(f"write_shard: {count} keys for {features.shape[0]} features and {masks.shape[0]} masks")
        if num_detections is None:
            num_detections = torch.full((count,), -1, dtype=torch.int32)
        num_detections = torch.as_tensor(num_detections, dtype=torch.int32).reshape(-1)  # (n,)
        if num_detections.shape[0] != count:
            raise ValueError(f"write_shard: {count} keys for {num_detections.shape[0]} num_detections")
        stored = features.detach().to("cpu", CACHE_DTYPES[self.dtype][1]).contiguous()  # (n, M, D)
        if not torch.isfinite(stored).all():
            raise ValueError(
                f"FRR features are not finite in {self.dtype}"
                + (" (beyond float16's range: use a float32 cache)" if torch.isfinite(features).all() else "")
            )
        os.makedirs(self.folder, exist_ok=True)
        self._write_settings()
        tag = f"{hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]}-{os.getpid()}"
        name = f"shard-{tag}-rank{rank}-{uuid.uuid4().hex[:12]}.safetensors"
        path = os.path.join(self.folder, name)
        temporary = os.path.join(self.folder, f".tmp-{tag}-{uuid.uuid4().hex[:12]}")  # never listed as a shard
        tensors = {
            "visual_features": stored,
            "visual_mask": masks.detach().to("cpu", torch.bool).contiguous(),  # (n, M)
            "num_detections": num_detections.contiguous(),  # (n,)
        }
        metadata = {"keys": json.dumps([str(key) for key in keys]), "format_version": str(CACHE_FORMAT_VERSION),
                    "dtype": self.dtype}
        try:
            safetensors_save_file(tensors, temporary, metadata=metadata)
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        return path

    def _write_settings(self):
        settings_file = os.path.join(self.folder, "settings.json")
        if not os.path.exists(settings_file):
            temporary = f"{settings_file}.{uuid.uuid4().hex}.tmp"
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump({**self.settings, "cache_dtype": self.dtype}, handle, indent=2, sort_keys=True, default=str)
            os.replace(temporary, settings_file)

    def remove_dead_temporaries(self) -> int:
        """Deletes the temporary files that writers of this host left when they were killed; returns how many."""
        if not os.path.isdir(self.folder):
            return 0
        host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
        removed = 0
        for name in os.listdir(self.folder):
            parts = name.split("-")
            if name.startswith(".tmp-") and len(parts) == 4 and parts[1] == host and parts[2].isdigit():
                if int(parts[2]) != os.getpid() and not _process_alive(int(parts[2]), None):
                    os.unlink(os.path.join(self.folder, name))
                    removed += 1
        return removed

    @property
    def claims(self) -> _Claims:
        if self._claims is None or self._claims.pid != os.getpid():
            self._claims = _Claims(self.folder, self.claim_timeout)
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
        return _fill(self, keys, compute, batch_size, shard_size, poll_interval, progress)


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


# ----------------------------------------------------------------------------------------------------------------------
# Filling a cache from several processes at once
# ----------------------------------------------------------------------------------------------------------------------


def _fill(cache: "FRRFeatureCache", keys, compute, batch_size, shard_size, poll_interval, progress) -> int:
    """`FRRFeatureCache.fill`."""
    os.makedirs(cache.folder, exist_ok=True)
    cache.remove_dead_temporaries()
    claims = cache.claims
    cache.refresh()
    keys = list(dict.fromkeys(str(key) for key in keys))
    todo = [key for key, position in zip(keys, cache.positions(keys)) if position < 0]
    if progress and len(keys) > len(todo):
        progress(len(keys) - len(todo))
    computed, last_report = 0, time.monotonic()
    buffer = ([], [], [], [])  # keys, features, masks, num_detections computed and not yet written
    while todo:
        waiting = []
        try:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                mine = [key for key in chunk if claims.claim(key)]
                cache.refresh()  # a key finished elsewhere since we looked: its shard is listed before its claim goes
                finished = {key for key in mine if key in cache}
                claims.release(finished)
                mine = [key for key in mine if key not in finished]
                waiting += [key for key in chunk if key not in mine and key not in finished]
                if mine:
                    try:
                        done, features, masks, detections = compute(mine)
                    except BaseException:
                        claims.release(mine)
                        raise
                    computed += len(mine)
                    claims.release(set(mine) - set(done))  # not computable (bad image): not cached
                    for part, values in zip(buffer, (done, features, masks, detections)):
                        part.extend(values)
                    if len(buffer[0]) >= shard_size:
                        _flush(cache, buffer, claims)
                if progress:
                    progress(len(mine) + len(finished))
        finally:
            _flush(cache, buffer, claims)  # what was computed is kept even when a later key raised
        todo = []
        while waiting and not todo:
            busy = {key for key in waiting if claims.held_by_other(key)}  # before refresh: see the shard first
            cache.refresh()
            present = {key for key, position in zip(waiting, cache.positions(waiting)) if position >= 0}
            todo = [key for key in waiting if key not in busy and key not in present]  # owner gone or gave up
            if progress and present:
                progress(len(present))
            waiting = [key for key in waiting if key in busy and key not in present]
            if waiting and not todo:
                if time.monotonic() - last_report > 30:
                    logger.warning(
                        f"waiting for {len(waiting)} FRR features that other processes are computing (claims in "
                        f"{claims.folder})"
                    )
                    last_report = time.monotonic()
                time.sleep(poll_interval)
    cache.refresh(save=True)
    return computed


def _flush(cache: "FRRFeatureCache", buffer, claims):
    keys, features, masks, detections = buffer
    if keys:
        cache.write_shard(list(keys), torch.stack(features), torch.stack(masks), num_detections=list(detections))
        claims.release(keys)  # after the rename: a waiting process sees the shard before the claim disappears
    for part in buffer:
        part.clear()


# ----------------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------------


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
        above the threshold before the whole-image filler; 0 without features), left out (with a warning) when part
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
    positions = torch.from_numpy(cache.positions(row_keys))  # (rows,) index position or -1
    feature_dim = cache.features.shape[-1] if len(cache) else processor.feature_dim
    missing = sorted({key for key, position in zip(row_keys, positions.tolist()) if position < 0})
    with_counts = add_num_detections
    for start in range(0, len(positions) if with_counts else 0, 4096):  # counts are tiny: check every one is known
        part = positions[start : start + 4096]
        present = part[part >= 0]
        if len(present) and (cache.num_detections_at(present.numpy()) < 0).any():
            with_counts = False
            logger.warning(f"part of the FRR cache {cache.folder} has no detection counts (written by an older "
                           "version): the dataset gets no visual_num_detections column")
            break
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
            features, masks, counts = cache.read_positions(rows[present].numpy())  # (b', M, D), (b', M), (b',)
            out_features[present], out_masks[present], out_counts[present] = features, masks, counts
        output = {"visual_features": out_features, "visual_mask": out_masks}
        if with_counts:
            output["visual_num_detections"] = out_counts
        return output

    names = ("visual_features", "visual_mask", "visual_num_detections")
    existing = [name for name in names if name in dataset.column_names]
    base = dataset.remove_columns(existing) if existing else dataset
    features = base.features.copy()
    features["visual_features"] = datasets.Array2D(shape=(processor.max_objects, feature_dim), dtype="float32")
    features["visual_mask"] = datasets.List(datasets.Value("bool"), length=processor.max_objects)
    if with_counts:
        features["visual_num_detections"] = datasets.Value("int32")
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


def _extract_keys(processor, raw, image_column, keys, first_row, cache, rank, batch_size, device, progress):
    """Computes `keys` into `cache` through `FRRFeatureCache.fill` (claims: keys another process is computing are
    waited for, not computed again)."""
    batch_size = batch_size or processor.batch_size
    if not keys:
        return
    from transformers.utils.logging import tqdm

    def compute(chunk):
        sources = raw[[first_row[key] for key in chunk]][image_column]
        names = [f"{describe_image(source)} (key {key})" for key, source in zip(chunk, sources)]
        features, masks, _, bad, detections = processor.extract(
            sources, names, device=device, batch_size=batch_size, return_num_detections=True
        )  # (b, M, D), (b, M), bad indices, (b,)
        kept = [index for index in range(len(chunk)) if index not in set(bad)]  # a bad image is never cached
        return [chunk[index] for index in kept], features[kept], masks[kept], detections[kept]

    bar = tqdm(total=len(keys), desc="FRR features", unit="image", disable=not progress or rank != 0)
    try:
        cache.fill(keys, compute, batch_size=batch_size, progress=bar.update)
    finally:
        bar.close()


__all__ = ["FRRFeatureCache", "extract_dataset_features", "key_hashes"]
