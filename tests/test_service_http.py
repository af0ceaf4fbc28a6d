"""The real server (`python -m service`) over a socket: concurrent mixed-domain batches, registration while
serving, a server killed in the middle of an upload, restarts.

The tests in this module share one server and run in file order (each builds on the registry the
previous ones left).
"""

from __future__ import annotations

import concurrent.futures
import re
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from service_helpers import (
    ADMIN_TOKEN,
    AUTH,
    CLASSES,
    bundle_file,
    check_scores,
    jpeg_bytes,
    png_bytes,
    reference_logits,
    stalled_upload,
    temp_files,
)
from service_process import ServiceProcess

START_TIMEOUT_S = 90


class Server(ServiceProcess):
    """The server under test on a fixed store; restarts keep the store."""

    def __init__(self, assets, store, log_dir):
        env = {
            "RA_BACKBONE": str(assets.backbone_path),
            "RA_STORE_DIR": str(store),
            "RA_DEMO_ADAPTERS": "false",
            "RA_ADMIN_TOKEN": ADMIN_TOKEN,
            "RA_MAX_WAIT_MS": "5",
            "RA_PREPROCESS_THREADS": "2",
        }
        super().__init__(env, log_dir / "server.log")
        self.store = store

    def start(self) -> Server:
        super().start()
        self.wait_ready(START_TIMEOUT_S)
        return self


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory):
    srv = Server(assets, tmp_path_factory.mktemp("http-store"), tmp_path_factory.mktemp("http-logs"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def versions(client: httpx.Client) -> dict[str, int]:
    return {a["domain"]: a["version"] for a in client.get("/adapters").json()["adapters"]}


# which reference bundle each served domain must follow, updated as the tests change the registry
EXPECTED: dict[str, tuple[str, int]] = {}  # domain -> (reference engine domain, version)


def reference_bundle(assets, engine_domain: str):
    return assets.alt[engine_domain[4:]] if engine_domain.startswith("alt-") else assets.bundles[engine_domain]


def check_serving(client, assets, ref, seed: int) -> None:
    """Every expected domain answers like the reference engine, at the expected version."""
    image = png_bytes(seed)
    for domain, (engine_domain, version) in EXPECTED.items():
        response = client.post(f"/predict/{domain}", files={"file": ("x.png", image)})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["version"] == version, (domain, body)
        bundle = reference_bundle(assets, engine_domain)
        check_scores(body["predictions"], reference_logits(ref, image, bundle, engine_domain), bundle.labels)


def test_register_over_http(server, assets):
    with server.client() as client:
        assert client.get("/readyz").json()["adapters"] == 0
        assert client.post("/adapters", files=bundle_file(assets.data("alpha"))).status_code == 401
        for domain in CLASSES:
            response = client.post("/adapters", files=bundle_file(assets.data(domain)), headers=AUTH)
            assert response.status_code == 201, response.text
            assert response.json()["version"] == 1
            EXPECTED[domain] = (domain, 1)
        assert versions(client) == dict.fromkeys(CLASSES, 1)


def test_concurrent_mixed_domain_requests_do_not_cross_talk(server, assets, ref):
    rng = np.random.default_rng(0)
    images = [png_bytes(700 + i) for i in range(10)] + [jpeg_bytes(720 + i) for i in range(5)]
    domains = list(CLASSES)
    pairs = [(int(rng.integers(len(images))), domains[int(rng.integers(len(domains)))]) for _ in range(60)]
    expected = {pair: reference_logits(ref, images[pair[0]], assets.bundles[pair[1]], pair[1]) for pair in set(pairs)}

    with server.client(limits=httpx.Limits(max_connections=32)) as client:

        def call(pair):
            index, domain = pair
            return client.post(f"/predict/{domain}", files={"file": (f"{index}.img", images[index])})

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(call, pairs))
        for pair, response in zip(pairs, responses):
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["domain"] == pair[1] and body["version"] == 1
            assert body["results"][0]["filename"] == f"{pair[0]}.img"
            check_scores(body["predictions"], expected[pair], assets.bundles[pair[1]].labels)

        text = client.get("/metrics").text
    images_served = sum(float(v) for v in re.findall(r"^ra_predictions_total\{[^}]*\} (\S+)$", text, re.M))
    batches = float(re.search(r"^ra_batch_size_count (\S+)$", text, re.M).group(1))
    batched_images = float(re.search(r"^ra_batch_size_sum (\S+)$", text, re.M).group(1))
    assert images_served == len(pairs)
    assert batched_images == images_served
    assert 1 <= batches <= images_served
    print(f"{int(images_served)} images in {int(batches)} engine calls")  # > 1 image per call when batching kicked in


def test_registering_while_serving_fails_no_request(server, assets, ref):
    stop = threading.Event()
    statuses: list[int] = []

    def keep_predicting():
        with server.client() as client:
            i = 0
            while not stop.is_set() or i < 5:
                domain = ("alpha", "beta", "gamma")[i % 3]
                response = client.post(f"/predict/{domain}", files={"file": ("x.png", png_bytes(800 + i % 7))})
                statuses.append(response.status_code)
                i += 1

    worker = threading.Thread(target=keep_predicting)
    worker.start()
    try:
        with server.client() as client:
            time.sleep(0.2)
            added = client.post(
                "/adapters", files=bundle_file(assets.data("gamma")), data={"domain": "delta"}, headers=AUTH
            )
            assert added.status_code == 201, added.text
            replaced = client.post(
                "/adapters", files=bundle_file(assets.data("alt-beta")), data={"replace": "true"}, headers=AUTH
            )
            assert replaced.status_code == 201, replaced.text
            assert replaced.json()["version"] == 2
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(60)
    assert statuses and set(statuses) == {200}, statuses
    EXPECTED["delta"] = ("gamma", 1)
    EXPECTED["beta"] = ("alt-beta", 2)
    with server.client() as client:
        assert versions(client) == {d: v for d, (_, v) in EXPECTED.items()}
        check_serving(client, assets, ref, seed=900)


def test_concurrent_registrations_of_one_domain_have_one_winner(server, assets):
    with server.client() as client:

        def register(name):
            return client.post("/adapters", files=bundle_file(assets.data(name)), data={"domain": "zeta"}, headers=AUTH)

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            statuses = sorted(r.status_code for r in pool.map(register, ["alpha", "alt-alpha", "alpha"]))
        assert statuses == [201, 409, 409]
        assert versions(client)["zeta"] == 1
        assert client.delete("/adapters/zeta", headers=AUTH).status_code == 200


def test_server_killed_during_an_upload_restarts_clean(server, assets, ref):
    with stalled_upload(server.url, assets.data("beta"), "epsilon") as outcome:
        time.sleep(0.5)  # let the server read the first chunk
        server.stop(signal.SIGKILL)
        assert server.proc.returncode == -signal.SIGKILL
    assert outcome and not isinstance(outcome[0], int), f"the upload completed: {outcome}"

    server.start()
    with server.client() as client:
        listing = versions(client)
        assert "epsilon" not in listing
        assert listing == {d: v for d, (_, v) in EXPECTED.items()}
        check_serving(client, assets, ref, seed=950)
    assert not (server.store / "epsilon").exists()
    assert temp_files(server.store) == []


def test_graceful_restart_keeps_the_registry(server, assets, ref):
    with server.client() as client:
        before = versions(client)
    # uvicorn shuts down gracefully, then re-raises the signal: -SIGTERM is its normal exit status
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM), server.log_tail()
    assert "Application shutdown complete" in server.log_path.read_text(errors="replace"), server.log_tail()
    server.start()
    with server.client() as client:
        assert versions(client) == before == {d: v for d, (_, v) in EXPECTED.items()}
        check_serving(client, assets, ref, seed=990)
    assert temp_files(server.store) == []
