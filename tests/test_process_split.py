"""`python -m service --workers 2`: one engine process fed by two front ends, as real processes on loopback.

Answers through every front end equal the engine alone, a registration is served by every front end on
the next request, bad input gets the same errors everywhere, a key's rate limit and the OIP statistics
are counted once for the host, the engine and a front end survive kill -9, and SIGTERM leaves no process
and no shared-memory segment behind.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from service_helpers import (
    ADMIN_TOKEN,
    AUTH,
    bundle_file,
    check_scores,
    get_assets,
    png_bytes,
    png_with_size,
    reference_engine,
    reference_logits,
)
from service_process import ServiceProcess

from service.frontend.access import hash_key

DOMAINS = ("alpha", "beta", "gamma")


def split_server(tmp_path_factory, name: str, extra_env: dict[str, str] | None = None) -> ServiceProcess:
    assets = get_assets(tmp_path_factory)
    store = tmp_path_factory.mktemp(name)
    env = {
        "RA_STORE_DIR": str(store),
        "RA_BACKBONE": str(assets.backbone_path),
        "RA_DEMO_ADAPTERS": "false",
        "RA_ADMIN_TOKEN": ADMIN_TOKEN,
        "RA_MAX_WAIT_MS": "2",
        "RA_PREPROCESS_THREADS": "1",
        **(extra_env or {}),
    }
    server = ServiceProcess(env, store.parent / f"{name}.log", workers=2)
    try:
        server.start().wait_ready()
        frontends(server.url)  # every front end answers
        with server.client() as client:
            for domain in DOMAINS:
                response = client.post("/adapters", headers=AUTH, files=bundle_file(assets.data(domain)))
                assert response.status_code == 201, response.text
    except BaseException:
        server.stop()
        raise
    return server


def fresh(method: str, url: str, **kwargs) -> httpx.Response:
    """A request on a new connection: the kernel picks the front end (SO_REUSEPORT)."""
    with httpx.Client(timeout=30) as client:
        return client.request(method, url, **kwargs)


def frontends(url: str, want: int = 2, timeout: float = 60) -> dict[int, dict]:
    """/readyz of every front end (by pid), once `want` of them have answered ready."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < want:
        assert time.monotonic() < deadline, f"only these front ends answered ready: {sorted(seen)}"
        response = fresh("GET", url + "/readyz")
        if response.status_code == 200:
            seen[response.json()["pid"]] = response.json()
    return seen


