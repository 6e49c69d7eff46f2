"""A job's inputs from the storage root into node-local scratch, and its outputs back: a job's driver and its
Train worker may run on nodes that share no disk, so each stages what it reads (model folder, dataset files,
evaluation folder given as URIs) and the driver works in scratch and publishes the finished folders."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from rayembed import regression, storage
from train.config import JobConfig


def scratch_root() -> Path:
    return Path(os.environ.get("RAYEMBED_SCRATCH") or Path(tempfile.gettempdir()) / "rayembed-scratch")


def _local(uri: str) -> Path:
    return scratch_root() / "inputs" / hashlib.sha1(uri.encode()).hexdigest()[:16] / Path(uri.partition("?")[0]).name


def stage(value: str | None, folder: bool = False) -> str | None:
    """A URI copied into this node's scratch (a folder: all its files); a local path as it is."""
    if value is None or not storage.is_uri(value):
        return value
    target = _local(value)
    if folder:
        files = storage.list_files(value)
        if not files:
            raise FileNotFoundError(f"{value}: no such folder in storage")
        for rel, size in files.items():  # storage URIs are written once: a copy of the same size is that copy
            if not (target / rel).is_file() or (target / rel).stat().st_size != size:
                storage.copy_file(storage.join(value, rel), str(target / rel))
    else:
        if not storage.is_file(value):
            raise FileNotFoundError(f"{value}: no such file in storage")
        storage.copy_file(value, str(target))
    return str(target)


def stage_inputs(cfg: JobConfig) -> JobConfig:
    """The config with every input URI replaced by its copy in this node's scratch (and a shipped regression set's
    name by this node's packaged folder)."""
    ds = cfg.dataset
    ds = ds.model_copy(update={"training": stage(ds.training), "validation": stage(ds.validation),
                               "evaluation": stage(ds.evaluation, folder=True),
                               "regression": stage(regression.resolve(ds.regression), folder=True)})
    if ds.mining is not None and ds.mining.corpus is not None:
        ds = ds.model_copy(update={"mining": ds.mining.model_copy(update={"corpus": stage(ds.mining.corpus)})})
    model = stage(cfg.model, folder=True) if storage.is_uri(cfg.model) else cfg.model
    return cfg.model_copy(update={"dataset": ds, "model": model})


def job_scratch(output_dir: str) -> Path:
    """Where a job whose output.dir is a URI writes before it publishes (the same folder on a rerun)."""
    return scratch_root() / "jobs" / hashlib.sha1(output_dir.encode()).hexdigest()[:16]
