"""OpenTelemetry traces of `python -m service --workers 2`, sent over OTLP/HTTP to a receiver in this test:
one request is one trace whose spans come from the front end and the engine process, the engine's a
subtree of the front end's, under the caller's `traceparent`; its trace id is on the access line.
Without an endpoint nothing is traced and the transport's messages carry no context."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import pathlib
import threading
import time

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from service_process import ServiceProcess, free_port

from service import tracing
from service.transport import CALLS, ENCODER, Call

IMAGE = (pathlib.Path(__file__).resolve().parents[1] / "service" / "demo" / "sample-ankle-boot.png").read_bytes()
CALLER_TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


class Receiver(http.server.ThreadingHTTPServer):
    """A minimal OTLP/HTTP trace receiver: every span it is sent, with its process's resource attributes."""

    def __init__(self):
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", free_port()), Handler)

    def of_trace(self, trace_id: str) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    spans.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "attributes": {a.key: a.value for a in span.attributes},
                            "process": resource.get("ra.process"),
                            "service": resource.get("service.name"),
                        }
                    )
        with self.server.lock:
            self.server.spans.extend(spans)
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    yield receiver
    receiver.shutdown()


def traced_server(receiver: Receiver, work: pathlib.Path, workers: int) -> ServiceProcess:
    return ServiceProcess(
        {
            "RA_STORE_DIR": str(work / "store"),
            "RA_PREPROCESS_THREADS": "1",
            "RA_LOG_FORMAT": "json",
            "RA_ACCESS_LOG": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_address[1]}",
            "OTEL_SERVICE_NAME": "adapters-under-test",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
        work / "service.log",
        workers=workers,
    )


@pytest.fixture(scope="module")
def traced(receiver, tmp_path_factory):
    server = traced_server(receiver, tmp_path_factory.mktemp("traced"), workers=2)
    try:
        server.start().wait_ready()
        yield server, receiver
    finally:
        server.stop()


def spans_of(receiver: Receiver, trace_id: str, names: set[str], timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        spans = receiver.of_trace(trace_id)
        if names <= {s["name"] for s in spans}:
            return spans
        assert time.monotonic() < deadline, f"only these spans arrived: {sorted(s['name'] for s in spans)}"
        time.sleep(0.1)


ENGINE_SPANS = {"engine infer", "queue wait", "engine batch", "device call", "reply"}
FRONT_END_SPANS = {"POST /predict/{domain}", "decode", "engine call"}


def test_one_request_is_one_trace_across_the_front_end_and_the_engine(traced):
    server, receiver = traced
    traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    response = httpx.post(
        server.url + "/predict/fashion",
        files={"file": ("boot.png", IMAGE)},
        headers={"traceparent": traceparent, "X-Request-ID": "traced-1"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    spans = spans_of(receiver, CALLER_TRACE, FRONT_END_SPANS | ENGINE_SPANS)
    by_id = {s["span_id"]: s for s in spans}
    (root,) = [s for s in spans if s["parent"] == CALLER_SPAN]  # the caller's span is the parent
    assert root["name"] == "POST /predict/{domain}"  # FastAPI's server span
    assert root["attributes"]["http.response.status_code"].int_value == 200
    assert root["attributes"]["ra.request_id"].string_value == "traced-1"
    for span in spans:  # one tree: every other span's parent is in the trace
        if span is not root:
            assert span["parent"] in by_id, f"{span['name']}'s parent is not in the trace"
        assert span["start"] <= span["end"]
    name = {s["name"]: s for s in spans}

    def parent(span_name: str) -> str:
        return by_id[name[span_name]["parent"]]["name"]

    def ancestors(span_name: str) -> list[str]:
        chain, span = [], name[span_name]
        while span is not root:
            span = by_id[span["parent"]]
            chain.append(span["name"])
        return chain

    assert root["name"] in ancestors("decode") and root["name"] in ancestors("engine call")
    assert parent("engine infer") == "engine call"  # across the processes
    assert parent("queue wait") == parent("engine batch") == parent("reply") == "engine infer"
    assert parent("device call") == "engine batch"
    assert {name[n]["process"] for n in FRONT_END_SPANS} == {"front end"}
    assert {name[n]["process"] for n in ENGINE_SPANS} == {"engine"}
    assert {s["service"] for s in spans} == {"adapters-under-test"}
    batch = name["engine batch"]["attributes"]
    assert batch["ra.batch.size"].int_value >= 1 and batch["ra.batch.domains"].int_value == 1
    engine_call, engine_infer = name["engine call"], name["engine infer"]
    assert engine_call["start"] <= engine_infer["start"] and engine_infer["end"] <= engine_call["end"] + 5_000_000

    access = [
        json.loads(line)
        for line in server.log_path.read_text().splitlines()
        if line.startswith("{") and '"service.access"' in line and "traced-1" in line
    ]
    assert [a["trace_id"] for a in access] == [CALLER_TRACE]


def test_a_request_without_traceparent_starts_its_own_trace(traced):
    server, receiver = traced
    response = httpx.post(
        server.url + "/predict/digits",
        files={"file": ("boot.png", IMAGE)},
        headers={"X-Request-ID": "traced-2"},
        timeout=30,
    )
    assert response.status_code == 200
    deadline = time.monotonic() + 20
    while not (
        roots := [
            s
            for s in receiver.spans
            if s["attributes"].get("ra.request_id", None) is not None
            and s["attributes"]["ra.request_id"].string_value == "traced-2"
        ]
    ):
        assert time.monotonic() < deadline, "the request's span never arrived"
        time.sleep(0.1)
    (root,) = roots
    assert root["parent"] == "" and root["trace_id"] != CALLER_TRACE
    assert {s["name"] for s in spans_of(receiver, root["trace_id"], ENGINE_SPANS)} >= ENGINE_SPANS


def test_one_process_traces_the_batch_under_the_engine_call(receiver, tmp_path):
    server = traced_server(receiver, tmp_path, workers=1)
    try:
        server.start().wait_ready()
        trace_id = "0af7651916cd43dd8448eb211c80319c"
        response = httpx.post(
            server.url + "/predict/fashion",
            files={"file": ("boot.png", IMAGE)},
            headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
            timeout=30,
        )
        assert response.status_code == 200
        spans = spans_of(receiver, trace_id, {"engine call", "queue wait", "engine batch", "device call"})
    finally:
        server.stop()
    by_id = {s["span_id"]: s for s in spans}
    parent_of = {s["name"]: by_id[s["parent"]]["name"] for s in spans if s["parent"] in by_id}
    assert parent_of["queue wait"] == parent_of["engine batch"] == "engine call"
    assert parent_of["device call"] == "engine batch"
    assert {s["process"] for s in spans} == {"service"}


def test_untraced_calls_carry_no_context():
    assert not tracing.enabled and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") is None
    (received,) = CALLS.decode(ENCODER.encode([Call(1, "status", [], 0.0)]))
    assert received.trace is None
    assert tracing.to_message() is None  # no span is current
