"""The registry: the domains this process serves, from a bounded cache kept in step with the record.

Every registered domain lives in the registry of record (`service.record`); this process keeps a
bounded cache of them in two tiers (device and host), loads the others when a request needs them, and
follows the record's changes. `Registry` is what the engine core (`service.engine.core`), the follower
(`service.engine.follower`) and the tests talk to; it wires the parts, each the one owner of its state:
- `service.engine.cache`: the cached domains in both tiers, their leases and eviction, the flags
  (pinned, unloaded) and the record's versions as last read; `DomainLocks`, the per-domain asyncio
  locks that order every change of one domain (loads, syncs and the management calls here);
- `service.engine.loads`: loads from host memory or the record (de-duplicated, bounded, validated,
  self-tested once per distinct bundle) and the warm-up at start;
- `service.engine.sync`: every record call and how this process stands with the record; `sync` and
  `resync`, which follow the record's changes; the usage counts.
The management calls are here: they validate the bundle completely, write it to the record, and
serve it here before they answer.

Runs in the engine process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from model.bundle import check_domain_name
from model.safetensors_io import InvalidFileError
from service.engine.cache import MB, Cache, DomainLocks, Entry, Limits
from service.engine.loader import Loader
from service.engine.loads import VERIFIED_KEEP, Loads, check_name
from service.engine.sync import RecordLink, Sync, SyncStatus
from service.exceptions import AdapterUnavailable, DomainUnloaded, NoPreviousVersion, UnknownDomainError
from service.metrics import Metrics
from service.record import DomainExists, RecordStore

if TYPE_CHECKING:  # the framework is imported by the engine core, after it picks the backend
    from model.engine import InferenceEngine

_log = logging.getLogger(__name__)
_DEFAULT_LIMITS = Limits()  # a module-level default: Limits is frozen
__all__ = [
    "MB",
    "VERIFIED_KEEP",
    "AdapterUnavailable",
    "DomainExists",
    "DomainUnloaded",
    "Entry",
    "Limits",
    "NoPreviousVersion",
    "Registry",
    "SyncStatus",
    "UnknownDomainError",
    "check_name",
]


class Registry:
    """The domains this process serves: requests, the record's changes and the management calls."""

    def __init__(
        self,
        engine: InferenceEngine,
        record: RecordStore,
        metrics: Metrics,
        loader: Loader,
        limits: Limits = _DEFAULT_LIMITS,
    ):
        self.engine, self.record, self.metrics = engine, record, metrics
        self._cache = Cache(engine, metrics, limits)
        self._locks = DomainLocks(self._cache)
        self._link = RecordLink(metrics)
        self._loads = Loads(engine, record, metrics, loader, self._cache, self._locks, self._link.call)
        self._sync = Sync(record, self._link, self._cache, self._loads, self._locks)

    @property
    def limits(self) -> Limits:
        return self._cache.limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        self._cache.limits = limits

    @property
    def loader(self) -> Loader:
        return self._loads.loader

    @loader.setter
    def loader(self, loader: Loader) -> None:
        self._loads.loader = loader

    @property
    def status(self) -> SyncStatus:
        return self._link.status

    # ----- reads -----------------------------------------------------------------------------

    def __contains__(self, domain: str) -> bool:
        return domain in self._cache

    def cached(self, domain: str) -> Entry | None:
        return self._cache.get(domain)

    def entries(self) -> list[Entry]:
        """Cached domains, by name."""
        return self._cache.entries()

    def resident(self, tier: str) -> int:
        return self._cache.resident(tier)

    @property
    def max_resident(self) -> int:
        """Domains the device tier holds: what the budget fits at the tables' current row size, under the cap."""
        return self._cache.max_resident

    def recorded_version(self, domain: str) -> int | None:
        return self._cache.recorded.get(domain)

    def is_pinned(self, domain: str) -> bool:
        return domain in self._cache.pinned

    def is_unloaded(self, domain: str) -> bool:
        return domain in self._cache.unloaded

    def pinned_domains(self) -> list[str]:
        return sorted(self._cache.pinned)

    def behind(self) -> list[str]:
        """Cached domains served at another version than the record's (invalid versions aside)."""
        return self._sync.behind()

    # ----- requests: lease, load on demand, return ----------------------------------------------

    async def acquire(self, domain: str) -> Entry:
        """The domain on the device, leased to the caller until `release`: loaded first if needed."""
        return await self._loads.acquire(domain)

    def try_acquire(self, domains: list[str]) -> list[Entry] | None:
        """Every domain leased at once if all are on the device now, else None (nothing leased)."""
        return self._cache.try_acquire(domains)

    def release(self, entries: list[Entry], images: int = 0) -> None:
        """Return the leases of `acquire`; count `images` classified per entry."""
        self._cache.release(entries, images)
        self._sync.count(entries, images)

    async def warm(self, domains: list[str], ranked: bool = False) -> int:
        """Load `domains` onto the device at start-up (`Loads.warm`); returns how many are resident."""
        return await self._loads.warm(domains, ranked)

    async def warm_host(self, domains: list[str]) -> int:
        """Fill the host tier with `domains` while it has room (`Loads.warm_host`); returns how many were added."""
        return await self._loads.warm_host(domains)

    # ----- following the record --------------------------------------------------------------

    def mark_ok(self) -> None:
        self._link.mark_ok()

    def mark_unavailable(self, exc: Exception) -> None:
        self._link.mark_unavailable(exc)

    async def flush_usage(self) -> None:
        """Add the images classified since the last flush to the record's usage counts."""
        await self._sync.flush_usage()

    async def refresh_flags(self) -> None:
        await self._sync.refresh_flags()

    async def resync(self) -> None:
        """Make every cached domain match the record; refresh the pins; record usage counts."""
        await self._sync.resync()

    async def sync(self, domain: str) -> None:
        """A change of `domain` in the record: follow it if the domain is cached here (else nothing to do)."""
        await self._sync.sync(domain)

    # ----- management ------------------------------------------------------------------------

    async def set_flag(self, domain: str, flag: str, on: bool) -> None:
        """Set a flag in the record (for every replica) and follow it here at once."""
        await self._link.call(self.record.set_flag, domain, flag, on)
        await self._sync.refresh_flags()

    async def unload(self, domain: str) -> None:
        """Stop serving a registered domain everywhere, keeping it in the record."""
        if not await self._link.call(self.record.live_versions, check_name(domain)):
            raise UnknownDomainError(domain)
        await self.set_flag(domain, "unloaded", True)

    async def reload(self, domain: str) -> Entry:
        """Serve an unloaded domain again (its current version)."""
        if not await self._link.call(self.record.live_versions, check_name(domain)):
            raise UnknownDomainError(domain)
        await self.set_flag(domain, "unloaded", False)
        return await self.describe(domain)

    async def register(
        self, data: bytes, replace: bool = False, domain: str | None = None, pin: bool | None = None
    ) -> Entry:
        """Validate a bundle completely, record it durably, serve it here; raise `InvalidFileError`,
        `DomainExists` or `RecordUnavailable`."""
        if domain is not None:
            check_domain_name(domain)
        prepared = await self.loader.prepare(data, domain)
        bundle, cache = prepared.card, self._cache
        async with self._locks(bundle.domain):
            cached = cache.get(bundle.domain)
            if not replace and cached is not None:
                raise DomainExists(
                    f"Domain {bundle.domain!r} exists (version {cached.version}); "
                    "send replace=true to upload a new version."
                )
            cache.make_room()
            entry = await self._loads.load(data, bundle.domain, 0, 0.0, prepared)  # the self-test
            try:
                version = await self._link.call(self.record.add, bundle.domain, data, replace)
                if pin is not None:
                    await self.set_flag(bundle.domain, "pinned", pin)
            except BaseException:
                self.engine.release(entry.slot)
                raise
            entry = dataclasses.replace(entry, version=version.version, registered_at=version.created_at)
            cache.recorded[bundle.domain] = max(version.version, cache.recorded.get(bundle.domain, 0))
            cached = cache.get(bundle.domain)
            if cached is None or cached.version < version.version:
                cache.publish(entry)
            else:  # a newer version (another replica's) is already served here
                self.engine.release(entry.slot)
                entry = cached
            return entry

    async def describe(self, domain: str) -> Entry:
        """The cached entry; a domain not cached here is loaded first (it describes what would serve)."""
        entry = self._cache.get(check_name(domain))
        if entry is None:
            entry = await self.acquire(domain)
            self.release([entry])
        return entry

    async def delete(self, domain: str) -> tuple[int, Entry | None]:
        """Drop every version from the record and stop serving the domain here. Returns the version
        that was current and the cached entry, if this process had one (nothing is loaded for this)."""
        cache = self._cache
        async with self._locks(check_name(domain)):
            versions = await self._link.call(self.record.live_versions, domain)
            if not versions or not await self._link.call(self.record.delete, domain):
                raise UnknownDomainError(domain)
            cache.pinned.discard(domain)
            cache.unloaded.discard(domain)
            entry = cache.get(domain)
            if entry is not None:
                cache.retire(entry)
            cache.recorded.pop(domain, None)
            return versions[-1].version, entry

    async def rollback(self, domain: str) -> Entry:
        """Serve the newest valid version older than the record's current one; drop the newer ones."""
        cache = self._cache
        async with self._locks(check_name(domain)):
            versions = await self._link.call(self.record.live_versions, domain)
            if not versions:
                raise UnknownDomainError(domain)
            for v in reversed(versions[:-1]):
                try:
                    data = await self._link.call(self.record.read, domain, v.version)
                    cache.make_room()
                    entry = await self._loads.load(data, domain, v.version, v.created_at)
                except (KeyError, InvalidFileError) as exc:
                    _log.error("stored bundle %s v%d is unusable, skipping it: %s", domain, v.version, exc)
                    continue
                try:
                    await self._link.call(self.record.drop_after, domain, v.version)
                except BaseException:
                    self.engine.release(entry.slot)
                    raise
                cache.recorded[domain] = v.version
                cache.publish(entry)
                return entry
            raise NoPreviousVersion(f"Domain {domain!r} has no usable version before {versions[-1].version}.")

    async def list_page(self, prefix: str, after: str | None, limit: int) -> list[tuple[str, int, Entry | None]]:
        """A page of the record's domains: (name, current version, the cached entry if any)."""
        rows = await self._link.call(self.record.list_domains, prefix, after, limit)
        return [(name, version, self._cache.get(name)) for name, version in rows]

    def close(self) -> None:
        self.record.close()
