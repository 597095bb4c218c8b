"""The index of the FRR feature cache: key -> (shard, row) as sorted 64-bit key hashes plus int32 shard and row
numbers (16 bytes per key, no Python object per key), saved as `index.npz` beside the shards.

Copied flat into saved processor folders (remote code): imports only numpy, transformers and the standard library at
module level.
"""

import hashlib
import os
import uuid
import zipfile

import numpy as np
from transformers.utils import logging

from .image_cache_shards import CACHE_FORMAT_VERSION


logger = logging.get_logger(__name__)


def key_hashes(keys) -> np.ndarray:
    """64-bit BLAKE2b hashes (uint64) of string keys."""
    digests = b"".join(hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest() for key in keys)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


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


__all__ = ["key_hashes"]
