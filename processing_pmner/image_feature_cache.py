"""The FRR feature cache of P-MNER: safetensors shards, their compact index and `FRRFeatureCache`.

`FRRFeatureCache` keeps features as safetensors shards under `<cache_dir>/frr-<fingerprint>[-fp16]/` and answers
lookups from a compact index (sorted 64-bit key hashes plus int32 shard and row numbers, no Python object per key)
with positioned reads of single rows: opening a cache of a million images costs a few tens of MB whatever its size
on disk. Shards appear by atomic rename. Writers filling one cache at the same time claim each image before
computing it, so that none is computed twice (`image_feature_claims.py`); `image_dataset_features.py` extracts the features of
a whole `datasets.Dataset` into the cache.

Copied flat into saved processor folders (remote code): imports only torch, numpy, transformers and the standard
library at module level; safetensors sits in `try:`.
"""

import hashlib
import json
import os
import struct
import uuid
import zipfile
from collections import OrderedDict

import numpy as np
import torch
from transformers.utils import logging

from .image_feature_claims import _Claims, _fill, _process_start, _writer_tag, remove_dead_temporaries


try:
    from safetensors.torch import save_file as safetensors_save_file
except ImportError:  # safetensors is a dependency of transformers; kept optional for the remote-code check
    safetensors_save_file = None


logger = logging.get_logger(__name__)

CACHE_FORMAT_VERSION = 2  # 1: float32 features and masks only; 2: adds `num_detections` and the `dtype` metadata
CACHE_DTYPES = {"float32": ("F32", torch.float32), "float16": ("F16", torch.float16)}
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BOOL": np.bool_, "I32": np.int32, "I64": np.int64, "U8": np.uint8}
_MAX_HEADER_BYTES = 256 * 2**20


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


class CorruptCacheShard(ValueError):
    """A shard of the FRR cache whose stored bytes do not match their checksums (or that cannot be read); it has been
    set aside (renamed `<shard>.corrupt`), so the keys it held are computed again where their images are at hand."""

    def __init__(self, path: str, reason: str):
        self.path = path
        super().__init__(f"FRR cache shard {path} is corrupt ({reason}); set aside as {path}{CORRUPT_SUFFIX}")


CORRUPT_SUFFIX = ".corrupt"
_WARNED = set()


def set_aside(path: str, reason: str) -> None:
    """Renames a corrupt shard out of the cache (once, whichever process sees it first) with one warning."""
    try:
        os.replace(path, path + CORRUPT_SUFFIX)
    except FileNotFoundError:  # another reader set it aside first
        pass
    if path not in _WARNED:
        _WARNED.add(path)
        logger.warning(f"FRR cache shard {path} is corrupt ({reason}): set aside as {path}{CORRUPT_SUFFIX}; its "
                       "images are computed again where they are at hand")


_MASK_WEIGHT = 0x9E3779B97F4A7C15  # mixes the mask's byte sum into the features' word sum


