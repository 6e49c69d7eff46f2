"""A training job's progress: the line a person reads in the job's log, and the same record written to storage
(RAYEMBED_PROGRESS_URI, set by the control plane), which the control plane reads instead of the log."""

from __future__ import annotations

import json
import logging
import os
import time

MARKER = "rayembed-progress "
PROGRESS_ENV = "RAYEMBED_PROGRESS_URI"  # where a job writes its progress record (a storage URI or path)
WRITE_EVERY_S = 2.0
log = logging.getLogger(__name__)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_record(step: int, total_steps: int, loss: float, examples_per_s: float, global_batch: int) -> dict:
    seconds_per_step = global_batch / examples_per_s if examples_per_s else None
    eta = (total_steps - step) * seconds_per_step if seconds_per_step else None
    return {"step": step, "total_steps": total_steps, "loss": round(float(loss), 5),
            "examples_per_s": round(float(examples_per_s), 2), "eta_seconds": round(eta, 1) if eta is not None else None}


def progress_line(step: int, total_steps: int, loss: float, examples_per_s: float, global_batch: int) -> str:
    """One line a person reads (step, loss, speed, ETA) that ends in the JSON record."""
    record = progress_record(step, total_steps, loss, examples_per_s, global_batch)
    human = (f"step {step}/{total_steps} ({100 * step / max(total_steps, 1):.0f}%) | loss {loss:.4f} | "
             f"{examples_per_s:.2f} examples/s | ETA {duration(record['eta_seconds'])}")
    return f"{MARKER}{human} {json.dumps(record)}"


class ProgressWriter:
    """Writes the newest record to RAYEMBED_PROGRESS_URI, at most every WRITE_EVERY_S (and always the last step),
    so a fast loop on shared storage makes a few small writes a minute. A failed write is logged, never raised:
    progress must not stop training."""

    def __init__(self, uri: str | None = None):
        self.uri = uri if uri is not None else os.environ.get(PROGRESS_ENV)
        self._last = -float("inf")

    def __call__(self, record: dict) -> None:
        final = record["step"] >= record["total_steps"]
        if not self.uri or (not final and time.monotonic() - self._last < WRITE_EVERY_S):
            return
        from rayembed import storage

        try:
            storage.write_text(self.uri, json.dumps({**record, "updated_at": time.time()}))
            self._last = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - storage hiccup: the next record tries again
            log.warning("progress record to %s: %s", self.uri, exc)


def read_progress(uri: str) -> dict | None:
    """The record a job wrote last, or None when it wrote none yet (or the storage cannot be read now)."""
    from rayembed import storage

    try:
        return json.loads(storage.read_text(uri)) if storage.is_file(uri) else None
    except (OSError, ValueError, storage.StorageError):
        return None
