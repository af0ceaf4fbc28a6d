"""The app factory of a front end: `create_app(settings, engine, tables_dir)` wires routers, errors, limits
and the lifespan. Runs in every front-end process (and in the one process of `--workers 1`).

The app is HTTP, access, decoding and answers. Its engine is an `EngineClient`: with one worker the
engine core in the same process (`service.boot`, started by the lifespan); under the supervisor the
engine process (`service.transport.RemoteEngine`). This package imports neither the engine nor a
deep-learning framework. /readyz answers 200 once the engine is in step with the registry of record.
What every front end of a host must count once (rate limits, OIP statistics) lives in host tables:
files in the supervisor's run directory (`create_host_tables`), or this process's memory with one worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import pathlib
import re
import time

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import tracing
from service.client import EngineClient
from service.exceptions import EngineUnavailable
from service.frontend import audit, oip, rest, training
from service.frontend.access import (
    BUCKETS,
    Access,
    Denied,
    KeyRing,
    KeysFileError,
    Principal,
    RateLimits,
    is_audited,
)
from service.frontend.errors import (
    ERROR_CODE_HEADER,
    BodyTooLarge,
    error_response,
    install_error_handlers,
    refusal_response,
)
from service.frontend.host_table import HostTable, Layout
from service.frontend.inference import Inference
from service.frontend.state import ServiceState
from service.metrics import Metrics
from service.settings import Settings

_log = logging.getLogger(__name__)
STATIC_DIR = pathlib.Path(__file__).resolve().parent / "static"
RATE_LIMITS_TABLE, OIP_STATS_TABLE = "rate-limits.table", "oip-stats.table"
HOST_TABLES: dict[str, Layout] = {RATE_LIMITS_TABLE: BUCKETS, OIP_STATS_TABLE: oip.STATS}


class BodyLimit:
    """Refuse bodies over `limit` bytes (`paths` name other limits for some paths): by Content-Length at
    once, else while streaming."""

    def __init__(self, app: ASGIApp, limit: int, paths: dict[str, int] | None = None):
        self.app, self.default, self.paths = app, limit, paths or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.paths.get(scope["path"], self.default)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            response = error_response(
                413, "request_too_large", f"The request body is larger than {limit} bytes.", path=scope["path"]
            )
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


REQUEST_ID_HEADER, ERROR_CODE = b"x-request-id", ERROR_CODE_HEADER.encode()
REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")  # a caller's id is kept if printable ASCII, at most 128 long
_access_log = logging.getLogger("service.access")


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's `X-Request-ID` when it is a usable one, else a new one (16 hex digits)."""
    given = next((v for k, v in headers if k == REQUEST_ID_HEADER), None)
    if given is not None and REQUEST_ID.fullmatch(given):
        return given.decode("ascii")
    return os.urandom(8).hex()


class Gatekeeper:
    """Decide access (`service.frontend.access`) before the request body is received; give every request
    its id (`X-Request-ID`, answered back); record its route, status, error code, latency and key, and
    its access line (`RA_ACCESS_LOG`); write the audit line of every management call (pure ASGI: no
    extra task per request)."""

    def __init__(self, app: ASGIApp, state: ServiceState):
        self.app, self.state = app, state
        self._latency: dict[str, object] = {}  # each route's histogram child, looked up once
        self._access_log = state.settings.access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        method, path = scope["method"], scope["path"]
        request_id = request_id_of(scope["headers"])
        request_state = scope.setdefault("state", {})
        request_state["request_id"] = request_id
        if tracing.enabled:  # FastAPI's own server span (FastAPI(telemetry=...)) is the request's
            request_state["trace_id"] = tracing.tag_request(request_id)
        status, error = 500, None

        async def send_and_watch(message: Message) -> None:
            nonlocal status, error
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                error = next((v.decode("latin-1") for k, v in headers if k == ERROR_CODE), None)
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, request_id.encode("ascii"))]}
            await send(message)

        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
        try:
            principal = self.state.access.decide(method, path, authorization)
        except Denied as denied:
            refusal = refusal_response(denied.reason, path)
            await refusal(scope, receive, send_and_watch)
            self._record(scope, status, error, start, denied.principal)
            return
        request_state["principal"] = principal
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self._record(scope, status, error, start, principal)

    def _record(self, scope: Scope, status: int, error: str | None, start: float, principal: Principal | None) -> None:
        """The request's metrics: the counts once per event-loop turn (`Tally`), the latency now."""
        metrics = self.state.metrics
        path = getattr(scope.get("route"), "path", "unmatched")
        latency = self._latency.get(path)
        if latency is None:
            latency = self._latency[path] = metrics.latency.labels(path)
        seconds = time.perf_counter() - start
        latency.observe(seconds)
        key = principal.name if principal is not None else "-"
        code = str(status)
        metrics.tally.add(metrics.requests, 1, path, code)
        metrics.tally.add(metrics.key_requests, 1, key, code)
        if error is not None:
            metrics.tally.add(metrics.errors, 1, error)
        state = scope.get("state", {})
        if self._access_log:
            _access_log.info(
                "%s %s %d %.1f ms",
                scope["method"],
                scope["path"],
                status,
                seconds * 1000,
                extra={
                    "request_id": state.get("request_id"),
                    "trace_id": state.get("trace_id"),
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": path,
                    "status": status,
                    "error": error,
                    "ms": round(seconds * 1000, 2),
                    "domain": scope.get("path_params", {}).get("domain"),
                    "tenant": key,
                },
            )
        if is_audited(scope["method"], scope["path"]):
            audit.write(key, scope["method"], scope["path"], status, state.get("audit"))


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


