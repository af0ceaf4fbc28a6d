"""A fleet on one registry of record: three real replicas (`python -m service` processes) on a real,
throwaway PostgreSQL cluster, and two workers on one port over the directory registry.

Every replica must converge on the record: registrations, replacements, rollbacks and deletes made
on any replica are served by all of them at the same version; concurrent registrations resolve in
the database; a database restart under traffic fails no prediction; a replica killed in the middle
of an upload leaves nothing behind. The tests in this module run in file order on one fleet.
"""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time

import httpx
import pytest
from service_helpers import ADMIN_TOKEN, AUTH, bundle_file, check_scores, png_bytes, reference_logits, stalled_upload
from service_process import ServiceProcess

CONVERGE_S = 10.0  # generous bound for every replica to follow a change (measured: tens of ms)


def replica_env(assets, cluster) -> dict[str, str]:
    return {
        "RA_BACKBONE": str(assets.backbone_path),
        "RA_REGISTRY_URL": cluster.url,
        "RA_DEMO_ADAPTERS": "false",
        "RA_ADMIN_TOKEN": ADMIN_TOKEN,
        "RA_MAX_WAIT_MS": "2",
        "RA_PREPROCESS_THREADS": "1",
    }


@pytest.fixture(scope="module")
def fleet(assets, cluster, tmp_path_factory):
    logs = tmp_path_factory.mktemp("fleet-logs")
    replicas = {name: ServiceProcess(replica_env(assets, cluster), logs / f"{name}.log") for name in "ABC"}
    for replica in replicas.values():
        replica.start()
    try:
        for replica in replicas.values():
            replica.wait_ready()
        yield replicas
    finally:
        for replica in replicas.values():
            replica.stop(signal.SIGKILL)


def served_version(replica: ServiceProcess, domain: str) -> int | None:
    response = httpx.get(f"{replica.url}/adapters/{domain}", timeout=10)
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    return response.json()["version"]


def converge(replicas, domain: str, version: int | None) -> None:
    """Wait until every replica serves `domain` at `version` (None: not at all)."""
    deadline = time.monotonic() + CONVERGE_S
    while True:
        seen = {name: served_version(r, domain) for name, r in replicas.items()}
        if set(seen.values()) == {version}:
            return
        assert time.monotonic() < deadline, f"replicas did not converge on {domain} v{version}: {seen}"
        time.sleep(0.05)


def predicts_like(replica, domain: str, version: int, bundle, engine_domain: str, ref, seed: int) -> None:
    image = png_bytes(seed)
    response = httpx.post(f"{replica.url}/predict/{domain}", files={"file": ("x.png", image)}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == version
    check_scores(response.json()["predictions"], reference_logits(ref, image, bundle, engine_domain), bundle.labels)


def register(replica, data: bytes, domain: str, replace: bool = False) -> httpx.Response:
    return httpx.post(
        f"{replica.url}/adapters",
        headers=AUTH,
        files=bundle_file(data),
        data={"domain": domain, "replace": str(replace).lower()},
        timeout=60,
    )


def test_every_change_on_any_replica_reaches_all(fleet, cluster, assets, ref, tmp_path_factory):
    a, b, c = fleet["A"], fleet["B"], fleet["C"]
    created = register(a, assets.data("alpha"), "shared")
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1
    for seed, replica in enumerate((b, c)):  # served at once on the others: no 404 for a registered domain
        predicts_like(replica, "shared", 1, assets.bundles["alpha"], "alpha", ref, seed)
    converge(fleet, "shared", 1)

    replaced = register(b, assets.data("alt-alpha"), "shared", replace=True)
    assert replaced.status_code == 201 and replaced.json()["version"] == 2, replaced.text
    converge(fleet, "shared", 2)
    for seed, replica in enumerate(fleet.values()):
        predicts_like(replica, "shared", 2, assets.alt["alpha"], "alt-alpha", ref, 10 + seed)
    info = httpx.get(f"{a.url}/adapters/shared").json()
    assert info["version"] == info["record_version"] == 2

    back = httpx.post(f"{c.url}/adapters/shared/rollback", headers=AUTH, timeout=60)
    assert back.status_code == 200 and back.json()["version"] == 1, back.text
    converge(fleet, "shared", 1)
    predicts_like(a, "shared", 1, assets.bundles["alpha"], "alpha", ref, 20)

    assert register(a, assets.data("beta"), "kept").status_code == 201
    gone = httpx.delete(f"{a.url}/adapters/shared", headers=AUTH, timeout=60)
    assert gone.status_code == 200, gone.text
    converge(fleet, "shared", None)
    for replica in fleet.values():
        response = httpx.post(f"{replica.url}/predict/shared", files={"file": ("x.png", png_bytes(1))})
        assert response.status_code == 404 and response.json()["error"] == "unknown_domain"

    late = ServiceProcess(replica_env(assets, cluster), tmp_path_factory.mktemp("late") / "D.log")
    late.start().wait_ready()
    try:
        listing = {x["domain"]: x["version"] for x in httpx.get(f"{late.url}/adapters").json()["adapters"]}
        assert listing == {"kept": 1}
        predicts_like(late, "kept", 1, assets.bundles["beta"], "beta", ref, 30)
    finally:
        late.stop(signal.SIGKILL)


def test_concurrent_registrations_resolve_in_the_database(fleet, assets):
    replicas = list(fleet.values()) * 2
    with concurrent.futures.ThreadPoolExecutor(len(replicas)) as pool:
        codes = sorted(pool.map(lambda r: register(r, assets.data("gamma"), "race").status_code, replicas))
    assert codes == [201] + [409] * (len(replicas) - 1)
    converge(fleet, "race", 1)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda r: register(r, assets.data("alt-gamma"), "race", replace=True), fleet.values()))
    assert all(r.status_code == 201 for r in answers), [r.text for r in answers]
    versions = sorted(r.json()["version"] for r in answers)
    assert versions == [2, 3, 4]  # distinct, increasing
    converge(fleet, "race", 4)  # every replica ends on the highest


