"""Training from the service (`service.frontend.training`), in-process with the whole app: every bad
upload is refused at submit with its code and leaves the job list as it was; tenants see and cancel
only their own jobs; a job runs to a served domain (worker, then the engine's registrar) and its
progress streams as server-sent events."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile

import numpy as np
import pytest
from PIL import Image
from test_tenants import auth, keys_json, serving, settings_for

from training.jobs import DirectoryJobs
from training.worker import Worker


def png(value: int, size: int = 16) -> bytes:
    out = io.BytesIO()
    noise = np.random.default_rng(value).integers(0, 40, (size, size, 3))
    Image.fromarray(np.clip(noise + value, 0, 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def zipped(files: dict[str, bytes], folders: tuple[str, ...] = ()) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for folder in folders:
            archive.writestr(folder, b"")
        for name, data in files.items():
            archive.writestr(name, data)
    return out.getvalue()


def dark_and_light(per_class: int = 12) -> bytes:
    """Two classes a classifier tells apart at once: dark squares and light ones."""
    files = {f"set/dark/{i}.png": png(10 + i) for i in range(per_class)}
    files.update({f"set/light/{i}.png": png(200 + i) for i in range(per_class)})
    return zipped(files)


def bomb() -> bytes:
    return zipped({"set/a/1.png": png(1), "set/b/1.png": b"\0" * (10 * 1024 * 1024)})


KEYS = {  # name -> (secret, patterns, admin); "train" rights below
    "acme": ("key-acme-0123456789", ["acme-*"], False),
    "beta": ("key-beta-0123456789", ["beta-*"], False),
    "viewer": ("key-viewer-0123456789", ["acme-*"], False),
    "ops": ("key-ops-0123456789", ["*"], True),
}
TRAINS = {"acme": {"train": True}, "beta": {"train": True}}


def key(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


@pytest.fixture(scope="module")
def service(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("training")
    keys_file = tmp / "keys.json"
    keys_file.write_text(keys_json(KEYS, **TRAINS))
    settings = settings_for(
        assets,
        tmp,
        keys_file,
        max_training_upload_bytes=4 * 1024 * 1024,
        max_training_images=40,
        max_training_classes=3,
        max_queued_jobs=2,
    )
    with serving(settings) as client:
        yield client, DirectoryJobs(settings.store_dir)


def submit(client, archive: bytes, caller: str = "acme", **fields):
    data = {"domain": "acme-shapes", "epochs": "2", "batch_size": "8", "preset": "digits", **fields}
    return client.post("/training/jobs", files={"archive": ("set.zip", archive)}, data=data, headers=key(caller))


def listing(store: DirectoryJobs) -> list[str]:
    return sorted(p.name for p in store.root.iterdir()) if store.root.exists() else []


BAD = {  # name -> (archive, fields, caller, status, code)
    "not an archive": (b"just some bytes", {}, "acme", 415, "not_archive"),
    "zip bomb": (bomb(), {}, "acme", 413, "zip_bomb"),
    "path leaving the folder": (zipped({"../a/1.png": png(1), "b/1.png": png(2)}), {}, "acme", 422, "unsafe_path"),
    "one class": (zipped({"set/a/1.png": png(1), "set/a/2.png": png(2)}), {}, "acme", 422, "one_class"),
    "empty class": (
        zipped({"set/a/1.png": png(1), "set/c/1.png": png(2)}, ("set/b/",)),
        {},
        "acme",
        422,
        "empty_class",
    ),
    "undecodable image": (
        zipped({"set/a/1.png": png(1), "set/b/1.png": b"\x89PNG broken"}),
        {},
        "acme",
        422,
        "undecodable",
    ),
    "too many images": (dark_and_light(per_class=21), {}, "acme", 422, "too_many_images"),
    "too many classes": (
        zipped({f"set/{c}/1.png": png(i) for i, c in enumerate("abcd")}),
        {},
        "acme",
        422,
        "too_many_classes",
    ),
    "too large": (
        zipped({"set/a/1.bin.png": np.random.bytes(5 * 1024 * 1024), "set/b/1.png": png(1)}),
        {},
        "acme",
        413,
        "request_too_large",
    ),
    "bad domain name": (dark_and_light(), {"domain": "Not A Name"}, "acme", 422, "invalid_domain"),
    "domain the key may not write": (dark_and_light(), {"domain": "beta-shapes"}, "acme", 403, "domain_forbidden"),
    "key without the right to train": (dark_and_light(), {}, "viewer", 403, "forbidden"),
    "epochs out of bounds": (dark_and_light(), {"epochs": "100000"}, "acme", 422, "invalid_request"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_bad_submit_is_refused_with_its_code_and_stores_nothing(service, case):
    client, store = service
    archive, fields, caller, status, code = BAD[case]
    before = listing(store)
    response = submit(client, archive, caller, **fields)
    assert (response.status_code, response.json()["error"]) == (status, code), response.text
    assert response.json()["detail"]
    assert listing(store) == before


def test_tenants_see_and_cancel_only_their_own_jobs_and_the_queue_is_bounded(service):
    client, store = service
    queued = submit(client, dark_and_light())
    assert queued.status_code == 202, queued.text
    job = queued.json()
    assert job["state"] == "queued" and job["tenant"] == "acme" and job["classes"] == ["dark", "light"]
    assert queued.headers["location"] == job["links"]["self"] == f"/training/jobs/{job['id']}"
    assert job["recipe"]["epochs"] == 2 and job["images"] == 24
    second = submit(client, dark_and_light())
    assert second.status_code == 202
    third = submit(client, dark_and_light())
    assert (third.status_code, third.json()["error"]) == (429, "too_many_jobs") and third.headers["retry-after"]

    for path in (job["links"]["self"], job["links"]["events"] + "?follow=false"):
        other = client.get(path, headers=key("beta"))
        assert (other.status_code, other.json()["error"]) == (404, "unknown_job")
    assert client.post(job["links"]["cancel"], headers=key("beta")).status_code == 404
    assert client.get("/training/jobs", headers=key("beta")).json()["jobs"] == []
    mine = client.get("/training/jobs?limit=1", headers=key("acme")).json()
    assert [j["id"] for j in mine["jobs"]] == [job["id"]] and mine["next_cursor"] == job["id"]
    rest = client.get(f"/training/jobs?cursor={mine['next_cursor']}", headers=key("acme")).json()
    assert [j["id"] for j in rest["jobs"]] == [second.json()["id"]] and rest["next_cursor"] is None
    assert client.get(job["links"]["self"], headers=key("ops")).status_code == 200  # an admin sees every job
    assert client.get(job["links"]["bundle"], headers=key("acme")).json()["error"] == "not_trained"

    for one in (job, second.json()):
        cancelled = client.post(one["links"]["cancel"], headers=key("acme")).json()
        assert cancelled["state"] == "cancelled" and cancelled["finished_at"]
    assert not (store.root / job["id"] / "upload.bin").exists()
    assert client.get("/training/jobs", headers=auth(None)).status_code == 401


def events(client, path: str, caller: str = "acme") -> list[tuple[str, dict]]:
    with client.stream("GET", path, headers=key(caller)) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if not fields:  # a keep-alive comment
            continue
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_a_job_trains_registers_and_serves_and_its_events_stream(service, assets):
    client, store = service
    job = submit(client, dark_and_light(), epochs="3").json()
    worker = threading.Thread(target=Worker(store, assets.backbone_path, "test-worker").run_one)
    worker.start()
    streamed = events(client, job["links"]["events"])  # follows the job to its end
    worker.join()
    kinds = [kind for kind, _ in streamed]
    assert kinds[0] == "state" and kinds[-1] == "end"
    states = [data["state"] for kind, data in streamed if kind == "state"]
    assert states[0] in ("queued", "running") and states[-1] == "succeeded"  # registering may pass unseen
    epochs = [data for kind, data in streamed if kind == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and epochs[-1]["eta_s"] == 0
    steps = [data for kind, data in streamed if kind == "step"]
    assert steps and all(s["images_per_s"] > 0 and s["loss"] > 0 for s in steps)
    done = streamed[-1][1]
    assert done["state"] == "succeeded" and done["version"] == 1 and 0 <= done["accuracy"] <= 1

    predicted = client.post("/predict/acme-shapes", files={"file": ("x.png", png(220))}, headers=key("acme"))
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["version"] == 1
    assert {p["label"] for p in predicted.json()["predictions"]} == {"dark", "light"}
    bundle = client.get(job["links"]["bundle"], headers=key("acme"))
    assert (
        bundle.status_code == 200
        and bundle.content[:8]
        and "acme-shapes.safetensors" in bundle.headers["content-disposition"]
    )
    # reconnecting after the last numbered event gives only what follows it
    last = sum(1 for kind in kinds if kind in ("epoch", "step", "resumed")) - 1
    with client.stream("GET", job["links"]["events"], headers={**key("acme"), "Last-Event-ID": str(last)}) as response:
        tail = "".join(response.iter_text())
    assert "event: epoch" not in tail and "event: end" in tail
    left = sorted(p.name for p in (store.root / job["id"]).iterdir())
    assert left == ["bundle.safetensors", "events.jsonl", "job.json"]

    deadline = time.monotonic() + 10  # the registrar reads the job list's figures once it has registered
    metrics = ""
    while 'ra_training_jobs{state="succeeded"} 1.0' not in metrics and time.monotonic() < deadline:
        time.sleep(0.2)
        metrics = client.get("/metrics", headers=key("ops")).text
    assert 'ra_training_jobs{state="succeeded"} 1.0' in metrics
    assert 'ra_training_job_seconds_count{state="succeeded"} 1.0' in metrics
    assert "ra_training_queue_wait_seconds_count 1.0" in metrics
    images = next(line for line in metrics.splitlines() if line.startswith("ra_training_images_total"))
    assert float(images.split()[-1]) == pytest.approx(24 * 0.9 * 3)