async def report_engine(state: ServiceState, interval_s: float = 1.0) -> None:
    """`ra_engine_unreachable`: whether this front end misses the engine (the alert on an engine down)."""
    while True:
        state.metrics.engine_unreachable.set(0 if state.engine.connected else 1)
        await asyncio.sleep(interval_s)


def document_bearer_auth(app: FastAPI) -> None:
    """Declare the bearer key in the OpenAPI document, so /docs offers "Authorize". Documentation only:
    the Gatekeeper (`service.frontend.access`) decides."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key from RA_API_KEYS_FILE, or RA_ADMIN_TOKEN (management)",
                }
            }
            schema["security"] = [{}, {"bearer": []}]  # optional without a keys file
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_host_tables(directory: str | os.PathLike) -> None:
    """Make the files of every host table in `directory`: the supervisor does, before any front end starts."""
    for name, layout in HOST_TABLES.items():
        HostTable.create(pathlib.Path(directory) / name, layout)


def host_table(directory: str | os.PathLike | None, name: str) -> HostTable:
    """The host table `name`: its file in `directory`, or this process's memory when `directory` is None."""
    return HostTable(HOST_TABLES[name], None if directory is None else pathlib.Path(directory) / name)


def create_app(
    settings: Settings,
    engine: EngineClient,
    tables_dir: str | os.PathLike | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """A front end over `engine` (`service.boot` hands it the engine core of this process, sharing `metrics`;
    the supervisor hands it the engine process), counting rate limits and OIP statistics in the host tables
    of `tables_dir` (made by `create_host_tables`; shared with the host's other front ends) or, when None,
    in this process."""
    keyring = KeyRing(settings.api_keys_file) if settings.api_keys_file is not None else None
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
    access = Access(admin_token, keyring, RateLimits(host_table(tables_dir, RATE_LIMITS_TABLE)))
    stats = oip.Statistics(host_table(tables_dir, OIP_STATS_TABLE))
    state = ServiceState(settings=settings, metrics=metrics or Metrics(), access=access, engine=engine)
    if keyring is not None:
        state.metrics.keys_loaded.set(len(keyring.keys))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.preprocess_pool = concurrent.futures.ThreadPoolExecutor(
            settings.preprocess_threads, thread_name_prefix="preprocess"
        )
        state.inference = Inference(state.engine, settings, state.preprocess_pool)
        await state.engine.start()
        with contextlib.suppress(EngineUnavailable):  # a restarting engine: the default until the next start
            state.inference.follow_residency((await state.engine.status()).residency)
        keys = asyncio.create_task(follow_keys(state)) if keyring is not None else None
        engine_watch = asyncio.create_task(report_engine(state))
        grpc_server = None
        if settings.grpc_port is not None:
            from service.frontend import oip_grpc  # grpcio and the protocol's messages, only when asked for

            grpc_server = await oip_grpc.start_server(state, stats, settings.host, settings.grpc_port)
        state.started = True
        try:
            yield
        finally:
            state.started = False
            if grpc_server is not None:
                await grpc_server.stop(grace=5)
            engine_watch.cancel()
            if keys is not None:
                keys.cancel()
            await state.engine.stop()
            state.preprocess_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="Residual adapters",
        version="0.1.0",
        lifespan=lifespan,
        description="Many image classifiers served from one ResNet-26 backbone with per-domain residual adapters.",
    )
    app.state.service = state
    install_error_handlers(app)
    app.include_router(rest.predict)  # first: routes are matched in order, and most requests predict
    app.include_router(rest.health)
    app.include_router(rest.adapters)
    app.include_router(training.training)
    oip.install(app, stats)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        """The web page: try domains, manage adapters."""
        return FileResponse(STATIC_DIR / "index.html")

    document_bearer_auth(app)
    app.add_middleware(  # inside the Gatekeeper (the last added is outermost): a 413 is counted and logged
        BodyLimit,
        limit=settings.max_request_bytes,
        paths={"/training/jobs": settings.max_training_upload_bytes + 64 * 1024},  # multipart overhead
    )
    app.add_middleware(Gatekeeper, state=state)
    return app
