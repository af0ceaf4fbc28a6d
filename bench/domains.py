"""Many more registered domains than device slots: start-up, memory, Zipf traffic, cold loads.

    python -m bench.domains [--domains 10000] [--max-resident N] [--host-cache-mb MB] [--workers N]
                            [--seconds 10] [--rounds 2] [--warm-seconds S] [--history N]
    python -m bench.domains --domains 100000 --startup-rounds 6

With the demo backbone: registers `--domains` domains in a directory registry of record (copies of
the three demo bundles under new names, hard-linked so that 100,000 of them fit any disk; the bytes
are identical to uploaded copies) with the usage a service that had already served `--history`
requests of the same traffic would have left in the record (so the warm-up loads the most used, as
after a restart; 0: a new record), starts `python -m service` on it (`--workers`: front ends and an
engine process; with `RA_MAX_RESIDENT` and `RA_HOST_CACHE_MB` when given, else the residency that
the default memory budget gives), drives the Zipf traffic for `--warm-seconds` (the domains its
first requests touch load then), and then Zipf(1.0) traffic over all of them over HTTP (wrk when
installed), interleaved with the same load over 8 domains. Prints one JSON object last:

- `startup_s`: from starting the process to /readyz 200; `rss_mb`: the engine's resident memory
  after start and after the run; `budget`: the residency budget (`budget_mb`, `bytes_per_domain`,
  `fits`) from /readyz;
- `zipf_img_s`, `eight_img_s` and `zipf_over_eight` (medians of interleaved rounds);
- `hit_rate`: during the Zipf rounds, the share of requests served without a load (`device`; from
  the server's load counters) and of the loads, those from host memory (`host`); and
  `ideal`: the share of requests for the domains an ideal cache of the device tier's size would
  hold (the most requested ones that fit);
- `load_cpu_ms`: p50 CPU (all threads) of putting a domain on the device from host memory
  (`host_p50`) and from the record (`record_p50`: read, validate, fold, write), one load at a
  time, in this process on the same store with the same registry code (loader in a thread); and
  from the record with the preparation in a loader process, as with `--workers 2`: this process's
  CPU (`record_engine_p50`: the read, the write, the registry) and the loader's per load
  (`record_loader_mean`: validate, fold; a mean, as /proc counts in clock ticks); `cold_ms`: the wall
  time of the first two kinds;
- `list_page_ms`: GET /adapters?limit=100, first page and one far into the listing.
`--startup-rounds N` measures start-up alone: N pairs of starts, one on 8 domains and one on `--domains`
(each with `--history` requests of usage), interleaved; prints each start's seconds to /readyz 200 and
`startup_over_eight_s`, the median of the pairs' differences.
Loopback only; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import httpx
import numpy as np

from bench.harness.cpu import children, cmdline, process_cpu_s, rss_mb
from bench.harness.domains import ideal_hit_rate, seed, zipf_sequence
from bench.harness.load import drive, median_round, test_images
from bench.harness.servers import DEMO, TOKEN, free_port, wait_ready


def counters(url: str) -> dict[str, float]:
    """The server's loads so far, by source (`host`, `registry`)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    loads = {}
    for labels, value in re.findall(r"^ra_adapter_loads_total\{([^}]*)\} (\S+)$", text, re.M):
        label = dict(re.findall(r'(\w+)="(\w*)"', labels))
        if label.get("outcome") == "ok":
            loads[label["source"]] = float(value)
    return loads


def hit_rates(loads: list[tuple[dict, dict]], requests: int) -> dict[str, float | None]:
    """Per request: the share answered from the device tier (no load), and of the rest from host memory."""
    loaded = {
        tier: sum(after.get(tier, 0) - before.get(tier, 0) for before, after in loads) for tier in ("host", "registry")
    }
    misses = loaded["host"] + loaded["registry"]
    return {
        "device": round(1 - misses / requests, 4) if requests else None,
        "host": round(loaded["host"] / misses, 4) if misses else None,
    }


