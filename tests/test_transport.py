"""The transport between front ends and the engine process, in one process: a real `RemoteEngine` and a
real `EngineServer` over ZeroMQ and a shared-memory arena, with a stand-in for the engine core.

What it proves: the calls of one event-loop turn travel as one message and their replies come back as
one, and every reply reaches its own caller, including when some calls of the message fail."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest

from model.preprocessing import Preprocessing
from service.client import Answer
from service.engine.process import EngineServer
from service.exceptions import UnknownDomainError
from service.metrics import Metrics
from service.transport import RemoteEngine
from service.views import EngineStatus

PRE = Preprocessing()


class Core:
    """The engine core's face to `EngineServer`: `submit` answers resident domains from the next batch
    (`flush`), `infer` answers a domain that had to load; the logits say which images they came from."""

    def __init__(self):
        self.metrics = Metrics()
        self.held: list = []

    @staticmethod
    def answers(domains, images, which) -> list[Answer]:
        return [
            Answer(np.array([float(image.mean()), len(domains[j])], np.float32), 7, 0.001, 0.002)
            for image, j in zip(images, which)
        ]

    def submit(self, domains, preprocessing, images, which, lane, done, deadline) -> bool:
        if "unknown" in domains:
            raise UnknownDomainError("unknown")
        if "cold" in domains:
            return False
        self.held.append((done, domains, np.array(images), which))
        return True

    def flush(self) -> None:
        """The batch: answer everything held at once (as one callback of the batcher does)."""
        held, self.held = self.held, []
        for done, domains, images, which in held:
            if "late" in domains:
                done(TimeoutError("The request was given up before its images were classified."))
            else:
                done(self.answers(domains, images, which))

    async def infer(self, domains, preprocessing, images, which, lane):
        await asyncio.sleep(0.01)  # a load
        return self.answers(domains, np.array(images), which)

    async def status(self) -> EngineStatus:
        return EngineStatus(os.getpid(), True, True, 0, 4, None, None, None, 0)

    def __getattr__(self, op):
        async def unsupported(*args):
            raise NotImplementedError(op)

        return unsupported


@pytest.fixture
def run(tmp_path):
    def run_with(test):
        async def main():
            core = Core()
            prefix = f"ra-{os.getpid()}-test{time.monotonic_ns()}-"
            endpoint = f"ipc://{tmp_path}/engine.sock"
            server = asyncio.create_task(EngineServer(core, endpoint, prefix).serve())
            engine = RemoteEngine(endpoint, prefix + "fe0", 1 << 20, 5.0)
            await engine.start()
            try:
                return await test(core, engine)
            finally:
                await engine.stop()
                server.cancel()
                await asyncio.gather(server, return_exceptions=True)

        return asyncio.run(main())

    return run_with


def images(value: float, n: int) -> np.ndarray:
    return np.full((n, 4, 4, 3), value, np.float32)


def messages(core: Core) -> tuple[float, float]:
    """(messages with infer calls, images in them) the engine saw."""
    samples = {s.name: s.value for metric in core.metrics.message_images.collect() for s in metric.samples}
    return samples["ra_engine_message_images_count"], samples["ra_engine_message_images_sum"]


def test_calls_of_one_turn_share_a_message_and_each_reply_reaches_its_caller(run):
    """20 requests in one event-loop turn, of 1 to 3 images of their own value: one message to the engine,
    one back, and each caller gets its own images' answers in order."""

    async def test(core, engine):
        async def one(k: int):
            n = 1 + k % 3
            domains = ["alpha", "beta"] if k % 2 else ["alpha"]
            which = [i % len(domains) for i in range(n)]
            return k, n, domains, which, await engine.infer(domains, [PRE] * len(domains), images(k, n), which, None)

        calls = [asyncio.ensure_future(one(k)) for k in range(20)]
        await asyncio.sleep(0.05)  # the message has arrived and its images are queued
        assert len(core.held) == 20
        core.flush()
        results = await asyncio.gather(*calls)
        return results, messages(core)

    results, (count, imgs) = run(test)
    for k, n, domains, which, answers in results:
        assert [float(a.logits[0]) for a in answers] == [k] * n
        assert [int(a.logits[1]) for a in answers] == [len(domains[j]) for j in which]
        assert [(a.version, a.queue_s, a.compute_s) for a in answers] == [(7, np.float32(0.001), np.float32(0.002))] * n
    assert count == 1 and imgs == sum(n for _, n, *_ in results)


def test_failed_calls_of_a_shared_message_fail_alone(run):
    """In one message: an unknown domain (refused before queueing), a request past its deadline (failed by
    the batch), one whose domain must load first (answered later, by a task), and one whose caller gave
    up; every other call of the message is answered, each with its own images."""

    async def test(core, engine):
        async def one(k: int, domain: str):
            return await engine.infer([domain], [PRE], images(k, 2), [0, 0], None)

        plan = ["alpha", "unknown", "alpha", "late", "cold", "alpha", "gone", "alpha"]
        calls = [asyncio.ensure_future(one(k, d)) for k, d in enumerate(plan)]
        await asyncio.sleep(0.05)
        calls[6].cancel()  # its caller gave up while the images were queued
        core.flush()
        return plan, await asyncio.gather(*calls, return_exceptions=True)

    plan, outcomes = run(test)
    for k, (domain, outcome) in enumerate(zip(plan, outcomes)):
        if domain == "unknown":
            assert isinstance(outcome, UnknownDomainError)
        elif domain == "late":
            assert isinstance(outcome, TimeoutError)
        elif domain == "gone":
            assert isinstance(outcome, asyncio.CancelledError)
        else:
            assert [float(a.logits[0]) for a in outcome] == [k, k], domain


def test_a_call_alone_is_sent_at_once(run):
    """Light load: one call is its own message, sent in the turn it was made (no timer)."""

    async def test(core, engine):
        call = asyncio.ensure_future(engine.infer(["alpha"], [PRE], images(3, 1), [0], None))
        start = time.perf_counter()
        while not core.held:
            await asyncio.sleep(0)
        arrived = time.perf_counter() - start
        core.flush()
        answers = await call
        return arrived, answers

    arrived, answers = run(test)
    assert float(answers[0].logits[0]) == 3
    assert arrived < 0.05


def test_counts_of_one_turn_reach_their_counters_once_at_its_end():
    """`Tally`: the engine's per-request counts are added once per event-loop turn (and at once off a loop)."""
    metrics = Metrics()

    def value(domain: str) -> float:
        return metrics.registry.get_sample_value("ra_predictions_total", {"domain": domain}) or 0

    async def main():
        for _ in range(3):
            metrics.tally.add(metrics.predictions, 2, "alpha")
        metrics.tally.add(metrics.predictions, 1, "beta")
        during = value("alpha"), value("beta")
        await asyncio.sleep(0)
        return during, (value("alpha"), value("beta"))

    assert asyncio.run(main()) == ((0, 0), (6, 1))
    metrics.tally.add(metrics.predictions, 4, "alpha")
    assert value("alpha") == 10
