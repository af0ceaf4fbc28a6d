"""The app factory: `create_app(settings)` wires routers, errors, limits and the lifespan.

The lifespan loads the backbone, seeds an empty store with the demo bundles (once), loads and
warms every stored domain, then starts the batcher; /readyz answers 200 only after that.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import logging
import pathlib
import time

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.backbone import Backbone, load_backbone
from model.bundle import load_bundle
from model.engine import InferenceEngine
from model.safetensors_io import InvalidFileError
from service import api
from service.batcher import DynamicBatcher
from service.errors import ApiError, BodyTooLarge, error_response, install_error_handlers
from service.metrics import Metrics
from service.registry import Registry
from service.settings import DEMO_DIR, Settings
from service.state import ServiceState
from service.store import BundleStore

_log = logging.getLogger(__name__)
STATIC_DIR = pathlib.Path(__file__).resolve().parent / "static"
DEMO_MARKER = "demo-seeded"


class BodyLimit:
    """Refuse bodies over `limit` bytes: by Content-Length at once, else while streaming."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = error_response(413, "request_too_large", f"The request body is larger than {self.limit} bytes.")
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


class Gatekeeper:
    """Refuse management calls without the admin token before their body is received, and record
    every request's route, domain, status and latency (pure ASGI: no extra task per request)."""

    def __init__(self, app: ASGIApp, state: ServiceState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500
        if scope["method"] in ("POST", "DELETE") and scope["path"].startswith("/adapters"):
            headers = dict(scope["headers"])
            try:
                api.check_admin(headers.get(b"authorization", b"").decode("latin-1"), self.state.settings.admin_token)
            except ApiError as exc:
                status = exc.status
                await error_response(exc.status, exc.code, exc.detail, exc.headers)(scope, receive, send)
                self._record(scope, status, start)
                return

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self._record(scope, status, start)

    def _record(self, scope: Scope, status: int, start: float) -> None:
        metrics, registry = self.state.metrics, self.state.registry
        path = getattr(scope.get("route"), "path", "unmatched")
        domain = scope.get("path_params", {}).get("domain", "")
        if domain and (registry is None or domain not in registry):
            domain = "unknown"
        metrics.requests.labels(path, domain, str(status)).inc()
        metrics.latency.labels(path, domain).observe(time.perf_counter() - start)


def seed_demo(store: BundleStore, backbone: Backbone) -> None:
    """Copy the shipped demo bundles into an empty store, once (a deleted demo stays deleted)."""
    if store.has_marker(DEMO_MARKER):
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
        if not store.versions(bundle.domain):
            store.write(bundle.domain, 1, data)
    store.set_marker(DEMO_MARKER)


def startup(state: ServiceState) -> None:
    """Blocking start-up work: backbone, store, engine, warm-up."""
    s = state.settings
    t0 = time.perf_counter()
    state.backbone = load_backbone(s.backbone)
    state.engine = InferenceEngine(state.backbone, capacity=s.capacity, compute_dtype=s.compute_dtype)
    store = BundleStore(s.store_dir)
    if s.demo_adapters:
        seed_demo(store, state.backbone)
    state.registry = Registry(state.backbone, state.engine, store, state.metrics)
    state.registry.load_store()
    state.engine.warm_up(sorted({1, 2, s.max_batch_size}))
    _log.info("ready: %d domains in %.1fs", len(state.registry.entries()), time.perf_counter() - t0)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ServiceState(settings=settings, metrics=Metrics())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        import asyncio

        state.preprocess_pool = concurrent.futures.ThreadPoolExecutor(settings.preprocess_threads,
                                                                      thread_name_prefix="preprocess")
        await asyncio.to_thread(startup, state)
        state.batcher = DynamicBatcher(state.engine, settings.max_batch_size, settings.max_wait_ms,
                                       settings.max_queue, state.metrics)
        await state.batcher.start()
        gc.collect()
        gc.freeze()  # the loaded framework's objects live forever: keep them out of full collections
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            await state.batcher.stop()
            state.preprocess_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Residual adapters", version="0.1.0", lifespan=lifespan,
                  description="Many image classifiers served from one ResNet-26 backbone with per-domain "
                              "residual adapters.")
    app.state.service = state
    install_error_handlers(app)
    app.include_router(api.health)
    app.include_router(api.predict)
    app.include_router(api.adapters)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        """The web page: try domains, manage adapters."""
        return FileResponse(STATIC_DIR / "index.html")

    app.add_middleware(Gatekeeper, state=state)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    return app
