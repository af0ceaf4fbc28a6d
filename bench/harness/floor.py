"""The web stack's own floor: the same uvicorn under the same wrk load, serving nothing but the route's
shape (a multipart upload in, a small JSON out), a route that reads the raw body, or a bare ASGI
callable. No service on this stack spends less CPU per request."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from typing import Annotated

from fastapi import FastAPI, File, Request, UploadFile

from bench.harness.cpu import process_cpu_s
from bench.harness.load import WRK_SCRIPT, request_body, run_wrk, test_images
from bench.harness.servers import REPO, free_port

FLOORS = {  # name: (uvicorn's app, the route's prefix)
    "fastapi_multipart": ("bench.harness.floor:floor_app", "/predict/"),
    "fastapi_raw_body": ("bench.harness.floor:floor_app", "/body/"),
    "bare_asgi": ("bench.harness.floor:bare_asgi", "/"),
}


floor_app = FastAPI()


@floor_app.post("/predict/{domain}")
async def floor_multipart(domain: str, file: Annotated[list[UploadFile], File()]) -> dict:
    return {"domain": domain, "sizes": [len(await f.read()) for f in file]}


@floor_app.post("/body/{domain}")
async def floor_body(domain: str, request: Request) -> dict:
    return {"domain": domain, "size": len(await request.body())}


async def bare_asgi(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


def wrk_multipart(url: str, prefix: str, concurrency: int, seconds: float) -> dict:
    """wrk posting one tiny PNG as multipart to `url` + `prefix` + a domain name."""
    body, parts = request_body("multipart", test_images(16, 48), 1, 32)
    return run_wrk(
        url,
        lambda body_file: WRK_SCRIPT % {"body": body_file, **parts, "prefix": prefix, "domains": '"x"'},
        body,
        concurrency,
        seconds,
    )


def floor_ms_per_request(app: str, prefix: str, concurrency: int, seconds: float) -> float:
    """CPU ms per request of uvicorn serving `app` (module:attribute) under wrk, one tiny PNG per request."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"uvicorn {app} did not listen within 60 s")
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        wrk_multipart(url, prefix, concurrency, 2.0)  # warm-up
        cpu = process_cpu_s(server.pid)
        run = wrk_multipart(url, prefix, concurrency, seconds)
        if run["non_2xx"] or run["socket_errors"]:
            raise RuntimeError(f"{app}: {run}")
        return round((process_cpu_s(server.pid) - cpu) * 1000 / run["requests"], 3)
    finally:
        server.terminate()
        server.wait(30)
