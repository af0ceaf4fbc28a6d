"""The Open Inference Protocol over gRPC against REST v2, side by side in one run: the server's CPU per image
for PIXELS (binary, `--files-per-request` images a request), less the bare engine's.

    python -m bench.serve --protocol grpc [--files-per-request 8] [--seconds 10] [--rounds 3] [--concurrency 16]

Starts one `python -m service` (one process: HTTP, gRPC and the engine; demo backbone, 8 domains) with
`RA_GRPC_PORT`, then interleaves `--rounds` rounds of REST v2 PIXELS from wrk and gRPC ModelInfer PIXELS
(`raw_input_contents`) from a separate Python process (grpc.aio, `--concurrency` calls in flight on one
channel; prebuilt requests, so the client's own cost is its gRPC core). Each round's server CPU over its
images, less the bare engine's CPU per image measured in this run, is the front end's cost. Prints
`frontend_cpu_ms_per_img` (`rest_v2_pixels`, `grpc_pixels`, medians of the rounds), `grpc_over_rest`
and each protocol's img/s.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.serve import (DEMO, TOKEN, drive_wrk, engine_img_s, free_port, process_cpu_s, test_images, wait_ready,
                         wait_warm)


def pixels_of(images: list[bytes], size: int, count: int) -> np.ndarray:
    from model.preprocessing import center_crop, open_image, square, to_rgb

    side = round(size * 9 / 8)
    return np.stack([center_crop(square(to_rgb(open_image(images[i % len(images)])), side), size)
                     for i in range(count)])


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


def run(files: int, seconds: float, rounds: int, concurrency: int, backbone: pathlib.Path) -> dict:
    from model.backbone import load_backbone
    from service.record.directory import DirectoryRecord

    demo = sorted(p for p in DEMO.glob("*.safetensors") if p.name != "backbone.safetensors")
    bundles = {f"bench{i}": demo[i % len(demo)].read_bytes() for i in range(8)}
    images = test_images(16, 48)
    size = load_backbone(backbone).config.input_size
    pixels = pixels_of(images, size, files)
    port, grpc_port = free_port(), free_port()
    url, names = f"http://127.0.0.1:{port}", list(bundles)
    cpu_ms: dict[str, list[float]] = {"rest_v2_pixels": [], "grpc_pixels": []}
    img_s: dict[str, list[float]] = {"rest_v2_pixels": [], "grpc_pixels": []}
    errors = 0
    with tempfile.TemporaryDirectory() as store:
        record = DirectoryRecord(pathlib.Path(store))
        for name, data in bundles.items():
            record.add(name, data, replace=False)
        record.close()
        env = {**os.environ, "RA_STORE_DIR": store, "RA_ADMIN_TOKEN": TOKEN, "RA_DEMO_ADAPTERS": "false",
               "RA_BACKBONE": str(backbone), "RA_GRPC_PORT": str(grpc_port), "TF_CPP_MIN_LOG_LEVEL": "2"}
        server = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
                                  env=env)
        try:
            wait_ready(url)
            wait_warm(url)
            drive_wrk(url, names, images, concurrency, 2.0, files, "v2-pixels", size)  # warm-up, both paths
            drive_grpc(f"127.0.0.1:{grpc_port}", names, pixels, concurrency, 2.0)
            for _ in range(rounds):  # interleaved, so drift on a shared machine hits both alike
                for kind in cpu_ms:
                    before = process_cpu_s(server.pid)
                    if kind == "grpc_pixels":
                        out = drive_grpc(f"127.0.0.1:{grpc_port}", names, pixels, concurrency, seconds)
                    else:
                        out = drive_wrk(url, names, images, concurrency, seconds, files, "v2-pixels", size)
                    errors += out["errors"]
                    cpu_ms[kind].append((process_cpu_s(server.pid) - before) * 1000 / (out["requests"] * files))
                    img_s[kind].append(out["img_s"])
        finally:
            server.terminate()
            server.wait(30)
    _, engine_cpu_ms = engine_img_s(backbone, dict(list(bundles.items())), images, 32, seconds)
    frontend = {kind: round(float(np.median(v)) - engine_cpu_ms, 4) for kind, v in cpu_ms.items()}
    return {
        "frontend_cpu_ms_per_img": frontend,
        "grpc_over_rest": round(frontend["grpc_pixels"] / frontend["rest_v2_pixels"], 3),
        "server_cpu_ms_per_img": {kind: round(float(np.median(v)), 4) for kind, v in cpu_ms.items()},
        "engine_cpu_ms_per_img": round(engine_cpu_ms, 4),
        "img_s": {kind: round(float(np.median(v)), 1) for kind, v in img_s.items()},
        "errors": errors,
        "settings": {"files_per_request": files, "seconds": seconds, "rounds": rounds, "concurrency": concurrency,
                     "backbone": str(backbone), "cpus": os.cpu_count()},
    }


def main(args) -> None:
    print(json.dumps(run(args.files_per_request, args.seconds, args.rounds, args.concurrency, args.backbone)))
