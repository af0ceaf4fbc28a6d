"""The container for real: build the image on the local Debian base with TensorFlow installed (as the official
TensorFlow image has it), run it, restart it, stop it under load, and bring up the fleet compose file
(PostgreSQL, two replicas, HAProxy).

Needs a running Docker engine and the base image that `.ci/container-base` makes; locally these tests skip
without them, with CI set they must run. The CA bundle of the host reaches pip as a BuildKit secret.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient
from conftest import unavailable
from service_process import free_port

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = os.environ.get("RA_CONTAINER_BASE", "residual-adapters-base:bookworm-tensorflow")  # .ci/container-base
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SAMPLE = REPO / "service" / "demo" / "sample-ankle-boot.png"
BUNDLE = REPO / "service" / "demo" / "digits.safetensors"
TOKEN = "container-test-token"


def docker_cli() -> str:
    """Debian's docker.io CLI, which matches its dockerd and builds with BuildKit without the buildx plugin
    (a newer CLI elsewhere on PATH may need buildx for `--secret`)."""
    for candidate in (os.environ.get("RA_DOCKER"), "/usr/bin/docker", shutil.which("docker")):
        if candidate and Path(candidate).exists():
            return candidate
    unavailable("docker is not installed (apt-get install docker.io)")


class Docker:
    def __init__(self, cli: str):
        self.cli = cli
        self.env = {**os.environ, "DOCKER_BUILDKIT": "1"}

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([self.cli, *args], capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args[:3])} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        return result

    def build(self, tag: str, context: Path, *extra: str) -> float:
        started = time.monotonic()
        self(
            "build",
            "--network",
            "host",
            "--build-arg",
            f"BASE_IMAGE={BASE_IMAGE}",
            "-t",
            tag,
            *extra,
            str(context),
            timeout=900,
        )
        return time.monotonic() - started


@pytest.fixture(scope="session")
def docker() -> Docker:
    d = Docker(docker_cli())
    if d("info", check=False, timeout=30).returncode != 0:
        unavailable("no Docker engine answers (start dockerd)")
    if d("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        unavailable(f"the base image {BASE_IMAGE} is missing (make it with .ci/container-base)")
    return d


@pytest.fixture(scope="session")
def image(docker, container_facts) -> str:
    """The project's Dockerfile built on the local base; the host's CA bundle goes to pip as a secret."""
    tag = "residual-adapters:test"
    secret = ["--secret", f"id=ca_bundle,src={CA_BUNDLE}"] if CA_BUNDLE.exists() else []
    seconds = docker.build(tag, REPO, *secret)
    size = int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout)
    container_facts.append(f"image {tag} on {BASE_IMAGE}: built in {seconds:.0f} s, {size / 1e9:.2f} GB")
    secrets_seen = docker("run", "--rm", "--entrypoint", "sh", tag, "-c", "ls -A /run/secrets 2>/dev/null; true")
    assert secrets_seen.stdout.strip() == "", "the CA bundle must not stay in the image"
    return tag


@contextlib.contextmanager
def container(
    docker: Docker, image: str, port: int, volume: str, name: str | None = None, grpc_port: int | None = None
):
    """The image on the host's network: its HTTP port `port`, its gRPC port `grpc_port` (a free one by default)."""
    name = name or f"ra-test-{uuid.uuid4().hex[:8]}"
    docker(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "-e",
        f"RA_PORT={port}",
        "-e",
        f"RA_GRPC_PORT={grpc_port or free_port()}",
        "-e",
        f"RA_ADMIN_TOKEN={TOKEN}",
        "-v",
        f"{volume}:/data/store",
        "--health-interval",
        "1s",
        image,
    )
    try:
        yield name
    finally:
        docker("rm", "-f", name, check=False)


