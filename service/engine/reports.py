"""The plain views (`service.views`) the engine answers with, built from its live objects, and the gauges
they refresh. Runs in the engine process: front ends get only these views, never the registry's entries.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from service.engine.registry import MB, Entry, Registry
from service.metrics import Metrics
from service.views import Card, Residency, Sync

if TYPE_CHECKING:
    from model.engine import InferenceEngine
    from service.engine.residency import Budget


def card(entry: Entry, registry: Registry) -> Card:
    """The domain's card as served: its bundle's metadata, its tier and its place in the record."""
    b = entry.card
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


def sync(registry: Registry, metrics: Metrics) -> Sync:
    """How far behind the record the engine is; also refreshes the sync gauges."""
    s = registry.status
    lag = 0.0 if s.connected else (time.monotonic() - s.last_ok if s.last_ok else None)
    behind = registry.behind()
    metrics.sync_lag.set(lag if lag is not None else float("inf"))
    metrics.sync_behind.set(len(behind))
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


def residency(registry: Registry, engine: InferenceEngine, budget: Budget, metrics: Metrics) -> Residency:
    """The budget and what it holds; also refreshes the residency gauges."""
    row, fits = engine.row_bytes, registry.max_resident
    metrics.budget_bytes.set(budget.bytes)
    metrics.domain_bytes.set(row)
    metrics.domains_fit.set(fits)
    return Residency(
        budget_mb=round(budget.bytes / MB, 1),
        budget_source=budget.source,
        bytes_per_domain=row,
        fits=fits,
        resident=registry.resident("device"),
        host_cache_mb=round(registry.limits.host_cache_bytes / MB, 1),
    )