def processes_of(supervisor_pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(supervisor_pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    server = split_server(tmp_path_factory, "split-store", {"RA_LOG_FORMAT": "json", "RA_ACCESS_LOG": "true"})
    yield server
    server.stop()


def test_front_ends_the_supervisor_and_the_loaders_import_no_framework():
    code = (
        "import importlib, pkgutil, shutil, sys, service.frontend, service.supervisor, service.transport, "
        "service.engine.loader\n"
        "for m in pkgutil.walk_packages(service.frontend.__path__, 'service.frontend.'):\n"
        "    importlib.import_module(m.name)\n"
        "supervisor = service.supervisor.Supervisor('127.0.0.1', 0, 2, 'info')\n"
        "shutil.rmtree(supervisor.rundir)\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'jax', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out


def test_answers_through_every_front_end_equal_the_engine_alone(split, tmp_path_factory):
    assets = get_assets(tmp_path_factory)
    ref = reference_engine(assets)
    seen = frontends(split.url)
    engine_pids = {status["engine_pid"] for status in seen.values()}
    assert len(engine_pids) == 1 and engine_pids.isdisjoint(seen), seen  # one engine, another process
    for pid in seen:
        assert rss_mb(pid) < 200, f"front end {pid} holds {rss_mb(pid):.0f} MB"

    def ask(i: int) -> tuple[int, dict]:
        domain, image = DOMAINS[i % 3], png_bytes(900 + i)
        response = fresh("POST", f"{split.url}/predict/{domain}", files={"file": ("x.png", image)})
        assert response.status_code == 200, response.text
        return i, response.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # concurrent, so domains share batches
        answers = dict(pool.map(ask, range(48)))
    for i, body in answers.items():
        domain = DOMAINS[i % 3]
        check_scores(
            body["predictions"],
            reference_logits(ref, png_bytes(900 + i), assets.bundles[domain], domain),
            assets.bundles[domain].labels,
        )
    fanout = fresh(
        "POST", f"{split.url}/predict", files={"file": ("x.png", png_bytes(5))}, data={"domains": ",".join(DOMAINS)}
    )
    assert fanout.status_code == 200, fanout.text
    for result in fanout.json()["results"]:
        domain = result["domain"]
        check_scores(
            result["predictions"],
            reference_logits(ref, png_bytes(5), assets.bundles[domain], domain),
            assets.bundles[domain].labels,
        )
    metrics = fresh("GET", split.url + "/metrics").text  # the engine's counters, through any front end
    assert 'ra_predictions_total{domain="alpha"}' in metrics and "ra_batch_size_count" in metrics


def test_a_registration_is_served_by_every_front_end_on_the_next_request(split, tmp_path_factory):
    assets = get_assets(tmp_path_factory)
    frontends(split.url)  # every front end has answered (and holds its cards) before the change
    for version, data in ((1, assets.data("beta")), (2, assets.data("alt-beta"))):
        created = fresh(
            "POST",
            split.url + "/adapters",
            headers=AUTH,
            files=bundle_file(data),
            data={"domain": "fresh", "replace": "true"},
        )
        assert created.status_code == 201 and created.json()["version"] == version, created.text
        answered = set()
        for i in range(30):
            response = fresh("POST", f"{split.url}/predict/fresh", files={"file": ("x.png", png_bytes(i))})
            assert response.status_code == 200 and response.json()["version"] == version, response.text
            answered.add(fresh("GET", split.url + "/readyz").json()["pid"])
        assert len(answered) == 2


def loaders_of(engine_pid: int) -> list[int]:
    """The engine process's loader processes (its children but multiprocessing's resource tracker)."""
    return [
        p
        for p in processes_of(engine_pid)
        if b"resource_tracker" not in pathlib.Path(f"/proc/{p}/cmdline").read_bytes()
    ]


def cpu_ns(pid: int) -> int:
    """A process's CPU time so far in nanoseconds, over its threads (schedstat: a load is well under
    the 10 ms clock tick that /proc/PID/stat counts in)."""
    return sum(int((task / "schedstat").read_text().split()[0]) for task in pathlib.Path(f"/proc/{pid}/task").iterdir())


def test_bundles_are_validated_and_folded_in_loader_processes_without_the_framework(split, tmp_path_factory):
    assets = get_assets(tmp_path_factory)
    engine_pid = next(iter(frontends(split.url).values()))["engine_pid"]
    loaders = loaders_of(engine_pid)
    assert len(loaders) == 2, loaders  # RA_LOADER_PROCESSES's default
    for pid in loaders:
        assert "libtensorflow" not in pathlib.Path(f"/proc/{pid}/maps").read_text()
        assert rss_mb(pid) < 150, rss_mb(pid)
    before = sum(cpu_ns(p) for p in loaders)
    for i in range(10):
        created = fresh(
            "POST",
            split.url + "/adapters",
            headers=AUTH,
            files=bundle_file(assets.data("gamma")),
            data={"domain": f"loaded-{i}"},
        )
        assert created.status_code == 201, created.text
    # they did the validation and folding: 0.3 ms or more each; an idle loader waits on its pipe
    assert sum(cpu_ns(p) for p in loaders) - before > 10 * 100_000

    os.kill(loaders[0], signal.SIGKILL)  # a loader that dies is replaced; a registration is refused, not lost
    outcomes = []
    for i in range(6):
        response = fresh(
            "POST",
            split.url + "/adapters",
            headers=AUTH,
            files=bundle_file(assets.data("gamma")),
            data={"domain": f"after-kill-{i}"},
        )
        outcomes.append((response.status_code, response.json().get("error")))
    assert set(outcomes) <= {(201, None), (503, "adapter_unavailable")}, outcomes
    assert outcomes[-1] == (201, None), outcomes
    replaced = loaders_of(engine_pid)
    assert len(replaced) == 2 and loaders[0] not in replaced, (loaders, replaced)
    listed = {a["domain"] for a in fresh("GET", split.url + "/adapters?limit=100").json()["adapters"]}
    assert {f"after-kill-{i}" for i, o in enumerate(outcomes) if o[0] == 201} <= listed


def test_bad_input_gets_the_same_errors_through_every_front_end(split):
    cases = [
        ("POST", "/predict/alpha", {"files": {"file": ("big.png", png_with_size(9000, 9000))}}, 413),
        ("POST", "/predict/alpha", {"content": png_bytes(1), "headers": {"content-type": "image/png"}}, 415),
        ("POST", "/predict/nope", {"files": {"file": ("x.png", png_bytes(1))}}, 404),
        ("POST", "/adapters", {"files": bundle_file(b"not a bundle" * 100), "headers": AUTH}, 422),
        ("POST", "/adapters", {"files": bundle_file(b"x" * 100)}, 401),
    ]
    for method, path, kwargs, status in cases:
        bodies = {fresh(method, split.url + path, **kwargs).text for _ in range(8)}
        assert len(bodies) == 1, bodies  # the same answer from whichever front end took it
        response = fresh(method, split.url + path, **kwargs)
        assert response.status_code == status and set(response.json()) == {"error", "detail"}, response.text


def test_every_process_logs_json_and_the_access_line_names_the_request(split):
    answer = fresh(
        "POST",
        split.url + "/predict/alpha",
        headers={"X-Request-ID": "trace-me-1"},
        files={"file": ("x.png", png_bytes(1))},
    )
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "trace-me-1"
    time.sleep(0.5)
    records = [json.loads(line) for line in split.log_tail(10**7).splitlines() if line.startswith("{")]
    assert {"service", "front end", "engine"} <= {r["process"] for r in records}
    (access,) = [r for r in records if r.get("request_id") == "trace-me-1"]
    assert access["logger"] == "service.access" and access["status"] == 200 and access["domain"] == "alpha"
    assert access["route"] == "/predict/{domain}" and access["tenant"] == "anonymous" and access["ms"] > 0


def test_oip_statistics_count_the_requests_of_every_front_end(split, tmp_path_factory):
    size = get_assets(tmp_path_factory).backbone.config.input_size
    url = f"{split.url}/v2/models/gamma"

    def counts() -> set[tuple[int, int]]:  # (inferences, executions) as each answering front end tells them
        answers = [fresh("GET", url + "/stats").json()["model_stats"][0] for _ in range(8)]
        return {(a["inference_count"], a["execution_count"]) for a in answers}

    before = counts()
    assert len(before) == 1, before
    ((inferences, executions),) = before
    pixels = {
        "inputs": [
            {
                "name": "PIXELS",
                "datatype": "UINT8",
                "shape": [2, size, size, 3],
                "data": [i % 256 for i in range(2 * size * size * 3)],
            }
        ]
    }
    for _ in range(10):  # each on a new connection: the kernel spreads them over both front ends
        response = fresh("POST", url + "/infer", json=pixels)
        assert response.status_code == 200, response.text
    assert counts() == {(inferences + 20, executions + 10)}  # whichever front end answers


def test_a_keys_rate_limit_holds_once_for_every_front_end(tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("split-keys") / "keys.json"
    keys_file.write_text(
        json.dumps(
            {
                "keys": [
                    {
                        "name": "slow",
                        "key_sha256": hash_key("key-slow-0123456789"),
                        "domains": ["*"],
                        "rate_per_s": 0.05,
                        "burst": 3,
                    }
                ]
            }
        )
    )
    server = split_server(tmp_path_factory, "rate-limit-store", {"RA_API_KEYS_FILE": str(keys_file)})
    try:
        frontends(server.url)  # both serve
        # 12 new connections: with a bucket per front end, 3 + 3 would pass unless one front end got fewer
        # than 3 of them (odds about 4%); with one per host, exactly the burst passes (no refill for 20 s)
        answers = [
            fresh("GET", server.url + "/adapters", headers={"Authorization": "Bearer key-slow-0123456789"})
            for _ in range(12)
        ]
    finally:
        server.stop()
    assert [a.status_code for a in answers] == [200] * 3 + [429] * 9, [a.text for a in answers]
    for refused in answers[3:]:
        assert refused.json()["error"] == "rate_limited" and 1 <= int(refused.headers["retry-after"]) <= 20


def load(url: str, stop: threading.Event, statuses: list, domain: str = "alpha") -> None:
    """Requests until `stop`, recording (status, error code) of each; connection failures as 'refused'."""
    i = 0
    with httpx.Client(timeout=20) as client:
        while not stop.is_set():
            i += 1
            try:
                response = client.post(f"{url}/predict/{domain}", files={"file": ("x.png", png_bytes(i % 5))})
                code = response.json().get("error") if response.status_code != 200 else None
                statuses.append((response.status_code, code, response.headers.get("retry-after")))
            except httpx.HTTPError:
                statuses.append(("refused", None, None))


def test_engine_kill_9_under_load_answers_503_then_recovers(tmp_path_factory):
    server = split_server(tmp_path_factory, "kill-engine-store")
    try:
        engine_pid = next(iter(frontends(server.url).values()))["engine_pid"]
        loaders = loaders_of(engine_pid)
        assert loaders
        stop, statuses = threading.Event(), []
        threads = [threading.Thread(target=load, args=(server.url, stop, statuses)) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        os.kill(engine_pid, signal.SIGKILL)
        killed = time.monotonic()
        saw_not_ready = saw_down = False
        while True:
            ready = fresh("GET", server.url + "/readyz")
            saw_not_ready |= ready.status_code == 503
            if ready.status_code == 503 and not saw_down:  # what the alert on an engine down reads
                saw_down = "\nra_engine_unreachable 1.0\n" in fresh("GET", server.url + "/metrics").text
            if ready.status_code == 200 and ready.json()["engine_pid"] not in (None, engine_pid):
                break
            assert time.monotonic() - killed < 60, "the engine was not ready again within 60 s"
            time.sleep(0.1)
        recovered = time.monotonic() - killed
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
        failed = [s for s in statuses if s[0] != 200]
        assert failed, "the kill never showed"
        assert all(s == (503, "engine_unavailable", "1") for s in failed), sorted(set(failed))
        assert statuses[-1][0] == 200  # traffic resumed
        assert saw_not_ready and saw_down
        deadline = time.monotonic() + 10  # every front end reports its engine again within a second or two
        while "\nra_engine_unreachable 0.0\n" not in (metrics := fresh("GET", server.url + "/metrics").text):
            assert time.monotonic() < deadline, "ra_engine_unreachable stayed 1 after the engine came back"
            time.sleep(0.2)
        assert "\nra_engine_starts_total 2.0\n" in metrics
        assert re.search(r'^ra_errors_total\{code="engine_unavailable"\} [1-9]', metrics, re.M)
        listed = {a["domain"] for a in fresh("GET", server.url + "/adapters").json()["adapters"]}
        assert listed >= set(DOMAINS)  # nothing recorded was lost
        assert not [p for p in loaders if alive(p)], "a loader outlived its engine process"
        print(f"engine kill -9: {len(failed)} of {len(statuses)} requests got 503; ready again in {recovered:.1f} s")
    finally:
        server.stop()


def test_front_end_kill_9_leaves_the_other_serving_and_is_restarted(tmp_path_factory):
    server = split_server(tmp_path_factory, "kill-frontend-store")
    try:
        before = frontends(server.url)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        for i in range(20):  # the other front end answers meanwhile
            response = fresh("POST", f"{server.url}/predict/beta", files={"file": ("x.png", png_bytes(i))})
            assert response.status_code == 200, response.text
        after = frontends(server.url, timeout=90)
        assert victim not in after and len(after) == 2
        arenas = [n for n in os.listdir("/dev/shm") if n.startswith(f"ra-{server.proc.pid}-fe")]
        assert len(arenas) == 2, arenas  # the killed one's arena was removed, its successor made its own
        engine = next(iter(after.values()))["engine_pid"]
        deadline = time.monotonic() + 20  # and the engine process lets go of the removed one's memory
        removed = f"/dev/shm/ra-{server.proc.pid}-fe"  # (not its loader pool's unlinked semaphores, /dev/shm/sem.*)
        while [
            m
            for m in pathlib.Path(f"/proc/{engine}/maps").read_text().splitlines()
            if removed in m and m.endswith("(deleted)")
        ]:
            assert time.monotonic() < deadline, "the engine still maps a removed arena"
            time.sleep(0.5)
    finally:
        server.stop()


def test_sigterm_finishes_in_flight_requests_and_leaves_nothing_behind(tmp_path_factory):
    server = split_server(tmp_path_factory, "sigterm-store")
    supervisor = server.proc.pid
    try:
        children = processes_of(supervisor)
        assert len(children) >= 3, children  # the engine, two front ends (and multiprocessing's resource tracker)
        assert [n for n in os.listdir("/dev/shm") if n.startswith(f"ra-{supervisor}-")]
        files = [("file", (f"{i}.png", png_bytes(i, (200, 200)), "image/png")) for i in range(16)]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            sent = [pool.submit(fresh, "POST", f"{server.url}/predict/gamma", files=files) for _ in range(6)]
            time.sleep(0.3)  # they are in flight
            assert server.stop(signal.SIGTERM, timeout=60) == 0
        outcomes = []
        for future in sent:
            try:
                outcomes.append(future.result().status_code)
            except httpx.TransportError as exc:  # not yet accepted when the port closed
                outcomes.append(type(exc).__name__)
    finally:
        server.stop(signal.SIGKILL)  # nothing left when an assertion above failed (a no-op after SIGTERM)
    assert 200 in outcomes and not [o for o in outcomes if isinstance(o, int) and o != 200], outcomes
    deadline = time.monotonic() + 10  # multiprocessing's resource tracker ends once the supervisor has
    while [p for p in children if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if alive(p)], "a child outlived the supervisor"
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"ra-{supervisor}-")]


def test_a_service_killed_whole_leaves_arenas_that_the_next_start_reclaims(tmp_path_factory):
    """kill -9 of every process (the OOM killer's way) runs no clean-up: the arenas stay in /dev/shm until the
    next supervisor starts, which removes those of supervisors that are gone and says how much it freed."""
    killed = split_server(tmp_path_factory, "killed-whole-store")
    supervisor = killed.proc.pid
    arenas = [pathlib.Path("/dev/shm", n) for n in os.listdir("/dev/shm") if n.startswith(f"ra-{supervisor}-")]
    assert len(arenas) == 2, arenas
    killed.stop(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in processes_of(supervisor)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(path.exists() for path in arenas), "kill -9 should have left the arenas (else this proves nothing)"
    starting = split_server(tmp_path_factory, "after-kill-store")
    try:
        assert not [path for path in arenas if path.exists()]
        log = starting.log_path.read_text()
        assert "reclaimed" in log and "2 arenas" in log, log[-4000:]
        assert len([n for n in os.listdir("/dev/shm") if n.startswith(f"ra-{starting.proc.pid}-")]) == 2
    finally:
        starting.stop()
