"""Continuous batching for one replica: the model runs in its own thread, one batch at a time, and each batch
takes every text that queued while the previous one ran (up to a token budget and a count).

So batches stay as full as when the model ran on the replica's event loop, while the loop keeps reading,
tokenizing and answering requests on the other core instead of waiting for the model, and the model thread
starts its next batch without waiting for the loop (docs/benchmarks.md §5). Ray Serve's `@serve.batch` cannot do
this: it cuts the next batch as soon as the previous one starts, so with the model off the loop its batches
shrink to whatever arrived in the meantime.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np


class _Item:
    """One text waiting for a batch. `cost` = max(its tokens, budget / max items), so a batch whose costs fit
    the token budget holds at most max_tokens tokens and max_items texts."""

    __slots__ = ("ids", "queued_at", "cost", "future")

    def __init__(self, ids: list[int], queued_at: float, min_cost: int, future: asyncio.Future):
        self.ids = ids
        self.queued_at = queued_at
        self.cost = max(len(ids), min_cost)
        self.future = future


class Batcher:
    """`await batcher.embed(ids)` -> one row per text, computed by `run(list of token-id lists) -> [N, H]` in the
    batcher's thread together with whatever other requests queued.

    `on_batch(waits_s)` is called in that thread as each batch starts, with how long each of its texts waited
    (metrics). A failing `run` fails the requests of that batch only. `wait_s` > 0: after an idle spell, wait
    that long for a batch to fill before running it.
    """

    def __init__(self, run: Callable[[list[list[int]]], np.ndarray], *, max_tokens: int, max_items: int,
                 wait_s: float = 0.0, on_batch: Callable[[list[float]], None] | None = None):
        if max_tokens < 1 or max_items < 1:
            raise ValueError(f"max_tokens ({max_tokens}) and max_items ({max_items}) must be >= 1")
        self._run, self._on_batch = run, on_batch
        self.max_tokens, self.wait_s = max_tokens, wait_s
        self._min_cost = max_tokens // max_items
        self._queue: deque[_Item] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="rayembed-batcher", daemon=True)
        self._thread.start()

    async def embed(self, ids: list[list[int]]) -> list[np.ndarray]:
        """The rows for `ids`, in order. Cancelling the caller drops its texts that have not started."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        if not self.alive():
            raise RuntimeError("the batcher's thread has stopped (a bug: see the replica's log)")
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [_Item(x, now, self._min_cost, loop.create_future()) for x in ids]
        with self._ready:
            self._queue.extend(items)
            self._ready.notify()
        return await asyncio.gather(*(item.future for item in items))

    def alive(self) -> bool:
        """Whether the thread is running (the replica's health check: a dead thread would leave requests waiting)."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the thread after its current batch; texts still queued are failed."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()
        with self._ready:
            left, self._queue = list(self._queue), deque()
        _post([(item, RuntimeError("the batcher is closed")) for item in left], _fail)

    def _take(self) -> list[_Item]:
        """The oldest queued texts whose costs fit the budget (at least one), skipping cancelled ones. Holds the lock."""
        batch, cost = [], 0
        while self._queue:
            item = self._queue[0]
            if item.future.cancelled():  # its request went away (a read; the loop owns the future)
                self._queue.popleft()
                continue
            if batch and cost + item.cost > self.max_tokens:
                break
            batch.append(self._queue.popleft())
            cost += item.cost
        return batch

    def _work(self) -> None:
        while True:
            with self._ready:
                idle = not self._queue
                while not self._queue and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
            if idle and self.wait_s > 0:
                time.sleep(self.wait_s)
            with self._ready:
                batch = self._take()
            if not batch:
                continue
            try:
                if self._on_batch is not None:
                    started = time.perf_counter()
                    self._on_batch([started - item.queued_at for item in batch])
                rows = self._run([item.ids for item in batch])
                if len(rows) != len(batch):
                    raise RuntimeError(f"the model returned {len(rows)} rows for {len(batch)} texts")
            except Exception as exc:  # noqa: BLE001 - the batch's callers get it; the thread goes on
                _post([(item, exc) for item in batch], _fail)
                continue
            _post(list(zip(batch, rows)), _deliver)


def _post(pairs: list[tuple[_Item, object]], settle: Callable) -> None:
    """Settle each item's future on its own event loop (one callback per loop); a closed loop is skipped."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for item, value in pairs:
        by_loop.setdefault(item.future.get_loop(), []).append((item, value))
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(settle, group)
        except RuntimeError:  # the loop was closed: nobody is waiting any more
            pass


def _deliver(pairs: list[tuple[_Item, np.ndarray]]) -> None:
    for item, row in pairs:
        if not item.future.done():
            item.future.set_result(row)


def _fail(pairs: list[tuple[_Item, BaseException]]) -> None:
    for item, exc in pairs:
        if not item.future.done():
            item.future.set_exception(exc)
