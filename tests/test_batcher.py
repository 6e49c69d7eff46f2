"""The replica's continuous batcher without Ray: what queues during a run goes in the next batch, the budget holds,
the event loop stays free while the model runs, and failures and cancellations stay with their own requests."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serve.batcher import Batcher


class Model:
    """Rows [text length, first id]; records each batch; can be held (a long run) or made to fail."""

    def __init__(self):
        self.batches: list[list[list[int]]] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()
        self.fail_next = False

    def __call__(self, ids: list[list[int]]) -> np.ndarray:
        self.batches.append(ids)
        self.started.set()
        self.release.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the model broke")
        return np.array([[len(x), x[0]] for x in ids], np.float32)  # [N, 2]


@pytest.fixture
def model():
    return Model()


def make(model: Model, **kw) -> Batcher:
    kw = {"max_tokens": 1000, "max_items": 100, **kw}
    return Batcher(model, **kw)


async def _busy(batcher: Batcher, model: Model, ids: list[list[int]] | None = None) -> asyncio.Future:
    """Hold the model inside a first batch (of `ids`); returns that request. `model.release.set()` lets it go."""
    model.release.clear()
    head = asyncio.ensure_future(batcher.embed(ids or [[1]]))
    while not model.started.is_set():
        await asyncio.sleep(0.001)
    return head


def test_what_queues_during_a_run_goes_in_the_next_batch_and_answers_stay_in_order(model):
    batcher = make(model)

    async def main():
        first = await _busy(batcher, model, [[7, 7]])  # the model is busy with the first request
        rest = [asyncio.ensure_future(batcher.embed([[i] * (1 + i % 3), [100 + i]])) for i in range(20)]
        await asyncio.sleep(0.05)
        model.release.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    batcher.close()
    assert [len(b) for b in model.batches] == [1, 40]  # one run for the first, one for all that queued meanwhile
    assert first[0].tolist() == [2, 7]
    for i, rows in enumerate(rest):
        assert [r.tolist() for r in rows] == [[1 + i % 3, i], [1, 100 + i]]


def test_a_batch_holds_at_most_the_token_budget_and_the_item_count(model):
    batcher = make(model, max_tokens=64, max_items=8)  # every text costs at least 64 / 8 = 8 tokens

    async def main():
        head = await _busy(batcher, model)
        texts = [[2] * n for n in (3, 3, 3, 3, 3, 3, 3, 3, 3, 30, 40, 200)]  # short ones, long ones, one over budget
        tail = asyncio.ensure_future(batcher.embed(texts))
        await asyncio.sleep(0.05)
        model.release.set()
        await head
        return await tail

    rows = asyncio.run(main())
    batcher.close()
    assert [r[0] for r in rows] == [3] * 9 + [30, 40, 200]
    sizes = [[len(x) for x in b] for b in model.batches[1:]]
    assert sizes == [[3] * 8, [3, 30], [40], [200]]  # 8 by count; 8 + 30 (+ 40 would pass 64); alone; over budget alone


def test_the_event_loop_stays_free_while_the_model_runs(model):
    batcher = make(model)

    def slow(ids):
        time.sleep(0.3)
        return model(ids)

    batcher._run = slow

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        rows = await batcher.embed([[5]])
        task.cancel()
        return rows, ticks

    rows, ticks = asyncio.run(main())
    batcher.close()
    assert rows[0].tolist() == [1, 5]
    assert ticks >= 10  # the loop ran other work during the 0.3 s run (on the loop it would have ticked ~0 times)


def test_a_failing_run_fails_only_its_own_requests(model):
    batcher = make(model)

    async def main():
        model.fail_next = True
        with pytest.raises(RuntimeError, match="the model broke"):
            await batcher.embed([[1], [2]])
        return await batcher.embed([[3]])

    rows = asyncio.run(main())
    batcher.close()
    assert rows[0].tolist() == [1, 3]


def test_a_cancelled_request_is_dropped_before_it_runs(model):
    batcher = make(model)

    async def main():
        head = await _busy(batcher, model)
        gone = asyncio.ensure_future(batcher.embed([[66], [67]]))
        kept = asyncio.ensure_future(batcher.embed([[8]]))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        model.release.set()
        await head
        return await kept

    rows = asyncio.run(main())
    batcher.close()
    assert rows[0].tolist() == [1, 8]
    assert model.batches[1] == [[8]]  # the cancelled texts never reached the model


def test_wait_s_lets_a_batch_fill_after_an_idle_spell(model):
    batcher = make(model, wait_s=0.2)

    async def main():
        first = asyncio.ensure_future(batcher.embed([[1]]))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(batcher.embed([[2]]))
        return await first, await second

    asyncio.run(main())
    batcher.close()
    assert [len(b) for b in model.batches] == [2]


def test_close_fails_what_is_still_queued(model):
    batcher = make(model)

    async def main():
        head = await _busy(batcher, model)
        queued = asyncio.ensure_future(batcher.embed([[2]]))
        await asyncio.sleep(0.01)
        closing = asyncio.get_running_loop().run_in_executor(None, batcher.close)
        await asyncio.sleep(0.05)
        model.release.set()
        await closing
        await head
        with pytest.raises(RuntimeError, match="closed"):
            await queued
        with pytest.raises(RuntimeError, match="closed"):
            await batcher.embed([[3]])

    asyncio.run(main())
    assert [len(b) for b in model.batches] == [1]


def test_a_model_that_returns_too_few_rows_fails_its_batch_instead_of_hanging(model):
    batcher = make(model)
    batcher._run = lambda ids: model(ids)[:-1]

    async def main():
        with pytest.raises(RuntimeError, match="returned 1 rows for 2 texts"):
            await asyncio.wait_for(batcher.embed([[1], [2]]), 5)

    asyncio.run(main())
    assert batcher.alive()
    batcher.close()
    assert not batcher.alive()


def test_budget_arguments_are_checked(model):
    with pytest.raises(ValueError, match="max_items"):
        Batcher(model, max_tokens=100, max_items=0)
