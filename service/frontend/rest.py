"""The REST routes: a codec over the inference path (`service.frontend.inference`) and the engine's operations
(`service.client`). Parse the request, call, shape the answer.

Errors are raised as the model's and service's own exceptions and mapped to HTTP once, in
`service.frontend.errors`.

Runs in every front-end process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Annotated

import msgspec
import numpy as np
from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile

from service.exceptions import UnknownDomainError
from service.frontend import schemas
from service.frontend.access import ANYONE, Principal
from service.frontend.errors import ApiError
from service.frontend.inference import softmax
from service.frontend.state import ServiceState
from service.metrics import exposition
from service.views import Card, Row


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


async def get_ready_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    if not state.started:
        raise ApiError(503, "not_ready", "The service is still loading the backbone and adapters; retry shortly.")
    return state


async def get_principal(request: Request) -> Principal:
    """Who the request acts for, as the Gatekeeper decided (`service.frontend.access`)."""
    return request.state.principal


StateDep = Annotated[ServiceState, Depends(get_state)]
ReadyDep = Annotated[ServiceState, Depends(get_ready_state)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]


def lane_of(principal: Principal) -> str | None:
    """The batcher's fairness lane: the key, or (no keys file) each image's domain."""
    return None if principal is ANYONE else principal.name


async def visible_page(
    state: ServiceState, principal: Principal, prefix: str, cursor: str | None, count: int
) -> list[Row]:
    """Up to `count` rows of the domains the principal may see, in name order after `cursor`; narrowed by
    the literal prefix every one of its patterns starts with."""
    if principal.every_domain:
        return await state.engine.list_page(prefix, cursor, count)
    if principal.prefix.startswith(prefix):
        prefix = principal.prefix
    elif not prefix.startswith(principal.prefix):
        return []
    rows: list[Row] = []
    step = max(count, 256)
    while len(rows) < count:
        page = await state.engine.list_page(prefix, cursor, step)
        rows += [row for row in page if principal.may_use(row.name)]
        if len(page) < step:
            break
        cursor = page[-1].name
    return rows[:count]


ERRORS = {code: {"model": schemas.Error} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503, 504)}

health = APIRouter(tags=["health"])
predict = APIRouter(prefix="/predict", tags=["predict"])
adapters = APIRouter(prefix="/adapters", tags=["adapters"])


# ----- health -------------------------------------------------------------------------------


@health.get("/healthz", response_model=schemas.Health)
async def healthz() -> schemas.Health:
    return schemas.Health(status="ok")


@health.get("/readyz", response_model=schemas.Ready, responses={503: {"model": schemas.Ready}})
async def readyz(state: StateDep, response: Response) -> schemas.Ready:
    status = await state.engine_status()
    ready = state.started and status is not None and status.ready
    if not ready:
        response.status_code = 503
    sync = status.sync if status is not None else None
    return schemas.Ready(
        ready=ready,
        pid=os.getpid(),
        workers=state.settings.workers,
        engine_pid=status.pid if status is not None else None,
        adapters=status.adapters if status is not None else 0,
        backbone_fingerprint=status.backbone_fingerprint if status is not None else None,
        device=schemas.Device(**dataclasses.asdict(status.device)) if status is not None and status.device else None,
        registry=schemas.RegistrySync(**msgspec.structs.asdict(sync)) if sync is not None else None,
        residency=schemas.Residency(**msgspec.structs.asdict(status.residency))
        if status is not None and status.residency is not None
        else None,
    )


@health.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(state: StateDep) -> Response:
    await state.engine_status()  # refreshes the engine's gauges (queue depth, sync lag)
    body, media_type = exposition(state.metrics)
    return Response(body, media_type=media_type)


# ----- prediction ---------------------------------------------------------------------------


async def _read_images(uploads: list[UploadFile], state: ServiceState) -> list[bytes]:
    """Each upload's bytes, read no further than one byte past the limit (the path checks the limits)."""
    limit = state.settings.max_image_bytes
    return [await upload.read(limit + 1) for upload in uploads]


def _top_k(logits: np.ndarray, labels: tuple[str, ...], k: int) -> list[schemas.Prediction]:
    p = softmax(logits)
    order = np.argsort(-p, kind="stable")[:k]
    return [schemas.Prediction(label=labels[i], index=int(i), score=float(p[i])) for i in order]


def _timing(classified) -> schemas.Timing:
    return schemas.Timing(
        total_ms=classified.total_ms, preprocess_ms=classified.prepare_s * 1000, inference_ms=classified.infer_s * 1000
    )


TopK = Annotated[int, Form(ge=1, le=1000, description="how many classes to return")]


@predict.post("/{domain}", response_model=schemas.PredictResponse, responses=ERRORS)
async def predict_domain(
    domain: str, state: ReadyDep, principal: PrincipalDep, file: Annotated[list[UploadFile], File()], top_k: TopK = 5
) -> schemas.PredictResponse:
    """Classify one image (or several `file` fields) with one domain's adapter (loaded first if it is not
    resident)."""
    names = [u.filename for u in file]
    raw = await _read_images(file, state)
    state.inference.check_files(raw, names)
    classified = await state.inference.classify([domain], lane_of(principal), files=raw)
    (card,) = classified.cards
    results = [
        schemas.ImageResult(filename=name, predictions=_top_k(answers[0].logits, card.labels, top_k))
        for name, answers in zip(names, classified.answers)
    ]
    return schemas.PredictResponse(
        domain=domain,
        version=classified.answers[0][0].version,
        results=results,
        timing=_timing(classified),
        predictions=results[0].predictions if len(results) == 1 else None,
    )


