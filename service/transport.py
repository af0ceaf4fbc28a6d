"""Front ends to the engine process: ZeroMQ messages of typed msgpack (msgspec), pixels by shared memory.

Why these: ZeroMQ (pyzmq) gives a ROUTER socket that many front ends' DEALERs connect to, with
message framing, reconnection and asyncio support, and no broker; msgspec decodes msgpack into
declared types only (never a pickle: nothing a client sent is ever unpickled). Pixels do not travel
in messages: each front end owns an `Arena`, a file in /dev/shm that it writes preprocessed images
into; a call names the arena, offset and shape, and the engine reads them in place (one copy, into
the batch).

The framing, and why. What costs in a message is per message (a system call, a wake-up of the
other process, a decode), not per byte, so both sides send what is ready in one event-loop turn as
one message: no timer, so nothing waits at light load, and under load one message carries the
calls (or replies) of every request that became ready together.
- A front end's message is one frame: a msgpack list of `Call`s.
- The engine's message to a front end is three frames: a msgpack list of `Reply`, then the answers
  of every `infer` in it as two raw arrays: the logits, float32, each image's classes one after
  another; and `ANSWER_META`, a numpy record per image (its class count, adapter version and
  timings). Each `Reply` says how many of the images are its own (`images`), in order. Arrays, not
  lists of objects, and one pair for the whole message (a frame costs a send of its own): the engine
  writes them in one pass and the front end reads them in place.

Calls carry a deadline; the engine drops a call whose caller has given up. Sockets are set so that a
message is never queued for an engine that is not connected (`IMMEDIATE`): while the engine process
restarts, calls fail at once with `EngineUnavailable` instead of running late on the next engine.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import math
import mmap
import os
import pathlib
import re
import time
import typing
from typing import Any

import msgspec
import numpy as np
import zmq

from model.preprocessing import Preprocessing
from service import tracing
from service.client import OPERATIONS, Answer, Operations
from service.exceptions import (
    TRANSPORTED,
    EngineUnavailable,
    ImageDecodeError,
    InvalidFileError,
    Overloaded,
    UnknownDomainError,
)

_log = logging.getLogger(__name__)
SHM_DIR = pathlib.Path("/dev/shm")
ALIGN = 64
WATCH_S = 0.1  # how often a front end checks that the engine process is alive
PROBE_TIMEOUT_S = 1.0  # how long a status call waits while the engine is not known to be up
START_WAIT_S = 120.0  # how long a starting front end waits for the engine before it serves (503s) anyway


# ----- shared memory -------------------------------------------------------------------------------


class Arena:
    """A shared-memory file for one front end's images in flight; first-fit blocks of it."""

    def __init__(self, name: str, size: int, create: bool):
        self.name, self.size = name, size
        path = SHM_DIR / name
        fd = os.open(path, (os.O_RDWR | os.O_CREAT | os.O_EXCL) if create else os.O_RDWR, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            else:
                self.size = size = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted by offset

    @classmethod
    def create(cls, name: str, size: int) -> Arena:
        return cls(name, size, create=True)

    @classmethod
    def attach(cls, name: str) -> Arena:
        return cls(name, 0, create=False)

    def alloc(self, nbytes: int) -> int:
        """The offset of a free block of `nbytes`; `Overloaded` when none is left."""
        need = -(-max(nbytes, 1) // ALIGN) * ALIGN
        for i, (offset, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[i]
                else:
                    self._free[i] = (offset + need, length - need)
                return offset
        raise Overloaded(f"This front end has {self.size} bytes of images in flight already; retry shortly.")

    def free(self, offset: int, nbytes: int) -> None:
        need = -(-max(nbytes, 1) // ALIGN) * ALIGN
        i = bisect.bisect(self._free, (offset, 0))
        self._free.insert(i, (offset, need))
        if i + 1 < len(self._free) and offset + need == self._free[i + 1][0]:  # merge with the next
            self._free[i] = (offset, need + self._free.pop(i + 1)[1])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # and with the previous
            prev = self._free.pop(i - 1)
            self._free[i - 1] = (prev[0], prev[1] + self._free[i - 1][1])

    def array(self, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 view of the arena (no copy)."""
        return np.frombuffer(self._map, np.float32, math.prod(shape), offset).reshape(shape)

    def close(self) -> None:
        self._map.close()

    def unlink(self) -> None:
        (SHM_DIR / self.name).unlink(missing_ok=True)


ARENA_OWNER = re.compile(r"ra-(\d+)-")  # arenas are named ra-<supervisor pid>-fe<i>-<generation>


def reclaim_orphaned_arenas() -> tuple[int, int]:
    """Unlink the arenas of supervisors that are gone: a service killed whole (the OOM killer, `kill -9` of
    its group) never ran its own clean-up, and tmpfs keeps the memory until someone unlinks the file.
    Returns (arenas, bytes of memory given back). An arena whose supervisor pid runs again is kept."""
    count = freed = 0
    for path in SHM_DIR.glob("ra-*"):
        owner = ARENA_OWNER.match(path.name)
        if owner is None or _alive(int(owner.group(1))):
            continue
        try:
            held = path.stat().st_blocks * 512  # the pages the arena holds, not its sparse size
            path.unlink()
        except FileNotFoundError:  # another starting supervisor took it first
            continue
        count, freed = count + 1, freed + held
    return count, freed


def remove_arenas(prefix: str) -> int:
    """Unlink every arena named `prefix...` (a supervisor's, after its front ends are gone)."""
    removed = 0
    for path in SHM_DIR.glob(f"{prefix}*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


# ----- messages --------------------------------------------------------------------------------------


class Images(msgspec.Struct, frozen=True):
    """Where a call's preprocessed images lie: float32 `shape` at `offset` of the arena `arena`."""

    arena: str
    offset: int
    shape: tuple[int, ...]


class Call(msgspec.Struct, frozen=True, array_like=True):
    id: int
    op: str
    args: list[Any]
    deadline: float  # time.time() after which the caller no longer waits
    trace: str | None = None  # the caller's span as a W3C traceparent (`service.tracing`), None when untraced


class Received(msgspec.Struct, frozen=True, array_like=True):
    """A `Call` as the engine decodes it: the arguments stay raw until their operation's types are known."""

    id: int
    op: str
    args: msgspec.Raw
    deadline: float
    trace: str | None = None


class Reply(msgspec.Struct, frozen=True, array_like=True):
    id: int
    result: Any = None
    error: tuple[str, list] | None = None  # (exception class name, its arguments)
    images: int = 0  # an answered infer's images in the message's arrays, after those of the replies before it


ANSWER_META = np.dtype([("classes", "<i4"), ("version", "<i8"), ("queue_s", "<f4"), ("compute_s", "<f4")])


def answer_frames(answers: list[Answer]) -> list[bytes]:
    """Answers as a message's two raw frames: the logits, and `ANSWER_META` per image."""
    meta = np.empty(len(answers), ANSWER_META)
    if not answers:
        return [b"", meta.tobytes()]
    logits, versions, queue_s, compute_s = zip(*answers)
    meta["classes"] = [len(row) for row in logits]
    meta["version"], meta["queue_s"], meta["compute_s"] = versions, queue_s, compute_s
    return [np.concatenate(logits, dtype=np.float32).tobytes(), meta.tobytes()]


def answers_of(frames: list) -> list[Answer]:
    """The front end's side of `answer_frames` (the logits are views of the received frame, no copy)."""
    flat = np.frombuffer(frames[0], np.float32)
    meta = np.frombuffer(frames[1], ANSWER_META)
    ends = np.cumsum(meta["classes"]).tolist()
    starts = [0, *ends[:-1]]
    return [
        Answer(flat[a:b], v, q, c)
        for a, b, v, q, c in zip(
            starts, ends, meta["version"].tolist(), meta["queue_s"].tolist(), meta["compute_s"].tolist()
        )
    ]


def _hints(op: str) -> tuple[list[type], type]:
    hints = typing.get_type_hints(getattr(Operations, op))
    ret = hints.pop("return")
    return list(hints.values()), ret


ARG_TYPES = {op: _hints(op)[0] for op in OPERATIONS}
RESULT_TYPES = {op: _hints(op)[1] for op in OPERATIONS}
ARG_TYPES["infer"][2] = Images  # the pixels travel by reference
ENCODER = msgspec.msgpack.Encoder()
CALLS, REPLIES = msgspec.msgpack.Decoder(list[Received]), msgspec.msgpack.Decoder(list[Reply])
ARGS = {op: msgspec.msgpack.Decoder(tuple[tuple(types)]) for op, types in ARG_TYPES.items()}  # typed in one pass


def decode_args(op: str, args: msgspec.Raw) -> list[Any]:
    """The call's arguments as the operation declares them (a malformed call raises ValidationError)."""
    return list(ARGS[op].decode(args))


def error_of(exc: BaseException) -> tuple[str, list]:
    name = type(exc).__name__
    if isinstance(exc, UnknownDomainError):
        return name, [exc.domain]
    if isinstance(exc, (InvalidFileError, ImageDecodeError)):
        return name, [exc.code, str(exc)]
    if name in TRANSPORTED and isinstance(exc, TRANSPORTED[name]):
        return name, [str(exc)]
    return "RuntimeError", [f"The engine failed: {type(exc).__name__}: {exc}"]


def raise_error(error: tuple[str, list]) -> typing.NoReturn:
    name, args = error
    raise TRANSPORTED.get(name, RuntimeError)(*args)


# ----- the front end's side ----------------------------------------------------------------------------


class RemoteEngine:
    """The engine process, seen from a front end: every operation of `Operations` as one message."""

    def __init__(self, endpoint: str, arena_name: str, arena_bytes: int, call_timeout_s: float):
        self.endpoint, self.call_timeout_s = endpoint, call_timeout_s
        self._arena_spec = (arena_name, arena_bytes)
        self.arena: Arena | None = None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._drain_due = False
        self._outbox: list[tuple[Call, asyncio.Future]] = []  # calls of this event-loop turn, sent as one message
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._engine_pid: int | None = None  # the engine process that answered last; None while down
        self._tasks: list[asyncio.Task] = []
        for op in OPERATIONS:
            if op != "infer":
                setattr(self, op, self._caller(op))

    async def start(self) -> None:
        self.arena = Arena.create(*self._arena_spec)
        self._ctx = zmq.Context()
        sock = self._sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for an engine that is not connected
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        sock.connect(self.endpoint)
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.getsockopt(zmq.FD), self._drain)
        deadline = time.monotonic() + START_WAIT_S  # a front end takes connections once the engine answers
        while self._engine_pid is None and time.monotonic() < deadline:
            with contextlib.suppress(EngineUnavailable):
                await self.status()
            if self._engine_pid is None:
                await asyncio.sleep(WATCH_S)
        self._tasks = [asyncio.create_task(self._watch(), name="engine-watch")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_pending("This front end is shutting down.")
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.getsockopt(zmq.FD))
            self._sock.close(0)
            self._ctx.term()
            self._sock = None
        if self.arena is not None:
            self.arena.close()
            self.arena.unlink()

    @property
    def connected(self) -> bool:
        return self._engine_pid is not None

    # ----- calls ------------------------------------------------------------------------------

    async def _call(self, op: str, args: list[Any]) -> tuple[Any, list[Answer]]:
        """Send one call (in this event-loop turn's message) and wait for its reply: (result, its answers)."""
        if self._sock is None or (self._engine_pid is None and op != "status"):  # only the watcher's probe
            raise EngineUnavailable("The engine process is not answering (starting or restarting); retry shortly.")
        call_id = next(self._ids)
        probing = self._engine_pid is None  # a status call to an engine not known to be up: answer soon
        timeout = PROBE_TIMEOUT_S if probing else self.call_timeout_s
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending[call_id] = future
        if not self._outbox:
            loop.call_soon(self._flush)
        trace = tracing.to_message() if tracing.enabled else None
        self._outbox.append((Call(call_id, op, args, time.time() + timeout, trace), future))
        try:
            try:
                async with asyncio.timeout(timeout):
                    reply, answers = await future
            except TimeoutError:
                if probing:  # sent to a connection that died unnoticed, or to an engine still starting
                    raise EngineUnavailable(
                        "The engine process is not answering (starting or restarting); retry shortly."
                    ) from None
                raise
        finally:
            self._pending.pop(call_id, None)
        if reply.error is not None:
            raise_error(reply.error)
        return reply.result, answers

    def _flush(self) -> None:
        """Send the calls made in this event-loop turn as one message."""
        outbox, self._outbox = self._outbox, []
        calls = [call for call, future in outbox if not future.done()]  # a caller may have given up already
        if not calls or self._sock is None:
            return
        try:
            self._sock.send(ENCODER.encode(calls), zmq.NOBLOCK)
        except zmq.Again:
            for _, future in outbox:
                if not future.done():
                    future.set_exception(
                        EngineUnavailable(
                            "The engine process is not answering (starting or restarting); retry shortly."
                        )
                    )
            return
        if not self._drain_due:  # a send can take the descriptor's signal of a reply: look again
            self._drain_due = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _caller(self, op: str):
        result_type = RESULT_TYPES[op]

        async def call(*args):
            result, _ = await self._call(op, list(args))
            result = msgspec.convert(result, result_type) if result is not None else None
            if op == "status" and self._engine_pid != result.pid:  # the engine that answers now
                self._engine_pid = result.pid
                _log.info("connected to the engine process %d", result.pid)
            return result

        call.__name__ = op
        return call

    async def infer(
        self,
        domains: list[str],
        preprocessing: list[Preprocessing],
        images: np.ndarray,
        which: list[int],
        lane: str | None,
    ) -> list[Answer]:
        arena = self.arena
        nbytes = images.nbytes
        offset = arena.alloc(nbytes)
        try:
            arena.array(offset, images.shape)[...] = images
            ref = Images(arena.name, offset, tuple(images.shape))
            _, answers = await self._call("infer", [domains, preprocessing, ref, which, lane])
        finally:
            arena.free(offset, nbytes)
        return answers

    # ----- replies and the engine's health -----------------------------------------------------

    def _drain(self) -> None:
        """Resolve the calls whose replies wait on the socket (ZeroMQ's descriptor signals changes, not
        levels: this runs after each send too)."""
        self._drain_due = False
        sock = self._sock
        if sock is None:
            return
        while True:  # until the socket has nothing more (which also re-arms its descriptor)
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                replies = REPLIES.decode(frames[0].buffer)
            except msgspec.DecodeError:
                _log.error("an engine message could not be decoded; dropped")
                continue
            answers = answers_of([frames[1].buffer, frames[2].buffer]) if len(frames) == 3 else []
            at = 0
            for reply in replies:
                own, at = answers[at : at + reply.images], at + reply.images
                future = self._pending.get(reply.id)
                if future is not None and not future.done():
                    future.set_result((reply, own))

    def _fail_pending(self, why: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(EngineUnavailable(why))

    async def _watch(self) -> None:
        """Fail every waiting call at once when the engine process dies; find the next one."""
        while True:
            if self._engine_pid is not None and not _alive(self._engine_pid):
                _log.error("the engine process %d is gone; failing %d calls", self._engine_pid, len(self._pending))
                self._engine_pid = None
                self._fail_pending("The engine process stopped; it is being restarted. Retry shortly.")
            if self._engine_pid is None:
                with contextlib.suppress(EngineUnavailable):
                    await self.status()  # sets the pid of the engine that answers
            await asyncio.sleep(WATCH_S)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
