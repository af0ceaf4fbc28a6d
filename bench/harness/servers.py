"""Starting the service for a bench: the demo files, the admin token, a free loopback port, readiness."""

from __future__ import annotations

import pathlib
import socket
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
DEMO = REPO / "service" / "demo"
TOKEN = "bench-token"
ZERO_ENGINE = {"RA_SIMULATED_DEVICE_IMG_S": "1e9"}  # a device too fast to matter, answering zeros


def demo_bundles() -> list[pathlib.Path]:
    """The shipped demo domains' bundle files, by name."""
    return sorted(p for p in DEMO.glob("*.safetensors") if p.name != "backbone.safetensors")


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


def wait_warm(url: str, timeout: float = 600.0) -> None:
    """Until the service has loaded its most used domains in the background (so no round pays loads)."""
    import httpx

    deadline = time.monotonic() + timeout
    while httpx.get(url + "/readyz", timeout=5).json().get("registry", {}).get("warming"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} was still warming after {timeout}s")
        time.sleep(0.5)
