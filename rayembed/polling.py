"""The one poll-and-retry loop every waiter uses: the client's waits (a job, a model, a deployment, a route), a
request retried through a transient refusal, an HTTP readiness wait, a Ray head still starting."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def poll(check: Callable[[], T | None], *, timeout_s: float, what: str | Callable[[], str], interval_s: float = 1.0,
         transient: tuple[type[BaseException], ...] = ()) -> T:
    """Call `check()` every `interval_s` until it returns something other than None, and return that. An exception in
    `transient` (a refusal worth retrying) is waited out like a None; at the deadline it is raised again. Past
    `timeout_s` without an answer: TimeoutError naming `what` (a string, or a function that describes the state)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
        except transient:
            if time.monotonic() >= deadline:
                raise
            result = None
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what() if callable(what) else what} after {timeout_s:.0f} s")
        time.sleep(interval_s)
