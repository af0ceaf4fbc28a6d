"""A fleet on one registry of record, on this machine: how fast changes reach every replica, what a
database outage costs, and what a second worker process adds.

    python -m bench.fleet [--registrations 50] [--seconds 10]

With the demo backbone, starts three replicas (`python -m service` processes on loopback ports)
on a throwaway PostgreSQL cluster, then three on one shared store directory, and prints one JSON
object last:

- `register_to_all_replicas_ms` (p50/p99 per backend): POST /adapters on one replica (in turn),
  until every replica lists the new domain at its version; split into `answer_ms` (validation,
  golden self-test, the durable write: until the 201) and `after_answer_ms` (until the last replica
  lists it). The listing is polled (it never loads a domain itself), so the second part is the
  change feed's latency (NOTIFY, or the directory's journal) plus each replica's load;
- `outage_failed_predictions`: predictions that failed while PostgreSQL was stopped for 3 s under
  traffic on all replicas; `outage_management_503`: management calls refused meanwhile;
  `recovery_s`: from the database accepting connections again until a new registration succeeds
  and is listed by every replica;
- `workers_img_s`: saturating multipart /predict load (wrk if installed) on `--workers 1` and
  `--workers 2` (directory backend), same run.
Every process talks to 127.0.0.1 only and stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import httpx
import numpy as np

from bench.harness.load import drive, test_images
from bench.harness.postgres import Cluster, server_bin
from bench.harness.servers import DEMO, TOKEN, free_port, wait_ready

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.contextmanager
def replicas(env: dict[str, str], count: int, workers: int = 1, log_dir: pathlib.Path | None = None):
    """`count` service processes (each `--workers`), ready; yields their URLs; stops them afterwards."""
    procs, urls = [], []
    for i in range(count):
        port = free_port()
        log_file = log_dir / f"replica{i}.log" if log_dir else None
        with log_file.open("wb") if log_file else contextlib.nullcontext(subprocess.DEVNULL) as log:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "service",
                        "--port",
                        str(port),
                        "--workers",
                        str(workers),
                        "--log-level",
                        "warning",
                    ],
                    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url in urls:
            wait_ready(url, timeout=180)
        yield urls, procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def listed(url: str, domain: str, version: int, client: httpx.Client) -> bool:
    adapters = client.get(url + "/adapters").json()["adapters"]
    return any(a["domain"] == domain and a["version"] == version for a in adapters)


def wait_listed(urls: list[str], domain: str, version: int, timeout: float = 30.0) -> float:
    """Seconds until every replica lists `domain` at `version` (polled every 2 ms per replica)."""
    start = time.perf_counter()
    done: dict[str, float] = {}
    with httpx.Client(timeout=10) as client:
        while len(done) < len(urls):
            for url in urls:
                if url not in done and listed(url, domain, version, client):
                    done[url] = time.perf_counter() - start
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"{domain} v{version} did not reach every replica within {timeout}s")
            time.sleep(0.002)
    return max(done.values())


def propagation(urls: list[str], bundle: bytes, n: int, prefix: str) -> dict:
    """Register `n` domains, each on the next replica, and time until all replicas list it."""
    times, answers, after = [], [], []
    with httpx.Client(timeout=60) as client:
        for i in range(n):
            url, name = urls[i % len(urls)], f"{prefix}{i:03d}"
            start = time.perf_counter()
            response = client.post(
                url + "/adapters", headers=AUTH, files={"bundle": ("b.safetensors", bundle)}, data={"domain": name}
            )
            response.raise_for_status()
            answers.append(time.perf_counter() - start)
            after.append(wait_listed(urls, name, response.json()["version"]))
            times.append(answers[-1] + after[-1])

    def stats(seconds: list[float]) -> dict:
        ms = np.asarray(seconds) * 1000
        return {
            "p50": round(float(np.percentile(ms, 50)), 1),
            "p99": round(float(np.percentile(ms, 99)), 1),
            "max": round(float(ms.max()), 1),
        }

    return {**stats(times), "registrations": n, "answer_ms": stats(answers), "after_answer_ms": stats(after)}


def outage(urls: list[str], cluster: Cluster, bundle: bytes, image: bytes, down_s: float = 3.0) -> dict:
    """Stop PostgreSQL for `down_s` under prediction traffic on every replica; count what failed."""
    stop = threading.Event()
    ok, failed = [0], []

    def traffic(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                try:
                    response = client.post("/predict/fleet000", files={"file": ("x.png", image, "image/png")})
                    if response.status_code == 200:
                        ok[0] += 1
                    else:
                        failed.append(response.status_code)
                except httpx.HTTPError as exc:
                    failed.append(repr(exc))

    threads = [threading.Thread(target=traffic, args=(url,)) for url in urls]
    for t in threads:
        t.start()
    refused = 0
    try:
        time.sleep(1.0)
        cluster.stop("fast")
        down_until = time.monotonic() + down_s
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < down_until:
                response = client.post(
                    urls[0] + "/adapters",
                    headers=AUTH,
                    files={"bundle": ("b.safetensors", bundle)},
                    data={"domain": "outage"},
                )
                refused += response.status_code == 503
                time.sleep(0.5)
        cluster.start()
        back = time.perf_counter()
        with httpx.Client(timeout=30) as client:
            while True:
                response = client.post(
                    urls[1] + "/adapters",
                    headers=AUTH,
                    files={"bundle": ("b.safetensors", bundle)},
                    data={"domain": "recovered"},
                )
                if response.status_code == 201:
                    break
                time.sleep(0.02)
        wait_listed(urls, "recovered", response.json()["version"])
        recovery = time.perf_counter() - back
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    return {
        "outage_failed_predictions": len(failed),
        "outage_predictions_ok": ok[0],
        "outage_management_503": refused,
        "recovery_s": round(recovery, 3),
        "down_s": down_s,
    }


def workers_img_s(
    workers: int, bundles: dict[str, bytes], images: list[bytes], seconds: float, concurrency: int
) -> float:
    with tempfile.TemporaryDirectory() as store:
        env = {"RA_STORE_DIR": store, "RA_ADMIN_TOKEN": TOKEN, "RA_DEMO_ADAPTERS": "false"}
        with replicas(env, 1, workers=workers) as (urls, _):
            with httpx.Client(timeout=60) as client:
                for name, data in bundles.items():
                    client.post(
                        urls[0] + "/adapters",
                        headers=AUTH,
                        files={"bundle": ("b.safetensors", data)},
                        data={"domain": name},
                    ).raise_for_status()
            names = list(bundles)
            drive(urls[0], names, images, concurrency, 2.0, 1)  # warm-up (every worker traces its shapes)
            return drive(urls[0], names, images, concurrency, seconds, 1)["img_s"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registrations", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="each workers_img_s load run")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    bin_dir = server_bin()
    if bin_dir is None:
        sys.exit("PostgreSQL's server is not installed (apt-get install postgresql)")

    demo = sorted(p for p in DEMO.glob("*.safetensors") if p.name != "backbone.safetensors")
    bundle = demo[0].read_bytes()
    images = test_images(16, 48)
    result: dict = {"register_to_all_replicas_ms": {}}
    with tempfile.TemporaryDirectory() as logs:
        cluster = Cluster(bin_dir)
        cluster.start()
        try:
            env = {"RA_REGISTRY_URL": cluster.url, "RA_ADMIN_TOKEN": TOKEN, "RA_DEMO_ADAPTERS": "false"}
            with replicas(env, args.replicas, log_dir=pathlib.Path(logs)) as (urls, _):
                result["register_to_all_replicas_ms"]["postgresql"] = propagation(
                    urls, bundle, args.registrations, "fleet"
                )
                result.update(outage(urls, cluster, bundle, images[0]))
        finally:
            cluster.remove()
        with tempfile.TemporaryDirectory() as store:
            env = {"RA_STORE_DIR": store, "RA_ADMIN_TOKEN": TOKEN, "RA_DEMO_ADAPTERS": "false"}
            with replicas(env, args.replicas) as (urls, _):
                result["register_to_all_replicas_ms"]["directory"] = propagation(
                    urls, bundle, args.registrations, "fleet"
                )
    bundles = {f"bench{i}": demo[i % len(demo)].read_bytes() for i in range(8)}
    one = workers_img_s(1, bundles, images, args.seconds, args.concurrency)
    two = workers_img_s(2, bundles, images, args.seconds, args.concurrency)
    result["workers_img_s"] = {"1": round(one, 1), "2": round(two, 1), "ratio": round(two / one, 3)}
    result["settings"] = {
        "replicas": args.replicas,
        "registrations": args.registrations,
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "load_generator": "wrk" if shutil.which("wrk") else "httpx",
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
