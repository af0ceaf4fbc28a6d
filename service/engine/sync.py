"""Following the registry of record: this process's cache (`service.engine.cache`) kept in step with it.

`RecordLink` makes every record call (in a thread: the stores block) and keeps how this process stands
with the record (`SyncStatus`, for /readyz and metrics). `Sync` follows the record's changes:
`sync(domain)` makes a cached domain match the record (a new version, a rollback, a delete) and
`resync()` does it for every cached domain; the follower (`service.engine.follower`) calls them when
the record announces changes. It also reads the flags (pinned, unloaded) into the cache and adds
the images classified here to the record's usage counts, which rank the domains that start-up warms.

Runs in the engine process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from service.engine.cache import Cache, DomainLocks, Entry
from service.engine.loads import Loads
from service.metrics import Metrics
from service.record import RecordStore, RecordUnavailable

_log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass
class SyncStatus:
    """How this process stands with the registry of record (for /readyz and metrics)."""

    connected: bool = False
    synced_once: bool = False
    last_ok: float = 0.0  # monotonic time of the last successful contact
    last_ok_wall: float = 0.0
    errors: int = 0
    last_error: str | None = None
    warming: bool = False  # the most used domains are being loaded in the background


class RecordLink:
    """Record calls, each in a thread; their outcome (and the follower's) kept in `status`."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.status = SyncStatus()

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """A blocking record call in a thread; failures update the sync status."""
        try:
            result = await asyncio.to_thread(fn, *args)
        except RecordUnavailable as exc:
            self.mark_unavailable(exc)
            raise
        self.mark_ok()
        return result

    def mark_ok(self) -> None:
        s = self.status
        s.connected, s.last_ok, s.last_ok_wall = True, time.monotonic(), time.time()
        self.metrics.sync_connected.set(1)
        self.metrics.last_sync.set(s.last_ok_wall)

    def mark_unavailable(self, exc: Exception) -> None:
        s = self.status
        if s.connected or s.last_error != str(exc):
            _log.warning("registry of record unavailable: %s", exc)
        s.connected, s.last_error = False, str(exc)
        s.errors += 1
        self.metrics.sync_connected.set(0)
        self.metrics.sync_errors.labels("unavailable").inc()


class Sync:
    """The cache following the record's versions and flags; the usage counts not yet added to it."""

    def __init__(self, record: RecordStore, link: RecordLink, cache: Cache, loads: Loads, locks: DomainLocks):
        self.record, self.link, self.cache, self.loads, self._lock = record, link, cache, loads, locks
        self._usage: collections.Counter[str] = collections.Counter()  # not yet added to the record

    def behind(self) -> list[str]:
        """Cached domains served at another version than the record's (invalid versions aside)."""
        recorded = self.cache.recorded
        return [
            e.domain
            for e in self.cache.entries()
            if recorded.get(e.domain, e.version) != e.version
            and not self.loads.is_invalid(e.domain, recorded.get(e.domain))
        ]

    def count(self, entries: list[Entry], images: int) -> None:
        """`images` classified with each of `entries`, for the record's usage counts."""
        if images:
            for entry in entries:
                self._usage[entry.domain] += images

    async def flush_usage(self) -> None:
        """Add the images classified since the last flush to the record's usage counts."""
        usage, self._usage = self._usage, collections.Counter()
        try:
            await self.link.call(self.record.add_usage, dict(usage))
        except RecordUnavailable:
            self._usage.update(usage)
            raise

    async def refresh_flags(self) -> None:
        """Read the flags into the cache (the settings' pins with the record's); retire unloaded domains."""
        cache = self.cache
        cache.pinned = set(cache.limits.pinned) | await self.link.call(self.record.flagged, "pinned")
        cache.unloaded = await self.link.call(self.record.flagged, "unloaded")
        for domain in cache.unloaded & set(cache.domains()):
            cache.retire(cache.get(domain))

    async def resync(self) -> None:
        """Make every cached domain match the record; refresh the pins; record usage counts."""
        await self.refresh_flags()
        await self.flush_usage()
        cache = self.cache
        heads = await self.link.call(self.record.heads, cache.domains())
        for domain in sorted(set(cache.domains()) | set(cache.recorded)):
            entry = cache.get(domain)
            if heads.get(domain) != cache.recorded.get(domain) or heads.get(domain) != getattr(entry, "version", None):
                await self.sync(domain)
        self.link.status.synced_once = True

    async def sync(self, domain: str) -> None:
        """A change of `domain` in the record: follow it if the domain is cached here (else nothing to do)."""
        cache = self.cache
        async with self._lock(domain):
            await self.refresh_flags()  # a pin or an unload is announced like any change
            if domain not in cache and domain not in cache.recorded:
                return
            versions = await self.link.call(self.record.live_versions, domain)
            entry = cache.get(domain)
            if not versions:
                if entry is not None:
                    cache.retire(entry)
                cache.recorded.pop(domain, None)
                return
            if entry is not None and entry.version == versions[-1].version:
                cache.recorded[domain] = versions[-1].version
                return
            if entry is None or entry.slot is None:  # not cached or in the host tier: load on demand
                if entry is not None:
                    cache.retire(entry)
                cache.recorded.pop(domain, None)
                return
            await self.loads.load_newest(domain, versions, keep=entry)
