"""Concurrency against the real server: racing registrations, registrations under prediction load.

Every answer must be a documented one (201, 409, 200), and every prediction must equal the reference
engine's for a complete adapter (never a half-written one).
"""

from __future__ import annotations

import concurrent.futures
import random
import threading

import httpx
from numeric import assert_logits_close
from service_helpers import (
    ADMIN_TOKEN,
    AUTH,
    bundle_file,
    get_assets,
    live_versions,
    png_bytes,
    reference_engine,
    reference_logits,
    softmax,
)
from service_process import running_server

from service.record.directory import DirectoryRecord


def start(tmp_path_factory, domains=("alpha",)):
    assets = get_assets(tmp_path_factory)
    store = tmp_path_factory.mktemp("reliability-store")
    for domain in domains:
        DirectoryRecord(store).add(domain, replace=False, data=assets.data(domain))
    env = {
        "RA_BACKBONE": str(assets.backbone_path),
        "RA_DEMO_ADAPTERS": "false",
        "RA_ADMIN_TOKEN": ADMIN_TOKEN,
        "RA_MAX_WAIT_MS": "5",
    }
    return assets, store, running_server(store, env)


def test_twenty_simultaneous_registrations_of_one_domain_have_one_winner(tmp_path_factory):
    assets, store, server = start(tmp_path_factory, domains=())
    data = assets.data("beta")
    with server as url, concurrent.futures.ThreadPoolExecutor(20) as pool:

        def register(_):
            with httpx.Client(base_url=url, timeout=60) as client:
                return client.post("/adapters", headers=AUTH, files=bundle_file(data)).status_code

        codes = sorted(pool.map(register, range(20)))
        listed = httpx.get(url + "/adapters").json()["adapters"]
    assert codes == [201] + [409] * 19
    assert [(a["domain"], a["version"]) for a in listed] == [("beta", 1)]
    assert live_versions(store, "beta") == [1]


def test_registrations_while_fifty_clients_predict(tmp_path_factory):
    assets, _store, server = start(tmp_path_factory, domains=("alpha",))
    ref = reference_engine(assets)
    images = [png_bytes(seed) for seed in range(6)]
    names = [f"d{i:02d}" for i in range(20)]
    sources = {name: ("beta", "gamma")[i % 2] for i, name in enumerate(names)}
    with server as url, concurrent.futures.ThreadPoolExecutor(70) as pool:

        def register(name):
            with httpx.Client(base_url=url, timeout=60) as client:
                return client.post(
                    "/adapters", headers=AUTH, files=bundle_file(assets.data(sources[name])), data={"domain": name}
                ).status_code

        registered = threading.Event()

        def predict(seed):
            rng = random.Random(seed)
            answers, extra = [], 2
            with httpx.Client(base_url=url, timeout=60) as client:
                while extra:  # keep predicting until every registration answered, then twice more
                    extra -= registered.is_set()
                    domain = rng.choice(["alpha", *names])
                    k = rng.randrange(len(images))
                    r = client.post(
                        f"/predict/{domain}", files={"file": ("x.png", images[k], "image/png")}, data={"top_k": "10"}
                    )
                    answers.append((domain, k, r.status_code, r.json()))
            return answers

        predictions = [pool.submit(predict, seed) for seed in range(50)]
        registrations = list(pool.map(register, names))
        registered.set()
        answers = [a for f in predictions for a in f.result()]
    assert registrations == [201] * 20
    served = 0
    for domain, k, status, body in answers:
        assert status in (200, 404), body  # 404 only for a domain not registered yet
        if status == 404:
            assert body["error"] == "unknown_domain" and domain != "alpha"
            continue
        served += 1
        source = "alpha" if domain == "alpha" else sources[domain]
        logits = reference_logits(ref, images[k], assets.bundles[source], source)
        got = {p["index"]: p["score"] for p in body["predictions"]}
        # served in batches of other compositions: float32 rounding, relative to the logits' scale
        assert_logits_close(
            [got[i] for i in range(len(logits))], softmax(logits), logits=logits, err_msg=f"{domain} image {k}"
        )
    assert served >= 100
