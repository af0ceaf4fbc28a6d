"""The interface both backends of the registry of record implement, and its errors.

Rules every backend keeps:
- A version number is claimed atomically and never reused for a domain, not even after a
  rollback or a delete, so a (domain, version) pair names one bundle for ever and replicas can
  compare versions alone.
- A version is visible only once its bytes are completely stored.
- A domain "exists" while it has a live (not dropped) version; its current version is the newest
  live one.
- Every change is announced (`changes`) after it is durable.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Collection

FLAGS = ("pinned", "unloaded")  # pinned: loaded at start, never evicted; unloaded: kept but not served


class RecordUnavailable(Exception):
    """The registry of record cannot be reached (database down, shared volume gone); retry later."""


class DomainExists(Exception):
    """The domain has a live version and the upload did not ask to replace it."""


@dataclasses.dataclass(frozen=True)
class Version:
    domain: str
    version: int
    size: int
    created_at: float  # seconds since the epoch


class RecordStore(abc.ABC):
    """Blocking calls (run them off the event loop); each raises `RecordUnavailable` when unreachable."""

    description: str  # where the record lives, for logs and /readyz (never a password)

    @abc.abstractmethod
    def heads(self, domains: Collection[str]) -> dict[str, int]:
        """The current version of each of `domains` that exists."""

    @abc.abstractmethod
    def list_domains(self, prefix: str, after: str | None, limit: int) -> list[tuple[str, int]]:
        """Existing domains named `prefix...` after `after`, in name order, with their current versions."""

    @abc.abstractmethod
    def live_versions(self, domain: str) -> list[Version]:
        """The domain's live versions, oldest first (empty when it does not exist)."""

    @abc.abstractmethod
    def read(self, domain: str, version: int) -> bytes:
        """A version's bundle bytes; `KeyError` when that version is not live."""

    @abc.abstractmethod
    def add(self, domain: str, data: bytes, replace: bool) -> Version:
        """Store `data` as the domain's next version. Without `replace`, raise `DomainExists` if the
        domain exists (two concurrent first registrations: one wins, the other gets `DomainExists`)."""

    @abc.abstractmethod
    def drop_after(self, domain: str, version: int) -> None:
        """Drop every live version newer than `version` (a rollback to it)."""

    @abc.abstractmethod
    def delete(self, domain: str) -> bool:
        """Drop every live version; False when the domain did not exist."""

    @abc.abstractmethod
    def changes(self, cursor: object, timeout: float) -> tuple[object, set[str] | None]:
        """Wait up to `timeout` s for changes after `cursor`; return the new cursor and the changed
        domains, or None for "resync everything" (the first call, with `cursor=None`, and whenever
        changes may have been missed)."""

    @abc.abstractmethod
    def flagged(self, flag: str) -> set[str]:
        """Domains carrying `flag` (one of `FLAGS`)."""

    @abc.abstractmethod
    def set_flag(self, domain: str, flag: str, on: bool) -> None:
        """Set or clear a flag (announced as a change of the domain); deleting a domain clears its flags."""

    @abc.abstractmethod
    def add_usage(self, counts: dict[str, int]) -> None:
        """Add images classified per domain (kept across restarts; a hint for warming, not an account)."""

    @abc.abstractmethod
    def top_used(self, n: int) -> list[str]:
        """The `n` most used existing domains, most used first."""

    @abc.abstractmethod
    def has_marker(self, name: str) -> bool:
        """Whether a one-time marker (e.g. "demo-seeded") was set."""

    @abc.abstractmethod
    def set_marker(self, name: str) -> None: ...

    def sweep_temporaries(self, limit: int | None = None) -> int:
        """Remove what crashed writes left behind (in the next `limit` domains, or all); returns how many
        files. The default has nothing to sweep: a transactional store leaves no partial writes."""
        return 0

    def close(self) -> None:  # noqa: B027  (a default, not a duty: a store without connections keeps it)
        """Release connections; the default has none."""
