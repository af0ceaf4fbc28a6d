"""The training routes: a domain trained from an upload of labelled images, as a job.

`POST /training/jobs` checks everything it can before it stores anything: the key's right to train
that domain (`service.frontend.access` decides the right, the route the domain), the upload's size,
the tenant's queue, the archive (`training.archive`: layout, bombs, paths, classes, limits) and that
every image decodes. Then the job and its upload go into the job list beside the registry of record
(`training.jobs`), which is the one owner of jobs: front ends keep none. A training worker
(`training.worker`) runs it; the engine registers what it made (`service.engine.registrar`).

A tenant is a key (its name): it sees and cancels its own jobs; an admin sees every job.

Runs in every front-end process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Header, Query, Request, Response, UploadFile
from fastapi.responses import StreamingResponse

from model.bundle import check_domain_name
from model.safetensors_io import InvalidFileError
from service.frontend import schemas
from service.frontend.access import Principal
from service.frontend.errors import ApiError
from service.frontend.rest import ERRORS, PrincipalDep, StateDep
from service.frontend.state import ServiceState
from training.archive import ArchiveLimits, check_decodes, read_archive
from training.jobs import ENDED, Job, JobNotFound, new_id
from training.recipe import Recipe

training = APIRouter(prefix="/training/jobs", tags=["training"])
EVENTS_POLL_S = 0.5  # how often a followed job's events are read
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing a quiet stream
DEFAULTS = Recipe()


def _view(job: Job) -> schemas.TrainingJob:
    base = f"/training/jobs/{job.id}"
    links = schemas.TrainingLinks(
        self=base,
        events=f"{base}/events",
        cancel=f"{base}/cancel",
        bundle=f"{base}/bundle",
        domain=f"/adapters/{job.domain}",
    )
    fields = {n: getattr(job, n) for n in schemas.TrainingJob.model_fields if n not in ("recipe", "links", "serve")}
    return schemas.TrainingJob(**fields, serve=job.register, recipe=schemas.TrainingRecipe(**job.recipe), links=links)


async def _visible(state: ServiceState, principal: Principal, job_id: str) -> Job:
    """The job, if the caller may see it: its tenant's, or any for an admin (else unknown, as if absent)."""
    job = await asyncio.to_thread((await state.training_jobs()).get, job_id)
    if job.tenant != principal.name and not principal.admin:
        raise JobNotFound(job_id)
    return job


def _domain(domain: str, principal: Principal) -> str:
    try:
        check_domain_name(domain)
    except InvalidFileError as exc:
        raise ApiError(422, "invalid_domain", str(exc)) from None
    if not principal.may_use(domain):
        raise ApiError(
            403,
            "domain_forbidden",
            f"Key {principal.name!r} may not write {domain!r}: train a domain its patterns match.",
        )
    return domain


@training.post("", response_model=schemas.TrainingJob, status_code=202, responses=ERRORS)
async def submit_job(
    request: Request,
    response: Response,
    state: StateDep,
    principal: PrincipalDep,
    archive: Annotated[UploadFile, File(description="a zip or tar of the images, one folder per class")],
    domain: Annotated[str, Form(description="the domain to train: a new one, or a new version of one")],
    epochs: Annotated[int | None, Form(ge=1, le=200)] = None,
    batch_size: Annotated[int | None, Form(ge=2, le=512)] = None,
    lr: Annotated[float | None, Form(gt=0, le=1)] = None,
    val_share: Annotated[float | None, Form(ge=0.05, le=0.5)] = None,
    preset: Annotated[Literal["natural", "digits"], Form(description="augmentation")] = "natural",
    serve: Annotated[
        bool, Form(description="register the bundle as a new version of the domain; false: keep it to download")
    ] = True,
) -> schemas.TrainingJob:
    """Queue a training job for `domain` from a labelled archive; it answers 202 with the job at once
    (nothing trains in the request). Follow it at `links.events`."""
    s = state.settings
    domain = _domain(domain, principal)
    audit = request.state.audit = {"action": "train", "domain": domain}
    data = await archive.read(s.max_training_upload_bytes + 1)
    if len(data) > s.max_training_upload_bytes:
        raise ApiError(
            413,
            "upload_too_large",
            f"The archive is larger than {s.max_training_upload_bytes} bytes (RA_MAX_TRAINING_UPLOAD_BYTES).",
        )
    jobs = await state.training_jobs()
    if await asyncio.to_thread(jobs.queued, principal.name) >= s.max_queued_jobs:
        raise ApiError(
            429,
            "too_many_jobs",
            f"Key {principal.name!r} has {s.max_queued_jobs} jobs queued (RA_MAX_QUEUED_JOBS); wait for one to start.",
            headers={"Retry-After": "30"},
        )
    limits = ArchiveLimits(
        max_unpacked_bytes=4 * s.max_training_upload_bytes,
        max_images=s.max_training_images,
        max_classes=s.max_training_classes,
        max_image_pixels=s.max_image_pixels,
    )
    members = await asyncio.to_thread(read_archive, data, limits)
    await asyncio.to_thread(check_decodes, members, limits)
    recipe = {
        "epochs": epochs or DEFAULTS.epochs,
        "batch_size": batch_size or DEFAULTS.batch_size,
        "lr": lr or DEFAULTS.lr,
        "val_share": val_share or 0.1,
        "preset": preset,
    }
    job = Job(new_id(), principal.name, domain, recipe, "", 0, list(members.classes), len(members.images))
    job.register = serve
    job = await asyncio.to_thread(jobs.submit, job, data)
    audit.update(job=job.id, sha256=job.upload_sha256)
    response.headers["Location"] = f"/training/jobs/{job.id}"
    return _view(job)


