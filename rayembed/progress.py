"""The progress line a training job prints and the control plane reads back from the Ray job's log."""

from __future__ import annotations

import json

MARKER = "rayembed-progress "


def progress_line(step: int, total_steps: int, loss: float, examples_per_s: float, global_batch: int) -> str:
    seconds_per_step = global_batch / examples_per_s if examples_per_s else None
    eta = (total_steps - step) * seconds_per_step if seconds_per_step else None
    return MARKER + json.dumps({"step": step, "total_steps": total_steps, "loss": round(float(loss), 5),
                                "examples_per_s": round(float(examples_per_s), 2),
                                "eta_seconds": round(eta, 1) if eta is not None else None})


def last_progress(log: str) -> dict | None:
    """The newest progress record in a log (worker lines carry Ray's prefix; the marker is found anywhere)."""
    at = log.rfind(MARKER)
    while at >= 0:
        line = log[at + len(MARKER):].split("\n", 1)[0]
        try:
            return json.loads(line)
        except json.JSONDecodeError:  # a line cut mid-write: try the one before
            at = log.rfind(MARKER, 0, at)
    return None
