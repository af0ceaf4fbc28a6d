"""The service over HTTP against the bare engine, on this machine.

    python -m bench.serve [--concurrency 64] [--seconds 10] [--rounds 3] [--files-per-request 1]
                          [--traffic uniform|zipf] [--domains 8] [--images tiny|camera]
    python -m bench.serve --protocol grpc --files-per-request 8   # gRPC against REST v2 (bench.protocols)

Starts `python -m service` on a free loopback port with the shipped demo backbone and its demo
domains plus copies (`--domains`, renamed), drives it from a separate client process at a fixed
concurrency (wrk when it is installed, as it barely loads the server's two cores; else an
asyncio httpx client, which caps the figures at what Python can send), and prints one JSON object last:

- `http_img_s` (saturating load, mixed domains) and `engine_img_s` (the same backbone and domains,
  in this process, batches of `RA_MAX_BATCH_SIZE`) measured in the same run; `http_over_engine`;
- `mixed_over_single`: HTTP images/s with the traffic's domains over HTTP images/s with one domain
  (medians of `--rounds` interleaved rounds of each); `--traffic uniform` spreads requests evenly
  over `--domains`, `--traffic zipf` draws them with probability ~ 1/rank (exponent
  `--zipf-exponent`), as a few customers' domains take most requests; then also `zipf_over_single`;
- `one_domain_batch_share`: the share of the engine calls in the traffic's rounds that ran one domain
  (the folded path), from the service's `ra_batch_domains` histogram;
- p50/p99 latency at low load (concurrency 1) and at saturation;
- `register_to_first_prediction_ms`: POST /adapters of a new domain, then its first prediction,
  while the saturating load runs;
- `cpu`: the server's CPU time per image at saturation (all its threads) against the bare engine's,
  and how busy the server kept the machine. Where the engine computes on the same CPUs as the HTTP
  work, `cpu_bound_http_over_engine` is the most `http_over_engine` can be on this machine.
- `frontend_cpu_ms_per_img` (with wrk): server CPU per image minus the bare engine's, at saturation,
  for multipart `/predict`, Open Inference Protocol `IMAGE` (binary) and `PIXELS` (binary).
- `camera_decode_ms`: decode + preprocess of one generated 12-megapixel JPEG (4000x3000, quality 90)
  as the service does it, and `camera_decode_ratio`: that over a full decode + the same resize
  (medians, same run). `--images camera` sends such photos over HTTP instead of tiny PNGs.
The load generator only talks to 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import pathlib
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

DEMO = pathlib.Path(__file__).resolve().parents[1] / "service" / "demo"
TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} was not ready within {timeout}s")


def camera_jpeg(width: int = 4000, height: int = 3000, seed: int = 0) -> bytes:
    """A photo-like JPEG (quality 90): smooth shapes and fine texture, a few MB at 12 megapixels (noise
    alone would not compress like a photo, flat colour far better)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    pixels = np.asarray(smooth, np.int16) + rng.integers(-6, 7, (height, width, 1), dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def camera_decode(photo: bytes, bundle_data: bytes, backbone_path: pathlib.Path, repeats: int = 7) -> dict:
    """Median ms to turn one camera JPEG into a domain's input as the service does, and with a full decode."""
    from model.backbone import load_backbone
    from model.bundle import load_bundle
    from model.preprocessing import open_image, preprocess
    from service.frontend.inference import decode_and_preprocess

    bundle = load_bundle(bundle_data, load_backbone(backbone_path))

    def median_ms(work) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            times.append((time.perf_counter() - start) * 1000)
        return float(np.median(times))

    served = median_ms(lambda: decode_and_preprocess(photo, [bundle], 40_000_000))
    full = median_ms(lambda: preprocess(open_image(photo), bundle.preprocessing))
    return {
        "camera_decode_ms": round(served, 2),
        "camera_full_decode_ms": round(full, 2),
        "camera_decode_ratio": round(served / full, 3),
        "camera_jpeg_bytes": len(photo),
    }


def zipf_sequence(names: list[str], exponent: float, length: int = 8192, seed: int = 3) -> list[str]:
    """`length` domain names drawn with probability ~ 1/rank**exponent (names[0] is the hottest)."""
    weights = 1.0 / np.arange(1, len(names) + 1) ** exponent
    picks = np.random.default_rng(seed).choice(len(names), size=length, p=weights / weights.sum())
    return [names[i] for i in picks]


def wait_warm(url: str, timeout: float = 600.0) -> None:
    """Until the service has loaded its most used domains in the background (so no round pays loads)."""
    import httpx

    deadline = time.monotonic() + timeout
    while httpx.get(url + "/readyz", timeout=5).json().get("registry", {}).get("warming"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} was still warming after {timeout}s")
        time.sleep(0.5)


def test_images(n: int, size: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


async def _drive(
    url: str, domains: list[str], images: list[bytes], concurrency: int, seconds: float, files: int
) -> dict:
    import httpx

    latencies, errors, done = [], 0, 0
    deadline = time.perf_counter() + seconds
    rng = random.Random(1)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors, done
            while time.perf_counter() < deadline:
                domain = rng.choice(domains)
                upload = [("file", (f"{i}.png", rng.choice(images), "image/png")) for i in range(files)]
                start = time.perf_counter()
                response = await client.post(f"/predict/{domain}", files=upload)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                    done += files
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = np.asarray(latencies) * 1000
    return {
        "img_s": done / elapsed,
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
    }


def _client(url, domains, images, concurrency, seconds, files, queue) -> None:
    queue.put(asyncio.run(_drive(url, domains, images, concurrency, seconds, files)))


WRK_SCRIPT = """
local f = io.open("%(body)s", "rb"); local body = f:read("*all"); f:close()
local domains = {%(domains)s}
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", "%(prefix)s" .. domains[(i %% #domains) + 1] .. "%(suffix)s",
                    {["Content-Type"] = "%(content_type)s"%(extra_header)s}, body)
end
"""
KINDS = ("multipart", "v2-image", "v2-pixels")  # /predict/{domain}; OIP infer with IMAGE or PIXELS, binary


def request_body(kind: str, images: list[bytes], files: int, input_size: int) -> tuple[bytes, dict]:
    """The body wrk sends for `kind`, and the parts of its request line and headers."""
    if kind == "multipart":
        boundary = "benchBoundary7MA4YWxkTrZu0gW"
        body = (
            b"".join(
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
                f"Content-Type: image/png\r\n\r\n".encode()
                + images[i % len(images)]
                + b"\r\n"
                for i in range(files)
            )
            + f"--{boundary}--\r\n".encode()
        )
        return body, {
            "prefix": "/predict/",
            "suffix": "",
            "content_type": f"multipart/form-data; boundary={boundary}",
            "extra_header": "",
        }
    from model.preprocessing import center_crop, open_image, square, to_rgb

    if kind == "v2-image":
        binary = b"".join(
            struct.pack("<I", len(images[i % len(images)])) + images[i % len(images)] for i in range(files)
        )
        tensor = {"name": "IMAGE", "datatype": "BYTES", "shape": [files]}
    else:
        side = round(input_size * 9 / 8)
        binary = b"".join(
            center_crop(square(to_rgb(open_image(images[i % len(images)])), side), input_size).tobytes()
            for i in range(files)
        )
        tensor = {"name": "PIXELS", "datatype": "UINT8", "shape": [files, input_size, input_size, 3]}
    tensor["parameters"] = {"binary_data_size": len(binary)}
    header = json.dumps(
        {"inputs": [tensor], "outputs": [{"name": "LOGITS", "parameters": {"binary_data": True}}]}
    ).encode()
    return header + binary, {
        "prefix": "/v2/models/",
        "suffix": "/infer",
        "content_type": "application/octet-stream",
        "extra_header": f', ["Inference-Header-Content-Length"] = "{len(header)}"',
    }


def _wrk_ms(text: str) -> float:
    value, unit = float(text[:-2] if text.endswith(("ms", "us")) else text[:-1]), text[-2:]
    return value / 1000 if unit == "us" else value if unit == "ms" else value * 1000


def run_wrk(url: str, script_for, body: bytes, connections: int, seconds: float, threads: int = 1) -> dict:
    """Run wrk with the Lua script `script_for(body_file)` (the file holds `body`); its figures: requests/s,
    requests, non-2xx answers, socket errors, p50 and p99 in ms."""
    with tempfile.TemporaryDirectory() as tmp:
        body_file, script = pathlib.Path(tmp) / "body.bin", pathlib.Path(tmp) / "load.lua"
        body_file.write_bytes(body)
        script.write_text(script_for(body_file))
        out = subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(map(int, sockets.groups())) if sockets else 0,
        "p50_ms": _wrk_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),
        "p99_ms": _wrk_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),
    }


