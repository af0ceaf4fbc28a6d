"""The engine process: one per device, the only process that imports the deep-learning framework.

It runs the engine core (`service.engine.core`) and answers every front end's calls on one ROUTER
socket. An `infer` whose domains are on the device goes straight into the batcher's one queue, beside
the images of every other front end, and its reply is made in the batch's callback: no task, no
future per call. Every other call (and an `infer` that must wait for a load) runs as its own task, so
a load or a registration never holds the others up. The replies made in one event-loop turn go to
each front end as one message (`service.transport` says why).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time

import msgspec
import numpy as np
import zmq

from service import tracing
from service.client import OPERATIONS, Answer
from service.engine.core import EngineCore
from service.exceptions import TRANSPORTED
from service.logs import configure
from service.metrics import Metrics
from service.settings import Settings
from service.transport import (
    CALLS,
    ENCODER,
    SHM_DIR,
    Arena,
    Images,
    Received,
    Reply,
    answer_frames,
    decode_args,
    error_of,
)

_log = logging.getLogger(__name__)
ARENAS_KEEP = 256  # front ends' arenas kept mapped (a restarted front end brings a new one)
ARENA_SWEEP_S = 5.0  # how often the arenas of front ends that have gone are unmapped
EXPECTED = tuple(TRANSPORTED.values())  # failures that are answers (unknown domain, full queue), not bugs


class EngineServer:
    """Decode a call, run the engine core's operation, send the reply (and the logits frame)."""

    def __init__(self, core: EngineCore, endpoint: str, arena_prefix: str):
        self.core, self.endpoint, self.arena_prefix = core, endpoint, arena_prefix
        self._arenas: dict[str, Arena] = {}
        self._ops = {op: getattr(core, op) for op in OPERATIONS}
        self._sock: zmq.Socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self._drain_due = False
        self._outbox: dict[bytes, tuple[list[Reply], list[Answer]]] = {}  # this turn's replies, by front end
        self._spans: dict[tuple[bytes, int], object] = {}  # traced calls' server spans, until replied
        self._replying: list[tuple[object, object]] = []  # (server span, reply span) of this turn's message

    def _images(self, ref: Images) -> np.ndarray:
        arena = self._arenas.get(ref.arena)
        if arena is None:
            if not ref.arena.startswith(self.arena_prefix):
                raise ValueError(f"{ref.arena!r} is not an arena of this service")
            if len(self._arenas) >= ARENAS_KEEP:
                self._arenas.pop(next(iter(self._arenas))).close()
            arena = self._arenas[ref.arena] = Arena.attach(ref.arena)
        return arena.array(ref.offset, ref.shape)

    async def serve(self) -> None:
        """Answer calls until cancelled. The socket is a plain one read from the event loop: a readable
        socket is drained at once (every call waiting), and replies are sent without a future each."""
        ctx = zmq.Context()
        sock = self._sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a reply to a front end that has gone is dropped
        sock.bind(self.endpoint)
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.getsockopt(zmq.FD), self._drain)
        loop.call_soon(self._drain)
        _log.info("engine process %d answers on %s", os.getpid(), self.endpoint)
        try:
            while True:
                await asyncio.sleep(ARENA_SWEEP_S)
                self._unmap_gone_arenas()
        finally:
            loop.remove_reader(sock.getsockopt(zmq.FD))
            for task in self._tasks:
                task.cancel()
            sock.close(0)
            ctx.term()

    def _unmap_gone_arenas(self) -> None:
        """Unmap the arenas whose front end has gone (the supervisor removed the file); one that an image
        in flight still points into waits for the next round."""
        for name in [n for n in self._arenas if not (SHM_DIR / n).exists()]:
            try:
                self._arenas[name].close()
            except BufferError:
                continue
            del self._arenas[name]

    def _drain(self) -> None:
        """Take every message waiting on the socket. ZeroMQ's descriptor signals changes, not levels, so
        this runs again after each send too (`_flush`)."""
        self._drain_due = False
        sock = self._sock
        while True:  # until the socket has nothing more (which also re-arms its descriptor)
            try:
                identity, header, *_ = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                calls = CALLS.decode(header.buffer)
            except msgspec.DecodeError as exc:
                _log.error("dropped a message that could not be decoded: %s", exc)
                continue
            sender, now, images = identity.bytes, time.time(), 0
            for call in calls:
                if call.deadline >= now:  # else its caller no longer waits
                    images += self._dispatch(sender, call)
            if images:
                self.core.metrics.message_images.observe(images)

    def _reply(self, identity: bytes, reply: Reply, answers: list[Answer] = ()) -> None:
        """Queue a reply (and an infer's answers) for this event-loop turn's message to its front end."""
        if self._spans and (span := self._spans.pop((identity, reply.id), None)) is not None:
            if reply.error is not None:
                span.set_status(tracing.ERROR, reply.error[0])
            self._replying.append((span, tracing.tracer.start_span("reply", context=tracing.in_context(span))))
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        replies, answered = self._outbox.setdefault(identity, ([], []))
        replies.append(reply)
        answered.extend(answers)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for identity, (replies, answers) in outbox.items():
            frames = [identity, ENCODER.encode(replies), *answer_frames(answers)]
            self._sock.send_multipart(frames, zmq.NOBLOCK)  # a ROUTER drops what it cannot deliver
        if self._replying:
            replying, self._replying = self._replying, []
            for server_span, reply_span in replying:
                reply_span.end()
                server_span.end()
        if not self._drain_due:
            self._drain_due = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _dispatch(self, identity: bytes, call: Received) -> int:
        """Queue an `infer` for resident domains at once, run anything else as a task; the images queued."""
        if call.trace is None or not tracing.enabled:
            return self._queue(identity, call)
        span = tracing.tracer.start_span(
            f"engine {call.op}", context=tracing.from_message(call.trace), kind=tracing.SERVER
        )
        self._spans[identity, call.id] = span
        with tracing.use_span(span):  # the batcher and the call's task see it as their parent
            return self._queue(identity, call)

    def _queue(self, identity: bytes, call: Received) -> int:
        args = None
        if call.op == "infer":
            try:
                args = decode_args(call.op, call.args)
                args[2] = self._images(args[2])
                deadline = time.monotonic() + (call.deadline - time.time())  # the caller's, on this host's clock
                if self.core.submit(
                    *args, done=functools.partial(self._answered, identity, call.id), deadline=deadline
                ):
                    return len(args[2])
            except Exception as exc:
                self._answered(identity, call.id, exc)
                return 0
        task = asyncio.get_running_loop().create_task(self._handle(identity, call, args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return 0

    async def _handle(self, identity: bytes, call: Received, args: list | None) -> None:
        try:
            op = self._ops.get(call.op)
            if op is None:
                raise ValueError(f"unknown operation {call.op!r}")
            if call.op == "infer":  # its domains were not all on the device: they load first
                self._answered(identity, call.id, await op(*args))
                return
            reply = Reply(call.id, result=await op(*decode_args(call.op, call.args)))
        except Exception as exc:
            self._answered(identity, call.id, exc, call.op)
            return
        self._reply(identity, reply)

    def _answered(self, identity: bytes, call_id: int, result: list[Answer] | BaseException, op: str = "infer") -> None:
        """An `infer`'s answers (into the message's arrays: `transport.answer_frames`), or any call's failure."""
        if isinstance(result, BaseException):
            if not isinstance(result, EXPECTED):
                _log.error("operation %s failed", op, exc_info=result)
            self._reply(identity, Reply(call_id, error=error_of(result)))
        else:
            self._reply(identity, Reply(call_id, images=len(result)), result)


async def run(settings: Settings, endpoint: str, arena_prefix: str, cores: int | None) -> None:
    core = EngineCore(settings, Metrics(settings.metrics_domains), cores=cores, loaders=settings.loader_processes)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)  # from the supervisor, once the front ends are done
    await core.start()
    server = asyncio.create_task(EngineServer(core, endpoint, arena_prefix).serve())
    await stopping.wait()
    _log.info("engine process %d stopping", os.getpid())
    server.cancel()
    await asyncio.gather(server, return_exceptions=True)
    await core.stop()


def main(endpoint: str, arena_prefix: str, cores: int | None, log_level: str) -> None:
    """The engine process's entry point (started by `service.supervisor`; settings from `RA_*`)."""
    configure("engine", log_level)
    tracing.configure("engine")
    try:
        asyncio.run(run(Settings(), endpoint, arena_prefix, cores))
    finally:
        tracing.shutdown()
