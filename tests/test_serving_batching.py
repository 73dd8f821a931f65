"""DynamicBatcher: same answers as unbatched, bounded batches and delay, isolation of a
bad item, load shedding, draining on stop, and a responsive event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from aimodels.serving.batching import DynamicBatcher, QueueFullError


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


class Recorder:
    """predict_batch that squares arrays row-wise and records each batch's size."""

    def __init__(self, fail_on=None, sleep: float = 0.0, gate: threading.Event | None = None):
        self.sizes: list[int] = []
        self.calls: list[list] = []
        self.fail_on = fail_on
        self.sleep = sleep
        self.gate = gate

    def __call__(self, items):
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if self.sleep:
            time.sleep(self.sleep)
        self.calls.append(list(items))
        if self.fail_on is not None and any(np.any(x == self.fail_on) for x in items):
            raise ValueError(f"cannot handle {self.fail_on}")
        stacked = np.concatenate(items)  # one "model call" on every item's rows
        out = stacked**2
        return np.split(out, np.cumsum([len(x) for x in items])[:-1])


def make(predict, **kwargs):
    sizes = []
    batcher = DynamicBatcher(predict, on_batch=lambda n, s: sizes.append((n, s)), **kwargs)
    return batcher, sizes


def test_batched_results_equal_unbatched_and_sizes_respect_the_limit():
    rng = np.random.default_rng(0)
    items = [rng.normal(size=(int(rng.integers(1, 4)), 3)) for _ in range(50)]

    async def main():
        batcher, sizes = make(Recorder(), max_batch_size=8, max_delay_ms=20)
        await batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit(x) for x in items))
        finally:
            await batcher.stop()
        return results, sizes

    results, sizes = run(main())
    for x, y in zip(items, results, strict=True):
        np.testing.assert_array_equal(y, x**2)  # each caller gets its own rows back
    counts = [n for n, _ in sizes]
    assert sum(counts) == len(items)
    assert max(counts) == 8, counts  # 50 concurrent submits do form full batches
    assert all(1 <= n <= 8 for n in counts)
    assert all(seconds >= 0 for _, seconds in sizes)


def test_batching_off_calls_the_model_once_per_item():
    async def main():
        predict = Recorder()
        batcher, sizes = make(predict, max_batch_size=1, max_delay_ms=0)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(np.full((1, 2), i)) for i in range(10)))
        await batcher.stop()
        return results, sizes

    results, sizes = run(main())
    assert [n for n, _ in sizes] == [1] * 10
    assert [int(r[0, 0]) for r in results] == [i * i for i in range(10)]


def test_a_lone_request_waits_about_max_delay_and_not_much_more():
    async def lone(delay_ms):
        batcher, _ = make(Recorder(), max_batch_size=8, max_delay_ms=delay_ms)
        await batcher.start()
        start = time.perf_counter()
        await batcher.submit(np.ones((1, 2)))
        elapsed = time.perf_counter() - start
        await batcher.stop()
        return elapsed

    elapsed = run(lone(50))
    assert elapsed >= 0.045, f"a lone request left after {elapsed * 1000:.1f} ms, before 50 ms"
    assert elapsed < 0.050 + 0.25, f"a lone request took {elapsed * 1000:.1f} ms"
    assert run(lone(0)) < 0.2


def test_a_full_batch_does_not_wait_for_the_delay():
    async def main():
        batcher, sizes = make(Recorder(), max_batch_size=4, max_delay_ms=5000)
        await batcher.start()
        start = time.perf_counter()
        await asyncio.gather(*(batcher.submit(np.ones((1, 1))) for _ in range(4)))
        elapsed = time.perf_counter() - start
        await batcher.stop()
        return elapsed, sizes

    elapsed, sizes = run(main())
    assert elapsed < 1.0, f"a full batch waited {elapsed:.2f} s"
    assert [n for n, _ in sizes] == [4]


