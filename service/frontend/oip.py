"""The Open Inference Protocol (KServe v2) over REST, beside the service's own routes: the same
inference path, engine, limits and errors, so Triton and KServe clients and tools work unchanged.

A codec over the inference path (`service.frontend.inference`), as REST is: a domain is a model; its adapter
versions are the model's versions. Inputs (one per request):
`IMAGE` (BYTES, shape [N] or [N, 1]: encoded image files, decoded and preprocessed exactly as
/predict) or `PIXELS` (UINT8, [N, S, S, 3] at the backbone's input size, already resized and
cropped: the server only applies the domain's grayscale conversion, mean and std). Outputs:
`LOGITS` and `PROBABILITIES` (FP32, [N, classes]); `"parameters": {"classification": k}` on an
output answers `score:index:label` strings instead. Tensors travel as JSON or, with the binary
tensor data extension, after the JSON header (`Inference-Header-Content-Length`).
Extensions: binary_tensor_data, classification, model_repository (load a bundle as
`"file:<name>.safetensors"`, unload, load again), statistics.

Runs in every front-end process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request, Response

from service.frontend import schemas
from service.frontend.errors import ApiError
from service.frontend.host_table import HostTable, Layout
from service.frontend.inference import softmax
from service.frontend.rest import PrincipalDep, ReadyDep, StateDep, lane_of
from service.frontend.state import ServiceState
from service.views import Card

HEADER = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "statistics"]
OUTPUTS = ("LOGITS", "PROBABILITIES")
STATS_KEEP = 10_000  # domains whose statistics are kept at least (the least recently used are forgotten first)
ERRORS = {code: {"model": schemas.OipError} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503, 504)}

v2 = APIRouter(prefix="/v2", tags=["open inference protocol"], responses=ERRORS)


def bad(detail: str, status: int = 400, code: str = "bad_request") -> ApiError:
    return ApiError(status, code, detail)


# ----- statistics ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Duration:
    count: int = 0
    ns: int = 0


@dataclasses.dataclass(frozen=True)
class ModelStats:
    """A domain's statistics as read from the table (a copy)."""

    last_inference: int = 0  # ms since the epoch
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = dataclasses.field(default_factory=Duration)
    fail: Duration = dataclasses.field(default_factory=Duration)
    queue: Duration = dataclasses.field(default_factory=Duration)
    compute_input: Duration = dataclasses.field(default_factory=Duration)
    compute_infer: Duration = dataclasses.field(default_factory=Duration)
    compute_output: Duration = dataclasses.field(default_factory=Duration)


DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
STATS = Layout(
    np.dtype(
        [
            ("key", "<u8"),
            ("stamp", "<f8"),
            ("last_inference", "<i8"),
            ("inference_count", "<i8"),
            ("execution_count", "<i8"),
        ]
        + [(f"{name}_{part}", "<i8") for name in DURATIONS for part in ("count", "ns")]
    ),
    slots=32_768,
)  # STATS_KEEP domains fit (about 0.3 full, so windows of 16 do not overflow)


class Statistics:
    """Per-domain counts and cumulative times of the infer route, for the statistics extension, in a
    `HostTable` that every front end of the host shares: any front end answers for all of them. The
    table forgets the least recently used domains first (per window of slots), keeping at least
    STATS_KEEP."""

    def __init__(self, table: HostTable):
        if table.layout.dtype != STATS.dtype:
            raise ValueError(f"Statistics needs a table of oip.STATS records. Received: dtype={table.layout.dtype}")
        self.table = table

    def failed(self, domain: str, seconds: float) -> None:
        with self.table.row(domain) as row:
            row["stamp"] = time.monotonic()
            _add(row, "fail", seconds)

    def succeeded(
        self,
        domain: str,
        inferences: int,
        seconds: float,
        compute_input_s: float,
        queue_s: float,
        compute_infer_s: float,
        compute_output_s: float,
    ) -> None:
        """One successful request of `inferences` images; queue and infer times are per image, on average."""
        last = int(time.time() * 1000)
        with self.table.row(domain) as row:
            row["stamp"] = time.monotonic()
            _add(row, "success", seconds)
            row["inference_count"] += inferences
            row["execution_count"] += 1
            row["last_inference"] = last
            _add(row, "compute_input", compute_input_s)
            _add(row, "queue", queue_s)
            _add(row, "compute_infer", compute_infer_s)
            _add(row, "compute_output", compute_output_s)

    def peek(self, domain: str) -> ModelStats:
        row = self.table.peek(domain)
        if row is None:
            return ModelStats()
        return ModelStats(
            int(row["last_inference"]),
            int(row["inference_count"]),
            int(row["execution_count"]),
            **{name: Duration(int(row[f"{name}_count"]), int(row[f"{name}_ns"])) for name in DURATIONS},
        )


