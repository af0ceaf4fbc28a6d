"""The engine process's blocking start-up: the framework, the device, the backbone, the engine sized
from the memory budget, the registry of record (seeded with the demo bundles once) and the registry.

Runs in the engine process (or the single serving process), on a thread beside the loader processes'
start; `service.engine.core` owns what it builds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from model.backbone import Backbone, load_backbone
from model.bundle import load_bundle
from model.safetensors_io import InvalidFileError
from service.engine import residency
from service.engine.loader import Loader
from service.engine.registry import MB, Limits, Registry
from service.engine.runtime import configure_threads, device_report, use_backend
from service.metrics import Metrics
from service.record import DomainExists, RecordStore, RecordUnavailable, open_record
from service.settings import DEMO_DIR, Settings
from service.views import DeviceReport

if TYPE_CHECKING:
    from model.engine import InferenceEngine

_log = logging.getLogger(__name__)
DEMO_MARKER = "demo-seeded"


CPU_BATCH, DEVICE_BATCH = 32, 256  # a CPU's latency is best at small batches; an accelerator idles at them
QUEUE_BATCHES = 16


@dataclass(frozen=True)
class Batching:
    """The batcher's limits: `RA_MAX_BATCH_SIZE` and `RA_MAX_QUEUE`, or what fits the device when unset.
    At 32 images a batch, an accelerator at 50,000 img/s waits on the batching between calls of 0.6 ms
    (`bench.dispatch`: device busy 0.88 against 0.95 at 256)."""

    max_batch_size: int
    max_queue: int

    @classmethod
    def fit(cls, s: Settings, accelerated: bool) -> Batching:
        batch = s.max_batch_size or (DEVICE_BATCH if accelerated else CPU_BATCH)
        return cls(batch, s.max_queue or QUEUE_BATCHES * batch)


@dataclass
class Started:
    """What start-up built, for the core to own."""

    device: DeviceReport
    budget: residency.Budget
    backbone: Backbone
    engine: InferenceEngine
    registry: Registry
    batching: Batching


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


def start_engine(settings: Settings, metrics: Metrics, loader: Loader, cores: int | None) -> Started:
    """Backbone, engine, warm-up, the registry of record and the registry over them (blocking)."""
    s = settings
    t0 = time.perf_counter()
    use_backend(s.backend)  # before the framework is imported (by model.engine)
    from model.engine import InferenceEngine

    configure_threads(cores)
    device = device_report(s.compute_dtype, s.require_gpu)
    _log.info("%s", device.describe())
    backbone = load_backbone(s.backbone)
    batch = Batching.fit(s, accelerated=device.gpu or bool(s.simulated_device_img_s))
    headroom = s.load_concurrency + batch.max_batch_size + 8  # loads in flight; replaced slots still computing
    budget = residency.budget(s, device)
    row_bytes = InferenceEngine.row_bytes_for(backbone, s.compute_dtype)
    fits = budget.fits(row_bytes)
    # every slot the budget fits, allocated now: a table that grew later would copy itself (and
    # need twice its memory) while serving
    if s.simulated_device_img_s:
        from model.simulated import SimulatedDevice

        _log.warning("a simulated device at %g img/s: every answer is zeros", s.simulated_device_img_s)
        engine = SimulatedDevice(
            backbone, capacity=fits + headroom, compute_dtype=s.compute_dtype, img_s=s.simulated_device_img_s
        )
    else:
        engine = InferenceEngine(backbone, capacity=fits + headroom, compute_dtype=s.compute_dtype)
    _log.info(
        "residency: %d domains of %.2f MB fit in %.0f MB (%s)", fits, row_bytes / MB, budget.bytes / MB, budget.source
    )
    _log.info("batches of up to %d images, %d queued at most", batch.max_batch_size, batch.max_queue)
    engine.warm_up(sorted({1, 2, batch.max_batch_size}))
    record = open_record(s)
    limits = Limits(
        max_resident=s.max_resident,
        device_bytes=budget.bytes,
        host_cache_bytes=residency.host_cache_bytes(s, device, budget, row_bytes),
        load_concurrency=s.load_concurrency,
        load_timeout_s=s.load_timeout_s,
        pinned=s.pinned_domains,
    )
    loader.backbone = backbone
    registry = Registry(engine, record, metrics, loader, limits)
    if s.demo_adapters:
        try:
            seed_demo(record, backbone)
        except RecordUnavailable as exc:
            _log.warning("could not seed the demo bundles now: %s", exc)
    _log.info("engine warm in %.1fs; registry of record: %s", time.perf_counter() - t0, record.description)
    return Started(device, budget, backbone, engine, registry, batch)
