"""The engine core: the one owner of the backbone, the engine, the registry (device and host tiers), the
batcher and the follower of the registry of record, and the operations front ends ask of it.

It runs in the engine process (`service.engine.process`, one per device, fed by every front end) or,
with one worker, inside the single serving process; front ends reach it only through
`service.client`, and get plain views (`service.views`) back, never the registry's live objects.
Start-up (`service.engine.startup`): load the backbone, warm the engine, open the record (seeding the
demo bundles once); then here: load the pinned domains, sync with the record, then follow it; the most
used domains warm in the background, and trained jobs' bundles are registered (`service.engine.registrar`). `service.engine.reports` builds the views it answers with.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import math
import os
import shutil
import time
from typing import TYPE_CHECKING

import numpy as np

from model.backbone import Backbone
from model.preprocessing import Preprocessing
from service.client import Answer
from service.engine import reports, residency
from service.engine.batcher import Done, DynamicBatcher, settle
from service.engine.follower import Follower
from service.engine.loader import Loader
from service.engine.registrar import Registrar
from service.engine.registry import Entry, Registry
from service.engine.startup import start_engine
from service.exceptions import StaleCard
from service.metrics import Metrics
from service.record import RecordUnavailable
from service.settings import Settings
from service.views import Card, Deleted, DeviceReport, EngineStatus, Row
from training.jobs import open_jobs

if TYPE_CHECKING:
    from model.engine import InferenceEngine

_log = logging.getLogger(__name__)
# Allocations between two collections of the youngest generation (Python's default: 700). Every young
# collection promotes the objects of the requests then in flight, and enough promotions trigger a full
# collection, which walks every domain's objects in a heap of many GB: 100-190 ms at 17,000 resident
# domains, most of a second in every ten. Collected rarely, a request's objects are gone by then.
GC_YOUNG_THRESHOLD = 50_000


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

    async def start(self) -> None:
        s = self.settings
        self.loader = Loader(None, s.backbone, self.loaders)
        loaders = asyncio.create_task(self.loader.start())  # on this thread (their death signal follows it),
        started = await asyncio.to_thread(start_engine, s, self.metrics, self.loader, self.cores)  # beside them
        await loaders
        self.device, self.budget, self.backbone = started.device, started.budget, started.backbone
        self.engine, self.registry = started.engine, started.registry
        registry = self.registry
        t0 = time.perf_counter()
        batching = started.batching
        share = max(batching.max_batch_size, int(batching.max_queue * s.domain_queue_share))
        self.batcher = DynamicBatcher(
            self.engine,
            batching.max_batch_size,
            s.max_wait_ms,
            batching.max_queue,
            self.metrics,
            domain_share=min(share, batching.max_queue),
        )
        await self.batcher.start()
        self.metrics.queue_capacity.set(batching.max_queue)
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
        jobs = await asyncio.to_thread(open_jobs, s.jobs_location, s.training_lease_s)
        self._tasks.append(asyncio.create_task(Registrar(registry, jobs, self.metrics).run()))
        store = getattr(registry.record, "root", None)  # the directory record's folder (PostgreSQL: none)
        if store is not None:
            self._tasks.append(asyncio.create_task(self._measure_store(store)))
        gc.collect()
        gc.freeze()  # the loaded framework's objects live forever: keep them out of full collections
        self._gc_thresholds = gc.get_threshold()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *self._gc_thresholds[1:])
        self.metrics.engine_starts.inc()
        self.started = True

    async def _measure_store(self, root, interval_s: float = 30.0) -> None:
        """The directory record's file system, for the alert on its disk filling (`ra_store_free_bytes`)."""
        while True:
            with contextlib.suppress(OSError):
                usage = await asyncio.to_thread(shutil.disk_usage, root)
                self.metrics.store_free_bytes.set(usage.free)
                self.metrics.store_size_bytes.set(usage.total)
            await asyncio.sleep(interval_s)

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
            self.metrics.domain_label.seed(used)  # the most used domains keep their own series
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
        return reports.card(entry, self.registry)

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
            sync=reports.sync(self.registry, self.metrics) if self.registry else None,
            queue_depth=depth,
            residency=reports.residency(self.registry, self.engine, self.budget, self.metrics)
            if self.registry
            else None,
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
                self.metrics.tally.add(self.metrics.predictions, n, self.metrics.domain_label(domains[j]))
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
