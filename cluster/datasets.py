"""Dataset uploads, handled in the API ingress: the request body streamed to a temporary file (size-limited),
validated as a job validates it (line-numbered errors; nothing stored when it is invalid), then written to the
dataset's folder in the storage root. The control plane records the stored file (cluster.controlplane)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from pathlib import Path

from cluster.entities import DATASET_FILES
from rayembed import storage
from rayembed.errors import InvalidRequest, PayloadTooLarge, RequestTimeout, shown

CHUNK_TIMEOUT_S = 60.0  # a client that stalls this long between chunks loses its upload


def max_upload_bytes() -> int:
    return int(float(os.environ.get("RAYEMBED_MAX_UPLOAD_GB", "4")) * 2**30)


async def receive(request, folder: Path, limit: int) -> Path:
    """The body, streamed into a file under `folder`: never more than `limit` bytes, held in memory a chunk at a time."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"upload of {int(declared)} bytes; the limit is {limit} (RAYEMBED_MAX_UPLOAD_GB)")
    target, size = folder / "upload", 0
    with target.open("wb") as out:
        stream = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), CHUNK_TIMEOUT_S)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise RequestTimeout(f"the upload stalled for {CHUNK_TIMEOUT_S:g} s after {size} bytes") from None
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"upload larger than the limit of {limit} bytes (RAYEMBED_MAX_UPLOAD_GB)")
            out.write(chunk)
    if size == 0:
        raise InvalidRequest("the upload is empty: send the file as the request body", "body")
    return target


def validate(path: str, local: Path, dataset: dict) -> int:
    """Check the uploaded file as the job will; the number of records. Errors name the upload path and line."""
    from train.data import DataError, check_beir_records, index_jsonl, load_beir

    try:
        if DATASET_FILES[path] in ("training", "validation"):
            return len(index_jsonl(local, 0))
        if path.endswith("corpus.jsonl") or path.endswith("queries.jsonl"):
            return check_beir_records(local, titles=path.endswith("corpus.jsonl"))
        # qrels: checked against the corpus and queries, which must be there first
        others = {p: f for p, f in dataset["files"].items() if p.startswith("evaluation/") and p != path}
        if len(others) < 2:
            raise InvalidRequest("upload evaluation/corpus.jsonl and evaluation/queries.jsonl before "
                                 "evaluation/qrels/test.tsv (each judgment is checked against them)", "path")
        folder = local.parent / "beir"
        for p, f in others.items():
            storage.copy_file(f["uri"], str(folder / p.removeprefix("evaluation/")))
        (folder / "qrels").mkdir(parents=True, exist_ok=True)
        os.link(local, folder / "qrels" / "test.tsv")
        return sum(len(q) for q in load_beir(folder).qrels.values())
    except DataError as exc:
        raise InvalidRequest(str(exc).replace(str(local.parent / "beir") + "/", "evaluation/").replace(str(local), path),
                             "body") from None


def store(local: Path, uri: str) -> dict:
    """The validated file into storage (one put); its size and SHA-256."""
    h = hashlib.sha256()
    with local.open("rb") as fh:
        for chunk in iter(lambda: fh.read(2**20), b""):
            h.update(chunk)
    storage.copy_file(str(local), uri)
    return {"uri": uri, "bytes": local.stat().st_size, "sha256": h.hexdigest()}


async def upload(request, dataset: dict, path: str) -> dict:
    """Receive, validate and store one file of `dataset`; -> the DatasetFile fields to record."""
    if path not in DATASET_FILES:
        raise InvalidRequest(f"{shown(path)} is not a dataset file: use one of {', '.join(DATASET_FILES)}", "path")
    with tempfile.TemporaryDirectory(prefix="rayembed-upload-") as tmp:
        local = await receive(request, Path(tmp), max_upload_bytes())
        records = await asyncio.to_thread(validate, path, local, dataset)
        stored = await asyncio.to_thread(store, local, storage.join(dataset["uri"], path))
    return {**stored, "records": records}
