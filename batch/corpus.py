"""Corpus embedding on Ray Data: JSONL or Parquet in, Parquet (id, vector) out, resumable.

read_json / read_parquet -> map_batches over an actor pool, each actor holding the artifact's ONNX
Runtime session (one GPU each where the cluster has GPUs) -> write_parquet. The same tokenizer,
prefixes and truncation as serving. A rerun into the same folder skips the ids already written.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayembed.artifact import read_manifest

log = logging.getLogger(__name__)
SPEC = "embeddings.json"  # written first: what the folder holds; a rerun must match it


class CorpusError(ValueError):
    """An input or output the command cannot use; says what to change."""


@dataclass(frozen=True)
class Pool:
    """How the embedding actors are placed."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int
    device: str


def plan_pool(cluster: dict, actors: int | None = None, threads: int | None = None) -> Pool:
    """One actor per GPU when the cluster has GPUs; else CPU actors that leave a core for reading."""
    gpus, cpus = int(cluster.get("GPU", 0)), int(cluster.get("CPU", 1))
    if gpus:
        return Pool(actors or gpus, 1, 1, threads or 1, "cuda")
    per = max(1, min(8, cpus - 1))
    n = actors or max(1, (cpus - 1) // per)
    # the reading task's core idles once the input is read, so a small pool's session may use it
    return Pool(n, per, 0, threads or max(1, cpus // n), "cpu")


def vectors_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """[N, H] float32 -> a fixed-size list column (plain Arrow: any Parquet reader gets the vectors)."""
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])


def read_vectors(folder: str | Path) -> tuple[list, np.ndarray]:
    """(ids, [N, H] float32) of every finished part file in an output folder."""
    ids, parts = [], []
    for f in part_files(folder):
        table = pq.read_table(f, columns=["id", "vector"])
        ids.extend(table["id"].to_pylist())
        col = table["vector"].combine_chunks()
        parts.append(col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size))
    if not parts:
        return [], np.zeros((0, 0), np.float32)
    return ids, np.concatenate(parts).astype(np.float32, copy=False)


def part_files(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("*.parquet"))


def done_ids(folder: Path) -> set:
    """Ids in finished part files; a part cut short by a crash is removed so its rows are redone."""
    done: set = set()
    for f in part_files(folder):
        try:
            done.update(pq.read_table(f, columns=["id"])["id"].to_pylist())
        except (pa.ArrowInvalid, OSError) as exc:
            log.warning("removing %s, an unfinished part (%s); its rows are embedded again", f, exc)
            f.unlink()
    return done


class _EmbedActor:
    """Holds one ONNX Runtime session; a batch of rows -> (id, vector)."""

    def __init__(self, model_dir: str, input_type: str, text_field: str, id_field: str, title_field: str | None,
                 threads: int, device: str, done: set):
        import ray

        from rayembed.engine import TextEmbedder

        self.embed = TextEmbedder(model_dir, device=device, threads=threads, has_gpu=bool(ray.get_gpu_ids()))
        self.input_type, self.text_field, self.id_field, self.title_field = input_type, text_field, id_field, title_field
        self.done = done  # ids already written by an earlier run

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.done:
            batch = batch.filter(pa.array([i not in self.done for i in batch[self.id_field].to_pylist()], pa.bool_()))
        texts = batch[self.text_field].to_pylist()
        if self.title_field and self.title_field in batch.column_names:
            texts = [f"{t.strip()} {x}".strip() if t else x for t, x in zip(batch[self.title_field].to_pylist(), texts)]
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise CorpusError(f"field {self.text_field!r} of id {batch[self.id_field][bad[0]].as_py()!r} is "
                              f"{texts[bad[0]]!r}, not a string")
        return pa.table({"id": batch[self.id_field], "vector": vectors_column(self.embed(texts, self.input_type))})


def count_rows(paths: list[str]) -> int | None:
    """Rows in local JSONL / Parquet inputs (for progress and block sizing); None for remote URIs."""
    total = 0
    for p in paths:
        if "://" in p:
            return None
        files = sorted(Path(p).glob("*.parquet")) if Path(p).is_dir() else [Path(p)]
        for f in files:
            if f.suffix == ".parquet":
                total += pq.ParquetFile(f).metadata.num_rows
            else:
                with open(f, "rb") as fh:
                    total += sum(1 for line in fh if line.strip())
    return total