def drive_wrk(
    url: str,
    domains: list[str],
    images: list[bytes],
    concurrency: int,
    seconds: float,
    files: int,
    kind: str = "multipart",
    input_size: int = 32,
    key: str | None = None,
    threads: int = 1,
    pause_ms: int = 0,
) -> dict:
    """wrk (C, a separate process) as the load generator: it costs the server's CPUs far less than Python.
    `key` goes as `Authorization: Bearer`; `threads`: wrk's threads (one keeps up with 2 server cores);
    `pause_ms`: each connection waits this long after every answer (an offered rate of about
    concurrency / pause when the answers are quick), else it sends as fast as the answers come."""
    body, parts = request_body(kind, images, files, input_size)
    if key is not None:
        parts["extra_header"] += f', ["Authorization"] = "Bearer {key}"'
    names = ", ".join(f'"{d}"' for d in domains)
    pause = f"delay = function() return {pause_ms} end\n" if pause_ms else ""
    run = run_wrk(
        url,
        lambda body_file: WRK_SCRIPT % {"body": body_file, **parts, "domains": names} + pause,
        body,
        concurrency,
        seconds,
        threads,
    )
    return {
        "img_s": run["requests_s"] * files,
        "requests": run["requests"],
        "errors": run["non_2xx"],
        "p50_ms": run["p50_ms"],
        "p99_ms": run["p99_ms"],
    }


