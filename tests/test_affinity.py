"""The fleet's proxy: the shipped HAProxy configuration (deploy/haproxy.cfg, its servers swapped for three
real replicas on loopback) routes each domain to one home replica, spills a hot domain over to the
others, sends requests without a domain anywhere, retries on another replica what it could not send
to a dead one, refuses a key over its rate limit (the map service.frontend.proxy_limits makes from the keys
file) before any replica sees the request, and passes gRPC on to the replicas under the same limits."""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import signal
import subprocess
import time

import httpx
import numpy as np
import pytest
from conftest import unavailable
from service_helpers import png_bytes
from service_process import ServiceProcess, free_port

from bench.affinity import served_by
from bench.harness.domains import seed
from bench.harness.haproxy import HAPROXY, RATES, REPO, running_proxy
from service.frontend import proxy_limits
from service.frontend.access import hash_key

DOMAINS = 24


def need_haproxy() -> None:
    if not pathlib.Path(HAPROXY).exists():
        unavailable("HAProxy is not installed (apt-get install haproxy)")


def test_the_shipped_configuration_is_valid(tmp_path):
    need_haproxy()
    config = tmp_path / "haproxy.cfg"  # the shipped file, reading the shipped map from where it lies here
    config.write_text((REPO / "deploy" / "haproxy.cfg").read_text().replace(RATES, str(REPO / "deploy" / "rates.map")))
    result = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


KEYS = {
    "keys": [
        {"name": "flood", "key_sha256": hash_key("flood-secret"), "rate_per_s": 2.5, "burst": 4},
        {"name": "steady", "key_sha256": hash_key("steady-secret"), "rate_per_s": 100},
        {"name": "free", "key_sha256": hash_key("free-secret"), "domains": ["*"]},
    ]
}


