"""Logging for every process of the service: text at a terminal, or one JSON object per line
(`RA_LOG_FORMAT=json`) that a log store can search by request id, trace id, domain, tenant or status.

Imported by every process (supervisor, front ends, engine, trainers); imports neither side.
"""

from __future__ import annotations

import json
import logging
import os
import time

FORMAT_VARIABLE = "RA_LOG_FORMAT"
FORMATS = ("text", "json")
# what a record may carry beyond the message (`extra=`): the access line's fields and the trace's ids
FIELDS = (
    "request_id",
    "trace_id",
    "span_id",
    "method",
    "path",
    "route",
    "status",
    "error",
    "ms",
    "domain",
    "tenant",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (RFC 3339, UTC), level, process, logger, message, the fields
    of `FIELDS` that the record carries, and the exception's text when there is one."""

    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "process": self.process,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                out[field] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def log_format() -> str:
    """`RA_LOG_FORMAT`: `text` (the default) or `json`."""
    value = os.environ.get(FORMAT_VARIABLE, "text").strip().lower() or "text"
    if value not in FORMATS:
        raise SystemExit(f"{FORMAT_VARIABLE}={value!r} is not a log format; use one of: {', '.join(FORMATS)}.")
    return value


def configure(process: str, level: str) -> None:
    """Set the root logger of this process (`process` names it in each line: "engine", "front end", ...),
    unless it has handlers already (as `logging.basicConfig`: a host such as pytest keeps its own)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    if log_format() == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        prefix = f"{process} " if process else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
