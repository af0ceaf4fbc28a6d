"""A noisy neighbour: two well-behaved domains at a steady rate, alone and while a third domain is
flooded far beyond what the service can classify.

    python -m bench.tenants [--rate 20] [--seconds 10] [--flood-connections 256]

Starts `python -m service` (demo backbone) with three domains. The well-behaved clients send
`--rate` requests per second each, on a fixed schedule (open loop, so a slow answer does not slow
the sending), from a separate Python process; the flood comes from `wrk` at `--flood-connections`.
Prints one JSON object last: the well-behaved domains' p50/p99 and errors alone and under the
flood, their ratio, the flood's requests per second, and the share of them refused with 429
(the flooded domain's share of the queue is full). Loopback only; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import httpx
import numpy as np

from bench.serve import DEMO, TOKEN, drive_wrk, free_port, test_images, wait_ready


async def _steady(url: str, domains: list[str], image: bytes, rate: float, seconds: float) -> dict:
    """Each domain gets a request every 1/rate s; returns latencies (ms) and errors per domain."""
    results = {d: {"ms": [], "errors": 0} for d in domains}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async def one(domain: str) -> None:
            start = time.perf_counter()
            try:
                response = await client.post(f"/predict/{domain}", files={"file": ("x.png", image, "image/png")})
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                results[domain]["ms"].append((time.perf_counter() - start) * 1000)
            else:
                results[domain]["errors"] += 1

        tasks, start = [], time.perf_counter()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks += [asyncio.create_task(one(d)) for d in domains]
        await asyncio.gather(*tasks)
    return results


def _steady_process(url, domains, image, rate, seconds, queue) -> None:
    queue.put(asyncio.run(_steady(url, domains, image, rate, seconds)))


def steady(url: str, domains: list[str], image: bytes, rate: float, seconds: float) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_steady_process, args=(url, domains, image, rate, seconds, queue))
    process.start()
    result = queue.get(timeout=seconds + 120)
    process.join(30)
    return result


def summary(results: dict) -> dict:
    ms = np.concatenate([np.asarray(r["ms"]) for r in results.values()])
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "requests": int(ms.size), "errors": sum(r["errors"] for r in results.values())}


def refused(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(r'^ra_requests_total\{route="/predict/\{domain\}",status="429"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="requests/s of each well-behaved domain")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--flood-connections", type=int, default=256)
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        sys.exit("the flood needs wrk (apt-get install wrk)")

    demo = sorted(p for p in DEMO.glob("*.safetensors") if p.name != "backbone.safetensors")
    images = test_images(4, 48)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as store:
        env = {**os.environ, "RA_STORE_DIR": store, "RA_ADMIN_TOKEN": TOKEN, "RA_DEMO_ADAPTERS": "false",
               "TF_CPP_MIN_LOG_LEVEL": "2"}
        server = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
                                  env=env, start_new_session=True)
        try:
            wait_ready(url)
            with httpx.Client(base_url=url, timeout=60) as client:
                for name, path in zip(("flood", "calm1", "calm2"), demo):
                    client.post("/adapters", headers={"Authorization": f"Bearer {TOKEN}"},
                                files={"bundle": ("b.safetensors", path.read_bytes())},
                                data={"domain": name}).raise_for_status()
            calm = ["calm1", "calm2"]
            steady(url, calm, images[0], args.rate, 2.0)  # warm-up
            alone = summary(steady(url, calm, images[0], args.rate, args.seconds))
            flood_out: dict = {}
            refused_before = refused(url)
            flooder = multiprocessing.get_context("spawn").Pool(1)
            pending = flooder.apply_async(drive_wrk, (url, ["flood"], images, args.flood_connections,
                                                      args.seconds + 2, 1))
            time.sleep(1.0)
            under = summary(steady(url, calm, images[0], args.rate, args.seconds))
            flood_out = pending.get(timeout=args.seconds + 120)
            flooder.close()
            refused_429 = refused(url) - refused_before
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
    flood_requests = flood_out["requests"]
    result = {
        "alone": alone,
        "under_flood": under,
        "p99_ratio": round(under["p99_ms"] / alone["p99_ms"], 2),
        "flood": {"requests_s": round(flood_requests / (args.seconds + 2), 1),
                  "refused_429_rate": round(refused_429 / max(flood_requests, 1), 3),
                  "ok_img_s": round(flood_out["img_s"] * (1 - refused_429 / max(flood_requests, 1)), 1)},
        "settings": {"rate_per_domain": args.rate, "seconds": args.seconds,
                     "flood_connections": args.flood_connections, "cpus": os.cpu_count()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
