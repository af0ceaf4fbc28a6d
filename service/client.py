"""A front end's handle to the engine: the same operations whether the engine core runs in this process
(`LocalEngine`, one worker) or in the engine process (`RemoteEngine`, `service.transport` behind it).

`Operations` declares them once, with the types both sides of the transport decode by; a route never
touches the transport, and never the engine core's objects.

Imported by front ends and by the engine core alike (no framework import).
"""

from __future__ import annotations

import typing

import numpy as np

from model.preprocessing import Preprocessing
from service.views import Card, Deleted, EngineStatus, Row


class Answer(typing.NamedTuple):
    """One image's result: logits, the adapter version that computed them, and where the time went."""

    logits: np.ndarray
    version: int
    queue_s: float  # waiting for its batch
    compute_s: float  # its batch's engine call


class Operations(typing.Protocol):
    """What a front end asks of the engine core (`service.engine.core.EngineCore` implements it)."""

    async def status(self) -> EngineStatus: ...

    async def card(self, domain: str) -> Card: ...

    async def infer(
        self,
        domains: list[str],
        preprocessing: list[Preprocessing],
        images: np.ndarray,
        which: list[int],
        lane: str | None,
    ) -> list[Answer]: ...

    async def list_page(self, prefix: str, cursor: str | None, count: int) -> list[Row]: ...

    async def register(self, data: bytes, replace: bool, domain: str | None, pin: bool | None) -> Card: ...

    async def delete(self, domain: str) -> Deleted: ...

    async def rollback(self, domain: str) -> Card: ...

    async def load(self, domain: str, data: bytes | None) -> Card: ...

    async def unload(self, domain: str) -> None: ...


OPERATIONS = ("status", "card", "infer", "list_page", "register", "delete", "rollback", "load", "unload")


class EngineClient(Operations, typing.Protocol):
    async def start(self) -> None:
        """Start the engine (in this process) or connect to it, and wait until it answers."""

    async def stop(self) -> None: ...

    @property
    def connected(self) -> bool:
        """Whether the engine answers now (False while the engine process is down or restarting)."""


class LocalEngine:
    """The engine core in this process: every operation is a direct call."""

    def __init__(self, core):
        self.core = core
        for name in OPERATIONS:
            setattr(self, name, getattr(core, name))

    async def start(self) -> None:
        await self.core.start()

    async def stop(self) -> None:
        await self.core.stop()

    @property
    def connected(self) -> bool:
        return self.core.started
