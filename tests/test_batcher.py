"""The dynamic batcher on its own, with a scripted engine: what shares a batch, when a batch leaves,
and that every request gets its own answer or an error, never silence."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from numeric import assert_logits_close

from service.engine.batcher import DynamicBatcher, Overloaded, QueueShareExceeded
from service.metrics import Metrics


class FakeSlot:
    def __init__(self, domain: str):
        self.index = self.domain = domain


SLOTS: dict[str, FakeSlot] = {}


class FakeEntry:
    """What the registry leases: the domain's one slot and a version ("v-<domain>")."""

    def __init__(self, domain: str):
        self.domain, self.slot, self.version = domain, SLOTS.setdefault(domain, FakeSlot(domain)), f"v-{domain}"


def leased(*domains: str) -> list[FakeEntry]:
    return [FakeEntry(d) for d in domains]


class ScriptedEngine:
    """Logits = [image value, domain number]; records every batch; can hold a call until released."""

    busy_s = None  # it cannot tell how long its device was busy

    def __init__(self):
        self.batches: list[list[tuple[float, str]]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()
        self.fail_with: Exception | None = None

    def predict(self, images: np.ndarray, slots: list[FakeSlot]):
        self.started.set()
        self.hold.wait(10)
        if self.fail_with:
            raise self.fail_with
        self.batches.append([(float(x[0, 0, 0]), s.domain) for x, s in zip(images, slots)])
        return [np.array([x[0, 0, 0], ord(s.domain)], np.float32) for x, s in zip(images, slots)]


def image(value: float) -> np.ndarray:
    return np.full((2, 2, 3), value, np.float32)


def run(coro):
    return asyncio.run(coro)


async def started(engine: ScriptedEngine, **kwargs) -> DynamicBatcher:
    options = {"max_batch_size": 8, "max_wait_ms": 1.0, "max_queue": 64, **kwargs}
    batcher = DynamicBatcher(engine, metrics=Metrics(), **options)
    await batcher.start()
    return batcher


async def occupy(engine: ScriptedEngine, batcher: DynamicBatcher) -> asyncio.Task:
    """Hold the engine inside a first request (image 0, domain "a") so that later ones queue up."""
    engine.hold.clear()
    busy = asyncio.create_task(batcher.predict([image(0)], leased("a")))
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
        calls = [
            asyncio.create_task(batcher.predict([image(v), image(v + 0.5)], leased(d, d)))
            for v, d in ((1, "a"), (2, "b"), (3, "c"))
        ]
        await wait_until(lambda: batcher.depth == 6)
        engine.hold.set()
        answers = await asyncio.gather(first, *calls)
        await batcher.stop()
        return engine.batches, answers

    batches, answers = run(main())
    assert [len(b) for b in batches] == [1, 6]
    assert {d for _, d in batches[1]} == {"a", "b", "c"}
    for (value, domain), answer in zip(((1, "a"), (2, "b"), (3, "c")), answers[1:]):
        assert [float(a.logits[0]) for a in answer] == [value, value + 0.5]
        assert all(
            a.logits[1] == ord(domain) and a.version == f"v-{domain}" and a.queue_s >= 0 and a.compute_s >= 0
            for a in answer
        )


def test_a_full_batch_leaves_at_once_and_a_partial_one_after_max_wait():
    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine, max_batch_size=4, max_wait_ms=300)
        t0 = time.monotonic()
        await batcher.predict([image(i) for i in range(4)], leased(*["a"] * 4))
        full = time.monotonic() - t0
        t0 = time.monotonic()
        await batcher.predict([image(1)], leased("a"))
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
        calls = [asyncio.create_task(batcher.predict([image(i)], leased("a"))) for i in range(10)]
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
            await asyncio.wait_for(batcher.predict([image(7)], leased("b")), 0.05)
        kept = asyncio.create_task(batcher.predict([image(8)], leased("c")))
        await wait_until(lambda: batcher.depth == 2)
        engine.hold.set()
        await asyncio.gather(busy, kept)
        await batcher.stop()
        return engine.batches

    batches = run(main())
    assert [v for b in batches for v, _ in b] == [0, 8]


