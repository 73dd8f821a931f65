"""Dynamic batching: many small requests in, a few large model calls out.

A neural network costs almost the same to run on 16 rows as on 1: the weights are read
from memory once either way, and the matrix products fill the machine better when they
are larger. A server that calls the model once per request therefore wastes most of
its capacity under load. A *dynamic batcher* sits between the web handlers and the
model and trades a little latency for a lot of throughput:

1. A handler validates its request and calls ``await batcher.submit(item)``. The item
   joins a queue, and the handler waits on a future that will hold its own result.
2. A collector task takes the oldest item and waits until either ``max_batch_size``
   items have arrived or the oldest one has waited ``max_delay_ms``, whichever comes
   first. A lone request at night therefore waits at most ``max_delay_ms``; a burst at
   noon fills a batch at once and waits not at all.
3. The batch goes to ``predict_batch(items) -> results`` in a *worker thread*, and each
   result is handed back to the future of the request it belongs to.

Why a worker thread? The event loop runs every handler of the process on one thread.
A model call is ordinary blocking Python (PyTorch releases the GIL inside its kernels,
but the call does not return until the batch is done). Called on the loop, it would
freeze every other connection for its duration: no new request could even be queued,
so the next batch could not be formed while this one runs. In a one-thread executor
the loop stays free to accept, validate and queue requests, and the batches run one
after another, each picking up whatever arrived during the previous one.

Why one bad request must not fail its batch-mates: a batch is a group of strangers.
If ``predict_batch`` raises for the whole batch, the batcher retries the items one at a
time, so only the request that causes the error receives it.

Why a bounded queue: a server that is offered more work than it can do builds a
queue, and an unbounded queue grows until every request in it is too old to be
useful, then until memory runs out. Refusing work early (*shedding load*) keeps the
latency of the accepted requests bounded. ``submit`` raises `QueueFullError` when
``max_queue_size`` items are waiting; the server answers it with HTTP 503 Service
Unavailable and a ``Retry-After`` header, the number of seconds the client should wait
before it tries again (RFC 9110, section 10.2.3). The estimate here is how long the
queue ahead would take to drain at the recent batch speed.

``max_batch_size=1, max_delay_ms=0`` turns batching off (each request is its own call),
which is the baseline that chapter 12's benchmark compares against.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DynamicBatcher", "QueueFullError"]

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The batcher's queue is full: the request was refused, not queued.

    `retry_after` is a suggested wait in seconds before retrying (the server rounds
    it up to whole seconds for the HTTP ``Retry-After`` header).
    """

    def __init__(self, depth: int, limit: int, retry_after: float) -> None:
        super().__init__(
            f"the request queue is full ({depth} requests waiting, limit {limit}); "
            f"retry after {retry_after:.2f} s"
        )
        self.depth = depth
        self.limit = limit
        self.retry_after = retry_after


@dataclass
class _Pending:
    """One submitted item, the future its submitter awaits, and when it arrived."""

    item: Any
    future: asyncio.Future
    arrived: float = field(default=0.0)


