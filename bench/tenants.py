"""A noisy neighbour: two well-behaved tenants at a steady rate, alone and while a third tenant floods the
service at many times what it can classify.

    python -m bench.tenants [--rate 20] [--seconds 10] [--flood-connections 32] [--flood-share 0.25]

Starts `python -m service` (demo backbone) with three domains and a keys file (`RA_API_KEYS_FILE`): one
key per tenant, each scoped to its own domain. First the service's capacity is measured (wrk saturating
one domain); then the flooding tenant's key gets a rate limit of `--flood-share` of that capacity (the
keys file is rewritten and reloaded while serving), and the flood starts: wrk with `--flood-connections`
as fast as the answers come. The well-behaved tenants (a second wrk, one connection each) send a request,
wait for the answer, pause 1/`--rate` s, and so on.

Prints one JSON object last: the well-behaved tenants' p50/p99 and errors alone and under the flood, the
ratio of their p99s (target <= 2), the flood's offered rate over the capacity, and the share of its
requests refused with 429 (counted per key by the service's own metrics). Loopback only; it stops by
itself.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import httpx

from bench.harness.keys import TENANTS, secret, steady, write_keys
from bench.harness.load import drive_wrk, test_images
from bench.harness.servers import DEMO, TOKEN, free_port, wait_ready


def key_count(url: str, key: str, status: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).text
    match = re.search(rf'^ra_key_requests_total\{{key="{key}",status="{status}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="requests/s of each well-behaved tenant")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--flood-connections", type=int, default=32)
    parser.add_argument(
        "--flood-share",
        type=float,
        default=0.25,
        help="the flooding key's rate limit, as a share of the measured capacity (0: no limit)",
    )
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        sys.exit("the flood needs wrk (apt-get install wrk)")

    demo = sorted(p for p in DEMO.glob("*.safetensors") if p.name != "backbone.safetensors")
    images = test_images(4, 48)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        keys = pathlib.Path(tmp) / "keys.json"
        write_keys(keys, None)
        env = {
            **os.environ,
            "RA_STORE_DIR": str(pathlib.Path(tmp) / "store"),
            "RA_ADMIN_TOKEN": TOKEN,
            "RA_DEMO_ADAPTERS": "false",
            "RA_API_KEYS_FILE": str(keys),
            "RA_API_KEYS_POLL_S": "0.2",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
            env=env,
            start_new_session=True,
        )
        try:
            wait_ready(url)
            with httpx.Client(base_url=url, timeout=60) as client:
                for name, path in zip(TENANTS, demo):
                    client.post(
                        "/adapters",
                        headers={"Authorization": f"Bearer {TOKEN}"},
                        files={"bundle": ("b.safetensors", path.read_bytes())},
                        data={"domain": name},
                    ).raise_for_status()
            calm = ["calm1", "calm2"]
            capacity = drive_wrk(url, ["flood"], images, 32, 4, 1, key=secret("flood"))["img_s"]
            flood_rate = round(capacity * args.flood_share, 1) if args.flood_share > 0 else None
            write_keys(keys, flood_rate)
            time.sleep(1.0)  # the service reloads the keys
            steady(url, calm, images[0], args.rate, 2.0)  # warm-up
            alone = steady(url, calm, images[0], args.rate, args.seconds)
            before = {s: key_count(url, "flood", s) for s in ("200", "429")}
            flooder = multiprocessing.get_context("spawn").Pool(1)
            pending = flooder.apply_async(
                drive_wrk,
                (url, ["flood"], images, args.flood_connections, args.seconds + 2, 1),
                {"key": secret("flood")},
            )
            time.sleep(1.0)
            under = steady(url, calm, images[0], args.rate, args.seconds)
            flood_out = pending.get(timeout=args.seconds + 120)
            flooder.close()
            after = {s: key_count(url, "flood", s) for s in ("200", "429")}
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
    flood_s = args.seconds + 2
    flood_requests = flood_out["requests"]
    refused_429 = after["429"] - before["429"]
    result = {
        "alone": alone,
        "under_flood": under,
        "p99_ratio": round(under["p99_ms"] / alone["p99_ms"], 2),
        "capacity_img_s": round(capacity, 1),
        "flood": {
            "requests_s": round(flood_requests / flood_s, 1),
            "over_capacity": round(flood_requests / flood_s / capacity, 2),
            "rate_limit_per_s": flood_rate,
            "refused_429_rate": round(refused_429 / max(flood_requests, 1), 3),
            "served_img_s": round((after["200"] - before["200"]) / flood_s, 1),
        },
        "settings": {
            "rate_per_tenant": args.rate,
            "seconds": args.seconds,
            "flood_connections": args.flood_connections,
            "cpus": os.cpu_count(),
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
