"""The Open Inference Protocol over gRPC: KServe v2's `inference.GRPCInferenceService`, as Triton serves it,
on `RA_GRPC_PORT` beside the REST port, in every front-end process.

A codec like `service.frontend.oip`, over the same calls: each RPC is decided by `service.frontend.access` as the REST
request it stands for (ModelInfer of `x` is `POST /v2/models/x/infer`; the bearer key comes in the
`authorization` metadata), runs the REST protocol's own functions (`oip.run_infer`, `oip.load_domain`, ...)
and answers their errors as gRPC status codes with REST's messages (`code: detail`), the retry hint of a
429 or 503 in the `retry-after` trailing metadata. The messages and the service definition are
tritonclient's generated ones (`tritonclient.grpc.service_pb2`), so the package and message names are
Triton's and stock clients (`tritonclient.grpc`, KServe's `InferenceGRPCClient`) work unchanged.

Inputs: one of IMAGE (BYTES: `raw_input_contents` in the length-prefixed layout, or
`contents.bytes_contents`) or PIXELS (UINT8 [N, S, S, 3]: `raw_input_contents`, or
`contents.uint_contents`). Outputs LOGITS and PROBABILITIES travel in `raw_output_contents`; an output's
`classification` parameter answers `score:index:label` strings (BYTES), as over REST.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from service import tracing
from service.exceptions import DomainUnloaded
from service.frontend import audit, oip
from service.frontend.access import Denied, Principal, is_management
from service.frontend.errors import ApiError, as_api_error
from service.frontend.rest import lane_of
from service.frontend.state import ServiceState

_log = logging.getLogger(__name__)
Code = grpc.StatusCode
# REST's statuses as gRPC codes (409: a domain that exists already, or a state the call cannot act in)
CODES = {
    400: Code.INVALID_ARGUMENT,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.NOT_FOUND,
    409: Code.FAILED_PRECONDITION,
    413: Code.INVALID_ARGUMENT,
    415: Code.INVALID_ARGUMENT,
    422: Code.INVALID_ARGUMENT,
    429: Code.RESOURCE_EXHAUSTED,
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
}
INTERNAL = ApiError(500, "internal", "An internal error occurred; it has been logged.")


def status_code(error: ApiError) -> grpc.StatusCode:
    if error.code == "domain_exists":
        return Code.ALREADY_EXISTS
    return CODES.get(error.status, Code.INTERNAL)


def _parameter(value: pb.InferParameter) -> object:
    which = value.WhichOneof("parameter_choice")
    return getattr(value, which) if which else None


def infer_parts(request: pb.ModelInferRequest) -> tuple[dict, bytes]:
    """The request as REST's JSON header and binary tail, so that `oip.run_infer` checks it as it checks REST's;
    every output is asked for as binary data (it goes into `raw_output_contents`)."""
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise oip.bad(
            f"raw_input_contents holds {len(raws)} entries for {len(request.inputs)} inputs; send one per input."
        )
    inputs, tail = [], b""
    for i, tensor in enumerate(request.inputs):
        described: dict = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if raws:
            data = raws[i] if i == 0 else b""
        elif tensor.datatype == "BYTES" and tensor.contents.bytes_contents:
            data = oip.encode_bytes(list(tensor.contents.bytes_contents))
        else:
            data = None
            described["data"] = list(tensor.contents.uint_contents)
        if data is not None:
            described["parameters"] = {"binary_data_size": len(data)}
            tail = tail or data
        inputs.append(described)
    outputs = [
        {"name": o.name, "parameters": {**{k: _parameter(v) for k, v in o.parameters.items()}, "binary_data": True}}
        for o in request.outputs
    ]
    header = {"inputs": inputs, "parameters": {"binary_data_output": True}, **({"outputs": outputs} if outputs else {})}
    if request.id:
        header["id"] = request.id
    return header, tail


def infer_response(body: dict, binary: list[bytes]) -> pb.ModelInferResponse:
    outputs = [
        pb.ModelInferResponse.InferOutputTensor(name=o["name"], datatype=o["datatype"], shape=o["shape"])
        for o in body["outputs"]
    ]
    return pb.ModelInferResponse(
        model_name=body["model_name"],
        model_version=body["model_version"],
        id=body.get("id", ""),
        outputs=outputs,
        raw_output_contents=binary,
    )


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The RPCs; each is one `_answer` of the REST request it stands for."""

    def __init__(self, state: ServiceState, stats: oip.Statistics):
        self.state, self.stats = state, stats

    async def _answer(
        self,
        context: grpc.aio.ServicerContext,
        rpc: str,
        method: str,
        path: str,
        work: Callable[[Principal, dict], Awaitable[object]],
    ) -> object:
        """Decide access as for `method path`, run `work(principal, audit details)`, and answer its errors
        as status codes; count the call in the metrics (route `grpc:<rpc>`, errors by code) and audit
        management calls; in a server span when tracing (the caller's `traceparent` metadata its parent)."""
        with tracing.server_span(f"grpc {rpc}", context.invocation_metadata):
            start = time.perf_counter()
            authorization = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), "")
            principal, details = None, {}
            try:
                principal = self.state.access.decide(method, path, authorization)
                if not self.state.started:
                    raise ApiError(
                        503, "not_ready", "The service is still loading the backbone and adapters; retry shortly."
                    )
                answer = await work(principal, details)
                self._record(rpc, method, path, 200, start, principal, details)
                return answer
            except Denied as denied:
                principal, error = denied.principal, as_api_error(denied.reason)
            except Exception as exc:
                error = as_api_error(exc)
                if error is None:
                    _log.exception("unhandled error in gRPC %s", rpc)
                    error = INTERNAL
            self._record(rpc, method, path, error.status, start, principal, details)
            self.state.metrics.errors.labels(error.code).inc()
            retry = (error.headers or {}).get("Retry-After")
            if retry is not None:
                context.set_trailing_metadata((("retry-after", retry),))
            await context.abort(status_code(error), f"{error.code}: {error.detail}")

    def _record(
        self, rpc: str, method: str, path: str, status: int, start: float, principal: Principal | None, details: dict
    ) -> None:
        metrics = self.state.metrics
        metrics.requests.labels(f"grpc:{rpc}", str(status)).inc()
        metrics.latency.labels(f"grpc:{rpc}").observe(time.perf_counter() - start)
        key = principal.name if principal is not None else "-"
        metrics.key_requests.labels(key, str(status)).inc()
        if is_management(method, path):
            audit.write(key, method, path, status, details)

    # ----- health and metadata -------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        async def work(principal: Principal, details: dict) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self._answer(context, "ServerLive", "GET", "/v2/health/live", work)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        start = time.perf_counter()  # public, and answered (not refused) while the engine is not ready
        status = await self.state.engine_status() if self.state.started else None
        self._record("ServerReady", "GET", "/v2/health/ready", 200, start, None, {})
        return pb.ServerReadyResponse(ready=bool(self.state.started and status is not None and status.ready))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        async def work(principal: Principal, details: dict) -> pb.ServerMetadataResponse:
            return json_format.ParseDict((await oip.server_metadata()).model_dump(), pb.ServerMetadataResponse())

        return await self._answer(context, "ServerMetadata", "GET", "/v2", work)

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        """Unknown (or not the key's) models are NOT_FOUND as over REST; an unloaded one is not ready."""

        async def work(principal: Principal, details: dict) -> pb.ModelReadyResponse:
            try:
                await oip.model_ready(request.name, self.state, request.version or None)
            except DomainUnloaded:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        return await self._answer(context, "ModelReady", "GET", f"/v2/models/{request.name}/ready", work)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        async def work(principal: Principal, details: dict) -> pb.ModelMetadataResponse:
            metadata = await oip.model_metadata(request.name, self.state, request.version or None)
            return json_format.ParseDict(metadata.model_dump(), pb.ModelMetadataResponse())

        return await self._answer(context, "ModelMetadata", "GET", f"/v2/models/{request.name}", work)

    # ----- inference and statistics ----------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        async def work(principal: Principal, details: dict) -> pb.ModelInferResponse:
            async def read() -> tuple[dict, bytes]:
                return infer_parts(request)

            body, binary = await oip.run_infer(
                self.state, self.stats, lane_of(principal), request.model_name, request.model_version or None, read
            )
            return infer_response(body, binary)

        return await self._answer(context, "ModelInfer", "POST", f"/v2/models/{request.model_name}/infer", work)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context) -> pb.ModelStatisticsResponse:
        async def work(principal: Principal, details: dict) -> pb.ModelStatisticsResponse:
            if not request.name:
                raise oip.bad("Name the model whose statistics you want (this server keeps them per model).")
            stats = await oip.model_stats(request.name, self.state, self.stats, request.version or None)
            return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

        return await self._answer(context, "ModelStatistics", "GET", f"/v2/models/{request.name}/stats", work)

    # ----- model repository (admin) ---------------------------------------------------------------

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        async def work(principal: Principal, details: dict) -> pb.RepositoryIndexResponse:
            models = await oip.repository_index(self.state)
            return json_format.ParseDict(
                {"models": [m for m in models if not request.ready or m["state"] == "READY"]},
                pb.RepositoryIndexResponse(),
            )

        return await self._answer(context, "RepositoryIndex", "POST", "/v2/repository/index", work)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context
    ) -> pb.RepositoryModelLoadResponse:
        """A bundle comes as the bytes of the `file:<name>.safetensors` parameter; without one, an unloaded
        model is served again."""

        async def work(principal: Principal, details: dict) -> pb.RepositoryModelLoadResponse:
            parameters = dict(request.parameters.items())
            value = oip.bundle_parameter(parameters)
            if value is not None and value.WhichOneof("parameter_choice") != "bytes_param":
                raise oip.bad("Send the bundle's bytes as the file parameter's bytes_param.", 422, "invalid_bundle")
            await oip.load_domain(self.state, request.model_name, None if value is None else value.bytes_param, details)
            return pb.RepositoryModelLoadResponse()

        return await self._answer(
            context, "RepositoryModelLoad", "POST", f"/v2/repository/models/{request.model_name}/load", work
        )

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context
    ) -> pb.RepositoryModelUnloadResponse:
        async def work(principal: Principal, details: dict) -> pb.RepositoryModelUnloadResponse:
            details["domain"] = request.model_name
            await oip.repository_unload(request.model_name, self.state)
            return pb.RepositoryModelUnloadResponse()

        return await self._answer(
            context, "RepositoryModelUnload", "POST", f"/v2/repository/models/{request.model_name}/unload", work
        )


async def start_server(state: ServiceState, stats: oip.Statistics, host: str, port: int) -> grpc.aio.Server:
    """The gRPC server on `host:port`, started. Several front ends bind the same port (SO_REUSEPORT, gRPC's
    default on Linux); a message is limited to the REST body's limit."""
    limit = state.settings.max_request_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 1),
        ]
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state, stats), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"RA_GRPC_PORT {port}: cannot listen on {host}:{port}; choose a free port.")
    await server.start()
    return server
