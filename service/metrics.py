"""Prometheus metrics, in a registry of the app's own (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ra_requests_total", "HTTP requests by route, domain and status",
                                ["route", "domain", "status"], registry=r)
        self.latency = Histogram("ra_request_seconds", "Request latency by route and domain", ["route", "domain"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.predictions = Counter("ra_predictions_total", "Images classified, by domain", ["domain"], registry=r)
        self.batch_size = Histogram("ra_batch_size", "Images per engine call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_domains = Histogram("ra_batch_domains", "Distinct domains per engine call",
                                       buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.queue_depth = Gauge("ra_queue_depth", "Images waiting for the engine", registry=r)
        self.adapters = Gauge("ra_adapters", "Domains served by this process", registry=r)
        self.load_seconds = Histogram("ra_adapter_load_seconds", "Validate + fold + register time per bundle",
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.sync_connected = Gauge("ra_registry_connected", "1 while the registry of record answers", registry=r)
        self.last_sync = Gauge("ra_registry_last_sync_timestamp_seconds",
                               "When the registry of record last answered (Unix time)", registry=r)
        self.sync_lag = Gauge("ra_registry_sync_lag_seconds",
                              "Seconds since this process was last known in step with the record", registry=r)
        self.sync_behind = Gauge("ra_registry_domains_behind",
                                 "Domains whose served version differs from the record's", registry=r)
        self.sync_errors = Counter("ra_registry_sync_errors_total",
                                   "Failures while following the record, by kind (unavailable, invalid_bundle)",
                                   ["kind"], registry=r)
