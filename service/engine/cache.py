"""The cache: which domains this process holds, in which tier, and who is using them.

Every registered domain lives in the registry of record (`service.record`); this process keeps a
bounded cache of them in two tiers:
- device: the domain's folded tables in an engine slot, as many domains as the memory budget fits
  (`service.engine.residency`), evicted in `service.engine.eviction`'s segmented-LRU order (never a pinned
  domain, never one that a queued or running request holds: requests lease the entries they use);
- host: the folded rows of recently evicted domains in host memory, at most `host_cache_mb`,
  from which a domain returns to the device by one row write (no validation, no folding).
`Cache` is the one owner of that state, and of what decides it: the flags (pinned: never evicted;
unloaded: never leased), each held domain's current version in the record as last read (it goes with
the entry) and the limits. Loads (`service.engine.loads`), following the record
(`service.engine.sync`) and the management calls (`service.engine.registry`) change the tiers through
its methods, and set the flags and versions (a set each, a dict) as they read them from the record;
`DomainLocks` orders every change of one domain among them.

Runs in the engine process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np

from model.bundle import AdapterBundle
from model.weights import count_parameters
from service.engine.eviction import SegmentedLru
from service.metrics import Metrics

if TYPE_CHECKING:  # the framework is imported by the engine core, after it picks the backend
    from model.engine import InferenceEngine, Slot

_log = logging.getLogger(__name__)
MB = 1024 * 1024


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

    @property
    def domain(self) -> str:
        return self.card.domain

    @property
    def params(self) -> int:
        return count_parameters(self.card.config, "domain")

    @property
    def tier(self) -> str:
        return "device" if self.slot is not None else "host" if self.row is not None else "registry"


@dataclasses.dataclass(frozen=True)
class Limits:
    """The registry's limits: the tiers' budgets (the cache's), the loads' bounds, the settings' pins."""

    max_resident: int | None = 512  # a cap on resident domains (None: what `device_bytes` fits)
    host_cache_bytes: int = 1024 * MB
    device_bytes: int | None = None  # the budget for resident domains' table rows (None: no budget)
    load_concurrency: int = 8
    load_timeout_s: float = 10.0
    pinned: frozenset[str] = frozenset()  # pinned by this process's settings (the record has its own)


class Cache:
    """The cached domains in their two tiers, their leases and flags, and the limits (the loads read theirs here)."""

    def __init__(self, engine: InferenceEngine, metrics: Metrics, limits: Limits):
        self.engine, self.metrics, self.limits = engine, metrics, limits
        self._device_hits = metrics.lookups.labels("device", "hit")  # counted per request: looked up once
        self._tally = metrics.tally
        self._entries: dict[str, Entry] = {}  # every cached domain
        self._device = SegmentedLru()  # the device tier's domains, in eviction order
        self._host: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._host_bytes = 0
        # cached domains' current version in the record, as last read (or being loaded): set by whoever
        # reads the record's versions, dropped with the entry
        self.recorded: dict[str, int] = {}
        self.pinned: set[str] = set(limits.pinned)  # the settings' and the record's (`Sync.refresh_flags`)
        self.unloaded: set[str] = set()  # kept in the record but not served (OIP repository unload)

    # ----- reads -----------------------------------------------------------------------------

    def __contains__(self, domain: str) -> bool:
        return domain in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, domain: str) -> Entry | None:
        return self._entries.get(domain)

    def domains(self) -> list[str]:
        """Cached domains' names, sorted."""
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        """Cached domains, by name."""
        return [self._entries[d] for d in sorted(self._entries)]

    def resident(self, tier: str) -> int:
        return len(self._device) if tier == "device" else len(self._host)

    def host_has_room(self) -> bool:
        """Whether one more row fits in the host tier."""
        return self._host_bytes + self.engine.row_bytes <= self.limits.host_cache_bytes

    @property
    def max_resident(self) -> int:
        """Domains the device tier holds: what the budget fits at the tables' current row size, under the cap."""
        limits = self.limits
        fits = max(1, limits.device_bytes // self.engine.row_bytes) if limits.device_bytes is not None else None
        if fits is None or limits.max_resident is None:
            return fits or limits.max_resident or 1
        return min(fits, limits.max_resident)

    # ----- leases ----------------------------------------------------------------------------

    def try_acquire(self, domains: list[str]) -> list[Entry] | None:
        """Every domain leased at once if all are on the device now, else None (nothing leased): the
        engine process answers such calls without a task of their own."""
        entries = []
        for domain in domains:
            entry = self._entries.get(domain)
            if entry is None or entry.slot is None or entry.retired or domain in self.unloaded:
                return None
            entries.append(entry)
        self._tally.add(self._device_hits, len(entries))
        return [self.lease(entry) for entry in entries]

    def lease(self, entry: Entry) -> Entry:
        entry.leases += 1
        self._device.touch(entry.domain)
        return entry

    def release(self, entries: list[Entry], images: int = 0) -> None:
        """Return the leases of `lease`; count `images` classified per entry."""
        for entry in entries:
            entry.leases -= 1
            if images:
                if entry.served:  # its second served request (a card fetch serves none): protect it
                    self.promote(entry.domain)
                entry.served += images
            if entry.retired and entry.leases == 0 and entry.slot is not None:
                self.engine.release(entry.slot)
                entry.slot = None

    def promote(self, domain: str) -> None:
        """`domain` served again: into the device tier's protected segment (`SegmentedLru.promote`)."""
        self._device.promote(domain, self.max_resident)

    # ----- entering and leaving ----------------------------------------------------------------

    def publish(self, entry: Entry) -> None:
        """Serve `entry` (on the device) for its domain; the entry it replaces retires."""
        old = self._entries.get(entry.domain)
        if old is not None and old is not entry:
            self.retire(old)
        self._entries[entry.domain] = entry
        self._device.add(entry.domain)
        self._gauges()

    def to_device(self, entry: Entry, slot: Slot) -> None:
        """`entry`, out of the host tier (`take_row`), is on the device again in `slot`."""
        entry.slot = slot
        self._device.add(entry.domain)
        self._gauges()

    def keep_on_host(self, entry: Entry) -> None:
        """Cache `entry`, whose `row` is set and which has no slot, in the host tier (not trimmed here)."""
        self._entries[entry.domain] = entry
        self._host[entry.domain] = None
        self._host_bytes += entry.row.nbytes
        self._gauges()

    def take_row(self, entry: Entry) -> np.ndarray:
        """`entry`'s row, out of the host tier first (trimming it must not touch this entry)."""
        row = entry.row
        self._drop_host(entry)
        return row

    def retire(self, entry: Entry) -> None:
        """Stop using `entry`: its slot goes now, or when the last request holding it is done."""
        entry.retired = True
        self._device.discard(entry.domain)
        self._drop_host(entry)
        if entry.slot is not None and entry.leases == 0:
            self.engine.release(entry.slot)
            entry.slot = None
        self.forget(entry)
        self._gauges()

    def forget(self, entry: Entry) -> None:
        """`entry` leaves this process's cache (its domain stays in the record)."""
        if self._entries.get(entry.domain) is entry:
            del self._entries[entry.domain]
            self.recorded.pop(entry.domain, None)

    # ----- eviction ----------------------------------------------------------------------------

    def make_room(self) -> None:
        """Evict device entries in eviction order (`service.engine.eviction`) until a slot is free under `max_resident`.

        Never one that a request holds (requests waiting for a cold load hold theirs from the moment
        it is published, `Loads.acquire`) or that is pinned. Their rows are copied to host memory when
        the host tier has room (`host_cache_mb`)."""
        while len(self._device) >= self.max_resident:
            victim = next(
                (self._entries[d] for d in self._device if not self._entries[d].leases and d not in self.pinned), None
            )
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
            self.forget(entry)
        self.trim_host()
        self._gauges()

    def _drop_host(self, entry: Entry) -> None:
        if entry.domain in self._host and entry.row is not None:
            del self._host[entry.domain]
            self._host_bytes -= entry.row.nbytes
        entry.row = None

    def trim_host(self) -> None:
        """Drop the host tier's oldest rows until it is within `host_cache_bytes`."""
        while self._host_bytes > self.limits.host_cache_bytes and self._host:
            entry = self._entries[next(iter(self._host))]
            self._drop_host(entry)
            self.forget(entry)
            self.metrics.evictions.labels("host").inc()

    def _gauges(self) -> None:
        self.metrics.resident.labels("device").set(len(self._device))
        self.metrics.resident.labels("host").set(len(self._host))
        self.metrics.host_bytes.set(self._host_bytes)


class DomainLocks:
    """Per-domain asyncio locks, which order every change of one domain (loads, syncs, management)."""

    def __init__(self, cache: Cache):
        self._cache = cache
        self._locks: dict[str, asyncio.Lock] = {}

    def __call__(self, domain: str) -> asyncio.Lock:
        lock = self._locks.get(domain)
        if lock is None:
            if len(self._locks) > 4 * (len(self._cache) + 64):  # keep the table bounded
                self._locks = {d: lk for d, lk in self._locks.items() if lk.locked() or d in self._cache}
            lock = self._locks[domain] = asyncio.Lock()
        return lock
