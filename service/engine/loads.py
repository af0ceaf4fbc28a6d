"""Loads: what puts a domain in the cache (`service.engine.cache`) when a request needs it, or at start-up.

A domain in the host tier returns to the device by one row write. Anything else is read from the
record, validated (format, fingerprint) and folded by the loader (`service.engine.loader`: loader
processes beside the engine process), then written to a slot and self-tested on its golden inputs
(once per distinct bundle), when a request needs it. Row writes and read-backs are copies: they run
on the event loop, in a thread only when they must wait (the table grows, or a self-test runs). A
request for a registered domain waits while it loads; loads are de-duplicated per domain, bounded in
number (`load_concurrency`) and time (`load_timeout_s`), and run off the event loop and off the
engine thread. `Loads` owns what loading needs: the loads in flight, their bound, the stored
versions that failed validation here and the bundles that passed the self-test.

Runs in the engine process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from model.bundle import AdapterBundle, check_domain_name
from model.safetensors_io import InvalidFileError
from service.engine.cache import Cache, DomainLocks, Entry
from service.engine.loader import Loader, Prepared
from service.exceptions import AdapterUnavailable, DomainUnloaded, UnknownDomainError
from service.metrics import Metrics
from service.record import RecordStore, RecordUnavailable, Version

if TYPE_CHECKING:  # the framework is imported by the engine core, after it picks the backend
    from model.engine import InferenceEngine, Slot

_log = logging.getLogger(__name__)
VERIFIED_KEEP = 20_000  # sha256s of bundles that passed the golden self-test here, remembered
RecordCall = Callable[..., Awaitable[Any]]  # a blocking record call run in a thread (`RecordLink.call`)


def check_name(domain: str) -> str:
    """A name that cannot be a domain is simply unknown (never a path or a query)."""
    try:
        return check_domain_name(domain)
    except InvalidFileError:
        raise UnknownDomainError(domain) from None


@dataclasses.dataclass(eq=False)
class _Load:
    """One domain's load in flight: the requests waiting for it, and those it took a lease for."""

    task: asyncio.Task | None = None
    waiting: set[object] = dataclasses.field(default_factory=set)
    granted: set[object] = dataclasses.field(default_factory=set)

    def leave(self, waiter: object) -> bool:
        """`waiter` stops waiting; whether a lease was taken for it."""
        self.waiting.discard(waiter)
        if waiter in self.granted:
            self.granted.discard(waiter)
            return True
        return False


def _card(bundle: AdapterBundle) -> AdapterBundle:
    return dataclasses.replace(bundle, weights={}, golden_inputs=None, golden_logits=None)


