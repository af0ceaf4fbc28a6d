"""The fleet as one cache: three replicas behind the shipped HAProxy configuration with domain affinity
against the same proxy balancing round-robin, and one process with the fleet's slots, under the same
Zipf(1.0) traffic.

    python -m bench.affinity [--domains 3000] [--slots 200] [--seconds 10]

Each setup starts fresh replicas on one directory registry of `--domains` hard-linked demo bundles
(`RA_MAX_RESIDENT=--slots`, no host tier, so a device miss is a load from the record), drives the
traffic (wrk, concurrency 64) for a warm round and a measured round, and reads each replica's load
counters. Prints one JSON object last:

- `hit_rate`: the fleet's device hit rate in the measured round (1 - loads / requests) for
  `affinity`, `round_robin` and `single` (one process with replicas x slots), the ideal of each
  cache size, and `affinity_hit_rate_over_single`;
- `img_s` for each and `affinity_over_round_robin_img_s`;
- `hot_domain_max_share`: one domain driven at 192 connections through the affinity proxy, the largest
  share of its requests that one replica served;
- `kill`: a replica killed (SIGKILL) in the middle of Zipf traffic through the affinity proxy: the
  requests that failed (`failed`), against the requests that were in progress on it when it died
  (`in_flight_on_victim`, from HAProxy's statistics socket), and `kill_failed_beyond_inflight`;
- `noisy_tenant`: fresh replicas with a keys file (bench.harness.keys' three tenants, each on its own
  resident domain) behind the proxy with the rates map that service.frontend.proxy_limits makes from that file.
  The fleet's capacity is measured first (wrk saturating one domain with an unlimited key); the
  flooding key then gets a limit of a quarter of it (the map is made and a proxy started with it; the
  replicas reload the same keys file), and two well-behaved tenants (one connection each, 20
  requests/s) are measured alone and while the flooder offers about 10x the capacity (wrk, 128
  connections, each pausing after every answer). `noisy_tenant_p99_ratio`: their p99 under the flood
  over their p99 alone (target <= 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from bench.harness.domains import ideal_hit_rate, seed, zipf_sequence
from bench.harness.haproxy import running_proxy
from bench.harness.keys import TENANTS, secret, steady, write_keys
from bench.harness.load import drive, drive_wrk, test_images
from bench.harness.servers import DEMO, free_port, wait_ready
from service.frontend import proxy_limits
from service.frontend.access import load_keys

REPLICAS = 3


@contextlib.contextmanager
def fleet(store: pathlib.Path, count: int, slots: int, extra: dict[str, str] | None = None):
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "RA_STORE_DIR": str(store),
        "RA_DEMO_ADAPTERS": "false",
        "RA_MAX_RESIDENT": str(slots),
        "RA_HOST_CACHE_MB": "0",
        "RA_DEVICE_MEMORY_MB": str(max(256, slots)),
        "RA_PREPROCESS_THREADS": "1",
        **(extra or {}),
    }
    procs, ports = [], [free_port() for _ in range(count)]
    for port in ports:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    try:
        for port in ports:
            wait_ready(f"http://127.0.0.1:{port}", timeout=240)
        yield ports, procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def loads_and_requests(ports: list[int]) -> tuple[float, float]:
    """Loads onto the device (any source) and images classified, summed over the live replicas."""
    loads = images = 0.0
    for port in ports:
        with contextlib.suppress(httpx.HTTPError):
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            loads += sum(
                float(v) for v in re.findall(r'^ra_adapter_loads_total\{[^}]*outcome="ok"[^}]*\} (\S+)$', text, re.M)
            )
            images += sum(float(v) for v in re.findall(r"^ra_predictions_total\{[^}]*\} (\S+)$", text, re.M))
    return loads, images


def measured(url: str, ports: list[int], sequence: list[str], images: list[bytes], seconds: float) -> dict:
    drive(url, sequence, images, 64, seconds, 1)  # warm round
    loads0, served0 = loads_and_requests(ports)
    run = drive(url, sequence[::-1], images, 64, seconds, 1)
    loads1, served1 = loads_and_requests(ports)
    served = served1 - served0
    return {
        "img_s": round(run["img_s"], 1),
        "hit_rate": round(1 - (loads1 - loads0) / served, 4) if served else None,
        "errors": run["errors"],
    }


def served_by(ports: list[int], domain: str) -> list[float]:
    counts = []
    for port in ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found = re.search(rf'^ra_predictions_total{{domain="{domain}"}} (\S+)$', text, re.M)
        counts.append(float(found.group(1)) if found else 0.0)
    return counts


def current_sessions(stats_socket: str, server: str) -> int:
    """Requests in progress on `server` of the affinity backend, from HAProxy's `show stat`."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(stats_socket)
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    total = 0
    for line in data.decode().splitlines():
        fields = line.split(",")
        if len(fields) > 4 and fields[1] == server and fields[0] in ("affinity", "anywhere"):
            total += int(fields[4] or 0)  # scur
    return total


