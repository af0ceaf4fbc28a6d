"""What the app holds while it runs, built in the lifespan (nothing at import)."""

from __future__ import annotations

import concurrent.futures
import dataclasses

from model.backbone import Backbone
from model.engine import InferenceEngine
from service.access import Access
from service.batcher import DynamicBatcher
from service.follower import Follower
from service.metrics import Metrics
from service.registry import Registry
from service.settings import Settings


@dataclasses.dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    access: Access
    backbone: Backbone | None = None
    engine: InferenceEngine | None = None
    registry: Registry | None = None
    follower: Follower | None = None
    batcher: DynamicBatcher | None = None
    preprocess_pool: concurrent.futures.ThreadPoolExecutor | None = None
    started: bool = False  # backbone loaded, engine warm, batcher running

    @property
    def ready(self) -> bool:
        """Started, and in step with the registry of record at least once."""
        return self.started and self.registry is not None and self.registry.status.synced_once
