"""Dataset uploads, off the serving path: the API ingress streams the body into a staging object in storage
(never more than the size limit, a chunk at a time, within a total deadline), then a Ray task with its own
CPU and memory reservation validates it as a job will (line-numbered errors) and moves it into the dataset's
folder; the API replica that answers /v1/embeddings holds one chunk at a time. How many uploads run at once
is limited per key, per workspace and overall. The control plane records the stored file (cluster.services.datasets).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import tempfile
import uuid
from pathlib import Path

from cluster.entities import DATASET_FILES
from rayembed import storage
from rayembed.errors import InvalidRequest, PayloadTooLarge, QuotaExceeded, shown
from serve.http import body_chunks

CHUNK_TIMEOUT_S = 60.0  # a client that stalls this long between chunks loses its upload
MAX_AT_ONCE = 4  # uploads in flight in one API replica
MAX_PER_KEY = 2  # ... and per API key (or per client, with no keys), and per workspace (a tenant's second key
# does not take the other half of the slots)
VALIDATE_MEMORY_BYTES = 2 * 2**30  # the validating task's reservation, and its address-space cap
_running: dict[tuple[str, str], int] = {}  # ("key", id) and ("workspace", name) -> uploads in flight (this replica)


def max_upload_bytes() -> int:
    return int(float(os.environ.get("RAYEMBED_MAX_UPLOAD_GB", "4")) * 2**30)


def deadline_s() -> float:
    """The whole upload, from its first byte to its last (a client trickling a byte a minute still ends)."""
    return float(os.environ.get("RAYEMBED_UPLOAD_DEADLINE_S", "1800"))


class Slot:
    """One of the replica's upload slots for the key (or client) `who` uploading into `workspace`; QuotaExceeded
    (429) when the replica's, the key's or the workspace's are all taken."""

    def __init__(self, who: str, workspace: str):
        self.counts = (("key", who), ("workspace", workspace))

    def __enter__(self) -> "Slot":
        if sum(n for (kind, _), n in _running.items() if kind == "key") >= MAX_AT_ONCE:
            raise QuotaExceeded(f"{MAX_AT_ONCE} uploads are running on this API replica; retry when one finishes")
        for (kind, name) in self.counts:
            if _running.get((kind, name), 0) >= MAX_PER_KEY:
                held = "this key has" if kind == "key" else f"workspace {name!r} has"
                raise QuotaExceeded(f"{held} {MAX_PER_KEY} uploads running; retry when one finishes")
        for c in self.counts:
            _running[c] = _running.get(c, 0) + 1
        return self

    def __exit__(self, *exc) -> None:
        for c in self.counts:
            _running[c] -= 1
            if not _running[c]:
                del _running[c]


async def receive(request, target: str, limit: int) -> int:
    """The body, streamed into the storage object `target`: at most `limit` bytes, one chunk in memory at a time,
    within CHUNK_TIMEOUT_S between chunks and deadline_s() in all. -> its size."""
    f, path = storage.filesystem(target)
    chunks = body_chunks(request, limit, deadline_s(), CHUNK_TIMEOUT_S, what="upload",
                         advice="split the file, or ask the operator (RAYEMBED_MAX_UPLOAD_GB, RAYEMBED_UPLOAD_DEADLINE_S)")
    first = await anext(chunks, b"")  # a body refused by its declared size is refused before anything is written
    await asyncio.to_thread(f.create_dir, path.rpartition("/")[0], recursive=True)
    size = len(first)
    out = await asyncio.to_thread(f.open_output_stream, path)
    try:
        if first:
            await asyncio.to_thread(out.write, first)
        async for chunk in chunks:
            size += len(chunk)
            await asyncio.to_thread(out.write, chunk)
    finally:
        await asyncio.to_thread(out.close)
    if size == 0:
        raise InvalidRequest("the upload is empty: send the file as the request body", "body")
    return size