def test_a_bad_item_fails_only_itself():
    async def main():
        predict = Recorder(fail_on=-1)
        batcher, sizes = make(predict, max_batch_size=8, max_delay_ms=50)
        await batcher.start()
        items = [np.array([[1.0]]), np.array([[-1.0]]), np.array([[3.0]])]
        results = await asyncio.gather(*(batcher.submit(x) for x in items),
                                       return_exceptions=True)
        await batcher.stop()
        return results, predict, sizes

    results, predict, sizes = run(main())
    assert results[0].tolist() == [[1.0]] and results[2].tolist() == [[9.0]]
    assert isinstance(results[1], ValueError) and "-1" in str(results[1])
    assert [len(call) for call in predict.calls] == [3, 1, 1, 1]  # the batch, then one by one
    assert [n for n, _ in sizes] == [3]


def test_wrong_number_of_results_is_an_error_for_the_caller():
    async def main():
        batcher, _ = make(lambda items: [], max_batch_size=4, max_delay_ms=1)
        await batcher.start()
        with pytest.raises(RuntimeError, match="exactly one result per item"):
            await batcher.submit(1)
        await batcher.stop()

    run(main())


def test_a_full_queue_sheds_load_and_accepted_items_still_finish():
    gate = threading.Event()

    async def main():
        batcher, _ = make(Recorder(gate=gate), max_batch_size=1, max_delay_ms=0,
                          max_queue_size=2)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(np.ones((1, 1))))
        await asyncio.sleep(0.05)  # the first item is now in the worker, blocked on the gate
        queued = [asyncio.ensure_future(batcher.submit(np.full((1, 1), 2.0))) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 2
        with pytest.raises(QueueFullError) as info:
            await batcher.submit(np.ones((1, 1)))
        gate.set()
        results = await asyncio.gather(first, *queued)
        await batcher.stop()
        return info.value, results

    error, results = run(main())
    assert error.retry_after > 0 and error.limit == 2 and "full" in str(error)
    assert [r.item() for r in results] == [1.0, 4.0, 4.0]


def test_stop_drains_queued_items_without_waiting_for_the_delay():
    async def main():
        batcher, sizes = make(Recorder(), max_batch_size=4, max_delay_ms=10_000)
        await batcher.start()
        futures = [asyncio.ensure_future(batcher.submit(np.full((1, 1), i))) for i in range(10)]
        await asyncio.sleep(0.02)
        start = time.perf_counter()
        await batcher.stop()
        elapsed = time.perf_counter() - start
        results = await asyncio.gather(*futures)
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.submit(np.ones((1, 1)))
        return elapsed, results, sizes

    elapsed, results, sizes = run(main())
    assert elapsed < 2.0
    assert [r.item() for r in results] == [float(i * i) for i in range(10)]
    assert all(n <= 4 for n, _ in sizes) and sum(n for n, _ in sizes) == 10


def test_the_event_loop_stays_responsive_while_a_batch_runs():
    async def main():
        batcher, _ = make(Recorder(sleep=0.3), max_batch_size=1, max_delay_ms=0)
        await batcher.start()
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        await batcher.submit(np.ones((1, 1)))  # blocks its thread for 0.3 s, not the loop
        task.cancel()
        await batcher.stop()
        return ticks

    assert run(main()) >= 10


def test_a_cancelled_submit_does_not_disturb_the_others():
    async def main():
        batcher, _ = make(Recorder(), max_batch_size=8, max_delay_ms=50)
        await batcher.start()
        gone = asyncio.ensure_future(batcher.submit(np.ones((1, 1))))
        kept = asyncio.ensure_future(batcher.submit(np.full((1, 1), 3.0)))
        await asyncio.sleep(0)
        gone.cancel()
        result = await kept
        await batcher.stop()
        return result

    assert run(main()).item() == 9.0


@pytest.mark.parametrize("kwargs", [
    {"max_batch_size": 0}, {"max_queue_size": 0}, {"max_delay_ms": -1},
    {"max_batch_size": 2.5},
])
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DynamicBatcher(lambda items: items, **kwargs)


def test_submit_before_start_is_an_error():
    async def main():
        with pytest.raises(RuntimeError, match="not running"):
            await DynamicBatcher(lambda items: items).submit(1)

    run(main())
