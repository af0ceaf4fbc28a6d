"""OpenTelemetry traces across the processes: one trace per request, from the front end's HTTP span into
the engine process's queue wait, batch, device call and reply.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and then
configured by the standard `OTEL_*` variables (service name, sampler, headers, batch sizes), which the
SDK reads itself. Off, nothing is imported beyond the API and every hot path checks one module flag, so
an untraced request makes no span object at all. The HTTP server span is FastAPI's own (its native
telemetry follows the tracer provider set here, and honours the caller's W3C `traceparent` header);
a front end sends its current span's context to the engine in the call's `trace` field.

Imported by every process (front ends, engine, the one process of `--workers 1`); imports neither side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping

from opentelemetry import context, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_log = logging.getLogger(__name__)
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROPAGATOR = TraceContextTextMapPropagator()
enabled = False  # read on every hot path: set once, by `configure`
tracer: trace.Tracer = trace.NoOpTracer()
SERVER, CLIENT = trace.SpanKind.SERVER, trace.SpanKind.CLIENT
ERROR = trace.StatusCode.ERROR
use_span = trace.use_span  # make a span current (`end_on_exit` to end it)
in_context = trace.set_span_in_context  # a context whose current span is this one (a parent)
current = context.get_current  # the context now (its span the parent of what is made in it)
_OFF = contextlib.nullcontext()


def configure(process: str) -> bool:
    """Export this process's spans over OTLP/HTTP when an endpoint is configured; whether it does."""
    global enabled, tracer
    if not any(os.environ.get(v) for v in ENDPOINT_VARIABLES) or os.environ.get("OTEL_SDK_DISABLED", "") == "true":
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "residual-adapters")})
    provider = TracerProvider(resource=resource.merge(Resource({"ra.process": process})))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("service")
    enabled = True
    _log.info("tracing: spans go to %s", next(os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)))
    return True


def shutdown() -> None:
    """Send the spans still buffered (a process's last requests) before it exits."""
    if enabled:
        trace.get_tracer_provider().shutdown()


def tag_request(request_id: str) -> str | None:
    """Put the request id on the request's server span (FastAPI's, current here); its trace id, for the
    access line (None when the request is not sampled)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return None
    span.set_attribute("ra.request_id", request_id)
    return ids(span)[0]


def to_message() -> str | None:
    """The current span's context as a `traceparent` string for a transport message (None: no span)."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def from_message(traceparent: str) -> context.Context:
    return PROPAGATOR.extract({"traceparent": traceparent})


def ids(span: trace.Span) -> tuple[str, str]:
    """(trace id, span id) in hex, as logs and tracing back ends write them."""
    c = span.get_span_context()
    return trace.format_trace_id(c.trace_id), trace.format_span_id(c.span_id)


def span(name: str, kind: trace.SpanKind = trace.SpanKind.INTERNAL, **attributes: object):
    """A context manager: a live span made current (children and `to_message` see it), or nothing when off."""
    return tracer.start_as_current_span(name, kind=kind, attributes=attributes) if enabled else _OFF


def server_span(name: str, metadata: Callable[[], Iterable[tuple[str, str]] | None]):
    """A current server span whose parent is the caller's `traceparent` in `metadata()` (a gRPC call's),
    or nothing when off (then `metadata` is not read)."""
    if not enabled:
        return _OFF
    carrier = {k: v for k, v in metadata() or () if k in ("traceparent", "tracestate")}
    return tracer.start_as_current_span(name, context=PROPAGATOR.extract(carrier), kind=SERVER)


def epoch_ns(reading: float, clock: Callable[[], float] = time.monotonic) -> int:
    """A `clock()` reading (monotonic seconds) as the Unix-epoch nanoseconds a span's start or end takes."""
    return time.time_ns() - int((clock() - reading) * 1e9)


def record(
    name: str,
    parent: context.Context | None,
    start_s: float,
    end_s: float,
    attributes: Mapping[str, object] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> trace.Span:
    """A finished span from two `clock()` readings, for what is known after the fact (the engine's queue
    wait and batch); `parent` None means the current span."""
    start = tracer.start_span(name, context=parent, start_time=epoch_ns(start_s, clock), attributes=attributes)
    start.end(end_time=epoch_ns(end_s, clock))
    return start
