"""Dynamic batching: one bounded queue, one worker that runs gathered requests as one batch in a thread."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class QueueFull(Exception):
    """The queue cannot take the request's items now; the client should retry later."""


class DynamicBatcher:
    """Gathers submitted items into batches of up to ``max_batch``, waiting at most ``max_wait_s``
    after the first one, and runs ``run_batch`` on each batch in a dedicated thread.

    ``run_batch(items)`` returns one result per item; a result that is an exception is raised to
    that item's submitter only. At most ``max_queue`` items wait; :meth:`submit` raises
    :class:`QueueFull` beyond that, so the backlog never grows without bound. Items whose
    submitter gave up (a cancelled future) are dropped before they reach the model.
    """

    def __init__(self, run_batch: Callable[[list], Sequence[Any]], max_batch: int, max_wait_s: float, max_queue: int):
        self.run_batch = run_batch
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def queued(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vprhub-model")
        self._worker = asyncio.create_task(self._work())

    async def stop(self) -> None:
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._executor.shutdown(wait=True)

    def submit(self, items: Sequence[Any]) -> list[asyncio.Future]:
        """Queue all ``items`` or none; one future per item."""
        if self.max_queue - self._queue.qsize() < len(items):
            raise QueueFull(f"the queue holds {self._queue.qsize()} of {self.max_queue} photos")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, future in zip(items, futures):
            self._queue.put_nowait((item, future))
        return futures

    async def _gather(self) -> list[tuple[Any, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        jobs = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(jobs) < self.max_batch:
            if not self._queue.empty():
                jobs.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [(item, future) for item, future in jobs if not future.done()]

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._gather()
            if not jobs:
                continue
            self.batch_sizes[len(jobs)] += 1
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [item for item, _ in jobs])
            except Exception as err:  # the model failed: every item of the batch gets the error
                results = [err] * len(jobs)
            for (_, future), result in zip(jobs, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