def noisy_tenant(
    tmp: pathlib.Path, slots: int, seconds: float, flood_share: float = 0.25, over: float = 10.0, rate: float = 20.0
) -> dict:
    """Two well-behaved tenants' latency alone and while a third floods the fleet through the proxy."""
    store, keys, rates = tmp / "tenant-store", tmp / "keys.json", tmp / "rates.map"
    store.mkdir()
    source = sorted(p for p in DEMO.glob("*.safetensors") if p.name != "backbone.safetensors")[0]
    for tenant in TENANTS:  # each tenant's key is scoped to the domain of its name
        (store / tenant).mkdir()
        os.link(source, store / tenant / "000001.safetensors")
    write_keys(keys, None)
    images = test_images(4, 48)
    calm = [t for t in TENANTS if t != "flood"]
    with fleet(store, REPLICAS, slots, {"RA_API_KEYS_FILE": str(keys), "RA_API_KEYS_POLL_S": "0.2"}) as (ports, _):
        with running_proxy(ports, free_port()) as url:
            capacity = drive_wrk(url, [calm[0]], images, 64, seconds / 2, 1, key=secret(calm[0]))["img_s"]
        limit = round(capacity * flood_share, 1)
        write_keys(keys, limit)  # the replicas reload it; the proxy gets its map
        loaded = load_keys(keys)
        flooder_key = next(p for p in loaded.values() if p.name == "flood")
        rates.write_text(proxy_limits.rates_map(loaded))
        time.sleep(1.0)
        with running_proxy(ports, free_port(), rates=rates) as url, running_proxy(ports, free_port()) as plain:
            steady(url, calm, images[0], rate, 2.0)  # warm-up
            alone = steady(url, calm, images[0], rate, seconds)
            under = {
                "proxy_limits": under_flood(url, calm, images, capacity, over, rate, seconds),
                "replica_limits_only": under_flood(plain, calm, images, capacity, over, rate, seconds),
            }
    return {
        "alone": alone,
        **{f"under_flood_{k}": v["calm"] for k, v in under.items()},
        "capacity_img_s": round(capacity, 1),
        "flood_limit_per_s": limit,
        "proxy_limit_per_s": proxy_limits.per_second(flooder_key),
        "flood": {k: v["flood"] for k, v in under.items()},
        "p99_ratio": round(under["proxy_limits"]["calm"]["p99_ms"] / alone["p99_ms"], 2),
        "p99_ratio_replica_limits_only": round(under["replica_limits_only"]["calm"]["p99_ms"] / alone["p99_ms"], 2),
    }


def under_flood(
    url: str, calm: list[str], images: list[bytes], capacity: float, over: float, rate: float, seconds: float
) -> dict:
    """The well-behaved tenants while the flooder offers `over` x `capacity` (128 wrk connections, each
    pausing after every answer), and what became of the flood."""
    connections, flood_s = 128, max(1, round(seconds + 2))
    pause_ms = max(1, round(1000 * connections / (over * capacity)))
    flood: dict = {}
    flooder = threading.Thread(
        target=lambda: flood.update(
            drive_wrk(url, ["flood"], images, connections, flood_s, 1, key=secret("flood"), pause_ms=pause_ms)
        )
    )
    flooder.start()
    time.sleep(1.0)
    calm_run = steady(url, calm, images[0], rate, seconds)
    flooder.join()
    return {
        "calm": calm_run,
        "flood": {
            "offered_over_capacity": round(flood["requests"] / flood_s / capacity, 2),
            "refused_share": round(flood["errors"] / max(flood["requests"], 1), 3),
            "served_s": round((flood["requests"] - flood["errors"]) / flood_s, 1),
        },
    }