@predict.post("", response_model=schemas.FanoutResponse, responses=ERRORS)
async def predict_fanout(
    state: ReadyDep,
    principal: PrincipalDep,
    file: Annotated[UploadFile, File()],
    domains: Annotated[str, Form(description="comma-separated domains, or 'all'")] = "all",
    top_k: TopK = 5,
) -> schemas.FanoutResponse:
    """Classify one image with several domains at once (one batch): the named ones, or every one the key
    may see."""
    limit = state.settings.max_fanout
    if domains.strip() == "all":
        names = [row.name for row in await visible_page(state, principal, "", None, limit + 1)]
    else:
        names = list(dict.fromkeys(d.strip() for d in domains.split(",") if d.strip()))
        hidden = next((name for name in names if not principal.may_use(name)), None)
        if hidden is not None:
            raise UnknownDomainError(hidden)
    if not names:
        raise ApiError(400, "no_domains", "No domain is registered or named; GET /adapters lists them.")
    if len(names) > limit:
        raise ApiError(
            400,
            "too_many_domains",
            f"At most {limit} domains per request (RA_MAX_FANOUT); name the domains you need instead of 'all'.",
        )
    raw = await _read_images([file], state)
    state.inference.check_files(raw, [file.filename])
    classified = await state.inference.classify(names, lane_of(principal), files=raw)
    results = [
        schemas.DomainResult(
            domain=card.domain, version=answer.version, predictions=_top_k(answer.logits, card.labels, top_k)
        )
        for card, answer in zip(classified.cards, classified.answers[0])
    ]
    return schemas.FanoutResponse(filename=file.filename, results=results, timing=_timing(classified))


# ----- adapters -----------------------------------------------------------------------------


def _summary(card: Card) -> dict:
    return {
        "domain": card.domain,
        "version": card.version,
        "num_classes": card.num_classes,
        "val_top1": card.val_top1,
        "params": card.params,
        "served": card.served,
        "tier": card.tier,
        "pinned": card.pinned,
    }


def _info(card: Card) -> schemas.AdapterInfo:
    return schemas.AdapterInfo(
        **_summary(card),
        labels=list(card.labels),
        adapter=card.adapter,
        metrics=dict(card.metrics),
        preprocessing=schemas.Preprocessing(**card.preprocessing.to_json()),
        backbone_fingerprint=card.backbone_fingerprint,
        registered_at=card.registered_at,
        size_bytes=card.size_bytes,
        sha256=card.sha256,
        load_ms=card.load_ms,
        golden_self_test=card.golden_self_test,
        record_version=card.record_version,
    )


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
    items = [
        schemas.AdapterSummary(**_summary(row.card))
        if row.card is not None
        else schemas.AdapterSummary(domain=row.name, version=row.version, tier="registry", pinned=row.pinned)
        for row in page
    ]
    status = await state.engine_status()
    return schemas.AdapterList(
        adapters=items,
        next_cursor=page[-1].name if len(rows) > limit else None,
        backbone_fingerprint=status.backbone_fingerprint if status else None,
    )


@adapters.get("/{domain}", response_model=schemas.AdapterInfo, responses=ERRORS)
async def get_adapter(domain: str, state: ReadyDep) -> schemas.AdapterInfo:
    """One domain: the version served here (and its tier) and the version in the registry of record."""
    return _info(await state.inference.refresh(domain))


@adapters.post("", response_model=schemas.AdapterInfo, status_code=201, responses=ERRORS)
async def register_adapter(
    request: Request,
    state: ReadyDep,
    bundle: Annotated[UploadFile, File(description="the adapter bundle (.safetensors)")],
    replace: Annotated[bool, Form(description="replace an existing domain with a new version")] = False,
    domain: Annotated[str | None, Form(description="serve under this name instead of the bundle's")] = None,
    pin: Annotated[
        bool | None,
        Form(
            description="pin (true) or unpin (false): a pinned domain is loaded at start "
            "and never evicted; unset leaves it as it was"
        ),
    ] = None,
) -> schemas.AdapterInfo:
    """Register a domain from its bundle: validated completely, recorded durably, then answered.

    Needs an admin key (or `RA_ADMIN_TOKEN`)."""
    limit = state.settings.max_bundle_bytes
    audit = request.state.audit = {"action": "replace" if replace else "register", "domain": domain or None}
    data = await bundle.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "bundle_too_large", f"The bundle is larger than {limit} bytes (RA_MAX_BUNDLE_BYTES).")
    audit["sha256"] = hashlib.sha256(data).hexdigest()
    card = await state.engine.register(data, replace, domain or None, pin)
    audit.update(domain=card.domain, version=card.version)
    return _info(card)


@adapters.delete("/{domain}", response_model=schemas.DeletedAdapter, responses=ERRORS)
async def delete_adapter(domain: str, request: Request, state: ReadyDep) -> schemas.DeletedAdapter:
    """Stop serving the domain everywhere (needs an admin key)."""
    deleted = await state.engine.delete(domain)
    request.state.audit = {"version": deleted.version, "sha256": deleted.sha256}
    return schemas.DeletedAdapter(domain=domain, version=deleted.version)


@adapters.post("/{domain}/rollback", response_model=schemas.AdapterInfo, responses=ERRORS)
async def rollback_adapter(domain: str, request: Request, state: ReadyDep) -> schemas.AdapterInfo:
    """Serve the previous version again; the newer ones are dropped (needs an admin key)."""
    card = await state.engine.rollback(domain)
    request.state.audit = {"version": card.version, "sha256": card.sha256}
    return _info(card)