class Loads:
    """Cold loads (de-duplicated, bounded) and warm-up into `cache`; record calls go through `call`."""

    def __init__(
        self,
        engine: InferenceEngine,
        record: RecordStore,
        metrics: Metrics,
        loader: Loader,
        cache: Cache,
        locks: DomainLocks,
        call: RecordCall,
    ):
        self.engine, self.record, self.metrics, self.loader = engine, record, metrics, loader
        self.cache, self._lock, self._call = cache, locks, call
        self._loads: dict[str, _Load] = {}
        self._load_slots = asyncio.Semaphore(cache.limits.load_concurrency)
        self._invalid: dict[tuple[str, int], str] = {}  # stored versions that failed validation here
        self._verified: collections.OrderedDict[str, None] = collections.OrderedDict()  # sha256s self-tested here

    def is_invalid(self, domain: str, version: int | None) -> bool:
        """Whether that stored version failed validation here."""
        return (domain, version) in self._invalid

    # ----- requests: load on demand ------------------------------------------------------------

    async def acquire(self, domain: str) -> Entry:
        """The domain on the device, leased to the caller until `Cache.release`: loaded first if needed."""
        if domain in self.cache.unloaded:
            raise DomainUnloaded(
                f"Domain {domain!r} is unloaded: load it again (POST /v2/repository/models/{domain}/load) to serve it."
            )
        leased = self.cache.try_acquire([domain])
        if leased is not None:
            return leased[0]
        self.metrics.lookups.labels("device", "miss").inc()
        for _ in range(3):
            load = self._loads.get(domain)
            if load is None:
                check_name(domain)
                load = self._loads[domain] = _Load()
                load.task = asyncio.create_task(self._bring_for(domain, load))
                load.task.add_done_callback(self._load_done)
            waiter = object()
            load.waiting.add(waiter)
            try:
                entry = await asyncio.wait_for(asyncio.shield(load.task), self.cache.limits.load_timeout_s)
            except BaseException as exc:
                if load.leave(waiter):  # a lease was taken for this request, which is leaving
                    self.cache.release([load.task.result()])
                if isinstance(exc, asyncio.TimeoutError):
                    raise AdapterUnavailable(
                        f"Loading {domain!r} took longer than {self.cache.limits.load_timeout_s} s; retry shortly."
                    ) from None
                raise
            if load.leave(waiter):
                return entry
            if entry.slot is not None and not entry.retired:  # loaded before this request joined
                return self.cache.lease(entry)
        raise AdapterUnavailable(f"{domain!r} kept being evicted before it could be used; retry.")

    async def _bring_for(self, domain: str, load: _Load) -> Entry:
        """`_bring`, then a lease for each request waiting for it, taken before anything else runs:
        concurrent cold loads of more domains than fit cannot evict a domain before its requests
        get it."""
        entry = await self._bring(domain)
        if entry.slot is not None and not entry.retired:
            for _ in load.waiting:
                self.cache.lease(entry)
            load.granted = set(load.waiting)
        return entry

    def _load_done(self, task: asyncio.Task) -> None:
        for domain, running in list(self._loads.items()):
            if running.task is task:
                del self._loads[domain]
        if not task.cancelled():
            task.exception()  # retrieved: its waiters (if any are left) got it

    async def _bring(self, domain: str) -> Entry:
        """Put the domain on the device: from host memory if it is there, else from the record."""
        async with self._lock(domain):
            entry = self.cache.get(domain)
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
                loaded = await self.load_newest(domain, versions)
                if loaded is None:
                    self.cache.recorded.pop(domain, None)
                    reasons = "; ".join(
                        f"v{v.version}: {self._invalid.get((domain, v.version), 'unreadable')}"
                        for v in reversed(versions)
                    )
                    raise AdapterUnavailable(f"No stored version of {domain!r} passes validation ({reasons}).")
                return loaded

    async def _to_device(self, entry: Entry) -> Entry:
        """Host tier -> device tier: one row write."""
        self.cache.make_room()
        row = self.cache.take_row(entry)
        start = time.perf_counter()
        try:
            slot = await self._write(row)
        except BaseException:
            self.cache.forget(entry)
            raise
        seconds = time.perf_counter() - start
        self.metrics.load_seconds.labels("host").observe(seconds)
        self.metrics.loads.labels("host", "ok").inc()
        self.cache.to_device(entry, slot)
        return entry

    # ----- from the record -----------------------------------------------------------------------

    async def load_newest(
        self, domain: str, versions: list[Version], keep: Entry | None = None, to_host: bool = False
    ) -> Entry | None:
        """Hold the lock. Load the newest valid live version onto the device (unless `keep` is it), or
        with `to_host` into the host tier (through a spare slot: validated and self-tested alike)."""
        self.cache.recorded[domain] = versions[-1].version
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
                self.cache.make_room()
            try:
                entry = await self.load(data, domain, v.version, v.created_at)
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
                self.cache.keep_on_host(entry)
            else:
                self.cache.publish(entry)
            return entry
        return None

    async def load(
        self, data: bytes, domain: str, version: int, created_at: float, prepared: Prepared | None = None
    ) -> Entry:
        """Validate and fold in the loader (unless `prepared` is given), then write and self-test on the
        engine: an entry in a slot of its own, not yet in the cache (`Cache.publish`).

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

    # ----- start-up ----------------------------------------------------------------------------

    async def warm(self, domains: list[str], ranked: bool = False) -> int:
        """Load `domains` onto the device (start-up: pinned ones, then the most used). Returns how many
        are resident afterwards; failures are logged, not raised. `ranked`: the domains come most used
        first, and are protected from eviction in that order (as if each had served again)."""
        cache = self.cache
        loaded = 0
        for domain in domains:
            if domain not in cache.pinned and cache.resident("device") >= cache.max_resident:
                break
            try:
                cache.release([await self.acquire(domain)])
                loaded += 1
            except (UnknownDomainError, AdapterUnavailable, RecordUnavailable) as exc:
                _log.warning("could not warm %s: %s", domain, exc)
        if ranked:
            for domain in reversed(domains):  # the most used last: the most recent of the protected segment
                cache.promote(domain)
        return loaded

    async def warm_host(self, domains: list[str]) -> int:
        """Fill the host tier with `domains` (most used first) while it has room, so that their first
        requests cost a row copy: on a CPU host it is the same memory as the device tier, which the
        budget holds for domains. Returns how many were added; failures are logged, not raised."""
        cache = self.cache
        added = 0
        for domain in domains:
            if not cache.host_has_room():
                break
            if domain in cache or domain in cache.unloaded:
                continue
            try:
                async with self._lock(domain), self._load_slots:
                    if domain in cache:
                        continue
                    versions = await self._call(self.record.live_versions, domain)
                    if versions and await self.load_newest(domain, versions, to_host=True) is not None:
                        added += 1
            except (AdapterUnavailable, RecordUnavailable) as exc:
                _log.warning("could not warm %s into host memory: %s", domain, exc)
        cache.trim_host()
        return added
