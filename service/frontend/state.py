"""What a front end holds while it runs, built in the lifespan (nothing at import).

Runs in every front-end process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from typing import Any

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
    _jobs: Any = None  # the training job list, opened on first use (`training_jobs`)

    async def training_jobs(self):
        """The training job list beside the registry of record (`training.jobs.open_jobs`), opened once."""
        if self._jobs is None:
            from training.jobs import open_jobs

            self._jobs = await asyncio.to_thread(open_jobs, self.settings.jobs_location, self.settings.training_lease_s)
        return self._jobs

    async def engine_status(self) -> EngineStatus | None:
        """The engine's status, or None while it is not answering."""
        try:
            return await self.engine.status()
        except EngineUnavailable:
            return None
