"""The dynamic batcher on its own, with a scripted engine: what shares a batch, when a batch leaves,
and that every request gets its own answer or an error, never silence."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from model.engine import ReleasedSlotError
from service.batcher import DynamicBatcher, Overloaded
from service.metrics import Metrics
from service.registry import UnknownDomainError


class FakeServed:
    def __init__(self, domain: str, version: str):
        self.slot, self.version = domain, version


class ScriptedEngine:
    """Logits = [image value, domain number]; records every batch; can hold a call until released.

    It also plays the registry (`resolve`): the slot is the domain's name, the version "v-<domain>".
    """

    def __init__(self, domains=("a", "b", "c")):
        self.registered = set(domains)
        self.batches: list[list[tuple[float, str]]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()
        self.fail_with: Exception | None = None

        self.released: set[str] = set()  # slots released once, after they were resolved

    def resolve(self, domain: str) -> FakeServed:
        if domain not in self.registered:
            raise UnknownDomainError(domain)
        return FakeServed(domain, f"v-{domain}")

    def predict(self, images: np.ndarray, slots: list[str]):
        self.started.set()
        self.hold.wait(10)
        stale = self.released & set(slots)
        if stale:
            self.released -= stale
            raise ReleasedSlotError(f"released: {stale}")
        if self.fail_with:
            raise self.fail_with
        self.batches.append([(float(x[0, 0, 0]), d) for x, d in zip(images, slots)])
        return [np.array([x[0, 0, 0], ord(d)], np.float32) for x, d in zip(images, slots)]


def image(value: float) -> np.ndarray:
    return np.full((2, 2, 3), value, np.float32)


def run(coro):
    return asyncio.run(coro)


async def started(engine: ScriptedEngine, **kwargs) -> DynamicBatcher:
    options = {"max_batch_size": 8, "max_wait_ms": 1.0, "max_queue": 64, **kwargs}
    batcher = DynamicBatcher(engine, engine.resolve, metrics=Metrics(), **options)
    await batcher.start()
    return batcher


async def occupy(engine: ScriptedEngine, batcher: DynamicBatcher) -> asyncio.Task:
    """Hold the engine inside a first request (image 0, domain "a") so that later ones queue up."""
    engine.hold.clear()
    busy = asyncio.create_task(batcher.predict([image(0)], ["a"]))
    await asyncio.to_thread(engine.started.wait, 5)
    return busy


async def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def test_requests_queued_during_a_batch_share_the_next_one_without_cross_talk():
    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine)
        first = await occupy(engine, batcher)
        calls = [asyncio.create_task(batcher.predict([image(v), image(v + 0.5)], [d, d]))
                 for v, d in ((1, "a"), (2, "b"), (3, "c"))]
        await wait_until(lambda: batcher.depth == 6)
        engine.hold.set()
        answers = await asyncio.gather(first, *calls)
        await batcher.stop()
        return engine.batches, answers

    batches, answers = run(main())
    assert [len(b) for b in batches] == [1, 6]
    assert {d for _, d in batches[1]} == {"a", "b", "c"}
    for (value, domain), answer in zip(((1, "a"), (2, "b"), (3, "c")), answers[1:]):
        assert [float(logits[0]) for logits, _ in answer] == [value, value + 0.5]
        assert all(logits[1] == ord(domain) and tag == f"v-{domain}" for logits, tag in answer)


def test_a_full_batch_leaves_at_once_and_a_partial_one_after_max_wait():
    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine, max_batch_size=4, max_wait_ms=300)
        t0 = time.monotonic()
        await batcher.predict([image(i) for i in range(4)], ["a"] * 4)
        full = time.monotonic() - t0
        t0 = time.monotonic()
        await batcher.predict([image(1)], ["a"])
        partial = time.monotonic() - t0
        await batcher.stop()
        return full, partial

    full, partial = run(main())
    assert full < 0.25
    assert 0.25 <= partial < 2.0


def test_a_batch_never_exceeds_max_batch_size():
    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine, max_batch_size=3)
        engine.hold.clear()
        calls = [asyncio.create_task(batcher.predict([image(i)], ["a"])) for i in range(10)]
        await wait_until(lambda: engine.started.is_set())
        engine.hold.set()
        await asyncio.gather(*calls)
        await batcher.stop()
        return engine.batches

    batches = run(main())
    assert sum(len(b) for b in batches) == 10
    assert max(len(b) for b in batches) <= 3


def test_cancelled_requests_are_not_computed():
    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine)
        busy = await occupy(engine, batcher)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher.predict([image(7)], ["b"]), 0.05)
        kept = asyncio.create_task(batcher.predict([image(8)], ["c"]))
        await wait_until(lambda: batcher.depth == 2)
        engine.hold.set()
        await asyncio.gather(busy, kept)
        await batcher.stop()
        return engine.batches

    batches = run(main())
    assert [v for b in batches for v, _ in b] == [0, 8]


def test_a_domain_deleted_while_queued_fails_only_its_requests():
    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine)
        busy = await occupy(engine, batcher)
        doomed = asyncio.create_task(batcher.predict([image(1)], ["b"]))
        fine = asyncio.create_task(batcher.predict([image(2)], ["c"]))
        await wait_until(lambda: batcher.depth == 2)
        engine.registered.discard("b")
        engine.hold.set()
        await busy
        with pytest.raises(UnknownDomainError):
            await doomed
        answer = await fine
        await batcher.stop()
        return answer

    [(logits, tag)] = run(main())
    assert float(logits[0]) == 2 and tag == "v-c"


def test_an_engine_error_fails_its_batch_and_the_next_batch_still_runs():
    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine)
        engine.fail_with = RuntimeError("device lost")
        with pytest.raises(RuntimeError, match="device lost"):
            await batcher.predict([image(1)], ["a"])
        engine.fail_with = None
        answer = await batcher.predict([image(2)], ["a"])
        await batcher.stop()
        return answer

    [(logits, _)] = run(main())
    assert float(logits[0]) == 2


def test_a_full_queue_refuses_at_once_and_stop_fails_what_is_queued():
    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine, max_queue=3)
        busy = await occupy(engine, batcher)
        queued = asyncio.create_task(batcher.predict([image(1), image(2)], ["a", "b"]))
        await wait_until(lambda: batcher.depth == 2)
        with pytest.raises(Overloaded):
            await batcher.predict([image(3), image(4)], ["a", "a"])
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.05)
        engine.hold.set()
        await stopping
        await busy
        with pytest.raises(RuntimeError, match="shutting down"):
            await queued

    run(main())


def test_a_slot_released_after_it_was_resolved_is_resolved_again():
    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine)
        engine.released.add("b")  # e.g. the domain was replaced between resolving and computing
        answer = await batcher.predict([image(1), image(2)], ["a", "b"])
        await batcher.stop()
        return engine.batches, answer

    batches, answer = run(main())
    assert batches == [[(1.0, "a"), (2.0, "b")]]
    assert [tag for _, tag in answer] == ["v-a", "v-b"]