def test_submit_calls_back_once_with_the_answers_or_when_given_up():
    """The engine process's path: no future per call. A cancelled request hears of it once (so that its
    caller returns its leases) and its queued images are skipped; an answered one hears only its answers."""

    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine)
        busy = await occupy(engine, batcher)
        heard: dict[str, list] = {"given up": [], "kept": []}
        given_up = batcher.submit([image(7)], leased("b"), None, heard["given up"].append)
        batcher.submit([image(8), image(9)], leased("c", "c"), None, heard["kept"].append)
        given_up.cancel()
        given_up.cancel()  # a second cancel is not heard
        engine.hold.set()
        await busy
        await wait_until(lambda: heard["kept"])
        await batcher.stop()
        return heard, engine.batches

    heard, batches = run(main())
    assert len(heard["given up"]) == 1 and isinstance(heard["given up"][0], TimeoutError)
    assert len(heard["kept"]) == 1 and [float(a.logits[0]) for a in heard["kept"][0]] == [8, 9]
    assert [v for b in batches for v, _ in b] == [0, 8, 9]  # the given-up image never reached the engine


def test_images_queued_past_their_callers_deadline_are_not_computed_and_the_caller_hears_once():
    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine)
        busy = await occupy(engine, batcher)
        heard: dict[str, list] = {"late": [], "on time": []}
        batcher.submit([image(7), image(6)], leased("b", "b"), None, heard["late"].append, time.monotonic() + 0.05)
        batcher.submit([image(8)], leased("c"), None, heard["on time"].append, time.monotonic() + 30)
        await asyncio.sleep(0.1)  # the first one's caller gives up while the engine is busy
        engine.hold.set()
        await busy
        await wait_until(lambda: heard["on time"] and heard["late"])
        await asyncio.sleep(0.05)
        await batcher.stop()
        return heard, engine.batches

    heard, batches = run(main())
    assert len(heard["late"]) == 1 and isinstance(heard["late"][0], TimeoutError)
    assert [float(a.logits[0]) for a in heard["on time"][0]] == [8]
    assert [v for b in batches for v, _ in b] == [0, 8]


def test_an_engine_error_fails_its_batch_and_the_next_batch_still_runs():
    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine)
        engine.fail_with = RuntimeError("device lost")
        with pytest.raises(RuntimeError, match="device lost"):
            await batcher.predict([image(1)], leased("a"))
        engine.fail_with = None
        answer = await batcher.predict([image(2)], leased("a"))
        await batcher.stop()
        return answer

    [(logits, *_)] = run(main())
    assert float(logits[0]) == 2


def test_a_full_queue_refuses_at_once_and_stop_fails_what_is_queued():
    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine, max_queue=3)
        busy = await occupy(engine, batcher)
        queued = asyncio.create_task(batcher.predict([image(1), image(2)], leased("a", "b")))
        await wait_until(lambda: batcher.depth == 2)
        with pytest.raises(Overloaded):
            await batcher.predict([image(3), image(4)], leased("a", "a"))
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.05)
        engine.hold.set()
        await stopping
        await busy
        with pytest.raises(RuntimeError, match="shutting down"):
            await queued

    run(main())


def test_batches_take_waiting_domains_in_turn():
    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine, max_batch_size=4)
        busy = await occupy(engine, batcher)
        flood = asyncio.create_task(batcher.predict([image(10 + i) for i in range(3)], leased(*["a"] * 3)))
        await wait_until(lambda: batcher.depth == 3)
        # b and c queue at once (a batch fills, and is prepared while the device computes, the moment
        # it is full: two requests could race that moment)
        light = asyncio.create_task(batcher.predict([image(1), image(2)], leased("b", "c")))
        await wait_until(lambda: batcher.depth == 5)
        engine.hold.set()
        await asyncio.gather(busy, flood, light)
        await batcher.stop()
        return engine.batches

    batches = run(main())
    # a queued first (less than a batch of its own), yet b and c ride in the very next batch
    assert [d for _, d in batches[1]] == ["a", "b", "c", "a"]
    assert [d for _, d in batches[2]] == ["a"]


def test_a_domain_over_its_queue_share_is_refused_while_others_get_in():
    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine, max_queue=16, domain_share=4)
        busy = await occupy(engine, batcher)
        queued = asyncio.create_task(batcher.predict([image(i) for i in range(4)], leased(*["a"] * 4)))
        await wait_until(lambda: batcher.depth == 4)
        with pytest.raises(QueueShareExceeded, match="share is 4"):
            await batcher.predict([image(5)], leased("a"))
        other = asyncio.create_task(batcher.predict([image(6)], leased("b")))
        await wait_until(lambda: batcher.depth == 5)
        engine.hold.set()
        await asyncio.gather(busy, queued, other)
        await batcher.stop()

    run(main())


