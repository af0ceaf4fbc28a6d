"""Prometheus metrics, in a registry of the app's own (so several apps can live in one process).

Under the supervisor every process (front ends and the engine) writes its metrics to the files of
prometheus-client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`, set before any process starts),
and /metrics on any front end merges them: counters are summed over every process that ever ran,
gauges over the live ones (`multiprocess_mode`).

Imported by every process.
"""

from __future__ import annotations

import asyncio
import collections
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


def exposition(metrics: Metrics) -> tuple[bytes, str]:
    """The text exposition: this process's metrics, or every process's when the supervisor runs them."""
    path = os.environ.get(MULTIPROC_DIR)
    if not path:
        return generate_latest(metrics.registry), CONTENT_TYPE_LATEST
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path)
    return generate_latest(merged), CONTENT_TYPE_LATEST


class Tally:
    """Counts made on an event loop, added to their counters once per turn of it. A counter's `inc`
    under the supervisor writes a shared-memory file under a lock (microseconds each): too dear to pay
    two or three times per request where one turn answers dozens. Off an event loop, counts go
    straight in."""

    def __init__(self) -> None:
        self._counts: collections.Counter = collections.Counter()

    def add(self, counter: Counter, n: float = 1, *labels: str) -> None:
        """Add `n` to `counter` (its child of `labels`, if any) at the end of this event-loop turn."""
        if not self._counts:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop in this thread
                (counter.labels(*labels) if labels else counter).inc(n)
                return
        self._counts[counter, labels] += n

    def flush(self) -> None:
        counts, self._counts = self._counts, collections.Counter()
        for (counter, labels), n in counts.items():
            (counter.labels(*labels) if labels else counter).inc(n)


class BoundedLabel:
    """A label whose values come from users (domain names), kept to `limit` series: the first `limit`
    values seen (the most used ones, where `seed` names them first) keep their own, and every other
    value is counted as `OTHER`. With 100,000 domains one series each would be 100,000 per metric, where
    Prometheus's operators are told to keep a metric's series in the hundreds."""

    OTHER = "_other"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._kept: set[str] = set()

    def seed(self, values) -> None:
        """Keep series for `values` first (most used first), while the bound has room."""
        for value in values:
            if len(self._kept) >= self.limit:
                return
            self._kept.add(value)

    def __call__(self, value: str) -> str:
        if value in self._kept:
            return value
        if len(self._kept) < self.limit:
            self._kept.add(value)
            return value
        return self.OTHER


