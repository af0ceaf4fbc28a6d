"""Every error the service answers, mapped to HTTP in one place, always as a JSON `Error` body.

Runs in every front-end process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, HTTPException, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.exceptions import (
    AdapterUnavailable,
    DomainExists,
    DomainUnloaded,
    EngineUnavailable,
    ImageDecodeError,
    InvalidFileError,
    NoPreviousVersion,
    Overloaded,
    QueueShareExceeded,
    RecordUnavailable,
    UnknownDomainError,
)
from training.archive import ArchiveError
from training.jobs import JobNotFound

_log = logging.getLogger(__name__)
IMAGE_STATUS = {"not_image": 415, "too_many_pixels": 413, "corrupt": 400}
ARCHIVE_STATUS = {"not_archive": 415, "too_large": 413, "zip_bomb": 413}  # else 422: the contents


class ApiError(Exception):
    """An error with its HTTP status, code and message, raised by the routes."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


class BodyTooLarge(HTTPException):
    """Raised while the body streams in; an HTTPException so that FastAPI's form parsing lets it through."""

    def __init__(self, limit: int):
        super().__init__(413, f"The request body is larger than {limit} bytes.")


OIP_PREFIX = "/v2"  # Open Inference Protocol routes answer errors as {"error": "<message>"}
ERROR_CODE_HEADER = "x-error-code"  # every error's code, also where the body cannot say it (OIP, HEAD)


def error_response(
    status: int, code: str, detail: object, headers: dict[str, str] | None = None, path: str = ""
) -> JSONResponse:
    """The JSON error body: `{"error": code, "detail": message}`, or the protocol's `{"error": "code: message"}`
    on the Open Inference Protocol routes. The code is also the `X-Error-Code` header, which the Gatekeeper
    counts (`ra_errors_total{code}`) and logs."""
    headers = {**(headers or {}), ERROR_CODE_HEADER: code}
    if path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/"):
        return JSONResponse({"error": f"{code}: {detail}"}, status_code=status, headers=headers)
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def refusal_response(reason: ApiError | UnknownDomainError, path: str) -> JSONResponse:
    """A refused request's answer; an unknown domain's is the same as for a domain the key may not see."""
    error = as_api_error(reason)
    return error_response(error.status, error.code, error.detail, error.headers, path=path)


UPLOAD_EXAMPLES = {"file": "image.jpg", "bundle": "domain.safetensors"}


def missing_uploads(request: Request, exc: RequestValidationError) -> list[str]:
    """The route's file fields that the request lacks: a body sent raw, or under another field name."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    uploads = {p.alias for p in getattr(dependant, "body_params", ()) if isinstance(p.field_info, params.File)}
    return [
        e["loc"][-1]
        for e in exc.errors()
        if e.get("type") == "missing" and len(e.get("loc", ())) == 2 and e["loc"][-1] in uploads
    ]


RETRY = {"Retry-After": "1"}
# the service's own exceptions as answers: (status, code, headers); the one table every protocol reads
KNOWN: dict[type[Exception], tuple[int, str, dict[str, str] | None]] = {
    DomainExists: (409, "domain_exists", None),
    NoPreviousVersion: (409, "no_previous_version", None),
    DomainUnloaded: (409, "domain_unloaded", None),
    Overloaded: (503, "overloaded", RETRY),
    QueueShareExceeded: (429, "domain_queue_full", RETRY),
    RecordUnavailable: (503, "registry_unavailable", RETRY),
    AdapterUnavailable: (503, "adapter_unavailable", RETRY),
    EngineUnavailable: (503, "engine_unavailable", RETRY),
    asyncio.TimeoutError: (504, "timeout", None),
}


def as_api_error(exc: BaseException) -> ApiError | None:
    """The answer to `exc` when it is one the service raises on purpose (None: an internal error)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownDomainError):
        return ApiError(404, "unknown_domain", f"{exc}. GET /adapters lists the domains.")
    if isinstance(exc, ImageDecodeError):
        return ApiError(IMAGE_STATUS.get(exc.code, 400), exc.code, str(exc))
    if isinstance(exc, InvalidFileError):
        return ApiError(422, f"invalid_bundle:{exc.code}", str(exc))
    if isinstance(exc, ArchiveError):
        return ApiError(ARCHIVE_STATUS.get(exc.code, 422), exc.code, str(exc))
    if isinstance(exc, JobNotFound):
        return ApiError(404, "unknown_job", f"No training job {exc.args[0]!r}. GET /training/jobs lists yours.")
    for exc_type, (status, code, headers) in KNOWN.items():
        if isinstance(exc, exc_type):
            return ApiError(status, code, str(exc), headers)
    return None


def install_error_handlers(app: FastAPI) -> None:
    async def known(request: Request, exc: Exception) -> JSONResponse:
        error = as_api_error(exc)
        return error_response(error.status, error.code, error.detail, error.headers, path=request.url.path)

    for exc_type in (
        ApiError,
        UnknownDomainError,
        ImageDecodeError,
        InvalidFileError,
        ArchiveError,
        JobNotFound,
        *KNOWN,
    ):
        app.add_exception_handler(exc_type, known)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        missing = missing_uploads(request, exc)
        if missing:
            fields = " and ".join(f"'{name}'" for name in missing)
            example = " ".join(f"-F {name}=@{UPLOAD_EXAMPLES.get(name, 'FILE')}" for name in missing)
            ctype = request.headers.get("content-type", "").split(";")[0].strip()
            if ctype != "multipart/form-data":
                return error_response(
                    415,
                    "not_multipart",
                    f"Send a multipart/form-data body with the file in the field "
                    f"{fields} (curl {example}); this body is {ctype or 'without a Content-Type'}.",
                    path=request.url.path,
                )
            return error_response(
                422, "missing_file", f"The multipart field {fields} is missing (curl {example}).", path=request.url.path
            )
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return error_response(422, "invalid_request", details, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # list every method of every route on this path, not just the first route's
            methods = {
                m
                for route in app.routes
                if getattr(route, "methods", None) and route.path_regex.fullmatch(request.url.path)
                for m in route.methods
            }
            headers["Allow"] = ", ".join(sorted(methods))
        return error_response(exc.status_code, "http_error", str(exc.detail), headers or None, path=request.url.path)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return error_response(413, "request_too_large", exc.detail, path=request.url.path)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        _log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "An internal error occurred; it has been logged.", path=request.url.path)
