"""The registry: the single owner of a domain's state in this process.

For each served domain: name -> (version, bundle, engine slot, counters). The registry of record
(`service.record`) says which versions exist; this process is a cache of it. `sync(domain)` makes
one domain match the record (load the newest valid live version, or unload it), and `resync()`
does it for every domain; the follower (`service.follower`) calls them when the record announces
changes. Management calls validate the bundle completely (including the golden self-test on the
engine), write it to the record, and serve it here before they answer.

Per-domain asyncio locks order every change of one domain (management and sync alike); domains do
not wait for each other. Reads (`resolve`, `entries`) are plain dictionary lookups, safe from any
thread: the engine thread resolves names at the moment a batch runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time

from model.backbone import Backbone
from model.bundle import AdapterBundle, check_domain_name, load_bundle
from model.engine import InferenceEngine, Slot
from model.safetensors_io import InvalidFileError
from model.weights import count_parameters
from service.metrics import Metrics
from service.record import DomainExists, RecordStore, RecordUnavailable, Version

_log = logging.getLogger(__name__)
__all__ = ["DomainExists", "NoPreviousVersion", "Registry", "Served", "UnknownDomainError"]


class UnknownDomainError(KeyError):
    """The domain is not registered (or not visible to the caller)."""

    def __init__(self, domain: str):
        super().__init__(domain)
        self.domain = domain

    def __str__(self) -> str:
        return f"Unknown domain {self.domain!r}"


class NoPreviousVersion(Exception):
    """Rollback asked for a domain that has no usable older version."""


@dataclasses.dataclass(frozen=True)
class Served:
    """One domain as this process serves it."""

    bundle: AdapterBundle
    version: int
    slot: Slot
    sha256: str
    size_bytes: int
    registered_at: float  # when the version was recorded
    load_ms: float  # validate + fold + self-test here

    @property
    def domain(self) -> str:
        return self.bundle.domain

    @property
    def params(self) -> int:
        return count_parameters(self.bundle.config, "domain")


@dataclasses.dataclass
class SyncStatus:
    """How this process stands with the registry of record (for /readyz and metrics)."""

    connected: bool = False
    synced_once: bool = False
    last_ok: float = 0.0  # monotonic time of the last successful contact
    last_ok_wall: float = 0.0
    errors: int = 0
    last_error: str | None = None


class Registry:
    def __init__(self, backbone: Backbone, engine: InferenceEngine, record: RecordStore, metrics: Metrics):
        self.backbone, self.engine, self.record, self.metrics = backbone, engine, record, metrics
        self._served: dict[str, Served] = {}
        self._recorded: dict[str, int] = {}  # each domain's current version in the record, as last read
        self._invalid: set[tuple[str, int]] = set()  # stored versions that failed validation here
        self._locks: dict[str, asyncio.Lock] = {}
        self.counts: dict[str, int] = {}  # images classified per domain since start
        self.status = SyncStatus()

    # ----- reads (any thread) ----------------------------------------------------------------

    def resolve(self, domain: str) -> Served:
        try:
            return self._served[domain]
        except KeyError:
            raise UnknownDomainError(domain) from None

    def __contains__(self, domain: str) -> bool:
        return domain in self._served

    def entries(self) -> list[Served]:
        return [self._served[d] for d in sorted(self._served)]

    def recorded_version(self, domain: str) -> int | None:
        return self._recorded.get(domain)

    def behind(self) -> list[str]:
        """Domains whose served version differs from the record's current one (invalid versions aside)."""
        names = set(self._served) | set(self._recorded)
        return sorted(d for d in names if self._recorded.get(d) != getattr(self._served.get(d), "version", None)
                      and (d, self._recorded.get(d)) not in self._invalid)

    async def lookup(self, domain: str) -> Served:
        """`resolve`, and on a miss ask the record first: a domain registered through another worker or
        replica is served at once, not refused until the change feed brings it."""
        served = self._served.get(domain)
        if served is not None:
            return served
        check_name(domain)
        await self.sync(domain)
        return self.resolve(domain)

    # ----- following the record --------------------------------------------------------------

    def _lock(self, domain: str) -> asyncio.Lock:
        return self._locks.setdefault(domain, asyncio.Lock())

    async def _call(self, fn, *args):
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

    async def resync(self) -> None:
        """Make every domain match the record."""
        heads = await self._call(self.record.heads)
        for domain in sorted(set(heads) | set(self._served) | set(self._recorded)):
            served = self._served.get(domain)
            if heads.get(domain) != self._recorded.get(domain) or heads.get(domain) != getattr(served, "version", None):
                await self.sync(domain)
        self.status.synced_once = True

    async def sync(self, domain: str) -> None:
        """Serve the domain's newest valid live version from the record (or stop serving it)."""
        async with self._lock(domain):
            versions = await self._call(self.record.live_versions, domain)
            await self._apply(domain, versions)

    async def _apply(self, domain: str, versions: list[Version]) -> None:
        """Hold the domain's lock. Load the newest valid version unless it is already served."""
        if versions:
            self._recorded[domain] = versions[-1].version
        else:
            self._recorded.pop(domain, None)
        served = self._served.get(domain)
        for v in reversed(versions):
            if served is not None and served.version == v.version:
                return
            if (domain, v.version) in self._invalid:
                continue
            try:
                data = await self._call(self.record.read, domain, v.version)
                entry = await asyncio.to_thread(self._load, data, domain, v.version, v.created_at)
            except KeyError:  # dropped since the listing: the next announcement brings the rest
                continue
            except InvalidFileError as exc:
                self._invalid.add((domain, v.version))
                self.metrics.sync_errors.labels("invalid_bundle").inc()
                _log.error("stored bundle %s v%d is unusable, skipping it: %s", domain, v.version, exc)
                continue
            self._publish(entry)
            return
        if served is not None:
            self._unpublish(domain)

    def _load(self, data: bytes, domain: str, version: int, created_at: float,
              bundle: AdapterBundle | None = None) -> Served:
        """Validate (unless `bundle` is given, already validated), fold and self-test on the engine."""
        start = time.perf_counter()
        bundle = bundle or load_bundle(data, self.backbone, domain=domain)
        slot = self.engine.load(bundle)
        load_ms = (time.perf_counter() - start) * 1000
        self.metrics.load_seconds.observe(load_ms / 1000)
        return Served(bundle, version, slot, hashlib.sha256(data).hexdigest(), len(data), created_at, load_ms)

    def _publish(self, entry: Served) -> None:
        old = self._served.get(entry.domain)
        self._served[entry.domain] = entry
        if old is not None:
            self.engine.release(old.slot)  # batches that hold it finish on it
        self.metrics.adapters.set(len(self._served))

    def _unpublish(self, domain: str) -> Served:
        entry = self._served.pop(domain)
        self.engine.release(entry.slot)
        self.metrics.adapters.set(len(self._served))
        return entry

    # ----- management ------------------------------------------------------------------------

    async def register(self, data: bytes, replace: bool = False, domain: str | None = None) -> Served:
        """Validate a bundle completely, record it durably, serve it here; raise `InvalidFileError`,
        `DomainExists` or `RecordUnavailable`."""
        if domain is not None:
            check_domain_name(domain)
        bundle = await asyncio.to_thread(load_bundle, data, self.backbone, domain)
        async with self._lock(bundle.domain):
            if not replace and bundle.domain in self._served:
                current = self._served[bundle.domain].version
                raise DomainExists(f"Domain {bundle.domain!r} exists (version {current}); "
                                   "send replace=true to upload a new version.")
            entry = await asyncio.to_thread(self._load, data, bundle.domain, 0, 0.0, bundle)  # the self-test
            try:
                version = await self._call(self.record.add, bundle.domain, data, replace)
            except BaseException:
                self.engine.release(entry.slot)
                raise
            entry = dataclasses.replace(entry, version=version.version, registered_at=version.created_at)
            self._recorded[bundle.domain] = max(version.version, self._recorded.get(bundle.domain, 0))
            served = self._served.get(bundle.domain)
            if served is None or served.version < version.version:
                self._publish(entry)
            else:  # a newer version (another replica's) is already served here
                self.engine.release(entry.slot)
            return entry

    async def delete(self, domain: str) -> Served:
        """Drop every version from the record and stop serving the domain here."""
        check_name(domain)
        async with self._lock(domain):
            if domain not in self._served:  # registered elsewhere and not loaded here yet
                await self._apply(domain, await self._call(self.record.live_versions, domain))
            entry = self.resolve(domain)
            if not await self._call(self.record.delete, domain):  # deleted elsewhere meanwhile
                await self._apply(domain, [])
                raise UnknownDomainError(domain)
            self._recorded.pop(domain, None)
            return self._unpublish(domain)

    async def rollback(self, domain: str) -> Served:
        """Serve the newest valid version older than the record's current one; drop the newer ones."""
        check_name(domain)
        async with self._lock(domain):
            versions = await self._call(self.record.live_versions, domain)
            if not versions:
                await self._apply(domain, versions)
                raise UnknownDomainError(domain)
            for v in reversed(versions[:-1]):
                try:
                    data = await self._call(self.record.read, domain, v.version)
                    entry = await asyncio.to_thread(self._load, data, domain, v.version, v.created_at)
                except (KeyError, InvalidFileError) as exc:
                    _log.error("stored bundle %s v%d is unusable, skipping it: %s", domain, v.version, exc)
                    continue
                try:
                    await self._call(self.record.drop_after, domain, v.version)
                except BaseException:
                    self.engine.release(entry.slot)
                    raise
                self._recorded[domain] = v.version
                self._publish(entry)
                return entry
            raise NoPreviousVersion(f"Domain {domain!r} has no usable version before {versions[-1].version}.")

    def close(self) -> None:
        self.record.close()


def check_name(domain: str) -> str:
    """A name that cannot be a domain is simply unknown (never a path or a query)."""
    try:
        return check_domain_name(domain)
    except InvalidFileError:
        raise UnknownDomainError(domain) from None