def test_the_rates_map_holds_each_limited_key_to_its_largest_one_second_take(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    out = tmp_path / "rates.map"
    proxy_limits.main([str(keys), "--out", str(out)])
    entries = dict(line.split() for line in out.read_text().splitlines() if not line.startswith("#"))
    assert entries == {hash_key("flood-secret"): "4", hash_key("steady-secret"): "100"}  # max(burst, ceil(rate))
    proxy_limits.main([str(keys), "--out", str(out.with_suffix(".two")), "--proxies", "2"])
    two = dict(line.split() for line in out.with_suffix(".two").read_text().splitlines() if not line.startswith("#"))
    assert two == {hash_key("flood-secret"): "2", hash_key("steady-secret"): "50"}  # each of two proxies' share
    keys.write_text('{"keys": [{"name": "x"}]}')
    with pytest.raises(SystemExit, match="key_sha256"):
        proxy_limits.main([str(keys), "--out", str(out)])
    assert dict(line.split() for line in out.read_text().splitlines() if not line.startswith("#")) == entries


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    need_haproxy()
    tmp = tmp_path_factory.mktemp("affinity")
    store = tmp / "store"
    store.mkdir()
    names = seed(store, DOMAINS)
    env = {"RA_STORE_DIR": str(store), "RA_DEMO_ADAPTERS": "false", "RA_PREPROCESS_THREADS": "1", "RA_MAX_WAIT_MS": "2"}
    replicas = [ServiceProcess({**env, "RA_GRPC_PORT": str(free_port())}, tmp / f"replica{i}.log") for i in range(3)]
    for replica in replicas:
        replica.start()
    try:
        for replica in replicas:
            replica.wait_ready(180)
        with running_proxy([r.port for r in replicas], free_port()) as url:
            yield url, replicas, names
    finally:
        for replica in replicas:
            replica.stop(signal.SIGKILL)


def predict(client: httpx.Client, url: str, domain: str) -> int:
    return client.post(f"{url}/predict/{domain}", files={"file": ("x.png", png_bytes(1))}).status_code


def served(replicas: list[ServiceProcess], domain: str) -> list[float]:
    """Images each replica classified for `domain`."""
    return served_by([replica.port for replica in replicas], domain)


def test_each_domain_is_served_by_its_home_replica(fleet):
    url, replicas, names = fleet
    with httpx.Client(timeout=60) as client:
        for _ in range(3):
            for name in names:
                assert predict(client, url, name) == 200
        assert client.get(f"{url}/adapters/{names[0]}").status_code == 200
    homes = []
    for name in names:
        counts = served(replicas, name)
        assert sorted(counts) == [0.0, 0.0, 3.0], (name, counts)  # one replica served all of them
        homes.append(counts.index(3.0))
    assert len(set(homes)) == 3, homes  # the domains are shared out over the replicas


def test_requests_without_a_domain_go_to_any_replica(fleet):
    url, _, _ = fleet
    with httpx.Client(timeout=60) as client:
        pids = {client.get(f"{url}/readyz").json()["engine_pid"] for _ in range(9)}
    assert len(pids) == 3


def test_a_hot_domain_spills_over_to_other_replicas(fleet):
    url, replicas, names = fleet
    hot = names[-1]
    before = served(replicas, hot)
    with (
        httpx.Client(timeout=60, limits=httpx.Limits(max_connections=48)) as client,
        concurrent.futures.ThreadPoolExecutor(48) as pool,
    ):
        codes = list(pool.map(lambda _: predict(client, url, hot), range(480)))
    assert codes == [200] * 480
    gained = [after - b for after, b in zip(served(replicas, hot), before)]
    assert sum(gained) == 480 and sorted(gained)[-2] > 0, gained  # the home replica did not take it all


def test_the_proxy_refuses_a_key_over_its_limit_before_any_replica_sees_it(fleet, tmp_path):
    _, replicas, names = fleet
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    rates = tmp_path / "rates.map"
    proxy_limits.main([str(keys), "--out", str(rates)])
    domain = names[1]
    with (
        running_proxy([r.port for r in replicas], free_port(), rates=rates) as url,
        httpx.Client(timeout=60) as client,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        before = sum(served(replicas, domain))

        def call(key: str) -> httpx.Response:
            return client.post(
                f"{url}/predict/{domain}",
                files={"file": ("x.png", png_bytes(1))},
                headers={"Authorization": f"Bearer {key}"},
            )

        flood = list(pool.map(lambda _: call("flood-secret"), range(24)))
        passed = [r for r in flood if r.status_code == 200]
        refused = [r for r in flood if r.status_code == 429]
        assert len(passed) + len(refused) == 24 and 4 <= len(passed) <= 8, [r.status_code for r in flood]
        assert sum(served(replicas, domain)) - before == len(passed)  # the refused never reached a replica
        body = refused[0].json()
        assert body["error"] == "rate_limited" and "limit of 4 requests per second" in body["detail"]
        assert refused[0].headers["retry-after"] == "1"
        oip = client.get(f"{url}/v2/models/{domain}/ready", headers={"Authorization": "Bearer flood-secret"})
        assert oip.status_code == 429 and oip.json()["error"].startswith("rate_limited: ")
        others = list(pool.map(call, ["steady-secret", "free-secret", "unknown-secret"] * 4))
        assert [r.status_code for r in others] == [200] * 12  # other keys pass (the replicas have no keys file)
        time.sleep(2.2)  # a second later the key's window has room again
        assert call("flood-secret").status_code == 200


def test_grpc_through_the_proxy_reaches_the_replicas_and_holds_keys_to_the_same_limits(fleet, tmp_path):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    _, replicas, names = fleet
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    rates = tmp_path / "rates.map"
    proxy_limits.main([str(keys), "--out", str(rates)])
    domain, listen = names[2], free_port()
    with running_proxy(
        [r.port for r in replicas], free_port(), rates=rates, grpc=(listen, [r.grpc_port for r in replicas])
    ):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{listen}")
        deadline = time.monotonic() + 30
        while not client.is_server_ready():  # the proxy's health checks of the gRPC servers
            assert time.monotonic() < deadline, "the proxy never passed gRPC on to a replica"
            time.sleep(0.2)
        image = grpcclient.InferInput("IMAGE", [1], "BYTES")
        image.set_data_from_numpy(np.array([png_bytes(1)], dtype=np.object_))
        before = sum(served(replicas, domain))

        def call(key: str) -> str:
            try:
                answer = client.infer(domain, [image], headers={"authorization": f"Bearer {key}"})
                return "ok" if answer.as_numpy("PROBABILITIES").shape[0] == 1 else "wrong"
            except InferenceServerException as error:
                return f"{error.status()} {error.message()}"

        time.sleep(2.5)  # the proxy's health checks have run twice (inter 1s, fall 2): a failing one shows now
        assert [call("steady-secret") for _ in range(6)] == ["ok"] * 6
        flood = [call("flood-secret") for _ in range(12)]
        refused = [outcome for outcome in flood if outcome != "ok"]
        assert 4 <= flood.count("ok") <= 8 and len(refused) + flood.count("ok") == 12, flood
        assert refused[0].startswith("StatusCode.RESOURCE_EXHAUSTED rate_limited: ") and "limit of 4" in refused[0]
        assert sum(served(replicas, domain)) - before == 6 + flood.count("ok")  # refusals reached no replica


def test_grpc_calls_naming_a_model_go_to_its_home_replica(fleet):
    """The proxy reads the model's name from the gRPC message (a large PIXELS body included, read before
    all of it has come) and hashes it as it hashes REST paths."""
    grpcclient = pytest.importorskip("tritonclient.grpc")

    _, replicas, names = fleet
    domains, listen = names[12:21], free_port()
    with running_proxy([r.port for r in replicas], free_port(), grpc=(listen, [r.grpc_port for r in replicas])):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{listen}")
        deadline = time.monotonic() + 30
        while not client.is_server_ready():
            assert time.monotonic() < deadline, "the proxy never passed gRPC on to a replica"
            time.sleep(0.2)
        side = client.get_model_metadata(domains[0], as_json=True)["inputs"][1]["shape"][1]
        pixels = np.random.default_rng(0).integers(0, 256, (32, int(side), int(side), 3), dtype=np.uint8)
        assert pixels.nbytes > 64 * 1024  # beyond what the proxy reads before it picks a replica
        tensor = grpcclient.InferInput("PIXELS", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels)
        before = {domain: served(replicas, domain) for domain in domains}
        for domain in domains:
            for _ in range(2):
                assert client.infer(domain, [tensor]).as_numpy("LOGITS").shape[0] == 32
    homes = []
    for domain in domains:
        gained = [after - b for after, b in zip(served(replicas, domain), before[domain])]
        assert sorted(gained) == [0.0, 0.0, 64.0], (domain, gained)  # one replica served all of them
        homes.append(gained.index(64.0))
    assert len(set(homes)) > 1, homes  # the domains are shared out over the replicas


def test_requests_are_retried_on_another_replica_when_one_is_gone(fleet):
    url, replicas, names = fleet
    with httpx.Client(timeout=60) as client:
        homes = {name: served(replicas, name).index(max(served(replicas, name))) for name in names[:12]}
        victim = replicas[homes[names[0]]]
        victim.stop(signal.SIGKILL)  # nothing in flight on it now: every request below must succeed
        codes = [predict(client, url, name) for _ in range(2) for name in names[:12]]
    assert codes == [200] * len(codes)
