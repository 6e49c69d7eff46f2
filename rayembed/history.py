"""A training job's metrics history: the loop's records (step, loss, learning rate, examples/s) and each validation
(step, metrics), kept in storage beside the progress record (`metrics.json`), bounded by downsampling long runs.
The job writes it (train/loop.py); the control plane reads it for the job's metrics route (cluster/metrics.py)."""

from __future__ import annotations

import json
import logging
import math
import os
import time

from rayembed.progress import PROGRESS_ENV, WRITE_EVERY_S

MAX_TRAIN_POINTS = 1000  # a 100k-step run keeps every ~128th record: a loss curve still shows its shape
MAX_VALIDATIONS = 200
FILE = "metrics.json"
log = logging.getLogger(__name__)


def downsample(points: list[dict], limit: int) -> list[dict]:
    """At most `limit` points, evenly spaced over the run, the first and the last always kept."""
    if len(points) <= limit:
        return points
    if limit < 2:
        return points[-1:] if limit == 1 else []
    stride = (len(points) - 1) / (limit - 1)
    return [points[round(i * stride)] for i in range(limit)]


def uri_beside(progress_uri: str | None) -> str | None:
    """`metrics.json` in the progress record's folder."""
    if not progress_uri:
        return None
    from rayembed import storage

    return storage.join(storage.parent(progress_uri), FILE)


def _finite(x) -> float | None:
    return round(float(x), 8) if x is not None and math.isfinite(float(x)) else None


class MetricsHistory:
    """Appends records in memory and rewrites the file at most every WRITE_EVERY_S (and always at a validation and
    the last step). A resumed run starts from the history its first attempt wrote, up to the step it resumes from.
    Only the job's own run writes (`owner`): a sweep's trials share one progress folder and keep their table instead.
    A failed write is logged, never raised: metrics must not stop training."""

    def __init__(self, uri: str | None, owner: bool = True, resumed_from: int | None = None):
        self.uri = uri if owner else None
        self.train: list[dict] = []
        self.validation: list[dict] = []
        self.stride = 1  # records per kept point: doubles each time the history fills up
        self._seen = 0
        self._last = -math.inf
        if self.uri and resumed_from:
            self._load(resumed_from)

    @classmethod
    def for_run(cls, output_dir: str, resumed_from: int | None = None) -> "MetricsHistory":
        from rayembed import storage

        progress = os.environ.get(PROGRESS_ENV)
        owner = bool(progress) and storage.parent(progress) == storage.parent(output_dir)
        return cls(uri_beside(progress), owner, resumed_from)

    def _load(self, upto: int) -> None:
        from rayembed import storage

        try:
            old = json.loads(storage.read_text(self.uri)) if storage.is_file(self.uri) else {}
        except Exception as exc:  # noqa: BLE001 - an unreadable history starts again
            log.warning("metrics history %s: %s", self.uri, exc)
            return
        self.train = [p for p in old.get("train", []) if p.get("step", 0) <= upto]
        self.validation = [v for v in old.get("validation", []) if v.get("step", 0) <= upto]
        self.stride = int(old.get("stride", 1))
        self._seen = len(self.train) * self.stride

    def record(self, step: int, total_steps: int, loss: float, lr: float, examples_per_s: float) -> None:
        final = step >= total_steps
        self._seen += 1
        if (self._seen - 1) % self.stride == 0 or final:  # every stride-th record: the kept points stay evenly spaced
            self.train.append({"step": int(step), "loss": _finite(loss), "lr": _finite(lr),
                               "examples_per_s": _finite(examples_per_s), "at": round(time.time(), 3)})
        if len(self.train) > MAX_TRAIN_POINTS:
            self.train = self.train[::2]
            self.stride *= 2
        self._write(total_steps, force=final)

    def validate(self, step: int, total_steps: int, metrics: dict) -> None:
        kept = {k: _finite(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.validation = downsample(self.validation + [{"step": int(step), "metrics": kept, "at": round(time.time(), 3)}],
                                     MAX_VALIDATIONS)
        self._write(total_steps, force=True)

    def _write(self, total_steps: int, force: bool) -> None:
        if not self.uri or (not force and time.monotonic() - self._last < WRITE_EVERY_S):
            return
        from rayembed import storage

        body = {"total_steps": total_steps, "stride": self.stride, "train": self.train, "validation": self.validation,
                "updated_at": time.time()}
        try:
            storage.write_text(self.uri, json.dumps(body))
            self._last = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - storage hiccup: the next record tries again
            log.warning("metrics history to %s: %s", self.uri, exc)
