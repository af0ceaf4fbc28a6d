"""The one-process service (`--workers 1`): a front end's app over the engine core in the same process.

With the supervisor (`service.supervisor`) this is the only module that wires both sides: the front end
(`service.frontend`) never imports the engine, so whoever starts a process hands it its engine.
`uvicorn service.boot:single_process_app --factory` serves it too.
"""

from __future__ import annotations

from fastapi import FastAPI

from service.client import LocalEngine
from service.frontend.app import create_app
from service.metrics import Metrics
from service.settings import Settings


def single_process_app(settings: Settings | None = None) -> FastAPI:
    """The app over the engine core of this process, both counting in one `Metrics` (one /metrics page)."""
    from service.engine.core import EngineCore  # imports the framework: only when this process computes

    settings = settings or Settings()
    metrics = Metrics(settings.metrics_domains)
    return create_app(settings, LocalEngine(EngineCore(settings, metrics)), metrics=metrics)