class Metrics:
    def __init__(self, domain_series: int = 20) -> None:
        self.tally = Tally()
        self.domain_label = BoundedLabel(domain_series)  # the `domain` label's values: see BoundedLabel
        self.registry = CollectorRegistry()
        r = self.registry
        # no domain label on request metrics: with 100,000 domains it would be 100,000 series per metric
        self.requests = Counter(
            "ra_requests_total", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "ra_request_seconds",
            "Request latency by route",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.errors = Counter(
            "ra_errors_total",
            "Error answers by their code (the JSON body's `error`, e.g. engine_unavailable, overloaded)",
            ["code"],
            registry=r,
        )
        # 1 where any front end misses the engine (livemax; every process's file holds a 0 for it)
        self.engine_unreachable = Gauge(
            "ra_engine_unreachable",
            "1 while a front end cannot reach the engine process (down or restarting), else 0",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.engine_starts = Counter("ra_engine_starts_total", "Engine starts: more than one is a restart", registry=r)
        # per key name (never the secret): 'anonymous' without a keys file, 'admin' for RA_ADMIN_TOKEN
        self.key_requests = Counter(
            "ra_key_requests_total", "HTTP requests by API key name and status", ["key", "status"], registry=r
        )
        self.keys_loaded = Gauge(
            "ra_api_keys", "Keys in force from RA_API_KEYS_FILE", registry=r, multiprocess_mode="livemax"
        )
        self.keys_reload_errors = Counter(
            "ra_api_keys_reload_errors_total",
            "Reloads of RA_API_KEYS_FILE refused (the last good keys stay)",
            registry=r,
        )
        self.predictions = Counter(
            "ra_predictions_total",
            f"Images classified, by domain: the first RA_METRICS_DOMAINS domains, the rest as {BoundedLabel.OTHER}",
            ["domain"],
            registry=r,
        )
        self.batch_size = Histogram(
            "ra_batch_size", "Images per engine call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.batch_domains = Histogram(
            "ra_batch_domains", "Distinct domains per engine call", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.device_busy = Counter(
            "ra_device_busy_seconds",
            "Seconds the device computed, where the engine can tell (the simulated device; a GPU's own "
            "counters otherwise)",
            registry=r,
        )
        self.message_images = Histogram(
            "ra_engine_message_images",
            "Images per inference message the engine process received",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.queue_depth = Gauge(
            "ra_queue_depth", "Images waiting for the engine", registry=r, multiprocess_mode="livesum"
        )
        self.queue_capacity = Gauge(
            "ra_queue_capacity",
            "Images the engine's queue holds (RA_MAX_QUEUE)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.store_free_bytes = Gauge(
            "ra_store_free_bytes",
            "Free bytes on the file system of the directory registry of record",
            registry=r,
            multiprocess_mode="livemax",  # the engine's (the other processes' files hold 0)
        )
        self.store_size_bytes = Gauge(
            "ra_store_size_bytes",
            "Size of the file system of the directory registry of record",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.resident = Gauge(
            "ra_resident_domains",
            "Domains cached by this process, by tier (device, host)",
            ["tier"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.budget_bytes = Gauge(
            "ra_device_budget_bytes", "Memory for the resident domains' tables", registry=r, multiprocess_mode="livesum"
        )
        self.domain_bytes = Gauge(
            "ra_domain_bytes", "One resident domain's table row", registry=r, multiprocess_mode="livesum"
        )
        self.domains_fit = Gauge("ra_domains_fit", "Domains the budget holds", registry=r, multiprocess_mode="livesum")
        self.host_bytes = Gauge(
            "ra_host_cache_bytes", "Bytes of folded tables in the host tier", registry=r, multiprocess_mode="livesum"
        )
        self.lookups = Counter(
            "ra_adapter_lookups_total", "Requests for a domain, by tier and hit or miss", ["tier", "result"], registry=r
        )
        self.loads = Counter(
            "ra_adapter_loads_total",
            "Domain loads onto the device, by source (host, registry) and outcome (ok, invalid)",
            ["source", "outcome"],
            registry=r,
        )
        self.evictions = Counter(
            "ra_adapter_evictions_total", "Domains evicted, by tier they left", ["tier"], registry=r
        )
        self.load_seconds = Histogram(
            "ra_adapter_load_seconds",
            "Time to put a domain on the device, by source "
            "(host: one table write; registry: read, validate, fold, self-test)",
            ["source"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.sync_connected = Gauge(
            "ra_registry_connected", "1 while the registry of record answers", registry=r, multiprocess_mode="livemax"
        )
        self.last_sync = Gauge(
            "ra_registry_last_sync_timestamp_seconds",
            "When the registry of record last answered (Unix time)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.sync_lag = Gauge(
            "ra_registry_sync_lag_seconds",
            "Seconds since this process was last known in step with the record",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.sync_behind = Gauge(
            "ra_registry_domains_behind",
            "Domains whose served version differs from the record's",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.temporaries_removed = Counter(
            "ra_registry_temporaries_removed_total",
            "Temporary files of interrupted writes swept from the registry of record",
            registry=r,
        )
        self.sync_errors = Counter(
            "ra_registry_sync_errors_total",
            "Failures while following the record, by kind (unavailable, invalid_bundle)",
            ["kind"],
            registry=r,
        )
        # training jobs, as the engine's registrar reads them from the job list (`service.engine.registrar`)
        self.training_jobs = Gauge(
            "ra_training_jobs",
            "Training jobs in the job list, by state",
            ["state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.training_queue_wait = Histogram(
            "ra_training_queue_wait_seconds",
            "From a training job's submit to its first claim by a worker",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200),
            registry=r,
        )
        self.training_duration = Histogram(
            "ra_training_job_seconds",
            "From a training job's first claim to its end, by how it ended",
            ["state"],
            buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
            registry=r,
        )
        self.training_images = Counter(
            "ra_training_images_total",
            "Images trained on (each epoch counts each image), added when a job ends: rate() is training images/s",
            registry=r,
        )
