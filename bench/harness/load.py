"""Loading a service from a separate process: wrk (C, so the server's CPUs do the serving) with its
figures parsed, or an asyncio httpx client where wrk is missing; the request bodies and test images."""

from __future__ import annotations

import asyncio
import io
import json
import multiprocessing
import pathlib
import random
import re
import shutil
import struct
import subprocess
import tempfile
import time

import numpy as np


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


def run_client(url, domains, images, concurrency, seconds, files, queue) -> None:
    """The Python client's load (a separate process's target): its figures go on `queue`."""
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
        target=run_client, args=(url, domains, images, concurrency, seconds, files, queue)
    )
    process.start()
    result = queue.get(timeout=seconds + 120)
    process.join(30)
    return result


def median_round(rounds: list[dict]) -> dict:
    """Each figure's median over the rounds."""
    return {key: float(np.median([r[key] for r in rounds])) for key in ("img_s", "p50_ms", "p99_ms")}
