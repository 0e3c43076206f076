"""Micro-batching: concurrent requests share one encoder forward, and identical prompts share a cached result.

`MicroBatcher.submit(item)` waits for the result of `fn([..., item, ...])`. A single worker takes the first
queued item, then gathers more for at most `max_wait_ms` or until `max_batch_size`, and runs `fn` on the batch
in its own thread so the event loop keeps serving other requests. While one batch runs, the next one queues up:
under load batches fill by themselves, and an idle gateway waits at most `max_wait_ms`.

`LengthBuckets` runs one MicroBatcher per length bucket, each with its own worker thread, so a long prompt
is batched only with other long prompts and a short prompt never waits for a long prompt's forward pass.
The workers of the longer buckets run at a lower CPU priority (nice 10, Linux), so on a busy CPU the short
prompts' worker is scheduled first rather than sharing the cores evenly with a flood of long ones.

An item submitted with `wanted` is dropped before its forward pass when `wanted()` has turned false (every
caller gave up: a routing deadline passed or the client left), so a flood of abandoned prompts costs nothing.

Each lane learns its drain rate (`DrainRate`: seconds per unit of work, from the batches it ran) and knows the
work queued ahead, so the engine can tell at arrival whether a prompt would be scored before its deadline
(admission control) instead of waiting the deadline out. A batch grows only while it can still finish before the
earliest deadline of the prompts in it: a late joiner waits for the next batch rather than make a whole batch
miss its deadline together.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Queued(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    wanted: Callable[[], bool] | None
    cost: float                 # work units (a prompt's capped characters) for the drain-rate estimate
    deadline: float | None      # loop time by which its caller needs the result (None: no deadline)


class DrainRate:
    """Seconds per unit of work, learned from the batches run (an exponentially weighted mean), and what is queued
    or running: from these, how long a new item would wait. None until one batch has run (or a measurement was
    given), so an idle gateway admits everything at first."""

    def __init__(self, seconds_per_unit: float | None = None, smoothing: float = 0.2):
        self.seconds_per_unit = seconds_per_unit
        self.smoothing = smoothing
        self.queued = 0.0
        self.running = 0.0
        self._running_since = 0.0
        self.learned = False  # whether seconds_per_unit comes from batches run (not only a measurement)

    def started(self, cost: float, now: float) -> None:
        self.running, self._running_since = cost, now

    def finished(self, cost: float, seconds: float) -> None:
        self.running = 0.0
        if cost > 0:
            rate = seconds / cost
            spu = self.seconds_per_unit
            # The first real batch replaces a start-up measurement (taken once, maybe during a load spike).
            learned = self.learned
            self.seconds_per_unit = rate if spu is None or not learned else \
                (1 - self.smoothing) * spu + self.smoothing * rate
            self.learned = True

    def time_for(self, cost: float) -> float:
        return 0.0 if self.seconds_per_unit is None else cost * self.seconds_per_unit

    def wait(self, cost: float, now: float) -> float:
        """Seconds until an item of `cost` queued now would have its result; 0 while nothing is queued or
        running: an idle encoder always tries (the deadline still bounds the wait)."""
        if not self.queued and not self.running:
            return 0.0
        left_running = max(0.0, self.time_for(self.running) - (now - self._running_since))
        return left_running + self.time_for(self.queued + cost)


class MicroBatcher(Generic[In, Out]):
    """See the module docstring. `cost(item)` sizes an item's work for the drain rate (default 1 per item)."""

    def __init__(self, fn: Callable[[list[In]], list[Out]], *, max_batch_size: int = 16,
                 max_wait_ms: float = 5.0, on_batch: Callable[[int], None] | None = None, nice: int = 0,
                 cost: Callable[[In], float] | None = None, drain: DrainRate | None = None):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.on_batch = on_batch
        self.cost = cost or (lambda _item: 1.0)
        self.drain = drain or DrainRate()
        self._pending: deque[_Queued[In, Out]] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        # One thread: the encoder is not run concurrently with itself, and torch gets the cores it is given.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-router-encoder",
                                            initializer=_lower_priority, initargs=(nice,))

    def estimated_wait(self, item: In) -> float:
        """Seconds until `item`, submitted now, would have its result (0 until the drain rate is known)."""
        return self.drain.wait(self.cost(item), time.monotonic())

    async def submit(self, item: In, wanted: Callable[[], bool] | None = None,
                     deadline_s: float | None = None) -> Out:
        """The result of `fn` on a batch holding `item`. deadline_s: how long the caller will wait; a batch is
        kept small enough to finish before the earliest deadline of its items."""
        return await self.enqueue(item, wanted, deadline_s)

    def enqueue(self, item: In, wanted: Callable[[], bool] | None = None,
                deadline_s: float | None = None) -> asyncio.Future[Out]:
        """`submit` without waiting: the item is queued (and counted in the drain estimate) before this returns,
        so the next arrival's admission sees it."""
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")
        assert self._arrived is not None  # made with the worker
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        cost = self.cost(item)
        self._pending.append(_Queued(item, future, wanted, cost,
                                     None if deadline_s is None else time.monotonic() + deadline_s))
        self.drain.queued += cost
        self._arrived.set()
        return future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _take(self) -> _Queued[In, Out]:
        queued = self._pending.popleft()
        self.drain.queued = max(0.0, self.drain.queued - queued.cost)
        return queued

    def _fits(self, batch: list[_Queued[In, Out]], extra: _Queued[In, Out]) -> bool:
        """Whether `extra` may join `batch`: the batch must still finish before the earliest deadline in it."""
        deadlines = [q.deadline for q in (*batch, extra) if q.deadline is not None]
        if not deadlines or self.drain.seconds_per_unit is None:
            return True
        cost = sum(q.cost for q in batch) + extra.cost
        return time.monotonic() + self.drain.time_for(cost) <= min(deadlines)

    async def _gather(self) -> list[_Queued[In, Out]]:
        assert self._arrived is not None
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        batch = [self._take()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
                continue
            if not self._fits(batch, self._pending[0]):
                break  # it waits for the next batch rather than make this one miss a deadline
            batch.append(self._take())
        # A caller that gave up (client disconnected, deadline passed) does not cost a slot in the forward pass.
        kept = []
        for queued in batch:
            if queued.wanted is not None and not queued.future.done() and not queued.wanted():
                queued.future.cancel()
            if not queued.future.done():
                kept.append(queued)
        return kept

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            items = [q.item for q in batch]
            cost = sum(q.cost for q in batch)
            started = time.monotonic()
            self.drain.started(cost, started)
            try:
                results = await loop.run_in_executor(self._executor, self.fn, items)
                outcomes: list[tuple[Out, None] | tuple[None, BaseException]] = [(r, None) for r in results]
                self.drain.finished(cost, time.monotonic() - started)
            except Exception as exc:  # noqa: BLE001 - delivered to the callers
                self.drain.finished(0.0, 0.0)
                if len(batch) == 1:
                    outcomes = [(None, exc)]
                else:
                    # One bad prompt must not fail its batch-mates: score each alone to find it.
                    outcomes = []
                    for item in items:
                        try:
                            outcomes.append(((await loop.run_in_executor(self._executor, self.fn, [item]))[0],
                                             None))
                        except Exception as single_exc:  # noqa: BLE001
                            outcomes.append((None, single_exc))
            for queued, outcome in zip(batch, outcomes):
                if queued.future.done():
                    continue
                if outcome[1] is not None:
                    queued.future.set_exception(outcome[1])
                else:
                    queued.future.set_result(outcome[0])


LONG_BUCKET_NICE = 10


def _lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by `nice` (Linux gives each thread its own nice value)."""
    if nice and hasattr(os, "setpriority"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except OSError:
            pass  # not permitted here: the bucket still has its own worker, only without the priority


class LengthBuckets(Generic[In, Out]):
    """One MicroBatcher (and worker thread) per length bucket. `bounds` are ascending upper limits of
    `size(item)`: bounds [2000] make two buckets, size <= 2000 and size > 2000."""

    def __init__(self, fn: Callable[[list[In]], list[Out]], bounds: Sequence[int], size: Callable[[In], int], *,
                 max_batch_size: int = 16, max_wait_ms: float = 5.0, on_batch: Callable[[int], None] | None = None,
                 cost: Callable[[In], float] | None = None, seconds_per_unit: float | None = None):
        self.bounds = sorted(bounds)
        self.size = size
        self.lanes = [MicroBatcher(fn, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, on_batch=on_batch,
                                   nice=LONG_BUCKET_NICE if i else 0, cost=cost,
                                   drain=DrainRate(seconds_per_unit)) for i in range(len(self.bounds) + 1)]

    def bucket(self, item: In) -> int:
        return bisect.bisect_left(self.bounds, self.size(item))

    def estimated_wait(self, item: In) -> float:
        return self.lanes[self.bucket(item)].estimated_wait(item)

    async def submit(self, item: In, wanted: Callable[[], bool] | None = None,
                     deadline_s: float | None = None) -> Out:
        return await self.lanes[self.bucket(item)].submit(item, wanted, deadline_s)

    def enqueue(self, item: In, wanted: Callable[[], bool] | None = None,
                deadline_s: float | None = None) -> asyncio.Future[Out]:
        return self.lanes[self.bucket(item)].enqueue(item, wanted, deadline_s)

    async def close(self) -> None:
        for lane in self.lanes:
            await lane.close()


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """A bounded mapping that forgets the least recently used entry. Size 0 stores nothing."""

    def __init__(self, max_size: int):
        self.max_size = max_size
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        if key not in self._data:
            return None
        self._data.move_to_end(key)
        return self._data[key]

    def put(self, key: K, value: V) -> None:
        if self.max_size <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.max_size:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: K) -> bool:
        return key in self._data
