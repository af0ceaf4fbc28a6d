"""What the engine process costs per image it dispatches, and whether it keeps a fast device busy.

    python -m bench.dispatch [--seconds 4] [--feeders 2] [--in-flight-images 1024]

Drives `service.engine.process` directly through the transport (`service.transport`): feeder
processes write their images into their shared-memory arenas once, then keep calls in flight over
ZeroMQ, with `RemoteEngine` as front ends do but without HTTP, decoding or preprocessing; like a
front end, a feeder sends the calls of one event-loop turn as one message. The engine runs the
simulated device (`model.simulated`, `RA_SIMULATED_DEVICE_IMG_S`): a call holds it for
`batch / rate` seconds without the interpreter lock and answers zeros. The engine's batch limits are
its defaults for an accelerator (`RA_MAX_BATCH_SIZE` 256), as on a GPU host.
- `dispatch_us_per_img` at 1, 8 and 64 images per call (a request's images): the engine process's
  CPU (all its threads, from /proc) per image answered, with a device too fast to matter (10^9 img/s);
- `engine_ceiling_img_s`: the images/s answered in that run at 64 images per call;
- `device_busy_share` at 50,000 img/s and `device_busy_share_100k` at 100,000, 64 images per
  call: the simulated device's compute time (`ra_device_busy_seconds_total`, `batch / rate` a call)
  over the run's wall time, which is also its img/s over its rate;
- `mean_images_per_message` the engine saw (`ra_engine_message_images`), per run: calls coalesced.
The feeders share this machine's cores with the engine process: on a small machine they take CPU the
engine would use, so the ceiling is a floor of what an engine process with a core of its own does.
Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.harness.cpu import process_cpu_s
from bench.harness.domains import seed

REPO = pathlib.Path(__file__).resolve().parents[1]
FAST = 1e9  # img/s of a device too fast to matter: what is measured is the engine process
SETTLE_S = 1.0  # load before the measured window


def feeder(endpoint: str, arena: str, domains: list[str], per_call: int, in_flight: int, stop, out) -> None:
    """One feeder process: `in_flight` calls of `per_call` images each kept in flight until `stop` is set
    (the calls made in one event-loop turn share a message)."""
    import asyncio

    from service.transport import RemoteEngine

    async def run() -> tuple[int, int]:
        engine = RemoteEngine(endpoint, arena, 64 * 1024 * 1024, 30.0)
        await engine.start()
        try:
            cards = {d: await engine.card(d) for d in domains}
            size = (await engine.status()).input_size
            images = np.random.default_rng(0).standard_normal((per_call, size, size, 3)).astype(np.float32)
            answered = errors = 0

            async def lane(i: int) -> None:
                nonlocal answered, errors
                k = i
                while not stop.is_set():
                    d = domains[k % len(domains)]
                    k += 1
                    try:
                        await engine.infer([d], [cards[d].preprocessing], images, [0] * per_call, None)
                        answered += per_call
                    except Exception:
                        errors += 1

            await asyncio.gather(*(lane(i) for i in range(in_flight)))
            return answered, errors
        finally:
            await engine.stop()

    out.send(asyncio.run(run()))


def busy_and_messages(metrics_dir: str) -> tuple[float, float, float]:
    """(device busy seconds, infer messages, images in them) from the engine's metrics files."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, metrics_dir)
    text = generate_latest(registry).decode()

    def value(name: str) -> float:
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    return (
        value("ra_device_busy_seconds_total"),
        value("ra_engine_message_images_count"),
        value("ra_engine_message_images_sum"),
    )