def drive(url: str, domains: list[str], images: list[bytes], concurrency: int, seconds: float, files: int) -> dict:
    """Run the load from a separate process: wrk when installed (apt-get install wrk), else a Python client."""
    if shutil.which("wrk"):
        return drive_wrk(url, domains, images, concurrency, seconds, files)
    queue = multiprocessing.get_context("spawn").Queue()
    process = multiprocessing.get_context("spawn").Process(
        target=_client, args=(url, domains, images, concurrency, seconds, files, queue)
    )
    process.start()
    result = queue.get(timeout=seconds + 120)
    process.join(30)
    return result


def median_round(rounds: list[dict]) -> dict:
    """Each figure's median over the rounds."""
    return {key: float(np.median([r[key] for r in rounds])) for key in ("img_s", "p50_ms", "p99_ms")}


def engine_img_s(
    backbone_path: pathlib.Path, bundles: dict[str, bytes], images: list[bytes], batch: int, seconds: float
) -> tuple[float, float]:
    """The bare engine on the same backbone and domains, preprocessed batches of `batch`, mixed domains:
    (images/s, CPU milliseconds per image over all of this process's threads)."""
    from model.backbone import load_backbone
    from model.bundle import load_bundle
    from model.engine import InferenceEngine
    from model.preprocessing import open_image, preprocess

    backbone = load_backbone(backbone_path)
    engine = InferenceEngine(backbone, capacity=len(bundles))
    loaded = {name: load_bundle(data, backbone, domain=name) for name, data in bundles.items()}
    slots = {name: engine.load(bundle) for name, bundle in loaded.items()}
    rng = random.Random(2)
    names = [rng.choice(list(loaded)) for _ in range(batch)]
    x = np.stack(
        [
            preprocess(open_image(rng.choice(images), min_side=loaded[n].preprocessing.resize), loaded[n].preprocessing)
            for n in names
        ]
    )
    held = [slots[n] for n in names]
    engine.predict(x, held)
    best = (0.0, 0.0)
    for _ in range(3):  # the best of three windows: the engine's figure is the one that is not noise-limited
        calls, wall, cpu = 0, time.perf_counter(), time.process_time()
        while calls < 3 or time.perf_counter() - wall < seconds / 3:
            engine.predict(x, held)
            calls += 1
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best = max(best, (calls * batch / wall, cpu * 1000 / (calls * batch)))
    return best


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far (Linux /proc)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_counts(url: str) -> tuple[float, float]:
    """The service's engine calls so far, and how many of them ran one domain (the folded path)."""
    import httpx

    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).text
    total = re.search(r"^ra_batch_domains_count (\S+)$", text, re.M)
    single = re.search(r'^ra_batch_domains_bucket\{le="1\.0"\} (\S+)$', text, re.M)
    return float(total.group(1)), float(single.group(1))


