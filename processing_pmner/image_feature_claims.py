"""Claims of the writers filling one FRR feature cache at the same time: one file per key, taken over from dead
processes.

A writer claims each key before computing it (`<cache folder>/claims/<sha1 of key>.claim`, created with
O_CREAT|O_EXCL, naming the owner's host, pid and start time) and releases the claim once the key's shard is written,
so processes filling one cache at the same time never compute a key twice (`FRRFeatureCache.fill`). A claim whose
owner is a dead process of this host is taken over; the temporary files of killed writers of this host are deleted
(`remove_dead_temporaries`).

Copied flat into saved processor folders (remote code): imports only transformers and the standard library at module
level (fcntl in `try:`).
"""

import hashlib
import json
import os
import socket
import time

from transformers.utils import logging


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


def writer_tag() -> str:
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


class FeatureClaims:
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


__all__ = ["FeatureClaims", "remove_dead_temporaries", "writer_tag"]
