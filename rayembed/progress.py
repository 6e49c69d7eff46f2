"""The progress line a training job prints and the control plane reads back from the Ray job's log."""

from __future__ import annotations

import json

MARKER = "rayembed-progress "


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_line(step: int, total_steps: int, loss: float, examples_per_s: float, global_batch: int) -> str:
    """One line a person reads (step, loss, speed, ETA) that ends in the JSON record the control plane reads."""
    seconds_per_step = global_batch / examples_per_s if examples_per_s else None
    eta = (total_steps - step) * seconds_per_step if seconds_per_step else None
    record = {"step": step, "total_steps": total_steps, "loss": round(float(loss), 5),
              "examples_per_s": round(float(examples_per_s), 2), "eta_seconds": round(eta, 1) if eta is not None else None}
    human = (f"step {step}/{total_steps} ({100 * step / max(total_steps, 1):.0f}%) | loss {loss:.4f} | "
             f"{examples_per_s:.2f} examples/s | ETA {duration(eta)}")
    return f"{MARKER}{human} {json.dumps(record)}"


def last_progress(log: str) -> dict | None:
    """The newest progress record in a log (worker lines carry Ray's prefix; the marker is found anywhere)."""
    at = log.rfind(MARKER)
    while at >= 0:
        line = log[at + len(MARKER):].split("\n", 1)[0]
        try:
            return json.loads(line[line.index("{"):])
        except ValueError:  # a line cut mid-write (no JSON yet, or half of it): try the one before
            at = log.rfind(MARKER, 0, at)
    return None
