"""What the engine tells a front end: plain typed structs (msgspec), the same in one process and across
the transport, so a route never sees the registry's live objects.

A `Card` is what a front end needs to prepare images for a domain and to answer about it; `Row` is
one line of a listing; `EngineStatus` is what /readyz and /metrics report of the engine.

Shared by front ends and the engine process (no framework import).
"""

from __future__ import annotations

import dataclasses

import msgspec

from model.preprocessing import Preprocessing


class Card(msgspec.Struct, frozen=True):
    """One domain as the engine serves it (the version, its labels and preprocessing, and its details)."""

    domain: str
    version: int
    tier: str  # device, host or registry
    pinned: bool
    num_classes: int
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    adapter: str
    metrics: dict
    params: int
    served: int
    backbone_fingerprint: str
    registered_at: float
    size_bytes: int
    sha256: str
    load_ms: float
    golden_self_test: bool
    record_version: int

    @property
    def val_top1(self) -> float | None:
        value = self.metrics.get("val_top1")
        return float(value) if isinstance(value, (int, float)) else None


class Row(msgspec.Struct, frozen=True):
    """A registered domain in a listing: its current version in the record, and its card if cached."""

    name: str
    version: int
    card: Card | None
    pinned: bool
    unloaded: bool


class Deleted(msgspec.Struct, frozen=True):
    domain: str
    version: int  # the version that was current
    sha256: str | None  # of the cached bundle, if the engine had it


class Sync(msgspec.Struct, frozen=True):
    """How the engine stands with the registry of record."""

    record: str
    connected: bool
    synced: bool
    lag_s: float | None
    last_sync_at: float | None
    domains_behind: list[str]
    errors: int
    last_error: str | None
    warming: bool


class Residency(msgspec.Struct, frozen=True):
    """How many domains the device tier holds, and why (`service.engine.residency`)."""

    budget_mb: float
    budget_source: str
    bytes_per_domain: int
    fits: int  # what the budget holds at this row size, under RA_MAX_RESIDENT
    resident: int
    host_cache_mb: float


@dataclasses.dataclass(frozen=True)
class DeviceReport:
    """What the engine computes on, logged once at start and shown by /readyz."""

    backend: str  # the framework and its version
    devices: tuple[str, ...]  # the engine's devices, e.g. ("GPU:0 NVIDIA H200",) or ("CPU",)
    gpu: bool
    compute_dtype: str
    free_bytes: int | None = None  # free memory of the accelerator at start, where the framework tells

    def describe(self) -> str:
        where = ", ".join(self.devices) if self.gpu else "CPU (no GPU found, running on CPU)"
        free = f"; {self.free_bytes / 2**30:.1f} GiB free" if self.free_bytes is not None else ""
        return f"engine on {where}{free}; {self.backend}; compute dtype {self.compute_dtype}"


class EngineStatus(msgspec.Struct, frozen=True):
    pid: int
    started: bool
    ready: bool  # started and in step with the record at least once
    adapters: int  # domains cached (device and host tiers)
    input_size: int
    backbone_fingerprint: str | None
    device: DeviceReport | None
    sync: Sync | None
    queue_depth: int
    residency: Residency | None = None
