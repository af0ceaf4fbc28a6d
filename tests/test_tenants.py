"""Tenants: API keys with domain scopes (RA_API_KEYS_FILE), in-process with the whole app.

Every key x every domain x every endpoint: exactly the allowed cells succeed, and a denied cell answers
byte for byte like a domain that does not exist. Also: listings, management, rate limits, audit lines,
per-key metrics, and the keys file reloaded (or kept, when it turns bad) while serving.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_helpers import ADMIN_TOKEN, bundle_file, png_bytes
from service_process import REPO

from service.boot import single_process_app
from service.frontend.access import KeysFileError, hash_key
from service.settings import Settings

KEYS = {  # name -> (secret, patterns, admin)
    "acme": ("key-acme-0123456789", ["acme-*"], False),
    "beta": ("key-beta-0123456789", ["beta-*", "shared"], False),
    "ops": ("key-ops-0123456789", ["*"], True),
    "viewer": ("key-viewer-0123456789", [], False),
}
DOMAINS = {"acme-one": "alpha", "acme-two": "beta", "beta-one": "gamma", "shared": "alpha", "other": "beta"}
CALLERS = {**{name: secret for name, (secret, _, _) in KEYS.items()}, "admin-token": ADMIN_TOKEN}
ADMIN_CALLERS = {"ops", "admin-token"}


def keys_json(keys: dict = KEYS, **extra) -> str:
    entries = [
        {"name": name, "key_sha256": hash_key(secret), "domains": patterns, "admin": admin, **extra.get(name, {})}
        for name, (secret, patterns, admin) in keys.items()
    ]
    return json.dumps({"keys": entries})


def auth(caller: str | None) -> dict:
    return {} if caller is None else {"Authorization": f"Bearer {CALLERS.get(caller, caller)}"}


def sees(caller: str, domain: str) -> bool:
    if caller == "admin-token":
        return True
    return any(fnmatch.fnmatchcase(domain, p) for p in KEYS[caller][1])


def settings_for(assets, tmp: pathlib.Path, keys_file: pathlib.Path, **changes) -> Settings:
    values = {
        "backbone": assets.backbone_path,
        "store_dir": tmp / "store",
        "demo_adapters": False,
        "admin_token": ADMIN_TOKEN,
        "api_keys_file": keys_file,
        "api_keys_poll_s": 0.05,
        "max_wait_ms": 1,
        "max_batch_size": 4,
        "device_memory_mb": 64,
        "preprocess_threads": 2,
    }
    values.update(changes)
    return Settings(**values)


@contextlib.contextmanager
def serving(settings: Settings):
    with TestClient(single_process_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def tenants(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tenants")
    keys_file = tmp / "keys.json"
    keys_file.write_text(keys_json())
    with serving(settings_for(assets, tmp, keys_file)) as client:
        for domain, source in DOMAINS.items():
            response = client.post(
                "/adapters",
                files=bundle_file(assets.data(source)),
                data={"domain": domain},
                headers=auth("admin-token"),
            )
            assert response.status_code == 201, response.text
        yield client


def pixels_request(size: int) -> dict:
    data = np.random.default_rng(0).integers(0, 256, (1, size, size, 3)).reshape(-1).tolist()
    return {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, size, size, 3], "data": data}]}


def endpoints(client, assets) -> dict:
    """endpoint -> call(domain, headers) -> response, for every endpoint that names a domain."""
    pixels = pixels_request(assets.backbone.config.input_size)
    image = png_bytes(1)

    return {
        "predict": lambda d, h: client.post(f"/predict/{d}", files={"file": ("x.png", image)}, headers=h),
        "fanout": lambda d, h: client.post(
            "/predict", files={"file": ("x.png", image)}, data={"domains": d}, headers=h
        ),
        "describe": lambda d, h: client.get(f"/adapters/{d}", headers=h),
        "oip-metadata": lambda d, h: client.get(f"/v2/models/{d}", headers=h),
        "oip-ready": lambda d, h: client.get(f"/v2/models/{d}/ready", headers=h),
        "oip-stats": lambda d, h: client.get(f"/v2/models/{d}/stats", headers=h),
        "oip-infer": lambda d, h: client.post(f"/v2/models/{d}/infer", json=pixels, headers=h),
    }


def test_every_key_every_domain_every_endpoint(tenants, assets):
    calls = endpoints(tenants, assets)
    ghost = "zz-ghost"  # exists nowhere: the answer every denied cell must give
    unknown = {name: call(ghost, auth("admin-token")) for name, call in calls.items()}
    for name, response in unknown.items():
        assert response.status_code == 404, (name, response.text)
    cells = 0
    for caller in CALLERS:
        for domain in DOMAINS:
            for name, call in calls.items():
                response = call(domain, auth(caller))
                cells += 1
                if sees(caller, domain):
                    assert response.status_code == 200, (caller, domain, name, response.text)
                else:
                    expected = unknown[name]
                    assert response.status_code == 404, (caller, domain, name, response.text)
                    assert response.content == expected.content.replace(ghost.encode(), domain.encode())
                    assert response.headers["content-type"] == expected.headers["content-type"]
    assert cells == len(CALLERS) * len(DOMAINS) * len(calls)


@pytest.mark.parametrize("caller", list(CALLERS))
def test_listing_and_fanout_all_show_only_the_keys_domains(tenants, caller):
    visible = sorted(d for d in DOMAINS if sees(caller, d))
    listed = tenants.get("/adapters", headers=auth(caller))
    assert listed.status_code == 200
    assert [a["domain"] for a in listed.json()["adapters"]] == visible
    paged, cursor = [], None
    while True:  # one at a time: pages stay full and cursors work within the scope
        page = tenants.get(
            "/adapters", params={"limit": 1, **({"cursor": cursor} if cursor else {})}, headers=auth(caller)
        ).json()
        paged += [a["domain"] for a in page["adapters"]]
        if not (cursor := page["next_cursor"]):
            break
    assert paged == visible
    assert [
        a["domain"]
        for a in tenants.get("/adapters", params={"prefix": "acme-"}, headers=auth(caller)).json()["adapters"]
    ] == [d for d in visible if d.startswith("acme-")]
    fanout = tenants.post(
        "/predict", files={"file": ("x.png", png_bytes(2))}, data={"domains": "all"}, headers=auth(caller)
    )
    if visible:
        assert sorted(r["domain"] for r in fanout.json()["results"]) == visible
    else:
        assert fanout.status_code == 400 and fanout.json()["error"] == "no_domains"


def test_a_fanout_naming_a_hidden_domain_is_refused_whole(tenants):
    response = tenants.post(
        "/predict", files={"file": ("x.png", png_bytes(2))}, data={"domains": "acme-one,beta-one"}, headers=auth("acme")
    )
    assert response.status_code == 404 and "'beta-one'" in response.json()["detail"]


@pytest.mark.parametrize("caller", [None, "wrong-key", *CALLERS])
def test_management_needs_an_admin_key(tenants, assets, caller):
    calls = {
        "register": lambda h: tenants.post(
            "/adapters", files=bundle_file(assets.data("alpha")), data={"domain": "acme-one"}, headers=h
        ),
        "rollback": lambda h: tenants.post("/adapters/acme-one/rollback", headers=h),
        "delete": lambda h: tenants.delete("/adapters/zz-ghost", headers=h),
        "oip-unload": lambda h: tenants.post("/v2/repository/models/zz-ghost/unload", headers=h),
        "oip-index": lambda h: tenants.post("/v2/repository/index", headers=h),
        "metrics": lambda h: tenants.get("/metrics", headers=h),
    }
    for name, call in calls.items():
        status = call(auth(caller)).status_code
        if caller is None or caller == "wrong-key":
            assert status == 401, (caller, name)
        elif caller in ADMIN_CALLERS:  # past access: the action's own answer (exists, no previous, unknown...)
            assert status not in (401, 403), (caller, name, status)
        else:
            assert status == 403, (caller, name, status)


def test_keys_are_needed_except_for_health_docs_and_the_page(tenants):
    for path in ("/healthz", "/readyz", "/", "/openapi.json", "/v2", "/v2/health/ready", "/static/app.js"):
        assert tenants.get(path).status_code == 200, path
    for path in ("/adapters", "/adapters/acme-one", "/v2/models/acme-one"):
        response = tenants.get(path)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", path
        assert tenants.get(path, headers=auth("not-a-key")).status_code == 401
        assert tenants.get(path, headers={"Authorization": f"Basic {CALLERS['acme']}"}).status_code == 401


def test_management_is_audited_with_key_action_domain_version_and_hash(tenants, assets, caplog):
    import hashlib

    data = assets.data("gamma")
    with caplog.at_level(logging.INFO, logger="service.frontend.audit"):
        assert (
            tenants.post(
                "/adapters", files=bundle_file(data), data={"domain": "acme-audit"}, headers=auth("ops")
            ).status_code
            == 201
        )
        assert tenants.post("/adapters/acme-audit/rollback", headers=auth("acme")).status_code == 403
        assert (
            tenants.post(
                "/adapters", files=bundle_file(b"not a bundle"), data={"domain": "acme-bad"}, headers=auth("ops")
            ).status_code
            == 422
        )
        assert tenants.delete("/adapters/acme-audit", headers=auth("admin-token")).status_code == 200
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "service.frontend.audit"]
    assert lines == [
        {
            "key": "ops",
            "action": "register",
            "domain": "acme-audit",
            "version": 1,
            "sha256": hashlib.sha256(data).hexdigest(),
            "status": 201,
            "outcome": "ok",
        },
        {
            "key": "acme",
            "action": "rollback",
            "domain": "acme-audit",
            "version": None,
            "sha256": None,
            "status": 403,
            "outcome": "refused",
        },
        {
            "key": "ops",
            "action": "register",
            "domain": "acme-bad",
            "version": None,
            "sha256": hashlib.sha256(b"not a bundle").hexdigest(),
            "status": 422,
            "outcome": "failed",
        },
        {
            "key": "admin",
            "action": "delete",
            "domain": "acme-audit",
            "version": 1,
            "sha256": hashlib.sha256(data).hexdigest(),
            "status": 200,
            "outcome": "ok",
        },
    ]


def test_rate_limits_per_key_answer_429_and_are_counted_per_key_name(assets, tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(keys_json(acme={"rate_per_s": 0.5, "burst": 2}))
    with serving(settings_for(assets, tmp_path, keys_file)) as client:
        client.post(
            "/adapters",
            files=bundle_file(assets.data("alpha")),
            data={"domain": "acme-one"},
            headers=auth("admin-token"),
        )
        answers = [client.get("/adapters/acme-one", headers=auth("acme")) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert answers[2].json()["error"] == "rate_limited" and int(answers[2].headers["retry-after"]) >= 1
        assert client.get("/adapters", headers=auth("beta")).status_code == 200  # other keys are not slowed
        metrics = client.get("/metrics", headers=auth("ops")).text
    assert 'ra_key_requests_total{key="acme",status="200"} 2.0' in metrics
    assert 'ra_key_requests_total{key="acme",status="429"} 1.0' in metrics
    assert 'ra_key_requests_total{key="beta",status="200"} 1.0' in metrics
    assert CALLERS["acme"] not in metrics and hash_key(CALLERS["acme"]) not in metrics


def replace_file(path: pathlib.Path, text: str) -> None:
    """Write the whole file at once (a reader never sees it half written)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_keys_file_reloads_while_serving_and_a_bad_one_keeps_the_last_good_keys(assets, tmp_path, caplog):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(keys_json({"acme": KEYS["acme"]}))
    with serving(settings_for(assets, tmp_path, keys_file)) as client:
        client.post(
            "/adapters",
            files=bundle_file(assets.data("alpha")),
            data={"domain": "acme-one"},
            headers=auth("admin-token"),
        )
        assert client.get("/adapters/acme-one", headers=auth("beta")).status_code == 401

        replace_file(keys_file, keys_json({"acme": KEYS["acme"], "beta": ("key-beta-0123456789", ["acme-one"], False)}))
        wait_for(lambda: client.get("/adapters/acme-one", headers=auth("beta")).status_code == 200)

        with caplog.at_level(logging.ERROR, logger="service.frontend.app"):
            replace_file(keys_file, '{"keys": [{"name": "broken"')
            wait_for(lambda: any("RA_API_KEYS_FILE" in r.getMessage() for r in caplog.records))
        assert client.get("/adapters/acme-one", headers=auth("beta")).status_code == 200  # the last good keys
        assert "ra_api_keys_reload_errors_total 1.0" in client.get("/metrics", headers=auth("admin-token")).text

        replace_file(keys_file, keys_json({"acme": KEYS["acme"]}))  # the key is revoked
        wait_for(lambda: client.get("/adapters/acme-one", headers=auth("beta")).status_code == 401)


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not JSON"),
        ('{"keys": [{"name": "a", "key_sha256": "abc", "domains": []}]}', "key_sha256"),
        ('{"keys": [{"name": "a", "key_sha256": "%s", "domains": ["ACME/*"]}]}' % ("0" * 64), "domain patterns"),
        ('{"keys": [{"name": "a", "key_sha256": "%s", "secret": "x"}]}' % ("0" * 64), "secret"),
        (
            '{{"keys": [{{"name": "a", "key_sha256": "{}"}}, {{"name": "a", "key_sha256": "{}"}}]}}'.format(
                "0" * 64, "1" * 64
            ),
            "repeats",
        ),
    ],
)
def test_a_malformed_keys_file_at_start_is_a_clear_error(assets, tmp_path, content, problem):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(content)
    with pytest.raises(KeysFileError, match=problem) as raised:
        single_process_app(settings_for(assets, tmp_path, keys_file))
    assert str(keys_file) in str(raised.value)


def test_python_m_service_refuses_a_malformed_keys_file_before_serving(tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text("{not json")
    result = subprocess.run(
        [sys.executable, "-m", "service", "--port", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"RA_API_KEYS_FILE": str(keys_file), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert f"RA_API_KEYS_FILE {keys_file}: not JSON" in result.stderr


def test_a_same_size_edit_right_after_the_last_is_seen_and_a_missing_file_is_reported_once(tmp_path):
    from service.frontend.access import KeyRing

    keys_file = tmp_path / "keys.json"
    keys_file.write_text(keys_json({"aaaa": KEYS["acme"]}))
    ring = KeyRing(keys_file)
    keys_file.write_text(keys_json({"bbbb": KEYS["acme"]}))  # in place, same size, same clock tick
    assert ring.reload_if_changed() and [p.name for p in ring.keys.values()] == ["bbbb"]
    assert not ring.reload_if_changed()
    keys_file.unlink()
    with pytest.raises(KeysFileError, match="cannot read"):
        ring.reload_if_changed()
    assert not ring.reload_if_changed()  # not logged again every poll
    assert [p.name for p in ring.keys.values()] == ["bbbb"]  # the last good keys stay
