"""A customization job's metrics history, as `GET .../customization/jobs/{id}/metrics` answers it: the training
loop's records and each validation, read from the job's `metrics.json` (rayembed/history.py), downsampled to a
page's worth and paged like every list. Plain functions over storage; the route and the actor method are thin."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Literal

from pydantic import Field

from cluster import job_files
from cluster.schemas import Answer, Pagination
from rayembed import storage
from rayembed.history import FILE, downsample

DEFAULT_POINTS = 500  # one page: what a loss curve on a 1280-pixel page can show


class TrainPointOut(Answer):
    step: int
    loss: float | None = None
    lr: float | None = Field(None, description="the learning rate at this step")
    examples_per_s: float | None = None
    at: datetime


class ValidationOut(Answer):
    step: int
    metrics: dict[str, float | None] = Field(description="val_loss, ndcg@10, recall@10, mrr@10 ... on the validation split")
    at: datetime


class JobMetricsOut(Answer):
    """One page of the training records (oldest first) and every validation; `stride` records of the run stand behind
    each stored point (long runs are downsampled as they are written, and again to `points` here)."""

    object: Literal["list"] = "list"
    job: str
    status: str
    total_steps: int | None = None
    stride: int = Field(1, description="training records per point in `data`")
    data: list[TrainPointOut]
    validation: list[ValidationOut] = []
    pagination: Pagination


def metrics_uri(output_dir: str) -> str:
    """Beside the job's progress record."""
    return storage.join(storage.parent(job_files.progress_uri(output_dir)), FILE)


def read_history(output_dir: str) -> dict:
    """The history the job wrote, or an empty one (nothing yet, a sweep, or unreadable storage now)."""
    uri = metrics_uri(output_dir)
    try:
        return json.loads(storage.read_text(uri)) if storage.is_file(uri) else {}
    except (OSError, ValueError, storage.StorageError):
        return {}


def job_metrics(job: dict, page: int, page_size: int, points: int = DEFAULT_POINTS) -> dict:
    """The route's answer for `job` (an entity's dict): at most `points` training records in all (evenly spaced,
    first and last kept), `page_size` of them on a page."""
    history = read_history(job["output_dir"])
    train = [p for p in history.get("train", []) if isinstance(p, dict) and "step" in p]
    stride = int(history.get("stride", 1) or 1)
    if len(train) > points:
        stride = stride * math.ceil(len(train) / points)
        train = downsample(train, points)
    total = len(train)
    chunk = train[(page - 1) * page_size: page * page_size]
    return {"object": "list", "job": job["name"], "status": job["status"],
            "total_steps": history.get("total_steps") or job.get("progress", {}).get("total_steps"),
            "stride": stride, "data": chunk, "validation": history.get("validation", []),
            "pagination": {"page": page, "page_size": page_size, "current_page_size": len(chunk),
                           "total_pages": max(1, math.ceil(total / page_size)), "total_results": total}}
