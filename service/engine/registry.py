"""The registry: the single owner of a domain's state in this process.

Every registered domain lives in the registry of record (`service.record`); this process keeps a
bounded cache of them in two tiers:
- device: the domain's folded tables in an engine slot, as many domains as the memory budget fits
  (`service.engine.residency`), evicted in `service.engine.eviction`'s segmented-LRU order (never a pinned
  domain, never one that a queued or running request holds: requests lease the entries they use);
- host: the folded rows of recently evicted domains in host memory, at most `host_cache_mb`,
  from which a domain returns to the device by one row write (no validation, no folding).
Anything else is read from the record, validated (format, fingerprint) and folded by the loader
(`service.engine.loader`: loader processes beside the engine process), then written to a slot and
self-tested on its golden inputs (once per distinct bundle), when a request needs it. Row writes
and read-backs are copies: they run on the event loop, in a thread only when they must wait (the
table grows, or a self-test runs). A request for a registered domain waits
while it loads; loads are de-duplicated per domain, bounded in number (`load_concurrency`) and time
(`load_timeout_s`), and run off the event loop and off the engine thread.

`sync(domain)` makes a cached domain match the record (a new version, a rollback, a delete) and
`resync()` does it for every cached domain; the follower (`service.engine.follower`) calls them when the
record announces changes. Management calls validate the bundle completely, write it to the record,
and serve it here before they answer. Per-domain asyncio locks order every change of one domain.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from model.bundle import AdapterBundle, check_domain_name
from model.safetensors_io import InvalidFileError
from model.weights import count_parameters
from service.engine.eviction import SegmentedLru
from service.engine.loader import Loader, Prepared
from service.exceptions import AdapterUnavailable, DomainUnloaded, NoPreviousVersion, UnknownDomainError
from service.metrics import Metrics
from service.record import DomainExists, RecordStore, RecordUnavailable, Version

if TYPE_CHECKING:  # the framework is imported by the engine core, after it picks the backend
    from model.engine import InferenceEngine, Slot

_log = logging.getLogger(__name__)
__all__ = [
    "AdapterUnavailable",
    "DomainExists",
    "DomainUnloaded",
    "Entry",
    "NoPreviousVersion",
    "Registry",
    "UnknownDomainError",
]
MB = 1024 * 1024
VERIFIED_KEEP = 20_000  # sha256s of bundles that passed the golden self-test here, remembered


@dataclasses.dataclass(eq=False)
class Entry:
    """One domain as this process holds it. `card` is the bundle without its weights (labels,
    preprocessing, metrics); the tables live in `slot` (device tier) or `row` (host tier)."""

    card: AdapterBundle
    version: int
    sha256: str
    size_bytes: int
    registered_at: float  # when the version was recorded
    load_ms: float  # validate + fold (in the loader) + write + self-test (or the host-to-device write)
    golden_self_test: bool
    slot: Slot | None = None
    row: np.ndarray | None = None  # the folded row, in host memory
    leases: int = 0  # requests holding it (queued or computing)
    retired: bool = False  # replaced or deleted: its slot goes once the last lease is returned
    served: int = 0  # images classified since it was cached here
    fresh: bool = False  # put on the device and not leased since: the requests that waited for it are due

    @property
    def domain(self) -> str:
        return self.card.domain

    @property
    def params(self) -> int:
        return count_parameters(self.card.config, "domain")

    @property
    def tier(self) -> str:
        return "device" if self.slot is not None else "host" if self.row is not None else "registry"


def _card(bundle: AdapterBundle) -> AdapterBundle:
    return dataclasses.replace(bundle, weights={}, golden_inputs=None, golden_logits=None)


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


@dataclasses.dataclass(frozen=True)
class Limits:
    max_resident: int | None = 512  # a cap on resident domains (None: what `device_bytes` fits)
    host_cache_bytes: int = 1024 * MB
    device_bytes: int | None = None  # the budget for resident domains' table rows (None: no budget)
    load_concurrency: int = 8
    load_timeout_s: float = 10.0
    pinned: frozenset[str] = frozenset()  # pinned by this process's settings (the record has its own)


class Registry:
    def __init__(
        self, engine: InferenceEngine, record: RecordStore, metrics: Metrics, loader: Loader, limits: Limits = Limits()
    ):
        self.engine, self.record, self.metrics, self.loader, self.limits = engine, record, metrics, loader, limits
        self._device_hits = metrics.lookups.labels("device", "hit")  # counted per request: looked up once
        self._entries: dict[str, Entry] = {}  # every cached domain
        self._device = SegmentedLru()  # the device tier's domains, in eviction order
        self._host: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._host_bytes = 0
        self._recorded: dict[str, int] = {}  # cached domains' current version in the record, as last read
        self._invalid: dict[tuple[str, int], str] = {}  # stored versions that failed validation here
        self._pinned: set[str] = set(limits.pinned)
        self._unloaded: set[str] = set()  # kept in the record but not served (OIP repository unload)
        self._locks: dict[str, asyncio.Lock] = {}
        self._loads: dict[str, asyncio.Task] = {}
        self._load_slots = asyncio.Semaphore(limits.load_concurrency)
        self._usage: collections.Counter[str] = collections.Counter()  # not yet added to the record
        self._verified: collections.OrderedDict[str, None] = collections.OrderedDict()  # sha256s self-tested here
        self.status = SyncStatus()

    # ----- reads -----------------------------------------------------------------------------

    def __contains__(self, domain: str) -> bool:
        return domain in self._entries

    def cached(self, domain: str) -> Entry | None:
        return self._entries.get(domain)

    def entries(self) -> list[Entry]:
        """Cached domains, by name."""
        return [self._entries[d] for d in sorted(self._entries)]

    def resident(self, tier: str) -> int:
        return len(self._device) if tier == "device" else len(self._host)

    @property
    def max_resident(self) -> int:
        """Domains the device tier holds: what the budget fits at the tables' current row size, under the cap."""
        limits = self.limits
        fits = max(1, limits.device_bytes // self.engine.row_bytes) if limits.device_bytes is not None else None
        if fits is None or limits.max_resident is None:
            return fits or limits.max_resident or 1
        return min(fits, limits.max_resident)

    def recorded_version(self, domain: str) -> int | None:
        return self._recorded.get(domain)

    def is_pinned(self, domain: str) -> bool:
        return domain in self._pinned

    def is_unloaded(self, domain: str) -> bool:
        return domain in self._unloaded

    def behind(self) -> list[str]:
        """Cached domains served at another version than the record's (invalid versions aside)."""
        return sorted(
            d
            for d, e in self._entries.items()
            if self._recorded.get(d, e.version) != e.version and (d, self._recorded.get(d)) not in self._invalid
        )

    # ----- requests: lease, load on demand, return ----------------------------------------------

    async def acquire(self, domain: str) -> Entry:
        """The domain on the device, leased to the caller until `release`: loaded first if needed."""
        if domain in self._unloaded:
            raise DomainUnloaded(
                f"Domain {domain!r} is unloaded: load it again (POST /v2/repository/models/{domain}/load) to serve it."
            )
        entry = self._entries.get(domain)
        if entry is not None and entry.slot is not None and not entry.retired:
            self._device_hits.inc()
            return self._lease(entry)
        self.metrics.lookups.labels("device", "miss").inc()
        for _ in range(3):
            task = self._loads.get(domain)
            if task is None:
                check_name(domain)
                task = self._loads[domain] = asyncio.create_task(self._bring(domain))
                task.add_done_callback(self._load_done)
            try:
                entry = await asyncio.wait_for(asyncio.shield(task), self.limits.load_timeout_s)
            except asyncio.TimeoutError:
                raise AdapterUnavailable(
                    f"Loading {domain!r} took longer than {self.limits.load_timeout_s} s; retry shortly."
                ) from None
            if entry.slot is not None and not entry.retired:  # else evicted or replaced meanwhile: again
                return self._lease(entry)
        raise AdapterUnavailable(f"{domain!r} kept being evicted before it could be used; retry.")

    def try_acquire(self, domains: list[str]) -> list[Entry] | None:
        """Every domain leased at once if all are on the device now, else None (nothing leased): the
        engine process answers such calls without a task of their own."""
        entries = []
        for domain in domains:
            entry = self._entries.get(domain)
            if entry is None or entry.slot is None or entry.retired or domain in self._unloaded:
                return None
            entries.append(entry)
        self._device_hits.inc(len(entries))
        return [self._lease(entry) for entry in entries]

    def _load_done(self, task: asyncio.Task) -> None:
        for domain, running in list(self._loads.items()):
            if running is task:
                del self._loads[domain]
        if not task.cancelled():
            task.exception()  # retrieved: its waiters (if any are left) got it

    def _lease(self, entry: Entry) -> Entry:
        entry.leases += 1
        entry.fresh = False
        self._device.touch(entry.domain)
        return entry

    def release(self, entries: list[Entry], images: int = 0) -> None:
        """Return the leases of `acquire`; count `images` classified per entry."""
        for entry in entries:
            entry.leases -= 1
            if images:
                if entry.served:  # its second served request (a card fetch serves none): protect it
                    self._device.promote(entry.domain, self.max_resident)
                entry.served += images
                self._usage[entry.domain] += images
            if entry.retired and entry.leases == 0 and entry.slot is not None:
                self.engine.release(entry.slot)
                entry.slot = None

    async def _bring(self, domain: str) -> Entry:
        """Put the domain on the device: from host memory if it is there, else from the record."""
        async with self._lock(domain):
            entry = self._entries.get(domain)
            if entry is not None and entry.slot is not None:
                return entry
            async with self._load_slots:
                if entry is not None and entry.row is not None:
                    self.metrics.lookups.labels("host", "hit").inc()
                    return await self._to_device(entry)
                self.metrics.lookups.labels("host", "miss").inc()
                versions = await self._call(self.record.live_versions, domain)
                if not versions:
                    raise UnknownDomainError(domain)
                loaded = await self._load_newest(domain, versions)
                if loaded is None:
                    self._recorded.pop(domain, None)
                    reasons = "; ".join(
                        f"v{v.version}: {self._invalid.get((domain, v.version), 'unreadable')}"
                        for v in reversed(versions)
                    )
                    raise AdapterUnavailable(f"No stored version of {domain!r} passes validation ({reasons}).")
                return loaded

    async def _to_device(self, entry: Entry) -> Entry:
        """Host tier -> device tier: one row write."""
        self._make_room()
        row = entry.row
        self._drop_host(entry)  # out of the host tier first: trimming it must not touch this entry
        start = time.perf_counter()
        try:
            entry.slot = await self._write(row)
        except BaseException:
            self._forget(entry)
            raise
        seconds = time.perf_counter() - start
        self.metrics.load_seconds.labels("host").observe(seconds)
        self.metrics.loads.labels("host", "ok").inc()
        entry.fresh = True
        self._device.add(entry.domain)
        self._gauges()
        return entry

    async def _load_newest(
        self, domain: str, versions: list[Version], keep: Entry | None = None, to_host: bool = False
    ) -> Entry | None:
        """Hold the lock. Load the newest valid live version onto the device (unless `keep` is it), or
        with `to_host` into the host tier (through a spare slot: validated and self-tested alike)."""
        self._recorded[domain] = versions[-1].version
        for v in reversed(versions):
            if keep is not None and keep.version == v.version:
                return keep
            if (domain, v.version) in self._invalid:
                continue
            try:
                data = await self._call(self.record.read, domain, v.version)
            except KeyError:  # dropped since the listing: the next announcement brings the rest
                continue
            if not to_host:
                self._make_room()
            try:
                entry = await self._load(data, domain, v.version, v.created_at)
            except InvalidFileError as exc:
                self._invalid[(domain, v.version)] = str(exc)
                self.metrics.loads.labels("registry", "invalid").inc()
                _log.error("stored bundle %s v%d is unusable, skipping it: %s", domain, v.version, exc)
                continue
            if to_host:
                slot, entry.slot = entry.slot, None
                try:
                    entry.row = self.engine.read_back(slot)
                finally:
                    self.engine.release(slot)
                self._entries[domain] = entry
                self._host[domain] = None
                self._host_bytes += entry.row.nbytes
                self._gauges()
            else:
                self._publish(entry)
            return entry
        return None

    async def _load(
        self, data: bytes, domain: str, version: int, created_at: float, prepared: Prepared | None = None
    ) -> Entry:
        """Validate and fold in the loader (unless `prepared` is given), then write and self-test on the engine.

        The golden self-test runs once per distinct bundle (by sha256) in this process: the same
        bytes on the same engine give the same result when the domain comes back after an eviction."""
        start = time.perf_counter()
        prepared = prepared or await self.loader.prepare(data, domain)
        card, sha = prepared.card, prepared.sha256
        slot = await self._write(prepared.row, None if sha in self._verified else card)
        self._verified[sha] = None
        self._verified.move_to_end(sha)
        if len(self._verified) > VERIFIED_KEEP:
            self._verified.popitem(last=False)
        seconds = time.perf_counter() - start
        self.metrics.load_seconds.labels("registry").observe(seconds)
        self.metrics.loads.labels("registry", "ok").inc()
        return Entry(
            _card(card),
            version,
            sha,
            prepared.size_bytes,
            created_at,
            seconds * 1000,
            golden_self_test=card.golden_inputs is not None,
            slot=slot,
        )

    async def _write(self, row: np.ndarray, golden: AdapterBundle | None = None) -> Slot:
        """The row in a free slot: written here when that is a copy, else in a thread."""
        slot = self.engine.load_row(row, wait=False) if golden is None else None
        return slot if slot is not None else await asyncio.to_thread(self.engine.load_row, row, golden)

    def _publish(self, entry: Entry) -> None:
        """Serve `entry` (on the device) for its domain; the entry it replaces retires."""
        old = self._entries.get(entry.domain)
        if old is not None and old is not entry:
            self._retire(old)
        self._entries[entry.domain] = entry
        entry.fresh = True
        self._device.add(entry.domain)
        self._gauges()

    def _retire(self, entry: Entry) -> None:
        """Stop using `entry`: its slot goes now, or when the last request holding it is done."""
        entry.retired = True
        self._device.discard(entry.domain)
        self._drop_host(entry)
        if entry.slot is not None and entry.leases == 0:
            self.engine.release(entry.slot)
            entry.slot = None
        self._forget(entry)
        self._gauges()

    # ----- eviction ----------------------------------------------------------------------------

    def _make_room(self) -> None:
        """Evict device entries in eviction order (`service.engine.eviction`) until a slot is free under `max_resident`.

        Never one that a request holds or that is pinned, and one just loaded for the requests that
        waited for it only when nothing else can go (else concurrent cold loads evict each other's
        domains before their requests get them). Their rows are copied to host memory when the host
        tier has room (`host_cache_mb`)."""
        while len(self._device) >= self.max_resident:
            victim = fallback = None
            for domain in self._device:
                entry = self._entries[domain]
                if entry.leases or domain in self._pinned:
                    continue
                if not entry.fresh:
                    victim = entry
                    break
                fallback = fallback or entry
            victim = victim or fallback
            if victim is None:
                _log.warning(
                    "every resident domain is pinned or in use: serving more than the %d that fit", self.max_resident
                )
                return
            self._evict(victim)

    def _evict(self, entry: Entry) -> None:
        """Device -> host (a row copy), or out of this process's cache when the host tier is off."""
        slot, entry.slot = entry.slot, None
        self._device.discard(entry.domain)
        self.metrics.evictions.labels("device").inc()
        try:
            if self.limits.host_cache_bytes > 0 and not entry.retired:
                entry.row = self.engine.read_back(slot)
                self._host[entry.domain] = None
                self._host_bytes += entry.row.nbytes
        finally:
            self.engine.release(slot)
        if entry.row is None:
            self._forget(entry)
        self._trim_host()
        self._gauges()

    def _forget(self, entry: Entry) -> None:
        """`entry` leaves this process's cache (its domain stays in the record)."""
        if self._entries.get(entry.domain) is entry:
            del self._entries[entry.domain]
            self._recorded.pop(entry.domain, None)

    def _drop_host(self, entry: Entry) -> None:
        if entry.domain in self._host and entry.row is not None:
            del self._host[entry.domain]
            self._host_bytes -= entry.row.nbytes
        entry.row = None

    def _trim_host(self) -> None:
        while self._host_bytes > self.limits.host_cache_bytes and self._host:
            entry = self._entries[next(iter(self._host))]
            self._drop_host(entry)
            self._forget(entry)
            self.metrics.evictions.labels("host").inc()

    def _gauges(self) -> None:
        self.metrics.resident.labels("device").set(len(self._device))
        self.metrics.resident.labels("host").set(len(self._host))
        self.metrics.host_bytes.set(self._host_bytes)

    # ----- following the record --------------------------------------------------------------

    def _lock(self, domain: str) -> asyncio.Lock:
        lock = self._locks.get(domain)
        if lock is None:
            if len(self._locks) > 4 * (len(self._entries) + 64):  # keep the table bounded
                self._locks = {d: lk for d, lk in self._locks.items() if lk.locked() or d in self._entries}
            lock = self._locks[domain] = asyncio.Lock()
        return lock

    async def _call(self, fn: Callable, *args):
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

    async def flush_usage(self) -> None:
        """Add the images classified since the last flush to the record's usage counts."""
        usage, self._usage = self._usage, collections.Counter()
        try:
            await self._call(self.record.add_usage, dict(usage))
        except RecordUnavailable:
            self._usage.update(usage)
            raise

    async def resync(self) -> None:
        """Make every cached domain match the record; refresh the pins; record usage counts."""
        await self.refresh_flags()
        await self.flush_usage()
        heads = await self._call(self.record.heads, sorted(self._entries))
        for domain in sorted(set(self._entries) | set(self._recorded)):
            entry = self._entries.get(domain)
            if heads.get(domain) != self._recorded.get(domain) or heads.get(domain) != getattr(entry, "version", None):
                await self.sync(domain)
        self.status.synced_once = True

    async def sync(self, domain: str) -> None:
        """A change of `domain` in the record: follow it if the domain is cached here (else nothing to do)."""
        async with self._lock(domain):
            await self.refresh_flags()  # a pin or an unload is announced like any change
            if domain not in self._entries and domain not in self._recorded:
                return
            versions = await self._call(self.record.live_versions, domain)
            entry = self._entries.get(domain)
            if not versions:
                if entry is not None:
                    self._retire(entry)
                self._recorded.pop(domain, None)
                return
            if entry is not None and entry.version == versions[-1].version:
                self._recorded[domain] = versions[-1].version
                return
            if entry is None or entry.slot is None:  # not cached or in the host tier: load on demand
                if entry is not None:
                    self._retire(entry)
                self._recorded.pop(domain, None)
                return
            await self._load_newest(domain, versions, keep=entry)

    async def warm(self, domains: list[str], ranked: bool = False) -> int:
        """Load `domains` onto the device (start-up: pinned ones, then the most used). Returns how many
        are resident afterwards; failures are logged, not raised. `ranked`: the domains come most used
        first, and are protected from eviction in that order (as if each had served again)."""
        loaded = 0
        for domain in domains:
            if domain not in self._pinned and len(self._device) >= self.max_resident:
                break
            try:
                self.release([await self.acquire(domain)])
                loaded += 1
            except (UnknownDomainError, AdapterUnavailable, RecordUnavailable) as exc:
                _log.warning("could not warm %s: %s", domain, exc)
        if ranked:
            for domain in reversed(domains):  # the most used last: the most recent of the protected segment
                self._device.promote(domain, self.max_resident)
        return loaded

    async def warm_host(self, domains: list[str]) -> int:
        """Fill the host tier with `domains` (most used first) while it has room, so that their first
        requests cost a row copy: on a CPU host it is the same memory as the device tier, which the
        budget holds for domains. Returns how many were added; failures are logged, not raised."""
        added = 0
        for domain in domains:
            if self._host_bytes + self.engine.row_bytes > self.limits.host_cache_bytes:
                break
            if domain in self._entries or domain in self._unloaded:
                continue
            try:
                async with self._lock(domain), self._load_slots:
                    if domain in self._entries:
                        continue
                    versions = await self._call(self.record.live_versions, domain)
                    if versions and await self._load_newest(domain, versions, to_host=True) is not None:
                        added += 1
            except (AdapterUnavailable, RecordUnavailable) as exc:
                _log.warning("could not warm %s into host memory: %s", domain, exc)
        self._trim_host()
        return added

    async def set_flag(self, domain: str, flag: str, on: bool) -> None:
        """Set a flag in the record (for every replica) and follow it here at once."""
        await self._call(self.record.set_flag, domain, flag, on)
        await self.refresh_flags()

    async def unload(self, domain: str) -> None:
        """Stop serving a registered domain everywhere, keeping it in the record."""
        if not await self._call(self.record.live_versions, check_name(domain)):
            raise UnknownDomainError(domain)
        await self.set_flag(domain, "unloaded", True)

    async def reload(self, domain: str) -> Entry:
        """Serve an unloaded domain again (its current version)."""
        if not await self._call(self.record.live_versions, check_name(domain)):
            raise UnknownDomainError(domain)
        await self.set_flag(domain, "unloaded", False)
        return await self.describe(domain)

    def pinned_domains(self) -> list[str]:
        return sorted(self._pinned)

    async def refresh_flags(self) -> None:
        self._pinned = set(self.limits.pinned) | await self._call(self.record.flagged, "pinned")
        self._unloaded = await self._call(self.record.flagged, "unloaded")
        for domain in self._unloaded & set(self._entries):
            self._retire(self._entries[domain])

    # ----- management ------------------------------------------------------------------------

    async def register(
        self, data: bytes, replace: bool = False, domain: str | None = None, pin: bool | None = None
    ) -> Entry:
        """Validate a bundle completely, record it durably, serve it here; raise `InvalidFileError`,
        `DomainExists` or `RecordUnavailable`."""
        if domain is not None:
            check_domain_name(domain)
        prepared = await self.loader.prepare(data, domain)
        bundle = prepared.card
        async with self._lock(bundle.domain):
            cached = self._entries.get(bundle.domain)
            if not replace and cached is not None:
                raise DomainExists(
                    f"Domain {bundle.domain!r} exists (version {cached.version}); "
                    "send replace=true to upload a new version."
                )
            self._make_room()
            entry = await self._load(data, bundle.domain, 0, 0.0, prepared)  # the self-test
            try:
                version = await self._call(self.record.add, bundle.domain, data, replace)
                if pin is not None:
                    await self.set_flag(bundle.domain, "pinned", pin)
            except BaseException:
                self.engine.release(entry.slot)
                raise
            entry = dataclasses.replace(entry, version=version.version, registered_at=version.created_at)
            self._recorded[bundle.domain] = max(version.version, self._recorded.get(bundle.domain, 0))
            cached = self._entries.get(bundle.domain)
            if cached is None or cached.version < version.version:
                self._publish(entry)
            else:  # a newer version (another replica's) is already served here
                self.engine.release(entry.slot)
                entry = cached
            return entry

    async def describe(self, domain: str) -> Entry:
        """The cached entry; a domain not cached here is loaded first (it describes what would serve)."""
        entry = self._entries.get(check_name(domain))
        if entry is None:
            entry = await self.acquire(domain)
            self.release([entry])
        return entry

    async def delete(self, domain: str) -> tuple[int, Entry | None]:
        """Drop every version from the record and stop serving the domain here. Returns the version
        that was current and the cached entry, if this process had one (nothing is loaded for this)."""
        async with self._lock(check_name(domain)):
            versions = await self._call(self.record.live_versions, domain)
            if not versions or not await self._call(self.record.delete, domain):
                raise UnknownDomainError(domain)
            self._pinned.discard(domain)
            self._unloaded.discard(domain)
            entry = self._entries.get(domain)
            if entry is not None:
                self._retire(entry)
            self._recorded.pop(domain, None)
            return versions[-1].version, entry

    async def rollback(self, domain: str) -> Entry:
        """Serve the newest valid version older than the record's current one; drop the newer ones."""
        async with self._lock(check_name(domain)):
            versions = await self._call(self.record.live_versions, domain)
            if not versions:
                raise UnknownDomainError(domain)
            for v in reversed(versions[:-1]):
                try:
                    data = await self._call(self.record.read, domain, v.version)
                    self._make_room()
                    entry = await self._load(data, domain, v.version, v.created_at)
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

    async def list_page(self, prefix: str, after: str | None, limit: int) -> list[tuple[str, int, Entry | None]]:
        """A page of the record's domains: (name, current version, the cached entry if any)."""
        rows = await self._call(self.record.list_domains, prefix, after, limit)
        return [(name, version, self._entries.get(name)) for name, version in rows]

    def close(self) -> None:
        self.record.close()


def check_name(domain: str) -> str:
    """A name that cannot be a domain is simply unknown (never a path or a query)."""
    try:
        return check_domain_name(domain)
    except InvalidFileError:
        raise UnknownDomainError(domain) from None
