"""The HTTP routes. Thin: parse, call the registry / batcher, shape the answer.

Errors are raised as the model's and service's own exceptions and mapped to HTTP once, in
`service.errors`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Annotated

import numpy as np
from PIL import Image
from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from model.bundle import AdapterBundle
from model.preprocessing import ImageDecodeError, open_image, preprocess
from service import schemas
from service.access import ANYONE, Principal
from service.errors import ApiError
from service.registry import Entry, UnknownDomainError
from service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


async def get_ready_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    if not state.started:
        raise ApiError(503, "not_ready", "The service is still loading the backbone and adapters; retry shortly.")
    return state


async def get_principal(request: Request) -> Principal:
    """Who the request acts for, as the Gatekeeper decided (`service.access`)."""
    return request.state.principal


StateDep = Annotated[ServiceState, Depends(get_state)]
ReadyDep = Annotated[ServiceState, Depends(get_ready_state)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]


def lane_of(principal: Principal) -> str | None:
    """The batcher's fairness lane: the key, or (no keys file) each image's domain."""
    return None if principal is ANYONE else principal.name


async def visible_page(state: ServiceState, principal: Principal, prefix: str, cursor: str | None,
                       count: int) -> list[tuple[str, int, Entry | None]]:
    """Up to `count` (name, version, entry) of the domains the principal may see, in name order after
    `cursor`; narrowed by the literal prefix every one of its patterns starts with."""
    if principal.every_domain:
        return await state.registry.list_page(prefix, cursor, count)
    if principal.prefix.startswith(prefix):
        prefix = principal.prefix
    elif not prefix.startswith(principal.prefix):
        return []
    rows: list[tuple[str, int, Entry | None]] = []
    step = max(count, 256)
    while len(rows) < count:
        page = await state.registry.list_page(prefix, cursor, step)
        rows += [row for row in page if principal.may_use(row[0])]
        if len(page) < step:
            break
        cursor = page[-1][0]
    return rows[:count]


ERRORS = {code: {"model": schemas.Error} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503, 504)}

health = APIRouter(tags=["health"])
predict = APIRouter(prefix="/predict", tags=["predict"])
adapters = APIRouter(prefix="/adapters", tags=["adapters"])


# ----- health -------------------------------------------------------------------------------

@health.get("/healthz", response_model=schemas.Health)
async def healthz() -> schemas.Health:
    return schemas.Health(status="ok")


def _sync(state: ServiceState) -> schemas.RegistrySync | None:
    """How far behind the registry of record this process is; also refreshes the sync gauges."""
    registry = state.registry
    if registry is None:
        return None
    s = registry.status
    lag = 0.0 if s.connected else (time.monotonic() - s.last_ok if s.last_ok else None)
    behind = registry.behind()
    state.metrics.sync_lag.set(lag if lag is not None else float("inf"))
    state.metrics.sync_behind.set(len(behind))
    return schemas.RegistrySync(record=registry.record.description, connected=s.connected, synced=s.synced_once,
                                lag_s=lag, last_sync_at=s.last_ok_wall or None, domains_behind=behind[:20],
                                errors=s.errors, last_error=s.last_error, warming=s.warming)


@health.get("/readyz", response_model=schemas.Ready, responses={503: {"model": schemas.Ready}})
async def readyz(state: StateDep, response: Response) -> schemas.Ready:
    if not state.ready:
        response.status_code = 503
    return schemas.Ready(ready=state.ready, pid=os.getpid(), workers=state.settings.workers,
                         adapters=len(state.registry.entries()) if state.registry else 0,
                         backbone_fingerprint=state.backbone.fingerprint if state.backbone else None,
                         registry=_sync(state))


@health.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(state: StateDep) -> Response:
    state.metrics.queue_depth.set(state.batcher.depth if state.batcher else 0)
    _sync(state)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ----- prediction ---------------------------------------------------------------------------

async def _read_image(upload: UploadFile, state: ServiceState) -> bytes:
    limit = state.settings.max_image_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "image_too_large", f"{upload.filename!r} is larger than {limit} bytes; send a smaller image.")
    if not data:
        raise ApiError(400, "empty_file", f"{upload.filename!r} is empty.")
    return data


def decode_and_preprocess(data: bytes, bundles: list[AdapterBundle], max_pixels: int) -> list[np.ndarray]:
    """One input per bundle; the image is decoded once per distinct `resize` (a JPEG at the reduced scale
    that size allows, exactly as training's evaluation decodes it)."""
    decoded: dict[int, Image.Image] = {}
    out = []
    for bundle in bundles:
        side = bundle.preprocessing.resize
        if side not in decoded:
            decoded[side] = open_image(data, max_pixels, min_side=side)
        out.append(preprocess(decoded[side], bundle.preprocessing))
    return out


INLINE_PIXELS = 256 * 256
INLINE_BYTES = 256 * 1024
"""An image of at most `INLINE_PIXELS` (shared among the domains it is prepared for) and `INLINE_BYTES`
is decoded on the event loop: handing it to a thread costs more CPU than decoding it (`python -m
bench.serve`, 48x48 PNGs: 608 -> 702 img/s). Larger ones, told apart by their size and header before
any pixel is decoded, go to the preprocess pool, so that no upload holds the event loop for long."""


async def decode_inputs(state: ServiceState, raw: list[bytes], bundles: list[AdapterBundle]) -> list[list[np.ndarray]]:
    """`decode_and_preprocess` of every image: small ones here, large ones in the pool, in parallel."""
    limit = state.settings.max_image_pixels
    inline_limit = min(limit, INLINE_PIXELS // len(bundles))
    inputs: list[list[np.ndarray] | None] = []
    for data in raw:
        if len(data) > INLINE_BYTES:
            inputs.append(None)
            continue
        try:
            inputs.append(decode_and_preprocess(data, bundles, inline_limit))
        except ImageDecodeError as exc:  # a header over the inline limit: nothing was decoded yet
            if exc.code != "too_many_pixels" or inline_limit == limit:
                raise
            inputs.append(None)
    large = [i for i, x in enumerate(inputs) if x is None]
    loop = asyncio.get_running_loop()
    done = await asyncio.gather(*(loop.run_in_executor(state.preprocess_pool, decode_and_preprocess, raw[i], bundles,
                                                       limit) for i in large))
    for i, x in zip(large, done):
        inputs[i] = x
    return inputs


def _top_k(logits: np.ndarray, labels: tuple[str, ...], k: int) -> list[schemas.Prediction]:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")[:k]
    return [schemas.Prediction(label=labels[i], index=int(i), score=float(p[i])) for i in order]


async def _classify(state: ServiceState, uploads: list[UploadFile], entries: list[Entry], lane: str | None):
    """Decode every upload, then run all (image, domain) pairs through the batcher.

    The entries are leased (see `Registry.acquire`); they are returned here, whatever happens."""
    try:
        if not uploads:
            raise ApiError(400, "no_file", "Send the image as the multipart field 'file'.")
        if len(uploads) > state.settings.max_files:
            raise ApiError(413, "too_many_files", f"At most {state.settings.max_files} images per request.")
        start = time.perf_counter()
        raw = [await _read_image(u, state) for u in uploads]
        inputs = await decode_inputs(state, raw, [e.card for e in entries])
        decoded = time.perf_counter()
        images = [x for per_image in inputs for x in per_image]
        per_image = [e for _ in inputs for e in entries]
        async with asyncio.timeout(state.settings.request_timeout_s):  # no extra task, unlike wait_for
            outputs = await state.batcher.predict(images, per_image, lane)
        done = time.perf_counter()
        timing = schemas.Timing(total_ms=(done - start) * 1000, preprocess_ms=(decoded - start) * 1000,
                                inference_ms=(done - decoded) * 1000)
        for entry in entries:
            state.metrics.predictions.labels(entry.domain).inc(len(uploads))
        return outputs, timing
    finally:
        state.registry.release(entries, images=len(uploads))


TopK = Annotated[int, Form(ge=1, le=1000, description="how many classes to return")]


@predict.post("/{domain}", response_model=schemas.PredictResponse, responses=ERRORS)
async def predict_domain(domain: str, state: ReadyDep, principal: PrincipalDep,
                         file: Annotated[list[UploadFile], File()], top_k: TopK = 5) -> schemas.PredictResponse:
    """Classify one image (or several `file` fields) with one domain's adapter (loaded first if it is not
    resident)."""
    entry = await state.registry.acquire(domain)
    outputs, timing = await _classify(state, file, [entry], lane_of(principal))
    results = [schemas.ImageResult(filename=u.filename, predictions=_top_k(logits, entry.card.labels, top_k))
               for u, (logits, *_) in zip(file, outputs)]
    return schemas.PredictResponse(domain=domain, version=outputs[0].version, predictions=results[0].predictions,
                                   results=results, timing=timing)


async def _acquire_all(state: ServiceState, names: list[str]) -> list[Entry]:
    """Lease every named domain (loading in parallel); on any failure return the leases taken."""
    got = await asyncio.gather(*(state.registry.acquire(d) for d in names), return_exceptions=True)
    failed = next((g for g in got if isinstance(g, BaseException)), None)
    if failed is not None:
        state.registry.release([g for g in got if not isinstance(g, BaseException)])
        raise failed
    return got


@predict.post("", response_model=schemas.FanoutResponse, responses=ERRORS)
async def predict_fanout(state: ReadyDep, principal: PrincipalDep, file: Annotated[UploadFile, File()],
                         domains: Annotated[str, Form(description="comma-separated domains, or 'all'")] = "all",
                         top_k: TopK = 5) -> schemas.FanoutResponse:
    """Classify one image with several domains at once (one batch): the named ones, or every one the key
    may see."""
    limit = state.settings.max_fanout
    if domains.strip() == "all":
        names = [name for name, _, _ in await visible_page(state, principal, "", None, limit + 1)]
    else:
        names = list(dict.fromkeys(d.strip() for d in domains.split(",") if d.strip()))
        hidden = next((name for name in names if not principal.may_use(name)), None)
        if hidden is not None:
            raise UnknownDomainError(hidden)
    if not names:
        raise ApiError(400, "no_domains", "No domain is registered or named; GET /adapters lists them.")
    if len(names) > limit:
        raise ApiError(400, "too_many_domains", f"At most {limit} domains per request (RA_MAX_FANOUT); "
                                                "name the domains you need instead of 'all'.")
    entries = await _acquire_all(state, names)
    outputs, timing = await _classify(state, [file], entries, lane_of(principal))
    results = [schemas.DomainResult(domain=e.domain, version=v, predictions=_top_k(logits, e.card.labels, top_k))
               for e, (logits, v, *_) in zip(entries, outputs)]
    return schemas.FanoutResponse(filename=file.filename, results=results, timing=timing)


# ----- adapters -----------------------------------------------------------------------------

def _summary(entry: Entry, state: ServiceState) -> dict:
    val = entry.card.metrics.get("val_top1")
    return {"domain": entry.domain, "version": entry.version, "num_classes": entry.card.num_classes,
            "val_top1": float(val) if isinstance(val, (int, float)) else None, "params": entry.params,
            "served": entry.served, "tier": entry.tier, "pinned": state.registry.is_pinned(entry.domain)}


def _info(entry: Entry, state: ServiceState) -> schemas.AdapterInfo:
    b = entry.card
    return schemas.AdapterInfo(
        **_summary(entry, state), labels=list(b.labels), adapter=b.config.adapter, metrics=dict(b.metrics),
        preprocessing=schemas.Preprocessing(**b.preprocessing.to_json()),
        backbone_fingerprint=b.backbone_fingerprint, registered_at=entry.registered_at,
        size_bytes=entry.size_bytes, sha256=entry.sha256, load_ms=entry.load_ms,
        golden_self_test=entry.golden_self_test,
        record_version=state.registry.recorded_version(entry.domain) or entry.version)


@adapters.get("", response_model=schemas.AdapterList, responses=ERRORS)
async def list_adapters(
    state: ReadyDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="domains per page")] = 100,
    cursor: Annotated[str | None, Query(max_length=63, description="`next_cursor` of the previous page")] = None,
    prefix: Annotated[str, Query(max_length=63, description="only domains whose name starts with this")] = "",
) -> schemas.AdapterList:
    """Registered domains (those the key may see) in name order, a page at a time; cached ones with their
    details and tier."""
    rows = await visible_page(state, principal, prefix, cursor, limit + 1)
    page = rows[:limit]
    items = [schemas.AdapterSummary(**_summary(entry, state)) if entry is not None else
             schemas.AdapterSummary(domain=name, version=version, tier="registry",
                                    pinned=state.registry.is_pinned(name))
             for name, version, entry in page]
    return schemas.AdapterList(adapters=items, next_cursor=page[-1][0] if len(rows) > limit else None,
                               backbone_fingerprint=state.backbone.fingerprint)


