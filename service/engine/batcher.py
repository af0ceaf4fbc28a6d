"""Dynamic batching: requests for any domains share engine calls, fairly.

Requests put their images (each with the engine slot and version of its domain, leased from the
registry for the request's lifetime) on a bounded queue with one line per lane: the API key the
request came with, or its domain where there are no keys. A dedicated engine thread takes up to
`max_batch_size` images at a time, one per waiting lane in turn (round-robin), as soon as the batch
is full or `max_wait_ms` after the oldest queued image arrived; runs the engine; and hands each
batch's answers back to the event loop in one callback. A tenant (or domain) flooding the service
therefore cannot push the others' images out of the next batch, and it may hold at most
`domain_share` queued images (`QueueShareExceeded`: 429 + Retry-After) before the whole queue fills
(`Overloaded`: 503 + Retry-After).

Domain-aware: when one domain (one engine slot) has a whole batch queued, the next batch is that
domain's alone, which the engine runs on its cheaper folded single-domain path. Such a batch is
never followed by another one: the batch after it is formed round-robin again, so a grouped batch
delays the other images by one batch at most and the tail is never starved. The engine thread never waits for the event
loop, so under load the next batch holds everything that queued up during the last one.

Runs in the engine process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from service import tracing
from service.client import Answer
from service.exceptions import Overloaded, QueueShareExceeded
from service.metrics import Metrics

if TYPE_CHECKING:  # the framework is imported by the engine core, after it picks the backend
    from model.engine import InferenceEngine, Slot


Done = Callable[["list[Answer] | BaseException"], None]


def settle(future: asyncio.Future) -> Done:
    """A `Done` that resolves `future` with the answers or the error (unless it is already done)."""

    def done(result: list[Answer] | BaseException) -> None:
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    return done


class _Request:
    """One caller's images; `done` is called (on the event loop) once every image has an answer, or with
    the first error. A closed request's images still queued are skipped."""

    __slots__ = ("closed", "deadline", "done", "missing", "results", "trace")

    def __init__(self, size: int, done: Done, deadline: float, trace: object | None = None):
        self.done = done
        self.results: list = [None] * size
        self.missing = size
        self.closed = False
        self.deadline = deadline  # time.monotonic() after which its caller no longer waits
        self.trace = trace  # the caller's tracing context (`service.tracing`), None when untraced

    def given_up(self, now: float) -> bool:
        return self.closed or self.deadline < now

    def deliver(self, index: int, result: Answer | BaseException) -> None:
        """Event-loop side: record one image's answer; the first error fails the request."""
        if self.closed:
            return
        if isinstance(result, BaseException):
            self.closed = True
            self.done(result)
            return
        self.results[index] = result
        self.missing -= 1
        if self.missing == 0:
            self.closed = True
            self.done(self.results)

    def cancel(self) -> None:
        """Event-loop side: give up (a timeout). Images still queued are skipped; `done` hears of it once."""
        if not self.closed:
            self.closed = True
            self.done(TimeoutError("The request was given up before its images were classified."))


@dataclasses.dataclass
class _Item:
    image: np.ndarray
    lane: str
    slot: Slot
    version: int
    request: _Request
    index: int
    queued_at: float


