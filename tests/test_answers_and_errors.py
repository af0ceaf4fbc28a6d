"""What a new user reads first: error messages that name the limit and the fix, answers that say what
they hold, which device the engine runs on, and a store that cleans up after crashed writes."""

from __future__ import annotations

import logging
import os
import pathlib
import re
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_helpers import AUTH, bundle_file, make_settings, png_bytes, png_with_size, running

from service.boot import single_process_app
from service.engine.runtime import NoGpuError
from service.record.directory import STALE_TMP_S, DirectoryRecord


@pytest.fixture(scope="module")
def client(assets, tmp_path_factory):
    with running(make_settings(assets, tmp_path_factory.mktemp("store"))) as client:
        for domain in ("alpha", "beta"):
            assert client.post("/adapters", files=bundle_file(assets.data(domain)), headers=AUTH).status_code == 201
        yield client


def error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    return body["detail"]


# ----- errors that name the limit and the fix ----------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "said"),
    [(12000, 12000, "12000x12000 pixels"), (100000, 100000, "10,000,000,000 pixels")],
    ids=["over-ours", "over-pillows-own"],
)
def test_an_image_over_the_pixel_limit_is_told_the_configured_limit(client, width, height, said):
    """Pillow's own checks (89 and 179 megapixels) must not speak for RA_MAX_IMAGE_PIXELS."""
    files = {"file": ("big.png", png_with_size(width, height), "image/png")}
    detail = error(client.post("/predict/alpha", files=files), 413, "too_many_pixels")
    assert said in detail and "limit of 40,000,000" in detail, detail
    assert "decompression bomb" not in detail and "89478485" not in detail and "178956970" not in detail


def test_an_image_sent_as_the_raw_body_is_told_about_the_multipart_field(client):
    detail = error(
        client.post("/predict/alpha", content=png_bytes(1), headers={"content-type": "image/png"}), 415, "not_multipart"
    )
    assert "multipart/form-data" in detail and "'file'" in detail and "image/png" in detail, detail
    detail = error(client.post("/predict/alpha", files={"image": ("x.png", png_bytes(1))}), 422, "missing_file")
    assert "'file'" in detail and "-F file=@" in detail, detail
    detail = error(
        client.post("/adapters", content=b"x" * 100, headers={**AUTH, "content-type": "application/octet-stream"}),
        415,
        "not_multipart",
    )
    assert "'bundle'" in detail, detail
    # a missing field that is not a file keeps the validation details
    assert (
        client.post("/predict/alpha", files={"file": ("x.png", png_bytes(1))}, data={"top_k": "0"}).json()["error"]
        == "invalid_request"
    )


def test_a_file_that_is_not_safetensors_is_called_that(client):
    for data in (np.random.default_rng(0).bytes(4096), b"\x80\x04\x95" + bytes(64)):  # random bytes, a pickle
        detail = error(
            client.post("/adapters", files=bundle_file(data), headers=AUTH), 422, "invalid_bundle:not_safetensors"
        )
        assert "is not a .safetensors file" in detail and "claims" not in detail, detail


# ----- answers that say what they hold ----------------------------------------------------------


def test_predictions_at_the_top_only_for_a_single_image(client):
    files = [("file", (f"img{i}.png", png_bytes(i), "image/png")) for i in range(2)]
    several = client.post("/predict/alpha", files=files).json()
    assert several["predictions"] is None and [r["filename"] for r in several["results"]] == ["img0.png", "img1.png"]
    one = client.post("/predict/alpha", files=files[:1]).json()
    assert one["predictions"] == one["results"][0]["predictions"] and one["predictions"]


def test_delete_answers_that_the_domain_is_gone(client, assets):
    assert client.post("/adapters", files=bundle_file(assets.data("gamma")), headers=AUTH).status_code == 201
    gone = client.delete("/adapters/gamma", headers=AUTH)
    assert gone.status_code == 200 and gone.json() == {"domain": "gamma", "version": 1, "deleted": True}, gone.text


# ----- which device ------------------------------------------------------------------------------


def test_the_device_is_logged_once_and_reported_by_readyz(assets, tmp_path, caplog):
    with (
        caplog.at_level(logging.INFO, logger="service.engine"),
        running(make_settings(assets, tmp_path)) as client,
    ):
        device = client.get("/readyz").json()["device"]
    assert device["backend"].startswith("TensorFlow ") and device["compute_dtype"] == "float32"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine on ")]
    assert len(lines) == 1, lines
    if device["gpu"]:
        assert device["devices"][0].startswith("GPU:0"), device
    else:
        assert device["devices"] == ["CPU"] and "no GPU found, running on CPU" in lines[0], lines


def test_a_required_gpu_that_is_not_there_stops_the_start(assets, tmp_path):
    app = single_process_app(make_settings(assets, tmp_path, require_gpu=True))
    with pytest.raises(NoGpuError, match="RA_REQUIRE_GPU"), TestClient(app):
        pass


# ----- what crashed writes leave in the directory store ------------------------------------------


def leave(path: pathlib.Path, age_s: float) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"part of a write")
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_stale_temporaries_are_swept_at_start_and_counted(assets, tmp_path):
    store = tmp_path / "store"
    DirectoryRecord(store).add("alpha", replace=False, data=assets.data("alpha"))
    stale = [
        leave(store / "alpha" / ".000002.safetensors.0f1e.tmp", 3600),
        leave(store / ".journal" / ".000000000009.a1.tmp", 3600),
        leave(store / "..usage.json.b2.tmp", 3600),
    ]
    running_write = leave(store / "alpha" / ".000003.safetensors.c3.tmp", 0)  # another process writing now
    with running(make_settings(assets, store)) as client:
        deadline = time.monotonic() + 20
        while any(p.exists() for p in stale):
            assert time.monotonic() < deadline, [p for p in stale if p.exists()]
            time.sleep(0.05)
        metrics = client.get("/metrics").text
    assert re.search(r"^ra_registry_temporaries_removed_total 3\.0$", metrics, re.M), metrics
    assert running_write.exists()


def test_the_periodic_sweep_walks_the_domains_a_slice_at_a_time(tmp_path):
    record = DirectoryRecord(tmp_path)
    names = [f"d{i}" for i in range(5)]
    for name in names:
        record.add(name, b"bundle", replace=False)
    for name in names:
        leave(tmp_path / name / ".x.tmp", STALE_TMP_S + 60)
    assert [record.sweep_temporaries(2) for _ in range(4)] == [2, 2, 1, 0]  # then round again
    for name in names:
        leave(tmp_path / name / ".x.tmp", STALE_TMP_S + 60)
    assert record.sweep_temporaries() == 5