@adapters.get("/{domain}", response_model=schemas.AdapterInfo, responses=ERRORS)
async def get_adapter(domain: str, state: ReadyDep) -> schemas.AdapterInfo:
    """One domain: the version served here (and its tier) and the version in the registry of record."""
    return _info(await state.registry.describe(domain), state)


@adapters.post("", response_model=schemas.AdapterInfo, status_code=201, responses=ERRORS)
async def register_adapter(
    request: Request,
    state: ReadyDep,
    bundle: Annotated[UploadFile, File(description="the adapter bundle (.safetensors)")],
    replace: Annotated[bool, Form(description="replace an existing domain with a new version")] = False,
    domain: Annotated[str | None, Form(description="serve under this name instead of the bundle's")] = None,
    pin: Annotated[bool | None, Form(description="pin (true) or unpin (false): a pinned domain is loaded at start "
                                                  "and never evicted; unset leaves it as it was")] = None,
) -> schemas.AdapterInfo:
    """Register a domain from its bundle: validated completely, recorded durably, then answered.

    Needs an admin key (or `RA_ADMIN_TOKEN`)."""
    limit = state.settings.max_bundle_bytes
    audit = request.state.audit = {"action": "replace" if replace else "register", "domain": domain or None}
    data = await bundle.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "bundle_too_large", f"The bundle is larger than {limit} bytes (RA_MAX_BUNDLE_BYTES).")
    audit["sha256"] = hashlib.sha256(data).hexdigest()
    entry = await state.registry.register(data, replace=replace, domain=domain or None, pin=pin)
    audit.update(domain=entry.domain, version=entry.version)
    return _info(entry, state)


@adapters.delete("/{domain}", response_model=schemas.AdapterSummary, responses=ERRORS)
async def delete_adapter(domain: str, request: Request, state: ReadyDep) -> schemas.AdapterSummary:
    """Stop serving the domain everywhere (needs an admin key)."""
    version, entry = await state.registry.delete(domain)
    request.state.audit = {"version": version, "sha256": entry.sha256 if entry is not None else None}
    if entry is not None:
        return schemas.AdapterSummary(**_summary(entry, state))
    return schemas.AdapterSummary(domain=domain, version=version, tier="registry")


@adapters.post("/{domain}/rollback", response_model=schemas.AdapterInfo, responses=ERRORS)
async def rollback_adapter(domain: str, request: Request, state: ReadyDep) -> schemas.AdapterInfo:
    """Serve the previous version again; the newer ones are dropped (needs an admin key)."""
    entry = await state.registry.rollback(domain)
    request.state.audit = {"version": entry.version, "sha256": entry.sha256}
    return _info(entry, state)