@training.get("", response_model=schemas.TrainingJobList, responses=ERRORS)
async def list_jobs(
    state: StateDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100, description="jobs per page")] = 20,
    cursor: Annotated[str | None, Query(max_length=64, description="`next_cursor` of the previous page")] = None,
) -> schemas.TrainingJobList:
    """The caller's jobs, oldest first, a page at a time."""
    jobs = await state.training_jobs()
    page = await asyncio.to_thread(jobs.page, principal.name, cursor, limit + 1)
    return schemas.TrainingJobList(
        jobs=[_view(job) for job in page[:limit]], next_cursor=page[limit - 1].id if len(page) > limit else None
    )


@training.get("/{job_id}", response_model=schemas.TrainingJob, responses=ERRORS)
async def get_job(job_id: str, state: StateDep, principal: PrincipalDep) -> schemas.TrainingJob:
    return _view(await _visible(state, principal, job_id))


@training.post("/{job_id}/cancel", response_model=schemas.TrainingJob, responses=ERRORS)
async def cancel_job(job_id: str, request: Request, state: StateDep, principal: PrincipalDep) -> schemas.TrainingJob:
    """A queued job ends `cancelled` at once; a running one at its worker's next epoch (follow its events)."""
    await _visible(state, principal, job_id)
    request.state.audit = {"action": "cancel", "job": job_id}
    return _view(await asyncio.to_thread((await state.training_jobs()).cancel, job_id))


@training.get(
    "/{job_id}/bundle",
    response_class=Response,
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
)
async def download_bundle(job_id: str, state: StateDep, principal: PrincipalDep) -> Response:
    """The bundle the job made (`.safetensors`), once it is trained."""
    job = await _visible(state, principal, job_id)
    if job.state not in ("registering", "succeeded"):
        raise ApiError(409, "not_trained", f"Job {job_id} is {job.state}: it has no bundle yet.")
    data = await asyncio.to_thread((await state.training_jobs()).bundle, job_id)
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{job.domain}.safetensors"'},
    )


@training.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str,
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    follow: Annotated[bool, Query(description="keep the stream open until the job ends")] = True,
    last_event_id: Annotated[str | None, Header(description="resume after this event (SSE reconnects)")] = None,
) -> StreamingResponse:
    """The job's progress as server-sent events: `state` (each change), `step` (loss, top-1, images/s,
    seconds left), `epoch` (with validation top-1), `resumed`; the last is `end`, with the job."""
    await _visible(state, principal, job_id)
    after = int(last_event_id) + 1 if last_event_id and last_event_id.isdigit() else 0
    return StreamingResponse(
        _stream(state, request, job_id, after, follow),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _sse(kind: str, data: dict, number: int | None = None) -> str:
    head = f"id: {number}\n" if number is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data)}\n\n"


async def _stream(state: ServiceState, request: Request, job_id: str, after: int, follow: bool) -> AsyncIterator[str]:
    jobs = await state.training_jobs()
    number, shown, quiet = after, None, 0.0
    while True:
        job = await asyncio.to_thread(jobs.get, job_id)  # first: every event before an end is read below
        if job.state != shown:
            shown = job.state
            yield _sse("state", {"state": job.state, "epochs_done": job.epochs_done})
        for event in await asyncio.to_thread(jobs.events, job_id, number):
            yield _sse(event.get("type", "event"), event, number)
            number, quiet = number + 1, 0.0
        if job.state in ENDED:
            yield _sse("end", _view(job).model_dump())
            return
        if not follow or await request.is_disconnected():
            return
        await asyncio.sleep(EVENTS_POLL_S)
        quiet += EVENTS_POLL_S
        if quiet >= KEEPALIVE_S:
            quiet = 0.0
            yield ": keep-alive\n\n"
