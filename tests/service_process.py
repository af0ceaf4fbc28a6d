"""Start the real service (`python -m service`) in subprocesses on free loopback ports, for tests."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """One `python -m service` process (or a group of `--workers`) on its own port, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: pathlib.Path, workers: int = 1):
        self.env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "CUDA_VISIBLE_DEVICES": "",
            "RA_DEVICE_MEMORY_MB": "256",
            **env,
        }  # several engines on one machine: a modest table each
        self.log_path, self.workers = log_path, workers
        self.proc: subprocess.Popen | None = None
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_port(self) -> int:
        """The Open Inference Protocol's gRPC port (`RA_GRPC_PORT` in `env`)."""
        return int(self.env["RA_GRPC_PORT"])

    def start(self) -> ServiceProcess:
        """Start on a fresh free port (a restarted process does not wait for the old socket to close)."""
        self.port = free_port()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "service",
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self.workers),
                    "--log-level",
                    "info",
                ],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 120.0) -> ServiceProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise TimeoutError(f"the server was not ready within {timeout}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Signal the server (the supervisor stops its processes in order) and wait; SIGKILL goes to the
        whole process group."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        with contextlib.suppress(ProcessLookupError):
            if sig == signal.SIGKILL:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


@contextlib.contextmanager
def running_server(store: pathlib.Path, env: dict[str, str] | None = None, timeout: float = 90.0):
    """Yield the base URL of a ready server on the directory `store`; kill it afterwards."""
    server = ServiceProcess({"RA_STORE_DIR": str(store), **(env or {})}, store.parent / f"{store.name}.log")
    server.start()
    try:
        server.wait_ready(timeout)
        yield server.url
    finally:
        server.stop(signal.SIGKILL)