def cold_loads(store: pathlib.Path, names: list[str], n: int) -> dict:
    """Put domains on the device from the record, then from host memory (same registry code), one at a
    time: the CPU (all of this process's threads) and wall time of each; then from the record again with
    the preparation in a loader process, as the engine process of `--workers 2` does (domains not loaded
    before, when there are any): the CPU of this process for each, and the loader's mean."""
    from model.backbone import load_backbone
    from model.engine import InferenceEngine
    from service.engine.loader import Loader
    from service.engine.registry import Limits, Registry
    from service.metrics import Metrics
    from service.record.directory import DirectoryRecord

    backbone = load_backbone(DEMO / "backbone.safetensors")
    engine = InferenceEngine(backbone, capacity=64)
    engine.warm_up((1, 2))

    async def main() -> dict:
        registry = Registry(
            engine,
            DirectoryRecord(store),
            Metrics(),
            Loader(backbone),
            Limits(max_resident=32, host_cache_bytes=4096 * 1024 * 1024),
        )
        await registry.acquire(names[0])  # the golden self-test of each distinct bundle runs once
        cpu: dict[str, list[float]] = {"record": [], "host": [], "record_engine": []}
        wall: dict[str, list[float]] = {"record": [], "host": []}
        for source, batch in (("record", names[:n]), ("host", names[: n - 32])):
            for name in batch:
                start, used = time.perf_counter(), process_cpu()
                registry.release([await registry.acquire(name)])
                cpu[source].append((process_cpu() - used) * 1000)
                wall[source].append((time.perf_counter() - start) * 1000)
        others = names[n : 2 * n]  # not loaded above
        loader_ms = {}
        if len(others) > 1:
            loader = Loader(backbone, DEMO / "backbone.safetensors", processes=1)
            await loader.start()
            try:
                (loader_pid,) = [pid for pid in children(os.getpid()) if b"spawn_main" in cmdline(pid)]
                split = Registry(
                    engine, DirectoryRecord(store), Metrics(), loader, Limits(max_resident=24, host_cache_bytes=0)
                )
                await split.acquire(others[0])
                loading = process_cpu_s(loader_pid)
                for name in others[1:]:
                    used = process_cpu()
                    split.release([await split.acquire(name)])
                    cpu["record_engine"].append((process_cpu() - used) * 1000)
                # /proc counts in clock ticks: a mean over the loads
                loader_ms["record_loader_mean"] = round(
                    (process_cpu_s(loader_pid) - loading) * 1000 / (len(others) - 1), 3
                )
            finally:
                loader.stop()
        p50 = lambda ms: round(float(np.percentile(ms, 50)), 3)  # noqa: E731
        return {
            "load_cpu_ms": {**{f"{source}_p50": p50(ms) for source, ms in cpu.items() if ms}, **loader_ms},
            "cold_ms": {
                source: {"p50": p50(ms), "p99": round(float(np.percentile(ms, 99)), 2), "n": len(ms)}
                for source, ms in wall.items()
            },
        }

    return asyncio.run(main())


def seconds_to_ready(store: pathlib.Path, workers: int) -> float:
    """Start `python -m service` on `store`: seconds until /readyz answers 200; then stop it."""
    port = free_port()
    env = {**os.environ, "RA_STORE_DIR": str(store), "RA_DEMO_ADAPTERS": "false", "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning", "--workers", str(workers)],
        env=env,
        start_new_session=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=300)
        return time.perf_counter() - start
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)


