"""The node-local artifact cache: a published artifact (rayembed.storage) materialized once per node.

Keyed by the artifact's digest. One process downloads while the others on the node wait on a file lock,
then all load the same folder; a download lands in a partial folder and is renamed only once every file
matched its seal, so a truncated download is never loaded. Each process that loaded an artifact holds a
shared lock on it, and eviction (least recently used first, past RAYEMBED_CACHE_LIMIT_GB) skips those.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

from rayembed import storage

_held: dict[str, int] = {}  # digest -> fd of this process's shared "in use" lock


def cache_dir() -> Path:
    return Path(os.environ.get("RAYEMBED_CACHE") or Path.home() / ".cache" / "rayembed" / "artifacts").expanduser()


def limit_bytes() -> int:
    return int(float(os.environ.get("RAYEMBED_CACHE_LIMIT_GB", "50")) * 2**30)


def _lock(path: Path, mode: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, mode)
    return fd


def _hold(root: Path, digest: str) -> None:
    if digest not in _held:
        _held[digest] = _lock(root / f"{digest}.use", fcntl.LOCK_SH)


def release(digest: str) -> None:
    """This process no longer uses the artifact (eviction may take it)."""
    fd = _held.pop(digest, None)
    if fd is not None:
        os.close(fd)


def materialize(folder: str, sha256: str | None = None, root: Path | None = None, log=None) -> Path:
    """A local folder holding the published artifact `folder` (a URI or path), checked against `sha256`
    when given. A local folder is used where it is, once its seal matches."""
    seal = storage.read_seal(folder)
    if seal is None:
        raise storage.StorageError(f"{folder} is not a published artifact (no {storage.SEAL}): its writer did not "
                                   "finish; run the job or `python -m train.export` again")
    if sha256 is not None and seal["sha256"] != sha256:
        raise storage.StorageError(f"{folder} holds artifact {seal['sha256'][:12]}, not the registered "
                                   f"{sha256[:12]}: it was overwritten after registration; register it again")
    if not storage.is_uri(folder):  # used where it is, once every file matches the seal (hashed, not trusted)
        storage.verify(folder, seal)
        return Path(folder)
    root = root or cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    digest = seal["sha256"]
    target = root / digest
    lock = _lock(root / f"{digest}.lock", fcntl.LOCK_EX)  # one download per node; the others wait here
    try:
        if not (target / storage.SEAL).is_file():
            started = time.monotonic()
            partial = root / f".partial-{digest}-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            try:
                storage.download(folder, partial, seal)
                partial.rename(target)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
            if log is not None:
                log(f"cache: {folder} -> {target} ({seal['bytes'] / 2**20:.1f} MiB in {time.monotonic() - started:.1f} s)")
        os.utime(target)  # most recently used
        _hold(root, digest)
    finally:
        os.close(lock)
    evict(root, limit_bytes())
    return target


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def evict(root: Path, limit: int) -> list[str]:
    """Remove least recently used artifacts no process holds until the cache fits `limit`; returns their digests."""
    entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    sizes = {p.name: _size(p) for p in entries}
    total, removed = sum(sizes.values()), []
    for entry in entries:
        if total <= limit:
            break
        # the digest's lock first (the one `materialize` holds from its seal check to its hold), then its use lock:
        # an entry is never removed between a reader's check and its hold
        fds = []
        try:
            for suffix in (".lock", ".use"):
                fd = os.open(root / f"{entry.name}{suffix}", os.O_RDWR | os.O_CREAT, 0o644)
                fds.append(fd)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # being materialized, or a replica has it loaded
            for fd in fds:
                os.close(fd)
            continue
        try:
            shutil.rmtree(entry)
            total -= sizes[entry.name]
            removed.append(entry.name)
        finally:
            for fd in fds:
                os.close(fd)
    return removed
