"""`python -m service --workers 2` on the directory registry: two processes on one port, each with its
own engine, both following the same store; a registration made through the port is served by both."""

from __future__ import annotations

import time

import httpx
from service_helpers import ADMIN_TOKEN, AUTH, bundle_file, get_assets, png_bytes
from service_process import ServiceProcess


def fresh_get(url: str) -> httpx.Response:
    with httpx.Client(timeout=10) as client:  # a new connection each time: the kernel picks the worker
        return client.get(url)


def worker_status(url: str, want: int = 2, timeout: float = 120) -> dict[int, dict]:
    """/readyz of every worker (by pid), once all `want` of them answer ready."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < want:
        assert time.monotonic() < deadline, f"only these workers answered ready: {sorted(seen)}"
        response = fresh_get(url + "/readyz")
        if response.status_code == 200:
            seen[response.json()["pid"]] = response.json()
        time.sleep(0.05)
    return seen


def test_a_registration_through_the_port_is_served_by_both_workers(tmp_path_factory):
    assets = get_assets(tmp_path_factory)
    store = tmp_path_factory.mktemp("workers-store")
    env = {
        "RA_STORE_DIR": str(store),
        "RA_BACKBONE": str(assets.backbone_path),
        "RA_DEMO_ADAPTERS": "false",
        "RA_ADMIN_TOKEN": ADMIN_TOKEN,
        "RA_MAX_WAIT_MS": "1",
        "RA_PREPROCESS_THREADS": "1",
    }
    server = ServiceProcess(env, store.parent / "workers.log", workers=2)
    server.start()
    try:
        server.wait_ready()
        workers = worker_status(server.url)
        assert all(w["workers"] == 2 and w["adapters"] == 0 for w in workers.values()), workers

        with httpx.Client(timeout=60) as client:
            created = client.post(
                server.url + "/adapters", headers=AUTH, files=bundle_file(assets.data("beta")), data={"domain": "both"}
            )
        assert created.status_code == 201, created.text

        answers = []
        for i in range(200):  # right after the 201, through fresh connections spread over both workers
            with httpx.Client(timeout=30) as client:
                answers.append(client.post(f"{server.url}/predict/both", files={"file": ("x.png", png_bytes(i % 7))}))
        assert [r.status_code for r in answers] == [200] * 200, {r.status_code for r in answers}
        assert {r.json()["version"] for r in answers} == {1}

        after = worker_status(server.url)
        assert set(after) == set(workers)  # the same two processes
        assert all(w["adapters"] == 1 and w["registry"]["domains_behind"] == [] for w in after.values()), after
    finally:
        server.stop()
