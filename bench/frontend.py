"""Where the service's CPU goes per image at saturation, and the web stack's own floor on this machine.

    python -m bench.frontend [--concurrency 64] [--seconds 8] [--files-per-request 1]

1. Starts `python -m service` with the 8 demo domains (as `bench.serve` does), loads it with wrk
   (tiny PNGs, multipart `/predict/{domain}`), and reads every thread's CPU time from
   /proc/<pid>/task. `py-spy dump` names the Python threads: `MainThread` is the event loop (HTTP,
   routing, multipart, small images' decoding, the answer), `preprocess` the pool that decodes large
   images, `engine` the batching thread, `device` the thread that runs the model; the native threads
   that Python does not name are
   TensorFlow's (with its `tf_*` ones). Printed: CPU milliseconds per image by group.
2. The front end alone: the same service on a simulated device too fast to matter, answering zeros
   (`RA_SIMULATED_DEVICE_IMG_S`). Its CPU per request and requests/s are what the
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
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

from bench.harness.cpu import thread_cpu_s
from bench.harness.floor import FLOORS, floor_ms_per_request
from bench.harness.load import drive_wrk, test_images
from bench.harness.servers import DEMO, REPO, TOKEN, ZERO_ENGINE, demo_bundles, free_port, wait_ready, wait_warm


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
    """The service's CPU ms per image by thread group at saturation (`engine=False`: on the simulated
    device, answering zeros)."""
    bundles = demo_bundles()
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
        server = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
            env={**env, **({} if engine else ZERO_ENGINE)},
            cwd=REPO,
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--files-per-request", type=int, default=1)
    args = parser.parse_args(argv)
    service = service_by_thread(args.concurrency, args.seconds, args.files_per_request)
    front_end = service_by_thread(args.concurrency, args.seconds, args.files_per_request, engine=False)
    floor = {
        name: floor_ms_per_request(app, path, args.concurrency, args.seconds) for name, (app, path) in FLOORS.items()
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
