"""Start the real service (`python -m service`) in a subprocess on a free loopback port, for tests."""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(store: pathlib.Path, env: dict[str, str] | None = None, timeout: float = 90.0):
    """Yield the base URL of a ready server; kill it afterwards."""
    port = free_port()
    full_env = {**os.environ, "RA_STORE_DIR": str(store), "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
                               env=full_env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not ready within {timeout}s")
            time.sleep(0.2)
        yield url
    finally:
        process.kill()
        process.wait(30)
