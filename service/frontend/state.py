"""What a front end holds while it runs, built in the lifespan (nothing at import).

Runs in every front-end process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

from service.client import EngineClient
from service.exceptions import EngineUnavailable
from service.frontend.access import Access
from service.frontend.inference import Inference
from service.metrics import Metrics
from service.settings import Settings
from service.views import EngineStatus


@dataclasses.dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    access: Access
    engine: EngineClient
    inference: Inference | None = None
    preprocess_pool: concurrent.futures.ThreadPoolExecutor | None = None
    started: bool = False  # the lifespan ran: the engine answers (or is being waited for)

    async def engine_status(self) -> EngineStatus | None:
        """The engine's status, or None while it is not answering."""
        try:
            return await self.engine.status()
        except EngineUnavailable:
            return None
