"""The storage root every node shares: a local folder or any URI pyarrow.fs opens (s3://, gs://, hdfs://).

Writers work in node-local scratch and `publish` a finished folder: its files first, then a seal
(`.rayembed-artifact.json`: every file's size and SHA-256, and the folder's digest) last, so a reader
never takes a folder without its seal for a whole one. S3 credentials and endpoint come the standard way
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... or the URI's query as pyarrow reads it).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SEAL = ".rayembed-artifact.json"
CHUNK = 8 * 2**20
PARALLEL_FILES = 4


class StorageError(OSError):
    """A storage URI that cannot be opened or read, or a folder that is not a published artifact."""


def is_uri(value: str | os.PathLike) -> bool:
    return "://" in str(value)


def join(base: str, *parts: str) -> str:
    """`base` and relative parts, for a URI (keeping its query) or a local path."""
    if not is_uri(base):
        return str(Path(base, *parts))
    head, _, query = base.partition("?")
    joined = posixpath.join(head.rstrip("/"), *[p.strip("/") for p in parts])
    return joined + (f"?{query}" if query else "")


def parent(value: str) -> str:
    if not is_uri(value):
        return str(Path(value).parent)
    head, _, query = value.partition("?")
    scheme, _, rest = head.partition("://")
    return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}" + (f"?{query}" if query else "")


def filesystem(value: str):
    """(pyarrow FileSystem, path within it) for a URI or a local path."""
    from pyarrow import fs

    if not is_uri(value):
        return fs.LocalFileSystem(), str(Path(value).expanduser().absolute())
    try:
        return fs.FileSystem.from_uri(value)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ValueError
        raise StorageError(f"cannot open storage {value!r}: {exc}") from None


def _info(value: str):
    f, path = filesystem(value)
    return f, path, f.get_file_info(path)


def is_file(value: str) -> bool:
    from pyarrow import fs

    return _info(value)[2].type == fs.FileType.File


def is_dir(value: str) -> bool:
    from pyarrow import fs

    return _info(value)[2].type == fs.FileType.Directory


def exists(value: str) -> bool:
    from pyarrow import fs

    return _info(value)[2].type != fs.FileType.NotFound


def read_bytes(value: str) -> bytes:
    f, path = filesystem(value)
    try:
        with f.open_input_stream(path) as stream:
            return stream.read()
    except (OSError, FileNotFoundError) as exc:
        raise StorageError(f"cannot read {value}: {exc}") from None


def read_text(value: str) -> str:
    return read_bytes(value).decode()


def read_head(value: str, n: int) -> bytes:
    """The first `n` bytes (a safetensors header) without reading the rest."""
    f, path = filesystem(value)
    with f.open_input_file(path) as fh:
        return fh.read(n)


def write_bytes(value: str, data: bytes) -> None:
    """One object in one put (atomic on object stores); a local file through a rename."""
    if not is_uri(value):
        path = Path(value)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return
    f, path = filesystem(value)
    f.create_dir(posixpath.dirname(path), recursive=True)
    with f.open_output_stream(path) as out:
        out.write(data)


def write_text(value: str, text: str) -> None:
    write_bytes(value, text.encode())


def delete_tree(value: str) -> None:
    f, path = filesystem(value)
    info = f.get_file_info(path)
    from pyarrow import fs

    if info.type == fs.FileType.Directory:
        f.delete_dir(path)
    elif info.type == fs.FileType.File:
        f.delete_file(path)


def list_files(value: str) -> dict[str, int]:
    """Every file under a folder, relative path -> size (the seal and temporaries left out)."""
    from pyarrow import fs

    f, path = filesystem(value)
    out = {}
    for info in f.get_file_info(fs.FileSelector(path, recursive=True, allow_not_found=True)):
        if info.type == fs.FileType.File:
            rel = posixpath.relpath(info.path, path)
            if rel != SEAL and not posixpath.basename(rel).startswith(".partial-"):
                out[rel] = info.size
    return out


def digest_of(files: dict[str, dict]) -> str:
    """The folder's identity: the SHA-256 of its sorted (path, size, sha256) list."""
    canonical = json.dumps(sorted((p, m["size"], m["sha256"]) for p, m in files.items()), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _copy_hashing(src_fs, src: str, dst_fs, dst: str | None) -> tuple[int, str]:
    """Stream one file (to `dst`, or nowhere), hashing each chunk in a helper thread while the next one moves."""
    h, size = hashlib.sha256(), 0
    with ThreadPoolExecutor(1) as hasher, src_fs.open_input_stream(src) as inp:
        out = dst_fs.open_output_stream(dst) if dst is not None else None
        pending = None
        try:
            while chunk := inp.read(CHUNK):
                if pending is not None:
                    pending.result()
                pending = hasher.submit(h.update, chunk)  # hashlib lets go of the GIL for large buffers
                size += len(chunk)
                if out is not None:
                    out.write(chunk)
            if pending is not None:
                pending.result()
        finally:
            if out is not None:
                out.close()
    return size, h.hexdigest()


def _each_file(fn, rels) -> list:
    """`fn(rel)` for every file, a few at once (object stores and disks serve parallel streams faster)."""
    with ThreadPoolExecutor(PARALLEL_FILES) as pool:
        return list(pool.map(fn, rels))


def publish(src: str, dest: str, log=None) -> dict:
    """Copy the folder `src` to `dest` (the same folder: seal it in place), hashing every file on the way,
    then write the seal last. Returns the seal: {"sha256", "files", "bytes", "published_at"}."""
    src_fs, src_path = filesystem(src)
    dst_fs, dst_path = filesystem(dest)
    in_place = not is_uri(src) and not is_uri(dest) and Path(src_path).resolve() == Path(dst_path).resolve()
    started = time.monotonic()

    def one(rel: str) -> tuple[str, dict]:
        target = None if in_place else posixpath.join(dst_path, rel)
        if target is not None:
            dst_fs.create_dir(posixpath.dirname(target), recursive=True)
        size, sha = _copy_hashing(src_fs, posixpath.join(src_path, rel), dst_fs, target)
        return rel, {"size": size, "sha256": sha}

    files = dict(_each_file(one, sorted(list_files(src))))
    if not files:
        raise StorageError(f"{src} holds no files to publish")
    seal = {"sha256": digest_of(files), "files": files, "bytes": sum(m["size"] for m in files.values()),
            "published_at": time.time()}
    write_text(join(dest, SEAL), json.dumps(seal, indent=1))
    if log is not None:
        took = time.monotonic() - started
        log(f"storage: published {dest} ({seal['bytes'] / 2**20:.1f} MiB in {took:.1f} s, sha256 {seal['sha256'][:12]})")
    return seal


def read_seal(folder: str) -> dict | None:
    """The folder's seal, or None when it was never (or not yet completely) published."""
    try:
        return json.loads(read_text(join(folder, SEAL)))
    except (StorageError, FileNotFoundError, ValueError):
        return None


def verify(folder: str, seal: dict) -> None:
    """Every file the seal lists, hashed where it is: StorageError names the first that differs. A graph file the
    seal does not list is never loaded (rayembed.engine picks graphs from the seal's files)."""
    src_fs, src_path = filesystem(folder)

    def one(rel: str) -> None:
        meta = seal["files"][rel]
        try:
            size, sha = _copy_hashing(src_fs, posixpath.join(src_path, rel), src_fs, None)
        except FileNotFoundError:
            raise StorageError(f"{join(folder, rel)} is missing: the artifact was changed after it was published; "
                               "publish it again") from None
        if (size, sha) != (meta["size"], meta["sha256"]):
            raise StorageError(f"{join(folder, rel)} does not match its seal ({size} bytes, sha256 {sha[:12]}; the seal "
                               f"says {meta['size']} bytes, {meta['sha256'][:12]}): the artifact was changed after it "
                               "was published; publish it again")

    _each_file(one, list(seal["files"]))
    stray = sorted(f for f in list_files(folder) if f not in seal["files"] and f != SEAL and f.endswith((".onnx", ".data")))
    if stray:
        raise StorageError(f"{folder} holds {', '.join(stray)}, which its seal does not list: a graph left from "
                           "another artifact; publish the folder again")


def download(folder: str, local: Path, seal: dict) -> None:
    """Every file the seal lists, into `local`, each one's size and SHA-256 checked: a mismatch raises."""
    src_fs, src_path = filesystem(folder)
    dst_fs, _ = filesystem(str(local))

    def one(rel: str) -> None:
        meta = seal["files"][rel]
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        size, sha = _copy_hashing(src_fs, posixpath.join(src_path, rel), dst_fs, str(target))
        if (size, sha) != (meta["size"], meta["sha256"]):
            raise StorageError(f"{join(folder, rel)} does not match its seal ({size} bytes, sha256 {sha[:12]}; the seal "
                               f"says {meta['size']} bytes, {meta['sha256'][:12]}): the artifact was changed after it "
                               "was published; publish it again")

    _each_file(one, list(seal["files"]))
    (local / SEAL).write_text(json.dumps(seal))


def copy_file(src: str, dest: str) -> None:
    """One file between any two places, URIs or paths: a local destination appears through a rename, an object
    in one upload, so neither is ever seen half written."""
    src_fs, src_path = filesystem(src)
    dst_fs, dst_path = filesystem(dest)
    target = f"{dst_path}.partial-{os.getpid()}" if not is_uri(dest) else dst_path
    dst_fs.create_dir(posixpath.dirname(dst_path), recursive=True)
    with src_fs.open_input_stream(src_path) as inp, dst_fs.open_output_stream(target) as out:
        while chunk := inp.read(CHUNK):
            out.write(chunk)
    if target != dst_path:
        os.replace(target, dst_path)
