"""A real Prometheus (Debian's `prometheus`) with the shipped config and rules, scraping a real
`python -m service --workers 2`: the recording rules give what was sent, every panel query of the shipped
Grafana dashboard answers, and an engine killed with kill -9 makes RAEngineDown pending.

One host is one target (any front end answers for all of its processes), so a rule that double-counted
the front ends, or took a rate over a gauge, would be off by far more than the 10% allowed here.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time

import httpx
import pytest
import yaml
from conftest import unavailable
from service_process import ServiceProcess, free_port

from service.frontend.access import hash_key

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "residual-adapters.json"
IMAGE = (ROOT / "service" / "demo" / "sample-ankle-boot.png").read_bytes()
DOMAINS = ("fashion", "digits", "catsdogs")  # the demo's; two fit (RA_MAX_RESIDENT): loads and evictions
SCRAPER, SHOP, LAB = "scraper-secret", "shop-secret", "lab-secret"

pytestmark = pytest.mark.slow


def prometheus_binary() -> str:
    return shutil.which("prometheus") or unavailable("prometheus is not installed (apt-get install prometheus)")


class Prometheus:
    """Prometheus on a free loopback port with the shipped config, its intervals cut to 0.5 s and its one
    target the service under test (scraped with an admin key, as the shipped config says to)."""

    def __init__(self, binary: str, workdir: pathlib.Path, target: str, token_file: pathlib.Path):
        config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="500ms", evaluation_interval="500ms")
        config["rule_files"] = [str(PROMETHEUS / name) for name in config["rule_files"]]
        (job,) = config["scrape_configs"]
        job["static_configs"] = [{"targets": [target]}]
        job["authorization"] = {"type": "Bearer", "credentials_file": str(token_file)}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.logfile = workdir / "prometheus.log"
        deadline = time.monotonic() + 30
        while not self._ready():
            assert self.proc.poll() is None, self.logfile.read_text()
            assert time.monotonic() < deadline, "Prometheus was not ready in 30 s:\n" + self.logfile.read_text()
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return httpx.get(self.url + "/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        body = httpx.get(self.url + "/api/v1/query", params=params, timeout=10).json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def value(self, expr: str, at: float | None = None) -> float:
        result = self.query(expr, at)
        assert len(result) == 1, f"{expr} answered {result}"
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, timeout: float = 20) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not (result := self.query(expr)):
            assert time.monotonic() < deadline, f"{expr} answered nothing within {timeout} s"
            time.sleep(0.3)
        return result

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    binary = prometheus_binary()
    work = tmp_path_factory.mktemp("prometheus-live")
    keys = work / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "keys": [
                    {"name": "scraper", "key_sha256": hash_key(SCRAPER), "admin": True},
                    {"name": "shop", "key_sha256": hash_key(SHOP), "domains": ["*"], "rate_per_s": 2, "burst": 2},
                    {"name": "lab", "key_sha256": hash_key(LAB), "domains": ["*"]},
                ]
            }
        )
    )
    token = work / "scraper.token"
    token.write_text(SCRAPER)
    server = ServiceProcess(
        {
            "RA_STORE_DIR": str(work / "store"),
            "RA_API_KEYS_FILE": str(keys),
            "RA_MAX_RESIDENT": "2",
            "RA_PREPROCESS_THREADS": "1",
        },
        work / "service.log",
        workers=2,
    )
    server.start().wait_ready()
    prometheus = None
    try:
        prometheus = Prometheus(binary, work, f"127.0.0.1:{server.port}", token)
        yield server, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()


def predict(client: httpx.Client, key: str, domain: str) -> int:
    response = client.post(
        f"/predict/{domain}", headers={"Authorization": f"Bearer {key}"}, files={"file": ("x.png", IMAGE)}
    )
    return response.status_code


def traffic(url: str, rounds: int) -> tuple[int, int]:
    """Four clients (their connections spread over both front ends): `lab` through the three domains and
    one unknown, `shop` over its rate. Returns (requests sent, images classified)."""

    def client_run(_: int) -> list[int]:
        statuses = []
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in range(rounds):
                statuses.append(predict(client, LAB, DOMAINS[i % 3]))
                if i % 5 == 0:
                    statuses.append(predict(client, LAB, "no-such-domain"))
                    statuses.append(predict(client, SHOP, "fashion"))
        return statuses

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = [s for run in pool.map(client_run, range(4)) for s in run]
    assert set(statuses) <= {200, 404, 429}, statuses
    assert 429 in statuses
    return len(statuses), statuses.count(200)


def scraped_requests(prometheus: Prometheus, at: float) -> float:
    """The service's own /metrics answers in the rules' window (each scrape is a request it counts)."""
    return prometheus.value('sum(count_over_time(up{job="residual-adapters"}[1m]))', at) - 1


def test_rules_panels_and_the_engine_down_alert(stack):
    server, prometheus = stack
    with httpx.Client(base_url=server.url, timeout=30) as client:  # every series exists before the window
        assert [predict(client, LAB, d) for d in DOMAINS] == [200] * 3
        assert predict(client, LAB, "nope") == predict(client, SHOP, "nope") == 404
        assert {predict(client, SHOP, "fashion") for _ in range(3)} == {200, 429}  # its burst is 2
    # rate() extrapolates a series that starts inside its window by half an interval and up to one more at
    # its end: 30 samples (15 s) before the traffic keep that to a few percent of the window's increase
    prometheus.wait_for('count_over_time(ra_predictions_total{domain="catsdogs"}[1m]) >= 30', timeout=40)

    sent, images = traffic(server.url, rounds=40)
    time.sleep(1.5)  # two more scrapes, and a rule evaluation after them
    at = time.time()
    per_s = prometheus.value("instance:ra_requests:rate1m", at)
    expected = (sent + scraped_requests(prometheus, at)) / 60
    print(f"instance:ra_requests:rate1m {per_s:.3f}/s for {expected:.3f}/s sent")
    assert per_s == pytest.approx(expected, rel=0.1), (per_s, expected)
    assert prometheus.value("instance:ra_images:rate1m", at) == pytest.approx(images / 60, rel=0.1)
    assert prometheus.value("instance:ra_request_errors:ratio_rate5m", at) == 0  # 404 and 429 are not 5xx
    limited = {
        r["metric"]["key"]: float(r["value"][1]) for r in prometheus.query("key:ra_key_requests_limited:ratio_rate5m")
    }
    assert limited["shop"] > 0.2 and limited["lab"] == 0, limited
    assert 0 < prometheus.value("instance:ra_adapter_device_hits:ratio_rate5m", at) < 1  # 3 domains, 2 fit
    assert prometheus.value("instance:ra_adapter_loads:rate5m", at) > 0

    dashboard = json.loads(DASHBOARD.read_text())
    silent = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
            if not prometheus.query(expr):
                silent.append(f"{panel['title']}: {expr}")
    assert not silent, "dashboard queries that answered nothing:\n" + "\n".join(silent)

    engine_pid = httpx.get(server.url + "/readyz", timeout=5).json()["engine_pid"]
    os.kill(engine_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        alerts = httpx.get(prometheus.url + "/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        states = {a["labels"]["alertname"]: a["state"] for a in alerts}
        if states.get("RAEngineDown") in ("pending", "firing"):
            break
        assert time.monotonic() < deadline, f"RAEngineDown did not become pending in 30 s: {states}"
        time.sleep(0.3)
    assert re.fullmatch(
        r"127\.0\.0\.1:\d+", next(a for a in alerts if a["labels"]["alertname"] == "RAEngineDown")["labels"]["instance"]
    )