def _add(row: np.void, name: str, seconds: float) -> None:
    row[f"{name}_count"] += 1
    row[f"{name}_ns"] += int(seconds * 1e9)


def get_stats(request: Request) -> Statistics:
    return request.app.state.oip_stats


StatsDep = Annotated[Statistics, Depends(get_stats)]


# ----- health and metadata -------------------------------------------------------------------


@v2.get("", response_model=schemas.OipServer)
async def server_metadata() -> schemas.OipServer:
    return schemas.OipServer(name="residual-adapters", version="0.1.0", extensions=EXTENSIONS)


@v2.get("/health/live")
async def live() -> dict:
    return {"live": True}


@v2.get("/health/ready")
async def ready(state: StateDep, response: Response) -> dict:
    status = await state.engine_status()
    ready = state.started and status is not None and status.ready
    if not ready:
        response.status_code = 503
    return {"ready": ready}


async def _model(state: ServiceState, domain: str, version: str | None) -> Card:
    """The domain as served here, at `version` if one is asked for."""
    card = await state.inference.refresh(domain)
    if version is not None and version != str(card.version):
        raise bad(
            f"Model {domain!r} is served at version {card.version} here, not {version!r}; "
            "leave the version out to use the current one.",
            404,
            "unknown_version",
        )
    return card


def _metadata(card: Card, backend: str) -> schemas.OipModel:
    s = card.preprocessing.crop  # the backbone's input size
    k = card.num_classes
    return schemas.OipModel(
        name=card.domain,
        versions=[str(card.version)],
        platform=f"residual_adapters_{backend}",
        inputs=[
            schemas.OipTensorMeta(name="IMAGE", datatype="BYTES", shape=[-1]),
            schemas.OipTensorMeta(name="PIXELS", datatype="UINT8", shape=[-1, s, s, 3]),
        ],
        outputs=[schemas.OipTensorMeta(name=name, datatype="FP32", shape=[-1, k]) for name in OUTPUTS],
    )


@v2.get("/models/{domain}", response_model=schemas.OipModel)
@v2.get("/models/{domain}/versions/{version}", response_model=schemas.OipModel)
async def model_metadata(domain: str, state: ReadyDep, version: str | None = None) -> schemas.OipModel:
    """Inputs, outputs and versions of a domain (a model)."""
    return _metadata(await _model(state, domain, version), state.settings.backend)


@v2.get("/models/{domain}/ready")
@v2.get("/models/{domain}/versions/{version}/ready")
async def model_ready(domain: str, state: ReadyDep, version: str | None = None) -> dict:
    """200 when the domain can be served here; 409 when it is unloaded, 404 when unknown."""
    await _model(state, domain, version)
    return {"name": domain, "ready": True}


# ----- inference ---------------------------------------------------------------------------------


def _split(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """(JSON header, binary tail) of a request body."""
    try:
        if header_length is None:
            return json.loads(body), b""
        n = int(header_length)
        if not 0 < n <= len(body):
            raise ValueError(f"{HEADER} is {n} but the body has {len(body)} bytes")
        return json.loads(body[:n]), body[n:]
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"The request is not a valid inference request: {exc}.") from None


def _bytes_elements(raw: bytes) -> list[bytes]:
    """Decode the binary BYTES layout: each element a 4-byte little-endian length, then its bytes."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise bad("A BYTES tensor's binary data ends inside an element's length prefix.")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise bad("A BYTES tensor's element is longer than its binary data.")
        out.append(raw[offset : offset + n])
        offset += n
    return out


def encode_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _input(header: dict, tail: bytes, state: ServiceState, s: int) -> tuple[str, list]:
    """The one input: ("IMAGE", [encoded files]) or ("PIXELS", uint8 array [N, S, S, 3])."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad("Send exactly one input: IMAGE (BYTES) or PIXELS (UINT8).")
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or not shape:
        raise bad(f"Input {name!r} needs a shape of non-negative integers, got {shape!r}.")
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None and (not isinstance(size, int) or size < 0 or size > len(tail)):
        raise bad(f"Input {name!r} claims binary_data_size {size!r} but {len(tail)} bytes follow the header.")
    state.inference.check_count(shape[0])
    if name == "IMAGE":
        if datatype != "BYTES" or shape not in ([shape[0]], [shape[0], 1]):
            raise bad(f"IMAGE must be BYTES with shape [N] or [N, 1]; got {datatype} {shape}.")
        if size is None:
            raise bad("Send IMAGE as binary data (parameters.binary_data_size): encoded images are not JSON text.")
        files = _bytes_elements(tail[:size])
        if len(files) != shape[0]:
            raise bad(f"IMAGE has shape {shape} but its binary data holds {len(files)} elements.")
        state.inference.check_files(files, [None] * len(files))
        return name, files
    if name == "PIXELS":
        if datatype != "UINT8" or shape[1:] != [s, s, 3]:
            raise bad(
                f"PIXELS must be UINT8 with shape [N, {s}, {s}, 3] (the backbone's input size); got {datatype} {shape}."
            )
        count = int(np.prod(shape))
        if size is not None:
            if size != count:
                raise bad(f"PIXELS {shape} needs {count} bytes of binary data, got {size}.")
            pixels = np.frombuffer(tail[:size], np.uint8)
        else:
            data = tensor.get("data")
            try:
                pixels = np.asarray(data, dtype=np.int64).reshape(-1)
            except (TypeError, ValueError):
                raise bad("PIXELS data must be a list of integers.") from None
            if pixels.size != count or pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
                raise bad(f"PIXELS {shape} needs {count} integers in 0..255, got {pixels.size}.")
            pixels = pixels.astype(np.uint8)
        return name, pixels.reshape(shape)
    raise bad(f"Unknown input {name!r}: send IMAGE (BYTES) or PIXELS (UINT8).")