def main(argv: list[str] | None = None) -> None:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--domains", type=int, default=8, help="domains served (demo bundles and renamed copies)")
    parser.add_argument("--traffic", choices=("uniform", "zipf"), default="uniform")
    parser.add_argument("--zipf-exponent", type=float, default=1.0)
    parser.add_argument(
        "--images",
        choices=("tiny", "camera"),
        default="tiny",
        help="tiny 48x48 PNGs, or 12-megapixel JPEGs (4000x3000, quality 90)",
    )
    parser.add_argument("--files-per-request", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved mixed/single rounds; medians reported")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--backbone", type=pathlib.Path, default=DEMO / "backbone.safetensors")
    parser.add_argument(
        "--protocol",
        choices=("http", "grpc"),
        default="http",
        help="grpc: front-end CPU per image, Open Inference Protocol over gRPC against REST v2 (bench.protocols)",
    )
    args = parser.parse_args(argv)
    if args.protocol == "grpc":
        from bench import protocols

        return protocols.main(args)

    demo_bundles = sorted(p for p in DEMO.glob("*.safetensors") if p.name != "backbone.safetensors")
    bundles = {f"bench{i}": demo_bundles[i % len(demo_bundles)].read_bytes() for i in range(args.domains)}
    photo = camera_jpeg()
    camera = camera_decode(photo, demo_bundles[0].read_bytes(), args.backbone)
    images = [camera_jpeg(seed=i) for i in range(4)] if args.images == "camera" else test_images(16, 48)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as store:
        from service.record.directory import DirectoryRecord

        record = DirectoryRecord(pathlib.Path(store))  # the domains, written as POST /adapters would
        for name, data in bundles.items():
            record.add(name, data, replace=False)
        record.close()
        env = {
            **os.environ,
            "RA_STORE_DIR": store,
            "RA_ADMIN_TOKEN": TOKEN,
            "RA_DEMO_ADAPTERS": "false",
            "RA_BACKBONE": str(args.backbone),
            "RA_MAX_BATCH_SIZE": str(args.max_batch_size),
            "RA_MAX_WAIT_MS": str(args.max_wait_ms),
            "RA_MAX_RESIDENT": str(max(512, args.domains + 64)),
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"], env=env
        )
        try:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            wait_ready(url)
            wait_warm(url)
            names = list(bundles)
            traffic = zipf_sequence(names, args.zipf_exponent) if args.traffic == "zipf" else names
            drive(url, traffic, images, args.concurrency, 2.0, args.files_per_request)  # warm-up
            low = drive(url, traffic, images, 1, args.seconds / 2, args.files_per_request)
            mixed_rounds, single_rounds, server_cpu, server_wall = [], [], 0.0, 0.0
            batches, one_domain = 0.0, 0.0
            for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both alike
                cpu_before, wall_before = process_cpu_s(server.pid), time.perf_counter()
                counts = batch_counts(url)
                mixed_rounds.append(drive(url, traffic, images, args.concurrency, args.seconds, args.files_per_request))
                server_cpu += process_cpu_s(server.pid) - cpu_before
                server_wall += time.perf_counter() - wall_before
                batches, one_domain = (
                    a + after - before for a, after, before in zip((batches, one_domain), batch_counts(url), counts)
                )
                single_rounds.append(
                    drive(url, names[:1], images, args.concurrency, args.seconds, args.files_per_request)
                )
            mixed, single = median_round(mixed_rounds), median_round(single_rounds)
            mixed_images = sum(r["requests"] for r in mixed_rounds) * args.files_per_request

            # Front-end CPU per image by request kind (wrk only: the Python client speaks multipart alone)
            kind_cpu_ms = {}
            if shutil.which("wrk"):
                from model.backbone import load_backbone

                size = load_backbone(args.backbone).config.input_size
                for kind in KINDS:
                    cpu_before = process_cpu_s(server.pid)
                    run = drive_wrk(
                        url, names, images, args.concurrency, args.seconds, args.files_per_request, kind, size
                    )
                    if run["errors"]:
                        raise RuntimeError(f"{kind}: {run['errors']} failed requests")
                    kind_cpu_ms[kind] = (
                        (process_cpu_s(server.pid) - cpu_before) * 1000 / (run["requests"] * args.files_per_request)
                    )

            # Registration under load: a background client saturates the server meanwhile.
            queue = multiprocessing.get_context("spawn").Queue()
            load = multiprocessing.get_context("spawn").Process(
                target=_client, args=(url, names, images, args.concurrency, 6.0, args.files_per_request, queue)
            )
            load.start()
            time.sleep(2.0)
            with httpx.Client(base_url=url, timeout=60) as client:
                start = time.perf_counter()
                client.post(
                    "/adapters",
                    headers=auth,
                    files={"bundle": ("b.safetensors", bundles[names[0]])},
                    data={"domain": "fresh"},
                ).raise_for_status()
                client.post("/predict/fresh", files={"file": ("x.png", images[0], "image/png")}).raise_for_status()
                register_ms = (time.perf_counter() - start) * 1000
            queue.get(timeout=120)
            load.join(30)
        finally:
            server.terminate()
            server.wait(30)
    some = dict(list(bundles.items())[:64])  # a batch of 32 random domains is as mixed with 64 as with 1000
    engine, engine_cpu_ms = engine_img_s(args.backbone, some, images, args.max_batch_size, args.seconds)
    server_cpu_ms = server_cpu * 1000 / mixed_images
    result = {
        "http_img_s": round(mixed["img_s"], 1),
        "engine_img_s": round(engine, 1),
        "http_over_engine": round(mixed["img_s"] / engine, 3),
        "mixed_over_single": round(mixed["img_s"] / single["img_s"], 3),
        **({"zipf_over_single": round(mixed["img_s"] / single["img_s"], 3)} if args.traffic == "zipf" else {}),
        "single_http_img_s": round(single["img_s"], 1),
        "one_domain_batch_share": round(one_domain / batches, 3) if batches else None,
        "cpu": {
            "server_ms_per_img": round(server_cpu_ms, 3),
            "engine_ms_per_img": round(engine_cpu_ms, 3),
            "server_busy": round(server_cpu / (server_wall * os.cpu_count()), 3),
            "cpu_bound_http_over_engine": round(engine_cpu_ms / server_cpu_ms, 3),
        },
        "low_load": {
            "p50_ms": round(low["p50_ms"], 2),
            "p99_ms": round(low["p99_ms"], 2),
            "img_s": round(low["img_s"], 1),
        },
        "saturation": {"p50_ms": round(mixed["p50_ms"], 2), "p99_ms": round(mixed["p99_ms"], 2)},
        "register_to_first_prediction_ms": round(register_ms, 1),
        "frontend_cpu_ms_per_img": {kind: round(ms - engine_cpu_ms, 3) for kind, ms in kind_cpu_ms.items()},
        **camera,
        "errors": low["errors"] + sum(r["errors"] for r in mixed_rounds + single_rounds),
        "settings": {
            "load_generator": "wrk" if shutil.which("wrk") else "httpx",
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "domains": args.domains,
            "traffic": args.traffic,
            "zipf_exponent": args.zipf_exponent if args.traffic == "zipf" else None,
            "images": args.images,
            "files_per_request": args.files_per_request,
            "max_batch_size": args.max_batch_size,
            "max_wait_ms": args.max_wait_ms,
            "backbone": str(args.backbone),
            "cpus": os.cpu_count(),
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