def _cap_memory(limit: int) -> None:
    """This process may map at most `limit` bytes more than it holds now (a validation gone wild fails with
    MemoryError here instead of taking the node's memory)."""
    with open("/proc/self/statm") as fh:
        now = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (now + limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def validate_and_store(path: str, staged: str, final: str, others: dict[str, str]) -> dict:
    """In its own Ray task: the staged upload checked as the job will (errors name the upload path and line), then
    copied to `final`; -> the DatasetFile fields. `others`: the dataset's evaluation files by path (a qrels file is
    checked against their ids). The staged object is removed either way."""
    from train.data import DataError, beir_ids, check_beir_records, check_qrels, index_jsonl

    _cap_memory(VALIDATE_MEMORY_BYTES)
    try:
        with tempfile.TemporaryDirectory(prefix="rayembed-upload-") as tmp:
            local = Path(staged) if not storage.is_uri(staged) else Path(tmp) / "upload"
            if storage.is_uri(staged):
                storage.copy_file(staged, str(local))
            try:
                if DATASET_FILES[path] in ("training", "validation"):
                    records = len(index_jsonl(local, 0))
                elif path.endswith("corpus.jsonl") or path.endswith("queries.jsonl"):
                    records = check_beir_records(local, titles=path.endswith("corpus.jsonl"))
                else:
                    if len(others) < 2:
                        raise InvalidRequest("upload evaluation/corpus.jsonl and evaluation/queries.jsonl before "
                                             "evaluation/qrels/test.tsv (each judgment is checked against them)", "path")
                    ids = {}
                    for p, uri in others.items():
                        source = uri if not storage.is_uri(uri) else str(Path(tmp) / p.replace("/", "_"))
                        if storage.is_uri(uri):
                            storage.copy_file(uri, source)
                        ids[p] = beir_ids(source, titles=p.endswith("corpus.jsonl"))
                    records = check_qrels(local, ids["evaluation/queries.jsonl"], ids["evaluation/corpus.jsonl"])
            except DataError as exc:
                raise InvalidRequest(str(exc).replace(str(local), path), "body") from None
            except MemoryError:
                raise PayloadTooLarge(f"{path} needs more than {VALIDATE_MEMORY_BYTES // 2**30} GiB to validate: "
                                      "split it into smaller files") from None
            h = hashlib.sha256()
            with local.open("rb") as fh:
                for chunk in iter(lambda: fh.read(2**20), b""):
                    h.update(chunk)
            storage.copy_file(str(local), final)
            return {"uri": final, "bytes": local.stat().st_size, "sha256": h.hexdigest(), "records": records}
    finally:
        storage.delete_tree(staged)


async def upload(request, dataset: dict, path: str, who: str) -> dict:
    """Receive one file of `dataset` into staging, validate and store it in a Ray task; -> the DatasetFile fields
    to record. `who`: the key (or client) its slot counts against."""
    import ray

    if path not in DATASET_FILES:
        raise InvalidRequest(f"{shown(path)} is not a dataset file: use one of {', '.join(DATASET_FILES)}", "path")
    with Slot(who, dataset["workspace"]):
        upload_id = uuid.uuid4().hex[:12]
        staged = storage.join(dataset["uri"], ".staging", upload_id)
        try:
            await receive(request, staged, max_upload_bytes())
        except BaseException:
            await asyncio.to_thread(storage.delete_tree, staged)
            raise
        final = storage.join(dataset["uri"], path)  # no job reads the dataset meanwhile (begin_upload said so)
        others = {p: f["uri"] for p, f in dataset["files"].items() if p.startswith("evaluation/") and p != path
                  and not p.endswith("test.tsv")}
        # max_calls=1: the worker exits after the task, taking its address-space cap (_cap_memory) with it
        task = ray.remote(num_cpus=0.5, memory=VALIDATE_MEMORY_BYTES, max_retries=0, max_calls=1)(validate_and_store)
        try:
            return await task.remote(path, staged, final, others)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, (InvalidRequest, PayloadTooLarge)):
                raise exc.cause from None
            raise