def run(domains: int, slots: int, seconds: float) -> dict:
    images = test_images(16, 48)
    with tempfile.TemporaryDirectory() as tmp:
        store = pathlib.Path(tmp) / "store"
        store.mkdir()
        names = seed(store, domains)
        sequence = zipf_sequence(names, 50_000, 1)
        result: dict = {}
        for setup, count, per, affinity in (
            ("affinity", REPLICAS, slots, True),
            ("round_robin", REPLICAS, slots, False),
            ("single", 1, slots * REPLICAS, None),
        ):
            with fleet(store, count, per) as (ports, _):
                if affinity is None:
                    result[setup] = measured(f"http://127.0.0.1:{ports[0]}", ports, sequence, images, seconds)
                else:
                    with running_proxy(ports, free_port(), affinity) as url:
                        result[setup] = measured(url, ports, sequence, images, seconds)
        with fleet(store, REPLICAS, slots) as (ports, procs):
            stats = str(pathlib.Path(tmp) / "stats.sock")
            with running_proxy(ports, free_port(), stats_socket=stats) as url:
                hot = names[-1]
                before = served_by(ports, hot)
                drive(url, [hot], images, 192, seconds, 1)
                gained = [a - b for a, b in zip(served_by(ports, hot), before)]
                result["hot_domain_max_share"] = round(max(gained) / sum(gained), 3) if sum(gained) else None
                outcome: dict = {}
                load = threading.Thread(target=lambda: outcome.update(drive(url, sequence, images, 64, seconds, 1)))
                load.start()
                time.sleep(seconds / 2)
                in_flight = current_sessions(stats, "replica1")
                os.killpg(procs[0].pid, signal.SIGKILL)
                load.join()
                result["kill"] = {
                    "failed": outcome.get("errors"),
                    "in_flight_on_victim": in_flight,
                    "requests": outcome.get("requests"),
                }
        result["noisy_tenant"] = noisy_tenant(pathlib.Path(tmp), slots, seconds)
    slots_total = slots * REPLICAS
    return {
        "hit_rate": {
            "affinity": result["affinity"]["hit_rate"],
            "round_robin": result["round_robin"]["hit_rate"],
            "single": result["single"]["hit_rate"],
            "ideal_fleet": ideal_hit_rate(domains, slots_total),
            "ideal_replica": ideal_hit_rate(domains, slots),
        },
        "affinity_hit_rate_over_single": round(result["affinity"]["hit_rate"] / result["single"]["hit_rate"], 3),
        "img_s": {k: result[k]["img_s"] for k in ("affinity", "round_robin", "single")},
        "affinity_over_round_robin_img_s": round(result["affinity"]["img_s"] / result["round_robin"]["img_s"], 3),
        "hot_domain_max_share": result["hot_domain_max_share"],
        "kill": result["kill"],
        "kill_failed_beyond_inflight": max(0, (result["kill"]["failed"] or 0) - result["kill"]["in_flight_on_victim"]),
        "noisy_tenant": result["noisy_tenant"],
        "noisy_tenant_p99_ratio": result["noisy_tenant"]["p99_ratio"],
        "errors": {k: result[k]["errors"] for k in ("affinity", "round_robin", "single")},
        "settings": {
            "domains": domains,
            "slots_per_replica": slots,
            "replicas": REPLICAS,
            "seconds": seconds,
            "cpus": os.cpu_count(),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=3000, help="registered domains")
    parser.add_argument("--slots", type=int, default=200, help="RA_MAX_RESIDENT per replica")
    parser.add_argument("--seconds", type=float, default=10.0, help="each round of traffic")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.domains, args.slots, args.seconds)))


if __name__ == "__main__":
    main()