def until_every_replica(fleet, domain: str, status: int) -> None:
    """Wait until a prediction for `domain` answers `status` on every replica."""
    deadline = time.monotonic() + CONVERGE_S
    for replica in fleet.values():
        while (
            code := httpx.post(
                f"{replica.url}/predict/{domain}", files={"file": ("x.png", png_bytes(2))}, timeout=30
            ).status_code
        ) != status:
            assert time.monotonic() < deadline, f"{replica.url}: {domain} answers {code}, not {status}"
            time.sleep(0.05)


def test_unload_and_load_again_reach_every_replica(fleet):
    a, c = fleet["A"], fleet["C"]
    until_every_replica(fleet, "kept", 200)
    assert httpx.post(f"{a.url}/v2/repository/models/kept/unload", headers=AUTH, timeout=30).status_code == 200
    until_every_replica(fleet, "kept", 409)  # kept in the registry, served nowhere
    assert httpx.post(f"{c.url}/v2/repository/models/kept/load", headers=AUTH, json={}, timeout=30).status_code == 200
    until_every_replica(fleet, "kept", 200)


def test_database_restart_under_traffic_fails_no_prediction(fleet, cluster, assets):
    stop = threading.Event()
    outcomes: list[int | str] = []

    def traffic(replica, offset: int):
        with replica.client() as client:
            i = 0
            while not stop.is_set():
                domain = ("kept", "race")[(i + offset) % 2]
                try:
                    response = client.post(f"/predict/{domain}", files={"file": ("x.png", png_bytes(i % 5))})
                    outcomes.append(response.status_code)
                except httpx.HTTPError as exc:
                    outcomes.append(repr(exc))
                i += 1

    threads = [threading.Thread(target=traffic, args=(r, i)) for i, r in enumerate(fleet.values())]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        cluster.stop("fast")
        a = fleet["A"]
        refused = register(a, assets.data("beta"), "during")
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "registry_unavailable" and refused.headers["Retry-After"]
        time.sleep(0.5)
        ready = httpx.get(f"{a.url}/readyz").json()
        assert ready["ready"] and ready["registry"]["connected"] is False, ready  # serving goes on
        time.sleep(1.0)
        cluster.start()
        deadline = time.monotonic() + 20
        while (answer := register(a, assets.data("beta"), "after")).status_code == 503:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.1)
        assert answer.status_code == 201, answer.text
        converge(fleet, "after", 1)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert outcomes and set(outcomes) == {200}, {o: outcomes.count(o) for o in set(outcomes)}
    for replica in fleet.values():
        sync = httpx.get(f"{replica.url}/readyz").json()["registry"]
        assert sync["connected"] and sync["domains_behind"] == [], sync
    converge(fleet, "during", None)  # refused during the outage: nothing recorded
    converge(fleet, "kept", 1)


def test_replica_killed_during_an_upload_leaves_nothing(fleet, assets, cluster):
    a = fleet["A"]
    with stalled_upload(a.url, assets.data("beta"), "half") as outcome:
        time.sleep(0.3)  # let the server read the first chunk
        a.stop(signal.SIGKILL)
    assert outcome and not isinstance(outcome[0], int), outcome
    a.start().wait_ready()
    converge(fleet, "half", None)
    converge(fleet, "after", 1)  # the restarted replica caught up