class DynamicBatcher:
    """Group concurrent `submit` calls into batches for `predict_batch`.

    `predict_batch` receives a list of items and must return a list of results of the
    same length and order. It runs in a single worker thread, one batch at a time.
    `on_batch(size, seconds)` is called on the event loop after each batch (for
    metrics). `start()` must be awaited before `submit`; `stop()` runs everything
    already queued, without waiting for the delay, and then stops.
    """

    def __init__(
        self,
        predict_batch: Callable[[list[Any]], list[Any]],
        *,
        max_batch_size: int = 16,
        max_delay_ms: float = 5.0,
        max_queue_size: int = 1024,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        _check_int("max_batch_size", max_batch_size, minimum=1)
        _check_int("max_queue_size", max_queue_size, minimum=1)
        if not isinstance(max_delay_ms, int | float) or not 0 <= max_delay_ms < math.inf:
            raise ValueError(f"max_delay_ms must be a number >= 0, got {max_delay_ms!r}")
        self.predict_batch = predict_batch
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.on_batch = on_batch
        self._pending: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False
        self._batch_seconds = 0.0  # moving average of a batch call, for Retry-After

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._task is not None and not self._stopping

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not counting the batch being computed)."""
        return len(self._pending)

    async def start(self) -> None:
        """Start the collector task and the worker thread on the running loop."""
        if self._task is not None:
            raise RuntimeError("this DynamicBatcher was already started")
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher")
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        """Refuse new items, finish every queued one, then stop the worker thread."""
        if self._task is None or self._stopping:
            return
        self._stopping = True
        assert self._wakeup is not None and self._executor is not None
        self._wakeup.set()
        try:
            await self._task
        finally:
            self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ submitting

    async def submit(self, item: Any) -> Any:
        """Queue `item` and return its result (or raise the exception it caused)."""
        if not self.running:
            raise RuntimeError("the batcher is not running (not started yet, or stopping)")
        if len(self._pending) >= self.max_queue_size:
            raise QueueFullError(len(self._pending), self.max_queue_size, self.retry_after())
        loop = asyncio.get_running_loop()
        pending = _Pending(item, loop.create_future(), loop.time())
        self._pending.append(pending)
        assert self._wakeup is not None
        self._wakeup.set()
        return await pending.future

    def retry_after(self) -> float:
        """Seconds until the current queue has probably drained (at least the delay)."""
        batches_ahead = math.ceil(len(self._pending) / self.max_batch_size) + 1
        return max(batches_ahead * self._batch_seconds, self.max_delay, 0.001)

    # ------------------------------------------------------------------ the collector

    async def _collect(self) -> None:
        """Form batches until stopped and drained."""
        assert self._wakeup is not None
        while True:
            if not self._pending:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_batch()
            batch = self._take_batch()
            if batch:
                await self._run(batch)

    async def _wait_for_batch(self) -> None:
        """Wait until a full batch is queued or the oldest item's delay has run out."""
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        deadline = self._pending[0].arrived + self.max_delay
        while len(self._pending) < self.max_batch_size and not self._stopping:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
                return

    def _take_batch(self) -> list[_Pending]:
        """Pop up to max_batch_size items, skipping those whose submitter gave up."""
        batch: list[_Pending] = []
        while self._pending and len(batch) < self.max_batch_size:
            pending = self._pending.popleft()
            if not pending.future.done():  # a cancelled submit (client went away)
                batch.append(pending)
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        """Compute one batch in the worker thread and resolve each item's future."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            outcomes = await loop.run_in_executor(
                self._executor, self._compute, [pending.item for pending in batch]
            )
        except Exception as exc:  # the executor itself failed: fail this batch, keep going
            outcomes = [(False, exc)] * len(batch)
        seconds = time.perf_counter() - start
        self._batch_seconds = seconds if not self._batch_seconds else (
            0.8 * self._batch_seconds + 0.2 * seconds
        )
        for pending, (ok, value) in zip(batch, outcomes, strict=True):
            if pending.future.done():
                continue
            if ok:
                pending.future.set_result(value)
            else:
                pending.future.set_exception(value)
        if self.on_batch is not None:
            try:
                self.on_batch(len(batch), seconds)
            except Exception:  # a metrics hook must never stop the batcher
                logger.exception("on_batch callback failed")

    def _compute(self, items: list[Any]) -> list[tuple[bool, Any]]:
        """Worker thread: the whole batch at once; if that fails, each item alone."""
        try:
            return [(True, result) for result in self._call(items)]
        except Exception as exc:
            if len(items) == 1:
                return [(False, exc)]  # nothing to separate: it was this item's error
        outcomes: list[tuple[bool, Any]] = []
        for item in items:
            try:
                outcomes.append((True, self._call([item])[0]))
            except Exception as exc:
                outcomes.append((False, exc))
        return outcomes

    def _call(self, items: list[Any]) -> list[Any]:
        results = list(self.predict_batch(items))
        if len(results) != len(items):
            raise RuntimeError(
                f"predict_batch returned {len(results)} results for {len(items)} items; "
                "it must return exactly one result per item, in order"
            )
        return results


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
