"""Dynamic batching: requests for any domains share engine calls.

An asyncio queue collects images; a worker takes up to `max_batch_size`, waiting at most
`max_wait_ms` after the first for more, and runs the engine off the event loop in one thread
while the next batch fills (two batches in flight at most). A full queue refuses new work at once
(`Overloaded`, which the API turns into 503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses

import numpy as np

from model.engine import InferenceEngine, UnknownDomainError
from service.metrics import Metrics


class Overloaded(Exception):
    """The queue is full; retry later."""


@dataclasses.dataclass
class _Item:
    image: np.ndarray
    domain: str
    future: asyncio.Future


class DynamicBatcher:
    def __init__(self, engine: InferenceEngine, max_batch_size: int, max_wait_ms: float, max_queue: int,
                 metrics: Metrics):
        self.engine, self.metrics = engine, metrics
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._in_flight = asyncio.Semaphore(2)
        self._worker: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def predict(self, images: list[np.ndarray], domains: list[str]) -> list[tuple[np.ndarray, object]]:
        """(logits, adapter tag) per image; raises `Overloaded` or `UnknownDomainError`."""
        if self._queue.qsize() + len(images) > self.max_queue:
            raise Overloaded(f"{self._queue.qsize()} images are queued (limit {self.max_queue}).")
        loop = asyncio.get_running_loop()
        items = [_Item(image, domain, loop.create_future()) for image, domain in zip(images, domains)]
        for item in items:
            self._queue.put_nowait(item)
        self.metrics.queue_depth.set(self._queue.qsize())
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        finally:
            for item in items:
                item.future.cancel()  # no-op when done; frees queued work of a timed-out request

    async def _collect(self) -> list[_Item]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
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
        return batch

    async def _run(self) -> None:
        while True:
            await self._in_flight.acquire()
            try:
                batch = [item for item in await self._collect() if not item.future.done()]
            except BaseException:
                self._in_flight.release()
                raise
            self.metrics.queue_depth.set(self._queue.qsize())
            if not batch:
                self._in_flight.release()
                continue
            task = asyncio.create_task(self._compute(batch))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _compute(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while batch:
                images = np.stack([item.image for item in batch])
                domains = [item.domain for item in batch]
                try:
                    logits, tags = await loop.run_in_executor(self._executor, self.engine.predict_tagged,
                                                              images, domains)
                except UnknownDomainError:  # deleted while queued: fail those items, run the rest
                    known = set(self.engine.domains)
                    for item in batch:
                        if item.domain not in known and not item.future.done():
                            item.future.set_exception(UnknownDomainError(f"Unknown domain {item.domain!r}"))
                    batch = [item for item in batch if item.domain in known]
                    continue
                self.metrics.batch_size.observe(len(batch))
                self.metrics.batch_domains.observe(len(set(domains)))
                for item, row, tag in zip(batch, logits, tags):
                    if not item.future.done():
                        item.future.set_result((row, tag))
                break
        except Exception as exc:  # never leave a request hanging
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        finally:
            self._in_flight.release()
