"""The engine core: the one owner of the backbone, the engine, the registry (device and host tiers), the
batcher and the follower of the registry of record, and the operations front ends ask of it.

It runs in the engine process (`service.engine.process`, one per device, fed by every front end) or,
with one worker, inside the single serving process; front ends reach it only through
`service.client`, and get plain views (`service.views`) back, never the registry's live objects.
Start-up: load the backbone, warm the engine, open the record (seeding the demo bundles once), load
the pinned domains, sync with the record, then follow it; the most used domains warm in the background.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import math
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from model.backbone import Backbone, load_backbone
from model.bundle import load_bundle
from model.preprocessing import Preprocessing
from model.safetensors_io import InvalidFileError
from service.client import Answer
from service.engine import residency
from service.engine.batcher import Done, DynamicBatcher, settle
from service.engine.follower import Follower
from service.engine.loader import Loader
from service.engine.registry import MB, Entry, Limits, Registry
from service.engine.runtime import configure_threads, device_report, use_backend
from service.exceptions import StaleCard
from service.metrics import Metrics
from service.record import DomainExists, RecordStore, RecordUnavailable, open_record
from service.settings import DEMO_DIR, Settings
from service.views import Card, Deleted, DeviceReport, EngineStatus, Residency, Row, Sync

if TYPE_CHECKING:
    from model.engine import InferenceEngine

_log = logging.getLogger(__name__)
DEMO_MARKER = "demo-seeded"
# Allocations between two collections of the youngest generation (Python's default: 700). Every young
# collection promotes the objects of the requests then in flight, and enough promotions trigger a full
# collection, which walks every domain's objects in a heap of many GB: 100-190 ms at 17,000 resident
# domains, most of a second in every ten. Collected rarely, a request's objects are gone by then.
GC_YOUNG_THRESHOLD = 50_000


def seed_demo(record: RecordStore, backbone: Backbone) -> None:
    """Register the shipped demo bundles in an empty record, once (a deleted demo stays deleted)."""
    if record.has_marker(DEMO_MARKER):
        return
    for path in sorted(DEMO_DIR.glob("*.safetensors")):
        if path.name == "backbone.safetensors":
            continue
        data = path.read_bytes()
        try:
            bundle = load_bundle(data, backbone)
        except InvalidFileError as exc:
            _log.info("not seeding demo bundle %s: %s", path.name, exc)
            continue
        try:
            record.add(bundle.domain, data, replace=False)
        except DomainExists:
            pass
    record.set_marker(DEMO_MARKER)


class EngineCore:
    """Everything that computes or holds a domain; its methods are the operations of `service.client`."""

    def __init__(self, settings: Settings, metrics: Metrics, cores: int | None = None, loaders: int = 0):
        self.settings, self.metrics = settings, metrics
        self.cores = cores  # CPU cores for the framework's thread pools (None: all of them)
        self.loaders = loaders  # loader processes (0: loads are prepared in threads of this process)
        self.loader: Loader | None = None
        self.device: DeviceReport | None = None
        self.budget: residency.Budget | None = None
        self.backbone: Backbone | None = None
        self.engine: InferenceEngine | None = None
        self.registry: Registry | None = None
        self.batcher: DynamicBatcher | None = None
        self.follower: Follower | None = None
        self.started = False
        self._tasks: list[asyncio.Task] = []
        self._gc_thresholds: tuple[int, ...] | None = None  # the process's, while serving

    # ----- life -----------------------------------------------------------------------------

    def _startup(self) -> None:
        """Blocking start-up work: backbone, engine, warm-up, the registry of record."""
        s = self.settings
        t0 = time.perf_counter()
        use_backend(s.backend)  # before the framework is imported (by model.engine)
        from model.engine import InferenceEngine

        configure_threads(self.cores)
        self.device = device_report(s.compute_dtype, s.require_gpu)
        _log.info("%s", self.device.describe())
        self.backbone = load_backbone(s.backbone)
        headroom = s.load_concurrency + s.max_batch_size + 8  # loads in flight; replaced slots still computing
        self.budget = residency.budget(s, self.device)
        row_bytes = InferenceEngine.row_bytes_for(self.backbone, s.compute_dtype)
        fits = self.budget.fits(row_bytes)
        # every slot the budget fits, allocated now: a table that grew later would copy itself (and
        # need twice its memory) while serving
        self.engine = InferenceEngine(self.backbone, capacity=fits + headroom, compute_dtype=s.compute_dtype)
        _log.info(
            "residency: %d domains of %.2f MB fit in %.0f MB (%s)",
            fits,
            row_bytes / MB,
            self.budget.bytes / MB,
            self.budget.source,
        )
        self.engine.warm_up(sorted({1, 2, s.max_batch_size}))
        record = open_record(s)
        limits = Limits(
            max_resident=s.max_resident,
            device_bytes=self.budget.bytes,
            host_cache_bytes=residency.host_cache_bytes(s, self.device, self.budget, row_bytes),
            load_concurrency=s.load_concurrency,
            load_timeout_s=s.load_timeout_s,
            pinned=s.pinned_domains,
        )
        self.loader.backbone = self.backbone
        self.registry = Registry(self.engine, record, self.metrics, self.loader, limits)
        if s.demo_adapters:
            try:
                seed_demo(record, self.backbone)
            except RecordUnavailable as exc:
                _log.warning("could not seed the demo bundles now: %s", exc)
        _log.info("engine warm in %.1fs; registry of record: %s", time.perf_counter() - t0, record.description)

    async def start(self) -> None:
        s = self.settings
        self.loader = Loader(None, s.backbone, self.loaders)
        loaders = asyncio.create_task(self.loader.start())  # on this thread (their death signal follows it),
        await asyncio.to_thread(self._startup)  # beside the framework's start-up
        await loaders
        registry = self.registry
        t0 = time.perf_counter()
        share = max(s.max_batch_size, int(s.max_queue * s.domain_queue_share))
        self.batcher = DynamicBatcher(
            self.engine,
            s.max_batch_size,
            s.max_wait_ms,
            s.max_queue,
            self.metrics,
            domain_share=min(share, s.max_queue),
        )
        await self.batcher.start()
        try:  # readiness needs the pinned domains only; the most used ones warm in the background
            await registry.refresh_flags()
            pinned = await registry.warm(registry.pinned_domains())
            await registry.resync()
            _log.info("ready: %d pinned domains loaded in %.1fs", pinned, time.perf_counter() - t0)
        except RecordUnavailable:
            _log.warning("not ready: the registry of record is unreachable; retrying in the background")
        self.follower = Follower(registry, registry.record, s.resync_interval_s)
        self.follower.start()
        self._tasks.append(asyncio.create_task(self._warm_most_used(registry.max_resident)))
        gc.collect()
        gc.freeze()  # the loaded framework's objects live forever: keep them out of full collections
        self._gc_thresholds = gc.get_threshold()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *self._gc_thresholds[1:])
        self.started = True

    async def stop(self) -> None:
        self.started = False
        if self._gc_thresholds is not None:
            gc.set_threshold(*self._gc_thresholds)
        for task in self._tasks:
            task.cancel()
        if self.follower is not None:
            await self.follower.stop()
        if self.batcher is not None:
            await self.batcher.stop()
        if self.registry is not None:
            with contextlib.suppress(RecordUnavailable):
                await self.registry.flush_usage()  # so that the next start warms what was used
            self.registry.close()
        if self.loader is not None:
            self.loader.stop()

    async def _warm_most_used(self, count: int) -> None:
        """After start: load as many of the most used domains (usage counts kept in the record) as
        fit, then, while room is left, others by name; then the next most used into the host tier
        while it has room: memory the budget holds for domains serves better full."""
        registry = self.registry
        registry.status.warming = True
        try:
            host_rows = registry.limits.host_cache_bytes // self.engine.row_bytes
            used = await asyncio.to_thread(registry.record.top_used, count + host_rows)
            t0 = time.perf_counter()
            loaded = await registry.warm(used[:count], ranked=True)
            if len(used) < count:
                listed = await asyncio.to_thread(registry.record.list_domains, "", None, count)
                taken = set(used)
                loaded += await registry.warm([name for name, _ in listed if name not in taken][: count - len(used)])
            kept = await registry.warm_host(used[count:])
            gc.freeze()  # the warmed domains' objects: out of the full collections that serving triggers
            _log.info(
                "warmed %d domains onto the device and %d into host memory in %.1fs",
                loaded,
                kept,
                time.perf_counter() - t0,
            )
        except RecordUnavailable as exc:
            _log.warning("not warming domains: %s", exc)
        finally:
            registry.status.warming = False

    # ----- views ------------------------------------------------------------------------------

    def _card(self, entry: Entry) -> Card:
        b, registry = entry.card, self.registry
        return Card(
            domain=entry.domain,
            version=entry.version,
            tier=entry.tier,
            pinned=registry.is_pinned(entry.domain),
            num_classes=b.num_classes,
            labels=tuple(b.labels),
            preprocessing=b.preprocessing,
            adapter=b.config.adapter,
            metrics=dict(b.metrics),
            params=entry.params,
            served=entry.served,
            backbone_fingerprint=b.backbone_fingerprint,
            registered_at=entry.registered_at,
            size_bytes=entry.size_bytes,
            sha256=entry.sha256,
            load_ms=entry.load_ms,
            golden_self_test=entry.golden_self_test,
            record_version=registry.recorded_version(entry.domain) or entry.version,
        )

    def _sync(self) -> Sync | None:
        """How far behind the record the engine is; also refreshes the sync gauges."""
        registry = self.registry
        if registry is None:
            return None
        s = registry.status
        lag = 0.0 if s.connected else (time.monotonic() - s.last_ok if s.last_ok else None)
        behind = registry.behind()
        self.metrics.sync_lag.set(lag if lag is not None else float("inf"))
        self.metrics.sync_behind.set(len(behind))
        return Sync(
            record=registry.record.description,
            connected=s.connected,
            synced=s.synced_once,
            lag_s=lag,
            last_sync_at=s.last_ok_wall or None,
            domains_behind=behind[:20],
            errors=s.errors,
            last_error=s.last_error,
            warming=s.warming,
        )

    def _residency(self) -> Residency | None:
        """The budget and what it holds; also refreshes the residency gauges."""
        registry = self.registry
        if registry is None:
            return None
        row, fits = self.engine.row_bytes, registry.max_resident
        self.metrics.budget_bytes.set(self.budget.bytes)
        self.metrics.domain_bytes.set(row)
        self.metrics.domains_fit.set(fits)
        return Residency(
            budget_mb=round(self.budget.bytes / MB, 1),
            budget_source=self.budget.source,
            bytes_per_domain=row,
            fits=fits,
            resident=registry.resident("device"),
            host_cache_mb=round(registry.limits.host_cache_bytes / MB, 1),
        )

    # ----- operations -------------------------------------------------------------------------

    async def status(self) -> EngineStatus:
        depth = self.batcher.depth if self.batcher is not None else 0
        self.metrics.queue_depth.set(depth)
        ready = self.started and self.registry is not None and self.registry.status.synced_once
        return EngineStatus(
            pid=os.getpid(),
            started=self.started,
            ready=ready,
            adapters=len(self.registry.entries()) if self.registry else 0,
            input_size=self.backbone.config.input_size if self.backbone else 0,
            backbone_fingerprint=self.backbone.fingerprint if self.backbone else None,
            device=self.device,
            sync=self._sync(),
            queue_depth=depth,
            residency=self._residency(),
        )

    async def card(self, domain: str) -> Card:
        """The domain as it is served (loaded first if it is not cached)."""
        return self._card(await self.registry.describe(domain))

    async def infer(
        self,
        domains: list[str],
        preprocessing: list[Preprocessing],
        images: np.ndarray,
        which: list[int],
        lane: str | None,
    ) -> list[Answer]:
        """Classify `images[i]` with `domains[which[i]]`, every image in the batcher's shared batches.

        `preprocessing[j]` is how the caller prepared the images of `domains[j]`; when the version now
        served prepares them otherwise, `StaleCard` asks the caller to prepare them again. Domains not
        on the device are loaded first (see `submit` for the calls that need no wait)."""
        if len(domains) == 1:  # no task per domain for the common case
            try:
                got = [await self.registry.acquire(domains[0])]
            except Exception as exc:
                got = [exc]
        else:
            got = await asyncio.gather(*(self.registry.acquire(d) for d in domains), return_exceptions=True)
        failed = next((g for g in got if isinstance(g, BaseException)), None)
        if failed is not None:
            self.registry.release([g for g in got if not isinstance(g, BaseException)])
            raise failed
        future = asyncio.get_running_loop().create_future()
        request = self._submit(domains, got, preprocessing, images, which, lane, settle(future))
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):  # no extra task, unlike wait_for
                return await future
        finally:
            if request is not None:
                request.cancel()  # no-op when answered; a timed-out call's leases go back, its queued images are skipped

    def submit(
        self,
        domains: list[str],
        preprocessing: list[Preprocessing],
        images: np.ndarray,
        which: list[int],
        lane: str | None,
        done: Done,
        deadline: float,
    ) -> bool:
        """`infer` without waiting, when every domain is on the device now: queue the images and return
        True (`done` gets the answers or the error on the event loop; a TimeoutError once `deadline`,
        time.monotonic(), has passed with images still queued), or False, having done nothing, when a
        domain must load first (then call `infer`). Raises what `infer` raises before queueing."""
        entries = self.registry.try_acquire(domains)
        if entries is None:
            return False
        self._submit(domains, entries, preprocessing, images, which, lane, done, deadline)
        return True

    def _submit(
        self,
        domains: list[str],
        entries: list[Entry],
        preprocessing: list[Preprocessing],
        images: np.ndarray,
        which: list[int],
        lane: str | None,
        done: Done,
        deadline: float = math.inf,
    ):
        """Holding the leases of `entries`: check the cards, queue the images, and once they are answered (or
        failed) return the leases, count the images and call `done`. Returns the batcher's request (None when
        there was nothing to queue)."""
        registry = self.registry

        def finish(result: list[Answer] | BaseException) -> None:
            counts = (
                {}
                if isinstance(result, BaseException)
                else {0: len(which)}
                if len(domains) == 1
                else collections.Counter(which)
            )
            for j, entry in enumerate(entries):
                registry.release([entry], images=counts.get(j, 0))
            for j, n in counts.items():
                self.metrics.predictions.labels(domains[j]).inc(n)
            done(result)

        try:
            stale = next((e.domain for e, p in zip(entries, preprocessing) if e.card.preprocessing != p), None)
            if stale is not None:
                raise StaleCard(f"{stale!r} now prepares images otherwise; fetch its card again.")
            if not len(images):
                finish([])
                return None
            return self.batcher.submit(list(images), [entries[j] for j in which], lane, finish, deadline)
        except BaseException:
            registry.release(entries)
            raise

    async def list_page(self, prefix: str, cursor: str | None, count: int) -> list[Row]:
        """A page of the record's domains in name order after `cursor`, with the cards of cached ones."""
        registry = self.registry
        return [
            Row(
                name=name,
                version=version,
                card=self._card(entry) if entry is not None else None,
                pinned=registry.is_pinned(name),
                unloaded=registry.is_unloaded(name),
            )
            for name, version, entry in await registry.list_page(prefix, cursor, count)
        ]

    async def register(self, data: bytes, replace: bool, domain: str | None, pin: bool | None) -> Card:
        return self._card(await self.registry.register(data, replace=replace, domain=domain, pin=pin))

    async def delete(self, domain: str) -> Deleted:
        version, entry = await self.registry.delete(domain)
        return Deleted(domain=domain, version=version, sha256=entry.sha256 if entry is not None else None)

    async def rollback(self, domain: str) -> Card:
        return self._card(await self.registry.rollback(domain))

    async def load(self, domain: str, data: bytes | None) -> Card:
        """The repository extension's load: register `data` as the domain's new version (when given) and
        serve the domain again if it was unloaded."""
        if data is not None:
            entry = await self.registry.register(data, replace=True, domain=domain)
            if not self.registry.is_unloaded(domain):
                return self._card(entry)
        return self._card(await self.registry.reload(domain))

    async def unload(self, domain: str) -> None:
        await self.registry.unload(domain)
