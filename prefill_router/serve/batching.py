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
"""

from __future__ import annotations

import asyncio
import bisect
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class MicroBatcher(Generic[In, Out]):
    def __init__(self, fn: Callable[[list[In]], list[Out]], *, max_batch_size: int = 16,
                 max_wait_ms: float = 5.0, on_batch: Callable[[int], None] | None = None, nice: int = 0):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.on_batch = on_batch
        self._queue: asyncio.Queue[tuple[In, asyncio.Future[Out], Callable[[], bool] | None]] | None = None
        self._worker: asyncio.Task | None = None
        # One thread: the encoder is not run concurrently with itself, and torch gets the cores it is given.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-router-encoder",
                                            initializer=_lower_priority, initargs=(nice,))

    async def submit(self, item: In, wanted: Callable[[], bool] | None = None) -> Out:
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")
        assert self._queue is not None  # made with the worker
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future, wanted))
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _gather(self) -> list[tuple[In, asyncio.Future[Out]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        # A caller that gave up (client disconnected, deadline passed) does not cost a slot in the forward pass.
        kept = []
        for item, fut, wanted in batch:
            if wanted is not None and not fut.done() and not wanted():
                fut.cancel()
            if not fut.done():
                kept.append((item, fut))
        return kept

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self._executor, self.fn, items)
                outcomes: list[tuple[Out, None] | tuple[None, BaseException]] = [(r, None) for r in results]
            except Exception as exc:  # noqa: BLE001 - delivered to the callers
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
            for (_, fut), outcome in zip(batch, outcomes):
                if fut.done():
                    continue
                if outcome[1] is not None:
                    fut.set_exception(outcome[1])
                else:
                    fut.set_result(outcome[0])


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
                 max_batch_size: int = 16, max_wait_ms: float = 5.0, on_batch: Callable[[int], None] | None = None):
        self.bounds = sorted(bounds)
        self.size = size
        self.lanes = [MicroBatcher(fn, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, on_batch=on_batch,
                                   nice=LONG_BUCKET_NICE if i else 0) for i in range(len(self.bounds) + 1)]

    def bucket(self, item: In) -> int:
        return bisect.bisect_left(self.bounds, self.size(item))

    async def submit(self, item: In, wanted: Callable[[], bool] | None = None) -> Out:
        return await self.lanes[self.bucket(item)].submit(item, wanted)

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