def test_with_keys_the_lanes_are_tenants_so_many_domains_do_not_buy_more_turns():
    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine, max_batch_size=4, max_queue=64, domain_share=12)
        busy = await occupy(engine, batcher)
        light = [
            asyncio.create_task(batcher.predict([image(v)], leased(d), lane))
            for v, d, lane in ((1, "b", "calm-1"), (2, "c", "calm-2"))
        ]
        await wait_until(lambda: batcher.depth == 2)
        domains = [chr(ord("d") + i) for i in range(12)]  # one tenant spreads its flood over 12 domains
        flood = asyncio.create_task(batcher.predict([image(10 + i) for i in range(12)], leased(*domains), "noisy"))
        await wait_until(lambda: batcher.depth == 14)  # the next batch is prepared (4 images), 10 still queued
        with pytest.raises(QueueShareExceeded, match="'noisy'"):  # the share is the tenant's, over all its domains
            await batcher.predict([image(30 + i) for i in range(3)], leased("z", "y", "x"), "noisy")
        engine.hold.set()
        await asyncio.gather(busy, flood, *light)
        await batcher.stop()
        return engine.batches

    batches = run(main())
    assert [d for _, d in batches[1]] == ["b", "c", "d", "e"]


def test_a_domain_with_a_whole_batch_queued_gets_a_batch_of_its_own_and_the_tail_the_next_one():
    async def main():
        engine = ScriptedEngine()
        batcher = await started(engine, max_batch_size=4)
        busy = await occupy(engine, batcher)
        hot = [asyncio.create_task(batcher.predict([image(10 + i)], leased("h"))) for i in range(10)]
        tail = [asyncio.create_task(batcher.predict([image(v)], leased(d))) for v, d in ((1, "b"), (2, "c"))]
        await wait_until(lambda: batcher.depth == 12)
        engine.hold.set()
        answers = await asyncio.gather(*hot, *tail)
        await busy
        await batcher.stop()
        return engine.batches, answers

    batches, answers = run(main())
    domains = [[d for _, d in b] for b in batches[1:]]
    assert domains[0] == ["h"] * 4  # the hot domain's own batch (the engine's single-domain path)
    assert set(domains[1]) >= {"b", "c"}  # the tail rides in the very next batch, formed round-robin
    assert domains[2] == ["h"] * 4 or len(set(domains[2])) > 1
    assert sorted(v for b in batches[1:] for v, _ in b) == sorted([10.0 + i for i in range(10)] + [1.0, 2.0])
    for (value, domain), answer in zip([(10 + i, "h") for i in range(10)] + [(1, "b"), (2, "c")], answers):
        assert float(answer[0].logits[0]) == value and answer[0].logits[1] == ord(domain)


def test_grouping_keeps_every_answer_equal_to_the_engine_on_its_own(assets):
    """The real engine: images of a hot domain (a batch of its own, the folded single-domain path) and of
    others (mixed batches) answer as each image alone through `engine.predict` does."""
    from model.engine import InferenceEngine

    engine = InferenceEngine(assets.backbone, capacity=4, class_capacity=8)
    slots = {d: engine.load(b, verify_golden=False) for d, b in assets.bundles.items()}
    size = assets.backbone.config.input_size
    rng = np.random.default_rng(5)
    work = [("alpha", rng.normal(size=(size, size, 3)).astype(np.float32)) for _ in range(9)]
    work += [(d, rng.normal(size=(size, size, 3)).astype(np.float32)) for d in ("beta", "gamma", "beta")]

    class Entry:
        def __init__(self, domain):
            self.domain, self.slot, self.version = domain, slots[domain], 1

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=4, max_wait_ms=50, max_queue=64, metrics=Metrics())
        await batcher.start()
        answers = await asyncio.gather(*(batcher.predict([x], [Entry(d)]) for d, x in work))
        await batcher.stop()
        return answers

    answers = run(main())
    for (domain, x), (answer,) in zip(work, answers):
        alone = engine.predict(x[None], slots[domain])[0]
        # another batch (size, composition, folded or mixed path) sums in another order: equal up to float32
        # rounding, relative to the logits' scale (see numeric.assert_logits_close), not to an absolute 1e-5
        assert_logits_close(answer.logits, alone, err_msg=f"{domain} in a batch vs alone")