def startup_pairs(domains: int, history: int, rounds: int, workers: int) -> dict:
    """Start-up on 8 domains and on `domains`, `rounds` interleaved pairs."""
    from service.record.directory import DirectoryRecord

    seconds: dict[int, list[float]] = {8: [], domains: []}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {}
        for count in seconds:
            stores[count] = pathlib.Path(tmp) / f"store{count}"
            stores[count].mkdir()
            names = seed(stores[count], count)
            if history:
                DirectoryRecord(stores[count]).add_usage(collections.Counter(zipf_sequence(names, history, 999)))
        for _ in range(rounds):
            for count, store in stores.items():
                seconds[count].append(round(seconds_to_ready(store, workers), 2))
    differences = [many - eight for eight, many in zip(seconds[8], seconds[domains])]
    return {
        "startup_s": {str(count): v for count, v in seconds.items()},
        "startup_over_eight_s": round(float(np.median(differences)), 2),
        "settings": {
            "domains": domains,
            "history": history,
            "rounds": rounds,
            "workers": workers,
            "cpus": os.cpu_count(),
        },
    }


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=10_000)
    parser.add_argument("--max-resident", type=int, default=None, help="RA_MAX_RESIDENT (default: the budget's)")
    parser.add_argument("--host-cache-mb", type=float, default=None, help="RA_HOST_CACHE_MB (default: the service's)")
    parser.add_argument("--workers", type=int, default=1, help="front-end processes (2 or more: the process split)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--warm-seconds", type=float, default=None, help="Zipf traffic before measuring (default: --seconds)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--cold", type=int, default=200, help="domains timed per cold-load source (0: none)")
    parser.add_argument(
        "--history",
        type=int,
        default=1_000_000,
        help="requests of this traffic already served, as usage in the record (0: a new record)",
    )
    parser.add_argument(
        "--startup-rounds",
        type=int,
        default=0,
        help="measure start-up alone: pairs of starts on 8 and on --domains domains",
    )
    args = parser.parse_args(argv)
    if args.startup_rounds:
        print(json.dumps(startup_pairs(args.domains, args.history, args.startup_rounds, args.workers)))
        return

    images = test_images(16, 48)
    with tempfile.TemporaryDirectory() as tmp:
        store = pathlib.Path(tmp) / "store"
        store.mkdir()
        t0 = time.perf_counter()
        names = seed(store, args.domains)
        if args.history:
            from service.record.directory import DirectoryRecord

            DirectoryRecord(store).add_usage(collections.Counter(zipf_sequence(names, args.history, 999)))
        seed_s = time.perf_counter() - t0
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "RA_STORE_DIR": str(store),
            "RA_ADMIN_TOKEN": TOKEN,
            "RA_DEMO_ADAPTERS": "false",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        env.update(
            {
                name: str(value)
                for name, value in (("RA_MAX_RESIDENT", args.max_resident), ("RA_HOST_CACHE_MB", args.host_cache_mb))
                if value is not None
            }
        )
        start = time.perf_counter()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--workers",
                str(args.workers),
            ],
            env=env,
            start_new_session=True,
        )
        try:
            wait_ready(url, timeout=300)
            startup_s = time.perf_counter() - start
            engine_pid = httpx.get(url + "/readyz", timeout=10).json()["engine_pid"]
            rss_start = rss_mb(engine_pid)
            while httpx.get(url + "/readyz", timeout=10).json()["registry"]["warming"]:  # background warm-up
                time.sleep(0.5)
            residency = httpx.get(url + "/readyz", timeout=10).json()["residency"]
            warm_s = time.perf_counter() - start - startup_s
            with httpx.Client(timeout=60) as client:
                list_ms = []
                for cursor in (None, names[len(names) * 3 // 4]):
                    t = time.perf_counter()
                    page = client.get(
                        url + "/adapters", params={"limit": 100, **({"cursor": cursor} if cursor else {})}
                    )
                    page.raise_for_status()
                    list_ms.append(round((time.perf_counter() - t) * 1000, 1))
            eight = names[:8]
            drive(url, eight, images, args.concurrency, 2.0, 1)  # warm-up
            # each drive walks its list from the start: a fresh draw each time, so that no round replays another
            warm = drive(
                url,
                zipf_sequence(names, 50_000, 0),
                images,
                args.concurrency,
                args.seconds if args.warm_seconds is None else args.warm_seconds,
                1,
            )
            zipf_rounds, eight_rounds, lookups = [], [], []
            for i in range(args.rounds):
                before = counters(url)
                zipf_rounds.append(
                    drive(url, zipf_sequence(names, 50_000, 1 + i), images, args.concurrency, args.seconds, 1)
                )
                lookups.append((before, counters(url)))
                eight_rounds.append(drive(url, eight, images, args.concurrency, args.seconds, 1))
            rss_end = rss_mb(engine_pid)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
        cold = cold_loads(store, names[len(names) // 2 :], args.cold) if args.cold > 32 else {}
    z, e = median_round(zipf_rounds), median_round(eight_rounds)
    warm_seconds = args.seconds if args.warm_seconds is None else args.warm_seconds
    result = {
        "domains": args.domains,
        "startup_s": round(startup_s, 2),
        "warm_s": round(warm_s, 1),
        "rss_mb": {"after_start": round(rss_start, 1), "after_run": round(rss_end, 1)},
        "budget": {key: residency[key] for key in ("budget_mb", "bytes_per_domain", "fits", "host_cache_mb")},
        "zipf_img_s": round(z["img_s"], 1),
        "eight_img_s": round(e["img_s"], 1),
        "zipf_over_eight": round(z["img_s"] / e["img_s"], 3),
        "zipf_p99_ms": round(z["p99_ms"], 1),
        "eight_p99_ms": round(e["p99_ms"], 1),
        "hit_rate": {
            **hit_rates(lookups, sum(r["requests"] for r in zipf_rounds)),
            "ideal": ideal_hit_rate(args.domains, min(residency["fits"], args.max_resident or residency["fits"])),
        },
        "load_cpu_ms": cold.get("load_cpu_ms"),
        "cold_ms": cold.get("cold_ms"),
        "warm_round": {"img_s": round(warm["img_s"], 1), "seconds": warm_seconds},
        "list_page_ms": {"first": list_ms[0], "far": list_ms[1]},
        "errors": sum(r["errors"] for r in zipf_rounds + eight_rounds),
        "settings": {
            "workers": args.workers,
            "max_resident": args.max_resident,
            "host_cache_mb": args.host_cache_mb,
            "seconds": args.seconds,
            "history": args.history,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "seed_s": round(seed_s, 1),
            "load_generator": "wrk" if shutil.which("wrk") else "httpx",
            "cpus": os.cpu_count(),
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
