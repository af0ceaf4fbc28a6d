"""The FastAPI app in-process (TestClient, lifespan included): routes, auth, validation, limits, store."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import time
import types

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin
from service_helpers import (
    ADMIN_TOKEN,
    AUTH,
    CLASSES,
    bad_bundles,
    bundle_file,
    check_scores,
    corrupt_png_body,
    corrupt_png_header_crc,
    encode,
    image_variants,
    jpeg_bytes,
    live_versions,
    make_settings,
    noise,
    png_bytes,
    png_with_size,
    reference_logits,
    reference_probs,
    running,
    store_snapshot,
    temp_files,
)

import service.engine.startup
from model.bundle import load_bundle
from service.boot import single_process_app
from service.engine.startup import DEMO_MARKER
from service.frontend.inference import INLINE_BYTES
from service.metrics import Metrics, exposition
from service.record.directory import DirectoryRecord


def register(client, data: bytes, domain: str | None = None, replace: bool | None = None, headers=AUTH, **kw):
    form = {}
    if domain is not None:
        form["domain"] = domain
    if replace is not None:
        form["replace"] = "true" if replace else "false"
    return client.post("/adapters", files=bundle_file(data), data=form, headers=headers, **kw)


def predict(client, domain: str, *images: bytes, names=None, **form):
    names = names or [f"img{i}.png" for i in range(len(images))]
    files = [("file", (name, image, "application/octet-stream")) for name, image in zip(names, images)]
    return client.post(f"/predict/{domain}", files=files, data={k: str(v) for k, v in form.items()})


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    if code is not None:
        assert body["error"] == code, body
    return body


def domain_dirs(store: pathlib.Path) -> list[str]:
    """Domains with a live version in the directory registry of record."""
    return sorted(
        p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(".") and live_versions(store, p.name)
    )


@pytest.fixture(scope="module")
def served(assets, tmp_path_factory):
    """One app with alpha (2 classes, golden), beta (3) and gamma (5) registered over the API."""
    store = tmp_path_factory.mktemp("store")
    with running(make_settings(assets, store)) as client:
        registered = {}
        for domain in CLASSES:
            response = register(client, assets.data(domain))
            assert response.status_code == 201, response.text
            registered[domain] = response.json()
        yield types.SimpleNamespace(client=client, store=store, registered=registered)


# ----- health, docs, metrics ------------------------------------------------------------------


def test_health_docs_and_metrics(served):
    client = served.client
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True and ready.json()["adapters"] >= 3
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    assert {"/predict/{domain}", "/predict", "/adapters", "/adapters/{domain}"} <= set(spec.json()["paths"])
    assert spec.json()["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"  # /docs offers Authorize
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "ra_requests_total" in metrics.text
    assert re.search(r'^ra_resident_domains\{tier="device"\} \d', metrics.text, re.M)


def test_readyz_and_metrics_report_the_residency_budget(served):
    residency = served.client.get("/readyz").json()["residency"]
    # the tests' budget (the default's sources: test_domains.py); no host tier on a CPU host by default (one memory)
    assert residency["budget_source"] == "RA_DEVICE_MEMORY_MB" and residency["budget_mb"] == 64
    assert residency["host_cache_mb"] == 0
    assert 0 < residency["bytes_per_domain"] < 4 * 1024 * 1024
    assert abs(residency["fits"] - residency["budget_mb"] * 1024 * 1024 / residency["bytes_per_domain"]) < 2
    assert residency["resident"] >= 3
    text = served.client.get("/metrics").text
    assert re.search(rf"^ra_domains_fit {residency['fits']}\.0$", text, re.M)
    assert re.search(rf"^ra_domain_bytes {residency['bytes_per_domain']}\.0$", text, re.M)


def test_metrics_count_requests_by_route_and_keep_unknown_domains_out(served):
    client = served.client
    assert predict(client, "beta", png_bytes(1)).status_code == 200
    assert predict(client, "no-such-domain-xyz", png_bytes(1)).status_code == 404
    text = client.get("/metrics").text
    assert 'ra_requests_total{route="/predict/{domain}",status="200"}' in text
    assert 'ra_requests_total{route="/predict/{domain}",status="404"}' in text
    assert 'ra_predictions_total{domain="beta"}' in text
    assert "no-such-domain-xyz" not in text  # no label per made-up name
    count = client.get("/readyz").json()["adapters"]
    assert re.search(rf'^ra_resident_domains\{{tier="device"\}} {count}\.0$', text, re.M)
    assert re.search(r"^ra_batch_size_count [1-9]", text, re.M)


@pytest.fixture(scope="module")
def two_series(assets, tmp_path_factory):
    """An app that keeps a `domain` series for two domains only (RA_METRICS_DOMAINS=2)."""
    store = tmp_path_factory.mktemp("two-series-store")
    for domain in CLASSES:
        DirectoryRecord(store).add(domain, replace=False, data=assets.data(domain))
    with running(make_settings(assets, store, metrics_domains=2)) as client:
        yield client


def test_only_the_first_domains_served_get_a_series_of_their_own(two_series):
    for domain, images in (("alpha", 1), ("beta", 2), ("gamma", 3), ("alpha", 1)):
        assert predict(two_series, domain, *[png_bytes(i) for i in range(images)]).status_code == 200
    text = two_series.get("/metrics").text
    counts = dict(re.findall(r'^ra_predictions_total\{domain="([^"]+)"\} (\S+)$', text, re.M))
    assert len(counts) == 3 and float(counts["_other"]) == 3  # gamma came third
    assert set(counts) - {"_other"} <= {"alpha", "beta", "gamma"} and sum(map(float, counts.values())) == 7


def test_ten_thousand_domains_make_fewer_than_two_thousand_series():
    """Every metric the engine and a front end write, with 10,000 domains served: the domain label is
    the one that grows with them, and it is bounded."""
    metrics = Metrics()
    for i in range(10_000):
        domain = metrics.domain_label(f"d{i}")
        metrics.predictions.labels(domain).inc()
        metrics.lookups.labels("device", "miss").inc()
        metrics.loads.labels("registry", "ok").inc()
        metrics.requests.labels("/predict/{domain}", "200").inc()
        metrics.latency.labels("/predict/{domain}").observe(0.01)
    text = exposition(metrics)[0].decode()
    series = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(series) < 2000
    assert sum(line.startswith("ra_predictions_total{") for line in series) == 21
    assert 'ra_predictions_total{domain="_other"} 9980.0' in series


def test_every_answer_carries_a_request_id_and_every_error_its_code(served):
    client = served.client
    made = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", made) and client.get("/healthz").headers["x-request-id"] != made
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert re.fullmatch(
        r"[0-9a-f]{16}", client.get("/healthz", headers={"X-Request-ID": "x" * 200}).headers["x-request-id"]
    )
    missing = predict(client, "no-such-domain", png_bytes(1))
    assert missing.headers["x-error-code"] == missing.json()["error"] == "unknown_domain"
    refused = client.post("/adapters", files={"bundle": ("b", b"x")})  # no token: refused before routing
    assert refused.status_code in (401, 403) and refused.headers["x-error-code"] == refused.json()["error"]
    assert "x-error-code" not in client.get("/healthz").headers
    text = client.get("/metrics").text
    assert re.search(r'^ra_errors_total\{code="unknown_domain"\} [1-9]', text, re.M)
    assert re.search(rf'^ra_errors_total\{{code="{refused.json()["error"]}"\}} [1-9]', text, re.M)


def test_metrics_say_the_engine_is_up_its_starts_queue_and_store_disk(served):
    time.sleep(1.2)  # the front end reports the engine each second
    text = served.client.get("/metrics").text
    assert re.search(r"^ra_engine_unreachable 0\.0$", text, re.M)
    assert re.search(r"^ra_engine_starts_total 1\.0$", text, re.M)
    assert re.search(r"^ra_queue_capacity [1-9]", text, re.M)
    free = float(re.search(r"^ra_store_free_bytes (\S+)$", text, re.M).group(1))
    assert 0 < free <= float(re.search(r"^ra_store_size_bytes (\S+)$", text, re.M).group(1))


# ----- registration and listing ---------------------------------------------------------------


def test_register_answers_the_adapter(served, assets):
    for domain, info in served.registered.items():
        bundle = assets.bundles[domain]
        assert info["domain"] == domain
        assert info["version"] == 1
        assert info["labels"] == list(bundle.labels)
        assert info["num_classes"] == CLASSES[domain]
        assert info["params"] > 0
        assert info["preprocessing"] == {
            **bundle.preprocessing.to_json(),
            "mean": list(bundle.preprocessing.mean),
            "std": list(bundle.preprocessing.std),
        }
        assert info["backbone_fingerprint"] == assets.backbone.fingerprint
        assert info["golden_self_test"] is (domain == "alpha")


def test_list_and_show_adapters(served, assets):
    listing = served.client.get("/adapters").json()
    assert listing["backbone_fingerprint"] == assets.backbone.fingerprint
    by_domain = {a["domain"]: a for a in listing["adapters"]}
    assert set(CLASSES) <= set(by_domain)
    assert all(by_domain[d]["version"] == 1 for d in CLASSES)
    info = served.client.get("/adapters/gamma").json()
    assert info["domain"] == "gamma" and info["version"] == 1 and len(info["labels"]) == 5
    for domain in CLASSES:
        assert live_versions(served.store, domain) == [1]


# ----- prediction -----------------------------------------------------------------------------


@pytest.mark.parametrize("domain", list(CLASSES))
def test_predict_equals_the_engine(served, assets, ref, domain):
    bundle = assets.bundles[domain]
    for _seed, image in [(101, png_bytes(101)), (102, jpeg_bytes(102)), (103, png_bytes(103, (40, 17)))]:
        response = predict(served.client, domain, image)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["domain"] == domain and body["version"] == 1
        logits = reference_logits(ref, image, bundle, domain)
        assert len(body["predictions"]) == min(5, CLASSES[domain])
        check_scores(body["predictions"], logits, bundle.labels)
        assert body["results"][0]["predictions"] == body["predictions"]
        assert body["results"][0]["filename"] == "img0.png"
        assert set(body["timing"]) == {"total_ms", "preprocess_ms", "inference_ms"}
    top1 = predict(served.client, domain, png_bytes(104), top_k=1).json()
    assert len(top1["predictions"]) == 1
    assert top1["predictions"][0]["index"] == int(np.argmax(reference_probs(ref, png_bytes(104), bundle, domain)))


def test_several_files_answer_in_upload_order(served, assets, ref):
    images = [png_bytes(200 + i) for i in range(6)]
    names = [f"f{i}.png" for i in range(6)]
    response = predict(served.client, "gamma", *images, names=names, top_k=2)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == names
    for image, result in zip(images, results):
        assert len(result["predictions"]) == 2
        check_scores(
            result["predictions"],
            reference_logits(ref, image, assets.bundles["gamma"], "gamma"),
            assets.bundles["gamma"].labels,
        )
    assert response.json()["predictions"] is None  # at the top only for a single image


def test_small_images_decode_inline_large_ones_in_the_pool(served, assets, ref, monkeypatch):
    """A request mixing a tiny PNG with ones over `INLINE_PIXELS` or `INLINE_BYTES`: only the large ones go
    to the preprocess pool, and every answer is still the engine's on the evaluation input."""
    pool = served.client.app.state.service.preprocess_pool
    handed = []
    submit = pool.submit
    monkeypatch.setattr(pool, "submit", lambda fn, *args: handed.append(args[0]) or submit(fn, *args))
    padded = PngImagePlugin.PngInfo()
    padded.add_text("padding", "x" * INLINE_BYTES)  # few pixels, many bytes
    small_but_heavy = encode(Image.fromarray(noise(404, (20, 20))), "PNG", pnginfo=padded)
    images = [png_bytes(401), png_bytes(402, (300, 260)), png_bytes(403, (400, 300)), small_but_heavy]
    response = predict(served.client, "beta", *images)
    assert response.status_code == 200, response.text
    assert handed == images[1:]
    for image, result in zip(images, response.json()["results"]):
        check_scores(
            result["predictions"],
            reference_logits(ref, image, assets.bundles["beta"], "beta"),
            assets.bundles["beta"].labels,
        )


