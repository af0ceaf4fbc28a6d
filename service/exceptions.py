"""The service's own exceptions, one per problem, importable by every process (no framework import).

`service.frontend.errors` maps each to HTTP once; the engine transport (`service.transport`) carries them
between processes by name (`TRANSPORTED`), so a front end raises what the engine raised.
"""

from __future__ import annotations

from model.preprocessing import ImageDecodeError
from model.safetensors_io import InvalidFileError
from service.record.base import DomainExists, RecordUnavailable


class UnknownDomainError(KeyError):
    """The domain is not registered (or not visible to the caller)."""

    def __init__(self, domain: str):
        super().__init__(domain)
        self.domain = domain

    def __str__(self) -> str:
        return f"Unknown domain {self.domain!r}"


class AdapterUnavailable(Exception):
    """A registered domain cannot be served now: no stored version passes validation, or loading it
    took longer than the limit."""


class DomainUnloaded(Exception):
    """The domain is kept in the registry but not served (unloaded through the repository API)."""


class NoPreviousVersion(Exception):
    """Rollback asked for a domain that has no usable older version."""


class Overloaded(Exception):
    """The queue is full; retry later."""


class QueueShareExceeded(Exception):
    """One lane (key or domain) holds its whole share of the queue; its requests wait for room (429),
    others go on."""


class EngineUnavailable(Exception):
    """The engine process is not answering (restarting after a crash, or not started yet); retry shortly."""


class StaleCard(Exception):
    """A front end prepared images with a domain's preprocessing that the version now served no longer
    uses; it fetches the domain's card again and prepares them anew."""


TRANSPORTED: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (
        UnknownDomainError,
        AdapterUnavailable,
        DomainUnloaded,
        NoPreviousVersion,
        Overloaded,
        QueueShareExceeded,
        EngineUnavailable,
        StaleCard,
        DomainExists,
        RecordUnavailable,
        InvalidFileError,
        ImageDecodeError,
        TimeoutError,
    )
}
