"""The process split (`python -m service --workers N`): what the engine process costs per image, how the
front ends scale, and the split against the single process, side by side in one run.

    python -m bench.split [--seconds 6] [--concurrency 64]

Each server serves demo domains from a fresh directory store and is loaded by wrk (tiny PNGs,
multipart `/predict/{domain}`, uniform over 8 domains unless said); CPU is read from /proc per process.
- Engine computing zeros (a simulated device too fast to matter, `RA_SIMULATED_DEVICE_IMG_S`): the front
  ends' own cost and ceiling, and the engine process's cost of dispatch and transport per image.
  `engine_dispatch_us_per_img`: engine-process CPU per image; `engine_dispatch_over_frontend`: that
  over the front end's CPU per image (how many front ends one engine process keeps up with is its
  inverse); `frontend_cpu_ms_per_request` over `floor_cpu_ms_per_request` (the bare FastAPI multipart
  route of `bench.harness.floor`, same load); `frontend_scaling_2_over_1`: requests/s with 2 front ends
  over 1.
- The real engine on this CPU: `workers2_over_single`, img/s of `--workers 2` over the single process,
  uniform over 8 domains, and `workers2_over_single_zipf`, the same under Zipf(1.0) over `--zipf-domains`
  (1,000: more than the 512 resident, so domains load while others are served);
  `batch_size_4_over_1`, the mean batch size with 4 front ends over 1 at the same offered load (wrk's
  connections, below saturation); `frontend_rss_mb` and `engine_rss_mb` with 4 front ends.
- The default: `auto_over_best`, img/s of `python -m service` as it starts with no options
  (`RA_WORKERS=auto`: what it chose is under `auto`) over the better of the single process and
  `--workers 2`, uniform over 8 domains; the three run in `--rounds` interleaved rounds (the median
  round of each), as do `workers2_over_single`'s.
Prints one JSON object last. Needs wrk.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from bench.harness.cpu import children, process_cpu_s, rss_mb
from bench.harness.domains import seed, zipf_weighted
from bench.harness.floor import FLOORS, floor_ms_per_request
from bench.harness.load import drive_wrk, test_images
from bench.harness.servers import DEMO, REPO, TOKEN, ZERO_ENGINE, free_port, wait_ready, wait_warm
from service.__main__ import auto_workers


def batch_mean(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    total = float(re.search(r"^ra_batch_size_sum (\S+)$", text, re.M).group(1))
    count = float(re.search(r"^ra_batch_size_count (\S+)$", text, re.M).group(1))
    return total, count


@contextlib.contextmanager
def server(command: list[str], store: str, port: int, extra_env: dict[str, str]):
    env = {
        **{k: v for k, v in os.environ.items() if k != "RA_WORKERS"},
        **extra_env,
        "RA_STORE_DIR": store,
        "RA_ADMIN_TOKEN": TOKEN,
        "RA_DEMO_ADAPTERS": "false",
        "RA_BACKBONE": str(DEMO / "backbone.safetensors"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    process = subprocess.Popen(
        [sys.executable, *command], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        wait_warm(url)
        yield process, url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def measure(
    command: list[str],
    port: int,
    concurrency: int,
    seconds: float,
    split: bool,
    domains: int = 8,
    zipf: bool = False,
    zero: bool = False,
) -> dict:
    """Load one server with wrk; its img/s, errors, mean batch size and CPU ms per image by process role."""
    images = test_images(16, 48)
    with tempfile.TemporaryDirectory() as store:
        names = seed(pathlib.Path(store), domains)
        traffic = zipf_weighted(names, 1.0) if zipf else names
        with server(command, store, port, ZERO_ENGINE if zero else {}) as (process, url):
            drive_wrk(url, traffic, images, concurrency, 2.0, 1)  # warm-up
            pids = children(process.pid) if split else [process.pid]
            engine_pid = httpx.get(url + "/readyz", timeout=10).json()["engine_pid"]
            before = {pid: process_cpu_s(pid) for pid in pids}
            batches = batch_mean(url)
            run = drive_wrk(url, traffic, images, concurrency, seconds, 1)
            cpu = {pid: process_cpu_s(pid) - before[pid] for pid in pids}
            batches_after = batch_mean(url)
            rss = {pid: rss_mb(pid) for pid in pids}
    images_done = max(run["requests"], 1)
    frontend = [pid for pid in pids if pid != engine_pid]
    mean_batch = (batches_after[0] - batches[0]) / max(batches_after[1] - batches[1], 1)
    out = {
        "img_s": round(run["img_s"], 1),
        "errors": run["errors"],
        "p50_ms": run["p50_ms"],
        "mean_batch_size": round(mean_batch, 2),
    }
    if split:
        out.update(
            engine_cpu_ms_per_img=round(cpu[engine_pid] * 1000 / images_done, 4),
            frontend_cpu_ms_per_img=round(sum(cpu[p] for p in frontend) * 1000 / images_done, 4),
            frontend_rss_mb=round(max(rss[p] for p in frontend), 1),
            engine_rss_mb=round(rss[engine_pid], 1),
        )
    else:
        out.update(cpu_ms_per_img=round(cpu[process.pid] * 1000 / images_done, 4))
    return out


def run_split(workers: int, concurrency: int, seconds: float, zero: bool = False, **traffic) -> dict:
    port = free_port()
    command = ["-m", "bench.harness.supervised", str(workers), str(port)]
    return measure(command, port, concurrency, seconds, split=True, zero=zero, **traffic)


def run_single(concurrency: int, seconds: float, **traffic) -> dict:
    port = free_port()
    command = ["-m", "service", "--port", str(port), "--workers", "1", "--log-level", "warning"]
    return measure(command, port, concurrency, seconds, split=False, **traffic)


def run_auto(concurrency: int, seconds: float) -> dict:
    """`python -m service` with no options: `--workers auto` on this host."""
    workers, why = auto_workers()
    port = free_port()
    command = ["-m", "service", "--port", str(port), "--log-level", "warning"]
    return {"workers": workers, "why": why, **measure(command, port, concurrency, seconds, split=workers > 1)}


def best_of_rounds(rounds: int, *runs) -> list[dict]:
    """Each run `rounds` times, interleaved, each round in another order (what runs after what moves the
    figures); per run, the round with the median img/s (its figures)."""
    done: list[list[dict]] = [[] for _ in runs]
    for r in range(rounds):
        for i in range(len(runs)):
            k = (i + r) % len(runs)
            done[k].append(runs[k]())
    return [sorted(results, key=lambda r: r["img_s"])[len(results) // 2] for results in done]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--calm-concurrency", type=int, default=8, help="wrk connections for the batch-size figure")
    parser.add_argument("--zipf-domains", type=int, default=1000, help="domains of the Zipf runs (0: skip them)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of single, split and auto (medians)")
    args = parser.parse_args(argv)
    c, s = args.concurrency, args.seconds
    zero1, zero2 = run_split(1, c, s, zero=True), run_split(2, c, s, zero=True)
    floor = floor_ms_per_request(*FLOORS["fastapi_multipart"], c, s)
    single, split2, auto = best_of_rounds(
        args.rounds, lambda: run_single(c, s), lambda: run_split(2, c, s), lambda: run_auto(c, s)
    )
    zipf = {"domains": args.zipf_domains, "zipf": True}
    single_zipf, split2_zipf = (run_single(c, s, **zipf), run_split(2, c, s, **zipf)) if args.zipf_domains else ({}, {})
    calm1, calm4 = run_split(1, args.calm_concurrency, s), run_split(4, args.calm_concurrency, s)
    figures = {
        "engine_dispatch_us_per_img": round(zero1["engine_cpu_ms_per_img"] * 1000, 1),
        "engine_dispatch_over_frontend": round(zero1["engine_cpu_ms_per_img"] / zero1["frontend_cpu_ms_per_img"], 3),
        "frontend_cpu_ms_per_request": zero1["frontend_cpu_ms_per_img"],
        "floor_cpu_ms_per_request": floor,
        "frontend_over_floor": round(zero1["frontend_cpu_ms_per_img"] / floor, 2),
        "frontend_scaling_2_over_1": round(zero2["img_s"] / zero1["img_s"], 3),
        "workers2_over_single": round(split2["img_s"] / single["img_s"], 3),
        **({"workers2_over_single_zipf": round(split2_zipf["img_s"] / single_zipf["img_s"], 3)} if single_zipf else {}),
        "auto_over_best": round(auto["img_s"] / max(single["img_s"], split2["img_s"]), 3),
        "batch_size_4_over_1": round(calm4["mean_batch_size"] / calm1["mean_batch_size"], 3),
        "frontend_rss_mb": calm4["frontend_rss_mb"],
        "engine_rss_mb": calm4["engine_rss_mb"],
    }
    print(
        json.dumps(
            {
                **figures,
                "runs": {
                    "zero_engine_1": zero1,
                    "zero_engine_2": zero2,
                    "single": single,
                    "split_2": split2,
                    "single_zipf": single_zipf,
                    "split_2_zipf": split2_zipf,
                    "calm_1": calm1,
                    "calm_4": calm4,
                    "auto": auto,
                },
                "settings": {
                    "concurrency": c,
                    "calm_concurrency": args.calm_concurrency,
                    "seconds": s,
                    "zipf_domains": args.zipf_domains,
                    "rounds": args.rounds,
                    "cpus": os.cpu_count(),
                    "when": time.strftime("%Y-%m-%d"),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
