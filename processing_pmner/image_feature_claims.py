"""Concurrent writers of the FRR feature cache: per-key claim files and the fill loop behind `FRRFeatureCache.fill`.

A writer claims each key before computing it (`<cache folder>/claims/<sha1 of key>.claim`, created with
O_CREAT|O_EXCL, naming the owner's host, pid and start time), writes what it computed as a shard (temporary file +
rename, see `FRRFeatureCache.write_shard`) and only then releases the claims, so processes filling one cache at the
same time never compute a key twice. A claim whose owner is a dead process of this host is taken over; the temporary
files of killed writers of this host are deleted (`remove_dead_temporaries`).

Copied flat into saved processor folders (remote code): imports only torch and the standard library at module level
(fcntl in `try:`).
"""

import hashlib
import json
import os
import socket
import time
from typing import TYPE_CHECKING

import torch
from transformers.utils import logging


if TYPE_CHECKING:
    from .image_feature_cache import FRRFeatureCache


try:
    import fcntl
except ImportError:  # not on Windows: stale-claim takeover is then not serialised between processes
    fcntl = None


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Writer processes: who they are and whether they are alive
# ----------------------------------------------------------------------------------------------------------------------


def _host_tag() -> str:
    """The first 8 hex digits of the sha1 of this host's name."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _writer_tag() -> str:
    """`<host tag>-<pid>`: names this process's shards and temporary files (see `remove_dead_temporaries`)."""
    return f"{_host_tag()}-{os.getpid()}"


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


def remove_dead_temporaries(folder: str) -> int:
    """Deletes the temporary files (`.tmp-<writer tag>-<id>`) that writers of this host left in `folder` when they
    were killed; returns how many."""
    if not os.path.isdir(folder):
        return 0
    host = _host_tag()
    removed = 0
    for name in os.listdir(folder):
        parts = name.split("-")
        if name.startswith(".tmp-") and len(parts) == 4 and parts[1] == host and parts[2].isdigit():
            if int(parts[2]) != os.getpid() and not _process_alive(int(parts[2]), None):
                os.unlink(os.path.join(folder, name))
                removed += 1
    return removed


# ----------------------------------------------------------------------------------------------------------------------
# Claims: one file per key, created atomically, naming its owner
# ----------------------------------------------------------------------------------------------------------------------


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

