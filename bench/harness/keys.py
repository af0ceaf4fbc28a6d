"""API keys for the benches: one per tenant, each scoped to the domain of its name, written as the
service's keys file; and the well-behaved tenants' steady load."""

from __future__ import annotations

import json
import pathlib

from bench.harness.load import request_body, run_wrk
from service.frontend.access import hash_key

TENANTS = ("calm1", "calm2", "flood")  # each tenant's key is scoped to the domain of its name


def secret(tenant: str) -> str:
    return f"bench-key-{tenant}"


def write_keys(path: pathlib.Path, flood_rate: float | None) -> None:
    keys = [
        {
            "name": t,
            "key_sha256": hash_key(secret(t)),
            "domains": [t],
            **({"rate_per_s": flood_rate} if t == "flood" and flood_rate else {}),
        }
        for t in TENANTS
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": keys}))
    tmp.replace(path)  # the service never reads half a file


CALM_SCRIPT = """
local f = io.open("%(body)s", "rb"); local body = f:read("*all"); f:close()
local tenants = {%(tenants)s}
local i = 0
request = function()
  i = i + 1
  local t = tenants[(i %% #tenants) + 1]
  return wrk.format("POST", "/predict/" .. t[1], {["Content-Type"] = "%(content_type)s",
                    ["Authorization"] = "Bearer " .. t[2]}, body)
end
delay = function() return %(delay_ms)d end
"""


def steady(url: str, tenants: list[str], image: bytes, rate: float, seconds: float) -> dict:
    """The well-behaved tenants from wrk (C, so the figures are the server's, not a starved Python client's):
    one connection per tenant, each pausing 1/rate s after every answer; wrk's latency percentiles."""
    body, parts = request_body("multipart", [image], 1, 0)
    pairs = ", ".join(f'{{"{t}", "{secret(t)}"}}' for t in tenants)
    run = run_wrk(
        url,
        lambda body_file: (
            CALM_SCRIPT
            % {
                "body": body_file,
                "content_type": parts["content_type"],
                "tenants": pairs,
                "delay_ms": round(1000 / rate),
            }
        ),
        body,
        len(tenants),
        seconds,
    )
    return {
        "p50_ms": run["p50_ms"],
        "p99_ms": run["p99_ms"],
        "requests": run["requests"],
        "errors": run["non_2xx"] + run["socket_errors"],
    }
