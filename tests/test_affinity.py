"""The fleet's proxy: the shipped HAProxy configuration (deploy/haproxy.cfg, its servers swapped for three
real replicas on loopback) routes each domain to one home replica, spills a hot domain over to the
others, sends requests without a domain anywhere, and retries on another replica what it could not
send to a dead one."""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import signal
import subprocess

import httpx
import pytest

from bench.affinity import served_by
from bench.domains import seed
from bench.haproxy import HAPROXY, REPO, running_proxy
from service_helpers import png_bytes
from service_process import ServiceProcess, free_port

DOMAINS = 24


def need_haproxy() -> None:
    if not pathlib.Path(HAPROXY).exists():
        if os.environ.get("CI"):
            pytest.fail("CI is set but HAProxy is not installed (apt-get install haproxy)")
        pytest.skip("HAProxy is not installed (apt-get install haproxy)")


def test_the_shipped_configuration_is_valid():
    need_haproxy()
    result = subprocess.run([HAPROXY, "-c", "-f", str(REPO / "deploy" / "haproxy.cfg")], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    need_haproxy()
    tmp = tmp_path_factory.mktemp("affinity")
    store = tmp / "store"
    store.mkdir()
    names = seed(store, DOMAINS)
    env = {"RA_STORE_DIR": str(store), "RA_DEMO_ADAPTERS": "false", "RA_PREPROCESS_THREADS": "1",
           "RA_MAX_WAIT_MS": "2"}
    replicas = [ServiceProcess(env, tmp / f"replica{i}.log") for i in range(3)]
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
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=48)) as client, \
            concurrent.futures.ThreadPoolExecutor(48) as pool:
        codes = list(pool.map(lambda _: predict(client, url, hot), range(480)))
    assert codes == [200] * 480
    gained = [after - b for after, b in zip(served(replicas, hot), before)]
    assert sum(gained) == 480 and sorted(gained)[-2] > 0, gained  # the home replica did not take it all


def test_requests_are_retried_on_another_replica_when_one_is_gone(fleet):
    url, replicas, names = fleet
    with httpx.Client(timeout=60) as client:
        homes = {name: served(replicas, name).index(max(served(replicas, name))) for name in names[:12]}
        victim = replicas[homes[names[0]]]
        victim.stop(signal.SIGKILL)  # nothing in flight on it now: every request below must succeed
        codes = [predict(client, url, name) for _ in range(2) for name in names[:12]]
    assert codes == [200] * len(codes)