def wait_ready(docker: Docker, name: str, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        if docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() != "true":
            break
        time.sleep(0.3)
    raise AssertionError(f"{name} not ready:\n{docker('logs', name, check=False).stderr[-3000:]}")


def classify(url: str, domain: str) -> dict:
    response = httpx.post(f"{url}/predict/{domain}", files={"file": SAMPLE.read_bytes()}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def volume(docker):
    name = f"ra-test-{uuid.uuid4().hex[:8]}"
    docker("volume", "create", name)
    yield name
    docker("volume", "rm", "-f", name, check=False)


def test_the_image_serves_keeps_a_registration_across_a_restart_and_reports_healthy(
    docker, image, volume, container_facts
):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    grpc_port = free_port()
    with container(docker, image, port, volume, grpc_port=grpc_port) as name:
        started = time.monotonic()
        wait_ready(docker, name, url)
        container_facts.append(f"container ready in {time.monotonic() - started:.1f} s")
        assert docker("exec", name, "id", "-u").stdout.strip() == "10001"
        assert classify(url, "fashion")["predictions"][0]["label"] == "ankle-boot"
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as triton:  # the image serves gRPC too
            assert triton.is_server_live() and triton.is_model_ready("fashion")

        assert httpx.post(
            url + "/adapters", files={"bundle": BUNDLE.read_bytes()}, data={"domain": "kept"}, timeout=60
        ).status_code in (401, 403)
        registered = httpx.post(
            url + "/adapters",
            files={"bundle": BUNDLE.read_bytes()},
            data={"domain": "kept"},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=60,
        )
        assert registered.status_code == 201, registered.text

        docker("restart", "-t", "30", name, timeout=90)
        wait_ready(docker, name, url)
        assert httpx.get(url + "/adapters/kept", timeout=10).json()["version"] == 1
        assert classify(url, "kept")["domain"] == "kept"

        deadline = time.monotonic() + 60
        while (health := docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()) != "healthy":
            assert time.monotonic() < deadline, f"health stayed {health}"
            time.sleep(0.5)


class Load:
    """Threads that classify over fresh connections until stopped, recording (start, end, outcome)."""

    def __init__(self, port: int, threads: int = 6):
        boundary = "ra-load-boundary"
        self.body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="s.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + SAMPLE.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        self.headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        self.port, self.stop = port, threading.Event()
        self.results: list[tuple[float, float, int | str]] = []
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                connection.request("POST", "/predict/fashion", self.body, self.headers)
                response = connection.getresponse()
                response.read()
                outcome: int | str = response.status
            except (OSError, http.client.HTTPException) as error:
                outcome = type(error).__name__
                time.sleep(0.05)
            finally:
                connection.close()
            self.results.append((started, time.monotonic(), outcome))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def test_sigterm_under_load_lets_in_flight_requests_finish(docker, image, volume, container_facts):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with container(docker, image, port, volume) as name:
        wait_ready(docker, name, url)
        with Load(port) as load:
            time.sleep(3)
            sigterm_at = time.monotonic()
            stopped = docker("stop", "-t", "30", name, timeout=90)
            stop_s = time.monotonic() - sigterm_at
            time.sleep(0.5)
        state = json.loads(docker("inspect", "-f", "{{json .State}}", name).stdout)
        logs = docker("logs", name).stderr

    assert stopped.returncode == 0
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state  # 137 would mean SIGKILL after the grace
    assert "Finished server process" in logs, logs[-2000:]
    before = [r for r in load.results if r[1] < sigterm_at]
    straddling = [r for r in load.results if r[0] < sigterm_at <= r[1]]
    failed = [r for r in load.results if not isinstance(r[2], int)]
    answered = [r for r in load.results if isinstance(r[2], int)]
    assert len(before) > 20 and all(r[2] == 200 for r in before)
    assert all(r[2] == 200 for r in answered), {r[2] for r in answered}  # no 5xx while shutting down
    assert all(r[1] >= sigterm_at for r in failed)  # only connections refused once shutdown began
    assert any(r[2] == 200 for r in straddling), straddling  # requests in flight at SIGTERM were answered
    container_facts.append(
        f"SIGTERM under load: {len(before)} answered before, {sum(r[2] == 200 for r in straddling)} of "
        f"{len(straddling)} in flight answered, {len(failed)} refused after; stopped in {stop_s:.1f} s, exit 0"
    )


def compose(project: str, env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cli = shutil.which("docker-compose")
    if cli is None:
        unavailable("docker-compose is not installed")
    result = subprocess.run(
        [cli, "-p", project, "-f", str(REPO / "docker-compose.fleet.yml"), *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def in_replica(docker: Docker, container_id: str, path: str) -> dict:
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000{path}', timeout=5).read().decode())"
    return json.loads(docker("exec", container_id, "python", "-c", code).stdout)


def test_the_fleet_compose_file_serves_a_registration_through_haproxy_on_its_home_replica(
    docker, image, container_facts
):
    """Stand-ins for the official postgres and haproxy images, built from Debian's packages on the same base,
    keep their interface (tests/containers/)."""
    docker.build("residual-adapters-test-postgres", REPO / "tests" / "containers" / "postgres")
    docker.build("residual-adapters-test-haproxy", REPO / "tests" / "containers" / "haproxy")
    port, grpc_port = free_port(), free_port()
    project = f"ra{uuid.uuid4().hex[:8]}"
    env = {
        "RA_DB_PASSWORD": uuid.uuid4().hex,
        "RA_ADMIN_TOKEN": TOKEN,
        "RA_IMAGE": image,
        "RA_FLEET_PORT": str(port),
        "RA_FLEET_GRPC_PORT": str(grpc_port),
        "RA_POSTGRES_IMAGE": "residual-adapters-test-postgres",
        "RA_PROXY_IMAGE": "residual-adapters-test-haproxy",
    }
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        compose(project, env, "up", "-d", "--no-build")
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, compose(project, env, "logs", "--tail", "40").stdout
            time.sleep(0.5)
        container_facts.append(f"fleet (postgres, 2 replicas, haproxy) ready in {time.monotonic() - started:.1f} s")
        replicas = compose(project, env, "ps", "-q", "adapters").stdout.split()
        assert len(replicas) == 2

        registered = httpx.post(
            url + "/adapters",
            files={"bundle": BUNDLE.read_bytes()},
            data={"domain": "fleet"},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=60,
        )
        assert registered.status_code == 201, registered.text
        for replica in replicas:  # every replica knows it at once, from the registry of record
            assert in_replica(docker, replica, "/adapters/fleet")["version"] == 1
        for _ in range(8):
            assert classify(url, "fleet")["domain"] == "fleet"
        served = [in_replica(docker, replica, "/adapters/fleet")["served"] for replica in replicas]
        assert sorted(served) == [0, 8], served  # the domain's home replica served them all
        assert grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}").is_model_ready("fleet")  # gRPC through it
    finally:
        compose(project, env, "down", "-v", "-t", "20", timeout=120)
