"""Soak: saturating mixed-domain load with periodic registrations, for a bounded time.

    python -m bench.soak [--minutes 10] [--concurrency 32] [--register-every 20]

Starts `python -m service` on a loopback port with the demo backbone and `--domains` domains,
drives it from a separate process at a fixed concurrency until the time is up (the load stops by
itself), replaces a domain every `--register-every` seconds, samples the server's resident memory
every 5 s, and prints one JSON object last: requests, unexpected errors (anything but 200),
images/s and p50/p99 latency per minute, and memory after warm-up (end of minute 1) and at the
end. Run longer with `--minutes 60`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.harness.cpu import rss_mb
from bench.harness.load import test_images
from bench.harness.servers import DEMO, TOKEN, free_port, wait_ready


async def _load(url: str, domains: list[str], images: list[bytes], concurrency: int, seconds: float) -> list:
    import httpx

    records = []  # (finish time since start, latency s, status)
    deadline = time.perf_counter() + seconds
    rng = random.Random(3)
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        f"/predict/{rng.choice(domains)}", files={"file": ("x.png", rng.choice(images), "image/png")}
                    )
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
                t1 = time.perf_counter()
                records.append((t1 - start, t1 - t0, status))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


def _client(url, domains, images, concurrency, seconds, queue) -> None:
    queue.put(asyncio.run(_load(url, domains, images, concurrency, seconds)))


def main(argv: list[str] | None = None) -> None:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--domains", type=int, default=8)
    parser.add_argument("--register-every", type=float, default=20.0, help="seconds between replacements")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    demo = sorted(p for p in DEMO.glob("*.safetensors") if p.name != "backbone.safetensors")
    bundles = {f"soak{i}": demo[i % len(demo)].read_bytes() for i in range(args.domains)}
    images = test_images(16, 48)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    registrations, registration_errors, memory = 0, 0, []
    with tempfile.TemporaryDirectory() as store:
        env = {
            **os.environ,
            "RA_STORE_DIR": store,
            "RA_ADMIN_TOKEN": TOKEN,
            "RA_DEMO_ADAPTERS": "false",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"], env=env
        )
        try:
            wait_ready(url)
            with httpx.Client(base_url=url, timeout=60) as client:
                for name, data in bundles.items():
                    client.post(
                        "/adapters", headers=auth, files={"bundle": ("b.safetensors", data)}, data={"domain": name}
                    ).raise_for_status()
                ctx = multiprocessing.get_context("spawn")
                queue = ctx.Queue()
                load = ctx.Process(target=_client, args=(url, list(bundles), images, args.concurrency, seconds, queue))
                start = time.perf_counter()
                load.start()
                next_registration = start + args.register_every
                while (now := time.perf_counter()) < start + seconds:
                    memory.append((now - start, rss_mb(server.pid)))
                    if now >= next_registration:
                        name = random.Random(registrations).choice(list(bundles))
                        r = client.post(
                            "/adapters",
                            headers=auth,
                            files={"bundle": ("b.safetensors", bundles[name])},
                            data={"domain": name, "replace": "true"},
                        )
                        registrations += 1
                        registration_errors += r.status_code != 201
                        next_registration += args.register_every
                    time.sleep(5)
                records = queue.get(timeout=seconds + 300)
                load.join(60)
        finally:
            server.terminate()
            server.wait(30)
    minutes = []
    for m in range(int(np.ceil(args.minutes))):
        window = [(lat, st) for t, lat, st in records if m * 60 <= t < (m + 1) * 60]
        ok = np.asarray([lat for lat, st in window if st == 200]) * 1000
        minutes.append(
            {
                "minute": m + 1,
                "img_s": round(len(ok) / 60, 1),
                "p50_ms": round(float(np.percentile(ok, 50)), 1) if len(ok) else None,
                "p99_ms": round(float(np.percentile(ok, 99)), 1) if len(ok) else None,
                "errors": sum(st != 200 for _, st in window),
            }
        )
    after_warmup = next((mb for t, mb in memory if t >= 60), memory[0][1])
    end = memory[-1][1]
    print(
        json.dumps(
            {
                "minutes": args.minutes,
                "requests": len(records),
                "unexpected_errors": sum(st != 200 for *_, st in records),
                "registrations": registrations,
                "registration_errors": registration_errors,
                "rss_mb_after_warmup": round(after_warmup, 1),
                "rss_mb_end": round(end, 1),
                "memory_growth": round(end / after_warmup - 1, 4),
                "per_minute": minutes,
                "settings": {
                    "concurrency": args.concurrency,
                    "domains": args.domains,
                    "register_every_s": args.register_every,
                    "cpus": os.cpu_count(),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
