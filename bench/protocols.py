"""The Open Inference Protocol over gRPC against REST v2, side by side in one run: the front-end processes'
CPU per image for PIXELS (binary, `--files-per-request` images a request).

    python -m bench.protocols [--files-per-request 8] [--seconds 10] [--rounds 3] [--concurrency 16]

Starts one `python -m service --workers 2` (two front-end processes serving HTTP and gRPC, one engine
process; demo backbone, 8 domains) with `RA_GRPC_PORT`, then interleaves `--rounds` rounds of REST v2
PIXELS from wrk and gRPC ModelInfer PIXELS (`raw_input_contents`) from a separate Python process
(grpc.aio, `--concurrency` calls in flight on one channel; prebuilt requests, so the client's own cost is
its gRPC core). Each round's CPU of the front-end processes (read from /proc, so not a difference of two
measurements) over its images is the front end's cost; the engine process's is printed beside it. Prints
`frontend_cpu_ms_per_img` (`rest_v2_pixels`, `grpc_pixels`, medians of the rounds), `grpc_over_rest`,
`engine_cpu_ms_per_img` and each protocol's img/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

from bench.harness.cpu import children, process_cpu_s
from bench.harness.load import drive_wrk, test_images
from bench.harness.servers import DEMO, TOKEN, ZERO_ENGINE, demo_bundles, free_port, wait_ready, wait_warm


def pixels_of(images: list[bytes], size: int, count: int) -> np.ndarray:
    from model.preprocessing import center_crop, open_image, square, to_rgb

    side = round(size * 9 / 8)
    return np.stack(
        [center_crop(square(to_rgb(open_image(images[i % len(images)])), side), size) for i in range(count)]
    )


async def _grpc_load(target: str, domains: list[str], pixels: np.ndarray, concurrency: int, seconds: float) -> dict:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    requests = []
    for domain in domains:
        request = pb.ModelInferRequest(model_name=domain, raw_input_contents=[pixels.tobytes()])
        request.inputs.add(name="PIXELS", datatype="UINT8", shape=list(pixels.shape))
        request.outputs.add(name="LOGITS")
        requests.append(request)
    done = errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        deadline = time.monotonic() + seconds

        async def worker(offset: int) -> None:
            nonlocal done, errors
            i = offset
            while time.monotonic() < deadline:
                try:
                    await infer(requests[i % len(requests)])
                    done += 1
                except grpc.aio.AioRpcError:
                    errors += 1
                i += 1

        start = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        wall = time.monotonic() - start
    return {"requests": done, "errors": errors, "img_s": done * len(pixels) / wall}


def _grpc_process(target, domains, pixels, concurrency, seconds, queue) -> None:
    queue.put(asyncio.run(_grpc_load(target, domains, pixels, concurrency, seconds)))


def drive_grpc(target: str, domains: list[str], pixels: np.ndarray, concurrency: int, seconds: float) -> dict:
    """gRPC ModelInfer load from a separate process (so its CPU is not the server's)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_grpc_process, args=(target, domains, pixels, concurrency, seconds, queue))
    process.start()
    result = queue.get(timeout=seconds + 120)
    process.join(30)
    return result


KINDS = ("rest_v2_pixels", "grpc_pixels")


def measure(
    command: list[str],
    env: dict,
    port: int,
    grpc_port: int,
    names: list[str],
    images: list[bytes],
    pixels: np.ndarray,
    size: int,
    concurrency: int,
    seconds: float,
    rounds: int,
) -> dict:
    """Interleaved rounds of both protocols against one split server: per round, the front-end processes'
    and the engine process's CPU per image, and img/s."""
    url, files = f"http://127.0.0.1:{port}", len(pixels)
    runs: dict[str, dict[str, list[float]]] = {
        key: {kind: [] for kind in KINDS} for key in ("frontend", "engine", "img_s")
    }
    errors = 0
    server = subprocess.Popen([sys.executable, *command], env=env)
    try:
        wait_ready(url)
        wait_warm(url)
        drive_wrk(url, names, images, concurrency, 2.0, files, "v2-pixels", size)  # warm-up, both paths
        drive_grpc(f"127.0.0.1:{grpc_port}", names, pixels, concurrency, 2.0)
        engine = httpx.get(url + "/readyz", timeout=10).json()["engine_pid"]
        frontends = [pid for pid in children(server.pid) if pid != engine]
        for _ in range(rounds):  # interleaved, so drift on a shared machine hits both alike
            for kind in KINDS:
                before = {pid: process_cpu_s(pid) for pid in [engine, *frontends]}
                if kind == "grpc_pixels":
                    out = drive_grpc(f"127.0.0.1:{grpc_port}", names, pixels, concurrency, seconds)
                else:
                    out = drive_wrk(url, names, images, concurrency, seconds, files, "v2-pixels", size)
                used = {pid: process_cpu_s(pid) - before[pid] for pid in before}
                done = max(out["requests"], 1) * files
                errors += out["errors"]
                runs["frontend"][kind].append(sum(used[pid] for pid in frontends) * 1000 / done)
                runs["engine"][kind].append(used[engine] * 1000 / done)
                runs["img_s"][kind].append(out["img_s"])
    finally:
        server.terminate()
        server.wait(60)
    out = {
        key: {kind: round(float(np.median(v)), 1 if key == "img_s" else 4) for kind, v in values.items()}
        for key, values in runs.items()
    }
    out["errors"] = errors
    return out


def run(files: int, seconds: float, rounds: int, concurrency: int, backbone: pathlib.Path) -> dict:
    from model.backbone import load_backbone
    from service.record.directory import DirectoryRecord

    demo = demo_bundles()
    bundles = {f"bench{i}": demo[i % len(demo)].read_bytes() for i in range(8)}
    images = test_images(16, 48)
    size = load_backbone(backbone).config.input_size
    pixels = pixels_of(images, size, files)
    with tempfile.TemporaryDirectory() as store:
        record = DirectoryRecord(pathlib.Path(store))
        for name, data in bundles.items():
            record.add(name, data, replace=False)
        record.close()
        results = {}
        for setup in ("zero_engine", "engine"):
            port, grpc_port = free_port(), free_port()
            env = {
                **os.environ,
                "RA_STORE_DIR": store,
                "RA_ADMIN_TOKEN": TOKEN,
                "RA_DEMO_ADAPTERS": "false",
                "RA_BACKBONE": str(backbone),
                "RA_GRPC_PORT": str(grpc_port),
                "TF_CPP_MIN_LOG_LEVEL": "2",
                **(ZERO_ENGINE if setup == "zero_engine" else {}),
            }
            command = ["-m", "service", "--port", str(port), "--workers", "2", "--log-level", "warning"]
            results[setup] = measure(
                command, env, port, grpc_port, list(bundles), images, pixels, size, concurrency, seconds, rounds
            )
    frontend = results["zero_engine"]["frontend"]
    return {
        "frontend_cpu_ms_per_img": frontend,
        "grpc_over_rest": round(frontend["grpc_pixels"] / frontend["rest_v2_pixels"], 3),
        "zero_engine_img_s": results["zero_engine"]["img_s"],
        "with_engine": {key: results["engine"][key] for key in ("frontend", "engine", "img_s")},
        "errors": results["zero_engine"]["errors"] + results["engine"]["errors"],
        "settings": {
            "files_per_request": files,
            "seconds": seconds,
            "rounds": rounds,
            "concurrency": concurrency,
            "workers": 2,
            "backbone": str(backbone),
            "cpus": os.cpu_count(),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files-per-request", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved REST/gRPC rounds; medians reported")
    parser.add_argument("--concurrency", type=int, default=16, help="gRPC calls in flight; wrk's connections")
    parser.add_argument("--backbone", type=pathlib.Path, default=DEMO / "backbone.safetensors")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.files_per_request, args.seconds, args.rounds, args.concurrency, args.backbone)))


if __name__ == "__main__":
    main()
