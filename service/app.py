"""The app factory: `create_app(settings)` wires routers, errors, limits and the lifespan.

The lifespan loads the backbone, warms the engine, opens the registry of record (seeding it once
with the demo bundles), syncs every domain from it, then starts the batcher and the follower that
keeps this process in step with the record; /readyz answers 200 once the first sync is done.
"""

from __future__ import annotations

import asyncio
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
from service import api, oip
from service import audit
from service.access import Access, Denied, KeyRing, KeysFileError, Principal, is_management
from service.batcher import DynamicBatcher
from service.errors import BodyTooLarge, error_response, install_error_handlers, unknown_domain_response
from service.follower import Follower
from service.metrics import Metrics
from service.record import DomainExists, RecordStore, RecordUnavailable, open_record
from service.registry import MB, Limits, Registry, UnknownDomainError
from service.runtime import configure_tensorflow
from service.settings import DEMO_DIR, Settings
from service.state import ServiceState

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
            response = error_response(413, "request_too_large", f"The request body is larger than {self.limit} bytes.",
                                      path=scope["path"])
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
    """Decide access (`service.access`) before the request body is received, and record every request's
    route, status, latency and key; write the audit line of every management call (pure ASGI: no extra
    task per request)."""

    def __init__(self, app: ASGIApp, state: ServiceState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        method, path = scope["method"], scope["path"]
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
        try:
            principal = self.state.access.decide(method, path, authorization)
        except Denied as denied:
            reason = denied.reason
            refusal = (unknown_domain_response(reason, path) if isinstance(reason, UnknownDomainError) else
                       error_response(reason.status, reason.code, reason.detail, reason.headers, path))
            await refusal(scope, receive, send)
            self._record(scope, refusal.status_code, start, denied.principal)
            return
        request_state = scope.setdefault("state", {})
        request_state["principal"] = principal
        status = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self._record(scope, status, start, principal)

    def _record(self, scope: Scope, status: int, start: float, principal: Principal | None) -> None:
        metrics = self.state.metrics
        path = getattr(scope.get("route"), "path", "unmatched")
        metrics.requests.labels(path, str(status)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - start)
        key = principal.name if principal is not None else "-"
        metrics.key_requests.labels(key, str(status)).inc()
        if is_management(scope["method"], scope["path"]):
            audit.write(key, scope["method"], scope["path"], status, scope.get("state", {}).get("audit"))


async def follow_keys(state: ServiceState) -> None:
    """Reload RA_API_KEYS_FILE when it changes; a bad file keeps the last good keys (logged, counted)."""
    keyring = state.access.keyring
    while True:
        await asyncio.sleep(state.settings.api_keys_poll_s)
        try:
            if await asyncio.to_thread(keyring.reload_if_changed):
                state.metrics.keys_loaded.set(len(keyring.keys))
                _log.info("reloaded %d API keys from %s", len(keyring.keys), keyring.path)
        except KeysFileError as exc:
            state.metrics.keys_reload_errors.inc()
            _log.error("%s Keeping the %d keys loaded before.", exc, len(keyring.keys))


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


def startup(state: ServiceState) -> None:
    """Blocking start-up work: backbone, engine, warm-up, the registry of record."""
    s = state.settings
    t0 = time.perf_counter()
    configure_tensorflow(s.workers)
    state.backbone = load_backbone(s.backbone)
    headroom = s.load_concurrency + s.max_batch_size + 8  # loads in flight; replaced slots still computing
    state.engine = InferenceEngine(state.backbone, capacity=min(s.capacity, s.max_resident + headroom),
                                   compute_dtype=s.compute_dtype, capacity_step=s.max_resident + headroom)
    state.engine.warm_up(sorted({1, 2, s.max_batch_size}))
    record = open_record(s)
    limits = Limits(max_resident=s.max_resident, host_cache_bytes=int(s.host_cache_mb * MB),
                    load_concurrency=s.load_concurrency, load_timeout_s=s.load_timeout_s, pinned=s.pinned_domains)
    state.registry = Registry(state.backbone, state.engine, record, state.metrics, limits)
    if s.demo_adapters:
        try:
            seed_demo(record, state.backbone)
        except RecordUnavailable as exc:
            _log.warning("could not seed the demo bundles now: %s", exc)
    _log.info("engine warm in %.1fs; registry of record: %s", time.perf_counter() - t0, record.description)


async def warm_most_used(registry: Registry, count: int) -> None:
    """After start: load the most used domains (usage counts kept in the record), then, while room
    is left, the first ones by name, so a small registry is entirely resident as before."""
    registry.status.warming = True
    try:
        names = await asyncio.to_thread(registry.record.top_used, count)
        if len(names) < count:
            listed = await asyncio.to_thread(registry.record.list_domains, "", None, count)
            names += [name for name, _ in listed if name not in names][: count - len(names)]
        t0 = time.perf_counter()
        loaded = await registry.warm(names)
        _log.info("warmed %d domains in %.1fs", loaded, time.perf_counter() - t0)
    except RecordUnavailable as exc:
        _log.warning("not warming domains: %s", exc)
    finally:
        registry.status.warming = False


def document_bearer_auth(app: FastAPI) -> None:
    """Declare the bearer key in the OpenAPI document, so /docs offers "Authorize". Documentation only:
    the Gatekeeper (`service.access`) decides."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "An API key from RA_API_KEYS_FILE, or RA_ADMIN_TOKEN (management)"}}
            schema["security"] = [{}, {"bearer": []}]  # optional without a keys file
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    keyring = KeyRing(settings.api_keys_file) if settings.api_keys_file is not None else None
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
    state = ServiceState(settings=settings, metrics=Metrics(), access=Access(admin_token, keyring))
    if keyring is not None:
        state.metrics.keys_loaded.set(len(keyring.keys))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.preprocess_pool = concurrent.futures.ThreadPoolExecutor(settings.preprocess_threads,
                                                                      thread_name_prefix="preprocess")
        await asyncio.to_thread(startup, state)
        registry = state.registry
        t0 = time.perf_counter()
        share = max(settings.max_batch_size, int(settings.max_queue * settings.domain_queue_share))
        state.batcher = DynamicBatcher(state.engine, settings.max_batch_size, settings.max_wait_ms, settings.max_queue,
                                       state.metrics, domain_share=min(share, settings.max_queue))
        await state.batcher.start()
        try:  # readiness needs the pinned domains only; the most used ones warm in the background
            await registry.refresh_flags()
            pinned = await registry.warm(registry.pinned_domains())
            await registry.resync()
            _log.info("ready: %d pinned domains loaded in %.1fs", pinned, time.perf_counter() - t0)
        except RecordUnavailable:
            _log.warning("not ready: the registry of record is unreachable; retrying in the background")
        state.follower = Follower(registry, registry.record, settings.resync_interval_s)
        state.follower.start()
        warming = asyncio.create_task(warm_most_used(registry, settings.max_resident))
        keys = asyncio.create_task(follow_keys(state)) if keyring is not None else None
        gc.collect()
        gc.freeze()  # the loaded framework's objects live forever: keep them out of full collections
        state.started = True
        try:
            yield
        finally:
            state.started = False
            warming.cancel()
            if keys is not None:
                keys.cancel()
            await state.follower.stop()
            await state.batcher.stop()
            state.preprocess_pool.shutdown(wait=False, cancel_futures=True)
            with contextlib.suppress(RecordUnavailable):
                await registry.flush_usage()  # so that the next start warms what was used
            registry.close()

    app = FastAPI(title="Residual adapters", version="0.1.0", lifespan=lifespan,
                  description="Many image classifiers served from one ResNet-26 backbone with per-domain "
                              "residual adapters.")
    app.state.service = state
    install_error_handlers(app)
    app.include_router(api.health)
    app.include_router(api.predict)
    app.include_router(api.adapters)
    oip.install(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        """The web page: try domains, manage adapters."""
        return FileResponse(STATIC_DIR / "index.html")

    document_bearer_auth(app)
    app.add_middleware(Gatekeeper, state=state)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    return app