class DynamicBatcher:
    """Fair dynamic batching: one queue per lane (key or domain), batches filled round-robin across the
    lanes that wait, so a flooding lane cannot push the others' images out of the next batch; a lane
    may hold at most `domain_share` queued images (then `QueueShareExceeded`, a 429)."""

    def __init__(
        self,
        engine: InferenceEngine,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        metrics: Metrics,
        domain_share: int | None = None,
    ):
        self.engine, self.metrics = engine, metrics
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.domain_share = domain_share or max_queue
        self._queues: collections.OrderedDict[str, collections.deque[_Item]] = collections.OrderedDict()
        self._size = 0  # queued images over all domains
        self._per_slot: collections.Counter[Slot] = collections.Counter()  # queued images by engine slot
        self._last_grouped = False
        self._busy_s = 0.0  # the device's busy time as last counted
        self._ready = threading.Condition()  # the batching thread waits on it
        self._handoff = threading.Condition(self._ready._lock)  # the device thread waits on it
        # what the batching thread waits for: "empty" queue, "filling" a batch, the "device" to finish
        # its batch, or the handoff "slot" to be taken
        self._waiting: str | None = None
        self._next: tuple[list[_Item], np.ndarray, list[Slot]] | None = None  # prepared for the device
        self._computing = False  # the device thread holds a batch
        self._stopping = self._formed_all = False
        self._threads = [
            threading.Thread(target=self._run, name="engine", daemon=True),
            threading.Thread(target=self._device, name="device", daemon=True),
        ]
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Start the batching and device threads; `predict` must then be awaited on this same event loop."""
        self._loop = asyncio.get_running_loop()
        for thread in self._threads:
            thread.start()

    async def stop(self) -> None:
        """Finish the batches in progress and prepared, fail what is still queued, and end the threads."""
        with self._ready:
            self._stopping = True
            left = [item for queue in self._queues.values() for item in queue]
            self._queues.clear()
            self._per_slot.clear()
            self._size = 0
            self._ready.notify()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        for item in left:
            item.request.deliver(item.index, RuntimeError("The service is shutting down."))

    @property
    def depth(self) -> int:
        """Images waiting for the device: queued, or in the batch prepared for it."""
        prepared = self._next
        return self._size + (len(prepared[0]) if prepared is not None else 0)

    async def predict(self, images: list[np.ndarray], entries: list, lane: str | None = None) -> list[Answer]:
        """(logits, adapter version, timings) per image, each computed with its entry's `slot`; raises
        `Overloaded` or `QueueShareExceeded`. The images wait in `lane` (an API key's name), or in their
        domains' lanes when it is None.

        The caller holds the entries (registry leases) until this returns, so their slots stay valid.
        Cancelling the call (e.g. a request timeout) drops its images that have not started yet.
        """
        future = self._loop.create_future()
        request = self.submit(images, entries, lane, settle(future))
        try:
            return await future
        finally:
            request.cancel()  # no-op when answered; queued images of a cancelled call are skipped

    def submit(
        self, images: list[np.ndarray], entries: list, lane: str | None, done: Done, deadline: float = math.inf
    ) -> _Request:
        """Queue the images and return at once; `done` gets the answers (or the first error) on the event
        loop. Raises `Overloaded` or `QueueShareExceeded` (nothing queued). The caller holds the entries until
        `done` is called; cancelling the returned request, or its `deadline` (time.monotonic()) passing,
        drops its images that have not started yet (and `done` gets a TimeoutError)."""
        request = _Request(len(images), done, deadline, tracing.current() if tracing.enabled else None)
        now = time.monotonic()
        items = [
            _Item(image, lane or entry.domain, entry.slot, entry.version, request, i, now)
            for i, (image, entry) in enumerate(zip(images, entries))
        ]
        adding = {items[0].lane: 1} if len(items) == 1 else collections.Counter(item.lane for item in items)
        with self._ready:
            if self._stopping:
                raise Overloaded("The service is shutting down.")
            if self._size + len(items) > self.max_queue:
                raise Overloaded(f"{self._size} images are queued (limit {self.max_queue}).")
            for name, n in adding.items():
                queued = len(self._queues.get(name, ()))
                if queued + n > self.domain_share:
                    raise QueueShareExceeded(
                        f"{queued} images of {name!r} are queued (its share is {self.domain_share}); retry shortly."
                    )
            for item in items:
                self._queues.setdefault(item.lane, collections.deque()).append(item)
                self._per_slot[item.slot] += 1
            self._size += len(items)
            # Wake the batching thread only when it would not look by itself: a notify per request hands
            # the interpreter lock over and back for nothing while the thread counts down or the device computes.
            if self._waiting == "empty" or (
                self._waiting in ("filling", "device") and self._size >= self.max_batch_size
            ):
                self._ready.notify()
        return request

    # ----- the engine thread -----------------------------------------------------------------

    def _drop_finished(self) -> None:
        """Hold `_ready`. Drop the images of requests given up (cancelled, failed or past their deadline)
        from the heads of the queues."""
        now = time.monotonic()
        for lane in list(self._queues):
            queue = self._queues[lane]
            while queue and queue[0].request.given_up(now):
                self._expire(queue[0].request)
                self._forget(queue.popleft())
            if not queue:
                del self._queues[lane]

    def _expire(self, request: _Request) -> None:
        """Engine thread: a request past its deadline hears of it on the event loop (once: `cancel`)."""
        if not request.closed:
            self._loop.call_soon_threadsafe(request.cancel)

    def _forget(self, item: _Item) -> None:
        """Hold `_ready`. Count an image out of the queue."""
        self._size -= 1
        self._per_slot[item.slot] -= 1
        if not self._per_slot[item.slot]:
            del self._per_slot[item.slot]

    def _form_batch(self) -> list[_Item]:
        """Hold `_ready`. One domain's whole batch when it has one queued and the last batch was not
        grouped; else up to `max_batch_size` images, one per waiting lane in turn."""
        if not self._last_grouped and self._per_slot:
            slot, queued = self._per_slot.most_common(1)[0]
            if queued >= self.max_batch_size:
                self._last_grouped = True
                return self._take_slot(slot)
        self._last_grouped = False
        batch = []
        while len(batch) < self.max_batch_size and self._queues:
            lane, queue = next(iter(self._queues.items()))
            batch.append(queue.popleft())
            self._forget(batch[-1])
            self._queues.move_to_end(lane)  # the next lane's turn
            if not queue:
                del self._queues[lane]
        return batch

    def _take_slot(self, slot: Slot) -> list[_Item]:
        """Hold `_ready`. `max_batch_size` queued images of `slot`, lanes in their round-robin order,
        each lane's oldest first."""
        batch: list[_Item] = []
        for lane in list(self._queues):
            kept: collections.deque[_Item] = collections.deque()
            for item in self._queues[lane]:
                if item.slot is slot and len(batch) < self.max_batch_size:
                    batch.append(item)
                    self._forget(item)
                else:
                    kept.append(item)
            if kept:
                self._queues[lane] = kept
            else:
                del self._queues[lane]
        return batch

    def _take(self) -> list[_Item] | None:
        """Block until a batch is due: full; or, with the device free, `max_wait` after its oldest image
        was queued. While the device computes, a partial batch keeps filling: it could not start sooner."""
        with self._ready:
            while True:
                self._drop_finished()
                if self._stopping:
                    return None
                if self._next is not None:  # one batch prepared ahead at most
                    self._wait("slot", None)
                elif self._size >= self.max_batch_size:
                    return self._form_batch()
                elif not self._size:
                    self._wait("empty", None)
                elif self._computing:
                    self._wait("device", None)
                else:
                    oldest = min(queue[0].queued_at for queue in self._queues.values())
                    remaining = oldest + self.max_wait - time.monotonic()
                    if remaining <= 0:
                        return self._form_batch()
                    self._wait("filling", remaining)

    def _wait(self, why: str, timeout: float | None) -> None:
        """Hold `_ready`. Wait for a notify (see `submit`, `_device`) or the timeout."""
        self._waiting = why
        try:
            self._ready.wait(timeout)
        finally:
            self._waiting = None

    def _run(self) -> None:
        """The batching thread: form the next batch and stack its images while the device computes the
        last one, then hand it over (one batch prepared at most)."""
        while (batch := self._take()) is not None:
            self.metrics.queue_depth.set(self.depth)
            now = time.monotonic()
            for item in batch:
                if item.request.given_up(now):
                    self._expire(item.request)
            batch = [item for item in batch if not item.request.given_up(now)]
            if not batch:
                continue
            formed = time.monotonic()
            try:
                prepared = (batch, np.stack([item.image for item in batch]), [item.slot for item in batch], formed)
            except Exception as exc:
                self._post(_deliver_all, [(item, exc) for item in batch])
                continue
            with self._ready:  # `_take` returned with no batch prepared: the slot is free
                self._next = prepared
                self._handoff.notify()
        with self._ready:
            self._formed_all = True
            self._handoff.notify()

    def _device(self) -> None:
        """The device thread: run the prepared batches one after another; their answers are made and
        delivered on the event loop, so the device's next batch waits for neither."""
        while True:
            with self._ready:
                while self._next is None and not self._formed_all:
                    self._handoff.wait()
                if self._next is None:
                    return
                (batch, images, slots, formed), self._next = self._next, None
                self._computing = True
                if self._waiting == "slot":
                    self._ready.notify()
            try:
                self._compute(batch, images, slots, formed)
            finally:
                with self._ready:
                    self._computing = False
                    if self._waiting == "device":
                        self._ready.notify()

    def _compute(self, batch: list[_Item], images: np.ndarray, slots: list[Slot], formed: float) -> None:
        """Run one batch (formed, its images stacked, at `formed`); every item gets an answer or an error,
        never silence."""
        start = time.monotonic()
        try:
            logits = self.engine.predict(images, slots)
        except Exception as exc:
            self._post(_deliver_all, [(item, exc) for item in batch])
            return
        done = time.monotonic()
        self._post(_answer_all, batch, logits, start, done)
        if tracing.enabled:
            self._post(_trace_batch, batch, slots, formed, start, done)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_domains.observe(len({slot.index for slot in slots}))
        busy = self.engine.busy_s
        if busy is not None:
            self.metrics.device_busy.inc(busy - self._busy_s)
            self._busy_s = busy

    def _post(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass


def _answer_all(batch: list[_Item], logits: list[np.ndarray], start: float, done: float) -> None:
    """Event loop: each image's answer to its request."""
    compute = done - start
    for item, row in zip(batch, logits):
        item.request.deliver(item.index, Answer(row, item.version, start - item.queued_at, compute))


def _deliver_all(answers: list[tuple[_Item, object]]) -> None:
    for item, result in answers:
        item.request.deliver(item.index, result)


def _trace_batch(batch: list[_Item], slots: list[Slot], formed: float, start: float, done: float) -> None:
    """Event loop: the spans of each traced request in the batch, as children of its caller's span:
    its queue wait, the batch (with its size and distinct domains) and the batch's device call."""
    traced = {id(item.request): item for item in batch if item.request.trace is not None}
    if not traced:
        return
    now = time.monotonic()
    shape = {"ra.batch.size": len(batch), "ra.batch.domains": len({slot.index for slot in slots})}
    for item in traced.values():
        parent = item.request.trace
        tracing.record("queue wait", parent, item.queued_at, formed)
        span = tracing.record("engine batch", parent, formed, now, shape)
        tracing.record("device call", tracing.in_context(span), start, done)
