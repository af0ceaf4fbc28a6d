"""The GPU check: the engine and the whole service on a machine with CUDA JAX or PyTorch (and no
TensorFlow, no network), in one command that fits 10 minutes. Prints one JSON line last.

    bench/gpu/wheelhouse.sh                      # here, once: .whl/ (wheels for Python 3.12, wrk)
    bench/gpu/run.sh --backend jax               # there (the `device` tool, carry [".whl"])
    bench/gpu/run.sh --backend jax --cpu         # the rehearsal on a CPU (wheels for its Python)

Two parts, each bounded in time:
- `engine`: `python -m bench.engine` on the backend: plain, one domain and 1,000 mixed domains, at
  batch 32, 128 and 512, float32 and bfloat16, MFU against the best matmul measured there and
  against the chip's datasheet peaks (`--peak-tflops`);
- `http`: `python -m service --workers auto` (a front end per core and the engine process), the demo
  domains, wrk (C) sending single-image and 8-image multipart requests over all three domains.
`--cpu` runs both small (batch 32, float32, short rounds) so that the rehearsal proves the path.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

from bench.harness.load import drive_wrk, test_images
from bench.harness.servers import free_port, wait_ready

DOMAINS = ["fashion", "digits", "catsdogs"]


def engine_part(args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "bench.engine", "--backend", args.backend, "--domains", "1000"]
    if args.cpu:
        command += ["--quick", "--batch", "32", "--dtype", "float32", "--rounds", "2", "--seconds", "0.5"]
    else:
        command += [
            "--batch",
            "32,128,512",
            "--dtype",
            "float32,bfloat16",
            "--rounds",
            "3",
            "--seconds",
            "1",
            "--peak-tflops",
            args.peak_tflops,
        ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=args.engine_timeout)
    if run.returncode != 0:
        return {"error": run.stderr.strip()[-2000:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def wait_up(server: subprocess.Popen, url: str, timeout: float) -> None:
    """Ready, or raise as soon as the server has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            wait_ready(url, timeout=2)
            return
        except TimeoutError:
            continue
    raise TimeoutError(f"{url} was not ready within {timeout}s")


def http_part(args: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "RA_BACKEND": args.backend,
            "RA_STORE_DIR": os.path.join(tmp, "store"),
            "RA_MAX_BATCH_SIZE": str(args.max_batch_size),
            "RA_REQUIRE_GPU": "false" if args.cpu else "true",
            "RA_DEVICE_MEMORY_MB": "4096",
        }
        log_path = pathlib.Path(tmp) / "server.log"
        with log_path.open("wb") as log:  # the server writes to its own copy of the descriptor
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "service",
                    "--port",
                    str(port),
                    "--workers",
                    args.workers,
                    "--log-level",
                    "warning",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            start = time.perf_counter()
            wait_up(server, url, timeout=300)
            ready_s = time.perf_counter() - start
            import httpx

            status = httpx.get(url + "/readyz", timeout=10).json()
            images = test_images(16, 28)
            threads = max(1, min(4, (os.cpu_count() or 2) // 4))
            drive_wrk(url, DOMAINS, images, 64, 2, 1, threads=threads)  # warm-up: connections, batches
            runs = {}
            for name, files, connections in (
                ("single_image", 1, args.connections),
                ("eight_images", 8, args.connections // 2),
            ):
                runs[name] = drive_wrk(url, DOMAINS, images, connections, args.seconds, files, threads=threads)
            return {
                "ready_s": round(ready_s, 1),
                "device": status.get("device"),
                "workers": status.get("workers"),
                "single_image_img_s": round(runs["single_image"]["img_s"], 1),
                "eight_images_img_s": round(runs["eight_images"]["img_s"], 1),
                "runs": runs,
                "wrk_threads": threads,
            }
        except Exception as exc:  # the figures that came back are still worth printing
            return {
                "error": f"{type(exc).__name__}: {exc}",
                "server_log": log_path.read_text(errors="replace")[-3000:],
            }
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("jax", "torch", "tensorflow"), default="jax")
    parser.add_argument("--cpu", action="store_true", help="the rehearsal: small runs, no GPU required")
    parser.add_argument("--workers", default="auto", help="python -m service --workers (default: one per core)")
    parser.add_argument("--connections", type=int, default=512, help="wrk connections for single images")
    parser.add_argument("--seconds", type=float, default=15.0, help="each wrk run")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument(
        "--peak-tflops",
        default="float32=67,bfloat16=989",
        help="the chip's datasheet peaks (default: an H200 SXM's dense float32 and bfloat16)",
    )
    parser.add_argument("--engine-timeout", type=float, default=300.0)
    parser.add_argument("--skip", choices=("engine", "http"), default=None)
    args = parser.parse_args(argv)
    if args.cpu:
        args.seconds, args.connections, args.max_batch_size = min(args.seconds, 5.0), min(args.connections, 64), 32
    t0 = time.perf_counter()
    result = {"backend": args.backend, "cpu_rehearsal": args.cpu, "cpus": os.cpu_count()}
    if args.skip != "engine":
        result["engine"] = engine_part(args)
        print(json.dumps({"engine": result["engine"]}), flush=True)  # kept if the rest runs out of time
    if args.skip != "http":
        result["http"] = http_part(args)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
