"""The job's mining step: export the base model to ONNX, mine hard negatives on Ray Data, cache all.

Runs in the driver before training when `dataset.mining` is set. Each cache key is a hash of what
the result depends on: the base export of the model's files; the vectors of the training and
corpus files' bytes and that export; the mined file of those and the mining settings. A rerun, a
resumed job or a sweep reuses the mined file, and other mining settings reuse the vectors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from train.config import JobConfig

log = logging.getLogger(__name__)
CACHE_FORMAT = 1  # of the vectors and the base export
MINED_FORMAT = 2  # of the mined file: 2 searches past the top k for lines the filter left short


def cache_root(cfg: JobConfig) -> Path:
    if cfg.dataset.mining and cfg.dataset.mining.cache_dir:
        return Path(cfg.dataset.mining.cache_dir)
    return Path(os.environ.get("RAYEMBED_HOME") or Path.home() / ".rayembed").expanduser() / "mining"


def file_digest(path: str | Path, h=None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_digest(model_path: str) -> str:
    """The base model's identity: every file's name, size and content (weights included)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(model_path).rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(model_path)}:{f.stat().st_size}".encode())
        file_digest(f, h)
    return h.hexdigest()[:16]


def base_artifact(cfg: JobConfig, model_path: str, prefixes: tuple[str, str], parity_texts: list[str]) -> Path:
    """The base model exported to ONNX at the job's max_seq_length and prefixes (cached; parity-gated)."""
    from train.export import export_onnx

    key = hashlib.sha256(json.dumps([model_digest(model_path), cfg.training.max_seq_length, list(prefixes),
                                     cfg.output.onnx_opset]).encode()).hexdigest()[:16]
    folder = cache_root(cfg) / f"base-{key}"
    if (folder / "manifest.json").is_file():
        log.info("mining: base model ONNX from the cache (%s)", folder)
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("mining: exporting the base model to ONNX (%s)", folder)
    export_onnx(model_path, tmp, max_seq_length=cfg.training.max_seq_length, prefixes=prefixes, parity_texts=parity_texts,
                opset=cfg.output.onnx_opset, source={"kind": "base_model", "base_model": cfg.model, "for": "mining"})
    tmp.replace(folder)
    return folder


def mine_for_job(cfg: JobConfig, model_path: str, prefixes: tuple[str, str], parity_texts: list[str]) -> tuple[JobConfig, dict]:
    """-> (the config with dataset.training pointing at the mined file, the mining report)."""
    from batch.mine import mine_negatives

    m = cfg.dataset.mining
    artifact = base_artifact(cfg, model_path, prefixes, parity_texts)
    inputs = [CACHE_FORMAT, file_digest(cfg.dataset.training), file_digest(m.corpus) if m.corpus else None, artifact.name]
    # the vectors depend on the inputs only: other mining settings reuse them
    vectors = cache_root(cfg) / f"vectors-{hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]}"
    parts = [*inputs, m.negatives, m.max_score_ratio, m.top_k, MINED_FORMAT]
    folder = cache_root(cfg) / f"mined-{hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]}"
    mined, report_path = folder / "train.jsonl", folder / "train.jsonl.report.json"
    if report_path.is_file() and mined.is_file():
        log.info("mining: mined negatives from the cache (%s)", mined)
        report = json.loads(report_path.read_text())
    else:
        report = mine_negatives(str(artifact), cfg.dataset.training, str(mined), negatives=m.negatives, corpus=m.corpus,
                                max_score_ratio=m.max_score_ratio, top_k_candidates=m.top_k,
                                work_dir=str(vectors))
    report = {**report, "cache": str(folder)}
    dataset = cfg.dataset.model_copy(update={"training": str(mined), "mining": None})  # mined: train on it as given
    return cfg.model_copy(update={"dataset": dataset}), report

