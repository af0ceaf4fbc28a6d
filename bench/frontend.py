"""Where the service's CPU goes per image at saturation, and the web stack's own floor on this machine.

    python -m bench.frontend [--concurrency 64] [--seconds 8] [--files-per-request 1]

1. Starts `python -m service` with the 8 demo domains (as `bench.serve` does), loads it with wrk
   (tiny PNGs, multipart `/predict/{domain}`), and reads every thread's CPU time from
   /proc/<pid>/task. `py-spy dump` names the Python threads: `MainThread` is the event loop (HTTP,
   routing, multipart, small images' decoding, the answer), `preprocess` the pool that decodes large
   images, `engine` the batcher's thread; the native threads that Python does not name are
   TensorFlow's (with its `tf_*` ones). Printed: CPU milliseconds per image by group.
2. The front end alone: the same service with the engine's computation replaced by zeros
   (`--serve-without-engine`, run as a child process). Its CPU per request and requests/s are what the
   event loop and its helpers cost, and the most one process can answer whatever the accelerator.
3. The floor: the same uvicorn, under the same wrk load, serving a FastAPI app with nothing but the
   same route shape (a multipart upload in, a small JSON out), a route that reads the raw body, and a
   bare ASGI callable: CPU milliseconds per request. No service can spend less on HTTP per request
   with this stack.
Prints one JSON object last. Needs wrk and py-spy (`pip install py-spy`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Annotated

from fastapi import FastAPI, File, Request, UploadFile

from bench.serve import (
    DEMO,
    TOKEN,
    WRK_SCRIPT,
    drive_wrk,
    free_port,
    process_cpu_s,
    request_body,
    run_wrk,
    test_images,
    wait_ready,
    wait_warm,
)

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


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds so far of each live thread of `pid`, by native thread id."""
    out = {}
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # ended meanwhile
            continue
        out[task.name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def thread_groups(pid: int) -> dict[str, str]:
    """Native thread id -> group: the Python thread's name without its number, else `tensorflow`."""
    spy = shutil.which("py-spy") or str(pathlib.Path(sys.executable).with_name("py-spy"))  # in this venv
    dump = json.loads(
        subprocess.run([spy, "dump", "--json", "--pid", str(pid)], capture_output=True, text=True, check=True).stdout
    )
    named = {str(t["os_thread_id"]): re.sub(r"_\d+$", "", t["thread_name"] or "python") for t in dump}
    groups = {}
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        groups[task.name] = named.get(task.name, "tensorflow")
    return groups


def service_by_thread(concurrency: int, seconds: float, files: int, engine: bool = True) -> dict:
    """The service's CPU ms per image by thread group at saturation (`engine=False`: its computation
    replaced by zeros)."""
    bundles = sorted(p for p in DEMO.glob("*.safetensors") if p.name != "backbone.safetensors")
    images = test_images(16, 48)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as store:
        from service.record.directory import DirectoryRecord

        record = DirectoryRecord(pathlib.Path(store))
        names = [f"bench{i}" for i in range(8)]
        for i, name in enumerate(names):
            record.add(name, bundles[i % len(bundles)].read_bytes(), replace=False)
        record.close()
        env = {
            **os.environ,
            "RA_STORE_DIR": store,
            "RA_ADMIN_TOKEN": TOKEN,
            "RA_DEMO_ADAPTERS": "false",
            "RA_BACKBONE": str(DEMO / "backbone.safetensors"),
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        command = ["-m", "service"] if engine else ["-m", "bench.frontend", "--serve-without-engine"]
        server = subprocess.Popen(
            [sys.executable, *command, "--port", str(port), "--log-level", "warning"],
            env=env,
            cwd=pathlib.Path(__file__).resolve().parents[1],
        )
        try:
            wait_ready(url)
            wait_warm(url)
            drive_wrk(url, names, images, concurrency, 2.0, files)  # warm-up: every thread has started
            groups = thread_groups(server.pid)
            before = thread_cpu_s(server.pid)
            run = drive_wrk(url, names, images, concurrency, seconds, files)
            after = thread_cpu_s(server.pid)
        finally:
            server.terminate()
            server.wait(30)
    per_group: collections.Counter[str] = collections.Counter()
    for tid, cpu in after.items():
        per_group[groups.get(tid, "tensorflow")] += cpu - before.get(tid, 0.0)
    count = run["requests"] * files
    return {
        "img_s": round(run["img_s"], 1),
        "errors": run["errors"],
        "cpu_ms_per_img": {group: round(cpu * 1000 / count, 3) for group, cpu in per_group.most_common()},
        "total_cpu_ms_per_img": round(sum(per_group.values()) * 1000 / count, 3),
    }


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
        cwd=pathlib.Path(__file__).resolve().parents[1],
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


def answer_zeros() -> None:
    """Replace the engine's computation by zeros in this process (a benchmark's child process only); the
    golden self-test, which zeros would fail, passes."""
    import numpy as np

    from model.engine import InferenceEngine

    def zeros(self, images, slots) -> list:
        held = [slots] * len(images) if hasattr(slots, "num_classes") else list(slots)
        return [np.zeros(slot.num_classes, np.float32) for slot in held]

    InferenceEngine.predict = zeros
    InferenceEngine._verify_golden = lambda self, bundle, slot: None


def serve_without_engine(argv: list[str]) -> None:
    """`python -m service` with every engine call answered by zeros: only the front end computes."""
    from service.__main__ import main as serve

    answer_zeros()
    serve(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-without-engine"]:
        return serve_without_engine(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--files-per-request", type=int, default=1)
    args = parser.parse_args(argv)
    service = service_by_thread(args.concurrency, args.seconds, args.files_per_request)
    front_end = service_by_thread(args.concurrency, args.seconds, args.files_per_request, engine=False)
    floor = {
        name: floor_ms_per_request(app, path, args.concurrency, args.seconds)
        for name, app, path in (
            ("fastapi_multipart", "bench.frontend:floor_app", "/predict/"),
            ("fastapi_raw_body", "bench.frontend:floor_app", "/body/"),
            ("bare_asgi", "bench.frontend:bare_asgi", "/"),
        )
    }
    print(
        json.dumps(
            {
                "service": service,
                "without_engine": front_end,
                "floor_cpu_ms_per_request": floor,
                "settings": {
                    "concurrency": args.concurrency,
                    "seconds": args.seconds,
                    "files_per_request": args.files_per_request,
                    "cpus": os.cpu_count(),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
