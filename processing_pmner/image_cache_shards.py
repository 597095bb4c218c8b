"""The shards of the FRR feature cache: safetensors files of features, masks, detection counts and per-row checksums.

`_Shard` reads a shard's header and single rows by positioned reads (no mapping: read rows never count towards the
reader's memory), verifying each row against its checksum; `_shard_tensors` builds the tensors of a shard to write. A
shard whose bytes do not match is set aside (`set_aside`, `CorruptCacheShard`).

Copied flat into saved processor folders (remote code): imports only torch, numpy, transformers and the standard
library at module level.
"""

import json
import os
import struct

import numpy as np
import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

CACHE_FORMAT_VERSION = 2  # 1: float32 features and masks only; 2: adds `num_detections` and the `dtype` metadata
CACHE_DTYPES = {"float32": ("F32", torch.float32), "float16": ("F16", torch.float16)}
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BOOL": np.bool_, "I32": np.int32, "I64": np.int64, "U8": np.uint8}
_MAX_HEADER_BYTES = 256 * 2**20


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
    """The header of one safetensors shard: per tensor its numpy dtype, shape and absolute byte offset. With
    `cache_dtype` (a cache's storage dtype), a shard holding features of another dtype is refused."""

    def __init__(self, path: str, cache_dtype: str | None = None):
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
        if cache_dtype is not None and self.feature_dtype != CACHE_DTYPES[cache_dtype][0]:
            raise ValueError(
                f"FRR cache shard {path} holds {self.feature_dtype} features in a {cache_dtype} cache; delete it"
            )

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


__all__ = ["CACHE_DTYPES", "CACHE_FORMAT_VERSION", "CorruptCacheShard", "row_checksums", "set_aside"]