def read_input(paths: list[str], text_field: str, id_field: str, blocks: int | None):
    """A Ray Dataset over JSONL or Parquet files, checked for the id and text fields.

    Local paths are read on this node (another node of the cluster may not have the file); URIs
    (s3://, gs://, ...) are read wherever Ray Data places the tasks.
    """
    import ray
    import ray.data

    kinds = {"parquet" if p.endswith(".parquet") or Path(p).is_dir() else "json" for p in paths}
    if len(kinds) > 1:
        raise CorpusError(f"mixed inputs {paths}: give all JSONL or all Parquet")
    missing = [p for p in paths if "://" not in p and not Path(p).exists()]
    if missing:
        raise CorpusError(f"input not found: {', '.join(missing)}")
    # Ray's built-in node label pins the read tasks to this node
    here = None if any("://" in p for p in paths) else {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    paths = [str(Path(p).absolute()) if "://" not in p else p for p in paths]
    if kinds == {"parquet"}:
        ds = ray.data.read_parquet(paths, override_num_blocks=blocks, label_selector=here)
    else:
        ds = ray.data.read_json(paths, lines=True, override_num_blocks=blocks, label_selector=here)
    names = ds.schema().names
    absent = [f for f in (text_field, id_field) if f not in names]
    if absent:
        raise CorpusError(f"{paths}: no field {absent} (fields: {names}); name the text and id fields "
                          "with --text-field / --id-field")
    return ds


class _Parts:
    """Output parts written by the driver: each one complete (temp file, then rename), numbered on."""

    def __init__(self, folder: Path, rows_per_file: int):
        self.folder, self.rows_per_file = folder, rows_per_file
        self.next = max((int(f.stem.split("-")[1]) + 1 for f in part_files(folder) if f.stem.startswith("part-")), default=0)
        self.pending: list[pa.Table] = []
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += len(table)
        while sum(len(t) for t in self.pending) >= self.rows_per_file:
            whole = pa.concat_tables(self.pending)
            self._write(whole.slice(0, self.rows_per_file))
            self.pending = [whole.slice(self.rows_per_file)]

    def flush(self) -> None:
        rest = [t for t in self.pending if len(t)]
        if rest:
            self._write(pa.concat_tables(rest))
        self.pending = []

    def _write(self, table: pa.Table) -> None:
        tmp = self.folder / f".part-{self.next:05d}.parquet.tmp"
        pq.write_table(table, tmp)
        tmp.replace(self.folder / f"part-{self.next:05d}.parquet")
        self.next += 1


def embed_corpus(model_dir: str, inputs: list[str], output: str, *, input_type: str = "passage",
                 text_field: str = "text", id_field: str = "id", title_field: str | None = "title",
                 actors: int | None = None, threads: int | None = None, batch_size: int = 256,
                 rows_per_file: int = 50_000, progress_every_s: float = 10.0) -> dict:
    """Embed every row of `inputs` into Parquet parts under `output`; returns the spec with counts."""
    import ray
    import ray.data

    from rayembed.runtime import ensure_ray

    manifest = read_manifest(model_dir)  # fails early, naming the folder, when it is not an artifact
    out = Path(output)
    spec = {"model_dir": str(Path(model_dir).absolute()), "base_model": manifest.base_model,
            "embedding_dim": manifest.embedding_dim, "input_type": input_type, "text_field": text_field,
            "id_field": id_field, "title_field": title_field, "inputs": [str(p) for p in inputs]}
    if (out / SPEC).is_file():
        old = json.loads((out / SPEC).read_text())
        changed = {k: (old.get(k), v) for k, v in spec.items() if old.get(k) != v}
        if changed:
            raise CorpusError(f"{out} holds embeddings made differently ({changed}); choose a new output folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC).write_text(json.dumps(spec, indent=1))
    done = done_ids(out)
    total = count_rows([str(p) for p in inputs])
    if total is not None and done and total == len(done):
        log.info("%s already holds all %d rows", out, total)
        return {**json.loads((out / SPEC).read_text()), **spec, "rows": total, "embedded_now": 0, "resumed_from": total}
    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one progress line of ours instead
    # small blocks: a task's output reaches the writer batch by batch, not once per 128 MiB
    ctx.target_max_block_size = 4 * 1024 * 1024
    pool = plan_pool(ray.cluster_resources(), actors, threads)
    blocks = max(pool.actors * 2, -(-total // 2048)) if total else None  # ~2k rows a block: steady progress
    ds = read_input([str(p) for p in inputs], text_field, id_field, blocks)
    if done:
        log.info("resuming: %d rows already embedded in %s", len(done), out)
    ds = ds.map_batches(_EmbedActor, batch_size=batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=pool.actors),
                        num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor,
                        fn_constructor_args=(str(Path(model_dir).absolute()), input_type, text_field, id_field,
                                             title_field, pool.threads, pool.device, done))
    todo = total - len(done) if total is not None else None
    log.info("embedding %s rows with %d %s actor(s) x %d thread(s) -> %s", todo if todo is not None else "all",
             pool.actors, pool.device, pool.threads, out)
    parts, started, shown = _Parts(out, rows_per_file), time.time(), time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        parts.add(batch)
        if time.time() - shown >= progress_every_s:
            shown, rate = time.time(), parts.rows / (time.time() - started)
            eta = f", ETA {(todo - parts.rows) / rate:.0f} s" if todo and rate else ""
            log.info("embedded %d/%s rows, %.0f rows/s%s", parts.rows, todo if todo is not None else "?", rate, eta)
    parts.flush()
    seconds = time.time() - started
    ids = [i for f in part_files(out) for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    if len(set(ids)) != len(ids):
        log.warning("%s: %d duplicate ids in the input", out, len(ids) - len(set(ids)))
    result = {**spec, "rows": len(ids), "embedded_now": parts.rows, "resumed_from": len(done), "seconds": round(seconds, 1),
              "rows_per_s": round(parts.rows / seconds, 1) if seconds > 0 else None, "pool": pool.__dict__}
    (out / SPEC).write_text(json.dumps(result, indent=1))
    return result