def test_fanout_answers_one_result_per_domain(served, assets, ref):
    image = png_bytes(300)
    response = served.client.post("/predict", files={"file": ("x.png", image)}, data={"domains": "gamma, alpha"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["filename"] == "x.png"
    assert [r["domain"] for r in body["results"]] == ["gamma", "alpha"]
    for result in body["results"]:
        bundle = assets.bundles[result["domain"]]
        assert result["version"] == 1
        check_scores(result["predictions"], reference_logits(ref, image, bundle, result["domain"]), bundle.labels)

    everything = served.client.post("/predict", files={"file": ("x.png", image)}, data={"domains": "all"}).json()
    listed = [a["domain"] for a in served.client.get("/adapters").json()["adapters"]]
    assert [r["domain"] for r in everything["results"]] == listed
    default = served.client.post("/predict", files={"file": ("x.png", image)}).json()
    assert [r["domain"] for r in default["results"]] == listed

    assert_error(
        served.client.post("/predict", files={"file": ("x.png", image)}, data={"domains": "alpha,nope"}),
        404,
        "unknown_domain",
    )
    assert_error(served.client.post("/predict", files={"file": ("x.png", image)}, data={"domains": " , "}), 400)


@pytest.mark.parametrize("name", list(image_variants()))
def test_image_formats_and_modes_are_accepted(served, assets, ref, name):
    image = image_variants()[name]
    response = predict(served.client, "gamma", image, names=[name])
    assert response.status_code == 200, response.text
    bundle = assets.bundles["gamma"]
    check_scores(response.json()["predictions"], reference_logits(ref, image, bundle, "gamma"), bundle.labels)


BAD_IMAGES = {
    "empty.jpg": (b"", {400}, "empty_file"),
    "text.jpg": (b"this is not an image, only text\n" * 4, {415}, "not_image"),
    "truncated.jpg": (jpeg_bytes(5, (64, 64))[:3000], {400}, "corrupt"),
    "corrupt-body.png": (corrupt_png_body(png_bytes(6, (64, 64))), {400}, "corrupt"),
    # Pillow refuses a PNG whose header CRC is wrong before it knows the format: 415 is acceptable too.
    "corrupt-crc.png": (corrupt_png_header_crc(png_bytes(7)), {400, 415}, None),
    "bomb-30000.png": (png_with_size(30000, 30000), {413}, "too_many_pixels"),
    "bomb-8000.png": (png_with_size(8000, 8000), {413}, "too_many_pixels"),  # over RA_MAX_IMAGE_PIXELS only
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_images_get_a_json_4xx(served, name):
    data, statuses, code = BAD_IMAGES[name]
    response = predict(served.client, "alpha", data, names=[name])
    assert response.status_code in statuses, response.text
    assert_error(response, response.status_code, code)
    # the same image among good ones fails the request, still as a 4xx
    mixed = predict(served.client, "alpha", png_bytes(1), data, names=["ok.png", name])
    assert mixed.status_code in statuses, mixed.text
    fanout = served.client.post("/predict", files={"file": (name, data)}, data={"domains": "alpha,beta"})
    assert fanout.status_code in statuses, fanout.text


def test_request_errors(served):
    client = served.client
    assert_error(predict(client, "nope", png_bytes(1)), 404, "unknown_domain")
    assert_error(client.post("/predict/alpha", data={"top_k": "2"}), 415, "not_multipart")
    assert_error(client.post("/predict/alpha", files={"image": ("x.png", png_bytes(1))}), 422, "missing_file")
    assert_error(client.post("/predict"), 415, "not_multipart")
    for top_k in ("0", "-1", "1001", "abc"):
        assert_error(predict(client, "alpha", png_bytes(1), top_k=top_k), 422, "invalid_request")
    assert_error(client.get("/adapters/nope"), 404, "unknown_domain")
    assert_error(client.get("/no/such/route"), 404)


# ----- replace, rollback, delete ---------------------------------------------------------------


def test_replace_rollback_delete(served, assets, ref):
    client, store = served.client, served.store
    image = png_bytes(400)
    first = register(client, assets.data("alpha"), domain="life")
    assert first.status_code == 201 and first.json()["version"] == 1 and first.json()["domain"] == "life"

    before = store_snapshot(store)
    assert_error(register(client, assets.data("alt-alpha"), domain="life"), 409, "domain_exists")
    assert_error(register(client, assets.data("alt-alpha"), domain="life", replace=False), 409, "domain_exists")
    assert store_snapshot(store) == before
    assert client.get("/adapters/life").json()["version"] == 1

    second = register(client, assets.data("alt-alpha"), domain="life", replace=True)
    assert second.status_code == 201, second.text
    assert second.json()["version"] == 2
    body = predict(client, "life", image).json()
    assert body["version"] == 2
    check_scores(
        body["predictions"],
        reference_logits(ref, image, assets.alt["alpha"], "alt-alpha"),
        assets.bundles["alpha"].labels,
    )
    assert live_versions(store, "life") == [1, 2]

    back = client.post("/adapters/life/rollback", headers=AUTH)
    assert back.status_code == 200, back.text
    assert back.json()["version"] == 1
    body = predict(client, "life", image).json()
    assert body["version"] == 1
    check_scores(
        body["predictions"],
        reference_logits(ref, image, assets.bundles["alpha"], "alpha"),
        assets.bundles["alpha"].labels,
    )
    assert live_versions(store, "life") == [1]
    assert_error(client.post("/adapters/life/rollback", headers=AUTH), 409, "no_previous_version")
    assert client.get("/adapters/life").json()["version"] == 1

    third = register(client, assets.data("alt-alpha"), domain="life", replace=True)
    assert third.json()["version"] == 3  # a version number is never reused, not even after a rollback

    deleted = client.delete("/adapters/life", headers=AUTH)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["domain"] == "life"
    assert_error(predict(client, "life", image), 404, "unknown_domain")
    assert_error(client.get("/adapters/life"), 404, "unknown_domain")
    assert_error(client.delete("/adapters/life", headers=AUTH), 404, "unknown_domain")
    assert_error(client.post("/adapters/life/rollback", headers=AUTH), 404, "unknown_domain")
    assert "life" not in domain_dirs(store)
    assert "life" not in [a["domain"] for a in client.get("/adapters").json()["adapters"]]
    assert temp_files(store) == []

    again = register(client, assets.data("beta"), domain="life")  # a deleted name can be reused
    assert again.status_code == 201 and again.json()["version"] == 4 and again.json()["num_classes"] == 3
    assert client.delete("/adapters/life", headers=AUTH).status_code == 200


def test_replace_may_change_the_class_count(served, assets, ref):
    client = served.client
    assert register(client, assets.data("alpha"), domain="morph").status_code == 201
    replaced = register(client, assets.data("gamma"), domain="morph", replace=True)
    assert replaced.status_code == 201 and replaced.json()["num_classes"] == 5
    image = png_bytes(450)
    body = predict(client, "morph", image).json()
    assert len(body["predictions"]) == 5
    check_scores(
        body["predictions"],
        reference_logits(ref, image, assets.bundles["gamma"], "gamma"),
        assets.bundles["gamma"].labels,
    )
    assert client.delete("/adapters/morph", headers=AUTH).status_code == 200


# ----- auth -------------------------------------------------------------------------------------

BAD_AUTH = {
    "none": ({}, ""),
    "wrong": ({"Authorization": "Bearer wrong"}, ""),
    "prefix": ({"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}, ""),
    "basic": ({"Authorization": f"Basic {ADMIN_TOKEN}"}, ""),
    "bare": ({"Authorization": ADMIN_TOKEN}, ""),
    "empty-bearer": ({"Authorization": "Bearer "}, ""),
    "query-token": ({}, f"?token={ADMIN_TOKEN}"),
    "query-access-token": ({}, f"?access_token={ADMIN_TOKEN}"),
    "other-header": ({"X-Admin-Token": ADMIN_TOKEN}, ""),
}


@pytest.mark.parametrize("case", list(BAD_AUTH))
def test_management_needs_the_bearer_token(served, assets, case):
    headers, query = BAD_AUTH[case]
    client, store = served.client, served.store
    before = store_snapshot(store)
    response = client.post(
        f"/adapters{query}", files=bundle_file(assets.data("beta")), data={"domain": "intruder"}, headers=headers
    )
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    assert_error(client.delete(f"/adapters/alpha{query}", headers=headers), 401, "unauthorized")
    assert_error(client.post(f"/adapters/alpha/rollback{query}", headers=headers), 401, "unauthorized")
    assert store_snapshot(store) == before
    assert "intruder" not in domain_dirs(store)
    assert client.get("/adapters/alpha").status_code == 200


def test_bearer_scheme_is_case_insensitive(served, assets):
    response = register(
        served.client, assets.data("beta"), domain="casetest", headers={"Authorization": f"bearer {ADMIN_TOKEN}"}
    )
    assert response.status_code == 201, response.text
    assert served.client.delete("/adapters/casetest", headers=AUTH).status_code == 200


@pytest.mark.parametrize("token", [None, "", "   "])
def test_no_admin_token_disables_management(assets, tmp_path, token):
    store = tmp_path / "store"
    DirectoryRecord(store).add("alpha", replace=False, data=assets.data("alpha"))
    before = store_snapshot(store)
    with running(make_settings(assets, store, admin_token=token)) as client:
        for headers in ({}, AUTH, {"Authorization": "Bearer "}):
            assert_error(register(client, assets.data("beta"), headers=headers), 403, "management_disabled")
            assert_error(client.delete("/adapters/alpha", headers=headers), 403, "management_disabled")
            assert_error(client.post("/adapters/alpha/rollback", headers=headers), 403, "management_disabled")
        assert predict(client, "alpha", png_bytes(1)).status_code == 200  # serving is unaffected
        assert [a["domain"] for a in client.get("/adapters").json()["adapters"]] == ["alpha"]
    assert store_snapshot(store) == before
    assert domain_dirs(store) == ["alpha"]


# ----- invalid bundles ------------------------------------------------------------------------

BUNDLE_CODES = {
    "random": "not_safetensors",
    "pickle": "not_safetensors",
    "empty": "not_safetensors",
    "truncated": "not_safetensors",
    "foreign": "fingerprint",
    "nan": "non_finite",
    "wrong_shape": "tensors",
    "extra_tensor": "tensors",
    "too_many_labels": "labels",
    "too_few_labels": "labels",
    "bad_golden": "golden",
}


@pytest.mark.parametrize("case", list(BUNDLE_CODES))
def test_invalid_bundles_are_refused_before_anything_is_stored(served, assets, case):
    data = bad_bundles(assets)[case]
    before = store_snapshot(served.store)
    response = register(served.client, data, domain=f"bad-{case.replace('_', '-')}", replace=True)
    body = assert_error(response, 422)
    assert body["error"].startswith("invalid_bundle:"), body
    assert body["error"] == f"invalid_bundle:{BUNDLE_CODES[case]}", body
    assert store_snapshot(served.store) == before
    listed = [a["domain"] for a in served.client.get("/adapters").json()["adapters"]]
    assert not [d for d in listed if d.startswith("bad-")]


@pytest.mark.parametrize("name", ["../x", "A B", "Alpha", "-x", ".hidden", "a/b", "x" * 64, "a\nb", "ä"])
def test_invalid_domain_names_are_refused(served, assets, name):
    before = store_snapshot(served.store)
    body = assert_error(register(served.client, assets.data("beta"), domain=name), 422)
    assert body["error"] == "invalid_bundle:domain_name", body
    assert store_snapshot(served.store) == before
    assert not (served.store.parent / "x").exists()


# ----- size limits -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(assets, tmp_path_factory):
    store = tmp_path_factory.mktemp("small-store")
    DirectoryRecord(store).add("alpha", replace=False, data=assets.data("alpha"))
    settings = make_settings(assets, store, max_bundle_bytes=2048, max_image_bytes=4096, max_files=2)
    with running(settings) as client:
        yield types.SimpleNamespace(client=client, store=store, settings=settings)


def test_bundle_over_the_limit_is_413(small, assets):
    before = store_snapshot(small.store)
    data = assets.data("beta")[:10000]  # checked by size before it is parsed
    assert 2048 < len(data) < small.settings.max_request_bytes
    assert_error(register(small.client, data), 413, "bundle_too_large")
    whole = assets.data("beta")  # over the whole-request limit too: refused from its Content-Length
    assert len(whole) > small.settings.max_request_bytes
    assert_error(register(small.client, whole), 413, "request_too_large")
    assert store_snapshot(small.store) == before
    assert domain_dirs(small.store) == ["alpha"]


def test_image_over_the_limit_is_413(small):
    big = png_bytes(1, (64, 64))
    assert len(big) > 4096
    assert_error(predict(small.client, "alpha", big), 413, "image_too_large")
    assert predict(small.client, "alpha", png_bytes(1, (16, 16))).status_code == 200


def test_too_many_files_is_413(small):
    images = [png_bytes(i, (16, 16)) for i in range(3)]
    assert_error(predict(small.client, "alpha", *images), 413, "too_many_files")
    assert predict(small.client, "alpha", *images[:2]).status_code == 200


def test_body_over_the_request_limit_is_413(small):
    body = b"x" * (small.settings.max_request_bytes + 1)
    headers = {**AUTH, "content-type": "multipart/form-data; boundary=xyz"}
    assert_error(small.client.post("/adapters", content=body, headers=headers), 413, "request_too_large")
    refused = small.client.post("/predict/alpha", content=body, headers={**headers, "X-Request-ID": "too-big-1"})
    assert_error(refused, 413, "request_too_large")
    assert refused.headers["x-request-id"] == "too-big-1" and refused.headers["x-error-code"] == "request_too_large"
    text = small.client.get("/metrics").text  # refused from its Content-Length, and still counted
    assert re.search(r'^ra_errors_total\{code="request_too_large"\} [2-9]', text, re.M)


def test_chunked_body_over_the_request_limit_is_413(small):
    body = b"x" * (small.settings.max_request_bytes + 1)

    def chunks():
        for i in range(0, len(body), 16384):
            yield body[i : i + 16384]

    headers = {**AUTH, "content-type": "multipart/form-data; boundary=xyz"}
    response = small.client.post("/adapters", content=chunks(), headers=headers)
    assert_error(response, 413, "request_too_large")


def test_not_ready_before_the_lifespan_ran(assets, tmp_path):
    client = TestClient(single_process_app(make_settings(assets, tmp_path / "store")), raise_server_exceptions=False)
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert_error(client.get("/adapters"), 503, "not_ready")
    assert_error(predict(client, "alpha", png_bytes(1)), 503, "not_ready")
    assert client.get("/metrics").status_code == 200


def test_full_queue_answers_503_with_retry_after(assets, tmp_path):
    store = tmp_path / "store"
    DirectoryRecord(store).add("alpha", replace=False, data=assets.data("alpha"))
    with running(make_settings(assets, store, max_queue=2)) as client:
        response = predict(client, "alpha", *[png_bytes(i) for i in range(3)])
        assert_error(response, 503, "overloaded")
        assert response.headers["retry-after"] == "1"
        assert predict(client, "alpha", png_bytes(1), png_bytes(2)).status_code == 200


def test_request_timeout_answers_504(assets, tmp_path):
    store = tmp_path / "store"
    DirectoryRecord(store).add("alpha", replace=False, data=assets.data("alpha"))
    with running(make_settings(assets, store, request_timeout_s=1e-6)) as client:
        assert_error(predict(client, "alpha", png_bytes(1)), 504, "timeout")
        assert client.get("/readyz").status_code == 200
        registry = client.app.state.service.engine.core.registry
        assert registry.cached("alpha").leases == 0  # a request given up returns its lease (alpha may go)


# ----- persistence -----------------------------------------------------------------------------


def test_restart_keeps_the_registry(assets, ref, tmp_path):
    store = tmp_path / "store"
    with running(make_settings(assets, store)) as client:
        assert register(client, assets.data("alpha")).status_code == 201
        assert register(client, assets.data("alt-alpha"), replace=True).json()["version"] == 2
        assert register(client, assets.data("beta")).status_code == 201
        before = {a["domain"]: a["version"] for a in client.get("/adapters").json()["adapters"]}
    assert before == {"alpha": 2, "beta": 1}
    with running(make_settings(assets, store)) as client:
        after = {a["domain"]: a["version"] for a in client.get("/adapters").json()["adapters"]}
        assert after == before
        image = png_bytes(500)
        body = predict(client, "alpha", image).json()
        assert body["version"] == 2
        check_scores(
            body["predictions"],
            reference_logits(ref, image, assets.alt["alpha"], "alt-alpha"),
            assets.bundles["alpha"].labels,
        )
        assert client.get("/readyz").json()["adapters"] == 2


def test_store_recovers_from_a_crash(assets, ref, tmp_path):
    store = tmp_path / "store"
    DirectoryRecord(store).add("alpha", replace=False, data=assets.data("alpha"))
    folder = store / "alpha"
    leftover = folder / ".000002.safetensors.xyz.tmp"
    leftover.write_bytes(assets.data("alt-alpha")[:5000])  # a write interrupted before its link, long ago
    os.utime(leftover, (time.time() - 3600, time.time() - 3600))
    running_write = folder / ".000004.safetensors.abc.tmp"
    running_write.write_bytes(b"another process is writing this now")
    (folder / "000003.safetensors").write_bytes(np.random.default_rng(1).bytes(4000))  # garbage
    (folder / "000002.dropped").write_bytes(b"")  # a drop interrupted between its marker and the unlink
    (folder / "000002.safetensors").write_bytes(assets.data("alt-alpha"))
    with running(make_settings(assets, store)) as client:
        assert client.get("/readyz").status_code == 200
        image = png_bytes(600)
        body = predict(client, "alpha", image).json()
        assert body["version"] == 1  # v3 is garbage and v2 dropped: v1 serves
        check_scores(
            body["predictions"],
            reference_logits(ref, image, assets.bundles["alpha"], "alpha"),
            assets.bundles["alpha"].labels,
        )
        listing = {a["domain"]: (a["version"], a["tier"]) for a in client.get("/adapters").json()["adapters"]}
        assert listing == {"alpha": (1, "device")}
        described = client.get("/adapters/alpha").json()
        assert (described["version"], described["record_version"]) == (1, 3)
        # the next write to the domain's folder clears what a crash left there, not other writes in progress
        assert register(client, assets.data("alt-alpha"), replace=True).json()["version"] == 4
        assert not leftover.exists()
        assert running_write.exists()  # younger than any crash: another process's write in progress
        running_write.unlink()
        assert temp_files(store) == []


def test_rollback_skips_a_broken_stored_version(assets, tmp_path):
    store = tmp_path / "store"
    DirectoryRecord(store).add("alpha", replace=False, data=assets.data("alpha"))
    (store / "alpha" / "000002.safetensors").write_bytes(np.random.default_rng(2).bytes(4000))  # garbage
    with running(make_settings(assets, store)) as client:
        assert client.get("/adapters/alpha").json()["version"] == 1
        assert register(client, assets.data("alt-alpha"), replace=True).json()["version"] == 3
        response = client.post("/adapters/alpha/rollback", headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["version"] == 1


def test_store_ignores_foreign_folders(assets, tmp_path):
    store = tmp_path / "store"
    DirectoryRecord(store).add("alpha", replace=False, data=assets.data("alpha"))
    (store / "lost+found").mkdir()
    with running(make_settings(assets, store)) as client:
        assert [a["domain"] for a in client.get("/adapters").json()["adapters"]] == ["alpha"]


def test_demo_bundles_are_seeded_once(assets, tmp_path, monkeypatch):
    demo = tmp_path / "demo"
    demo.mkdir()
    shutil.copy(assets.paths["gamma"], demo / "gamma.safetensors")
    shutil.copy(assets.paths["foreign"], demo / "foreign.safetensors")  # another backbone's: skipped
    shutil.copy(assets.backbone_path, demo / "backbone.safetensors")
    monkeypatch.setattr(service.engine.startup, "DEMO_DIR", demo)
    store = tmp_path / "store"
    settings = make_settings(assets, store, demo_adapters=True)
    with running(settings) as client:
        listing = client.get("/adapters").json()["adapters"]
        assert [(a["domain"], a["version"]) for a in listing] == [("gamma", 1)]
        assert predict(client, "gamma", png_bytes(1)).status_code == 200
    assert (store / f".{DEMO_MARKER}").exists()
    assert load_bundle(store / "gamma" / "000001.safetensors").domain == "gamma"
    with running(settings) as client:  # seeded once: a restart changes nothing
        assert [(a["domain"], a["version"]) for a in client.get("/adapters").json()["adapters"]] == [("gamma", 1)]
        assert client.delete("/adapters/gamma", headers=AUTH).status_code == 200
    with running(settings) as client:  # a deleted demo stays deleted
        assert client.get("/adapters").json()["adapters"] == []
    assert domain_dirs(store) == []