def _requested(header: dict) -> list[dict]:
    outputs = header.get("outputs")
    if outputs is None:
        return [{"name": name} for name in OUTPUTS]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and o.get("name") in OUTPUTS for o in outputs):
        raise bad(f"Requested outputs must be among {list(OUTPUTS)}.")
    return outputs


def _outputs(header: dict, logits: np.ndarray, card: Card) -> tuple[list[dict], list[bytes]]:
    """Output tensors (JSON descriptions) and the binary parts that follow the header, in order."""
    default_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    described, binary = [], []
    for request in _requested(header):
        name, params = request["name"], request.get("parameters") or {}
        values = logits if name == "LOGITS" else softmax(logits).astype(np.float32)
        k = params.get("classification")
        if k is not None:
            if not isinstance(k, int) or k < 1:
                raise bad(f"classification must be a positive integer, got {k!r}.")
            k = min(k, values.shape[1])
            order = np.argsort(-values, axis=1, kind="stable")[:, :k]
            strings = [[f"{values[i, j]:f}:{j}:{card.labels[j]}" for j in row] for i, row in enumerate(order)]
            tensor = {"name": name, "datatype": "BYTES", "shape": [len(strings), k]}
            flat = [s.encode() for row in strings for s in row]
            if params.get("binary_data", default_binary):
                data = encode_bytes(flat)
                tensor["parameters"] = {"binary_data_size": len(data)}
                binary.append(data)
            else:
                tensor["data"] = [s for row in strings for s in row]
        else:
            tensor = {"name": name, "datatype": "FP32", "shape": list(values.shape)}
            if params.get("binary_data", default_binary):
                data = np.ascontiguousarray(values, "<f4").tobytes()
                tensor["parameters"] = {"binary_data_size": len(data)}
                binary.append(data)
            else:
                tensor["data"] = values.reshape(-1).tolist()
        described.append(tensor)
    return described, binary


async def run_infer(
    state: ServiceState,
    stats: Statistics,
    lane: str | None,
    domain: str,
    version: str | None,
    read: Callable[[], Awaitable[tuple[dict, bytes]]],
) -> tuple[dict, list[bytes]]:
    """The infer call under both transports: `read()` gives the request as the REST form's JSON header and
    binary tail (after the model is known, so an unknown model answers 404 whatever the body); returns
    the response's JSON header and the binary parts of the outputs that asked for binary data."""
    start = time.perf_counter()
    (card,) = await state.inference.cards([domain])  # as this front end knows it: no call to the engine
    if version is not None and version != str(card.version):
        card = await _model(state, domain, version)
    try:
        header, tail = await read()
        kind, data = _input(header, tail, state, card.preprocessing.crop)
        classified = await (
            state.inference.classify([domain], lane, files=data)
            if kind == "IMAGE"
            else state.inference.classify([domain], lane, pixels=data)
        )
        prepared = start + classified.prepare_s
        computed = time.perf_counter()
        card = classified.cards[0]
        answers = [row[0] for row in classified.answers]
        logits = np.stack([a.logits for a in answers]) if answers else np.zeros((0, card.num_classes), np.float32)
        described, binary = _outputs(header, logits, card)
        body = {
            "model_name": domain,
            "model_version": str(answers[0].version if answers else card.version),
            "outputs": described,
        }
        if "id" in header:
            body["id"] = header["id"]
    except BaseException:
        stats.failed(domain, time.perf_counter() - start)
        raise
    done = time.perf_counter()
    n = max(len(answers), 1)
    stats.succeeded(
        domain,
        len(answers),
        done - start,
        prepared - start,
        sum(a.queue_s for a in answers) / n,
        sum(a.compute_s for a in answers) / n,
        done - computed,
    )
    return body, binary