@contextlib.contextmanager
def engine_process(store: str, rundir: str, rate: float):
    """The engine process on a simulated device at `rate` img/s, answering on an ipc socket in `rundir`."""
    metrics = tempfile.mkdtemp(prefix="metrics-", dir=rundir)
    endpoint = f"ipc://{metrics}/engine.sock"
    prefix = f"ra-{os.getpid()}-"
    env = {
        **os.environ,
        "RA_STORE_DIR": store,
        "RA_DEMO_ADAPTERS": "false",
        "RA_SIMULATED_DEVICE_IMG_S": str(rate),
        "RA_MAX_QUEUE": "100000",
        "RA_LOADER_PROCESSES": "0",
        "PROMETHEUS_MULTIPROC_DIR": metrics,
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    code = f"from service.engine.process import main; main({endpoint!r}, {prefix!r}, None, 'warning')"
    process = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO)
    try:
        yield process, endpoint, prefix, metrics
    finally:
        process.terminate()
        process.wait(60)


def measure(store: str, rundir: str, domains: list[str], rate: float, per_call: int, args) -> dict:
    """Feed the engine on a device of `rate` img/s with calls of `per_call` images; what it did."""
    with engine_process(store, rundir, rate) as (process, endpoint, prefix, metrics):
        in_flight = max(1, args.in_flight_images // per_call // args.feeders)
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        pipes, feeders = [], []
        for i in range(args.feeders):
            here, there = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=feeder,
                args=(
                    endpoint,
                    f"{prefix}feed{i}-{rate:g}-{per_call}",
                    domains,
                    per_call,
                    in_flight,
                    stop,
                    there,
                ),
            )
            p.start()
            pipes.append(here)
            feeders.append(p)
        # the measured window: from SETTLE_S after the first answers until `seconds` later
        deadline = time.monotonic() + 120
        while busy_and_messages(metrics)[1] == 0:  # the engine started and answers
            if time.monotonic() > deadline or process.poll() is not None:
                stop.set()
                raise RuntimeError("the engine process did not answer the feeders within 120 s")
            time.sleep(0.2)
        time.sleep(SETTLE_S)
        busy0, msgs0, imgs0 = busy_and_messages(metrics)
        cpu0, t0 = process_cpu_s(process.pid), time.monotonic()
        time.sleep(args.seconds)
        busy1, msgs1, imgs1 = busy_and_messages(metrics)
        cpu1, t1 = process_cpu_s(process.pid), time.monotonic()
        stop.set()
        results = [pipe.recv() for pipe in pipes]
        for p in feeders:
            p.join(30)
    images = imgs1 - imgs0
    wall = t1 - t0
    return {
        "rate_img_s": rate,
        "images_per_call": per_call,
        "img_s": round(images / wall, 1),
        "engine_cpu_us_per_img": round((cpu1 - cpu0) / max(images, 1) * 1e6, 2),
        "device_busy_share": round((busy1 - busy0) / wall, 4),
        "mean_images_per_message": round(images / max(msgs1 - msgs0, 1), 2),
        "errors": sum(r[1] for r in results),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--feeders", type=int, default=2)
    parser.add_argument("--in-flight-images", type=int, default=1024, help="images in flight over all feeders")
    parser.add_argument("--domains", type=int, default=8)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as store, tempfile.TemporaryDirectory(prefix="ra-bench-") as rundir:
        domains = seed(pathlib.Path(store), args.domains)
        runs = {n: measure(store, rundir, domains, FAST, n, args) for n in (1, 8, 64)}
        busy50 = measure(store, rundir, domains, 50_000, 64, args)
        busy100 = measure(store, rundir, domains, 100_000, 64, args)
    print(
        json.dumps(
            {
                "dispatch_us_per_img": {str(n): r["engine_cpu_us_per_img"] for n, r in runs.items()},
                "engine_ceiling_img_s": runs[64]["img_s"],
                "device_busy_share": busy50["device_busy_share"],
                "device_busy_share_100k": busy100["device_busy_share"],
                "mean_images_per_message": {str(n): r["mean_images_per_message"] for n, r in runs.items()},
                "runs": [*runs.values(), busy50, busy100],
                "settings": {**vars(args), "cpus": os.cpu_count()},
            }
        )
    )


if __name__ == "__main__":
    main()
