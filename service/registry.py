"""The registry: which domains are served, at which version, kept in step with the engine and the store.

Registration validates the whole bundle (format, tensors, finite values, fingerprint, labels, name,
golden self-test) before anything is stored; the engine publishes it, then the store persists it.
Per-domain locks make concurrent registrations of one domain resolve to one winner; domains do not
wait for each other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from model.backbone import Backbone
from model.bundle import AdapterBundle, check_domain_name, load_bundle
from model.engine import InferenceEngine, UnknownDomainError
from model.safetensors_io import InvalidFileError
from model.weights import count_parameters
from service.metrics import Metrics
from service.store import BundleStore

_log = logging.getLogger(__name__)


class DomainExists(Exception):
    """The domain is registered and the upload did not ask to replace it."""


class NoPreviousVersion(Exception):
    """Rollback asked for a domain that has a single version."""


@dataclasses.dataclass(frozen=True)
class Entry:
    bundle: AdapterBundle
    version: int
    registered_at: float
    size_bytes: int
    load_ms: float

    @property
    def domain(self) -> str:
        return self.bundle.domain

    @property
    def params(self) -> int:
        return count_parameters(self.bundle.config, "domain")


class Registry:
    def __init__(self, backbone: Backbone, engine: InferenceEngine, store: BundleStore, metrics: Metrics):
        self.backbone, self.engine, self.store, self.metrics = backbone, engine, store, metrics
        self._entries: dict[str, Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.served: dict[str, int] = {}

    def entries(self) -> list[Entry]:
        return [self._entries[d] for d in sorted(self._entries)]

    def get(self, domain: str) -> Entry:
        try:
            return self._entries[domain]
        except KeyError:
            raise UnknownDomainError(f"Unknown domain {domain!r}") from None

    def __contains__(self, domain: str) -> bool:
        return domain in self._entries

    def _lock(self, domain: str) -> asyncio.Lock:
        return self._locks.setdefault(domain, asyncio.Lock())

    def _publish(self, bundle: AdapterBundle, version: int, size: int) -> Entry:
        """Validate on the engine (golden self-test) and serve it; blocking, run in a thread."""
        start = time.perf_counter()
        self.engine.add(bundle, tag=version)
        load_ms = (time.perf_counter() - start) * 1000
        self.metrics.load_seconds.observe(load_ms / 1000)
        return Entry(bundle, version, time.time(), size, load_ms)

    def load_store(self) -> None:
        """At start: serve every stored domain's newest valid version (older ones if it is broken)."""
        for domain in self.store.domains():
            for version in reversed(self.store.versions(domain)):
                try:
                    data = self.store.read(domain, version)
                    bundle = load_bundle(data, self.backbone, domain=domain)
                    self._entries[domain] = self._publish(bundle, version, len(data))
                    break
                except (InvalidFileError, OSError) as exc:
                    _log.error("stored bundle %s v%d is unusable, skipping it: %s", domain, version, exc)
        self.metrics.adapters.set(len(self._entries))

    async def register(self, data: bytes, replace: bool = False, domain: str | None = None) -> Entry:
        """Validate and serve a bundle upload, then persist it. Raises InvalidFileError / DomainExists."""
        if domain is not None:
            check_domain_name(domain)
        bundle = await asyncio.to_thread(load_bundle, data, self.backbone, domain)
        async with self._lock(bundle.domain):
            previous = self._entries.get(bundle.domain)
            if previous is not None and not replace:
                raise DomainExists(f"Domain {bundle.domain!r} exists (version {previous.version}); "
                                   "send replace=true to upload a new version.")
            versions = self.store.versions(bundle.domain)
            version = max(versions, default=0) + 1
            entry = await asyncio.to_thread(self._publish, bundle, version, len(data))
            try:
                await asyncio.to_thread(self.store.write, bundle.domain, version, data)
            except BaseException:
                if previous is not None:  # put the served version back to what the store holds
                    await asyncio.to_thread(self.engine.add, previous.bundle, False, previous.version)
                else:
                    self.engine.remove(bundle.domain)
                raise
            self._entries[bundle.domain] = entry
            self.metrics.adapters.set(len(self._entries))
            return entry

    async def delete(self, domain: str) -> Entry:
        async with self._lock(domain):
            entry = self.get(domain)
            self.engine.remove(domain)
            await asyncio.to_thread(self.store.delete, domain)
            del self._entries[domain]
            self.metrics.adapters.set(len(self._entries))
            return entry

    async def rollback(self, domain: str) -> Entry:
        """Serve the previous stored version again and drop the current one."""
        async with self._lock(domain):
            current = self.get(domain)
            for version in reversed([v for v in self.store.versions(domain) if v < current.version]):
                try:
                    data = await asyncio.to_thread(self.store.read, domain, version)
                    bundle = await asyncio.to_thread(load_bundle, data, self.backbone, domain)
                    entry = await asyncio.to_thread(self._publish, bundle, version, len(data))
                except (InvalidFileError, OSError) as exc:
                    _log.error("stored bundle %s v%d is unusable, skipping it: %s", domain, version, exc)
                    continue
                await asyncio.to_thread(self.store.drop_version, domain, current.version)
                self._entries[domain] = entry
                return entry
            raise NoPreviousVersion(f"Domain {domain!r} has no usable version before {current.version}.")