def row_checksums(features: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The checksum of each row's stored bytes (features in the storage dtype, then the mask): (n,) int64."""
    features, masks = np.ascontiguousarray(features), np.ascontiguousarray(masks)
    return np.array([_row_checksum(features[row], masks[row]) for row in range(len(features))], dtype=np.int64)


def _row_checksum(features: np.ndarray, mask: np.ndarray) -> int:
    """`_bytes_checksum` of one row's arrays (features in the storage dtype, mask)."""
    return _bytes_checksum(memoryview(np.ascontiguousarray(features)).cast("B"), np.ascontiguousarray(mask).tobytes())


def _bytes_checksum(features, mask) -> int:
    """Sum of a row's feature bytes as little-endian 64-bit words (trailing bytes added one by one) plus a multiple of
    its mask's byte sum, modulo 2**64, as a signed int64 value. Any overwritten word or byte changes it (unless the
    new bytes sum the same, by chance): a couple of microseconds a row, so every read can afford it. `features` and
    `mask` are bytes-like (the lookup path sums the buffers it read, before any array is made of them)."""
    whole = len(features) & ~7
    total = int(_add(np.frombuffer(features, _WORDS, whole >> 3)))  # wraps mod 2**64
    if whole != len(features):
        total += sum(features[whole:])
    total = (total + _MASK_WEIGHT * sum(mask)) & 0xFFFFFFFFFFFFFFFF
    return total - (1 << 64) if total >= 1 << 63 else total


_WORDS, _add = np.dtype("<u8"), np.add.reduce  # looked up once: the lookup path calls `_bytes_checksum` per row


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


_preadv = getattr(os, "preadv", None)  # reads into a given buffer (POSIX); elsewhere `_pread`


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
        self.feature_dtype_np, self.row_shape = self.tensors["visual_features"][0], self.tensors["visual_features"][1][1:]
        self.checked = "row_check" in self.tensors  # shards written before checksums are read unchecked
        if self.checked and self.tensors["row_check"][1] != (self.rows, self.tensors["visual_mask"][1][1] + 8):
            raise ValueError(f"FRR cache shard {path} is inconsistent: row_check has the wrong shape; delete it")
        if self.checked:  # (features' offset, row bytes, row_check's offset, row bytes): read per lookup
            self.checked_layout = (self.tensors["visual_features"][2], self.row_bytes["visual_features"],
                                   self.tensors["row_check"][2], self.row_bytes["row_check"])

    def read_masks(self, fd: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`(masks (k, M) bool, checksums (k,) int64 or None)` of `rows`: one read of `row_check` where the shard
        has it, else the mask alone."""
        if not self.checked:
            return self.read(fd, "visual_mask", rows), None
        check = self.read(fd, "row_check", rows)  # (k, M + 8)
        return check[:, :-8].view(np.bool_), np.ascontiguousarray(check[:, -8:]).view("<i8").reshape(-1)

    def verify(self, rows_features: np.ndarray, masks: np.ndarray, checksums: np.ndarray | None) -> None:
        """Raises `CorruptCacheShard` (setting the shard aside) when rows read do not match their checksums."""
        if checksums is not None and not np.array_equal(row_checksums(rows_features, masks), checksums):
            self.corrupt()

    def corrupt(self, reason: str = "stored bytes do not match their checksums"):
        """Sets this shard aside and raises `CorruptCacheShard`."""
        set_aside(self.path, reason)
        raise CorruptCacheShard(self.path, reason)

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
        dtype, shape, _, _ = self.tensors[name]
        return np.frombuffer(self.read_row_bytes(fd, name, row), dtype=dtype).reshape(shape[1:])

    def read_row_bytes(self, fd: int, name: str, row: int) -> bytearray:
        """The stored bytes of row `row` of tensor `name` (read into directly: writable memory, no copy)."""
        start = self.tensors[name][2]
        row_bytes = self.row_bytes[name]
        buffer = bytearray(row_bytes)
        if _preadv is not None:
            size = _preadv(fd, [buffer], start + row * row_bytes)
        else:
            data = _pread(fd, row_bytes, start + row * row_bytes)
            size, buffer[: len(data)] = len(data), data
        if size != row_bytes:
            self.corrupt(f"truncated (reading {name})")
        return buffer

    def read_checked_row(self, fd: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        """`(features (M, D) in the storage dtype, mask (M,))` of one row of a checked shard, verified against its
        checksum: the bytes are summed as read, before any array is made of them (the lookup path)."""
        if _preadv is None:
            features, check = self.read_row_bytes(fd, "visual_features", row), self.read_row_bytes(fd, "row_check", row)
        else:  # the same two reads, inlined: this is the per-lookup path
            feature_start, feature_bytes, check_start, check_bytes = self.checked_layout
            features, check = bytearray(feature_bytes), bytearray(check_bytes)
            if (_preadv(fd, [features], feature_start + row * feature_bytes) != feature_bytes
                    or _preadv(fd, [check], check_start + row * check_bytes) != check_bytes):
                self.corrupt("truncated (reading a row)")
        mask_bytes = len(check) - 8  # mask bytes, then the checksum (int64)
        if _bytes_checksum(features, memoryview(check)[:mask_bytes]) != int.from_bytes(check[mask_bytes:], "little",
                                                                                      signed=True):
            self.corrupt()
        return np.frombuffer(features, self.feature_dtype_np).reshape(self.row_shape), np.frombuffer(
            check, np.bool_, mask_bytes
        )

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
                self.corrupt(f"truncated (reading {name})")
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

    def locate(self, key) -> int:
        """Index position (-1 where absent) of one key (the single-key path: no array built per call)."""
        digest = hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest()
        wanted = np.uint64(int.from_bytes(digest, "little"))
        position = int(self.hashes.searchsorted(wanted))
        return position if position < len(self.hashes) and self.hashes[position] == wanted else -1

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

    @classmethod
    def read_saved(cls, path: str, shard_names: set[str]) -> "_Index | None":
        """The index saved at `path`, or None (with a warning: it is rebuilt from the shards) when it is unreadable
        or names a shard not in `shard_names`."""
        try:
            saved = cls.read(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:  # derived data: rebuilt
            logger.warning(f"FRR cache index {path} is unreadable ({error}); rebuilding it from the shards")
            return None
        if not set(saved.names) <= shard_names:
            logger.warning(f"FRR cache index {path} names deleted shards; rebuilding it")
            return None
        return saved




# ----------------------------------------------------------------------------------------------------------------------
# Writing shards
# ----------------------------------------------------------------------------------------------------------------------


def _shard_tensors(count: int, features, masks, num_detections, dtype: str) -> dict[str, torch.Tensor]:
    """The tensors of a shard of `count` keys (`FRRFeatureCache.write_shard`), checked and converted for storage."""
    if features.shape[0] != count or masks.shape[0] != count:
        raise ValueError(f"write_shard: {count} keys for {features.shape[0]} features and {masks.shape[0]} masks")
    if num_detections is None:
        num_detections = torch.full((count,), -1, dtype=torch.int32)
    num_detections = torch.as_tensor(num_detections, dtype=torch.int32).reshape(-1)  # (n,)
    if num_detections.shape[0] != count:
        raise ValueError(f"write_shard: {count} keys for {num_detections.shape[0]} num_detections")
    stored = features.detach().to("cpu", CACHE_DTYPES[dtype][1]).contiguous()  # (n, M, D)
    if not torch.isfinite(stored).all():
        raise ValueError(
            f"FRR features are not finite in {dtype}"
            + (" (beyond float16's range: use a float32 cache)" if torch.isfinite(features).all() else "")
        )
    masks = masks.detach().to("cpu", torch.bool).contiguous()  # (n, M)
    num_detections = num_detections.contiguous()  # (n,)
    checksums = row_checksums(stored.numpy(), masks.numpy())  # (n,) verified on every read
    # each row's mask bytes and checksum side by side: a checked read takes them in one read, instead of the mask
    row_check = np.concatenate([masks.numpy().view(np.uint8), checksums.astype("<i8").view(np.uint8).reshape(-1, 8)], 1)
    return {
        "visual_features": stored,
        "visual_mask": masks,
        "num_detections": num_detections,
        "row_check": torch.from_numpy(np.ascontiguousarray(row_check)),  # (n, M + 8) uint8
    }


def _write_settings(folder: str, settings: dict, dtype: str):
    """`settings.json` of a cache folder, for people reading it (written once)."""
    settings_file = os.path.join(folder, "settings.json")
    if not os.path.exists(settings_file):
        temporary = f"{settings_file}.{uuid.uuid4().hex}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump({**settings, "cache_dtype": dtype}, handle, indent=2, sort_keys=True, default=str)
        os.replace(temporary, settings_file)


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
                shard = self._open_shard(name)
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
            path = os.path.join(self.folder, self._index.names[number])
            try:
                shard = self._shards[number] = self._open_shard(self._index.names[number])
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
        tensors = _shard_tensors(len(keys), features, masks, num_detections, self.dtype)
        os.makedirs(self.folder, exist_ok=True)
        _write_settings(self.folder, self.settings, self.dtype)
        tag = _writer_tag()
        name = f"shard-{tag}-rank{rank}-{uuid.uuid4().hex[:12]}.safetensors"
        path = os.path.join(self.folder, name)
        temporary = os.path.join(self.folder, f".tmp-{tag}-{uuid.uuid4().hex[:12]}")  # never listed as a shard
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

    def remove_dead_temporaries(self) -> int:
        """Deletes the temporary files that writers of this host left when they were killed; returns how many."""
        return remove_dead_temporaries(self.folder)

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


__all__ = ["CorruptCacheShard", "FRRFeatureCache", "key_hashes"]