@v2.post("/models/{domain}/infer", response_model=schemas.OipInferResponse)
@v2.post("/models/{domain}/versions/{version}/infer", response_model=schemas.OipInferResponse)
async def infer(
    domain: str, request: Request, state: ReadyDep, stats: StatsDep, principal: PrincipalDep, version: str | None = None
) -> Response:
    """Classify a batch of images (IMAGE) or pixel arrays (PIXELS) with one domain."""

    async def read() -> tuple[dict, bytes]:
        return _split(await request.body(), request.headers.get(HEADER))

    body, binary = await run_infer(state, stats, lane_of(principal), domain, version, read)
    text = json.dumps(body).encode()
    if binary:
        return Response(
            text + b"".join(binary), media_type="application/octet-stream", headers={HEADER: str(len(text))}
        )
    return Response(text, media_type="application/json")


# ----- statistics ------------------------------------------------------------------------------


def _stats_json(domain: str, version: str, s: ModelStats) -> dict:
    def d(x: Duration) -> dict:
        return {"count": x.count, "ns": x.ns}

    return {
        "name": domain,
        "version": version,
        "last_inference": s.last_inference,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": d(s.success),
            "fail": d(s.fail),
            "queue": d(s.queue),
            "compute_input": d(s.compute_input),
            "compute_infer": d(s.compute_infer),
            "compute_output": d(s.compute_output),
        },
        "batch_stats": [],
    }


@v2.get("/models/{domain}/stats")
@v2.get("/models/{domain}/versions/{version}/stats")
async def model_stats(domain: str, state: ReadyDep, stats: StatsDep, version: str | None = None) -> dict:
    """Success and failure counts and cumulative queue, input, inference and output times."""
    card = await _model(state, domain, version)
    return {"model_stats": [_stats_json(domain, str(card.version), stats.peek(domain))]}


# ----- model repository (admin token) -----------------------------------------------------------


@v2.post("/repository/index")
async def repository_index(state: ReadyDep) -> list[dict]:
    """Every registered domain with its state: READY, or UNAVAILABLE when unloaded."""
    out, cursor = [], None
    while True:
        page = await state.engine.list_page("", cursor, 1000)
        for row in page:
            out.append(
                {
                    "name": row.name,
                    "version": str(row.version),
                    "state": "UNAVAILABLE" if row.unloaded else "READY",
                    **({"reason": "unloaded"} if row.unloaded else {}),
                }
            )
        if len(page) < 1000:
            return out
        cursor = page[-1].name


def bundle_parameter(parameters: dict) -> object | None:
    """The value of the one `"file:<name>.safetensors"` parameter of a load request, if any."""
    files = {k: v for k, v in parameters.items() if isinstance(k, str) and k.startswith("file:")}
    if not files:
        return None
    if len(files) != 1 or not next(iter(files)).endswith(".safetensors"):
        raise bad(f'Send one bundle as "file:<name>.safetensors"; got {sorted(files)}.', 422, "invalid_bundle")
    return next(iter(files.values()))


async def load_domain(state: ServiceState, domain: str, data: bytes | None, audit: dict) -> dict:
    """Register or replace the domain with the bundle `data` (POST /adapters' validation), or (None) serve
    an unloaded domain again; `audit` gets the audit line's details."""
    audit["domain"] = domain
    if data is not None:
        if len(data) > state.settings.max_bundle_bytes:
            raise bad(f"The bundle is larger than {state.settings.max_bundle_bytes} bytes.", 413, "bundle_too_large")
        audit["sha256"] = hashlib.sha256(data).hexdigest()
    card = await state.engine.load(domain, data)
    audit.update(version=card.version, sha256=card.sha256)
    return {"name": domain, "version": str(card.version), "state": "READY"}


@v2.post("/repository/models/{domain}/load")
async def repository_load(domain: str, request: Request, state: ReadyDep) -> dict:
    """With `"file:<name>.safetensors"` (base64): register or replace the domain (POST /adapters'
    validation). Without: serve an unloaded domain again."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise bad("The load request must be JSON.") from None
    parameters = body.get("parameters") or {} if isinstance(body, dict) else None
    if not isinstance(parameters, dict):
        raise bad("The load request's parameters must be an object.")
    encoded = bundle_parameter(parameters)
    data = None
    if encoded is not None:
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise bad("The bundle file is not valid base64.", 422, "invalid_bundle") from None
    request.state.audit = {}
    return await load_domain(state, domain, data, request.state.audit)


@v2.post("/repository/models/{domain}/unload")
async def repository_unload(domain: str, state: ReadyDep) -> dict:
    """Stop serving the domain (on every replica); it stays in the registry and can be loaded again."""
    await state.engine.unload(domain)
    return {"name": domain, "state": "UNAVAILABLE"}


def install(app, stats: Statistics) -> None:
    """Mount the protocol's routes and their statistics on `app`."""
    app.state.oip_stats = stats
    app.include_router(v2)
